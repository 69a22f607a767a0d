#!/usr/bin/env bash
# The prepared GPU run for the quality rows' error bars, all at once on one card (about 7 minutes on an H100):
#   (1) the ablations (partition, γ, B at equal layer evaluations) with rectified flow at the demo's full budget,
#       training seeds 0 1 2 and sampling seeds 0 1 2;
#   (2) classification, DiffusionBlocks vs a plain ViT on Fashion-MNIST, training seeds 0 1 2, with learning curves;
#   (3) the masked and autoregressive character LMs (AR against a plain next-token model), training seeds 0 1 2;
#   (4) DDPM parity with v-prediction (DiffusionBlocks vs end to end, 12,000 layer evaluations), training seeds
#       0 1 2 and sampling seeds 0 1 (the CPU row has one training seed).
# Every job writes its JSON as it finishes, so a run cut short by the timeouts keeps what was done.
# Usage on a GPU machine with torch + lightning + timm + torchmetrics installed:
#   OUT=results_dir MNIST=dir_with_mnist_idx FASHION=dir_with_fashion_idx [TEXT=corpus.txt] bash benchmarks/gpu_quality.sh
# QUICK=1 shrinks every model and budget to a smoke test that runs on a CPU in a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
WORK=${WORK:-/tmp/ldb_quality}
ACC=${ACCELERATOR:-gpu}
EVAL=${EVAL_DEVICE:-cuda}
mkdir -p "$OUT" "$WORK/logs"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 WANDB_MODE=offline OMP_NUM_THREADS=1
if [[ -n "${QUICK:-}" ]]; then
  GEN=(--quick --gen-steps 6 --fid-samples 20 --sample-steps 3 --feature-steps 30)
  CLS=(--depth 3 --dim 24 --heads 2 --batch-size 16 --test-batches 2 --steps 4 --curve-every 2 --curve-images 32)
  TXT=(--dim 32 --depth 4 --heads 2 --batch-size 8 --eval-batches 2 --samples 1 --seq-len 32 --steps 2)
  AR=(--new-chars 8 --prompt-chars 8 --sample-steps 4)
else
  GEN=(--gen-steps 6000)
  CLS=(--steps 4690 --curve-every 469)  # 10 epochs of the plain ViT; DiffusionBlocks: B× the steps of depth/B layers
  TXT=()
  AR=(--seq-len 64 --depth 8 --num-blocks 4 --new-chars 120)  # benchmarks/parity_run.py's CPU settings (TEXT_SETTINGS), then 3 seeds
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
  free -g | head -2; date -u; } | tee "$OUT/gpu_quality_env.txt"

timeout "${ABLATION_SECONDS:-420}" python3 benchmarks/parity.py --task none --ablation all --formulation flow \
  --seeds 0 1 2 --eval-seeds 0 1 2 --jobs 9 --accelerator "$ACC" --eval-device "$EVAL" "${GEN[@]}" \
  ${MNIST:+--mnist-dir "$MNIST"} --workdir "$WORK/ablation" --out "$OUT/ablation_seeds_flow_cuda.json" \
  >"$WORK/logs/ablation.log" 2>&1 &
timeout "${DDPM_SECONDS:-420}" python3 benchmarks/parity.py --task generation --formulation ddpm --prediction v \
  --seeds 0 1 2 --eval-seeds 0 1 --jobs 6 --accelerator "$ACC" --eval-device "$EVAL" "${GEN[@]}" \
  ${MNIST:+--mnist-dir "$MNIST"} --workdir "$WORK/ddpm_v" --out "$OUT/parity_generation_ddpm_v_cuda.json" \
  >"$WORK/logs/ddpm_v.log" 2>&1 &
for seed in 0 1 2; do
  for strategy in diffusionblocks plain; do
    timeout "${CLASSIFICATION_SECONDS:-420}" python3 examples/classification.py --strategy "$strategy" \
      --seed "$seed" --accelerator "$ACC" "${CLS[@]}" ${FASHION:+--data-dir "$FASHION"} \
      --json "$OUT/classification_${strategy}_seed${seed}_cuda.json" >"$WORK/logs/cls_${strategy}_$seed.log" 2>&1 &
  done
  timeout "${TEXT_SECONDS:-420}" python3 examples/text_mdm.py --strategy both --seed "$seed" --accelerator "$ACC" \
    --seq-len 128 --depth 6 --steps 600 --sample-steps 64 "${TXT[@]}" ${TEXT:+--data "$TEXT"} \
    --json "$OUT/text_masked_seed${seed}_cuda.json" >"$WORK/logs/text_masked_$seed.log" 2>&1 &
  timeout "${TEXT_SECONDS:-420}" python3 examples/text_ar.py --strategy all --seed "$seed" --accelerator "$ACC" \
    --steps 400 "${AR[@]}" "${TXT[@]}" ${TEXT:+--data "$TEXT"} \
    --json "$OUT/text_ar_seed${seed}_cuda.json" >"$WORK/logs/text_ar_$seed.log" 2>&1 &
done
wait
date -u >>"$OUT/gpu_quality_env.txt"
tar -C "$WORK" -czf "$OUT/quality_logs.tar.gz" logs
ls "$OUT"
