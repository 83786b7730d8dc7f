"""Distillation losses of the seed papers, as plain functions over explicit tensors.

Every soft-label loss reads the cache's sparse targets as they are stored (docs/format.md):

    topk_ids       [B, L, k]  long   teacher's k most likely ids per position
    topk_logprobs  [B, L, k]  float  their log-probs at the build temperature T_b, sorted descending
    tail_logmass   [B, L]     float  log of the mass outside the top k (-inf when k == vocab)
    mask           [B, L]     bool   valid positions; padding is False

and the student's unnormalised `logits [B, L, V]`. No dense teacher distribution over V is
ever built: the student's log-probabilities are gathered at the k ids (O(k) per position after
one logsumexp over V), and the "rest" bin's student log-probability is the non-top-k mass summed
term by term inside that same pass (see `student_log_probs` for why and how). Padded
positions are dropped before any arithmetic, so their content (ids out of range, NaN log-probs)
can change neither the loss nor the gradients.

Reductions (`reduction=`): "mean" averages over valid positions of the batch, "utterance_mean"
averages within each utterance and then over utterances with at least one valid position (the
form of paper 004's equations), "sum" adds, "none" returns the per-position losses [B, L] with
zeros at padding.

Which formula comes from which paper, the defaults and the bias of each approximation are in
docs/losses.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Tail",
    "TargetKind",
    "Reduction",
    "LST_WEIGHT",
    "LST_TEMPERATURE",
    "MULTITASK_TEMPERATURE",
    "INTERAED_K",
    "INTERAED_TEMPERATURE",
    "INTERAED_MIX",
    "ACD_TAU",
    "ACD_NUM_NEGATIVES",
    "HKD_MSE_SCALE",
    "HKD_COS_SCALE",
    "teacher_log_probs",
    "student_log_probs",
    "sparse_kd_ce",
    "sparse_kd_kl",
    "hard_ce",
    "lst_loss",
    "multitask_kd_loss",
    "hierarchical_kd_loss",
    "essence_kd_loss",
    "interaed_kd_loss",
    "sample_negative_indices",
    "acd_infonce_loss",
    "acd_mse_loss",
    "acd_cosine_loss",
    "lrd_loss",
    "cif_quantity_loss",
]

Tail = Literal["rest_bin", "renormalize"]
# What the cached top-k streams hold (TeacherRecord.targets): the k most likely ids + tail bin,
# or the distinct ids of N draws from the teacher with log(count / N) and tail -inf.
TargetKind = Literal["topk", "sampled"]
Reduction = Literal["mean", "utterance_mean", "sum", "none"]

# Paper defaults (docs/losses.md gives the section each comes from). The config dataclasses
# (kdcache.student.config) are the source a run reads; these constants and the keyword defaults
# below must equal them (tests/test_paper_defaults.py checks).
LST_WEIGHT = 0.1  # 001 via DESIGN; 000 sec. 5.1 sweeps it
LST_TEMPERATURE = 5.0  # 000 sec. 5.1 ("We fixed the T value to 5.0"), DESIGN
MULTITASK_TEMPERATURE = 1.0  # 000 sec. 5.1 ("fixing the value of T at 1.0")
INTERAED_K = 8  # 002 (brief / DESIGN): top-8 masked-LM tokens
INTERAED_TEMPERATURE = 3.0  # 002 (brief / DESIGN)
INTERAED_MIX = 0.9  # 002 (brief / DESIGN): 0.9 soft + 0.1 hard
ACD_TAU = 0.02  # 004 sec. 4.1
ACD_NUM_NEGATIVES = 700  # 004 sec. 4.1
HKD_MSE_SCALE = 0.01  # 004 sec. 3.2, alpha_mse
HKD_COS_SCALE = 10.0  # 004 sec. 3.2, alpha_cos

_NEG_INF = float("-inf")

# Essence KD is defined by the teacher's top k: what it distils is the renormalised "essence".
ESSENCE_SAMPLED_REFUSAL = (
    "Essence KD (paper 003) distils the teacher's top-k 'essence' by construction; sampled "
    "targets (count / N of draws) are another estimator, not its top k: build a "
    "--targets topk cache for this recipe"
)


# --------------------------------------------------------------------------------------------
# helpers


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half inputs (the cache stores float16), float64 stays float64."""
    return torch.promote_types(t.dtype, torch.float32)


def _check_common(
    logits: Tensor | None,
    topk_ids: Tensor | None,
    topk_logprobs: Tensor | None,
    tail_logmass: Tensor | None,
    mask: Tensor,
) -> None:
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [B, L], got {mask.dtype} {tuple(mask.shape)}")
    bl = tuple(mask.shape)
    if logits is not None and (logits.dim() != 3 or tuple(logits.shape[:2]) != bl):
        raise ValueError(f"logits must be [B, L, V] with [B, L] = {bl}, got {tuple(logits.shape)}")
    if topk_ids is not None:
        if topk_ids.dim() != 3 or tuple(topk_ids.shape[:2]) != bl:
            raise ValueError(
                f"topk_ids must be [B, L, k] with [B, L] = {bl}, got {tuple(topk_ids.shape)}"
            )
        if topk_ids.shape[-1] == 0:
            raise ValueError("the cache has k == 0 (hidden states only): no soft labels to distil")
        if logits is not None and topk_ids.shape[-1] > logits.shape[-1]:
            raise ValueError(
                f"k = {topk_ids.shape[-1]} exceeds the student's vocabulary {logits.shape[-1]}"
            )
    if topk_logprobs is not None and topk_ids is not None and topk_logprobs.shape != topk_ids.shape:
        raise ValueError(
            f"topk_logprobs {tuple(topk_logprobs.shape)} != topk_ids {tuple(topk_ids.shape)}"
        )
    if tail_logmass is not None and tuple(tail_logmass.shape) != bl:
        raise ValueError(f"tail_logmass must be [B, L] = {bl}, got {tuple(tail_logmass.shape)}")


def _valid_index(mask: Tensor) -> Tensor:
    """Flat indices [N] of the valid positions of mask [B, L]."""
    return mask.reshape(-1).nonzero().squeeze(1)


def _rows(x: Tensor, idx: Tensor) -> Tensor:
    """Select the valid positions of x [B, L, ...] -> [N, ...]."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, idx)


def _scatter_rows(values: Tensor, idx: Tensor, mask: Tensor) -> Tensor:
    """Per-row values [N] -> per-position [B, L] with zeros at padding."""
    out = values.new_zeros(mask.numel())
    out = out.index_copy(0, idx, values)
    return out.reshape(mask.shape)


def _reduce(per_pos: Tensor, mask: Tensor, reduction: Reduction) -> Tensor:
    """Reduce per-position losses [B, L] (zeros at padding). An empty batch gives 0, not NaN."""
    if reduction == "none":
        return per_pos
    if reduction == "sum":
        return per_pos.sum()
    if reduction == "mean":
        return per_pos.sum() / mask.sum().clamp(min=1).to(per_pos.dtype)
    if reduction == "utterance_mean":
        counts = mask.sum(dim=1)
        per_utt = per_pos.sum(dim=1) / counts.clamp(min=1).to(per_pos.dtype)
        return per_utt.sum() / (counts > 0).sum().clamp(min=1).to(per_pos.dtype)
    raise ValueError(f"unknown reduction {reduction!r}; use mean, utterance_mean, sum or none")


def _check_tail(tail: str) -> None:
    if tail not in ("rest_bin", "renormalize"):
        raise ValueError(f"unknown tail {tail!r}; use 'rest_bin' or 'renormalize'")


def _check_target_kind(target_kind: str) -> bool:
    """True for sampled targets."""
    if target_kind not in ("topk", "sampled"):
        raise ValueError(f"unknown target_kind {target_kind!r}; use 'topk' or 'sampled'")
    return target_kind == "sampled"


# --------------------------------------------------------------------------------------------
# the two sides of every soft-label loss


def teacher_log_probs(
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    *,
    tail: Tail = "rest_bin",
    k: int | None = None,
    temperature: float | None = None,
    build_temperature: float | None = None,
    target_kind: TargetKind = "topk",
) -> tuple[Tensor, Tensor | None]:
    """The teacher's target distribution over the top-k buckets (and the rest bin).

    Args:
        topk_logprobs: [..., K] cached log-probs at the build temperature, sorted descending.
        tail_logmass: [...] cached log of the mass outside the top K (-inf when K == vocab).
        tail: "rest_bin": K + 1 buckets (top-k ids and one bucket for everything else);
            "renormalize": the top k renormalised to sum to 1, no rest bucket (biased: it drops
            the tail, see docs/losses.md).
        k: use only the first k of the K stored entries (None: all). With "rest_bin" the
            dropped entries join the rest bucket; with "renormalize" they are discarded.
        temperature: the teacher temperature T the loss wants. None: as stored (T = T_b).
        build_temperature: T_b the cache was built at (TeacherRecord.temperature); required
            when `temperature` differs from it.
        target_kind: "topk" (default) or "sampled" (TeacherRecord.targets). Sampled targets
            are the empirical distribution of N draws, count / N: returned as stored (no rest
            bucket, whatever `tail` says; the stored entries already sum to 1), an unbiased
            estimate of the full teacher. Refused: `k` below the stored width (dropping draws
            biases it) and re-tempering (draws at T_b cannot be turned into draws at T).

    Returns:
        (log_p_topk [..., k], log_p_rest [...] or None for "renormalize"), normalised so the
        buckets sum to 1 (this also absorbs the float16 rounding of the stored log-probs).

    Re-tempering (T != T_b) uses p_T(i) ∝ p_b(i)^(T_b / T). For "renormalize" this is exact:
    the renormalised top k of softmax(z / T) is exactly that. For "rest_bin" the rest bucket is
    tempered as one bucket, (sum_j p_j)^(T_b/T) instead of sum_j p_j^(T_b/T): it under-weights
    the rest when softening (T > T_b) and over-weights it when sharpening (T < T_b).
    """
    _check_tail(tail)
    dtype = _compute_dtype(topk_logprobs)
    lp = topk_logprobs.to(dtype)
    rest = tail_logmass.to(dtype)
    full_k = lp.shape[-1]
    if _check_target_kind(target_kind):
        _check_sampled(k, full_k, temperature, build_temperature)
        return lp - torch.logsumexp(lp, dim=-1, keepdim=True), None
    if k is not None:
        if not 1 <= k <= full_k:
            raise ValueError(f"k = {k} must be in [1, {full_k}] (the cache stores k = {full_k})")
        if k < full_k and tail == "rest_bin":
            rest = torch.logaddexp(rest, torch.logsumexp(lp[..., k:], dim=-1))
        lp = lp[..., :k]
    if temperature is not None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if build_temperature is None:
            raise ValueError(
                "re-tempering needs build_temperature (the TeacherRecord's temperature); "
                "pass temperature=None to use the stored one"
            )
        if not build_temperature > 0:
            raise ValueError(f"build_temperature must be > 0, got {build_temperature}")
        if temperature != build_temperature:
            ratio = build_temperature / temperature
            lp = lp * ratio
            rest = rest * ratio
    if tail == "rest_bin":
        norm = torch.logaddexp(torch.logsumexp(lp, dim=-1), rest)
        return lp - norm.unsqueeze(-1), rest - norm
    norm = torch.logsumexp(lp, dim=-1, keepdim=True)
    return lp - norm, None


def _check_sampled(
    k: int | None, full_k: int, temperature: float | None, build_temperature: float | None
) -> None:
    """What sampled targets cannot do, refused with the reason (docs/losses.md)."""
    if k is not None and k < full_k:
        raise ValueError(
            f"sampled targets: k = {k} would keep {k} of the {full_k} stored entries; dropping "
            "drawn ids biases the count / N estimate (use all of them: k=None)"
        )
    if temperature is not None:
        if build_temperature is None:
            raise ValueError(
                "re-tempering needs build_temperature (the TeacherRecord's temperature); "
                "pass temperature=None to use the stored one"
            )
        if temperature != build_temperature:
            raise ValueError(
                f"sampled targets were drawn at T={build_temperature:g} and cannot be "
                f"re-tempered to T={temperature:g} (the draws are not log-probs; the stored "
                f"counts carry no teacher probabilities to reweight): build the cache with "
                f"--temperature {temperature:g}"
            )


def _first_occurrence(ids: Tensor) -> Tensor:
    """[N, k] bool: True at the first occurrence of each id in its row (all True when unique).

    O(N k log k); lets the fused rest-bin pass count a repeated id once in the normaliser, as the
    masked form (a set of ids) did.
    """
    if ids.shape[-1] <= 1:
        return torch.ones_like(ids, dtype=torch.bool)
    srt, order = ids.sort(dim=-1)
    first_sorted = torch.ones_like(srt, dtype=torch.bool)
    first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
    return torch.empty_like(first_sorted).scatter_(-1, order, first_sorted)


class _SoftmaxStats(torch.autograd.Function):
    """Everything the sparse losses read from the student's logits, in one pass.

    Inputs: logits [R, V] (any float dtype; computed in `_compute_dtype`), idx [N] the sorted
    valid rows (None: all R), ids [N, k] teacher ids, targets [N] hard labels or None, mean
    (label smoothing wants the mean logit), temperature T (the logits are divided by it).
    Outputs, over the N valid rows, of z = logits / T:

        log_q_topk [N, k]  z[top-k] - lse
        log_q_rest [N]     log of the softmax mass outside the top k (-inf when k == V / off)
        lse        [N]     logsumexp(z)
        z_y        [N]     z at the hard label (an empty tensor when there is none)
        z_mean     [N]     mean of z over V, for label smoothing (empty when not asked)

    Forward: e = exp(z - max) once (what a logsumexp does anyway), read the top k from it, zero
    them in place, and sum: that sum is the rest mass itself, added term by term, so there is no
    cancellation however peaked the row (the total is rest + top k, two positive sums). Rows
    whose rest underflows relative to the row max (rest < tiny * V / eps: float32 exp has lost
    digits there) are redone exactly with a masked logsumexp, on those rows only. e (top k
    zeroed) is kept for backward instead of z, so backward recomputes no exp.

    Rows: when at least half of the R rows are valid, e covers all R (the padding rows' exp is
    computed and zeroed, their ids replaced by a placeholder, their gradient exactly 0), so no
    [N, V] copy of the valid rows is made and the gradient needs no scatter back into [R, V];
    otherwise the valid rows are copied out once and that copy becomes e in place.

    Backward, with A = g_lse - sum_i g_top_i - g_rest and q = softmax(z):
        j not in top-k:  A q_j + g_rest exp(z_j - lse_rest) + g_mean / V   = e_j c_row + g_mean / V
        j in top-k:      A q_j + g_top_j + g_mean / V                      (O(k), scattered)
        plus g_y at the label (O(1), scattered), all divided by T for d/dlogits
    one [R, V] multiply-add for the whole CE_ls + soft-label gradient, where autograd through
    row selection, logsumexp, gather and mean would materialise and add an [N, V] gradient each.
    """

    @staticmethod
    def forward(ctx, logits, idx, ids, rest, targets, mean, temperature):  # type: ignore[override]
        n_all, vocab = logits.shape
        dtype = _compute_dtype(logits)
        if idx is not None and idx.numel() == n_all:
            idx = None  # sorted and unique: every row
        sel = None  # the valid rows of the working buffer, when it also holds padding rows
        if idx is None:
            z, own = logits, False
        elif 2 * idx.numel() >= n_all:
            z, own, sel = logits, False, idx
        else:
            z, own = logits.index_select(0, idx), True
        if z.dtype != dtype:
            z, own = z.to(dtype), True
        if temperature != 1.0:
            z, own = (z.div_(temperature) if own else z / temperature), True
        ids_w, tgt_w = ids, targets
        if sel is not None:  # padding rows get placeholder id 0 (theirs may be out of range)
            ids_w = ids.new_zeros(n_all, ids.shape[-1]).index_copy_(0, sel, ids)
            if targets is not None:
                tgt_w = targets.new_zeros(n_all).index_copy_(0, sel, targets)

        def pick(x: Tensor) -> Tensor:  # rows of the working buffer -> the N valid rows
            return x if sel is None else x.index_select(0, sel)

        has_rest = rest and ids.shape[-1] < vocab
        empty = logits.new_empty(0, dtype=dtype)
        z_top = pick(z.gather(-1, ids_w))
        z_y = empty if targets is None else pick(z.gather(-1, tgt_w.unsqueeze(-1)).squeeze(-1))
        z_mean = pick(z.mean(dim=-1)) if mean else empty
        m_w = z.amax(dim=-1, keepdim=True)
        # torch.logsumexp's convention: an all -inf (or inf) row is shifted by 0, not by inf
        m_w = torch.where(torch.isfinite(m_w), m_w, torch.zeros_like(m_w))
        e = (z.sub_(m_w) if own else torch.sub(z, m_w)).exp_()
        if sel is not None:
            pad = torch.ones(n_all, dtype=torch.bool, device=e.device).index_fill_(0, sel, False)
            e.index_fill_(0, pad.nonzero().squeeze(-1), 0.0)
        e_top = pick(e.gather(-1, ids_w))
        e.scatter_(-1, ids_w, 0.0)
        rest_sum = pick(e.sum(dim=-1))
        m = pick(m_w.squeeze(-1))
        first = _first_occurrence(ids)
        total = rest_sum + torch.where(first, e_top, torch.zeros_like(e_top)).sum(dim=-1)
        lse = m + total.log()
        log_q_topk = z_top - lse.unsqueeze(-1)
        shift = m
        if has_rest:
            lse_rest = m + rest_sum.log()
            info = torch.finfo(dtype)
            # terms below `tiny` lose digits in exp; their total is at most V * tiny, so a rest
            # sum above V * tiny / eps is exact to rounding. Below it, redo those rows exactly.
            rows = (rest_sum < info.tiny * vocab / info.eps).nonzero().squeeze(-1)
            if rows.numel():
                src = rows if idx is None else idx.index_select(0, rows)
                zr = logits.index_select(0, src).to(dtype)
                if temperature != 1.0:
                    zr = zr / temperature
                zr.scatter_(-1, ids.index_select(0, rows), _NEG_INF)
                lr = torch.logsumexp(zr, dim=-1)
                sr = torch.where(torch.isfinite(lr), lr, m.index_select(0, rows))
                lse_rest = lse_rest.index_copy(0, rows, lr)
                shift = shift.index_copy(0, rows, sr)
                e_rows = rows if sel is None else sel.index_select(0, rows)
                e.index_copy_(0, e_rows, zr.sub_(sr.unsqueeze(-1)).exp_())
            log_q_rest = lse_rest - lse
        else:
            lse_rest = torch.full_like(lse, _NEG_INF)
            log_q_rest = lse_rest
        ctx.meta = (has_rest, mean, vocab, temperature, logits.dtype, n_all)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(
                e, log_q_topk, lse, lse_rest, shift, ids_w, first, tgt_w, idx, sel
            )
        return log_q_topk, log_q_rest, lse, z_y, z_mean

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_top, g_rest, g_lse, g_y, g_mean):  # type: ignore[override]
        e, log_q_topk, lse, lse_rest, shift, ids_w, first, tgt_w, idx, sel = ctx.saved_tensors
        has_rest, mean, vocab, temperature, out_dtype, n_all = ctx.meta
        if not has_rest:
            g_rest = torch.zeros_like(g_lse)
        a = g_lse - g_top.sum(dim=-1) - g_rest
        coef = a * (shift - lse).exp()
        if has_rest:
            finite = torch.isfinite(lse_rest)
            coef = coef + torch.where(
                finite, g_rest * (shift - lse_rest).exp(), torch.zeros_like(coef)
            )
        # the top k: e is zero there, so the scatter adds A q_j + g_top_j (a repeated id once)
        top = g_top + torch.where(
            first, log_q_topk.exp() * a.unsqueeze(-1), torch.zeros_like(log_q_topk)
        )
        if temperature != 1.0:  # d z / d logits = 1 / T
            coef, top = coef / temperature, top / temperature
            if g_y.numel():
                g_y = g_y / temperature
            if mean:
                g_mean = g_mean / temperature

        def spread(x: Tensor) -> Tensor:  # the N valid rows -> rows of e, zeros at padding
            if sel is None:
                return x
            return x.new_zeros((e.shape[0],) + tuple(x.shape[1:])).index_copy_(0, sel, x)

        if mean:
            grad = torch.addcmul(
                spread(g_mean / vocab).unsqueeze(-1), e, spread(coef).unsqueeze(-1)
            )
        else:
            grad = e * spread(coef).unsqueeze(-1)
        grad.scatter_add_(-1, ids_w, spread(top))
        if tgt_w is not None:
            grad.scatter_add_(-1, tgt_w.unsqueeze(-1), spread(g_y).unsqueeze(-1))
        grad = grad.to(out_dtype)
        if idx is not None and sel is None:  # the valid rows were copied out: put them back
            grad = grad.new_zeros(n_all, vocab).index_copy_(0, idx, grad)
        return grad, None, None, None, None, None, None


class _Student(NamedTuple):
    """The student side of a sparse loss, over the valid rows (see `_student`)."""

    log_q: Tensor  # [N, k] log q at the teacher's ids
    log_q_rest: Tensor | None  # [N] log q of the rest bin; None if not asked or k == V
    lse: Tensor  # [N] logsumexp of the (tempered) logits
    z_y: Tensor | None  # [N] (tempered) logit at the hard label, when targets are given
    z_mean: Tensor | None  # [N] mean (tempered) logit, when mean=True (label smoothing)


# The previous, unfused student side (autograd through row selection, a masked logsumexp,
# gather and mean); tests and bench/train_overhead.py set this to compare against it.
_MASKED_REFERENCE = False


def _student(
    logits: Tensor,
    idx: Tensor | None,
    ids: Tensor,
    *,
    temperature: float = 1.0,
    rest: bool = True,
    targets: Tensor | None = None,
    mean: bool = False,
) -> _Student:
    """The student side over rows `idx` of logits [R, V] (None: all rows); ids [N, k]."""
    if temperature <= 0:
        raise ValueError(f"student temperature must be > 0, got {temperature}")
    if _MASKED_REFERENCE:
        rows = logits if idx is None else logits.index_select(0, idx)
        log_q, log_q_rest, z, lse = _student_log_probs_masked(
            rows, ids, temperature=temperature, rest=rest
        )
        z_y = None if targets is None else z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return _Student(log_q, log_q_rest, lse, z_y, z.mean(dim=-1) if mean else None)
    log_q, log_q_rest, lse, z_y, z_mean = _SoftmaxStats.apply(
        logits, idx, ids, rest, targets, mean, temperature
    )
    return _Student(
        log_q,
        log_q_rest if rest and ids.shape[-1] < logits.shape[-1] else None,
        lse,
        None if targets is None else z_y,
        z_mean if mean else None,
    )


def student_log_probs(
    logits: Tensor,
    topk_ids: Tensor,
    *,
    temperature: float = 1.0,
    rest: bool = True,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """The student's log-probs at the teacher's top-k ids, in its rest bin, and its logsumexp.

    Args:
        logits: [N, V] student logits (valid positions only).
        topk_ids: [N, k] teacher ids (unique within a row; a repeated id counts once in the
            normaliser and in the rest bin).
        temperature: student softmax temperature (logits / T).
        rest: compute the rest-bin log-prob.

    Returns:
        (log_q_topk [N, k], log_q_rest [N] or None, scaled logits [N, V], lse [N]) where
        log_q_rest = log sum_{j not in top-k} q(j); None when rest=False or k == V (empty rest).
        Computed in float32 for half-precision logits.

    Why the rest bin is not log1p(-sum(exp(log_q_topk))): the student is trained to put its mass
    on the teacher's top k, so sum_topk q -> 1 and the subtraction cancels catastrophically
    (float32 loses the rest entirely below ~1e-7, and the gradient of log1p(-x) blows up near
    x = 1). Nor log(sum_all - sum_topk), which cancels the same way. The rest mass is instead
    summed term by term over the non-top-k entries, which has no cancellation at any peak.

    How (`_SoftmaxStats`): inside the one exp(z - max) pass that the logsumexp needs anyway,
    the top-k entries are read and zeroed in place, so one sum gives the rest and the total is
    rest + top k. No masked [N, V] copy of the logits and no second O(V) logsumexp; only rows
    whose rest underflows float32 (rest < ~5e-27 of the row max at V = 50k) are redone with
    the exact masked logsumexp, on those rows alone. The backward is analytic, one [N, V]
    multiply: d lse / dz = q, d log_q_topk_i / dz_j = [j = t_i] - q_j,
    d log_q_rest / dz_j = [j not in top-k] exp(z_j - lse_rest) - q_j. The losses of this module
    go through the same pass with the hard label, the label-smoothing mean and the selection of
    the valid rows folded in, so CE_ls + soft labels backpropagate as one multiply-add straight
    into the logits' gradient. The previous form, logsumexp(z.scatter(top-k, -inf)) with
    autograd through it (`_student_log_probs_masked`, kept as the tests' reference), gives the
    same values; LST with it cost 1.8-1.9x CE_ls at V = 5k-50k, with this pass 1.0x
    (`bench/train_overhead.py --loss-vocab 5000,50000 --loss-positions 2560`; numbers in
    docs/performance/training.md). On a GPU the underflow check is one host sync.
    """
    if temperature <= 0:
        raise ValueError(f"student temperature must be > 0, got {temperature}")
    z = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        z = z / temperature
    st = _student(z, None, topk_ids, rest=rest)
    return st.log_q, st.log_q_rest, z, st.lse


def _student_log_probs_masked(
    logits: Tensor, topk_ids: Tensor, *, temperature: float = 1.0, rest: bool = True
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """The previous `student_log_probs`: autograd through logsumexp of a masked [N, V] copy.

    Kept as the reference the fused form is tested and benchmarked against.
    """
    if temperature <= 0:
        raise ValueError(f"student temperature must be > 0, got {temperature}")
    z = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    log_q_topk = z.gather(-1, topk_ids) - lse.unsqueeze(-1)
    log_q_rest = None
    if rest and topk_ids.shape[-1] < z.shape[-1]:
        z_rest = z.scatter(-1, topk_ids, _NEG_INF)
        log_q_rest = torch.logsumexp(z_rest, dim=-1) - lse
    return log_q_topk, log_q_rest, z, lse


def _soft_ce_rows(
    log_p: Tensor, log_p_rest: Tensor | None, log_q: Tensor, log_q_rest: Tensor | None
) -> Tensor:
    """-sum_i p_i log q_i (+ rest term) per row [N]; 0 * log 0 = 0 (a student logit at -inf
    where the teacher has no mass, e.g. a suppressed blank, costs nothing)."""
    p = log_p.exp()
    ce = -torch.where(p > 0, p * log_q, torch.zeros_like(p)).sum(-1)
    if log_p_rest is not None and log_q_rest is not None:
        p_rest = log_p_rest.exp()
        # p_rest == 0 (tail -inf) must give 0, not 0 * inf
        ce = ce - torch.where(p_rest > 0, p_rest * log_q_rest, torch.zeros_like(p_rest))
    return ce


def _kl_rows(
    log_p: Tensor, log_p_rest: Tensor | None, log_q: Tensor, log_q_rest: Tensor | None
) -> Tensor:
    """sum_i p_i (log p_i - log q_i) (+ rest term) per row [N]; 0 log 0 = 0."""
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    if log_p_rest is not None and log_q_rest is not None:
        p_rest = log_p_rest.exp()
        kl = kl + torch.where(
            p_rest > 0, p_rest * (log_p_rest - log_q_rest), torch.zeros_like(p_rest)
        )
    return kl


def _soft_mask(mask: Tensor, teacher_mask: Tensor | None) -> Tensor:
    if teacher_mask is None:
        return mask
    if teacher_mask.dtype != torch.bool or tuple(teacher_mask.shape) != tuple(mask.shape):
        raise ValueError(
            f"teacher_mask must be bool [B, L] = {tuple(mask.shape)}, "
            f"got {teacher_mask.dtype} {tuple(teacher_mask.shape)}"
        )
    return mask & teacher_mask


def _sparse_rows(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    mask: Tensor,
    *,
    tail: Tail,
    k: int | None,
    student_temperature: float,
    teacher_temperature: float | None,
    build_temperature: float | None,
    soft_mask: Tensor | None = None,
    targets: Tensor | None = None,
    mean: bool = False,
    target_kind: TargetKind = "topk",
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, _Student]:
    """Shared front half: select the rows of `mask`, form teacher and student log-probs.

    Rows of `mask` outside `soft_mask` (positions with no teacher target) get a harmless
    placeholder teacher (ids 0..k-1, uniform), so their garbage never reaches the arithmetic;
    callers discard their soft terms via the returned `is_soft` [N]. `targets` [B, L] (hard
    labels, checked at the valid positions) and `mean` (label smoothing) go through the same
    student pass (`_SoftmaxStats`). Returns (idx, is_soft, log_p, log_p_rest, student).
    """
    _check_common(student_logits, topk_ids, topk_logprobs, tail_logmass, mask)
    _check_tail(tail)
    idx = _valid_index(mask)
    ids = _rows(topk_ids, idx).long()
    lp = _rows(topk_logprobs, idx)
    tl = _rows(tail_logmass, idx)
    if soft_mask is None:
        is_soft = torch.ones(idx.shape[0], dtype=torch.bool, device=idx.device)
    else:
        is_soft = soft_mask.reshape(-1).index_select(0, idx)
        kk = ids.shape[-1]
        keep = is_soft.unsqueeze(-1)
        ids = torch.where(keep, ids, torch.arange(kk, device=ids.device))
        lp = torch.where(keep, lp, torch.full_like(lp, -math.log(kk)))
        tl = torch.where(is_soft, tl, torch.full_like(tl, _NEG_INF))
    log_p, log_p_rest = teacher_log_probs(
        lp,
        tl,
        tail=tail,
        k=k,
        temperature=teacher_temperature,
        build_temperature=build_temperature,
        target_kind=target_kind,
    )
    if k is not None:
        ids = ids[:, :k]
    if targets is not None:
        targets = _check_targets(targets, mask, student_logits.shape[-1], idx)
    st = _student(
        student_logits.reshape(-1, student_logits.shape[-1]),
        idx,
        ids,
        temperature=student_temperature,
        rest=tail == "rest_bin" and log_p_rest is not None,
        targets=targets,
        mean=mean,
    )
    return idx, is_soft, log_p, log_p_rest, st


# --------------------------------------------------------------------------------------------
# core sparse soft-label losses


def sparse_kd_ce(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    mask: Tensor,
    *,
    tail: Tail = "rest_bin",
    k: int | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float | None = None,
    build_temperature: float | None = None,
    reduction: Reduction = "mean",
    target_kind: TargetKind = "topk",
) -> Tensor:
    """Soft-target cross entropy H(p_T, q) from sparse cached targets.

    rest_bin:    -sum_{i in topk} p(i) log q(i) - p(rest) log q(rest)
    renormalize: -sum_{i in topk} p~(i) log q(i),  p~ = top k renormalised to sum 1

    where q = softmax(student_logits / student_temperature) over the whole vocabulary and
    q(rest) = sum of q outside the top k. When k == V both forms equal the dense cross entropy.

    Args:
        student_logits: [B, L, V] student logits.
        topk_ids: [B, L, K] teacher ids (any integer dtype; padding may hold anything).
        topk_logprobs: [B, L, K] teacher log-probs at the build temperature, sorted descending.
        tail_logmass: [B, L] log mass outside the top K (-inf when K == V).
        mask: [B, L] bool, True at valid positions.
        tail: "rest_bin" (default, unbiased on the K + 1 buckets) or "renormalize".
        k: use the first k of the K stored entries (None: all K).
        student_temperature: T_s dividing the student logits.
        teacher_temperature: re-temper the teacher to this T (None: as stored); see
            `teacher_log_probs` for when this is exact and the bias when it is not.
        build_temperature: T_b of the cache, needed when teacher_temperature is given.
        reduction: "mean" | "utterance_mean" | "sum" | "none".
        target_kind: "topk" or "sampled" (TeacherRecord.targets). Sampled: the CE against
            count / N, no rest bin (`tail` does not apply); its expectation over the draws is
            the dense H(p_T, q) and its gradient softmax(z) - count / N is unbiased too.

    Returns:
        Scalar loss, or [B, L] per-position losses (zeros at padding) for reduction="none".
    """
    idx, _, log_p, log_p_rest, st = _sparse_rows(
        student_logits,
        topk_ids,
        topk_logprobs,
        tail_logmass,
        mask,
        tail=tail,
        k=k,
        student_temperature=student_temperature,
        teacher_temperature=teacher_temperature,
        build_temperature=build_temperature,
        target_kind=target_kind,
    )
    return _reduce(
        _scatter_rows(_soft_ce_rows(log_p, log_p_rest, st.log_q, st.log_q_rest), idx, mask),
        mask,
        reduction,
    )


def sparse_kd_kl(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    mask: Tensor,
    *,
    tail: Tail = "rest_bin",
    k: int | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float | None = None,
    build_temperature: float | None = None,
    reduction: Reduction = "mean",
    target_kind: TargetKind = "topk",
) -> Tensor:
    """KL(p_T || q) on the same support as `sparse_kd_ce`: the CE minus the teacher entropy.

    rest_bin:    sum_{i in topk} p(i) log(p(i)/q(i)) + p(rest) log(p(rest)/q(rest))
    renormalize: sum_{i in topk} p~(i) log(p~(i)/q(i))

    Computed term by term (not CE - H) so it stays >= 0 up to rounding. Both forms are >= 0:
    the rest-bin form is a KL between two distributions on K + 1 buckets, and for the
    renormalised form sum_topk q <= 1. Same gradients w.r.t. the student as `sparse_kd_ce`.

    Sampled targets (target_kind="sampled"): KL(count / N || q) = CE - H(count / N). The
    subtracted entropy is the sample's, not the teacher's, so the expectation is not
    KL(p || q) (it is H(p, q) - E[H(count / N)]); it differs from it by a constant that does
    not depend on the student, and the gradient is the CE's, unbiased.

    Args and Returns: as `sparse_kd_ce`.
    """
    idx, _, log_p, log_p_rest, st = _sparse_rows(
        student_logits,
        topk_ids,
        topk_logprobs,
        tail_logmass,
        mask,
        tail=tail,
        k=k,
        student_temperature=student_temperature,
        teacher_temperature=teacher_temperature,
        build_temperature=build_temperature,
        target_kind=target_kind,
    )
    return _reduce(
        _scatter_rows(_kl_rows(log_p, log_p_rest, st.log_q, st.log_q_rest), idx, mask),
        mask,
        reduction,
    )


def _hard_ce_rows(st: _Student, label_smoothing: float) -> Tensor:
    """(1 - eps) * -log q(y) + eps * -mean_v log q(v) per row (torch's label smoothing), from a
    student pass given the targets (and mean=True when eps > 0)."""
    nll = st.lse - st.z_y
    if label_smoothing == 0.0:
        return nll
    return (1.0 - label_smoothing) * nll + label_smoothing * (st.lse - st.z_mean)


def _check_targets(targets: Tensor, mask: Tensor, vocab: int, idx: Tensor) -> Tensor:
    if tuple(targets.shape) != tuple(mask.shape):
        raise ValueError(
            f"targets must be [B, L] = {tuple(mask.shape)}, got {tuple(targets.shape)}"
        )
    t = _rows(targets, idx).long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise ValueError(f"targets at valid positions must lie in [0, {vocab})")
    return t


def hard_ce(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    label_smoothing: float = 0.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Cross entropy with the reference labels, optional label smoothing.

    Same convention as torch.nn.functional.cross_entropy(label_smoothing=eps): the target is
    (1 - eps) one-hot + eps / V uniform.

    Args:
        logits: [B, L, V] student logits.
        targets: [B, L] reference ids (padding may hold anything, e.g. -1 or an ignore id).
        mask: [B, L] bool valid positions.
        label_smoothing: eps in [0, 1].
        reduction: "mean" | "utterance_mean" | "sum" | "none".

    Returns:
        Scalar, or [B, L] for reduction="none".
    """
    _check_common(logits, None, None, None, mask)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    idx = _valid_index(mask)
    t = _check_targets(targets, mask, logits.shape[-1], idx)
    # the label doubles as the (k = 1) gathered id: one softmax pass, one [N, V] backward
    st = _student(
        logits.reshape(-1, logits.shape[-1]),
        idx,
        t.unsqueeze(-1),
        rest=False,
        targets=t,
        mean=label_smoothing > 0.0,
    )
    return _reduce(_scatter_rows(_hard_ce_rows(st, label_smoothing), idx, mask), mask, reduction)


# --------------------------------------------------------------------------------------------
# the papers' combined losses


def lst_loss(
    logits: Tensor,
    targets: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    mask: Tensor,
    *,
    weight: float = LST_WEIGHT,
    label_smoothing: float = 0.0,
    temperature: float = LST_TEMPERATURE,
    build_temperature: float | None = None,
    tail: Tail = "rest_bin",
    teacher_mask: Tensor | None = None,
    reduction: Reduction = "mean",
    target_kind: TargetKind = "topk",
) -> Tensor:
    """Learn Spelling from Teachers (paper 001; eq. (2) of paper 000).

        L = (1 - w) * CE_ls(y, q) + w * H(p_T, q),   q = softmax(logits)  (student NOT tempered)

    The teacher is the LM's distribution at temperature T (T = 5 in 000 sec. 5.1); the student
    decoder output is used at T = 1 (000 sec. 2.2 describes LST as a KL between the
    interpolated target and "the output of the student network", i.e. the plain softmax).
    Equivalent to a CE with the interpolated target (1 - w) y + w p_T. At positions with no
    teacher target (`teacher_mask` False, e.g. the <eos> step for a masked-LM teacher) the
    target degenerates to the one-hot label: plain CE_ls at full weight.

    Args:
        logits: [B, L, V] attention-decoder logits (teacher forcing, positions = tokens).
        targets: [B, L] reference token ids (padding may hold anything, e.g. -100).
        topk_ids, topk_logprobs, tail_logmass: [B, L, K], [B, L, K], [B, L] cached LM targets,
            padded to the logits' positions.
        mask: [B, L] bool positions that have a reference label.
        weight: w, the soft-label weight (0.1).
        label_smoothing: eps of the hard-label CE (0.0; the DESIGN table's "CE_ls", see
            docs/losses.md: the paper text we have gives no value).
        temperature: teacher temperature T (5.0).
        build_temperature: T_b of the cache. None: the cache is taken to be at `temperature`
            (build LST caches at T_b = 5); else the teacher is re-tempered from T_b to T
            (approximate with tail="rest_bin", see `teacher_log_probs`).
        tail: "rest_bin" | "renormalize".
        teacher_mask: [B, L] bool positions with a teacher target (None: all of `mask`).
        reduction: "mean" | "utterance_mean" | "sum" | "none", over `mask`.
        target_kind: "topk" or "sampled" (see `sparse_kd_ce`); sampled targets must be at
            T = `temperature` already (no re-tempering).

    Returns:
        Scalar, or [B, L] for reduction="none".
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    idx, is_soft, log_p, log_p_rest, st = _sparse_rows(
        logits,
        topk_ids,
        topk_logprobs,
        tail_logmass,
        mask,
        tail=tail,
        k=None,
        student_temperature=1.0,
        teacher_temperature=None if build_temperature is None else temperature,
        build_temperature=build_temperature,
        soft_mask=_soft_mask(mask, teacher_mask),
        targets=targets,
        mean=label_smoothing > 0.0,
        target_kind=target_kind,
    )
    hard = _hard_ce_rows(st, label_smoothing)
    soft = _soft_ce_rows(log_p, log_p_rest, st.log_q, st.log_q_rest)
    rows = torch.where(is_soft, (1.0 - weight) * hard + weight * soft, hard)
    return _reduce(_scatter_rows(rows, idx, mask), mask, reduction)


def multitask_kd_loss(
    sl_logits: Tensor,
    kd_logits: Tensor,
    targets: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    mask: Tensor,
    *,
    lam: float,
    temperature: float = MULTITASK_TEMPERATURE,
    build_temperature: float | None = None,
    t2_scaling: bool = False,
    tail: Tail = "rest_bin",
    teacher_mask: Tensor | None = None,
    reduction: Reduction = "mean",
    target_kind: TargetKind = "topk",
) -> Tensor:
    """Multi-task KD with a separate KD head (paper 000, sec. 3.1, eq. (4)).

        L = lam * CE(y, softmax(u_SL)) + (1 - lam) * KL(softmax(v / T) || softmax(u_KD / T))

    Both the teacher and the student KD head are at temperature T (T = 1 in 000 sec. 5.1).
    The supervised head never sees the soft labels and the KD head never sees the hard ones.
    The two terms are summed over their own positions (`mask` for the CE, `teacher_mask`
    for the KD term) and reduced over `mask`.

    Args:
        sl_logits: [B, L, V] supervised-learning head logits u_SL.
        kd_logits: [B, L, V_teacher] auxiliary KD head logits u_KD (its vocabulary is the
            teacher's, which may differ from the student's: the point of the method).
        targets: [B, L] reference ids for the SL head.
        topk_ids, topk_logprobs, tail_logmass: cached teacher targets, padded to [B, L].
        mask: [B, L] bool positions with a reference label.
        lam: lambda in [0, 1]; no default: 000 sweeps it (Fig. 3).
        temperature: T for teacher and KD head (1.0).
        build_temperature: T_b of the cache; None means the cache is at `temperature`.
        t2_scaling: multiply the KD term by T^2 (Hinton et al.); off by default, moot at T = 1.
        tail: "rest_bin" | "renormalize".
        teacher_mask: [B, L] bool positions with a teacher target (None: all of `mask`).
        reduction: "mean" | "utterance_mean" | "sum" | "none", over `mask`.
        target_kind: "topk" or "sampled" (see `sparse_kd_kl`: with sampled targets the KD
            term is off by a student-independent constant, its gradient unbiased).

    Returns:
        Scalar, or [B, L] for reduction="none".
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if tuple(sl_logits.shape[:2]) != tuple(kd_logits.shape[:2]):
        raise ValueError(
            f"sl_logits {tuple(sl_logits.shape)} and kd_logits {tuple(kd_logits.shape)} differ in [B, L]"
        )
    kd = sparse_kd_kl(
        kd_logits,
        topk_ids,
        topk_logprobs,
        tail_logmass,
        _soft_mask(mask, teacher_mask),
        tail=tail,
        student_temperature=temperature,
        teacher_temperature=None if build_temperature is None else temperature,
        build_temperature=build_temperature,
        reduction="none",
        target_kind=target_kind,
    )
    if t2_scaling:
        kd = kd * (temperature * temperature)
    sl = hard_ce(sl_logits, targets, mask, reduction="none")
    return _reduce(lam * sl + (1.0 - lam) * kd, mask, reduction)


def hierarchical_kd_loss(terms: Sequence[tuple[float, Tensor]]) -> Tensor:
    """Hierarchical KD (paper 000, sec. 3.2): a weighted sum of per-teacher KD terms.

    One auxiliary KD head per teacher unit (senones, phones, subwords, ...); each term is
    typically `sparse_kd_kl(head_logits_j, targets of teacher j, ...)`, computed on that
    teacher's positions. The supervised CE is added once by the caller (or put it in as a term).

    Args:
        terms: (weight, scalar loss) pairs; weights are finite and >= 0.

    Returns:
        sum_j weight_j * loss_j (scalar).
    """
    if not terms:
        raise ValueError("hierarchical_kd_loss needs at least one (weight, loss) term")
    total = None
    for i, (w, loss) in enumerate(terms):
        w = float(w)
        if not (w >= 0.0 and w != float("inf")):
            raise ValueError(f"term {i}: weight must be finite and >= 0, got {w}")
        if loss.dim() != 0:
            raise ValueError(f"term {i}: loss must be a scalar, got shape {tuple(loss.shape)}")
        total = w * loss if total is None else total + w * loss
    return total


def essence_kd_loss(
    logits: Tensor,
    targets: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    mask: Tensor,
    *,
    alpha: float,
    k: int | None = None,
    temperature: float | None = None,
    build_temperature: float | None = None,
    teacher_mask: Tensor | None = None,
    reduction: Reduction = "mean",
    target_kind: TargetKind = "topk",
) -> Tensor:
    """Essence KD (paper 003): hard labels plus only the teacher's top-k "essence".

        L = alpha * CE(y, q) + (1 - alpha) * H(p~_k, q),   p~_k = teacher top k renormalised

    The paper distils an ensemble of hybrid acoustic models at the frame level (senone
    posteriors vs. frame alignments). Here it is position-agnostic: positions are whatever
    units the cache's teacher has, frames (an `ensemble` teacher, with `targets` a frame
    alignment) or tokens (decoder outputs). For a CTC student without frame alignments, use
    the soft term alone: `sparse_kd_ce(..., tail="renormalize", k=k)` and CTC for the hard part.
    Multi-task form: each term is summed over its own positions (`mask`, `teacher_mask`).

    Args:
        logits: [B, L, V] student logits at the teacher's positions.
        targets: [B, L] hard labels (frame alignment or tokens).
        topk_ids, topk_logprobs, tail_logmass: cached ensemble targets, padded to [B, L].
        mask: [B, L] bool positions with a hard label.
        alpha: weight of the hard-label CE; no default (the paper's value is not in our text).
        k: keep the first k stored entries (None: all stored); the tail is always dropped.
        temperature: teacher temperature (None: as stored). Exact for any T: re-tempering
            a renormalised top k needs no tail.
        build_temperature: T_b, needed when `temperature` is given.
        teacher_mask: [B, L] bool positions with a teacher target (None: all of `mask`).
        reduction: "mean" | "utterance_mean" | "sum" | "none", over `mask`.
        target_kind: must be "topk": the method is defined by the top k; sampled targets are
            refused (ESSENCE_SAMPLED_REFUSAL).

    Returns:
        Scalar, or [B, L] for reduction="none".
    """
    if _check_target_kind(target_kind):
        raise ValueError(ESSENCE_SAMPLED_REFUSAL)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    idx, is_soft, log_p, _, st = _sparse_rows(
        logits,
        topk_ids,
        topk_logprobs,
        tail_logmass,
        mask,
        tail="renormalize",
        k=k,
        student_temperature=1.0,
        teacher_temperature=temperature,
        build_temperature=build_temperature,
        soft_mask=_soft_mask(mask, teacher_mask),
        targets=targets,
    )
    hard = _hard_ce_rows(st, 0.0)
    soft = torch.where(is_soft, _soft_ce_rows(log_p, None, st.log_q, None), torch.zeros_like(hard))
    return _reduce(_scatter_rows(alpha * hard + (1.0 - alpha) * soft, idx, mask), mask, reduction)


def interaed_kd_loss(
    aux_logits: Sequence[Tensor],
    targets: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    mask: Tensor,
    *,
    k: int | None = INTERAED_K,
    temperature: float = INTERAED_TEMPERATURE,
    build_temperature: float | None = None,
    mix: float = INTERAED_MIX,
    mix_with: Literal["label", "uniform"] = "label",
    beta: float = 1.0,
    teacher_mask: Tensor | None = None,
    reduction: Reduction = "mean",
    target_kind: TargetKind = "topk",
) -> Tensor:
    """interAED-KD (paper 002): soft-target CE on auxiliary attention decoders.

    Soft target per token position, from the masked LM's top k at temperature T:

        s = mix * p~_{k,T} + (1 - mix) * onehot(y)       (mix_with="label", default)
        s = mix * p~_{k,T} + (1 - mix) * 1/V             (mix_with="uniform")

    with p~_{k,T} the top k renormalised (exact at any T from a cache at any T_b, see
    `teacher_log_probs`). Where the teacher has no target (`teacher_mask` False, e.g. <eos>)
    s is the one-hot label. Each auxiliary attention decoder (on an intermediate and on the
    final CTC encoder layer) gets H(s, softmax(logits_l)); the result is beta * sum_l of them.
    The CTC loss of the encoder is added by the caller.

    Args:
        aux_logits: one [B, L, V] tensor per auxiliary decoder (teacher forcing on the tokens).
        targets: [B, L] reference token ids.
        topk_ids, topk_logprobs, tail_logmass: cached masked-LM targets, padded to [B, L]; the
            cache must store at least k entries.
        mask: [B, L] bool positions with a reference label.
        k: top entries kept (8); None: all stored. Sampled targets need None (or the stored
            width): their soft part is count / N, an unbiased estimate of the untruncated p_T.
        temperature: teacher temperature T (3.0).
        build_temperature: T_b of the cache; None means the cache is at `temperature`.
        mix: weight of the LM soft label (0.9).
        mix_with: "label" (one-hot reference) or "uniform".
        beta: weight of the summed KD terms (1.0; tuned per setup, not from the paper).
        teacher_mask: [B, L] bool positions with a teacher target (None: all of `mask`).
        reduction: "mean" | "utterance_mean" | "sum" | "none", over `mask`.
        target_kind: "topk" or "sampled" (see `k`; no re-tempering of sampled targets).

    Returns:
        Scalar, or [B, L] for reduction="none".
    """
    if not aux_logits:
        raise ValueError("interaed_kd_loss needs at least one auxiliary decoder output")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    if mix_with not in ("label", "uniform"):
        raise ValueError(f"mix_with must be 'label' or 'uniform', got {mix_with!r}")
    soft_mask = _soft_mask(mask, teacher_mask)
    total = None
    for logits in aux_logits:
        idx, is_soft, log_p, _, st = _sparse_rows(
            logits,
            topk_ids,
            topk_logprobs,
            tail_logmass,
            mask,
            tail="renormalize",
            k=k,
            student_temperature=1.0,
            teacher_temperature=None if build_temperature is None else temperature,
            build_temperature=build_temperature,
            soft_mask=soft_mask,
            targets=targets,
            mean=mix_with == "uniform",
            target_kind=target_kind,
        )
        hard = _hard_ce_rows(st, 0.0)
        other = hard if mix_with == "label" else st.lse - st.z_mean
        soft = _soft_ce_rows(log_p, None, st.log_q, None)
        rows = torch.where(is_soft, mix * soft + (1.0 - mix) * other, hard)
        per_pos = _scatter_rows(rows, idx, mask)
        total = per_pos if total is None else total + per_pos
    return _reduce(beta * total, mask, reduction)


# --------------------------------------------------------------------------------------------
# HKD (paper 004): representation losses on CIF outputs and decoder states


def _check_hidden(student: Tensor, teacher: Tensor, mask: Tensor) -> None:
    _check_common(None, None, None, None, mask)
    if student.dim() != 3 or tuple(student.shape[:2]) != tuple(mask.shape):
        raise ValueError(
            f"student states must be [B, L, D] with [B, L] = {tuple(mask.shape)}, got {tuple(student.shape)}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} hidden states differ: "
            "project the student to the teacher's dimension and align lengths first"
        )


def sample_negative_indices(
    num_valid: int,
    num_negatives: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    chunk_rows: int = 1024,
) -> Tensor:
    """For each of N valid tokens, K distinct other tokens, uniformly without replacement.

    K = min(num_negatives, N - 1): it shrinks when the batch has fewer valid tokens. A token is
    never its own negative (self-hits are excluded by construction: a draw j from the N - 1
    others is shifted past the row index).

    Args:
        num_valid: N, valid tokens in the batch (flattened in mask order).
        num_negatives: K wanted.
        generator: torch.Generator for reproducible draws; the draws happen on its device
            and the indices are moved to `device` (a CPU generator works for CUDA tensors).
        device: where the returned indices live.
        chunk_rows: rows drawn at a time (memory is chunk_rows * N floats).

    Returns:
        [N, K] long indices into the N valid tokens.
    """
    n = int(num_valid)
    k = max(0, min(int(num_negatives), n - 1))
    if n == 0 or k == 0:
        return torch.zeros(n, 0, dtype=torch.long, device=device)
    draw_device = generator.device if generator is not None else device
    out = []
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        r = torch.rand(stop - start, n - 1, generator=generator, device=draw_device)
        j = r.topk(k, dim=1).indices  # a uniform k-subset of the n - 1 others
        rows = torch.arange(start, stop, device=draw_device).unsqueeze(1)
        out.append(j + (j >= rows).long())
    return torch.cat(out, dim=0).to(device)


def acd_infonce_loss(
    cif_out_proj: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor,
    *,
    tau: float = ACD_TAU,
    num_negatives: int = ACD_NUM_NEGATIVES,
    generator: torch.Generator | None = None,
    negative_indices: Tensor | None = None,
    reduction: Reduction = "utterance_mean",
) -> Tensor:
    """Acoustic contrastive distillation, InfoNCE (paper 004, sec. 2.2.1, eq. (2)).

        l_i = -log( s(c_i, e_i) / (s(c_i, e_i) + sum_{k=1..K} s(c_i, e_{n(i,k)})) ),
        s(x, y) = exp(<x, y> / tau), c and e L2-normalised,

    positive = the teacher vector at the same position, negatives = K teacher vectors drawn
    from the batch's other valid positions (`sample_negative_indices`). Default reduction is
    the paper's: mean over an utterance's tokens, then over utterances.

    The negative logits are made chunk by chunk as (c @ e^T)[rows].gather(negatives), which
    never materialises [N, K, D] and frees each [chunk, N] block after the gather.

    Args:
        cif_out_proj: [B, L, D] CIF outputs after the student's Linear to the teacher dim.
        teacher_hidden: [B, L, D] teacher hidden states at the same token positions.
        mask: [B, L] bool valid token positions.
        tau: temperature (0.02).
        num_negatives: K (700); shrinks to N - 1 for small batches.
        generator: for the negative draws.
        negative_indices: [N, K] precomputed indices into the N valid tokens (mask order);
            overrides sampling (tests, or sharing draws across losses).
        reduction: "mean" | "utterance_mean" | "sum" | "none".

    Returns:
        Scalar, or [B, L] for reduction="none". A batch with one valid token gives 0.
    """
    _check_hidden(cif_out_proj, teacher_hidden, mask)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    idx = _valid_index(mask)
    dtype = _compute_dtype(cif_out_proj)
    c = F.normalize(_rows(cif_out_proj, idx).to(dtype), dim=-1, eps=1e-8)
    e = F.normalize(_rows(teacher_hidden, idx).to(dtype), dim=-1, eps=1e-8)
    n = c.shape[0]
    if negative_indices is None:
        negative_indices = sample_negative_indices(
            n, num_negatives, generator=generator, device=c.device
        )
    elif negative_indices.dim() != 2 or negative_indices.shape[0] != n:
        raise ValueError(
            f"negative_indices must be [N={n}, K], got {tuple(negative_indices.shape)}"
        )
    pos = (c * e).sum(-1) / tau  # [N]
    neg = _negative_logits(c, e, negative_indices.to(c.device)) / tau  # [N, K]
    rows = torch.logsumexp(torch.cat([pos.unsqueeze(1), neg], dim=1), dim=1) - pos
    return _reduce(_scatter_rows(rows, idx, mask), mask, reduction)


def _negative_logits(c: Tensor, e: Tensor, neg: Tensor, chunk_rows: int = 1024) -> Tensor:
    """<c_i, e_{neg[i, k]}> as [N, K], chunked matmul + gather.

    Autocast is switched off: at tau = 0.02 a bf16 matmul's ~3 significant digits would put
    noise of ~0.2 on every logit.
    """
    out = []
    with torch.autocast(device_type=c.device.type, enabled=False):
        for start in range(0, c.shape[0], chunk_rows):
            stop = min(c.shape[0], start + chunk_rows)
            out.append((c[start:stop] @ e.T).gather(1, neg[start:stop]))
    return torch.cat(out, dim=0) if out else c.new_zeros(0, neg.shape[1])


def _negative_logits_plain(c: Tensor, e: Tensor, neg: Tensor) -> Tensor:
    """Plain version of `_negative_logits` ([N, K, D] gather); the fast one is tested against it."""
    return torch.einsum("nd,nkd->nk", c, e[neg])


def acd_mse_loss(
    cif_out_proj: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor,
    *,
    scale: float = HKD_MSE_SCALE,
    reduction: Reduction = "utterance_mean",
) -> Tensor:
    """ACD ablation with MSE (paper 004, eq. (3)): scale * sum_d (c^_d - e_d)^2 per token.

    Args:
        cif_out_proj: [B, L, D] projected CIF outputs (not normalised).
        teacher_hidden: [B, L, D] teacher hidden states.
        mask: [B, L] bool valid positions.
        scale: alpha_mse (0.01, 004 sec. 3.2).
        reduction: default "utterance_mean" as in the paper.

    Returns:
        Scalar, or [B, L] for reduction="none".
    """
    return _mse(cif_out_proj, teacher_hidden, mask, scale, reduction)


def acd_cosine_loss(
    cif_out_proj: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor,
    *,
    scale: float = HKD_COS_SCALE,
    reduction: Reduction = "utterance_mean",
) -> Tensor:
    """ACD ablation with cosine embedding loss (paper 004, eq. (4)): scale * (1 - cos(c^, e)).

    Args:
        cif_out_proj: [B, L, D] projected CIF outputs.
        teacher_hidden: [B, L, D] teacher hidden states.
        mask: [B, L] bool valid positions.
        scale: alpha_cos (10, 004 sec. 3.2).
        reduction: default "utterance_mean" as in the paper.

    Returns:
        Scalar, or [B, L] for reduction="none".
    """
    return _cos(cif_out_proj, teacher_hidden, mask, scale, reduction)


def _mse(
    student: Tensor, teacher: Tensor, mask: Tensor, scale: float, reduction: Reduction
) -> Tensor:
    _check_hidden(student, teacher, mask)
    idx = _valid_index(mask)
    dtype = _compute_dtype(student)
    diff = _rows(student, idx).to(dtype) - _rows(teacher, idx).to(dtype)
    return _reduce(_scatter_rows(scale * diff.pow(2).sum(-1), idx, mask), mask, reduction)


def _cos(
    student: Tensor, teacher: Tensor, mask: Tensor, scale: float, reduction: Reduction
) -> Tensor:
    _check_hidden(student, teacher, mask)
    idx = _valid_index(mask)
    dtype = _compute_dtype(student)
    cos = F.cosine_similarity(
        _rows(student, idx).to(dtype), _rows(teacher, idx).to(dtype), dim=-1, eps=1e-8
    )
    return _reduce(_scatter_rows(scale * (1.0 - cos), idx, mask), mask, reduction)


def lrd_loss(
    decoder_state_proj: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor,
    *,
    kind: Literal["mse", "cosine"] = "mse",
    scale: float | None = None,
    reduction: Reduction = "utterance_mean",
) -> Tensor:
    """Linguistic regression distillation (paper 004, sec. 2.2.2, eq. (5)).

        mse:    scale * sum_d (s^_d - e_d)^2 per token   (the paper's LRD)
        cosine: scale * (1 - cos(s^, e))                 (ablation)

    Args:
        decoder_state_proj: [B, L, D] decoder pre-output states after a Linear to the teacher dim.
        teacher_hidden: [B, L, D] teacher hidden states ([CLS] dropped; 004 sec. 2.1.2).
        mask: [B, L] bool valid token positions.
        kind: "mse" (default, the paper) or "cosine".
        scale: None gives the paper's alpha: 0.01 for mse, 10 for cosine (004 sec. 3.2).
        reduction: default "utterance_mean" as in the paper.

    Returns:
        Scalar, or [B, L] for reduction="none".
    """
    if kind == "mse":
        return _mse(
            decoder_state_proj,
            teacher_hidden,
            mask,
            HKD_MSE_SCALE if scale is None else scale,
            reduction,
        )
    if kind == "cosine":
        return _cos(
            decoder_state_proj,
            teacher_hidden,
            mask,
            HKD_COS_SCALE if scale is None else scale,
            reduction,
        )
    raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")


def cif_quantity_loss(
    alpha_sum: Tensor,
    target_lengths: Tensor,
    *,
    reduction: Literal["mean", "token_mean", "sum", "none"] = "mean",
) -> Tensor:
    """CIF quantity loss |sum_u a_u - S| (the CIF paper, Dong & Xu 2020; 004 weight 1.0).

    Args:
        alpha_sum: [B] sum of the CIF weights over each utterance's valid frames (before any
            scaling to the target length, which is applied in training and would zero this).
        target_lengths: [B] number of target tokens (including <eos> when the decoder
            predicts it, as in the 004 implementation).
        reduction: "mean" over the batch (default), "token_mean" (the sum divided by the
            batch's target tokens, FunASR's ``normalize_length``: the gradient per weight no
            longer grows with the units per utterance, e.g. ~70 characters), "sum", or "none".

    Returns:
        Scalar, or [B] for reduction="none".
    """
    if alpha_sum.dim() != 1 or tuple(alpha_sum.shape) != tuple(target_lengths.shape):
        raise ValueError(
            f"alpha_sum {tuple(alpha_sum.shape)} and target_lengths {tuple(target_lengths.shape)} must both be [B]"
        )
    per = (alpha_sum - target_lengths.to(alpha_sum.dtype)).abs()
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    if reduction == "mean":
        return per.mean() if per.numel() else per.sum()
    if reduction == "token_mean":
        return per.sum() / target_lengths.sum().clamp(min=1).to(per.dtype)
    raise ValueError(f"unknown reduction {reduction!r}; use mean, token_mean, sum or none")
