"""Continuous integrate-and-fire (Dong & Xu 2020) and the CIF decoder of paper 004.

CIF turns encoder frames into one vector per token: a weight a_t in (0, 1) is predicted per
frame and accumulated; when the sum reaches the threshold (1.0) the module "fires" and emits the
weighted sum of the frames integrated so far. The firing frame's weight is split: the part
that completes the threshold goes to the token being fired, the remainder starts the next one.

Training (target lengths known): the weights are scaled to sum to the target length L
(a_t * L / sum(a)), so exactly L vectors come out; the quantity loss |sum(a) - L| uses the
*unscaled* sum (returned as `alpha_sum`). Should float rounding leave the last token just
short of the threshold, the leftover integration is emitted as that token; extra fires are cut.

Inference: unscaled weights; after the last frame the leftover integration is fired as a last
token only if its weight is above `tail_threshold` (0.5; Dong & Xu's tail handling), because a
remainder that large is most of a token the audio ended inside.

Position convention: CIF output i (0-based) is aligned with target token y_{i+1}, i.e. with the
teacher cache's position i. There is no eos position (paper 004 appends <EOS> and aligns it
with BERT's [SEP]; the cache drops [SEP], and the number of fires already ends a hypothesis).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcache.student.conformer import lengths_to_mask, sinusoidal_positions
from kdcache.student.decoder import DecoderLayer, causal_mask


def integrate_and_fire(
    hidden: Tensor,
    alphas: Tensor,
    threshold: float = 1.0,
    target_lens: Tensor | None = None,
    tail_threshold: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Integrate weighted frames and fire one vector per completed threshold.

    A frame whose weight completes more than one threshold (possible only after scaling) fires
    several times: first the completing part, then `threshold * h_t` per extra fire.

    Args:
        hidden: [B, T, D] frames to integrate (encoder output).
        alphas: [B, T] non-negative weights, 0 at padded frames (already scaled if training).
        threshold: firing threshold beta.
        target_lens: [B] if given, output exactly target_lens[b] vectors per utterance
            (training); else fire the leftover only if it weighs more than `tail_threshold`.
        tail_threshold: see above (inference only).

    Returns:
        fired: [B, N, D] fired vectors, zero beyond each utterance's count.
        lens: [B] number of fired vectors (== target_lens when given).
    """
    b, t_max, d = hidden.shape
    acc_w = alphas.new_zeros(b)  # weight integrated towards the current token
    acc = hidden.new_zeros(b, d)  # weighted sum integrated towards the current token
    firsts, counts = [], []
    for t in range(t_max):
        a, h = alphas[:, t], hidden[:, t]
        total = acc_w + a
        k = torch.div(total.detach(), threshold, rounding_mode="floor").long()  # fires at t
        fire = k > 0
        firsts.append(acc + (threshold - acc_w)[:, None] * h)  # meaningful where fire
        counts.append(k)
        rest = total - k.to(total.dtype) * threshold
        acc = torch.where(fire[:, None], rest[:, None] * h, acc + a[:, None] * h)
        acc_w = rest
    k = torch.stack(counts, 1) if t_max else alphas.new_zeros(b, 0, dtype=torch.long)
    k_max = int(k.max()) if k.numel() else 0
    # Slot j of frame t holds its (j+1)-th fire; compact the valid slots to the front.
    if k_max > 0:
        first = torch.stack(firsts, 1)
        slots = [first] + [threshold * hidden] * (k_max - 1)
        slots_t = torch.stack(slots, 2).reshape(b, t_max * k_max, d)
        valid = (torch.arange(k_max, device=k.device) < k[..., None]).reshape(b, t_max * k_max)
    else:
        slots_t = hidden.new_zeros(b, 0, d)
        valid = torch.zeros(b, 0, dtype=torch.bool, device=hidden.device)
    n_fired = valid.sum(1)
    if target_lens is None:
        tail = acc_w > tail_threshold
    else:
        tail = n_fired < target_lens
    slots_t = torch.cat([slots_t, acc[:, None]], 1)
    valid = torch.cat([valid, tail[:, None]], 1)
    lens = n_fired + tail.long()
    if target_lens is not None:
        lens = torch.minimum(lens, target_lens)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    n_out = int(lens.max()) if b else 0
    if target_lens is not None and b:
        n_out = int(target_lens.max())
    order = order[:, :n_out]
    fired = slots_t.gather(1, order[..., None].expand(-1, -1, d))
    if fired.shape[1] < n_out:  # fewer slots than the longest target: pad
        fired = F.pad(fired, (0, 0, 0, n_out - fired.shape[1]))
    fired = fired * lengths_to_mask(lens, n_out)[..., None].to(fired.dtype)
    return fired, lens


class CifWeightPredictor(nn.Module):
    """Paper 004's weight predictor: Conv1d over time, ReLU, dropout, Linear(D, 1), sigmoid."""

    def __init__(self, d_model: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(d_model, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Args: x [B, T, D], mask [B, T] (True = valid). Returns alphas [B, T], 0 at padding."""
        x = x.masked_fill(~mask[..., None], 0.0)  # so padding cannot leak through the conv
        x = self.drop(F.relu(self.conv(x.transpose(1, 2)).transpose(1, 2)))
        return torch.sigmoid(self.proj(x)).squeeze(-1) * mask.to(x.dtype)


class Cif(nn.Module):
    """Weight predictor + integrate-and-fire with training-time scaling and tail handling."""

    def __init__(
        self, d_model: int, kernel: int, dropout: float, threshold: float, tail_threshold: float
    ) -> None:
        super().__init__()
        self.predictor = CifWeightPredictor(d_model, kernel, dropout)
        self.threshold = threshold
        self.tail_threshold = tail_threshold

    def forward(
        self, enc_out: Tensor, enc_mask: Tensor, target_lens: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Args:
            enc_out: [B, T, D] encoder output.
            enc_mask: [B, T] bool, True = valid frame.
            target_lens: [B] token counts (training); None at inference.

        Returns:
            cif_out: [B, N, D] float32, one vector per token (N = max target length when
                training).
            cif_lens: [B] vectors per utterance (== target_lens when training).
            alphas: [B, T] unscaled weights.
            alpha_sum: [B] sum of the unscaled weights, for the quantity loss |alpha_sum - L|.
        """
        # float32 throughout: under bf16 autocast the running sums would lose the threshold
        alphas = self.predictor(enc_out, enc_mask).float()
        alpha_sum = alphas.sum(1)
        weights = alphas
        if target_lens is not None:
            scale = target_lens.to(alphas.dtype) * self.threshold / alpha_sum.clamp(min=1e-4)
            weights = alphas * scale[:, None]
        cif_out, cif_lens = integrate_and_fire(
            enc_out.float(), weights, self.threshold, target_lens, self.tail_threshold
        )
        return cif_out, cif_lens, alphas, alpha_sum


class CifDecoder(nn.Module):
    """Paper 004's decoder on CIF outputs: FC input layer, Transformer blocks, FC output.

    Autoregressive (the paper's): step i reads Linear([c_i ; embed(y_i)]) with y_0 = bos and
    causal self-attention, so position i predicts y_{i+1} from its acoustic vector c_i and the
    tokens before it. Non-autoregressive (an option): Linear(c_i) with full self-attention over
    the valid CIF positions, decoded in one pass. There is no cross-attention: the CIF outputs
    are already aligned one-to-one with the tokens.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_heads: int,
        num_layers: int,
        ff_mult: int,
        dropout: float,
        autoregressive: bool,
    ) -> None:
        super().__init__()
        self.autoregressive = autoregressive
        self.embed = nn.Embedding(vocab_size, d_model) if autoregressive else None
        self.inp = nn.Linear(2 * d_model if autoregressive else d_model, d_model)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, num_heads, ff_mult, dropout, cross=False)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(
        self, cif_out: Tensor, cif_mask: Tensor, prev_tokens: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Args:
            cif_out: [B, U, D] CIF vectors.
            cif_mask: [B, U] bool, True = valid position.
            prev_tokens: [B, U] `[bos, y_1, ..., y_{U-1}]` (autoregressive only; padding: any id).

        Returns:
            logits: [B, U, V]; position i predicts y_{i+1}.
            states: [B, U, D] pre-output states (after the final LayerNorm), for LRD.
        """
        u = cif_out.shape[1]
        if self.autoregressive:
            assert prev_tokens is not None, "the autoregressive CIF decoder needs prev_tokens"
            x = self.inp(torch.cat([cif_out, self.embed(prev_tokens)], -1))
            mask = causal_mask(u, cif_out.device)
        else:
            x = self.inp(cif_out)
            # an utterance with no CIF output attends everywhere rather than nowhere (NaN)
            mask = (cif_mask | ~cif_mask.any(1, keepdim=True))[:, None, :]
        x = self.drop(x + sinusoidal_positions(u, x.shape[-1], x.device).to(x.dtype))
        for layer in self.layers:
            x = layer(x, mask)
        states = self.norm(x)
        return self.out(states), states
