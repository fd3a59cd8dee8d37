#!/usr/bin/env bash
# Issue 33 on the GPU machine: grids tuned for a distribution objective, judged by MNIST-feature
# FID at n = $N (default 10000) samples from seeds 0..n (noise streams disjoint from tuning).
# Run from the repository root with dist/cuda/qtaylor[.xz] (scripts/build-cuda.sh) and the MNIST
# IDX files in $DATA. Env:
#   MODEL (default assets/mnist-unet), OBJECTIVES (default "fd kid"), CELLS (sampler:nfe list, in
#   the order they are done), SAMPLES/HOLDOUT/CANDIDATES (tuning), BASELINE (sampler:nfe cells
#   whose default-grid row is rerun first), EXTRA (more tune flags, e.g. "--classes all
#   --guidance 2"), EVAL_EXTRA (more eval flags, e.g. "--guidance 2"), DEADLINE (epoch second:
#   no new tune or row after it), DEVICE (default cuda; cpu for a dry run with Q=target/release/qtaylor),
#   TEACHER (default dpmpp-3m:100).
# Each cell: tune, then at once its tuned row, so a cut run still has whole cells. Writes under
# $OUT: grids-<objective>/<sampler>-<nfe>.json, tune-<objective>.log, eval-*.log/.md, rows-*.csv.
set -euo pipefail
OUT=${OUT:-/tmp/qtaylor-tune33}
DATA=${DATA:-data/mnist-gz}
MODEL=${MODEL:-assets/mnist-unet}
N=${N:-10000}
OBJECTIVES=${OBJECTIVES:-fd kid}
CELLS=${CELLS:-unipc-3:5 dpmpp-3m:5 unipc-3:4 unipc-3:6 dpmpp-3m:6 ipndm:5 dpmpp-3m:4 ipndm:10}
BASELINE=${BASELINE:-unipc-3:5}
SAMPLES=${SAMPLES:-512}
HOLDOUT=${HOLDOUT:-512}
CANDIDATES=${CANDIDATES:-24}
DEVICE=${DEVICE:-cuda}
TEACHER=${TEACHER:-dpmpp-3m:100}
DEADLINE=${DEADLINE:-$(( $(date +%s) + 100000 ))}
. "$(dirname "$0")/gpu-env.sh"
left() { echo $(( DEADLINE - $(date +%s) )); }
row() { # name sampler nfe grids [grid-dir]
  local name=$1 s=$2 n=$3 grids=$4 gd=()
  [ -n "${5:-}" ] && gd=(--grid-dir "$5")
  (( $(left) > 25 )) || { echo "deadline: row $name not run"; return 0; }
  # shellcheck disable=SC2086
  "$Q" eval --model "$MODEL" --data "$DATA" --samplers "$s" --nfe "$n" --grids "$grids" "${gd[@]}" \
    --n "$N" --batch 2000 --seed 0 --device "$DEVICE" --reference-steps 0 --grid-nfe 10 \
    --max-seconds "$(left)" --out "/tmp/eval-$name" ${EVAL_EXTRA:-} \
    > "$OUT/eval-$name.md" 2> "$OUT/eval-$name.log" || { tail -3 "$OUT/eval-$name.log"; return 0; }
  grep "^eval:" "$OUT/eval-$name.log" | tail -2
  tail -n +2 "/tmp/eval-$name/results.csv" | sed "s/^/$name,/" >> "$OUT/rows.csv"
}
for c in $BASELINE; do row "default-${c/:/-}" "${c%%:*}" "${c##*:}" default; done
for obj in $OBJECTIVES; do
  mkdir -p "$OUT/grids-$obj"
  for c in $CELLS; do
    s=${c%%:*}; n=${c##*:}
    (( $(left) > 60 )) || { echo "deadline: $obj $c not tuned"; continue; }
    # shellcheck disable=SC2086
    "$Q" tune --model "$MODEL" --sampler "$s" --nfe "$n" --device "$DEVICE" --objective "$obj" --teacher "$TEACHER" \
      --samples "$SAMPLES" --holdout "$HOLDOUT" --candidates "$CANDIDATES" ${EXTRA:-} \
      --out "$OUT/grids-$obj/$s-$n.json" 2> "$OUT/tune-$obj-$s-$n.err" | tee -a "$OUT/tune-$obj.log" \
      | grep -E "held-out|tuning time" || { tail -3 "$OUT/tune-$obj-$s-$n.err"; continue; }
    row "$obj-$s-$n" "$s" "$n" tuned "$OUT/grids-$obj"
  done
done
echo "done, $(left) s before the deadline"
