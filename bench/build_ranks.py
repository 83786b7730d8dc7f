"""Rank scaling of `kdcache build` on CPU (issue 13 item 7: a 2-rank build >= 1.8x of 1 rank).

Builds the same manifest into a fresh cache with 1 rank and with W ranks (W processes started
together, `--rank r --world-size W`, one torch thread each), in interleaved rounds, and prints
each round's wall time and the speed-up W ranks give, as ratios measured side by side (absolute
times on a shared machine mean little). Each build is a real `kdcache build` process, so the
times include model loading, which every rank pays; `--report` shows the builds' own
"building" times (without loading) too.

    python bench/build_ranks.py --teacher bert --model ROOT/bert_small --data ROOT/corpus/dev
    python bench/build_ranks.py --teacher lstm_lm --model demo/lstm_lm --data demo/corpus/dev \
        --top-k 31 --ranks 2 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUILD_TIME = re.compile(r"time\s+([0-9.]+) s building")


def build(args, out: Path, world: int) -> tuple[float, list[float]]:
    """Wall seconds of a `world`-rank build into ``out`` and each rank's reported build time."""
    cmd = [sys.executable, "-m", "kdcache.cli", "build", "--teacher", args.teacher,
           "--model", args.model, "--data", args.data, "--out", str(out),
           "--top-k", str(args.top_k), "--threads", "1", "--no-progress", "--device", "cpu",
           *(["--hidden-layers", args.hidden_layers] if args.hidden_layers else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*cmd, "--rank", str(r), "--world-size", str(world)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    for p, o in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise SystemExit(f"build failed ({p.returncode}):\n{o[-2000:]}")
    own = [float(m.group(1)) for o in outs for m in [BUILD_TIME.search(o)] if m]
    return wall, own


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden-layers", default="")
    ap.add_argument("--ranks", type=int, default=2, help="W, compared with 1 rank")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kdcache_ranks_"))
    print(f"cpus: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.1f}")
    ratios, own_ratios = [], []
    try:
        for i in range(args.rounds):
            order = (1, args.ranks) if i % 2 == 0 else (args.ranks, 1)
            res = {}
            for w in order:
                out = tmp / f"r{i}-w{w}.kdc"
                res[w] = build(args, out, w)
                shutil.rmtree(out)
            (w1, own1), (wn, ownn) = res[1], res[args.ranks]
            ratios.append(w1 / wn)
            if own1 and ownn:
                own_ratios.append(own1[0] / max(ownn))
            print(
                f"round {i + 1}: 1 rank {w1:.1f} s, {args.ranks} ranks {wn:.1f} s wall "
                f"-> {w1 / wn:.2f}x; building only (no model loading): {own1} vs {ownn} s",
                flush=True,
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"speed-up of {args.ranks} ranks over 1 (median of {args.rounds} rounds): wall "
        f"{statistics.median(ratios):.2f}x"
        + (f", building only {statistics.median(own_ratios):.2f}x" if own_ratios else "")
    )


if __name__ == "__main__":
    main()
