"""Training-step overhead of cached KD against no KD and against online KD (teacher in the loop).

Run::

    .venv/bin/python bench/train_overhead.py                    # defaults below, CPU
    .venv/bin/python bench/train_overhead.py --steps 8 --rounds 5 --threads 2

Every mode runs the same kdtrain loss step on the same student, batches and optimizer, side by
side in one process, in interleaved rounds (mode A, B, C, D, then again), so machine load
affects all modes alike; each mode's time per step is the median over rounds. A step is
everything a training step costs: reading the batch through the data pipeline (features;
plus cache targets for cached KD), the teacher forward for online KD, forward, loss, backward,
optimizer step.

Modes:
  none         joint CTC/attention, no KD (recipe none)
  cached_lst   LST with the teacher's top-k read from a kdcache (recipe lst)
  online_lstm  LST with an LSTM LM teacher (kdcache's lstm_lm, 2 x 512) run on every batch
  online_bert  LST with a BERT-base-sized masked LM (12 x 768, random weights: the compute of
               the real thing) run on every batch, "unmasked": one forward per batch, the
               cheapest way to run it
  online_bertmasked  the same BERT, masked: one sequence per token with that token masked
               (P(y_i | rest), what paper 002 and kdcache's masked_lm teacher compute)

The corpus is kdcache.student.toy (tone WAVs -> fbank, synthetic cache): character units, about
one token per 6-7 frames, like LibriSpeech characters. Prints time per step and the ratios.
Results and the command: docs/performance/training.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # run from a checkout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--utts", type=int, default=200, help="toy corpus size")
    ap.add_argument("--max-frames", type=int, default=4000, help="padded frames per batch")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--d-model", type=int, default=144)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--modes", default="none,cached_lst,online_lstm,online_bert,online_bertmasked")
    ap.add_argument("--k", type=int, default=8, help="top-k (the toy char vocabulary has 11 ids)")
    ap.add_argument(
        "--readers",
        type=int,
        default=0,
        metavar="N",
        help="instead: time one epoch of the data pipeline over N utterances with "
        "reader=random (cache.get per utterance) and reader=stream (whole chunks)",
    )
    ap.add_argument(
        "--chunk-positions",
        type=int,
        default=16384,
        help="--readers: cache chunk length (small values: more chunks than the LRU)",
    )
    ap.add_argument(
        "--loss-vocab",
        default="",
        metavar="V[,V...]",
        help="instead: time the decoder loss alone (CE_ls vs LST with k=16, old and new rest "
        "bin) at each vocabulary V, e.g. 5000,50000",
    )
    ap.add_argument(
        "--loss-positions",
        type=int,
        default=2560,
        help="--loss-vocab: decoder positions per batch (utterances of 40 tokens)",
    )
    ap.add_argument(
        "--loss-padding",
        type=float,
        default=0.2,
        help="--loss-vocab: share of the positions that are padding (0 to 0.5)",
    )
    args = ap.parse_args()
    known = ("none", "cached_lst", "online_lstm", "online_bert", "online_bertmasked")
    bad = [m for m in args.modes.split(",") if m not in known]
    if bad:
        ap.error(f"--modes: unknown {bad}; choose from {', '.join(known)}")
    if args.loss_vocab:
        return bench_loss(args)
    if args.readers:
        return bench_readers(args)

    import torch

    from kdcache.data.tokenizer import Tokenizer
    from kdcache.student.config import build_config
    from kdcache.student.data import KDDataset, TeacherBatch
    from kdcache.student.model import Student
    from kdcache.student.recipe import Context, loss_step, resolve_model_config
    from kdcache.student.rundir import prepare_split
    from kdcache.student.toy import make_toy_corpus

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="kdtrain_bench_"))
    t0 = time.perf_counter()
    toy = make_toy_corpus(tmp, num_utts=args.utts, k=args.k, temperature=5.0)
    print(f"toy corpus: {args.utts} utterances in {time.perf_counter() - t0:.1f} s ({tmp})")
    tok = Tokenizer.load(toy.tokenizer)
    split = prepare_split(toy.manifest, toy.features, tok)
    texts, tokens, store = split.texts, split.tokens, split.store
    nframes = {u: store.num_frames(u) for u in texts}
    from kdcache.cache_format import open_cache

    record = open_cache(toy.cache).teachers["lm"]

    def make_cfg(recipe: str):
        return build_config(recipe=recipe, overrides=[
            f"model.d_model={args.d_model}", f"model.num_layers={args.layers}",
            f"data.max_frames={args.max_frames}", "data.bucket_pool=64", "train.progress=false",
        ])  # fmt: skip

    # Teachers for online KD (same vocabulary as the student: the char tokenizer).
    from transformers import BertConfig, BertForMaskedLM

    from kdcache.teachers.lstm_lm import LSTMConfig
    from kdcache.teachers.lstm_lm import build_model as build_lstm

    lstm = build_lstm(
        LSTMConfig(vocab_size=tok.vocab_size, bos_id=tok.bos_id, layers=2, hidden=512)
    ).eval()
    bert = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=768, num_hidden_layers=12,
                                      num_attention_heads=12, intermediate_size=3072)).eval()  # fmt: skip

    def online_targets(kind: str, batch) -> TeacherBatch:
        """Top-k targets at T=5 from a teacher forward on the batch's tokens (what online KD does)."""
        y, lens = batch.tokens, batch.token_lens
        mask = torch.arange(y.shape[1])[None] < lens[:, None]
        with torch.inference_mode():
            if kind == "lstm":  # P(y_i | y_<i): input [bos, y_1 .. y_{L-1}]
                inp = torch.cat([torch.full_like(y[:, :1], tok.bos_id), y[:, :-1]], 1)
                logits, _ = lstm(inp)
            elif kind == "bert":  # unmasked masked-LM: P(y_i | y) at each position, one forward
                logits = bert(input_ids=y, attention_mask=mask.long()).logits
            else:  # masked: P(y_i | y with y_i masked), one sequence per position (paper 002)
                rows, cols = mask.nonzero(as_tuple=True)
                inp = y[rows].clone()
                inp[torch.arange(len(rows)), cols] = tok.unk_id  # the char vocabulary has no [MASK]
                out = bert(input_ids=inp, attention_mask=mask[rows].long()).logits
                logits = torch.zeros(*y.shape, out.shape[-1])
                logits[rows, cols] = out[torch.arange(len(rows)), cols]
            logp = torch.log_softmax(logits.float() / 5.0, -1)
            top_lp, top_ids = logp.topk(args.k, -1)
            tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-6))
        return TeacherBatch(top_ids, top_lp, tail, mask, {}, 5.0)

    modes = args.modes.split(",")
    setups = {}
    for mode in modes:
        recipe = "none" if mode == "none" else "lst"
        cfg = make_cfg(recipe)
        cached = mode == "cached_lst"
        cfg.model = resolve_model_config(cfg, tok, store.num_mel_bins, {"lm": record})
        torch.manual_seed(0)
        model = Student(cfg.model).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ds = KDDataset(
            list(texts), tokens, nframes, str(toy.features), str(toy.cache) if cached else None,
            ["lm"] if cached else [], {}, cfg.data, pad_id=tok.pad_id, seed=0, reader="random",
            temperatures={"lm": 5.0},
        )  # fmt: skip
        setups[mode] = (cfg, model, opt, iter(ds), Context(cfg, ["lm"], {"lm": record}))

    def one_step(mode: str) -> None:
        cfg, model, opt, it, ctx = setups[mode]
        batch = next(it)
        if mode.startswith("online_"):
            batch.targets = {
                "lm": online_targets(mode.split("_")[1].replace("bertmasked", "masked"), batch)
            }
        opt.zero_grad(set_to_none=True)
        loss, _ = loss_step(model, batch, ctx)
        loss.backward()
        opt.step()

    for mode in modes:  # warm-up: allocator, first-call overheads
        for _ in range(2):
            one_step(mode)
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            t, c = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                one_step(mode)
            wall[mode].append((time.perf_counter() - t) / args.steps)
            cpu[mode].append((time.process_time() - c) / args.steps)
        print(f"round {r + 1}/{args.rounds} (wall ms/step): "
              + ", ".join(f"{m} {wall[m][-1] * 1000:.0f}" for m in modes))  # fmt: skip
    n_params = sum(p.numel() for p in setups[modes[0]][1].parameters())
    print(f"\nstudent: d_model={args.d_model} layers={args.layers} ({n_params / 1e6:.2f} M params), "
          f"batch <= {args.max_frames} padded frames, k={args.k}, threads={args.threads}, "
          f"{args.rounds} rounds x {args.steps} steps")  # fmt: skip
    # Ratios are taken within a round (modes run back to back on the same batches), then the
    # median over rounds: robust to load from other processes that drifts between rounds.
    for name, times in (("CPU time", cpu), ("wall time", wall)):

        def ratio(a: str, b: str, times=times) -> float:
            if a not in times or b not in times:
                return float("nan")
            return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

        print(f"\n[{name}]  {'mode':<18}{'ms/step':>9}{'vs none':>9}{'vs cached':>11}")
        for m in modes:
            print(f"{'':<12}{m:<18}{statistics.median(times[m]) * 1000:>9.0f}"
                  f"{ratio(m, 'none'):>9.2f}{ratio(m, 'cached_lst'):>11.2f}")  # fmt: skip
        print(f"{'':<12}cached KD / no KD: {ratio('cached_lst', 'none'):.3f}x (target <= 1.1x)")
        for m in modes:
            if m.startswith("online_"):
                print(f"{'':<12}speed-up of cached KD over {m}: {ratio(m, 'cached_lst'):.2f}x")


def bench_loss(args) -> None:
    """Forward+backward of the decoder loss alone, per vocabulary: plain CE_ls against LST (k=16).

    Forms, all on the same [N, V] logits (N = --loss-positions in utterances of 40 tokens):
      ce_ls       kdcache.losses.hard_ce(label_smoothing=0.1) as shipped: the first baseline
      torch_ce    torch.nn.functional.cross_entropy(label_smoothing=0.1, ignore_index=-100)
                  on all [B * 40] rows, padding labelled -100: torch's own fused CE, the
                  second baseline
      lst         lst_loss (w = 0.1, T = 5, rest bin) as shipped: one fused softmax pass
                  (losses._SoftmaxStats) for CE_ls and the soft labels
      ce_ls_old, lst_old  the same two losses the previous way (losses._MASKED_REFERENCE):
                  autograd through logsumexp, gather, mean, and for the rest bin a second
                  logsumexp over a masked [N, V] copy of the logits
    Utterance lengths fall evenly from 40 to 40 * (1 - 2 * --loss-padding), so that share of
    the positions is padding. Vocabularies and forms are interleaved inside every round; each ratio is taken within a
    round and the median over rounds is printed, so load drifting between rounds cancels.
    """
    import torch
    import torch.nn.functional as F

    from kdcache import losses

    torch.set_num_threads(args.threads)
    length, k = 40, 16
    b = max(1, args.loss_positions // length)
    vocabs = [int(v) for v in str(args.loss_vocab).split(",")]

    def old(fn):
        def run():
            losses._MASKED_REFERENCE = True
            try:
                return fn()
            finally:
                losses._MASKED_REFERENCE = False

        return run

    def setup(v):
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(b, length, v, generator=g, requires_grad=True)
        y = torch.randint(0, v, (b, length), generator=g)
        lengths = torch.linspace(length, length * (1 - 2 * args.loss_padding), b).round()
        mask = torch.arange(length) < lengths.unsqueeze(1)
        y_ignore = y.masked_fill(~mask, -100).reshape(-1)
        top_lp, top_ids = torch.randn(b, length, v, generator=g).log_softmax(-1).topk(k, -1)
        tail = torch.log1p(-top_lp.exp().sum(-1).clamp(max=1 - 1e-6))

        def ce_ls():
            return losses.hard_ce(logits, y, mask, label_smoothing=0.1)

        def torch_ce():
            return F.cross_entropy(logits.reshape(-1, v), y_ignore, label_smoothing=0.1)

        def lst():
            return losses.lst_loss(logits, y, top_ids, top_lp, tail, mask, label_smoothing=0.1,
                                   build_temperature=5.0)  # fmt: skip

        fns = {"ce_ls": ce_ls, "torch_ce": torch_ce, "lst": lst,
               "ce_ls_old": old(ce_ls), "lst_old": old(lst)}  # fmt: skip
        return logits, fns, mask

    setups = {v: setup(v) for v in vocabs}
    n_valid = int(setups[vocabs[0]][2].sum())
    forms = list(setups[vocabs[0]][1])
    res = {(v, f): [] for v in vocabs for f in forms}
    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
        for v in vocabs:
            logits, fns, _ = setups[v]
            for f in forms:
                t = time.perf_counter()
                for _ in range(args.steps):
                    logits.grad = None
                    fns[f]().backward()
                if r:
                    res[v, f].append((time.perf_counter() - t) / args.steps)
        if r:
            print(f"round {r}/{args.rounds} (ms): " + "; ".join(
                f"V={v} " + " ".join(f"{f} {res[v, f][-1] * 1000:.0f}" for f in forms)
                for v in vocabs))  # fmt: skip
    print(f"\ndecoder loss fwd+bwd on [{b}, {length}, V] logits ({b * length} positions, "
          f"{n_valid} not padding), k={k}, "
          f"threads={args.threads}, {args.rounds} rounds x {args.steps} steps; "
          "ratios = median over rounds of (form / baseline) within a round")  # fmt: skip
    print(f"{'V':>7} {'':<14}" + "".join(f"{f:>11}" for f in forms))
    for v in vocabs:
        print(f"{v:>7} {'ms':<14}"
              + "".join(f"{statistics.median(res[v, f]) * 1000:>11.1f}" for f in forms))  # fmt: skip
        for base in ("ce_ls", "torch_ce"):
            print(f"{'':>7} {'x ' + base:<14}" + "".join(
                f"{statistics.median(x / y for x, y in zip(res[v, f], res[v, base], strict=True)):>10.2f}x"
                for f in forms))  # fmt: skip
        print(f"{'':>7} {'x ce_ls_old':<14}{'':>33}"
              + f"{statistics.median(x / y for x, y in zip(res[v, 'lst_old'], res[v, 'ce_ls_old'], strict=True)):>21.2f}x"
              + "  (lst_old / ce_ls_old: the previous code's own ratio)")  # fmt: skip


def bench_readers(args) -> None:
    """Utterances/s of one training epoch through KDDataset: random access vs streaming."""

    from kdcache.cache_format import open_cache
    from kdcache.data.tokenizer import Tokenizer
    from kdcache.student.config import DataConfig
    from kdcache.student.data import KDDataset
    from kdcache.student.rundir import prepare_split
    from kdcache.student.toy import make_toy_corpus

    tmp = Path(tempfile.mkdtemp(prefix="kdtrain_readers_"))
    toy = make_toy_corpus(
        tmp, num_utts=args.readers, k=args.k, hidden_dim=256, chunk_positions=args.chunk_positions
    )
    tok = Tokenizer.load(toy.tokenizer)
    split = prepare_split(toy.manifest, toy.features, tok)
    texts, tokens, store = split.texts, split.tokens, split.store
    nframes = {u: store.num_frames(u) for u in texts}
    n_pos = open_cache(toy.cache).num_positions("lm")
    n_chunks = -(-n_pos // args.chunk_positions)
    print(
        f"{args.readers} utterances, {n_pos} positions in ~{n_chunks} chunks of "
        f"{args.chunk_positions} (reader LRU: 64 chunks), k={args.k}, hidden 256 (float16)"
    )
    for hidden in (False, True):
        for reader in ("random", "stream", "random", "stream"):
            ds = KDDataset(list(texts), tokens, nframes, str(toy.features), str(toy.cache), ["lm"],
                           {"lm": [6] if hidden else []}, DataConfig(max_frames=4000),
                           pad_id=tok.pad_id, seed=0, reader=reader)  # fmt: skip
            t = time.perf_counter()
            n = 0
            for b in ds.shard_batches(0):
                if b.position[1] > 0:
                    break
                n += len(b.utt_ids)
            dt = time.perf_counter() - t
            print(f"reader={reader:<7} hidden={'yes' if hidden else 'no ':<4} {n / dt:8.0f} utt/s "
                  f"({dt:.2f} s/epoch)")  # fmt: skip


if __name__ == "__main__":
    main()
