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

# PyPI's Linux torch is the multi-GB CUDA build: the script installs the CPU build where nvidia-smi lists no
# GPU, the CUDA build where it does, and keeps an installed torch. It prints one line when it installs, and
# why. Override: ATTNKIT_TORCH=auto|cpu|cuda|skip, ATTNKIT_TORCH_INDEX=URL (python scripts/torch_setup.py -h).
python scripts/torch_setup.py
stamp="$VENV/.attnkit-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[run.sh] installing attnkit and its dependencies" >&2
  pip install -q --disable-pip-version-check -e ".[dev,hf,compress]"
  touch "$stamp"
fi

cmd=${1:-arena}
[ $# -gt 0 ] && shift
case "$cmd" in
  test) exec bash scripts/test.sh "$@" ;;
  *) exec attnkit "$cmd" "$@" ;;
esac
