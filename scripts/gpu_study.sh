#!/usr/bin/env bash
# The study on one GPU inside one time-boxed call (recipes/plans/gpu.yaml): every arm x 3 seeds,
# the same number of steps for every arm, chosen from a measured probe so that the whole study
# (training, dev/test decoding, summary) ends inside BUDGET seconds.
#
#   ROOT=demo BUDGET=540 OUT=out bash scripts/gpu_study.sh
#
# ROOT holds the demo layout (corpus/{train,dev,test} manifests, corpus/feats/*.fbank, char/,
# caches/*.kdc; audio is not needed). To carry it to a machine with a GPU, shrink the feature
# stores first (the stored values round to 5 mantissa bits, 51% of the bytes):
#   kdcache features demo/corpus/feats/train.fbank --repack --keepbits 5 --out ROOT/corpus/feats/train.fbank
# Wheels in .whl/ (zarr, numcodecs, ... for a machine without them) are installed first.
# Results: OUT/study.json, study.md, curves.png, study_runs.tgz (every run without its
# checkpoints), probe.json (the timing the step count came from), log.txt.
set -uo pipefail
T0=$(date +%s)
BUDGET=${BUDGET:-540}
ROOT=${ROOT:-demo}
OUT=${OUT:-gpu_study_out}
PY=${PY:-python3}
JOBS=${JOBS:-9}
PROBE_STEPS=${PROBE_STEPS:-40}
MAX_STEPS=${MAX_STEPS:-4000}
PLAN=${PLAN:-recipes/plans/gpu.yaml}
WORK=${WORK:-/tmp/kdc_gpu_study}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
exec > >(tee -a "$LOG") 2>&1
left() { echo $((BUDGET - ($(date +%s) - T0))); }

if [ "${WHEELS:-1}" = 1 ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/kdc_site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/kdc_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
rm -rf "$WORK" && mkdir -p "$WORK"

# 1. Probe (skipped when STEPS is given): the first wave (3 arms x 3 seeds, JOBS side by side)
#    for PROBE_STEPS steps, with its dev/test decoding: seconds per step under that load, and
#    the fixed cost of a run.
if [ -z "${STEPS:-}" ]; then
p0=$(date +%s)
$PY -m kdcache.student study --plan "$PLAN" --root "$ROOT" --out "$WORK/probe" --jobs "$JOBS" \
  --steps "$PROBE_STEPS" --arm none --arm lst_dense_t5 --arm lst_k8_t5 || exit 1
probe_wall=$(($(date +%s) - p0))
STEPS=$($PY - "$WORK/probe" "$probe_wall" "$PROBE_STEPS" "$(left)" "$MAX_STEPS" "$OUT/probe.json" <<'EOF'
import csv, json, statistics, sys
from pathlib import Path
probe, wall, n, left, cap, out = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
sps = []
for m in probe.glob("runs/*/*/metrics.csv"):
    rows = [float(r["sec_per_step"]) for r in csv.DictReader(open(m))]
    sps += rows[1:] if len(rows) > 1 else rows   # the first logged step may include warm-up
sec = statistics.median(sps)
fixed = max(0.0, wall - n * sec)       # start-up, data set-up, decoding of one wave
waves = 2                              # 18 runs, 9 side by side
reserve = 45                           # summary + packing
steps = int(((left - reserve) / waves - fixed * 1.15) / (sec * 1.1))
steps = min(cap, max(100, steps // 100 * 100))
json.dump({"probe_steps": n, "probe_wall_s": wall, "sec_per_step": sec, "fixed_s": fixed,
           "seconds_left": left, "steps": steps}, open(out, "w"), indent=1)
print(steps)
EOF
)
echo "probe: ${probe_wall}s for $PROBE_STEPS steps; $(cat "$OUT/probe.json" | tr -d '\n ')"
fi
echo "study: $STEPS steps per run, $(left)s left"

# 2. The study, stopped in time to summarize whatever finished.
ARM_ARGS=()
for a in ${ARMS:-}; do ARM_ARGS+=(--arm "$a"); done
timeout $(($(left) - 40)) $PY -m kdcache.student study --plan "$PLAN" --root "$ROOT" \
  --out "$WORK/study" --jobs "$JOBS" --steps "$STEPS" "${ARM_ARGS[@]}"
echo "study exit $? with $(left)s left"
pkill -f "kdcache.student (run|eval)" 2>/dev/null; sleep 1
$PY -m kdcache.student study --plan "$PLAN" --root "$ROOT" --out "$WORK/study" --steps "$STEPS" \
  --summarize || true
cp "$WORK"/study/study.{json,md} "$WORK"/study/curves.png "$OUT"/ 2>/dev/null
tar -C "$WORK/study" --exclude=checkpoints --exclude=tokenizer -czf "$OUT/study_runs.tgz" runs
echo "done in $(($(date +%s) - T0))s"
