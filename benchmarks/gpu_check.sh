#!/usr/bin/env bash
# The one prepared GPU run: GPU tests, then the memory and speed benchmarks with CUDA figures.
# Usage on a GPU machine with torch + lightning installed: OUT=results_dir bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"; } | tee "$OUT/gpu_env.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_strategy.py 2>&1 | tail -5 | tee "$OUT/gpu_pytest.txt"
python3 benchmarks/memory.py --accelerator gpu --image-size 32 --patch 2 --dim 1024 --depth 24 --heads 16 \
  --batch-size 64 --out "$OUT/memory_cuda.json" 2>&1 | grep -v Warning | tail -12
python3 benchmarks/speed.py --accelerator gpu --image-size 32 --patch 2 --dim 1024 --depth 24 --heads 16 \
  --batch-size 64 --blocks 3 --steps 30 --steps-per-phase 100 --sample-steps 50 --out "$OUT/speed_cuda.json" 2>&1 \
  | grep -v Warning | tail -8
python3 benchmarks/memory.py --accelerator gpu --model lm --dim 1024 --depth 24 --heads 16 --seq-len 1024 \
  --batch-size 8 --vocab 32000 --out "$OUT/memory_lm_cuda.json" 2>&1 | grep -v Warning | tail -12
