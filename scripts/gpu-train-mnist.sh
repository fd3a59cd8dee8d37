#!/usr/bin/env bash
# Trains the shipped MNIST model on the GPU machine in one command of under 10 minutes (run from
# the repository root with dist/cuda/qtaylor from scripts/build-cuda.sh --cudnn, or
# dist/cuda/qtaylor.gz, and the MNIST IDX files in $DATA). Writes under $OUT (default
# /tmp/qtaylor-train):
#   mnist-unet/  the diffusers checkpoint (EMA weights) and train_log.csv,
#   state.part-* train_state.safetensors split in 15 MB parts (the file is too large to copy
#                back whole; `cat state.part-* > mnist-unet/train_state.safetensors` restores it),
#   grid-*.png   64 samples at 10 NFE from qt-3 and ddim.
# Env: SECONDS_BUDGET (default 450), BATCH (256), LR (1e-3), DATA (data/mnist-gz).
set -euo pipefail
OUT=${OUT:-/tmp/qtaylor-train}
DATA=${DATA:-data/mnist-gz}
. "$(dirname "$0")/gpu-env.sh"
echo "== smoke: 30 steps"
"$Q" train --data "$DATA" --out /tmp/smoke --steps 30 --batch "${BATCH:-256}" --device cuda
echo "== training"
"$Q" train --data "$DATA" --out "$OUT/mnist-unet" --steps 1000000 --batch "${BATCH:-256}" \
  --lr "${LR:-1e-3}" --save-every 2000 --max-seconds "${SECONDS_BUDGET:-450}" --device cuda
split -b 15000000 -d "$OUT/mnist-unet/train_state.safetensors" "$OUT/mnist-unet/state.part-"
rm "$OUT/mnist-unet/train_state.safetensors"
for s in qt-3 ddim; do
  "$Q" sample --model "$OUT/mnist-unet" --sampler $s --steps 10 --batch 64 --seed 0 \
    --device cuda --out "$OUT/grid-$s.png"
done
ls -la "$OUT" "$OUT/mnist-unet"
