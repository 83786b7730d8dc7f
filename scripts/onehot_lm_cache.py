"""A token-level "LM" cache that knows only the transcript: position i is the hard label token_i
(log-prob 0, -inf fillers, tail -inf), same utterances, tokens and tokenizer as SRC. Put on frames
by `kdcache build --teacher aligned_lm`, it gives the alignment alone, the control for what an
aligned LM adds.  Usage: python onehot_lm_cache.py SRC.kdc OUT.kdc K"""

import sys
from dataclasses import replace

import numpy as np

from kdcache.cache_format import CacheWriter, UttTargets, open_cache
from kdcache.teachers.base import hard_label

src, out, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
cache = open_cache(src)
(name,) = cache.teachers
rec = cache.teachers[name]
new = replace(
    rec,
    name="onehot",
    model_id=f"hard labels of {src}",
    model_hash="0" * 32,
    k=k,
    temperature=1.0,
    options={"hard_labels": True},
    hidden_layers=(),
    hidden_dims={},
)
with CacheWriter(out, new) as w:
    for u in cache.utt_ids(name):
        t = cache.get(u, name, hidden=False)
        rows = [hard_label(int(x), k) for x in t.token_ids]
        n = len(rows)
        ids = np.stack([r[0] for r in rows]) if n else np.empty((0, k), dtype=np.int64)
        lp = np.stack([r[1] for r in rows]) if n else np.empty((0, k), dtype=np.float32)
        w.add(
            UttTargets(
                utt_id=u,
                topk_ids=ids,
                topk_logprobs=lp,
                tail_logmass=np.full(n, -np.inf, dtype=np.float32),
                token_ids=t.token_ids,
                text=t.text,
                input_hash=t.input_hash,
            )
        )
print("wrote", out)
