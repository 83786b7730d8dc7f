"""Sparse soft labels from logits: top-k log-probabilities plus the log-mass of the rest.

Runs on the teacher's device, so only ``[P, k]`` values (not ``[P, V]``) cross to the host.
"""

from __future__ import annotations

import torch

# Rows whose tail holds less than this share of the mass sum it term by term (see topk_targets).
TAIL_EXACT_BELOW = 1e-2


def label_scores(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's log-probability of its label, and its largest log-probability (temperature 1).

    Args:
        logits: ``[P, V]`` raw logits, any float dtype (computed in float32).
        labels: ``[P]`` ids in ``0..V-1``.

    Returns:
        ``labels [P, 1]`` int64, ``log p(label) [P, 1]`` float32, ``max log p [P]`` float32
        (the shapes of :func:`topk_targets` with k = 1, for ``run_rows(labels=True)``).
    """
    vocab = logits.shape[-1]
    labels = labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
        raise ValueError(f"labels must be in 0..{vocab - 1} (the vocabulary size)")
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(1, labels[:, None]) - lse[:, None]
    return labels[:, None], lp, z.max(dim=-1).values - lse


def topk_targets(
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of ``log_softmax(logits / temperature)`` and the log-probability outside it.

    The tail is never taken as ``log1p(-sum(exp(topk)))`` alone, which loses every digit once
    the top-k mass rounds to 1 (tails below ~1e-7 come out as -inf or garbage). Rows whose tail
    holds at least 1% of the mass use ``sum(all) - sum(top-k)`` (relative error ~1e-5 there);
    the other rows sum the non-top-k probabilities directly (exact to float32 rounding of each
    term). With ``k == V`` the tail is ``-inf``.

    This runs on every position of every teacher, so it makes few passes over the ``[P, V]``
    logits: one top-k, one exp, one sum; no log-softmax tensor, no scatter copy. Tokens whose
    logit equals the k-th largest but that are not in the top k (ties) count in the tail.

    Args:
        logits: ``[P, V]`` raw logits, any float dtype (computed in float32).
        k: Entries to keep, ``1 <= k <= V``.
        temperature: Softmax temperature (> 0).

    Returns:
        ``ids [P, k]`` int64, ``logprobs [P, k]`` float32 sorted descending, ``tail [P]`` float32.
    """
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} must be in 1..{vocab} (the vocabulary size)")
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    top_z, top_ids = torch.topk(z, k, dim=-1, largest=True, sorted=True)
    m = top_z[:, :1]  # the row maximum
    e = (z - m).exp_()
    total = e.sum(-1)
    lse = m.squeeze(-1) + total.log()
    top_lp = top_z - lse.unsqueeze(-1)
    if k == vocab:
        return top_ids, top_lp, torch.full_like(lse, float("-inf"))
    rest = total - (top_z - m).exp().sum(-1)
    small = rest < TAIL_EXACT_BELOW * total
    n_small = int(small.sum())
    if n_small:
        # Few rows: gather them; many: work on the whole tensor in place (no copies).
        rows = small.nonzero().squeeze(-1) if n_small * 4 < len(small) else None
        zr, er = (z[rows], e[rows]) if rows is not None else (z, e)
        tz, mr = (top_z[rows], m[rows]) if rows is not None else (top_z, m)
        kth = tz[:, -1:]
        exact = er.masked_fill_(zr >= kth, 0.0).sum(-1)
        ties = (zr == kth).sum(-1) - (tz == kth).sum(-1)
        exact = exact + ties * (kth - mr).squeeze(-1).exp()
        rest = (
            rest.index_put((rows,), exact) if rows is not None else torch.where(small, exact, rest)
        )
    tail = rest.clamp(min=0).log() + m.squeeze(-1) - lse
    return top_ids, top_lp, tail


def dense_reference(
    logits: torch.Tensor, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain float64 reference of :func:`topk_targets` (tests only): sort, sum, ``log(1 - mass)``."""
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    lp, ids = torch.sort(logp, dim=-1, descending=True)
    p = logp.exp()
    mask = torch.ones_like(p, dtype=torch.bool)
    mask.scatter_(-1, ids[..., :k], False)
    tail_mass = (p * mask).sum(-1)
    tail = torch.where(tail_mass > 0, tail_mass.log(), torch.full_like(tail_mass, float("-inf")))
    return ids[..., :k], lp[..., :k], tail


def sampled_targets(
    logits: torch.Tensor, width: int, uniforms: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled sparse targets: ``N`` i.i.d. draws per row from ``softmax(logits / temperature)``,
    stored as the distinct ids with ``log(count / N)`` (Random Sampling KD, arXiv 2503.16870).

    Draws are by inverse CDF (float64 cumulative sum, so a token's chance is its probability to
    ~1e-16) against the given uniforms: the same uniforms and logits give the same draws on any
    batch, rank or run. Entries are ordered by count (descending), then id (ascending); the
    ``width - distinct`` unused slots hold the smallest ids not drawn, with log-prob ``-inf``
    (the writer wants distinct ids). The tail is ``-inf``: the counts hold all the mass.

    Args:
        logits: ``[P, V]`` raw logits.
        width: Entries per row, ``min(N, V)`` (room for every distinct draw).
        uniforms: ``[P, N]`` float64 in [0, 1) (``spec.sample_uniforms`` rows).
        temperature: Softmax temperature (> 0).

    Returns:
        ``ids [P, width]`` int64, ``logprobs [P, width]`` float32, ``tail [P]`` float32 (-inf).
    """
    P, V = logits.shape
    n = uniforms.shape[-1]
    if not 1 <= width <= V or width < min(n, V):
        raise ValueError(f"width={width} must be in min(N={n}, V={V})..{V}")
    z = logits.double()
    if temperature != 1.0:
        z = z / temperature
    cdf = torch.softmax(z, dim=-1).cumsum_(dim=-1)
    u = uniforms.to(device=cdf.device, dtype=torch.float64) * cdf[:, -1:]
    draws = torch.searchsorted(cdf, u, right=True).clamp_(max=V - 1)
    del cdf, z
    # key = count * V - id: top `width` keys = counts descending, then ids ascending; ids never
    # drawn (count 0) follow, smallest first.
    key = torch.zeros(P, V, dtype=torch.int64, device=logits.device)
    key.scatter_add_(1, draws, torch.ones_like(draws))
    key.mul_(V).sub_(torch.arange(V, device=logits.device))
    top, ids = torch.topk(key, width, dim=-1, sorted=True)
    counts = (top + ids) // V
    lp = torch.log(counts.double() / n).float()
    return ids, lp, torch.full((P,), float("-inf"), device=logits.device)
