"""Test results of a study's runs decoded again into another eval directory (e.g. with the LM fused:
``kdtrain eval --run STUDY/runs/ARM/seedN ... --lm demo/lstm_lm --lm-weight 0.5 --out
STUDY/runs/ARM/seedN/eval-test-lm``): mean +- sd per arm, paired differences per seed and the
utterance bootstrap of kdcache.student.study, for the arms none and lst_dense_t5.

    .venv/bin/python scripts/fused_stats.py STUDY [eval-test-lm]
"""

import json
import sys
from pathlib import Path

import numpy as np

from kdcache.student.study import bootstrap_ci, edit_errors

root = Path(sys.argv[1])
sub = sys.argv[2] if len(sys.argv) > 2 else "eval-test-lm"


def per_utt(rd, unit):
    rows = sorted(
        (json.loads(x) for x in (rd / sub / "hyp.jsonl").read_text().splitlines() if x),
        key=lambda r: r["utt_id"],
    )
    errs, lens = zip(*(edit_errors(r["ref"], r["hyp"], unit) for r in rows), strict=True)
    return np.array(errs), np.array(lens)


res = {}
for arm in ("none", "lst_dense_t5"):
    for s in (1, 2, 3):
        rd = root / "runs" / arm / f"seed{s}"
        if (rd / sub / "results.json").exists():
            r = json.loads((rd / sub / "results.json").read_text())
            res.setdefault(arm, {})[s] = (r["wer"], r["cer"])
for arm, d in res.items():
    w = np.array([v[0] for v in d.values()]) * 100
    c = np.array([v[1] for v in d.values()]) * 100
    print(
        arm,
        sorted(d),
        f"WER {w.mean():.2f} ± {w.std(ddof=1) if len(w) > 1 else 0:.2f}  CER {c.mean():.2f} ± {c.std(ddof=1) if len(c) > 1 else 0:.2f}",
    )
seeds = sorted(set(res.get("none", {})) & set(res.get("lst_dense_t5", {})))
if seeds:
    print(
        "paired WER",
        [round(100 * (res["lst_dense_t5"][s][0] - res["none"][s][0]), 2) for s in seeds],
        "CER",
        [round(100 * (res["lst_dense_t5"][s][1] - res["none"][s][1]), 2) for s in seeds],
    )
    for unit in ("word", "char"):
        a = np.stack([per_utt(root / "runs/lst_dense_t5" / f"seed{s}", unit)[0] for s in seeds])
        b = np.stack([per_utt(root / "runs/none" / f"seed{s}", unit)[0] for s in seeds])
        lens = per_utt(root / "runs/none" / f"seed{seeds[0]}", unit)[1]
        o, lo, hi = bootstrap_ci(a, b, lens)
        print(unit, f"{100 * o:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]")
