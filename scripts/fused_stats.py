"""Test results of a study's runs decoded again into another eval directory (e.g. with the LM fused:
``kdtrain eval --run STUDY/runs/ARM/seedN ... --lm demo/lstm_lm --lm-weight 0.5 --out
STUDY/runs/ARM/seedN/eval-test-lm``): mean +- sd per arm, paired differences per seed and the
utterance bootstrap, with the statistics of kdcache.student.study, for the arms none and
lst_dense_t5.

    .venv/bin/python scripts/fused_stats.py STUDY [test-lm]     # reads runs/*/seed*/eval-test-lm
"""

import json
import sys
from pathlib import Path

import numpy as np

from kdcache.student.study import _mean_sd, _per_utt_errors, bootstrap_ci, paired_differences

root = Path(sys.argv[1])
split = sys.argv[2] if len(sys.argv) > 2 else "test-lm"
arms = ("none", "lst_dense_t5")
res: dict[str, dict[int, dict]] = {}
for arm in arms:
    for s in (1, 2, 3):
        f = root / "runs" / arm / f"seed{s}" / f"eval-{split}" / "results.json"
        if f.exists():
            res.setdefault(arm, {})[s] = json.loads(f.read_text())
for arm, d in res.items():
    (w, wsd), (c, csd) = (_mean_sd([r[k] for r in d.values()]) for k in ("wer", "cer"))
    print(
        arm, sorted(d), f"WER {100 * w:.2f} ± {100 * wsd:.2f}  CER {100 * c:.2f} ± {100 * csd:.2f}"
    )
base, arm = (res.get(a, {}) for a in arms)
seeds = sorted(set(base) & set(arm))
if seeds:
    for key in ("wer", "cer"):
        diff = paired_differences({s: arm[s][key] for s in seeds}, {s: base[s][key] for s in seeds})
        print("paired", key.upper(), [round(100 * v, 2) for v in diff.values()])
    for unit in ("word", "char"):
        runs = {a: [_per_utt_errors(root / "runs" / a / f"seed{s}", split, unit) for s in seeds]
                for a in arms}  # fmt: skip
        if any(ids != runs["none"][0][0] for a in arms for ids, _, _ in runs[a]):
            sys.exit(f"{split}: the runs decoded different utterances")
        o, lo, hi = bootstrap_ci(
            np.stack([e for _, e, _ in runs[arms[1]]]),
            np.stack([e for _, e, _ in runs[arms[0]]]),
            runs["none"][0][2],
        )
        print(unit, f"{100 * o:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]")
