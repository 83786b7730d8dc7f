"""Product-quantised hidden states (hidden_codec "pq"): fidelity against bytes, and what the
paper-004 losses see (docs/performance/cache_io.md, "Product-quantised hidden states").

Runs a teacher (kdcache model alias, last layer) over the first --sentences lines of a text
file, trains PQ codebooks (kdcache.cache_format.pq, as the writer does) on the positions of the
first --train-frac of the sentences (at most --train-positions) and evaluates on the positions of
the other sentences (never in the training sample): mean / 5th-percentile cosine and relative MSE
(sum |x - x_hat|^2 / sum |x|^2) per M, next to float16 and int8. Then acd_infonce_loss and lrd_loss
(kdcache.losses) of a fixed random student (s = x16 @ (I + 0.5 G / sqrt(D))) on held-out batches,
with float16 targets vs PQ-decoded targets: relative change of the loss and of its gradient.

    nice -n 19 env OMP_NUM_THREADS=1 PYTHONPATH=. python bench/pq_hidden.py --model minilm \
        --teacher bert --sentences 2000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def hidden_states(teacher: str, model: str, lines: list[str]) -> list[np.ndarray]:
    from kdcache.teachers.base import run_rows
    from kdcache.teachers.build import load_teacher

    t = load_teacher(teacher, model, k=0, hidden_layers=(-1,), device="cpu")
    toks = [t.encode(x) for x in lines]
    out: list[np.ndarray | None] = [None] * len(toks)
    for i, tg in run_rows(t, enumerate(toks), 4096):
        out[i] = np.asarray(next(iter(tg.hidden.values())), dtype=np.float32)
    return out


def cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def losses(held: list[np.ndarray], decoded: list[np.ndarray], seed: int = 0) -> dict[str, float]:
    from kdcache.losses import acd_infonce_loss, lrd_loss

    D = held[0].shape[1]
    g = torch.Generator().manual_seed(seed)
    W = torch.eye(D) + 0.5 * torch.randn(D, D, generator=g) / D**0.5
    res = {k: [] for k in ("acd_dl", "acd_dg", "lrd_dl", "lrd_dg")}
    B = 16
    for a in range(0, len(held) - B + 1, B):
        xs, ys = held[a : a + B], decoded[a : a + B]
        L = max(len(x) for x in xs)
        x16 = torch.zeros(B, L, D)
        y = torch.zeros(B, L, D)
        mask = torch.zeros(B, L, dtype=torch.bool)
        for i, (x, d) in enumerate(zip(xs, ys, strict=True)):
            x16[i, : len(x)] = torch.from_numpy(x.astype(np.float16).astype(np.float32))
            y[i, : len(d)] = torch.from_numpy(d)
            mask[i, : len(x)] = True
        s0 = (x16 @ W).detach()
        for name, fn in (
            (
                "acd",
                lambda s, e, mask=mask, a=a: acd_infonce_loss(
                    s, e, mask, generator=torch.Generator().manual_seed(a)
                ),
            ),
            ("lrd", lambda s, e, mask=mask: lrd_loss(s, e, mask)),
        ):
            vals, grads = [], []
            for tgt in (x16, y):
                s = s0.clone().requires_grad_(True)
                loss = fn(s, tgt)
                loss.backward()
                vals.append(float(loss))
                grads.append(s.grad.flatten())
            res[f"{name}_dl"].append(abs(vals[1] - vals[0]) / abs(vals[0]))
            res[f"{name}_dg"].append(float((grads[1] - grads[0]).norm() / grads[0].norm()))
    return {k: float(np.mean(v)) for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--teacher", default="bert")
    ap.add_argument("--text", default="demo/corpus/lm_text.txt")
    ap.add_argument("--sentences", type=int, default=2000)
    ap.add_argument("--train-frac", type=float, default=0.8)
    ap.add_argument("--train-positions", type=int, default=20000)
    ap.add_argument("--subspaces", default="8,16,32")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from kdcache.cache_format import pq
    from kdcache.cache_format.writer import encode_hidden_int8

    lines = [x.strip() for x in open(args.text, encoding="utf-8") if x.strip()][: args.sentences]
    t0 = time.perf_counter()
    hs = [h for h in hidden_states(args.teacher, args.model, lines) if len(h)]
    n_tr = int(len(hs) * args.train_frac)
    train = np.concatenate(hs[:n_tr])[: args.train_positions]
    held = hs[n_tr:]
    x = np.concatenate(held)
    D = x.shape[1]
    print(
        f"# {args.model}: D={D}, {len(hs)} sentences, train {len(train)} positions "
        f"(first {n_tr} sentences), held out {len(x)} positions ({len(held)} sentences); "
        f"teacher {time.perf_counter() - t0:.0f}s"
    )
    print(
        "| codec | B/position | mean cos | p5 cos | rel. MSE | train s | ACD dloss | ACD dgrad | LRD dloss | LRD dgrad |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    x16 = x.astype(np.float16).astype(np.float32)
    c = cos_rows(x, x16)
    mse = ((x - x16) ** 2).sum() / (x**2).sum()
    print(
        f"| float16 | {2 * D} | {c.mean():.5f} | {np.percentile(c, 5):.5f} | {mse:.2e} | | | | | |"
    )
    q, s = encode_hidden_int8(x)
    x8 = q.astype(np.float32) * s[:, None]
    c = cos_rows(x, x8)
    mse = ((x - x8) ** 2).sum() / (x**2).sum()
    print(f"| int8 | {D + 4} | {c.mean():.5f} | {np.percentile(c, 5):.5f} | {mse:.2e} | | | | | |")
    for m in [int(v) for v in args.subspaces.split(",")]:
        t1 = time.perf_counter()
        cb = pq.train_codebooks(train, m, seed=args.seed)
        tt = time.perf_counter() - t1
        dec = [pq.decode(pq.encode(h, cb), cb) for h in held]
        xd = np.concatenate(dec)
        c = cos_rows(x, xd)
        mse = ((x - xd) ** 2).sum() / (x**2).sum()
        lo = losses(held, dec, args.seed)
        print(
            f"| pq M={m} | {m} | {c.mean():.4f} | {np.percentile(c, 5):.4f} | {mse:.3f} | {tt:.1f} "
            f"| {lo['acd_dl']:.2%} | {lo['acd_dg']:.2%} | {lo['lrd_dl']:.2%} | {lo['lrd_dg']:.2%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
