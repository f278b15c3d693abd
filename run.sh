#!/usr/bin/env bash
# One entry point that does all set-up on a fresh machine, then runs attnkit.
#   bash run.sh            # the main job on its built-in defaults
#   bash run.sh test       # lint, format check, type check and the test suite
#   bash run.sh list       # any other attnkit subcommand and its options
set -euo pipefail
cd "$(dirname "$0")"

VENV=${ATTNKIT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[run.sh] creating $VENV" >&2
  python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"

# Prefer an installed torch; otherwise the CPU wheel (a bare 'torch' would pull a multi-GB CUDA build).
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[run.sh] installing torch (CPU build)" >&2
  pip install -q --disable-pip-version-check "torch==2.13.0"
fi
stamp="$VENV/.attnkit-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[run.sh] installing attnkit and its dependencies" >&2
  pip install -q --disable-pip-version-check -e ".[dev]"
  touch "$stamp"
fi

cmd=${1:-arena}
[ $# -gt 0 ] && shift
case "$cmd" in
  test) exec bash scripts/test.sh "$@" ;;
  *) exec attnkit "$cmd" "$@" ;;
esac
