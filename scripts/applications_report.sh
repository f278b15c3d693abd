#!/usr/bin/env bash
# The applications report (docs/applications-report/): translation English->German and English->Chinese on
# this machine's gettext catalogs, and summarization of standard-library code into its docstring's first
# sentence, each trained with full attention and two efficient mechanisms at the same budget (the recipes'
# configs in configs/, the same steps, batches and seed), then scored and timed side by side in one process
# (`python -m attnkit.arena.applications`): one table per recipe, the floors judged.
#
#   bash scripts/applications_report.sh              # reuses the runs already trained (FRESH=1 redoes them)
#   RECIPES="en_de" bash scripts/applications_report.sh   # some recipes only
#
# Settings (environment): WORK (run folders, default runs/apps), OUT (report, default docs/applications-report),
# TRANSLATE_STEPS (default 1200), SUMMARIZE_STEPS (default 400), SUMMARIZE_BATCH (default 8), EXAMPLES (test
# examples scored, default 200), ROUNDS (timing rounds, default 3), THREADS (torch threads, default 2),
# TRAIN_OVERRIDES (extra key=value for every `attnkit train`, e.g. "model.dim=64" for a dry run), TRAIN_ONLY=1
# (train the runs, measure later: e.g. train at low priority on a busy machine, then measure on a quiet one).
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${WORK:-runs/apps}
OUT=${OUT:-docs/applications-report}
RECIPES=${RECIPES:-"en_de en_zh summarize"}
TRANSLATE_STEPS=${TRANSLATE_STEPS:-1200}
SUMMARIZE_STEPS=${SUMMARIZE_STEPS:-400}
SUMMARIZE_BATCH=${SUMMARIZE_BATCH:-8}
EXAMPLES=${EXAMPLES:-200}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
TRAIN_OVERRIDES=${TRAIN_OVERRIDES:-}
FRESH=${FRESH:-0}
TRAIN_ONLY=${TRAIN_ONLY:-0}
ATTNKIT=${ATTNKIT:-.venv/bin/attnkit}
PYTHON=${PYTHON:-.venv/bin/python}

start=$(date +%s)
log() { echo "[applications_report $(( $(date +%s) - start )) s] $*" >&2; }
runs=()

# train RECIPE CONFIG MECHANISM DIR KEY=VALUE...: one run (reused when finished, resumed when interrupted)
train() {
  local recipe=$1 config=$2 mechanism=$3 dir=$4
  shift 4
  runs+=(--run "$recipe:$mechanism=$dir")
  if [[ $FRESH != 1 && -f $dir/model/config.json ]]; then log "reusing $dir"; return; fi
  local resume=()
  if [[ $FRESH != 1 && -d $dir/checkpoints ]]; then resume=(--resume); log "resuming $dir"; else rm -rf "$dir"; fi
  log "training $recipe with $mechanism into $dir"
  # shellcheck disable=SC2086  # TRAIN_OVERRIDES is a list of key=value words
  $ATTNKIT train "$config" attention="$mechanism" out_dir="$dir" "$@" $TRAIN_OVERRIDES "${resume[@]}" >/dev/null
}

for recipe in $RECIPES; do
  case $recipe in
    en_de | en_zh)
      config=configs/translate_${recipe}.toml
      common=(max_steps="$TRANSLATE_STEPS" eval_every=400 checkpoint_every=400)
      train "$recipe" "$config" full "$WORK/$recipe/full" "${common[@]}"
      train "$recipe" "$config" linear "$WORK/$recipe/linear" "${common[@]}"
      # messages run to 64 tokens: a 16-token window is a real restriction
      train "$recipe" "$config" sliding_window "$WORK/$recipe/sliding_window" "${common[@]}" \
        attention_options.window=16
      ;;
    summarize)
      config=configs/summarize_docstrings.toml
      # Only the encoder (the long code) changes mechanism: the decoder keeps full attention over the short summary.
      common=(max_steps="$SUMMARIZE_STEPS" batch_size="$SUMMARIZE_BATCH" eval_every=200 checkpoint_every=100
        model.decoder_attention=full "model.decoder_attention_options={}")
      train "$recipe" "$config" full "$WORK/$recipe/full" "${common[@]}"
      # the window plus the first 16 bytes (the def/class line) as global tokens
      train "$recipe" "$config" longformer "$WORK/$recipe/longformer" "${common[@]}" \
        attention_options.window=128 attention_options.num_global_tokens=16
      train "$recipe" "$config" linear "$WORK/$recipe/linear" "${common[@]}"
      ;;
    *) echo "unknown recipe $recipe (en_de, en_zh, summarize)" >&2; exit 2 ;;
  esac
done

if [[ $TRAIN_ONLY == 1 ]]; then log "trained (TRAIN_ONLY=1): run again without it to score and time"; exit 0; fi
log "scoring and timing every run side by side ($ROUNDS rounds, $THREADS thread(s))"
$PYTHON -m attnkit.arena.applications "${runs[@]}" --examples "$EXAMPLES" --rounds "$ROUNDS" --threads "$THREADS" \
  --out "$OUT" --overwrite \
  --script "bash scripts/applications_report.sh (TRANSLATE_STEPS=$TRANSLATE_STEPS SUMMARIZE_STEPS=$SUMMARIZE_STEPS SUMMARIZE_BATCH=$SUMMARIZE_BATCH)"
log "done: $OUT/report.md"
