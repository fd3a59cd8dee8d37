#!/usr/bin/env bash
# Issue 32's flow-matching MNIST model on the GPU machine (run from the repository root with
# dist/cuda/qtaylor[.xz] from `scripts/build-cuda.sh --cudnn` and the MNIST IDX files in $DATA):
#   PART=train  trains the class-conditional UNet of configs/mnist-class-cond.json with the
#               flow-matching objective (velocity target, logit-normal σ as SD3) for
#               $SECONDS_BUDGET seconds into $RUN, and writes $OUT/run/ (the EMA weights,
#               meta.tgz with config.json, scheduler_config.json, train_log.csv) and a guided
#               grid at 10 NFE;
#   PART=eval   MNIST-feature FID and the confident fraction at n = $N for every sampler family
#               at $NFES, unguided (w = 1, the conditional model) and with guidance $W, on the default grid
#               (Flux's: uniform in the unshifted time to 0) and on tuned grids (qtaylor tune for
#               $TUNED at $TUNE_NFES), and the converged value (unipc-3 at 100 NFE). The model is
#               $RUN (kept on a warm machine) or $CARRIED (the weights and meta.tgz carried back).
# Env (eval): N (10000), SAMPLERS, NFES (4,5,6,8,10,20), TUNED (unipc-3), TUNE_NFES (5,10), TUNE (1;
# 0: take the grids of $GRIDS_IN), WS ("1 2"), CONVERGED_NFE (100), MAX_SECONDS per eval run.
# Writes under $OUT: results-*.csv/json, report-*.md, eval-*.log, tune.log, grids/*.json.
set -euo pipefail
: "${OUT:=/tmp/qtaylor-flow}"
. "$(dirname "$0")/gpu-env.sh"
DATA=${DATA:-data/mnist-gz}
RUN=${RUN:-runs/mnist-flow}
CARRIED=${CARRIED:-carried/mnist-flow}
PART=${PART:-train}
DEV=${DEV:-cuda}  # DEV=cpu: a dry run of the whole script on the CPU machine
tf32=(); [ "$DEV" = cuda ] && tf32=(--tf32)
if [ "$PART" = train ]; then
  rm -rf "$RUN"
  "$Q" "${tf32[@]}" train --data "$DATA" --config configs/mnist-class-cond.json --objective flow \
    --sigma-sampling logit-normal --out "$RUN" --steps 1000000 --batch "${BATCH:-256}" --lr "${LR:-1e-3}" \
    --save-every 1000 --max-seconds "${SECONDS_BUDGET:-330}" --device "$DEV" 2>&1 | grep -v '^\[train' || true
  tail -1 "$RUN/train_log.csv"
  mkdir -p "$OUT/run"
  tar -C "$RUN" -czf "$OUT/run/meta.tgz" config.json scheduler_config.json train_log.csv
  cp "$RUN"/diffusion_pytorch_model.safetensors "$OUT/run/"
  "$Q" sample --model "$RUN" --sampler unipc-3 --steps 10 --classes all --guidance 2 --seed 0 \
    --device "$DEV" --out "$OUT/grid-unipc3-w2-nfe10.png" || true
  exit 0
fi
MODEL=$RUN
if [ ! -f "$MODEL/diffusion_pytorch_model.safetensors" ]; then
  MODEL=$CARRIED
  [ -f "$MODEL/config.json" ] || tar -C "$MODEL" -xzf "$MODEL/meta.tgz"
fi
N=${N:-10000}
SAMPLERS=${SAMPLERS:-ddim,qt-2,dpmpp-3m,unipc-3,ddpm}
NFES=${NFES:-4,5,6,8,10,20}
mkdir -p "$OUT/grids"
[ -n "${GRIDS_IN:-}" ] && cp "$GRIDS_IN"/*.json "$OUT/grids/" 2>/dev/null || true
TUNED=${TUNED:-unipc-3}
TUNE_NFES=${TUNE_NFES:-5,10}
[ "${TUNE:-1}" = 1 ] || TUNED=""  # TUNE=0: use the grids in $GRIDS_IN
for s in ${TUNED//,/ }; do
  for n in ${TUNE_NFES//,/ }; do
    "$Q" tune --model "$MODEL" --sampler "$s" --nfe "$n" --device "$DEV" ${TUNE_ARGS:-} --out "$OUT/grids/$s-$n.json" \
      2>/dev/null | tee -a "$OUT/tune.log" | grep -E "held-out|tuning time" || true
  done
done
eval_run() { # name [extra args]
  local name=$1; shift
  "$Q" "${tf32[@]}" eval --model "$MODEL" --data "$DATA" --n "$N" --batch "${EVAL_BATCH:-2000}" --seed 0 --device "$DEV" \
    --reference-steps 0 --max-seconds "${MAX_SECONDS:-100000}" --out "/tmp/eval-$name" "$@" > "$OUT/eval-$name.md" 2> "$OUT/eval-$name.log" \
    || { tail -5 "$OUT/eval-$name.log"; return 0; }
  cp "/tmp/eval-$name/results.json" "$OUT/results-$name.json"
  cp "/tmp/eval-$name/results.csv" "$OUT/results-$name.csv"
  cp "/tmp/eval-$name/report.md" "$OUT/report-$name.md"
  grep '^eval' "$OUT/eval-$name.log" | tail -3 || true
}
# w = 1: the conditional model without guidance; w = 2: classifier-free guidance
for w in ${WS:-1 2}; do
  eval_run "w$w" --samplers "$SAMPLERS" --nfe "$NFES" --grids default,tuned --grid-dir "$OUT/grids" --guidance "$w"
  eval_run "w$w-converged" --samplers unipc-3 --nfe "${CONVERGED_NFE:-100}" --guidance "$w"
done
