#!/usr/bin/env bash
# The convolution-path variants of BENCHMARKS.md §4.2 in one command on the GPU machine (run
# from the repository root with dist/cuda/qtaylor built by `scripts/build-cuda.sh --cudnn`):
# CIFAR-10 DDPM architecture (random weights), batch ${BATCH:-256}, one forward and a 10-NFE
# qt-3 sample, for
#   - qtaylor's cached-plan cuDNN path: f32 exact / f32 TF32 / bf16 / f16, algorithm by its
#     default (auto), cuDNN's legacy heuristic, measurement (find) and the graph API;
#   - candle's own cuDNN conv2d (QTAYLOR_CONV=candle), the previous path;
#   - PyTorch eager f32 (TF32 convolutions on = its default, and off), bf16.
# Also: a per-operation profile (GPU time between CUDA events), the chosen plans and every
# candidate's time (QTAYLOR_CONV_LOG), 40 training steps with either path. Prints one line per
# variant at the end; the logs go to $OUT/conv-logs.tgz.
set -uo pipefail
: "${OUT:=/tmp/qtaylor-conv}"
echo "### device"
. "$(dirname "$0")/gpu-env.sh"
WORK=${WORK:-/tmp/qtaylor-gpu}
LOG=$WORK/conv-logs
BATCH=${BATCH:-256}
DEV=${DEV:-cuda}
mkdir -p "$WORK" "$LOG"
fail=0

[ -d "$WORK/cifar10" ] || "$Q" init-model --preset cifar10-ddpm --out "$WORK/cifar10" || fail=1
summary=()
q() {  # name, env..., -- speed args...
  local name=$1; shift
  local envs=(); while [ "$1" != -- ]; do envs+=("$1"); shift; done; shift
  env "${envs[@]}" "$Q" speed --model "$WORK/cifar10" --device $DEV --batch "$BATCH" --repeats 5 \
    --sampler qt-3 --steps 10 "$@" > "$LOG/$name.txt" 2> "$LOG/$name.err" || { fail=1; tail -3 "$LOG/$name.err"; }
  summary+=("$(printf '%-28s %s | %s' "$name" "$(grep -o 'forward: [0-9.]* s' "$LOG/$name.txt")" "$(grep -o '^sample.*images/s' "$LOG/$name.txt" | sed 's/.*: //')")")
}
t() {
  local name=$1; shift
  "$PY" scripts/torch_unet.py --model "$WORK/cifar10" --device $DEV --batch "$BATCH" --repeats 5 --steps 10 "$@" > "$LOG/$name.txt" 2>&1 || { fail=1; tail -3 "$LOG/$name.txt"; }
  summary+=("$(printf '%-28s %s | %s' "$name" "$(grep -o 'forward: [0-9.]* s' "$LOG/$name.txt")" "$(grep -o '^sample.*images/s' "$LOG/$name.txt" | sed 's/.*: //')")")
}
echo "### speed variants"
q qt-f32-candle QTAYLOR_CONV=candle -- --model-dtype f32
q qt-bf16-candle QTAYLOR_CONV=candle -- --model-dtype bf16
q qt-f32-auto QTAYLOR_CONV_LOG=1 -- --model-dtype f32
q qt-f32-heuristic QTAYLOR_CONV_LOG=1 QTAYLOR_CUDNN_ALGO=heuristic -- --model-dtype f32
q qt-tf32-auto QTAYLOR_CONV_LOG=1 -- --model-dtype f32 --tf32
q qt-tf32-find QTAYLOR_CONV_LOG=1 QTAYLOR_CUDNN_ALGO=find -- --model-dtype f32 --tf32
q qt-tf32-graph QTAYLOR_CONV_LOG=1 QTAYLOR_CUDNN_ALGO=graph -- --model-dtype f32 --tf32
q qt-bf16-auto QTAYLOR_CONV_LOG=1 -- --model-dtype bf16
q qt-bf16-find QTAYLOR_CONV_LOG=1 QTAYLOR_CUDNN_ALGO=find -- --model-dtype bf16
q qt-bf16-graph QTAYLOR_CONV_LOG=1 QTAYLOR_CUDNN_ALGO=graph -- --model-dtype bf16
q qt-bf16-auto-1x1cudnn QTAYLOR_CONV1X1=cudnn -- --model-dtype bf16
q qt-f16-auto QTAYLOR_CONV_LOG=1 -- --model-dtype f16
t torch-f32-tf32 --dtype f32 --tf32 on
t torch-f32-exact --dtype f32 --tf32 off
t torch-bf16 --dtype bf16
t torch-f16 --dtype f16
echo "### profiles (GPU time per operation, 5 forwards after a warm-up)"
for v in "f32:" "f32:--tf32" "bf16:" "bf16::cudnn"; do
  IFS=: read -r d flag one <<<"$v"
  QTAYLOR_CONV1X1=$one QTAYLOR_PROFILE=1 "$Q" speed --model "$WORK/cifar10" --device $DEV --batch "$BATCH" --repeats 5 --sampler none --model-dtype "$d" $flag > "$LOG/profile-$d$flag$one.txt" 2>&1 || fail=1
  echo "$d $flag ${one:+(1x1 convolutions through cuDNN)}:"; grep -A12 '^profile' "$LOG/profile-$d$flag$one.txt" | tail -n +2
done
for d in f32 bf16; do
  "$PY" scripts/torch_unet.py --model "$WORK/cifar10" --device $DEV --batch "$BATCH" --repeats 3 --dtype $d --profile > "$LOG/profile-torch-$d.txt" 2>&1
done
if [ -d "${DATA:-data/mnist-gz}" ]; then
  echo "### training, 40 steps of batch 256 on MNIST (wall time with start-up)"
  for v in candle cudnn; do
    t0=$(date +%s.%N)
    QTAYLOR_CONV=$v "$Q" train --data "${DATA:-data/mnist-gz}" --out "$WORK/train-$v" --steps 40 --batch 256 --device $DEV > "$LOG/train-$v.txt" 2>&1 || { fail=1; tail -3 "$LOG/train-$v.txt"; }
    echo "  QTAYLOR_CONV=$v: $("$PY" -c "print(round($(date +%s.%N) - $t0, 1))") s"
  done
fi
echo "### summary (batch $BATCH; forward | 10-NFE sample)"
printf '%s\n' "${summary[@]}"
tar czf "$OUT/conv-logs.tgz" -C "$WORK" conv-logs
exit $fail
