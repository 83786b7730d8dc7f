"""Hidden-state quantisers at a fixed byte budget (issue 13 item 2: <= 16 B/position at mean
cosine >= 0.95): what the stored `pq` codec reaches against stronger quantisers from faiss
(OPQ, residual quantisation with beam search, local-search quantisation) on the same held-out
positions, and the rate-distortion curve of a Gaussian with the states' covariance as a
reference point (docs/performance/cache_io.md, "Product-quantised hidden states").

    # MiniLM last layer over the demo's LM text (runs the teacher, as bench/pq_hidden.py does)
    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python bench/hidden_quantizers.py --model minilm \
        --teacher bert --sentences 2000 --lsq
    # SmolLM2 last layer from bench/cache_io.py's .npz (its "hidden" array, fortunes sentences)
    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python bench/hidden_quantizers.py \
        --npz /tmp/kdcache_bench_smollm2_topk.npz

Codebooks are trained on at most 20,000 positions of the first 80% of the utterances and
evaluated on the positions of the rest (never in training): mean cosine to the float32 states
and relative MSE (sum |x - x_hat|^2 / sum |x|^2). Bytes = M one-byte codes per position.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def gaussian_rd(ev: np.ndarray, bits: float) -> float:
    """Distortion (share of the total variance) of a Gaussian with covariance eigenvalues ``ev``
    coded at ``bits`` bits by reverse water-filling."""
    lo, hi = 1e-12 * ev.max(), ev.max()
    for _ in range(200):
        th = np.sqrt(lo * hi)
        rate = 0.5 * np.log2(np.maximum(ev / th, 1)).sum()
        lo, hi = (lo, th) if rate < bits else (th, hi)
    return float(np.minimum(ev, th).sum() / ev.sum())


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--npz", default=None, help="states from an .npz (arrays hidden, lengths)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--teacher", default="bert")
    ap.add_argument("--text", default="demo/corpus/lm_text.txt")
    ap.add_argument("--sentences", type=int, default=2000)
    ap.add_argument("--subspaces", type=int, default=16, help="M: bytes per position")
    ap.add_argument("--beams", default="1,8", help="residual quantiser beam sizes")
    ap.add_argument("--lsq", action="store_true", help="also local-search quantisation (slow)")
    args = ap.parse_args()

    import faiss

    if args.npz:
        d = np.load(args.npz)
        X, lens = d["hidden"].astype(np.float32), d["lengths"]
        what = f"{args.npz} (hidden)"
    else:
        from pq_hidden import hidden_states

        lines = [x.strip() for x in open(args.text, encoding="utf-8") if x.strip()]
        hs = hidden_states(args.teacher, args.model, lines[: args.sentences])
        lens = np.array([len(h) for h in hs])
        X = np.concatenate([h for h in hs if len(h)]).astype(np.float32)
        what = f"{args.model} last layer over {args.sentences} lines of {args.text}"
    cut = int(np.cumsum(lens)[int(len(lens) * 0.8) - 1])
    xtr, xte = np.ascontiguousarray(X[:cut][:20000]), np.ascontiguousarray(X[cut:])
    D, M = X.shape[1], args.subspaces
    mu = xtr.mean(0)
    print(f"{what}: D = {D}, {len(xtr)} training / {len(xte)} held-out positions, {M} B/position")

    ev = np.sort(np.linalg.eigvalsh(np.cov((xtr - mu).T)))[::-1]
    share = (((xte - mu) ** 2).sum(1).mean()) / ((xte**2).sum(1).mean())
    print(
        "  variance in the top 16 / 64 / 128 principal directions: "
        + " / ".join(f"{ev[:k].sum() / ev.sum():.3f}" for k in (16, 64, 128))
    )
    for bits in (8 * M // 2, 8 * M, 16 * M):
        print(
            f"  Gaussian with this covariance at {bits} bits: rel. MSE {gaussian_rd(ev, bits) * share:.3f}"
        )

    def report(name, dec, seconds):
        cos = (xte * dec).sum(1) / np.maximum(
            np.linalg.norm(xte, axis=1) * np.linalg.norm(dec, axis=1), 1e-12
        )
        mse = ((xte - dec) ** 2).sum() / (xte**2).sum()
        print(f"  {name:30s} mean cos {cos.mean():.4f}  rel. MSE {mse:.3f}  ({seconds:.1f} s)")
        sys.stdout.flush()

    from kdcache.cache_format import pq as kpq

    t = time.time()
    cb = kpq.train_codebooks(xtr, M, seed=0)
    report(f"kdcache pq (M={M})", kpq.decode(kpq.encode(xte, cb), cb), time.time() - t)
    xc = xtr - mu
    t = time.time()
    opq, q = faiss.OPQMatrix(D, M), faiss.ProductQuantizer(D, M, 8)
    opq.train(xc)
    q.train(opq.apply(xc))
    dec = opq.reverse_transform(q.decode(q.compute_codes(opq.apply(xte - mu)))) + mu
    report(f"OPQ + PQ (M={M})", dec, time.time() - t)
    for beam in (int(b) for b in args.beams.split(",")):
        t = time.time()
        rq = faiss.ResidualQuantizer(D, M, 8)
        rq.max_beam_size = beam
        rq.train(xc)
        report(
            f"residual, beam {beam} (M={M})",
            rq.decode(rq.compute_codes(xte - mu)) + mu,
            time.time() - t,
        )
    if args.lsq:
        t = time.time()
        lsq = faiss.LocalSearchQuantizer(D, M, 8)
        lsq.train(xc)
        report(
            f"local search (M={M})", lsq.decode(lsq.compute_codes(xte - mu)) + mu, time.time() - t
        )


if __name__ == "__main__":
    main()
