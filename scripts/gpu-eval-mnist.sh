#!/usr/bin/env bash
# The sample-quality table of BENCHMARKS.md in one command on the GPU machine (run from the
# repository root with dist/cuda/qtaylor from scripts/build-cuda.sh --cudnn, or
# dist/cuda/qtaylor.gz, and the MNIST IDX files in $DATA): `qtaylor eval` of the shipped model
# (assets/mnist-unet) with every fixed-step sampler at NFE 5, 10, 20, 50, 100, rk45 at three
# tolerances, and the 1000-step DDPM reference. Writes under $OUT (default /tmp/qtaylor-eval):
# results.csv, results.json, report.md, fid_vs_nfe.png, grids.tar.gz (grid PNGs), eval.log, and
# classifier-mnist.tar.gz when the classifier had to be trained first (on the GPU).
# Env: N (samples per row, default 2000), BATCH (1000), MAX_SECONDS (500), DATA (data/mnist-gz).
set -euo pipefail
OUT=${OUT:-/tmp/qtaylor-eval}
DATA=${DATA:-data/mnist-gz}
. "$(dirname "$0")/gpu-env.sh"
if [ ! -f assets/classifier-mnist/model.safetensors ]; then
  echo "== training the MNIST classifier (assets/classifier-mnist)"
  "$Q" train-classifier --data "$DATA" --out assets/classifier-mnist --device cuda
  tar czf "$OUT/classifier-mnist.tar.gz" assets/classifier-mnist
fi
"$Q" speed --model assets/mnist-unet --batch "${BATCH:-1000}" --device cuda --sampler qt-3 --steps 10
SAMPLERS=${SAMPLERS:-qt-1,qt-2,qt-3,qt-4,qit-1,qit-2,ddim,ddpm,euler,heun,rk4,rk45,dpm-solver-2,dpm-solver-3,dpmpp-2m,dpmpp-3m,unipc-2,unipc-3,deis-3,ipndm,pndm,edm-heun,em,dpmpp-2s,dpmpp-2m-sde}
set +e
"$Q" eval --model assets/mnist-unet --data "$DATA" --samplers "$SAMPLERS" --nfe 5,10,20,50,100 \
  --n "${N:-2000}" --batch "${BATCH:-1000}" --seed 0 --device cuda --max-seconds "${MAX_SECONDS:-500}" \
  --out /tmp/eval-out 2>&1 | tee "$OUT/eval.log" | grep -v "^|" 
rc=${PIPESTATUS[0]}
set -e
cp /tmp/eval-out/results.csv /tmp/eval-out/results.json /tmp/eval-out/report.md /tmp/eval-out/fid_vs_nfe.png "$OUT/" || true
(cd /tmp/eval-out && tar czf "$OUT/grids.tar.gz" grid-*.png) || true
exit "$rc"
