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
# C++ extension (about 5 minutes); optional. Its setup adds CUDA extensions whenever an `nvcc` is on
# PATH, even one that cannot build them (a stub, or a pip-installed nvcc with no CUDA_HOME, or a CPU
# build of torch): hide such an nvcc so that the CPU extensions build.
build_path=$PATH
torch_cuda=$(python -c "import torch; print(torch.version.cuda or '')")
if [ -z "$torch_cuda" ] || ! nvcc --version >/dev/null 2>&1; then
    build_path=$(printf '%s\n' "$PATH" | tr ':' '\n' | while read -r dir; do [ -e "$dir/nvcc" ] || printf '%s\n' "$dir"; done | paste -sd:)
fi
PATH=$build_path pip install -q --no-build-isolation -c .venv-bench/constraints.txt pytorch-fast-transformers ||
    echo "pytorch-fast-transformers did not build; its rows will be missing"
