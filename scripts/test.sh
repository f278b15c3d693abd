#!/usr/bin/env bash
# The project's checks: lint, format, types, the fast test suite, then the slow tests if time allows.
# Usage: bash scripts/test.sh [extra pytest args]     (run.sh test calls this inside the venv)
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
fail=0

echo "== ruff check"; ruff check src tests benchmarks scripts || fail=1
echo "== ruff format --check"; ruff format --check src tests benchmarks scripts || fail=1
echo "== mypy"; mypy || fail=1
echo "== pytest (fast suite)"
python -m pytest -m "not slow" -p no:cacheprovider "$@" || fail=1

# Slow tests run when the fast part left room in the time budget (CI must stay under 20 minutes).
budget=${ATTNKIT_SLOW_BUDGET_S:-420}
elapsed=$(( $(date +%s) - start ))
if [ "$fail" -eq 0 ] && [ "$elapsed" -lt 600 ]; then
  echo "== pytest (slow tests, budget ${budget}s)"
  timeout "$budget" python -m pytest -m slow -p no:cacheprovider "$@"
  rc=$?
  if [ "$rc" -eq 124 ]; then echo "slow tests stopped at the ${budget}s budget (not a failure)";
  elif [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then fail=1; fi
else
  echo "== slow tests skipped (elapsed ${elapsed}s)"
fi
echo "== total $(( $(date +%s) - start ))s"
exit $fail
