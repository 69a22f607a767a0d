#!/usr/bin/env bash
# The main job: install, then train the DiT on MNIST with DiffusionBlocks (B=3, CPU) and draw samples.
# Extra arguments go to examples/mnist_generation.py (e.g. --strategy auto for the end-to-end baseline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/mnist_generation.py "$@"
