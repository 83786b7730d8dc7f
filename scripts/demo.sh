#!/usr/bin/env bash
# The main job, end to end, on the embedded default:
#   1. an English speech corpus made offline (public-domain text spoken by espeak-ng; dev and test
#      voices are never heard in training),
#   2. 80-dim fbank features and a character tokenizer (the student's units),
#   3. teachers run once into caches: a character LSTM LM trained on the LM text (the LST paper's
#      teacher, cached three ways), a small character BERT trained on the same text beside it
#      (its masked-LM top 8 for interAED and its last hidden layer for CIF-HKD), the real MiniLM
#      BERT (hidden states) and the real SmolLM2-135M causal LM (top-k + hidden states),
#   4. inspect + verify every cache,
#   5. students, two at a time (one core each), same steps and batches: the baseline (seed 1234) and a
#      second baseline (seed 1235); the two as an ensemble teacher (paper 003: their frame-level CTC
#      posteriors averaged into a cache); then LST distillation from the LSTM LM cache (paper 001)
#      and essence distillation from the ensemble cache (seed 1234 both), dev CER logged every 100 steps,
#   6. WER/CER on the test set (attention beam 4 + CTC 0.5, the weight chosen on dev), again with
#      the LSTM LM fused into the beam (shallow fusion, weight 0.5 chosen on dev), the ensemble
#      itself and the students by CTC greedy, and a table.
# Every step is skipped when its output exists, and killed students resume, so a re-run resumes.
# Time on 2 CPU cores (docs/results.md): ~14 min for corpus, features, LM teacher, caches, inspect
# and verify, ~17 min for each pair of students (1200 steps each), ~4 min of evaluation.
#
# Environment knobs: KDCACHE_DEMO_DIR (default demo), KDCACHE_DEMO_SIZE (tiny|small|demo|large,
# default large: 6 h of training speech; demo: the former 1.5 h, same dev/test; docs/results.md),
# KDCACHE_DEMO_STEPS (student optimizer steps, default 1200), KDCACHE_DEMO_LM_MINUTES (LSTM LM
# time budget, default 7), KDCACHE_DEMO_BERT_MINUTES (character BERT time budget, default: the
# LSTM LM's),
# KDCACHE_DEMO_SMOLLM2 (1 = also cache the real SmolLM2, default 1), KDCACHE_DEMO_BERT_STUDENTS
# (1 = also train and evaluate interaed and cif_hkd students from the BERT cache, side by side:
# ~17 more minutes; default 0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

D=${KDCACHE_DEMO_DIR:-demo}
SIZE=${KDCACHE_DEMO_SIZE:-large}
STEPS=${KDCACHE_DEMO_STEPS:-1200}
LM_MINUTES=${KDCACHE_DEMO_LM_MINUTES:-7}
BERT_MINUTES=${KDCACHE_DEMO_BERT_MINUTES:-$LM_MINUTES}
BERT_STUDENTS=${KDCACHE_DEMO_BERT_STUDENTS:-0}
SMOLLM2=${KDCACHE_DEMO_SMOLLM2:-1}
C=$D/corpus
mkdir -p "$D/caches"
step() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

step "1. demo corpus ($SIZE) -> $C"
[ -f "$C/corpus.json" ] || kdcache demo-corpus --out "$C" --size "$SIZE"

step "2. features and the character tokenizer"
[ -d "$C/feats/test.fbank" ] || kdcache features "$C"
[ -f "$D/char/kdcache_tokenizer.json" ] || kdcache tokenizer train --kind char \
  --text "$C/lm_text.txt" --out "$D/char"

step "3a. character LSTM LM teacher trained on the LM text (${LM_MINUTES} min budget); beside it, on one core, a character BERT (${BERT_MINUTES} min) and its cache"
# The BERT (2 x 128, mask 0.4: the size that learns in CPU minutes, docs/teachers.md) trains and
# then caches its masked-LM top 8 (interaed, paper 002) and last hidden layer (cif_hkd, paper 004)
# in the background, one thread, while the LSTM LM trains (also one thread: two threads beside
# the BERT oversubscribe the 2 cores and train less than one) and the other caches are built; its
# output goes to $D/bert.log. --mask-stride 8 masks every 8th character together (8 copies of a
# sentence instead of one per character: ~9x cheaper; the BERT trained with 40% masked).
bert_teacher() {
  [ -f "$D/bert/train_lm.json" ] || kdcache train-lm --arch bert --text "$C/lm_text.txt" \
    --tokenizer "$D/char" --valid-text "$C/dev/text" --out "$D/bert" --overwrite \
    --max-minutes "$BERT_MINUTES" --layers 2 --hidden 128 --heads 4 --mask-prob 0.4 --lr 2e-3 \
    --batch-tokens 2048 --no-progress
  kdcache build --teacher bert --model "$D/bert" --data "$C/train" --out "$D/caches/bert.kdc" \
    --top-k 8 --hidden-layers -1 --mask-stride 8 --threads 1 --no-progress
}
OMP_NUM_THREADS=1 bert_teacher > "$D/bert.log" 2>&1 & bert_pid=$!
[ -f "$D/lstm_lm/lstm_lm.json" ] || OMP_NUM_THREADS=1 kdcache train-lm --text "$C/lm_text.txt" \
  --tokenizer "$D/char" --out "$D/lstm_lm" --max-minutes "$LM_MINUTES"

step "3b. teacher caches (a re-run resumes and skips committed utterances)"
# The LSTM LM three ways (the study compares them, docs/results.md): dense (k = V = 31) at T = 5,
# top-8 + rest bin at T = 5, top-8 at T = 1 (re-tempered in the loss; multitask and essence).
kdcache build --teacher lstm_lm --model "$D/lstm_lm" --data "$C/train" --out "$D/caches/lstm_t5_dense.kdc" \
  --temperature 5 --top-k 31
kdcache build --teacher lstm_lm --model "$D/lstm_lm" --data "$C/train" --out "$D/caches/lstm_t5_k8.kdc" \
  --temperature 5 --top-k 8
kdcache build --teacher lstm_lm --model "$D/lstm_lm" --data "$C/train" --out "$D/caches/lstm_t1_k8.kdc" \
  --temperature 1 --top-k 8
kdcache build --teacher bert --model minilm --top-k 0 --hidden-layers -1 --data "$C/train" \
  --out "$D/caches/minilm.kdc"
caches=(lstm_t5_dense lstm_t5_k8 lstm_t1_k8 minilm)
if [ "$SMOLLM2" = 1 ]; then
  kdcache build --teacher causal_lm --model smollm2 --top-k 16 --hidden-layers -1 --data "$C/train" \
    --out "$D/caches/smollm2.kdc"
  caches+=(smollm2)
fi
wait $bert_pid || { tail -n 20 "$D/bert.log" >&2; echo "the BERT teacher failed: see $D/bert.log" >&2; exit 1; }
grep -a "^saved" "$D/bert.log" || true
caches+=(bert)

step "4. inspect and verify"
for cache in "${caches[@]}"; do
  kdcache inspect "$D/caches/$cache.kdc"
  kdcache verify "$D/caches/$cache.kdc"
done

step "5. students, two side by side (one core each), same batches and steps ($STEPS steps each)"
train_student() {  # name recipe seed cache...
  local name=$1 recipe=$2 seed=$3 out=$D/runs/$1
  shift 3
  if [ -f "$out/train_summary.json" ] && grep -q "\"step\": $STEPS," "$out/train_summary.json"; then
    return 0
  fi
  local args=(--config "recipes/cpu/$recipe.yaml" --data "$C/train" --features "$C/feats/train.fbank"
              --tokenizer "$D/char" --dev-data "$C/dev" --dev-features "$C/feats/dev.fbank")
  for c in "$@"; do args+=(--cache "$c"); done
  [ -f "$out/config.yaml" ] && args=(--resume)
  OMP_NUM_THREADS=1 kdtrain run --out "$out" "${args[@]}" train.max_steps="$STEPS" train.seed="$seed" \
    train.progress=false > "$D/runs/$name.log" 2>&1
}
pair() {  # "name recipe seed [cache]" "name recipe seed [cache]"
  local ok=0 p1 p2
  # shellcheck disable=SC2086  # each argument is a word list
  train_student $1 & p1=$!
  # shellcheck disable=SC2086
  train_student $2 & p2=$!
  wait $p1 || { echo "student ${1%% *} failed: see $D/runs/${1%% *}.log" >&2; ok=1; }
  wait $p2 || { echo "student ${2%% *} failed: see $D/runs/${2%% *}.log" >&2; ok=1; }
  return $ok
}
mkdir -p "$D/runs"
step "5a. the baseline (seed 1234, the default) and a second baseline (seed 1235): the ensemble's two members"
pair "none none 1234" "none_s2 none 1235"
step "5b. the ensemble teacher: both baselines' frame posteriors averaged (paper 003)"
kdcache build --teacher ensemble --model "$D/runs/none" --model "$D/runs/none_s2" --data "$C/train" \
  --features "$C/feats/train.fbank" --out "$D/caches/ens2_k8.kdc" --top-k 8
kdcache inspect "$D/caches/ens2_k8.kdc"
kdcache verify "$D/caches/ens2_k8.kdc"
step "5c. distilled students (seed 1234, like the baseline): LST from the LSTM LM, essence from the ensemble"
pair "lst lst 1234 $D/caches/lstm_t5_dense.kdc" "essence essence 1234 $D/caches/ens2_k8.kdc"
curves=("none=$D/runs/none" "lst=$D/runs/lst" "essence=$D/runs/essence")
if [ "$BERT_STUDENTS" = 1 ]; then
  step "5d. students from the character BERT: interAED (masked-LM top 8) and CIF-HKD (hidden states)"
  pair "interaed interaed 1234 $D/caches/bert.kdc" "cif_hkd cif_hkd 1234 $D/caches/bert.kdc"
  curves+=("interaed=$D/runs/interaed" "cif_hkd=$D/runs/cif_hkd")
fi
kdtrain curves "${curves[@]}" --out "$D/runs/curves.png"

step "6. evaluation on the test set (held-out voices)"
# then with the LSTM LM fused into the beam (shallow fusion, weight 0.5 chosen on dev: docs/results.md)
for lm in "" "--lm $D/lstm_lm --lm-weight 0.5"; do
  recipes=(none lst essence)
  [ "$BERT_STUDENTS" = 1 ] && recipes+=(interaed)
  for recipe in "${recipes[@]}"; do
    # shellcheck disable=SC2086  # $lm is two options or nothing
    OMP_NUM_THREADS=1 kdtrain eval --run "$D/runs/$recipe" --data "$C/test" --features "$C/feats/test.fbank" \
      --decode attention_beam --beam 4 --ctc-weight 0.5 $lm \
      --out "$D/runs/$recipe/eval-test${lm:+-lm}" > /dev/null &
  done
  if [ "$BERT_STUDENTS" = 1 ] && [ -z "$lm" ]; then  # the CIF model: its own decoder, no fusion
    OMP_NUM_THREADS=1 kdtrain eval --run "$D/runs/cif_hkd" --data "$C/test" --features "$C/feats/test.fbank" \
      --decode cif --out "$D/runs/cif_hkd/eval-test" > /dev/null &
  fi
  wait
done
# CTC greedy: the ensemble as a system of its own, and the students it is compared with
for recipe in none essence; do
  OMP_NUM_THREADS=1 kdtrain eval --run "$D/runs/$recipe" --data "$C/test" --features "$C/feats/test.fbank" \
    --decode ctc_greedy --out "$D/runs/$recipe/eval-test-ctc" > /dev/null &
done
OMP_NUM_THREADS=1 kdtrain eval --run "$D/runs/none" --run "$D/runs/none_s2" --data "$C/test" \
  --features "$C/feats/test.fbank" --out "$D/runs/ensemble-eval-test-ctc" > /dev/null
wait
.venv/bin/python - "$D" <<'EOF'
import csv, json, os, sys
d = sys.argv[1]
print(f"\n{'recipe':<8} {'test WER':>9} {'test CER':>9} {'+LM WER':>9} {'+LM CER':>9} "
      f"{'CTC CER':>9} {'dev CER*':>9} {'steps':>6} {'train min':>10}")
for r in ("none", "lst", "essence", "interaed", "cif_hkd"):
    if r in ("interaed", "cif_hkd") and not os.path.exists(f"{d}/runs/{r}/eval-test/results.json"):
        continue  # KDCACHE_DEMO_BERT_STUDENTS=0
    res = json.load(open(f"{d}/runs/{r}/eval-test/results.json"))
    try:
        lm = json.load(open(f"{d}/runs/{r}/eval-test-lm/results.json"))
        fused = f"{100 * lm['wer']:8.2f}% {100 * lm['cer']:8.2f}%"
    except FileNotFoundError:  # cif_hkd: the CIF decoder has no LM fusion
        fused = f"{'-':>9} {'-':>9}"
    try:
        ctc = f"{100 * json.load(open(f'{d}/runs/{r}/eval-test-ctc/results.json'))['cer']:8.2f}%"
    except FileNotFoundError:
        ctc = f"{'-':>9}"
    dev = list(csv.DictReader(open(f"{d}/runs/{r}/dev.csv")))[-1]
    print(f"{r:<8} {100 * res['wer']:8.2f}% {100 * res['cer']:8.2f}% {fused} "
          f"{ctc} {100 * float(dev['dev_cer']):8.2f}% {res['step']:>6} "
          f"{float(dev['train_seconds']) / 60:10.1f}")
ens = json.load(open(f"{d}/runs/ensemble-eval-test-ctc/results.json"))
print(f"{'ensemble':<8} {'':>9} {'':>9} {'':>9} {'':>9} {100 * ens['cer']:8.2f}%   (none + none_s2, "
      f"CTC greedy on averaged posteriors; test WER {100 * ens['wer']:.2f}%)")
print("test: attention beam 4 + CTC 0.5; +LM: and the LSTM LM fused at weight 0.5; CTC: CTC greedy; "
      "*dev: CTC greedy at the last step. lst: LST from the LSTM LM (paper 001); essence: from the "
      f"ensemble of the two baselines, per frame on the CTC head (paper 003). Curves: "
      f"{d}/runs/curves.png. One seed: docs/results.md has the multi-seed study.")
if os.path.exists(f"{d}/runs/cif_hkd/eval-test/results.json"):
    print("interaed: two aux decoders on the character BERT's masked-LM top 8 (paper 002); "
          "cif_hkd: a CIF model taught the BERT's hidden states (paper 004), decoded by its CIF "
          "decoder (compare it with a CIF model without KD: docs/results.md, cif_base).")
EOF
