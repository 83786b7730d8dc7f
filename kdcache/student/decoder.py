"""Transformer attention decoder (teacher forcing), used as the main decoder and by interAED.

Position convention (the trainer and the losses rely on it): the decoder reads
`[bos, y_1, ..., y_L]` and its output at position i predicts `y_{i+1}` for i < L, and `eos` at
position L. So positions 0..L-1 line up one-to-one with the target tokens, which is also how
the teacher cache stores its positions (one per token, no specials).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdcache.student.conformer import FeedForward, MultiHeadAttention, sinusoidal_positions


def causal_mask(length: int, device: torch.device | None = None) -> Tensor:
    """[1, length, length] bool, True where query i may attend key j (j <= i)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None]


class DecoderLayer(nn.Module):
    """Pre-LN Transformer decoder layer: self-attention, optional cross-attention, feed-forward."""

    def __init__(
        self, d_model: int, num_heads: int, ff_mult: int, dropout: float, cross: bool = True
    ) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.cross_norm = nn.LayerNorm(d_model) if cross else None
        self.cross_attn = MultiHeadAttention(d_model, num_heads, dropout) if cross else None
        self.ff = FeedForward(d_model, ff_mult, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        self_mask: Tensor,
        mem: Tensor | None = None,
        mem_mask: Tensor | None = None,
    ) -> Tensor:
        """Args:
            x: [B, U, D].
            self_mask: [B or 1, U, U] bool, True = may attend.
            mem: [B, T, D] encoder output (layers built with cross=True only).
            mem_mask: [B, T] bool, True = valid encoder frame.

        Returns:
            [B, U, D].
        """
        h = self.self_norm(x)
        x = x + self.drop(self.self_attn(h, h, self_mask))
        if self.cross_attn is not None:
            assert mem is not None and mem_mask is not None
            x = x + self.drop(self.cross_attn(self.cross_norm(x), mem, mem_mask[:, None, :]))
        return x + self.ff(x)

    def step(
        self,
        x: Tensor,
        self_kv: tuple[Tensor, Tensor] | None,
        mem_kv: tuple[Tensor, Tensor] | None,
        mem_mask: Tensor | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One new position given the keys/values of the earlier ones (incremental decoding).

        Args:
            x: [N, 1, D] this layer's input at the new position.
            self_kv: keys/values of the earlier positions ([N, heads, i, D / heads] each), or
                None at position 0.
            mem_kv: `cross_attn.project_kv(mem)` ([N or 1, heads, T, .]); mem_mask [N or 1, T].

        Returns:
            The output at the new position [N, 1, D], and self_kv with the new position added.
            Equals the last row of `forward` on the whole prefix (causal attention: earlier
            positions never see later ones).
        """
        h = self.self_norm(x)
        k, v = self.self_attn.project_kv(h)
        if self_kv is not None:
            k, v = torch.cat([self_kv[0], k], 2), torch.cat([self_kv[1], v], 2)
        x = x + self.drop(self.self_attn.attend(h, k, v, None))
        if self.cross_attn is not None:
            assert mem_kv is not None and mem_mask is not None
            n = x.shape[0]
            mk, mv = (t.expand(n, -1, -1, -1) for t in mem_kv)
            x = x + self.drop(
                self.cross_attn.attend(
                    self.cross_norm(x), mk, mv, mem_mask.expand(n, -1)[:, None, :]
                )
            )
        return x + self.ff(x), (k, v)


class AttentionDecoder(nn.Module):
    """Autoregressive Transformer decoder over an encoder output.

    Causal self-attention alone keeps valid positions away from target padding (padding only
    ever follows the valid tokens), so no target padding mask is needed.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_heads: int,
        num_layers: int,
        ff_mult: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, num_heads, ff_mult, dropout) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor, memory: Tensor, memory_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher-forced pass.

        Args:
            tokens: [B, U] input ids, `[bos, y_1, ..., y_{U-1}]` (padding: any valid id).
            memory: [B, T, D] encoder output.
            memory_mask: [B, T] bool, True = valid encoder frame.

        Returns:
            logits: [B, U, V]; position i predicts the token after tokens[:, i].
            states: [B, U, D] pre-output states (after the final LayerNorm), for LRD and aux heads.
        """
        u = tokens.shape[1]
        x = self.embed(tokens) + sinusoidal_positions(u, memory.shape[2], tokens.device).to(
            memory.dtype
        )
        x = self.drop(x)
        mask = causal_mask(u, tokens.device)
        for layer in self.layers:
            x = layer(x, mask, memory, memory_mask)
        states = self.norm(x)
        return self.out(states), states

    def incremental(self, memory: Tensor, memory_mask: Tensor) -> IncrementalDecoder:
        """A next-token scorer over one utterance's encoder output [1, T, D] (mask [1, T]) that
        keeps every layer's keys/values: each call computes only the newest position."""
        return IncrementalDecoder(self, memory, memory_mask)


def parent_rows(
    rows: list[list[int]], prev: dict[tuple[int, ...], int], prev_len: int
) -> list[int] | None:
    """For prefixes ``rows`` (all of one length), the row of each one's parent (the prefix without
    its last token) in the previous call, whose prefixes ``prev`` maps to their rows and were
    ``prev_len`` long; None when the previous call was not one token shorter or a parent is
    unknown (then the caller recomputes from scratch). Shared by the incremental scorers."""
    if not rows or len(rows[0]) - 1 != prev_len:
        return None
    parents = [prev.get(tuple(r[:-1])) for r in rows]
    return None if any(p is None for p in parents) else parents


class IncrementalDecoder:
    """`step(prefixes)` -> next-token logits [N, V] of prefixes [N, i + 1] (bos first), equal to
    `decoder(prefixes, mem, mask)[0][:, -1]` but linear in the prefix length per call.

    Hypotheses may be reordered, dropped or repeated between calls (as a beam search does): a
    prefix's cached state is found through its parent (the prefix without its last token) from
    the previous call. A prefix whose parent is unknown is computed from scratch.
    """

    def __init__(self, decoder: AttentionDecoder, memory: Tensor, memory_mask: Tensor) -> None:
        self.dec = decoder
        self.mem_mask = memory_mask
        self.mem_kv = [
            layer.cross_attn.project_kv(memory) if layer.cross_attn is not None else None
            for layer in decoder.layers
        ]
        self.d_model = memory.shape[2]
        self.dtype = memory.dtype
        self.prev: dict[tuple[int, ...], int] = {}
        self.prev_kv: list[tuple[Tensor, Tensor]] = []
        self.prev_len = -1

    def step(self, prefixes: Tensor) -> Tensor:
        n, length = prefixes.shape
        rows = prefixes.tolist()
        parents = parent_rows(rows, self.prev, self.prev_len)
        if length == 1 or parents is not None:
            idx = (
                torch.tensor(parents, dtype=torch.long, device=prefixes.device) if parents else None
            )
            logits, kv = self._advance(prefixes[:, -1:], length - 1, idx)
        else:  # no usable cache (first call of a longer prefix, or an unknown parent): rebuild
            kv = None
            for i in range(length):
                logits, kv = self._advance(prefixes[:, i : i + 1], i, None, kv)
        self.prev = {tuple(r): j for j, r in enumerate(rows)}
        self.prev_kv, self.prev_len = kv, length
        return logits

    def _advance(self, tok: Tensor, pos: int, parents: Tensor | None, kv=None):
        if kv is None and parents is not None:
            kv = [(k[parents], v[parents]) for k, v in self.prev_kv]
        dec = self.dec
        pe = sinusoidal_positions(pos + 1, self.d_model, tok.device)[pos : pos + 1]
        x = dec.drop(dec.embed(tok) + pe.to(self.dtype))
        new_kv = []
        for j, layer in enumerate(dec.layers):
            x, layer_kv = layer.step(x, kv[j] if kv else None, self.mem_kv[j], self.mem_mask)
            new_kv.append(layer_kv)
        return dec.out(dec.norm(x))[:, -1], new_kv
