#!/usr/bin/env bash
# The main job, end to end, on the embedded default:
#   1. an English speech corpus made offline (public-domain text spoken by espeak-ng),
#   2. 80-dim fbank features, a BPE tokenizer trained on the LM text,
#   3. teachers run once into caches: an LSTM LM trained on the LM text (the LST paper's teacher),
#      the real MiniLM BERT (hidden states) and the real SmolLM2-135M causal LM (top-k + hidden),
#   4. inspect + verify every cache,
#   5. two students from the same features: plain CTC/attention and LST distillation from the cache,
#   6. WER/CER of both on the test set.
# Every step is skipped when its output already exists, so an interrupted demo resumes.
# Time on 2 CPU cores (docs/results.md): ~15 min for corpus, features, LM teacher and the three
# caches, ~1.6 s per student step (1000 steps: ~27 min per student), ~3 min of evaluation each.
# 1000 steps show the pipeline working; a converged student needs far more (a GPU, or hours).
#
# Environment knobs: KDCACHE_DEMO_DIR (default demo), KDCACHE_DEMO_SIZE (tiny|small|demo),
# KDCACHE_DEMO_STEPS (student optimizer steps), KDCACHE_DEMO_LM_MINUTES (LSTM LM time budget).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

D=${KDCACHE_DEMO_DIR:-demo}
SIZE=${KDCACHE_DEMO_SIZE:-demo}
STEPS=${KDCACHE_DEMO_STEPS:-1000}
LM_MINUTES=${KDCACHE_DEMO_LM_MINUTES:-6}
C=$D/corpus
mkdir -p "$D"
step() { printf '\n=== %s\n' "$*"; }

step "1. demo corpus ($SIZE) -> $C"
[ -f "$C/corpus.json" ] || kdcache demo-corpus --out "$C" --size "$SIZE"

step "2. features and tokenizer"
[ -d "$C/feats/test.fbank" ] || kdcache features "$C"
[ -f "$D/bpe/kdcache_tokenizer.json" ] || kdcache tokenizer train --kind bpe --vocab-size 500 \
  --text "$C/lm_text.txt" --out "$D/bpe"

step "3a. LSTM LM teacher trained on the LM text (${LM_MINUTES} min budget)"
[ -f "$D/lstm_lm/lstm_lm.json" ] || kdcache train-lm --text "$C/lm_text.txt" --tokenizer "$D/bpe" \
  --out "$D/lstm_lm" --max-minutes "$LM_MINUTES"
step "3b. teacher caches (a re-run resumes and skips committed utterances)"
kdcache build --teacher lstm_lm --model "$D/lstm_lm" --data "$C/train" --out "$D/lstm.kdc" \
  --temperature 5 --top-k 16
kdcache build --teacher bert --model minilm --top-k 0 --hidden-layers -1 --data "$C/train" \
  --out "$D/minilm.kdc"
kdcache build --teacher causal_lm --model smollm2 --top-k 16 --hidden-layers -1 --data "$C/train" \
  --out "$D/smollm2.kdc"

step "4. inspect and verify"
for cache in lstm minilm smollm2; do
  kdcache inspect "$D/$cache.kdc"
  kdcache verify "$D/$cache.kdc"
done

step "5. students: no KD and LST from the cached LSTM LM ($STEPS steps each)"
for recipe in none lst; do
  if [ ! -f "$D/runs/$recipe/done" ]; then
    resume=()
    [ -f "$D/runs/$recipe/run.json" ] && resume=(--resume)
    kdtrain run --recipe "$recipe" --config "recipes/$recipe.yaml" --cache "$D/lstm.kdc" \
      --data "$C/train" --features "$C/feats/train.fbank" --tokenizer "$D/bpe" \
      --out "$D/runs/$recipe" "${resume[@]}" \
      train.max_steps="$STEPS" optim.warmup_steps=$((STEPS / 6)) data.max_frames=12000
    touch "$D/runs/$recipe/done"
  fi
done

step "6. evaluation on the test set"
for recipe in none lst; do
  kdtrain eval --run "$D/runs/$recipe" --data "$C/test" --features "$C/feats/test.fbank" \
    --decode attention_beam --beam 4 --out "$D/runs/$recipe/eval-test"
done
.venv/bin/python - "$D" <<'EOF'
import json, sys
d = sys.argv[1]
print(f"\n{'recipe':<8} {'WER':>7} {'CER':>7}   (test set, attention beam 4 + CTC 0.3)")
for r in ("none", "lst"):
    res = json.load(open(f"{d}/runs/{r}/eval-test/results.json"))
    print(f"{r:<8} {100 * res['wer']:6.2f}% {100 * res['cer']:6.2f}%")
EOF
