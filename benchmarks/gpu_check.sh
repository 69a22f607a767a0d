#!/usr/bin/env bash
# The one prepared GPU run: environment, the CUDA tests and the contract on the device's stack, then the
# headline (a DiT whose end-to-end training does not fit the card, trained block-wise with offload).
# Usage on a GPU machine with torch + lightning + timm installed: OUT=results_dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
  free -g | head -2; nproc; } | tee "$OUT/gpu_env.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_contract.py tests/test_module_api.py \
  2>&1 | tail -4 | tee "$OUT/gpu_pytest.txt"
timeout 420 python3 benchmarks/headline.py --out "$OUT" 2>&1 | grep -v Warning | tee "$OUT/headline_log.txt"
