#!/usr/bin/env bash
# What classifier-free guidance does to each sampler at few NFE (BENCHMARKS.md): `qtaylor
# eval --guidance W` of a class-conditional checkpoint for each W, with the issue's samplers at
# NFE 5, 10, 20 (sample i asks for class i mod 10, so n = 10 000 gives 1 000 per class). Run
# on the GPU machine from the repository root with dist/cuda/qtaylor[.xz|.gz] and the MNIST
# IDX files in $DATA. Writes $OUT/guidance.tgz (results.csv, results.json, report.md of each
# W) and $OUT/eval-guidance.log.
# Env: MODEL (runs/mnist-cond), WS (1,2,4), N (10000), BATCH (2000), DATA (data/mnist-gz),
#      SAMPLERS (qt-1,qt-2,qt-3,ddim,dpmpp-2m,unipc-3,qit-2,ddpm), NFES (5,10,20),
#      SECONDS_EACH (max seconds per W, 300).
set -uo pipefail
: "${OUT:=/tmp/qtaylor-eval-guidance}"
. "$(dirname "$0")/gpu-env.sh"
MODEL=${MODEL:-runs/mnist-cond}
DATA=${DATA:-data/mnist-gz}
SAMPLERS=${SAMPLERS:-qt-1,qt-2,qt-3,ddim,dpmpp-2m,unipc-3,qit-2,ddpm}
W=$(mktemp -d)
fail=0
for w in ${WS:-1 2 4}; do
  "$Q" ${TF32:+--tf32} eval --model "$MODEL" --data "$DATA" --samplers "$SAMPLERS" \
    --nfe "${NFES:-5,10,20}" --n "${N:-10000}" --batch "${BATCH:-2000}" --seed 0 \
    --guidance "$w" --reference-steps 0 --device "${DEV:-cuda}" --max-seconds "${SECONDS_EACH:-300}" \
    --out "$W/w$w" 2>&1 | grep '^eval' | tee -a "$OUT/eval-guidance.log" || fail=1
done
# (grids only exist when NFES has 10)
(cd "$W" && tar czf "$OUT/guidance.tgz" w*/results.csv w*/results.json w*/report.md $(ls w*/grid-*nfe10.png 2>/dev/null)) || fail=1
exit $fail
