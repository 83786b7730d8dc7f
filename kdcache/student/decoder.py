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
