#!/usr/bin/env bash
# The one prepared GPU run. In parallel: (1) the headline — a DiT whose end-to-end training does not fit the
# card, trained block-wise with offload, with each group's CUDA peak and step time — and (2) the MNIST
# generation parity of EDM, rectified flow and DDPM over three training seeds and two sampling seeds each.
# Usage on a GPU machine with torch + lightning + timm + torchmetrics installed:
#   OUT=results_dir MNIST=dir_with_mnist_idx_files bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
MNIST=${MNIST:-}
WORK=${WORK:-/tmp/ldb_gpu}
mkdir -p "$OUT" "$WORK/logs"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline OMP_NUM_THREADS=2
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
  free -g | head -2; nproc; date -u; } | tee "$OUT/gpu_env.txt"
for f in edm flow ddpm; do
  timeout "${PARITY_SECONDS:-500}" python3 benchmarks/parity.py --task generation --formulation "$f" \
    --seeds 0 1 2 --eval-seeds 0 1 --jobs 6 --accelerator gpu --eval-device cuda \
    ${MNIST:+--mnist-dir "$MNIST"} --workdir "$WORK/parity" --out "$OUT/parity_generation_${f}_cuda.json" \
    >"$WORK/logs/parity_$f.log" 2>&1 &
done
timeout "${HEADLINE_SECONDS:-420}" python3 benchmarks/headline.py --out "$WORK/headline" 2>&1 | grep -v Warning \
  | tee "$WORK/logs/headline.log"
cp "$WORK/headline/headline_cuda.json" "$OUT/headline_cuda.json" 2>/dev/null
wait
date -u >>"$OUT/gpu_env.txt"
cp -r "$WORK/headline" "$WORK/logs/" 2>/dev/null
tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs
tail -3 "$WORK"/logs/parity_*.log
