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

Thread counts (``--threads-sweep``): the same full build (``build_cache``, writer included) with
each ``--threads`` value side by side: 1, 2, auto (``kdcache build``'s default) and torch's
default (the count torch picked at start-up, i.e. what a build that leaves threads alone gets),
interleaved (the order rotates every round), best and median of ``--rounds``, as time ratios to
auto (> 1: slower than auto). Without ``--teacher`` it makes its own teachers: a tiny BERT from
config (tests/tiny_models.py, 2 layers, hidden 32) and a character LSTM LM (2 x 256, one epoch
of train_lm on the manifest), over a manifest of ``--utts`` random sentences of the toy
vocabulary; with ``--teacher/--model/--data`` it sweeps that teacher. Run it without
OMP_NUM_THREADS in the environment, or "default" is that value:

    nice -n 19 .venv/bin/python bench/build_throughput.py --threads-sweep 1,2,auto,default \
        --utts 200 --rounds 7
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
    ap.add_argument("--teacher", default=None)
    ap.add_argument("--model", default=None, action="append", help="repeat for an ensemble")
    ap.add_argument("--features", default=None, help="ensemble: the feature store")
    ap.add_argument("--max-frames", type=int, default=20000, help="ensemble: frames per batch")
    ap.add_argument("--data", default=None)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--hidden-layers", default="")
    ap.add_argument("--mlm-mode", default="masked")
    ap.add_argument("--batch-tokens", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument(
        "--threads-sweep",
        default="",
        metavar="LIST",
        help="compare full builds at these --threads values, e.g. 1,2,auto,default",
    )
    ap.add_argument("--rounds", type=int, default=7, help="--threads-sweep: interleaved rounds")
    ap.add_argument("--utts", type=int, default=200, help="--threads-sweep: made-up utterances")
    a = ap.parse_args()

    import torch

    if a.threads_sweep:
        return sweep_main(a, torch.get_num_threads())
    if not (a.teacher and a.model and a.data):
        ap.error("--teacher, --model and --data are required (or --threads-sweep)")

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
    n_threads = torch.get_num_threads()

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
                # the bare pass's torch threads (the build's own "auto" would give 1 on 2 cores
                # and compare a 1-thread build with a 2-thread forward)
                threads=n_threads,
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


def sweep_main(a, torch_default: int) -> None:
    """--threads-sweep: the same full build at several --threads values, interleaved."""
    import statistics
    import sys
    from pathlib import Path

    from kdcache.teachers.build import build_cache, build_threads, load_teacher
    from kdcache.threads import usable_cpus

    settings = [x.strip() for x in a.threads_sweep.split(",") if x.strip()]
    work = Path(tempfile.mkdtemp(prefix="kdc_threads_"))
    try:
        if a.teacher:
            if a.teacher in ("ensemble", "aligned_lm") or len(a.model) != 1 or not a.data:
                raise SystemExit(
                    "--threads-sweep with --teacher: a token teacher, one --model, --data"
                )
            layers = tuple(int(x) for x in a.hidden_layers.split(",") if x.strip())
            cases = [(a.teacher, a.model[0], a.data, a.top_k, layers)]
        else:
            cases = _made_up_teachers(work, a.utts)
        print(
            f"usable CPUs {usable_cpus()}, torch default threads {torch_default}, "
            f"auto -> {build_threads('auto', 'cpu')} on cpu; load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
        )
        for teacher, model, data, k, layers in cases:
            t = load_teacher(teacher, model, k=k, hidden_layers=layers, device="cpu")
            kw = dict(teacher=teacher, model=model, data=data, k=k, hidden_layers=layers,
                      device="cpu", progress=False, loaded=t)  # fmt: skip

            def one(setting: str, kw: dict = kw) -> tuple[float, float, object]:
                d = tempfile.mkdtemp(dir=work)
                try:
                    th = torch_default if setting == "default" else setting
                    c = time.process_time()
                    s = build_cache(out=f"{d}/c.kdc", threads=th, **kw)
                    return s.seconds, time.process_time() - c - s.load_seconds_cpu, s
                finally:
                    shutil.rmtree(d, ignore_errors=True)

            for x in settings:  # warm-up: first-use imports, allocator, kernels
                one(x)
            runs: dict[str, list] = {x: [] for x in settings}
            last = {}
            for r in range(a.rounds):
                order = settings[r % len(settings) :] + settings[: r % len(settings)]
                for x in order:
                    w, c, s = one(x)
                    runs[x].append((w, c))
                    last[x] = s
            pos = last[settings[0]].positions
            print(
                f"\n{teacher} ({Path(model).name}), k={k}, hidden={list(t.hidden_layers)}: "
                f"{last[settings[0]].utterances_done} utterances, {pos} positions, "
                f"{a.rounds} rounds"
            )
            ref = min(w for w, _ in runs["auto"]) if "auto" in runs else None
            ref_med = statistics.median(w for w, _ in runs["auto"]) if "auto" in runs else None
            print(
                f"  {'--threads':<10} {'torch':>5} {'best s':>8} {'median s':>9} {'CPU s':>7} "
                f"{'pos/s (best)':>12} {'best/auto':>9} {'median/auto':>11}"
            )
            for x in settings:
                b = min(w for w, _ in runs[x])
                m = statistics.median(w for w, _ in runs[x])
                cpu = min(c for _, c in runs[x])
                ratio = f"{b / ref:9.2f}" if ref else f"{'-':>9}"
                mratio = f"{m / ref_med:11.2f}" if ref_med else f"{'-':>11}"
                print(
                    f"  {x:<10} {last[x].threads:>5} {b:8.3f} {m:9.3f} {cpu:7.3f} "
                    f"{pos / b:12.0f} {ratio} {mratio}"
                )
            sys.stdout.flush()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _made_up_teachers(work, utts: int) -> list[tuple]:
    """A tiny BERT from config and a character LSTM LM, over ``utts`` random sentences."""
    import json
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import WORDS, make_bert

    from kdcache.data.tokenizer import Tokenizer
    from kdcache.teachers.lstm_lm import train_lm

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(utts)]
    data = work / "m.jsonl"
    with open(data, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"u{i:05d}", "audio": None, "text": t}) + "\n")
    bert = make_bert(work / "bert", max_positions=64)
    tok = Tokenizer.build_char(texts)
    tok.save(work / "char")
    train_lm(texts, str(work / "char"), str(work / "lstm"), layers=2, hidden=256, epochs=1,
             progress=False)  # fmt: skip
    return [
        ("bert", str(bert), str(data), 8, (-1,)),
        ("lstm_lm", str(work / "lstm"), str(data), 16, ()),
    ]


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
