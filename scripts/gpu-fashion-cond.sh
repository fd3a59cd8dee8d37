#!/usr/bin/env bash
# The class-conditional Fashion-MNIST UNet on the GPU machine, in one command of under 10
# minutes: one training chunk (scripts/gpu-train-cond.sh, the MNIST model's config and
# recipe on data/fashion-mnist), then `qtaylor eval --guidance W` of the result against the
# Fashion-MNIST test split with the project's Fashion-MNIST classifier
# (scripts/gpu-eval-guidance.sh). Run from the repository root with dist/cuda/qtaylor[.xz]
# and the Fashion-MNIST IDX files in data/fashion-mnist, or xz-compressed in data/fashion-xz
# (the device carries 64 MiB: xz packs the training images into 22 MB, gzip into 26 MB).
# Writes under $OUT: diffusion_pytorch_model.safetensors (f32), state.part-* (the training
# state, `cat state.part-* > train_state.safetensors`), fashion.tgz (train.log, meta.tgz with
# config, scheduler config and train_log.csv, the guided grid, the eval reports and log).
# Env: SECONDS_BUDGET (training, 400), WS (guidance scales, "1 2"), SAMPLERS
#      (qt-3,ddim,dpmpp-2m,unipc-3), NFES (10), N (10000), EVAL_SECONDS (per W, 60).
set -uo pipefail
: "${OUT:=/tmp/qtaylor-fashion}"
. "$(dirname "$0")/gpu-env.sh"
export Q
fail=0
mkdir -p data/fashion-mnist
for f in data/fashion-xz/*.xz; do
  [ -f "$f" ] || continue
  b=data/fashion-mnist/$(basename "$f" .xz)
  [ -f "$b" ] || "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$b"
done
W=$(mktemp -d)
OUT=$W/train DATA=data/fashion-mnist RUN=runs/fashion-cond CARRIED=${CARRIED:-carried/fashion-cond} \
  SECONDS_BUDGET=${SECONDS_BUDGET:-400} bash "$(dirname "$0")/gpu-train-cond.sh" > "$W/train.log" 2>&1 || fail=1
tail -3 "$W/train.log"
mv "$W"/train/run/diffusion_pytorch_model.safetensors "$W"/train/run/state.part-* "$OUT/" || fail=1
OUT=$W/eval MODEL=runs/fashion-cond DATA=fashion-mnist WS=${WS:-1 2} NFES=${NFES:-10} N=${N:-10000} \
  BATCH=5000 SAMPLERS=${SAMPLERS:-qt-3,ddim,dpmpp-2m,unipc-3} SECONDS_EACH=${EVAL_SECONDS:-60} \
  bash "$(dirname "$0")/gpu-eval-guidance.sh" || fail=1
(cd "$W" && tar czf "$OUT/fashion.tgz" train.log train/run/meta.tgz train/*.png eval) || fail=1
exit $fail
