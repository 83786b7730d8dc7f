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
    a = ap.parse_args()

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
    kmax = max(KS)
    t = load_teacher(a.teacher, a.model, k=kmax, temperature=a.temperature, device="cpu")
    V = t.vocab_size
    ids = [t.encode(x) for x in texts]
    rows = [r for i, x in enumerate(ids) if x for r in t.rows(i, x)]
    if any(r.fixed for r in rows):
        raise SystemExit("fidelity needs a teacher that predicts position 0 (a BOS token)")
    rows.sort(key=lambda r: -len(r.input_ids))
    sums = {k: np.zeros(3) for k in KS}
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
        for k in KS:
            mass = cum[:, k - 1].clamp(max=1.0)
            tail = (1 - mass).clamp(min=1e-300)
            # KL(p || q), q = p on the top k, tail / (V - k) elsewhere.
            rest_plogp = neg_ent - top_ent[:, k - 1]
            kl_tail = rest_plogp - tail * torch.log(tail / (V - k))
            kl_tail = torch.where(mass < 1, kl_tail, torch.zeros_like(kl_tail)).clamp(min=0)
            sums[k] += [mass.sum().item(), kl_tail.sum().item(), (-torch.log(mass)).sum().item()]
        n_pos += logp.shape[0]
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
        for k in KS:
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
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
