#!/usr/bin/env bash
# The compression report (docs/compress-report/): train the teacher LM of configs/compress_lm.toml (or reuse
# it), make every compressed model with `attnkit compress` / `attnkit distill`, then measure them all side by
# side in one process against the teacher (`python -m attnkit.compress.summary`): one table, the floors judged.
#
#   bash scripts/compress_report.sh                 # teacher + 30 min on a busy shared 2-core CPU
#   FRESH=1 bash scripts/compress_report.sh         # redo every model (default: reuse those already made)
#
# Settings (environment): RUN (teacher run folder, default runs/compress_lm), WORK (the models, default
# runs/compress_report), OUT (the report, default docs/compress-report), FINETUNE_STEPS (after pruning,
# default 10), DISTILL_STEPS (student training, default 20), ROUNDS (timing rounds, default 2), EVAL_EXAMPLES
# (validation windows scored, default 32), CONTEXT (forward timing window, default 2048), THREADS
# (torch threads while timing, default 1: steadier on a shared machine, the same for every model),
# TRAIN_OVERRIDES (extra key=value for `attnkit train`, e.g. for a dry run: "model.dim=64 max_steps=5").
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=configs/compress_lm.toml
RUN=${RUN:-runs/compress_lm}
WORK=${WORK:-runs/compress_report}
OUT=${OUT:-docs/compress-report}
FINETUNE_STEPS=${FINETUNE_STEPS:-10}
DISTILL_STEPS=${DISTILL_STEPS:-20}
ROUNDS=${ROUNDS:-2}
EVAL_EXAMPLES=${EVAL_EXAMPLES:-32}
CONTEXT=${CONTEXT:-2048}
THREADS=${THREADS:-1}
TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-}
FRESH=${FRESH:-0}
ATTNKIT=${ATTNKIT:-.venv/bin/attnkit}
PYTHON=${PYTHON:-.venv/bin/python}
# The per-command reports are by-products (the summary re-measures everything together): keep them quick.
QUICK=(--rounds 1 --generate-tokens 1 --eval-examples 8)

start=$(date +%s)
log() { echo "[compress_report $(( $(date +%s) - start )) s] $*" >&2; }

# ---- the teacher
# shellcheck disable=SC2086  # TRAIN_OVERRIDES is a list of key=value words
if [[ -f $RUN/model/config.json && $FRESH != 1 ]]; then
  log "reusing the teacher in $RUN"
elif [[ -d $RUN/checkpoints && $FRESH != 1 ]]; then
  log "resuming the teacher in $RUN"
  $ATTNKIT train "$CONFIG" out_dir="$RUN" $TRAIN_OVERRIDES --resume
else
  log "training the teacher into $RUN"
  rm -rf "$RUN"
  $ATTNKIT train "$CONFIG" out_dir="$RUN" $TRAIN_OVERRIDES
fi

# made NAME: whether row NAME's folder holds a finished model and report (and FRESH is not asked)
made() { [[ $FRESH != 1 && -f $WORK/$1/report.json ]]; }

compress_row() {  # compress_row NAME ARGS...: attnkit compress the teacher into $WORK/NAME
  local name=$1
  shift
  if made "$name"; then log "reusing $WORK/$name"; return; fi
  log "compress: $name ($*)"
  $ATTNKIT compress "$RUN" "$@" --out "$WORK/$name" --overwrite "${QUICK[@]}" >/dev/null
}

distill_row() {  # distill_row MECHANISM SETTINGS_JSON: a distilled student and the same student from scratch
  local name=$1 settings=$2
  if made "$name"; then log "reusing $WORK/$name"; return; fi
  mkdir -p "$WORK/students"
  echo "$settings" > "$WORK/students/$name.json"
  log "distill: $name student ($settings), $DISTILL_STEPS steps, and from scratch"
  $ATTNKIT distill --teacher "$RUN" --student "$WORK/students/$name.json" --steps "$DISTILL_STEPS" --baseline \
    --out "$WORK/$name" --overwrite "${QUICK[@]}" >/dev/null
}

# The rows with floors first (heads, int8, the two students), so a cut-short run has them.
compress_row heads --prune heads=0.3 --finetune-steps "$FINETUNE_STEPS"
compress_row int8_dynamic --quantize int8
# Students: the teacher's width with 2 of its 4 layers and a cheaper mechanism, freshly initialised.
distill_row sliding_window '{"attention": "sliding_window", "attention_options": {"window": 64}, "depth": 2}'
distill_row linear '{"attention": "linear", "depth": 2}'
compress_row ffn --prune ffn=0.3 --finetune-steps "$FINETUNE_STEPS"
compress_row magnitude --prune magnitude=0.5  # for size only (zeros stored densely): no fine-tune
compress_row int8_weight_only --quantize int8_weight_only

# Combined: the distilled sliding_window student, 30% of its heads pruned + fine-tune, then int8.
if made combined; then log "reusing $WORK/combined"; else
  log "compress: combined (the sliding_window student, heads pruned + fine-tune, int8)"
  # A model folder carries no data: the teacher run's text windows, batch and fine-tune lr (lr / 10, as above).
  read -r seq_len batch lr < <($PYTHON -c "import json; c = json.load(open('$RUN/train_config.json'));
print(c['seq_len'], c['batch_size'], format(c['lr'] / 10, 'g'))")
  $ATTNKIT compress "$WORK/sliding_window" --data text --seq-len "$seq_len" --tokenizer byte --batch-size "$batch" \
    --prune heads=0.3 --finetune-steps "$FINETUNE_STEPS" --finetune-lr "$lr" --quantize int8 \
    --out "$WORK/combined" --overwrite "${QUICK[@]}" >/dev/null
fi

# ---- one table: everything measured together against the teacher
log "measuring every model side by side ($ROUNDS rounds, $THREADS thread(s))"
$PYTHON -m attnkit.compress.summary --baseline "$RUN" \
  --row heads="$WORK/heads" --row ffn="$WORK/ffn" --row magnitude="$WORK/magnitude" \
  --row int8_dynamic="$WORK/int8_dynamic" --row int8_weight_only="$WORK/int8_weight_only" \
  --row sliding_window_distilled="$WORK/sliding_window" --row sliding_window_scratch="$WORK/sliding_window/baseline" \
  --row linear_distilled="$WORK/linear" --row linear_scratch="$WORK/linear/baseline" \
  --row combined="$WORK/combined" \
  --rounds "$ROUNDS" --eval-examples "$EVAL_EXAMPLES" --context "$CONTEXT" --threads "$THREADS" --out "$OUT" --overwrite \
  --script "bash scripts/compress_report.sh (FINETUNE_STEPS=$FINETUNE_STEPS DISTILL_STEPS=$DISTILL_STEPS)"
log "done: $OUT/report.md"
