"""Streaming speed of the kdcache reader on one core (issue 13 item 5: >= 5M positions/s for
top-k + tail), by utterance length and by how float16 log-probs are widened to float32.

    OMP_NUM_THREADS=1 .venv/bin/python bench/stream_speed.py [--positions 400000] [--rounds 5]

Real SmolLM2 top-16 + tail (bench/cache_io.py's .npz, tiled), keepbits 7, chunk 16384, written
once per utterance length: the real utterances (~29 positions), and 4 / 16 consecutive ones
merged into one. `stream(prefetch=0)` in this process, torch imported with one thread (as in
training). Rows: positions per CPU-second of the process, best and median of --rounds rounds
that interleave the variants, and the best wall-clock positions/s ("numpy cast": float16 -> float32 by numpy's astype; "torch cast":
through torch, what the reader does when torch is imported, spec.to_float32).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cache_io import LM_CACHE, stream_kdcache, tile, write_kdcache  # noqa: E402


def merged(d: dict, m: int) -> dict:
    """The same positions with every m consecutive utterances made one."""
    lengths = d["lengths"]
    n = len(lengths) // m * m
    out = dict(d)
    rest = lengths[n:].sum()
    out["lengths"] = np.concatenate([lengths[:n].reshape(-1, m).sum(1), [rest] if rest else []])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--npz", default=LM_CACHE)
    ap.add_argument("--positions", type=int, default=400_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--merge", default="1,4,16", help="utterances merged into one (comma list)")
    args = ap.parse_args()

    import torch

    from kdcache.cache_format import spec

    torch.set_num_threads(1)
    d = tile(dict(np.load(args.npz)), args.positions)
    work = tempfile.mkdtemp(prefix="kdcache_stream_")
    try:
        paths = {}
        for m in (int(x) for x in args.merge.split(",")):
            dm = merged(d, m)
            paths[m] = (os.path.join(work, f"m{m}.kdc"), len(dm["lengths"]))
            write_kdcache(paths[m][0], dm, 16, 7, 16384, hidden=False)
        casts = {"numpy cast": 1 << 62, "torch cast": spec._WIDEN_VIA_TORCH_MIN}
        rate: dict[tuple[str, int], list[float]] = {}
        walls: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for cast, threshold in casts.items():
                spec._WIDEN_VIA_TORCH_MIN = threshold
                for m, (path, _) in paths.items():
                    c0 = time.process_time()
                    n, wall = stream_kdcache(path, False, 0)
                    rate.setdefault((cast, m), []).append(n / (time.process_time() - c0))
                    walls.setdefault((cast, m), []).append(n / wall)
        spec._WIDEN_VIA_TORCH_MIN = casts["torch cast"]
        N = len(d["ids"])
        print(f"{N} positions, top-16 + tail, keepbits 7, chunk 16384; positions per CPU-second")
        print(f"  {'utterance length':>18s} {'cast':>12s} {'best':>12s} {'median':>12s} "
              f"{'wall best':>12s}")  # fmt: skip
        for (cast, m), v in rate.items():
            v = sorted(v)
            print(
                f"  {N / paths[m][1]:18.1f} {cast:>12s} {v[-1]:12,.0f} {v[len(v) // 2]:12,.0f} "
                f"{max(walls[cast, m]):12,.0f}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
