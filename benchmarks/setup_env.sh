#!/usr/bin/env bash
# Create .venv-bench: attnkit plus the open implementations it is compared against.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-bench
. .venv-bench/bin/activate
pip install -q torch==2.13.0
echo "torch==2.13.0" > .venv-bench/constraints.txt
pip install -q -c .venv-bench/constraints.txt -r benchmarks/requirements.txt
pip install -q -c .venv-bench/constraints.txt -e .
# C++ extension; optional (does not build everywhere)
pip install -q --no-build-isolation -c .venv-bench/constraints.txt pytorch-fast-transformers || echo "pytorch-fast-transformers did not build; its rows will be missing"
