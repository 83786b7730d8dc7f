"""Build throughput against the bare teacher forward pass on the same batches.

Prints positions/s of (a) the bare forward pass alone (same rows, same batches, no top-k, no
host copies, no writes), (b) forward + top-k + host copies (no writer), and (c) the full build
(writer thread, validation, compression, commit too), and the ratio full/bare. Target: >= 0.9.

    .venv/bin/python bench/build_throughput.py --teacher bert --model minilm --top-k 0 \
        --hidden-layers -1 --data MANIFEST [--repeat 3] [--device cpu]
    .venv/bin/python bench/build_throughput.py --teacher ensemble --model RUN1 --model RUN2 \
        --features STORE --top-k 8 --data MANIFEST      # frame-level: positions are frames

For the ensemble, (a) is the members' forward passes alone on the build's batches (features
read and normalised beforehand), (b) adds the combination and the top-k, and (c) is the full
build, which also reads the features from the store.

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
    ap.add_argument("--model", required=True, action="append", help="repeat for an ensemble")
    ap.add_argument("--features", default=None, help="ensemble: the feature store")
    ap.add_argument("--max-frames", type=int, default=20000, help="ensemble: frames per batch")
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
    if a.teacher == "ensemble":
        return frame_main(a)
    if len(a.model) != 1:
        ap.error(f"--teacher {a.teacher} takes one --model")
    a.model = a.model[0]
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
    report(b_s, f_s)


def report(b_s: list, f_s: list) -> None:
    import statistics

    b, f = min(x[0] for x in b_s), min(x[0] for x in f_s)
    bc, fc = min(x[1] for x in b_s), min(x[1] for x in f_s)
    paired = statistics.median(x[0] / y[0] for x, y in zip(b_s, f_s, strict=True))
    print(
        f"ratio full/bare: best-of wall {b / f:.2f}, best-of CPU {bc / fc:.2f}, "
        f"median of paired runs (wall) {paired:.2f}"
    )


def frame_main(a) -> None:
    """The ensemble teacher: members' forward vs combination + top-k vs the full build."""
    import numpy as np
    import torch

    from kdcache.data.features import open_features
    from kdcache.data.manifest import load_manifest
    from kdcache.student.conformer import subsampled_lengths
    from kdcache.teachers.build import pick_device
    from kdcache.teachers.ensemble import EnsembleTeacher, build_ensemble_cache, frame_batches
    from kdcache.teachers.topk import topk_targets

    if not a.features:
        raise SystemExit("--teacher ensemble needs --features STORE")
    dev = pick_device(a.device)
    t0 = time.monotonic()
    t = EnsembleTeacher.load(a.model, k=a.top_k, device=dev)
    load_s = time.monotonic() - t0
    store = open_features(a.features)
    ids = [u.id for u in load_manifest(a.data)]
    n_in = {u: store.num_frames(u) for u in ids}
    n_out = dict(zip(ids, subsampled_lengths(torch.tensor([n_in[u] for u in ids]),
                                             t.subsampling).tolist(), strict=True))  # fmt: skip
    todo = sorted(ids, key=lambda u: (n_out[u], u))  # the build's order and batches
    mean, std = np.asarray(store.mean, np.float32), np.maximum(np.asarray(store.std), 1e-5)
    batches = [
        (x.to(dev), fl.to(dev))
        for _, _, x, fl in frame_batches(store, todo, a.max_frames, mean, std)
    ]
    positions = sum(n_out.values())

    def bare() -> tuple[float, float]:
        s, c = time.monotonic(), time.process_time()
        with torch.inference_mode():
            for x, fl in batches:
                for m in t.members:
                    m.model(x, fl)
        return time.monotonic() - s, time.process_time() - c

    def targets() -> tuple[float, float]:
        s, c = time.monotonic(), time.process_time()
        for x, fl in batches:
            comb, lens, _ = t.log_probs(x, fl)
            for i in range(len(lens)):
                top = topk_targets(comb[i, : int(lens[i])], t.k, 1.0)
                [v.cpu().numpy() for v in top]
        return time.monotonic() - s, time.process_time() - c

    def full() -> tuple[float, float]:
        d = tempfile.mkdtemp()
        try:
            c = time.process_time()
            s = build_ensemble_cache(
                models=a.model, data=a.data, features=a.features, out=f"{d}/e.kdc", k=a.top_k,
                max_frames=a.max_frames, device=dev, progress=False,
            )  # fmt: skip
            return s.seconds, time.process_time() - c - s.load_seconds_cpu
        finally:
            shutil.rmtree(d, ignore_errors=True)

    bare()
    full()
    b_s, t_s, f_s = [], [], []
    for _ in range(a.repeat):
        b_s.append(bare())
        t_s.append(targets())
        f_s.append(full())
    print(
        f"teacher ensemble of {len(t.members)} k={a.top_k} device {dev} "
        f"threads {torch.get_num_threads()} max_frames {a.max_frames}"
    )
    print(f"utterances {len(ids)}  frames (positions) {positions}  model load {load_s:.1f} s")
    for label, runs, note in (
        ("members' forward", b_s, ""),
        ("+ combine, top-k", t_s, "; no writer"),
        ("full build", f_s, ""),
    ):
        w, c = min(x[0] for x in runs), min(x[1] for x in runs)
        print(
            f"{label:<17} {positions / w:10.0f} frames/s wall  {positions / c:10.0f} per CPU-s"
            f"  (best of {a.repeat}: {w:.2f} s wall, {c:.2f} s CPU{note})"
        )
    report(b_s, f_s)


if __name__ == "__main__":
    main()
