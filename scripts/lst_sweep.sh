#!/usr/bin/env bash
# One point of the LST dev sweep (docs/training.md, item 9): train the CPU LST recipe on ROOT
# (laid out like the large-corpus study: corpus/, char/, caches/) with teacher temperature T and
# weight W, then decode dev with the study's decoding. Resumable: run it again after a kill.
#   bash scripts/lst_sweep.sh ROOT OUT CACHE T W SEED
#   e.g. bash scripts/lst_sweep.sh /work/big runs/t1_w03 caches/lstm_t1_dense.kdc 1.0 0.3 1
set -euo pipefail
ROOT=$1; OUT=$2; CACHE=$3; T=$4; W=$5; SEED=$6
PY=${KDCACHE_PYTHON:-python}
if [ -f "$OUT/config.yaml" ]; then
  "$PY" -m kdcache.student run --out "$OUT" --resume train.max_steps=1200
else
  "$PY" -m kdcache.student run --out "$OUT" --config "$(dirname "$0")/../recipes/cpu/lst.yaml" \
    --data "$ROOT/corpus/train" --features "$ROOT/corpus/feats/train.fbank" --tokenizer "$ROOT/char" \
    --dev-data "$ROOT/corpus/dev" --dev-features "$ROOT/corpus/feats/dev.fbank" \
    --recipe lst --cache "$ROOT/$CACHE" \
    lst.temperature="$T" lst.kd_weight="$W" train.seed="$SEED" train.max_steps=1200 \
    train.eval_every=250 train.progress=false
fi
[ -f "$OUT/eval-dev/results.json" ] || "$PY" -m kdcache.student eval --run "$OUT" \
  --data "$ROOT/corpus/dev" --features "$ROOT/corpus/feats/dev.fbank" \
  --decode attention_beam --beam 4 --ctc-weight 0.5 --out "$OUT/eval-dev" --device cpu
