"""CTC forced alignment: the best (Viterbi) CTC path of a label sequence through per-frame
log-probabilities.

torchaudio's ``forced_align`` does this, but torchaudio does not import beside the CPU torch
wheel this project installs, so kdcache has its own (numpy, vectorised over the 2L + 1 states of
the blank-extended label sequence, a loop over frames). tests/test_aligned_lm.py checks it
against an exhaustive search over every path of small examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def min_frames(tokens: Sequence[int]) -> int:
    """Fewest frames a CTC path of ``tokens`` needs: one per token, plus a blank between each
    pair of equal neighbours."""
    return len(tokens) + sum(1 for a, b in zip(tokens, tokens[1:], strict=False) if a == b)


def ctc_forced_align(
    log_probs: np.ndarray, tokens: Sequence[int], blank: int = 0
) -> tuple[np.ndarray, float] | None:
    """The Viterbi CTC alignment of ``tokens`` to the frames of ``log_probs``.

    Args:
        log_probs: ``[T, V]`` per-frame log-probabilities (any normalisation; only the path
            scores' order matters).
        tokens: The label sequence (no blanks), ids < V.
        blank: The blank id.

    Returns:
        ``(frame_token, score)``: ``frame_token[t]`` is the index into ``tokens`` that frame t
        emits on the best path, or -1 where it emits blank; ``score`` is the path's summed
        log-probability. None when no path exists (fewer frames than :func:`min_frames`).
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"log_probs must be [T, V], got shape {lp.shape}")
    T = lp.shape[0]
    toks = [int(x) for x in tokens]
    if any(x == blank for x in toks):
        raise ValueError(f"tokens contain the blank id {blank}")
    if not toks:
        return np.full(T, -1, dtype=np.int64), float(lp[:, blank].sum())
    if T < min_frames(toks):
        return None
    S = 2 * len(toks) + 1
    ext = np.full(S, blank, dtype=np.int64)
    ext[1::2] = toks
    # state s may be entered from s - 2 when it is a token that differs from the token before
    skip = np.zeros(S, dtype=bool)
    skip[3::2] = ext[3::2] != ext[1:-2:2]
    neg = -np.inf
    dp = np.full(S, neg)
    dp[0] = lp[0, blank]
    dp[1] = lp[0, ext[1]]
    back = np.zeros((T, S), dtype=np.int8)  # 0: stayed, 1: from s - 1, 2: from s - 2
    cand = np.empty((3, S))
    for t in range(1, T):
        cand[0] = dp
        cand[1, 0] = neg
        cand[1, 1:] = dp[:-1]
        cand[2, :2] = neg
        cand[2, 2:] = np.where(skip[2:], dp[:-2], neg)
        best = cand.argmax(0)
        dp = cand[best, np.arange(S)] + lp[t, ext]
        back[t] = best
    end = S - 1 if dp[S - 1] >= dp[S - 2] else S - 2
    score = float(dp[end])
    if not np.isfinite(score):
        return None
    states = np.empty(T, dtype=np.int64)
    s = end
    for t in range(T - 1, -1, -1):
        states[t] = s
        s -= int(back[t, s])
    if states[0] > 1:  # pragma: no cover - a finite score always starts in state 0 or 1
        raise AssertionError(f"alignment backtrace starts in state {states[0]}")
    frame_token = np.where(states % 2 == 1, (states - 1) // 2, -1)
    return frame_token, score


__all__ = ["ctc_forced_align", "min_frames"]
