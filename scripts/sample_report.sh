#!/usr/bin/env bash
# Regenerate docs/sample-arena-report/ on this machine: the default arena run, then the
# advisor on short/long, causal/bidirectional, loose/tight questions against its cells.
#   bash scripts/sample_report.sh [OUT]      # OUT defaults to arena-report
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-arena-report}
DOCS=docs/sample-arena-report

mkdir -p "$OUT"
start=$(date +%s)
bash run.sh arena --out "$OUT" | tee "$OUT/leaderboard.txt"
echo "arena wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/leaderboard.txt"

questions=(
  "--length 1024"
  "--length 1024 --causal --max-error 0.05"
  "--length 16384 --causal"
  "--length 16384 --max-error 0.2"
  "--length 16384 --max-error 0.05 --memory-gb 1"
  "--length 4096 --decode --max-error 0.3"
  "--length 8192 --max-error 0.001 --memory-gb 0.05"
)
{
  echo "# attnkit advise on this machine"
  echo
  echo "Answers reuse the cells of the arena run next to this file (\`--cache $OUT\`); lengths beyond the"
  echo "arena's sweep are measured when the budget allows and projected from the measured lengths otherwise."
  for q in "${questions[@]}"; do
    echo
    echo "## \`attnkit advise $q\`"
    echo
    echo '```'
    # shellcheck disable=SC2086  # the question is a list of options
    # an unsatisfiable question exits non-zero on purpose; record it and go on
    .venv/bin/attnkit advise $q --cache "$OUT" 2>/dev/null || echo "(exit status $?)"
    echo '```'
  done
} > "$OUT/advise.md"

mkdir -p "$DOCS"
cp "$OUT"/report.md "$OUT"/results.json "$OUT"/*.png "$OUT"/advise.md "$OUT"/leaderboard.txt "$DOCS"/
echo "sample report written to $DOCS"
