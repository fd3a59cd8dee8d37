#!/usr/bin/env bash
# Issue 13's table on the GPU machine (run from the repository root with dist/cuda/qtaylor[.gz]
# from scripts/build-cuda.sh and the MNIST IDX files in $DATA):
#   PART=tune   tunes a grid per sampler x NFE (qtaylor tune, tuning noise from streams >= 2^40),
#               then evaluates the grids $GRIDS (default: default,tuned) at $EVAL_NFES (default $NFES);
#   PART=eval   evaluates the grids $GRIDS (default: default,karras,logsnr; tuned ones from
#               $GRID_DIR, default $OUT/grids) at $NFES;
#   PART=grids  evaluates the default, karras and logsnr grids, and FID_inf: unipc-3 at 100 and 200 NFE
#               (the converged probability-flow ODE).
# MNIST-feature FID at n = $N (default 10000) samples from seeds 0..n (streams disjoint from
# tuning). Env MAX_SECONDS: start no new eval row after that long (DEADLINE: after that epoch second). Writes under $OUT: grids/*.json, tune.log, results-*.json/csv, report-*.md, eval-*.log.
set -euo pipefail
OUT=${OUT:-/tmp/qtaylor-grids}
DATA=${DATA:-data/mnist-gz}
N=${N:-10000}
PART=${PART:-tune}
SAMPLERS=${SAMPLERS:-qt-2,qt-3,ddim,unipc-3,dpmpp-3m,ipndm,deis-3}
NFES=${NFES:-4,5,6,8,10}
. "$(dirname "$0")/gpu-env.sh"
mkdir -p "$OUT/grids"
eval_run() { # name grids [extra args]
  local name=$1 grids=$2; shift 2
  local gd=()
  [[ $grids == *tuned* ]] && gd=(--grid-dir "${GRID_DIR:-$OUT/grids}")
  local ms=${MAX_SECONDS:-100000}
  [ -n "${DEADLINE:-}" ] && ms=$(( DEADLINE - $(date +%s) ))
  (( ms < 1 )) && ms=1
  "$Q" eval --model assets/mnist-unet --data "$DATA" --samplers "$SAMPLERS" --nfe "$NFES" \
    --grids "$grids" "${gd[@]}" --n "$N" --batch 2000 --seed 0 --device cuda \
    --reference-steps 0 --grid-nfe 10 --max-seconds "$ms" --out "/tmp/eval-$name" "$@" \
    > "$OUT/eval-$name.md" 2> "$OUT/eval-$name.log" || { tail -5 "$OUT/eval-$name.log"; return 1; }
  cp "/tmp/eval-$name/results.json" "$OUT/results-$name.json"
  cp "/tmp/eval-$name/results.csv" "$OUT/results-$name.csv"
  cp "/tmp/eval-$name/report.md" "$OUT/report-$name.md"
  grep -v "^|" "$OUT/eval-$name.log" | tail -3
}
if [ "$PART" = tune ]; then
  start=$(date +%s)
  for s in ${SAMPLERS//,/ }; do
    for n in ${NFES//,/ }; do
      "$Q" tune --model assets/mnist-unet --sampler "$s" --nfe "$n" --device cuda --out "$OUT/grids/$s-$n.json" \
        2>/dev/null | tee -a "$OUT/tune.log" | grep -E "held-out|tuning time"
    done
  done
  echo "all tunes: $(( $(date +%s) - start )) s" | tee -a "$OUT/tune.log"
  NFES=${EVAL_NFES:-$NFES} eval_run tuned "${GRIDS:-default,tuned}"
elif [ "$PART" = eval ]; then
  eval_run "${NAME:-eval}" "${GRIDS:-default,karras,logsnr}"
else
  eval_run grids default,karras,logsnr
  SAMPLERS=unipc-3 NFES=100,200 eval_run inf default
fi
