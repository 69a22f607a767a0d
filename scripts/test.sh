#!/usr/bin/env bash
# Install, lint, type-check, and run the test suite (CPU only; GPU tests skip themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=offline
.venv/bin/ruff check lightning_diffusionblocks tests examples benchmarks
.venv/bin/mypy  # the package's types; settings in pyproject.toml [tool.mypy]
.venv/bin/python -m pytest -q "$@"
