#!/usr/bin/env bash
# The `attnkit convert` recipe end to end (issue 19): train a small Llama with Transformers on this
# machine's Python standard library, save it, convert it to sliding_window, linear and performer with
# distillation, and write the combined report to docs/hf-convert-report/ (report.md, report.json,
# report.png). About 45 minutes on 2 (busy) CPU cores. Steps already done are skipped, and an interrupted
# conversion resumes from its last saved step, so rerunning the script after Ctrl-C continues.
#   bash scripts/hf_convert_recipe.sh [RUNS]        # RUNS defaults to runs/hf-recipe
# Environment: QUICK=1 runs a tiny version (a smoke test of the whole pipeline, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/hf-recipe}
DOCS=${DOCS:-docs/hf-convert-report}
PY=${PYTHON:-python}
STDLIB=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

SEQ_LEN=512                  # training and evaluation windows; the sliding window is a quarter of it
WINDOW=$((SEQ_LEN / 4))
# 16K is left to the benchmark suite (python -m benchmarks run hf_convert): on 2 CPU cores one SDPA
# forward+backward of the teacher at 16K takes minutes, and each conversion measures it again.
LAYER_STEPS=20 STEPS=20 LENGTHS=2048,8192 ROUNDS=2 TEACHER_CONFIG=configs/hf/llama_small.toml
EXTRA=(--max-tokens 2000000)
if [[ "${QUICK:-0}" == 1 ]]; then
  LAYER_STEPS=2 STEPS=2 LENGTHS=256,512 ROUNDS=1
  EXTRA=(--max-tokens 200000 --eval-windows 4)
  mkdir -p "$RUNS"
  cat > "$RUNS/quick-teacher.toml" <<'TOML'
[model]
vocab_size = 260
hidden_size = 64
intermediate_size = 128
num_hidden_layers = 2
num_attention_heads = 4
max_position_embeddings = 1024
[train]
steps = 3
batch_size = 2
seq_len = 128
lr = 1e-3
max_tokens = 100000
[data]
source = "stdlib"
TOML
  TEACHER_CONFIG="$RUNS/quick-teacher.toml"
fi
# The conversions read packages of the standard library (held-out files chosen by a hash of their path).
DATA=("$STDLIB/asyncio" "$STDLIB/email" "$STDLIB/json" "$STDLIB/http" "$STDLIB/logging" "$STDLIB/unittest"
      "$STDLIB/xml" "$STDLIB/importlib" "$STDLIB/concurrent" "$STDLIB/multiprocessing")

mkdir -p "$RUNS"
start=$(date +%s)
if [[ ! -f "$RUNS/teacher/config.json" ]]; then
  $PY -m attnkit.hf.recipe teacher "$TEACHER_CONFIG" --out "$RUNS/teacher"
fi
echo "teacher ready: $(( $(date +%s) - start )) s"

convert() {  # convert NAME [--option k=v ...]
  local name=$1; shift
  if [[ -f "$RUNS/$name/report.json" ]]; then echo "$name: done already"; return; fi
  attnkit convert "$RUNS/teacher" --attention "$name" "$@" --data "${DATA[@]}" --out "$RUNS/$name" \
    --seq-len "$SEQ_LEN" --layer-steps "$LAYER_STEPS" --steps "$STEPS" --lengths "$LENGTHS" \
    --layer-lr 2e-3 --lr 1e-3 --rounds "$ROUNDS" --decode-tokens 4 "${EXTRA[@]}"
  echo "$name converted: $(( $(date +%s) - start )) s"
}
convert sliding_window --option window=$WINDOW
convert linear --train qkvo
convert performer --option nb_features=64 --train qkvo

$PY -m attnkit.hf.recipe summary "$RUNS/sliding_window" "$RUNS/linear" "$RUNS/performer" --out "$DOCS"
echo "recipe wall time: $(( $(date +%s) - start )) s" | tee -a "$DOCS/report.md"
