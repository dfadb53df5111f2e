#!/usr/bin/env bash
# Set up a virtual environment in .venv with a CPU build of torch first, then this package and its
# dev extras. Safe to rerun: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first: a bare `torch` requirement with no torch installed would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch, transformers, moe_understudy; print('torch', torch.__version__, '| transformers', transformers.__version__, '| moe_understudy', moe_understudy.__version__)"
