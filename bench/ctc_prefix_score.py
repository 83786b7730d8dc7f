"""Joint CTC/attention decoding cost: the CTC prefix scorer's closed form against the frame loop.

    python bench/ctc_prefix_score.py [--frames 150] [--tokens 100] [--beam 4]

Scores one utterance's worth of prefix extensions (``--tokens`` steps of ``--beam`` hypotheses x
1.5 * beam candidates, as ``attention_beam_search`` does) with ``CTCPrefixScorer.score`` and with
the frame-by-frame loop it replaced (tests/test_decode.py keeps the loop as the reference), side
by side in one process, and prints the ratio. Both give the same scores (checked here too).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_decode import _score_by_frames  # noqa: E402

from kdcache.student.decode import CTCPrefixScorer  # noqa: E402


def run(fn, scorer, steps, n, c, v, seed):
    g = torch.Generator().manual_seed(seed)
    state = scorer.initial_state()[None].expand(n, -1, -1).clone()
    last = torch.full((n,), -1)
    t0 = time.perf_counter()
    for i in range(steps):
        cand = torch.stack([torch.randperm(v - 2, generator=g)[:c] + 2 for _ in range(n)])
        psi, new = fn(scorer, state, last, i, cand)
        state, last = new[:, 0], cand[:, 0]
    return time.perf_counter() - t0, psi


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--frames", type=int, default=150, help="encoder frames (6 s at 4x subsampling)"
    )
    ap.add_argument("--tokens", type=int, default=100, help="decoding steps (characters)")
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=31)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    logp = torch.randn(a.frames, a.vocab).mul(4).log_softmax(-1)
    scorer = CTCPrefixScorer(logp, 0, 1)
    c = max(a.beam, int(1.5 * a.beam))
    closed = lambda s, st, la, i, ca: s.score(st, la, i, ca)  # noqa: E731
    best = {"loop": float("inf"), "closed": float("inf")}
    for r in range(a.repeats):
        for name, fn in (("loop", _score_by_frames), ("closed", closed)):
            dt, psi = run(fn, scorer, a.tokens, a.beam, c, a.vocab, seed=r)
            best[name] = min(best[name], dt)
            if name == "loop":
                ref = psi
            else:
                ok = torch.isfinite(ref)
                torch.testing.assert_close(psi[ok], ref[ok], rtol=1e-9, atol=1e-9)
    print(
        f"{a.frames} frames, {a.tokens} steps, beam {a.beam} x {c} candidates, 1 thread (best of {a.repeats}):"
    )
    print(f"  frame loop   {best['loop']:.3f} s per utterance")
    print(f"  closed form  {best['closed']:.3f} s per utterance")
    print(f"  ratio closed/loop: {best['closed'] / best['loop']:.3f}")


if __name__ == "__main__":
    main()
