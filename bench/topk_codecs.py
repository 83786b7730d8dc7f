"""Offline top-k size study (issue 13 item 4): bytes/position of the top-k streams under
standard entropy coders and the sqrt(p) grid, the KL of each quantisation, and order-0 entropy
bounds, on the real SmolLM2 targets of bench/cache_io.py (numpy + numcodecs only, no cache).

    OMP_NUM_THREADS=1 .venv/bin/python bench/topk_codecs.py [--npz PATH] [--k 16]

B/position = compressed bytes of whole chunks (16384 positions) / positions + 4 B crc32c per
chunk, as zarr stores them. pcodec rows need the `pcodec` wheel (skipped without it).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cache_io import LM_CACHE, stored_kl  # noqa: E402


def byte_planes(x: np.ndarray) -> np.ndarray:
    """What numcodecs' Shuffle(elementsize=2) does to a uint16 array: all low bytes, then all
    high bytes (here per chunk of rows; column-major input stays column-major)."""
    x = np.ascontiguousarray(x)
    return np.ascontiguousarray(np.moveaxis(x.view(np.uint8).reshape(x.shape + (2,)), -1, 0))


def main() -> None:
    from numcodecs import BZ2, LZMA, Blosc, Zstd

    from kdcache.cache_format import spec

    ap = argparse.ArgumentParser()
    ap.add_argument("--npz", default=LM_CACHE)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=16384)
    args = ap.parse_args()
    d = dict(np.load(args.npz))
    K, C = args.k, args.chunk
    ids = d["ids"][:, :K].astype(np.int64)
    lp = d["logprobs"][:, :K].astype(np.float64)
    tail = d[f"tail{K}"].astype(np.float64)
    n, V = len(ids), int(d["vocab_size"])

    def size(arr, codec, tf=None) -> float:  # tf: a per-chunk transform (column-major, planes)
        tf = tf or np.ascontiguousarray
        tot = sum(len(codec.encode(tf(arr[a : a + C]))) for a in range(0, n, C))
        return tot / n + 4 * -(-n // C) / n

    def col(x):  # column-major chunk (the transpose codec)
        return np.ascontiguousarray(x.T)

    def H(x) -> float:  # order-0 empirical entropy, bits/symbol
        _, c = np.unique(x, return_counts=True)
        p = c / c.sum()
        return float(-(p * np.log2(p)).sum())

    codecs = {
        "zstd-3": Zstd(level=3),
        "zstd-19": Zstd(level=19),
        "blosc-zstd5-shuffle": Blosc("zstd", 5, Blosc.SHUFFLE),
        "blosc-zstd5-bitshuffle": Blosc("zstd", 5, Blosc.BITSHUFFLE),
        "bz2-9": BZ2(level=9),
        "xz-9": LZMA(preset=9),
        "lzma-raw-9 lc3lp1pb1 (sqrt)": LZMA(
            format=spec.LZMA_FORMAT_RAW, filters=[dict(f) for f in spec.LZMA_FILTERS]
        ),
    }
    try:
        from numcodecs.pcodec import PCodec

        PCodec(level=8).encode(np.zeros(4, np.uint16))
        codecs["pcodec-8"] = PCodec(level=8)
    except Exception as e:  # noqa: BLE001
        print(f"(pcodec unavailable: {type(e).__name__})")

    def row(name, arr, tf=None):
        print(f"{name:44s} " + " ".join(f"{c}={size(arr, x, tf):.2f}" for c, x in codecs.items()))
        sys.stdout.flush()

    print(f"{n} positions, k={K}, vocab {V}, chunk {C}; B/position per codec\n")
    print("ids")
    u16 = spec.id_dtype(V)
    srt = np.sort(ids, 1)
    gaps = np.concatenate([srt[:, :1], np.diff(srt, axis=1)], 1)
    f0 = np.bincount(ids[:C].ravel(), minlength=V)  # remap learned on the first chunk only
    rank_of = np.empty(V, np.int64)
    rank_of[np.argsort(-f0, kind="stable")] = np.arange(V)
    rids = rank_of[ids]
    rs = np.sort(rids, 1)
    rgaps = np.concatenate([rs[:, :1], np.diff(rs, axis=1)], 1)
    row("  rank order", ids.astype(u16))
    row("  idsort gaps", gaps.astype(u16))
    row("  freq-remapped (1st chunk) rank order", rids.astype(u16))
    row("  freq-remapped (1st chunk) sorted gaps", rgaps.astype(u16))
    from math import lgamma, log

    h0 = H(ids)
    print(
        f"  entropy bounds (order-0, B/position): ids in rank order per column "
        f"{sum(H(ids[:, j]) for j in range(K)) / 8:.2f}; all ids one distribution {h0 * K / 8:.2f}; "
        f"as a set (minus log2 k!) {(h0 * K - lgamma(K + 1) / log(2)) / 8:.2f}"
    )

    print("\nlog-probs and tail")
    lp16 = spec.round_mantissa(lp.astype(np.float16), 7)
    t10 = spec.round_mantissa_f32(tail.astype(np.float32), 10)
    kl0 = stored_kl(d, K, ids, lp16, t10)
    row(f"  float16 keepbits 7 rank (KL {kl0:.2e})", lp16)
    row("  tail float32 10 bits", t10)
    for L in (512, spec.DEFAULT_SQRT_LEVELS, 600):
        c = spec.sqrt_codes(lp.astype(np.float16), L)
        ct = spec.sqrt_codes(tail.astype(np.float32), L)
        kl = stored_kl(d, K, ids, spec.sqrt_logprobs(c, L), spec.sqrt_logprobs(ct, L))
        dl = np.concatenate([c[:, :1], -np.diff(c.astype(np.int64), axis=1)], 1).astype(np.uint16)
        print(
            f"  sqrt grid L={L}: KL {kl:.3e}; order-0 entropy of the deltas per column "
            f"{sum(H(dl[:, j]) for j in range(K)) / 8:.2f} B, of the tail code {H(ct) / 8:.2f} B"
        )
        rec = spec.TeacherRecord(name="t", kind="causal_lm", model_id="-", model_hash="-",
                                 tokenizer_id="", tokenizer_hash="-", vocab_size=V, k=K,
                                 logprob_rounding="sqrt", logprob_levels=L)  # fmt: skip
        res = spec.encode_tail(rec, ct, c)
        print(
            f"    order-0 entropy of the residual tail (tail_coding 'residual') {H(res) / 8:.2f} B"
        )
        row(f"    L={L} codes, rank order", c)
        row(f"    L={L} deltas, column-major (sqrt/code)", dl, col)
        row(f"    L={L} deltas, column-major, byte planes (sqrt)", dl, lambda x: byte_planes(x.T))
        row(f"    L={L} tail code (sqrt/code)", ct)
        row(f"    L={L} tail residual, byte planes (sqrt)", res, byte_planes)


if __name__ == "__main__":
    main()
