"""Write the decoded hidden states of a `--hidden-codec pq` cache as a float16 cache that carries
the teacher record of the original float16 cache, and print how close the decoded states are.

Training from the result is training from the pq codes (what the reader would hand a student),
in a cache that training code older than the pq codec also reads: the study's frozen training
code (kdcache/recipes/plans/cpu_large.yaml, arm cif_hkd_lstm_pq) uses it that way.

    python scripts/pq_decoded_cache.py ORIG_FLOAT16.kdc PQ.kdc OUT.kdc [--teacher NAME]

Both caches must hold the same teacher (same model hash and utterances); OUT must not exist.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("orig", help="the float16 cache of the same teacher (its record is kept)")
    ap.add_argument("pq", help="the cache built with --hidden-codec pq")
    ap.add_argument("out", help="the float16 cache to write (must not exist)")
    ap.add_argument("--teacher", default=None, help="teacher name (default: the only one)")
    args = ap.parse_args()

    from kdcache.cache_format import CacheWriter, UttTargets, open_cache

    a, b = open_cache(args.orig), open_cache(args.pq)
    name = args.teacher or (sorted(a.teachers)[0] if len(a.teachers) == 1 else None)
    if name is None or name not in a.teachers or name not in b.teachers:
        sys.exit(f"give --teacher: one of {sorted(a.teachers)} present in both caches")
    rec, rpq = a.teachers[name], b.teachers[name]
    if rpq.hidden_codec != "pq" or rec.hidden_codec != "float16":
        sys.exit(f"{args.pq} must be a pq cache and {args.orig} a float16 one of teacher {name!r}")
    if rpq.model_hash != rec.model_hash or rpq.hidden_layers != rec.hidden_layers:
        sys.exit(f"the two caches hold different teachers {name!r} (model hash or layers differ)")
    cos_sum, n, err, ref_sq = 0.0, 0, 0.0, 0.0
    with CacheWriter(args.out, rec) as w:
        for item in b.stream([name], prefetch=0):
            u = item[name]
            ref = a.get(u.utt_id, name)
            hidden = {}
            for layer, x in u.hidden.items():
                x = np.asarray(x, np.float32)
                r = np.asarray(ref.hidden[layer], np.float32)
                norms = np.linalg.norm(x, axis=1) * np.linalg.norm(r, axis=1)
                cos_sum += float(((x * r).sum(1) / np.maximum(norms, 1e-12)).sum())
                n += len(x)
                err += float(((x - r) ** 2).sum())
                ref_sq += float((r**2).sum())
                hidden[layer] = x.astype(np.float16)
            w.add(
                UttTargets(
                    u.utt_id, ref.topk_ids, ref.topk_logprobs, ref.tail_logmass, hidden,
                    ref.token_ids, ref.text, ref.input_hash,
                )
            )  # fmt: skip
    print(
        f"{args.out}: {n} positions; pq-decoded vs float16: mean cosine {cos_sum / max(n, 1):.4f}, "
        f"relative MSE {err / max(ref_sq, 1e-30):.4f}"
    )


if __name__ == "__main__":
    main()
