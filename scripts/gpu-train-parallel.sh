#!/usr/bin/env bash
# Data-parallel training on the GPU machine (issue 17), from the repository root with
# dist/cuda/qtaylor[.xz] from `scripts/build-cuda.sh --cudnn --nccl` and the MNIST IDX files in
# $DATA. The class-conditional MNIST UNet (configs/mnist-class-cond.json), the same seed and
# global batch in every run:
#   one      train --device cuda                   (no all-reduce: the reference)
#   nccl1    train --devices cuda:0                (the NCCL path, a communicator of one rank)
#   resumed  --devices cuda:0 to STEPS/2, then --device cuda --resume to STEPS
#   ncclK    train --devices cuda:0,...,cuda:K-1   for K = 2, 4, 8 up to the GPUs visible
# For each: the steady steps/s and the largest difference of its logged losses from `one`'s.
# Env: STEPS (300), BATCH (256), DATA (data/mnist-gz), CONFIG (configs/mnist-class-cond.json),
#      OUT (results: *.log, *.csv, summary.txt).
set -uo pipefail
: "${OUT:=/tmp/qtaylor-train-parallel}"
. "$(dirname "$0")/gpu-env.sh"
DATA=${DATA:-data/mnist-gz}
CONFIG=${CONFIG:-configs/mnist-class-cond.json}
BATCH=${BATCH:-256}
STEPS=${STEPS:-300}
W=$(mktemp -d)
export QTAYLOR_PROGRESS=off
fail=0
run() { # name, then train's flags
  local name=$1; shift
  "$Q" train --data "$DATA" --config "$CONFIG" --batch "$BATCH" --seed 0 --save-every "$STEPS" \
    --out "$W/$name" "$@" 2>>"$OUT/$name.log" || { tail -5 "$OUT/$name.log"; fail=1; return 1; }
}
run one --steps "$STEPS" --device cuda
run nccl1 --steps "$STEPS" --devices cuda:0
run resumed --steps $((STEPS / 2)) --devices cuda:0 &&
  run resumed --steps "$STEPS" --device cuda --resume "$W/resumed"
gpus=$(nvidia-smi -L | wc -l)
names="one nccl1 resumed"
for k in 2 4 8; do
  (( k <= gpus )) || break
  run "nccl$k" --steps "$STEPS" --devices "$(seq -s, -f 'cuda:%g' 0 $((k - 1)))"
  names+=" nccl$k"
done
for n in $names; do cp "$W/$n/train_log.csv" "$OUT/$n.csv" 2>/dev/null; done
"$PY" - "$OUT" $names <<'PY' | tee "$OUT/summary.txt" || fail=1
import re, sys
out, names = sys.argv[1], sys.argv[2:]
def losses(n):
    rows = open(f"{out}/{n}.csv").read().split("\n")[1:]
    return [float(r.split(",")[1]) for r in rows if r]
ref = losses("one")
bad = 0
for n in names:
    log = open(f"{out}/{n}.log").read()
    rate = re.findall(r"steady rate[^:]*: ([0-9.]+) steps/s", log)
    l = losses(n)
    d = max(abs(a - b) for a, b in zip(ref, l)) if len(l) == len(ref) else float("nan")
    rel = max(abs(a - b) / a for a, b in zip(ref, l)) if len(l) == len(ref) else float("nan")
    print(f"{n:8s} steps/s {', '.join(rate) or '-':>16s}  steps {len(l)}  loss {l[0]:.4f} -> "
          f"{sum(l[-50:]) / len(l[-50:]):.4f} (mean of last 50)  max |loss - one's| {d:.2e} (relative {rel:.2e})")
    bad |= not (len(l) == len(ref) and rel < 1e-2)
sys.exit(bad)
PY
rm -rf "$W"
[ $fail = 0 ] && echo "all runs ran" || echo "SOME RUNS FAILED"
exit $fail
