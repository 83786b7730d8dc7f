"""Conformer encoder (Gulati et al. 2020) with conv2d subsampling, plus the attention pieces the
decoders reuse.

Padding is exact: an utterance gives the same outputs at its valid frames whatever the padded
frames hold and however long the batch is. That is why the convolution module zeroes padded
frames before its depthwise conv and normalises with LayerNorm instead of BatchNorm (batch
statistics would mix padding into every frame during training).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def lengths_to_mask(lens: Tensor, max_len: int) -> Tensor:
    """Boolean validity mask.

    Args:
        lens: [B] integer lengths.
        max_len: width of the mask.

    Returns:
        [B, max_len] bool, True at valid positions (t < lens[b]).
    """
    return torch.arange(max_len, device=lens.device)[None, :] < lens[:, None]


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Absolute sinusoidal position table (Vaswani et al. 2017), [length, dim] float32."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    inv = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return pe


def subsampled_lengths(lens: Tensor, subsampling: int) -> Tensor:
    """Frame count after `log2(subsampling)` conv layers of kernel 3, stride 2, no padding.

    Each layer maps T -> (T - 1) // 2, so subsampling 4 gives ((T - 1) // 2 - 1) // 2
    (ESPnet's Conv2dSubsampling). An input needs at least 7 frames to keep one frame at 4x.

    Args:
        lens: [B] input frame counts.
        subsampling: 2, 4 or 8.

    Returns:
        [B] output frame counts, clamped at 0.
    """
    for _ in range(int(math.log2(subsampling))):
        lens = torch.div(lens - 1, 2, rounding_mode="floor")
    return lens.clamp(min=0)


class ConvSubsampling(nn.Module):
    """Stacked Conv2d(3x3, stride 2) + ReLU over (time, freq), then Linear to d_model.

    An output frame t only sees input frames 2t..2t+2, so valid outputs never read padding.
    ``channels`` sets the conv width (0 = d_model). With d_model channels the second conv costs
    d_model^2 x 9 MACs per output cell: at d_model 144 that is more than the whole Conformer
    stack of a small CPU student (docs/training.md), so the CPU recipes use 32.
    """

    def __init__(self, input_dim: int, d_model: int, subsampling: int, channels: int = 0) -> None:
        super().__init__()
        self.subsampling = subsampling
        width = channels or d_model  # 0 = d_model channels (ESPnet's Conv2dSubsampling)
        layers: list[nn.Module] = []
        freq, channels = input_dim, 1
        for _ in range(int(math.log2(subsampling))):
            layers += [nn.Conv2d(channels, width, 3, 2), nn.ReLU()]
            freq, channels = (freq - 1) // 2, width
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(width * freq, d_model)

    def forward(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        """Args: feats [B, T, F], feat_lens [B]. Returns: x [B, T', D], lens [B]."""
        x = self.conv(feats[:, None])  # [B, C, T', F']
        b, c, t, f = x.shape
        x = self.out(x.transpose(1, 2).reshape(b, t, c * f))
        return x, subsampled_lengths(feat_lens, self.subsampling)


class MultiHeadAttention(nn.Module):
    """Multi-head attention on F.scaled_dot_product_attention; used for self and cross attention."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        assert d_model % num_heads == 0, "d_model must be divisible by num_heads"
        self.num_heads = num_heads
        self.dropout = dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, mem: Tensor, mask: Tensor) -> Tensor:
        """Attend from x to mem.

        Args:
            x: [B, Tq, D] queries.
            mem: [B, Tk, D] keys/values (pass x for self-attention).
            mask: [B or 1, Tq or 1, Tk] bool, True = may attend. Every query row must allow at
                least one key (a fully masked row gives NaN).

        Returns:
            [B, Tq, D].
        """
        k, v = self.project_kv(mem)
        return self.attend(x, k, v, mask)

    def project_kv(self, mem: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of mem [B, Tk, D]: two [B, heads, Tk, D / heads] (cacheable)."""
        b, tk, d = mem.shape
        h = self.num_heads
        k, v = self.kv(mem).view(b, tk, 2, h, d // h).permute(2, 0, 3, 1, 4)
        return k, v

    def attend(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """Attend from x [B, Tq, D] to precomputed keys/values (see `forward`; mask None = all)."""
        b, tq, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, tq, h, d // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if mask is None else mask[:, None],
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(b, tq, d))


class FeedForward(nn.Sequential):
    """Pre-LN position-wise feed-forward: LN, Linear(D, mult*D), SiLU, Dropout, Linear, Dropout."""

    def __init__(self, d_model: int, mult: int, dropout: float) -> None:
        super().__init__(
            nn.LayerNorm(d_model),
            nn.Linear(d_model, mult * d_model),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(mult * d_model, d_model),
            nn.Dropout(dropout),
        )


class ConvModule(nn.Module):
    """Conformer convolution module: LN, pointwise+GLU, depthwise conv, LN, SiLU, pointwise."""

    def __init__(self, d_model: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.pw1 = nn.Linear(d_model, 2 * d_model)  # a kernel-1 conv is a Linear
        self.dw = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)
        self.dw_norm = nn.LayerNorm(d_model)
        self.pw2 = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Args: x [B, T, D], mask [B, T] (True = valid). Returns [B, T, D]."""
        x = F.glu(self.pw1(self.norm(x)), dim=-1)
        x = x.masked_fill(~mask[..., None], 0.0)  # padded frames must not leak into valid ones
        x = self.dw(x.transpose(1, 2)).transpose(1, 2)
        return self.drop(self.pw2(F.silu(self.dw_norm(x))))


class ConformerBlock(nn.Module):
    """Macaron block: x + FF/2, x + MHSA, x + Conv, x + FF/2, LayerNorm."""

    def __init__(
        self, d_model: int, num_heads: int, ff_mult: int, kernel: int, dropout: float
    ) -> None:
        super().__init__()
        self.ff1 = FeedForward(d_model, ff_mult, dropout)
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.attn_drop = nn.Dropout(dropout)
        self.conv = ConvModule(d_model, kernel, dropout)
        self.ff2 = FeedForward(d_model, ff_mult, dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Args: x [B, T, D], mask [B, T] (True = valid). Returns [B, T, D]."""
        x = x + 0.5 * self.ff1(x)
        h = self.attn_norm(x)
        x = x + self.attn_drop(self.attn(h, h, mask[:, None, :]))
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ff2(x)
        return self.norm(x)


class ConformerEncoder(nn.Module):
    """Conv subsampling, sinusoidal absolute positions, `num_layers` Conformer blocks."""

    def __init__(
        self,
        input_dim: int,
        d_model: int,
        num_heads: int,
        ff_mult: int,
        num_layers: int,
        conv_kernel: int,
        dropout: float,
        subsampling: int,
        subsampling_channels: int = 0,
    ) -> None:
        super().__init__()
        self.subsampling = ConvSubsampling(input_dim, d_model, subsampling, subsampling_channels)
        self.xscale = math.sqrt(d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            ConformerBlock(d_model, num_heads, ff_mult, conv_kernel, dropout)
            for _ in range(num_layers)
        )

    def forward(
        self, feats: Tensor, feat_lens: Tensor, return_layers: tuple[int, ...] = ()
    ) -> tuple[Tensor, Tensor, dict[int, Tensor]]:
        """Encode a padded batch.

        Args:
            feats: [B, T, F] features; frames at t >= feat_lens[b] are ignored.
            feat_lens: [B] valid frame counts (each >= 7 at 4x subsampling).
            return_layers: 1-based block indices whose outputs to return as well.

        Returns:
            out: [B, T', D] last block's output (garbage at padded frames; mask it).
            lens: [B] valid output frame counts.
            layers: {layer: [B, T', D]} outputs of the requested blocks.
        """
        if bool((subsampled_lengths(feat_lens, self.subsampling.subsampling) < 1).any()):
            raise ValueError(
                f"an utterance is too short for the conv subsampling: feat_lens={feat_lens.tolist()}"
            )
        x, lens = self.subsampling(feats, feat_lens)
        mask = lengths_to_mask(lens, x.shape[1])
        # Scale the content by sqrt(d_model) before adding the unit-amplitude positions
        # (Vaswani et al. 2017; ESPnet's PositionalEncoding). Without it the subsampling output
        # (std ~0.1 at init) was swamped by the positions (std 0.71), and the CTC head sat on its
        # blank plateau for hundreds of steps (docs/training.md, "Convergence on 2 CPU cores").
        pos = sinusoidal_positions(x.shape[1], x.shape[2], x.device).to(x.dtype)
        x = self.drop(x * self.xscale + pos)
        layers: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks, start=1):
            x = block(x, mask)
            if i in return_layers:
                layers[i] = x
        return x, lens, layers
