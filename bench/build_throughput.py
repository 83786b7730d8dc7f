"""Build throughput against the bare teacher forward pass on the same batches.

Prints positions/s of (a) the bare forward pass alone (same rows, same batches, no top-k, no
host copies, no writes), (b) forward + top-k + host copies (no writer), and (c) the full build
(writer thread, validation, compression, commit too), and the ratio full/bare. Target: >= 0.9.

    .venv/bin/python bench/build_throughput.py --teacher bert --model minilm --top-k 0 \
        --hidden-layers -1 --data MANIFEST [--repeat 3] [--device cpu]

Each measurement is the best of --repeat runs, bare and full interleaved, after one warm-up of
each; the median of the per-repeat ratios (bare and full run back to back) is printed too (on a shared machine
best-of is the least noisy estimate of what the code costs). Wall-clock and process CPU time are
both reported: on a machine whose cores other jobs use, CPU time (all threads of this process,
the writer thread included) is the steadier measure of the work added. The model is loaded once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--hidden-layers", default="")
    ap.add_argument("--mlm-mode", default="masked")
    ap.add_argument("--batch-tokens", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()

    import torch

    from kdcache.data.manifest import load_manifest
    from kdcache.teachers.base import run_rows
    from kdcache.teachers.build import (
        DEFAULT_BUDGET,
        build_cache,
        load_teacher,
        pick_device,
        prepare,
    )

    if a.threads:
        torch.set_num_threads(a.threads)
    layers = tuple(int(x) for x in a.hidden_layers.split(",") if x.strip())
    dev = pick_device(a.device)
    t0 = time.monotonic()
    t = load_teacher(
        a.teacher, a.model, k=a.top_k, hidden_layers=layers, mlm_mode=a.mlm_mode, device=dev
    )
    load_s = time.monotonic() - t0
    budget = a.batch_tokens or DEFAULT_BUDGET["cuda" if dev.startswith("cuda") else "cpu"]
    prepared, _ = prepare(load_manifest(a.data), t.encode, skip_bad=True)
    prepared.sort(key=lambda p: (-len(p.token_ids), p.id))  # the build's order
    positions = sum(len(p.token_ids) for p in prepared)
    items = [(i, p.token_ids) for i, p in enumerate(prepared)]

    def bare() -> tuple[float, float]:
        s, c = time.monotonic(), time.process_time()
        for _ in run_rows(t, items, budget, bare=True):
            pass
        return time.monotonic() - s, time.process_time() - c

    def targets() -> tuple[float, float]:
        """Forward + top-k + host copies + per-utterance assembly; no writer."""
        s, c = time.monotonic(), time.process_time()
        for _ in run_rows(t, items, budget):
            pass
        return time.monotonic() - s, time.process_time() - c

    def full() -> tuple[float, float]:
        d = tempfile.mkdtemp()
        try:
            c = time.process_time()
            s = build_cache(
                teacher=a.teacher,
                model=a.model,
                data=a.data,
                out=f"{d}/b.kdc",
                k=a.top_k,
                hidden_layers=layers,
                mlm_mode=a.mlm_mode,
                batch_tokens=budget,
                device=dev,
                progress=False,
                loaded=t,
                skip_bad=True,
            )
            # CPU time of the build loop only: subtract what reading the manifest and
            # tokenising took (not part of the bare pass either).
            return s.seconds, time.process_time() - c - s.load_seconds_cpu
        finally:
            shutil.rmtree(d, ignore_errors=True)

    bare()  # warm-up (allocator, kernels, first-use imports of zarr/pyarrow)
    full()
    b_s, t_s, f_s = [], [], []
    for _ in range(a.repeat):  # interleaved, so load changes on a shared machine hit all
        b_s.append(bare())
        t_s.append(targets())
        f_s.append(full())
    b, f = min(x[0] for x in b_s), min(x[0] for x in f_s)
    bc, fc = min(x[1] for x in b_s), min(x[1] for x in f_s)
    tw, tc = min(x[0] for x in t_s), min(x[1] for x in t_s)
    print(
        f"teacher {a.teacher} model {a.model} k={a.top_k} hidden={list(t.hidden_layers)} "
        f"mode={a.mlm_mode if a.teacher == 'bert' else '-'} device {dev} "
        f"threads {torch.get_num_threads()} budget {budget}"
    )
    print(f"utterances {len(prepared)}  positions {positions}  model load {load_s:.1f} s")
    print(
        f"bare forward  {positions / b:10.0f} positions/s wall  {positions / bc:10.0f} per CPU-s"
        f"  (best of {a.repeat}: {b:.2f} s wall, {bc:.2f} s CPU)"
    )
    print(
        f"+ targets     {positions / tw:10.0f} positions/s wall  {positions / tc:10.0f} per CPU-s"
        f"  (best of {a.repeat}: {tw:.2f} s wall, {tc:.2f} s CPU; no writer)"
    )
    print(
        f"full build    {positions / f:10.0f} positions/s wall  {positions / fc:10.0f} per CPU-s"
        f"  (best of {a.repeat}: {f:.2f} s wall, {fc:.2f} s CPU)"
    )
    import statistics

    paired = statistics.median(x[0] / y[0] for x, y in zip(b_s, f_s, strict=True))
    print(
        f"ratio full/bare: best-of wall {b / f:.2f}, best-of CPU {bc / fc:.2f}, "
        f"median of paired runs (wall) {paired:.2f}"
    )


if __name__ == "__main__":
    main()
