"""How much of a teacher's distribution top-k targets keep, and what they cost on disk.

For each k, over every position of the sentences:

* ``mass``: mean probability of the top k.
* ``KL(p||tail)``: KL(full || top-k + tail bin), the tail bin's mass spread evenly over the other
  V - k tokens (the best a student can recover from ``tail_logmass`` alone).
* ``KL(renorm||p)``: KL(renormalised top-k || full) = -log(mass). The other direction,
  KL(full || renormalised top-k), is infinite whenever the tail has mass (the renormalised
  target gives the tail tokens probability 0), which is why the cache keeps ``tail_logmass``.
* ``B/pos``: bytes per position of topk_ids + topk_logprobs + tail_logmass as the cache stores
  them (the real writer and codecs, on disk), and the uncompressed formula k * (id + 2) + 4.

    .venv/bin/python bench/fidelity.py --model smollm2 --sentences 300 [--text FILE...]

Sentences default to the fortunes files in /usr/share/games/fortunes, normalised.

With ``--sampled N1,N2,..`` it also compares, against the full distribution, the KD loss
H(p, q) and its gradient q - p (w.r.t. the student logits) estimated from top-``--compare-k``
+ rest bin, from the renormalised top k, and from sampled targets of N draws (Random Sampling
KD, arXiv 2503.16870; docs/losses.md), each with its bytes per position on disk. The student q is
softmax(a z + sigma eps) of the teacher logits z with Gaussian eps (``--student-scale a``,
``--student-noise sigma``): an imperfect student near the teacher. Bias is E[estimate] - true
(top-k is deterministic: its error is all bias); the sampled estimator's variance is exact
(Var_{i~p}(log q_i) / N and (1 - sum p^2) / N), and ``--reps`` real draws per position
(kdcache.teachers.topk.sampled_targets) check it empirically:

    .venv/bin/python bench/fidelity.py --teacher lstm_lm --model demo/lstm_lm --sampled 4,8,16,32
    .venv/bin/python bench/fidelity.py --model smollm2 --sentences 100 --sampled 8,16,32,64
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import shutil
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KS = (1, 4, 8, 16, 32, 64)


def fortunes(n: int, seed: int = 0) -> list[str]:
    from kdcache.data.text import normalize_text

    out = []
    for f in sorted(glob.glob("/usr/share/games/fortunes/*")):
        if "." in os.path.basename(f) or not os.path.isfile(f):
            continue
        with open(f, encoding="utf-8", errors="replace") as fh:
            for fort in fh.read().split("\n%\n"):
                t = normalize_text(" ".join(fort.split()))
                if 3 <= len(t.split()) <= 40:
                    out.append(t)
    random.Random(seed).shuffle(out)
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="causal_lm")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sentences", type=int, default=300)
    ap.add_argument(
        "--text", nargs="*", help="text files (one sentence a line) instead of fortunes"
    )
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--batch-tokens", type=int, default=512)
    ap.add_argument("--sampled", default="", help="draw counts N to compare, e.g. 8,16,32,64")
    ap.add_argument("--compare-k", type=int, default=16, help="top-k of the comparison")
    ap.add_argument("--reps", type=int, default=16, help="draws per position (empirical check)")
    ap.add_argument("--student-scale", type=float, default=0.8)
    ap.add_argument("--student-noise", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    ns = [int(x) for x in a.sampled.split(",") if x.strip()]

    import numpy as np
    import torch

    from kdcache.cache_format import CacheWriter, UttTargets, content_hash
    from kdcache.teachers.base import batch_rows, pad_batch
    from kdcache.teachers.build import load_teacher, teacher_record

    if a.text:
        from kdcache.data.text import normalize_text

        texts = [normalize_text(x) for f in a.text for x in open(f, encoding="utf-8")]
        texts = [x for x in texts if x][: a.sentences]
    else:
        texts = fortunes(a.sentences)
    t = load_teacher(a.teacher, a.model, k=1, temperature=a.temperature, device="cpu")
    V = t.vocab_size
    ks = tuple(k for k in KS if k <= V)
    kmax = max(ks)
    t.k = kmax
    cmp = SampledComparison(V, min(a.compare_k, V), ns, a) if ns else None
    ids = [t.encode(x) for x in texts]
    rows = [r for i, x in enumerate(ids) if x for r in t.rows(i, x)]
    if any(r.fixed for r in rows):
        raise SystemExit("fidelity needs a teacher that predicts position 0 (a BOS token)")
    rows.sort(key=lambda r: -len(r.input_ids))
    sums = {k: np.zeros(3) for k in ks}
    n_pos = 0
    per_utt: dict[int, dict] = {}
    start = time.monotonic()
    for batch in batch_rows(rows, a.batch_tokens):
        x, m = pad_batch(batch, t.pad_id)
        tb = [i for i, r in enumerate(batch) for _ in r.topk_src]
        ts = [s for r in batch for s in r.topk_src]
        idx = (torch.tensor(tb), torch.tensor(ts))
        logits, _ = t.forward(
            torch.from_numpy(x), torch.from_numpy(m), idx, (idx[0][:0], idx[1][:0])
        )
        logp = torch.log_softmax(logits.double() / a.temperature, -1)
        p = logp.exp()
        top_lp, top_ids = torch.topk(logp, kmax, -1)
        cum = top_lp.exp().cumsum(-1)
        ent_terms = torch.where(p > 0, p * logp, torch.zeros_like(p))
        neg_ent = ent_terms.sum(-1)  # sum p log p over all tokens
        top_ent = (top_lp.exp() * top_lp).cumsum(-1)  # sum over the top j of p log p
        for k in ks:
            mass = cum[:, k - 1].clamp(max=1.0)
            tail = (1 - mass).clamp(min=1e-300)
            # KL(p || q), q = p on the top k, tail / (V - k) elsewhere.
            rest_plogp = neg_ent - top_ent[:, k - 1]
            kl_tail = rest_plogp - tail * torch.log(tail / (V - k))
            kl_tail = torch.where(mass < 1, kl_tail, torch.zeros_like(kl_tail)).clamp(min=0)
            sums[k] += [mass.sum().item(), kl_tail.sum().item(), (-torch.log(mass)).sum().item()]
        n_pos += logp.shape[0]
        if cmp is not None:
            cmp.add(logits, [(r.utt, pos) for r in batch for pos in r.topk_dst])
        # Keep the top kmax (float64) and the float64 tail outside it, for the cache sizes.
        tail_max = torch.logsumexp(logp.scatter(-1, top_ids, float("-inf")), -1)
        j = 0
        for r in batch:
            d = per_utt.setdefault(r.utt, {})
            for q, pos in enumerate(r.topk_dst):
                d[pos] = (top_ids[j + q].numpy(), top_lp[j + q].numpy(), tail_max[j + q].item())
            j += len(r.topk_src)
    model_s = time.monotonic() - start

    print(
        f"teacher {a.teacher} model {a.model} V={V} T={a.temperature}: {len(texts)} sentences, "
        f"{n_pos} positions ({model_s:.0f} s forward on CPU)"
    )
    print()
    print(
        "|  k | mean top-k mass | KL(p ‖ top-k + tail) nats | KL(renorm top-k ‖ p) nats | "
        "B/pos on disk | B/pos raw |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    tmp = tempfile.mkdtemp()
    try:
        for k in ks:
            rec = teacher_record(t, f"k{k}")
            rec = type(rec).from_dict(
                {**rec.to_dict(), "k": k, "hidden_layers": [], "hidden_dims": {}}
            )
            path = f"{tmp}/k{k}.kdc"
            with CacheWriter(path, rec, fsync=False) as w:
                for u, d in per_utt.items():
                    n = len(ids[u])
                    tid = np.stack([d[i][0][:k] for i in range(n)])
                    lp64 = np.stack([d[i][1] for i in range(n)])
                    t64 = np.array([d[i][2] for i in range(n)])
                    # tail at k = everything outside the top kmax + the entries k..kmax-1
                    tail = np.logaddexp(
                        t64, np.logaddexp.reduce(lp64[:, k:], axis=1) if k < kmax else -np.inf
                    )
                    w.add(
                        UttTargets(
                            f"u{u:05d}",
                            tid,
                            lp64[:, :k],
                            tail,
                            {},
                            np.asarray(ids[u]),
                            texts[u],
                            content_hash(texts[u]),
                        )
                    )
            shard_root = os.path.join(path, "teachers", f"k{k}", "shards")
            size = sum(
                os.path.getsize(os.path.join(dp, f))
                for dp, _, fs in os.walk(shard_root)
                for f in fs
                if not f.endswith(".json")
            )
            raw = k * (rec.id_dtype.itemsize + 2) + 4
            mass, klt, klr = sums[k] / n_pos
            print(f"| {k:2d} | {mass:.4f} | {klt:.4f} | {klr:.4f} | {size / n_pos:.1f} | {raw} |")
        if cmp is not None:
            cmp.report(t, ids, texts, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _shard_bytes(path: str, teacher: str) -> int:
    shard_root = os.path.join(path, "teachers", teacher, "shards")
    return sum(
        os.path.getsize(os.path.join(dp, f))
        for dp, _, fs in os.walk(shard_root)
        for f in fs
        if not f.endswith(".json")
    )


class SampledComparison:
    """Top-k + rest bin vs renormalised top k vs sampled N, per position against the full
    distribution (float64): the loss H(p, q) and the gradient q - p, bias and variance."""

    def __init__(self, V: int, k: int, ns: list[int], a) -> None:
        import torch

        self.V, self.k, self.ns, self.a = V, k, ns, a
        self.gen = torch.Generator().manual_seed(a.seed)
        self.rng = __import__("numpy").random.default_rng(a.seed)
        # per method: sums of bias, |bias|, variance, grad bias^2, grad variance, |g|^2 (true),
        # and for sampled the empirical check: sum of (mean over reps - true) and its square,
        # sum of empirical grad MSE
        self.n = 0
        self.acc: dict[str, dict[str, float]] = {}
        self.ref = {"H": 0.0, "g2": 0.0}
        self.samples: dict[int, dict] = {n: {} for n in ns}  # rep-0 draws per (utt, pos)
        self.topk: dict = {}  # (utt, pos) -> (ids, logprobs, tail) at k

    def _add(self, name: str, **vals) -> None:
        d = self.acc.setdefault(name, {})
        for key, v in vals.items():
            d[key] = d.get(key, 0.0) + float(v)

    def add(self, logits, where: list[tuple[int, int]], chunk: int = 64) -> None:
        for i in range(0, logits.shape[0], chunk):
            self._add_rows(logits[i : i + chunk], where[i : i + chunk])

    def _add_rows(self, logits, where) -> None:
        import numpy as np
        import torch

        from kdcache.teachers.topk import sampled_targets

        a, V, k = self.a, self.V, self.k
        z = logits.double() / a.temperature
        logp = torch.log_softmax(z, -1)
        p = logp.exp()
        s = a.student_scale * logits.double() + a.student_noise * torch.randn(
            logits.shape, generator=self.gen, dtype=torch.float64
        )
        logq = torch.log_softmax(s, -1)
        q = logq.exp()
        H = -(p * logq).sum(-1)
        g = q - p
        P = len(H)
        self.n += P
        self.ref["H"] += float(H.sum())
        self.ref["g2"] += float((g * g).sum())
        # top-k + rest bin (deterministic): target p on the top k, p_rest * q_j / q_rest
        # elsewhere (the gradient of -p_rest log q_rest spreads over the rest by q)
        top_lp, top_ids = torch.topk(logp, k, -1)
        in_top = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, top_ids, True)
        p_rest = torch.where(in_top, 0.0, p).sum(-1)
        q_rest = torch.where(in_top, 0.0, q).sum(-1)
        lq_top = logq.gather(-1, top_ids)
        L_rb = -(top_lp.exp() * lq_top).sum(-1) - torch.where(
            p_rest > 0, p_rest * q_rest.log(), torch.zeros_like(p_rest)
        )
        t_rb = torch.where(in_top, p, q * (p_rest / q_rest).unsqueeze(-1))
        e = (q - t_rb) - g
        self._add("rest", bias=(L_rb - H).sum(), abs=(L_rb - H).abs().sum(), var=0.0,
                  gb2=(e * e).sum(), gvar=0.0)  # fmt: skip
        # renormalised top k
        pt = torch.softmax(top_lp, -1)
        L_rn = -(pt * lq_top).sum(-1)
        t_rn = torch.zeros_like(p).scatter_(-1, top_ids, pt)
        e = (q - t_rn) - g
        self._add("renorm", bias=(L_rn - H).sum(), abs=(L_rn - H).abs().sum(), var=0.0,
                  gb2=(e * e).sum(), gvar=0.0)  # fmt: skip
        for j, (u, pos) in enumerate(where):
            self.topk[(u, pos)] = (
                top_ids[j].numpy(),
                top_lp[j].numpy(),
                float(torch.log(p_rest[j])) if p_rest[j] > 0 else -np.inf,
            )
        # sampled N: unbiased; exact variances; empirical check with real draws
        m2 = (p * logq * logq).sum(-1)
        var_one = (m2 - H * H).clamp(min=0)  # Var_{i~p}(-log q_i)
        gvar_one = 1.0 - (p * p).sum(-1)  # E||e_i - p||^2 for one draw
        for n in self.ns:
            width = min(n, V)
            Ls, gm2 = [], torch.zeros(P, dtype=torch.float64)
            for r in range(a.reps):
                uni = torch.from_numpy(self.rng.random((P, n)))
                ids, lp, _ = sampled_targets(logits, width, uni, a.temperature)
                w = lp.double().exp()  # count / N
                Ls.append(-(w * logq.gather(-1, ids)).sum(-1))
                emp = torch.zeros_like(p).scatter_add_(-1, ids, w)
                gm2 += ((emp - p) ** 2).sum(-1)  # ||g_hat - g||^2 = ||c/N - p||^2
                if r == 0:
                    for j, (u, pos) in enumerate(where):
                        self.samples[n][(u, pos)] = (ids[j].numpy(), lp[j].numpy())
            Lm = torch.stack(Ls).mean(0)
            self._add(f"s{n}", bias=0.0, abs=0.0, var=(var_one / n).sum(), gb2=0.0,
                      gvar=(gvar_one / n).sum(), emp_bias=(Lm - H).sum(),
                      emp_var=torch.stack(Ls).var(0).sum(), emp_gm2=(gm2 / a.reps).sum())  # fmt: skip

    def _bytes(self, t, ids, texts, tmp, name, rec_kw, rows) -> float:
        import numpy as np

        from kdcache.cache_format import CacheWriter, UttTargets, content_hash
        from kdcache.teachers.build import teacher_record

        rec = teacher_record(t, name)
        rec = type(rec).from_dict(
            {**rec.to_dict(), "hidden_layers": [], "hidden_dims": {}, **rec_kw}
        )
        path = f"{tmp}/{name}.kdc"
        utts = sorted({u for u, _ in rows})
        with CacheWriter(path, rec, fsync=False) as w:
            for u in utts:
                n = len(ids[u])
                tid = np.stack([rows[(u, i)][0] for i in range(n)])
                lp = np.stack([rows[(u, i)][1] for i in range(n)])
                tail = np.array([rows[(u, i)][2] if len(rows[(u, i)]) > 2 else -np.inf
                                 for i in range(n)])  # fmt: skip
                w.add(UttTargets(f"u{u:05d}", tid, lp, tail, {}, np.asarray(ids[u]), texts[u],
                                 content_hash(texts[u])))  # fmt: skip
        return _shard_bytes(path, name) / len(rows)

    def report(self, t, ids, texts, tmp) -> None:
        import math

        a, n, k = self.a, self.n, self.k
        H = self.ref["H"] / n
        g = math.sqrt(self.ref["g2"] / n)
        bpp = {"rest": self._bytes(t, ids, texts, tmp, "cmp_topk", {"k": k}, self.topk)}
        bpp["renorm"] = bpp["rest"]
        for s in self.ns:
            w = min(s, self.V)
            bpp[f"s{s}"] = self._bytes(t, ids, texts, tmp, f"cmp_s{s}",
                                       {"k": w, "targets": "sampled", "samples": s},
                                       self.samples[s])  # fmt: skip
        print()
        print(
            f"KD loss H(p, q) and its gradient q - p from sparse targets vs the full distribution: "
            f"{n} positions, student q = softmax({a.student_scale:g} z + {a.student_noise:g} eps), "
            f"mean H(p, q) = {H:.4f} nats, RMS |q - p| = {g:.4f}; sampled: exact variance, "
            f"{a.reps} real draws per position as a check"
        )
        print()
        print("| targets | B/pos on disk | loss bias (mean) | mean abs loss bias | loss std per "
              "position | loss RMSE, batch of 1000 positions | grad bias (RMS norm) | grad std "
              "(RMS norm) | grad RMSE / RMS norm of q - p | draws: loss bias ± 2 se | draws: "
              "grad MSE / exact |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        names = {"rest": f"top-{k} + rest bin", "renorm": f"top-{k} renormalised"}
        for key, d in self.acc.items():
            label = names.get(key, f"sampled N={key[1:]}")
            bias, ab, var = d["bias"] / n, d["abs"] / n, d["var"] / n
            gb, gv = math.sqrt(d["gb2"] / n), math.sqrt(d["gvar"] / n)
            rmse_b = math.sqrt(bias * bias + var / 1000)
            grmse = math.sqrt(gb * gb + gv * gv) / g
            if key.startswith("s"):
                se = math.sqrt(d["emp_var"] / n / a.reps / n)  # of the mean over positions
                check = f"{d['emp_bias'] / n:+.4f} ± {2 * se:.4f}"
                gcheck = f"{d['emp_gm2'] / d['gvar']:.3f}"
            else:
                check = gcheck = "-"
            print(f"| {label} | {bpp[key]:.1f} | {bias:+.4f} | {ab:.4f} | {math.sqrt(var):.4f} | "
                  f"{rmse_b:.4f} | {gb:.4f} | {gv:.4f} | {grmse:.3f} | {check} | {gcheck} |")  # fmt: skip


if __name__ == "__main__":
    main()
