#!/usr/bin/env bash
# One resumable chunk (under 10 minutes) of training the class-conditional MNIST (or
# Fashion-MNIST) UNet on the GPU machine. Run from the repository root with dist/cuda/qtaylor
# (or .gz / .xz) from `scripts/build-cuda.sh --cudnn` and the IDX files in $DATA.
#   - continues the run in $RUN when it holds a training state (a warm machine keeps the
#     ignored runs/ folder between calls), else the one carried in $CARRIED (the parts this
#     script wrote under $OUT last time: state.part-*, and the checkpoint files), else starts;
#   - writes the checkpoint to $OUT/run/: diffusion_pytorch_model.safetensors, meta.tgz
#     (config.json, scheduler_config.json, train_log.csv) and train_state.safetensors split
#     into 15 MB parts state.part-* (`cat state.part-* > train_state.safetensors` restores it),
#     and a guided grid, one row per class, at 10 NFE.
# Env: SECONDS_BUDGET (480), DATA (data/mnist-gz), CONFIG (configs/mnist-class-cond.json),
#      RUN (runs/mnist-cond), CARRIED (carried/mnist-cond), BATCH (256), LR (1e-3),
#      TF32 (1: --tf32), GUIDANCE (2).
set -euo pipefail
: "${OUT:=/tmp/qtaylor-train-cond}"
. "$(dirname "$0")/gpu-env.sh"
DATA=${DATA:-data/mnist-gz}
CONFIG=${CONFIG:-configs/mnist-class-cond.json}
RUN=${RUN:-runs/mnist-cond}
CARRIED=${CARRIED:-carried/mnist-cond}
tf32=()
[ "${TF32:-1}" = 1 ] && tf32=(--tf32)
resume=()
if [ -f "$RUN/train_state.safetensors" ]; then
  echo "== continuing $RUN (kept on this machine)"
  resume=(--resume "$RUN")
elif [ -f "$CARRIED/state.part-00" ]; then
  echo "== continuing the carried run $CARRIED"
  mkdir -p "$RUN"
  tar -C "$RUN" -xzf "$CARRIED/meta.tgz"
  cat "$CARRIED"/state.part-* > "$RUN/train_state.safetensors"
  resume=(--resume "$RUN")
else
  echo "== starting $RUN"
  rm -rf "$RUN"
fi
"$Q" "${tf32[@]}" train --data "$DATA" --config "$CONFIG" --out "$RUN" "${resume[@]}" \
  --steps 1000000 --batch "${BATCH:-256}" --lr "${LR:-1e-3}" --save-every 1000 \
  --max-seconds "${SECONDS_BUDGET:-480}" --device cuda 2>&1 | grep -v '^\[train' || true
tail -1 "$RUN/train_log.csv"
mkdir -p "$OUT/run"
# Few files come back from the GPU machine: the small ones travel as one archive.
tar -C "$RUN" -czf "$OUT/run/meta.tgz" config.json scheduler_config.json train_log.csv
cp "$RUN"/diffusion_pytorch_model.safetensors "$OUT/run/"
split -b 15000000 -d "$RUN/train_state.safetensors" "$OUT/run/state.part-"
"$Q" sample --model "$RUN" --sampler qt-3 --steps 10 --classes all --guidance "${GUIDANCE:-2}" \
  --seed 0 --device cuda --out "$OUT/grid-qt3-w${GUIDANCE:-2}.png" || true
ls -la "$OUT/run"
