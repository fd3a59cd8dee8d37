#!/usr/bin/env bash
# Everything the GPU issue measures, in one command on the GPU machine (run from the repository
# root, with dist/cuda/qtaylor built by scripts/build-cuda.sh). Prints a short report; writes
# its files under ${WORK:-/tmp/qtaylor-gpu}.
#   1. device and versions
#   2. correctness: UNet parity fixtures on the GPU (f32, f16, bf16) against diffusers'
#      outputs; the same sampler run on GPU and CPU (exact-score GMM in f64, fixture UNet in f32)
#   3. throughput on the CIFAR-10 DDPM architecture (random weights written by
#      `qtaylor init-model`), batch 256: one forward and a 10-NFE qt-3 sample, qtaylor candle-CUDA
#      f32 / f32 with --tf32 / bf16 vs PyTorch eager f32 with TF32 convolutions off / on (its
#      default) / bf16 (scripts/torch_unet.py) on the same weights
#   4. memory: peak device memory of each run (nvidia-smi, 50 ms polling) and torch's
#      max_memory_allocated
set -uo pipefail
WORK=${WORK:-/tmp/qtaylor-gpu}
: "${OUT:=$WORK}"
BATCH=${BATCH:-256}
DEV=${DEV:-cuda}   # DEV=cpu BATCH=2 Q=target/release/qtaylor dry-runs the logic without a GPU
echo; echo "### device"
. "$(dirname "$0")/gpu-env.sh"   # LD_LIBRARY_PATH, Q, PY; prints the card
mkdir -p "$WORK"
fail=0
say() { echo; echo "### $*"; }

"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
ldd "$Q" | grep -E 'libcuda|libcublas\.' | sed 's/^/  /'

say "parity on the GPU (max relative error to diffusers)"
for f in tests/fixtures/unet2d/*/; do
  for dt in f32:1e-4: f32:1e-2:--tf32 f16:1e-2: bf16:5e-2:; do
    IFS=: read -r d tol flag <<<"$dt"
    "$Q" parity --model "$f" --device $DEV --model-dtype "$d" --tol "$tol" $flag | sed "s/^/  $flag /" || fail=1
  done
done

say "parity of the non-default GPU paths (largest relative error per setting)"
for v in "QTAYLOR_CONV=candle:f32:1e-3:" "QTAYLOR_CONV=candle:bf16:5e-2:" "QTAYLOR_CUDNN_ALGO=heuristic:f32:1e-4:" \
         "QTAYLOR_CUDNN_ALGO=graph-find:bf16:5e-2:" "QTAYLOR_UPSAMPLE=transposed:f32:1e-2:--tf32" \
         "QTAYLOR_UPSAMPLE=nearest:f16:1e-2:" "QTAYLOR_DOWNSAMPLE=pad:f32:1e-4:" "QTAYLOR_LAYOUT=nchw:bf16:5e-2:" \
         "QTAYLOR_LAYOUT=nchw:f16:1e-2:" "QTAYLOR_LAYOUT=nhwc:f32:1e-4:" "QTAYLOR_LAYOUT=nhwc:f32:1e-2:--tf32"; do
  IFS=: read -r e d tol flag <<<"$v"
  worst=0
  for f in tests/fixtures/unet2d/*/; do
    r=$(env "$e" "$Q" parity --model "$f" --device $DEV --model-dtype "$d" --tol "$tol" $flag 2>&1) || { fail=1; echo "$r" | tail -2; }
    worst=$(echo "$r" | grep -o 'max relative error [0-9.e+-]*' | awk -v w="$worst" '{ if ($4 + 0 > w + 0) w = $4 } END { print w }')
  done
  echo "  $e $d $flag: $worst (tolerance $tol)"
done

say "the same run on GPU and CPU"
for dev in cpu $DEV; do
  "$Q" sample --problem gmm-demo --sampler dpmpp-3m --steps 12 --grid logsnr --batch 64 --dtype f64 --device $dev --out "$WORK/gmm-$dev.npy" 2>/dev/null || fail=1
  "$Q" sample --model tests/fixtures/unet2d/multihead --sampler unipc-3 --steps 8 --batch 8 --device $dev --out "$WORK/fix-$dev.png" --save-npy "$WORK/fix-$dev.npy" 2>/dev/null || fail=1
  "$Q" sample --problem gmm-demo --sampler qit-2 --steps 12 --batch 64 --dtype f64 --device $dev --out "$WORK/sde-$dev.npy" 2>/dev/null || fail=1
done
"$PY" -c "import numpy as np; np.save('$WORK/points.npy', np.random.default_rng(0).uniform(-1, 1, (2000, 64)))"
for dev in cpu $DEV; do
  "$Q" sample --problem "empirical:$WORK/points.npy" --sampler unipc-2 --steps 10 --grid logsnr --batch 32 --dtype f64 --device $dev --out "$WORK/emp-$dev.npy" 2>/dev/null || fail=1
done
"$PY" - "$WORK" "$DEV" <<'EOF' || fail=1
import sys, numpy as np
d = sys.argv[1]
for name, tol in [("gmm", 1e-10), ("sde", 1e-10), ("emp", 1e-8), ("fix", 1e-4)]:
    a, b = np.load(f"{d}/{name}-cpu.npy"), np.load(f"{d}/{name}-{sys.argv[2]}.npy")
    e = np.abs(a - b).max() / np.abs(a).max()
    print(f"  {name}: GPU vs CPU max relative difference {e:.2e} (tolerance {tol:.0e}) {'ok' if e <= tol else 'FAIL'}")
    if e > tol:
        sys.exit(1)
EOF

say "no GPU visible: a clear error, no crash"
CUDA_VISIBLE_DEVICES= "$Q" sample --problem gmm-demo --sampler ddim --steps 2 --device $DEV --out "$WORK/none.npy" 2>&1 | sed 's/^/  /'
[ -e "$WORK/none.npy" ] && { echo "  wrote output without a device"; [ "$DEV" = cuda ] && fail=1; }

say "bench on the GPU (exact-score problems computed there)"
"$Q" bench --problem gmm-demo --samplers qt-3,dpmpp-2m,unipc-3 --nfe 10,20 --batch 256 --grid logsnr --device $DEV --out "$WORK/bench-gmm" | grep -E '^\| (qt-3|dpmpp-2m|unipc-3) ' | head -3 | sed 's/^/  /' || fail=1
"$Q" bench --problem "empirical:$WORK/points.npy" --samplers ddim,dpmpp-2m --nfe 10 --grid logsnr --batch 64 --device $DEV --out "$WORK/bench-emp" | grep -E '^\| (ddim|dpmpp-2m) ' | head -2 | sed 's/^/  /' || fail=1

say "throughput and memory, CIFAR-10 DDPM architecture, batch $BATCH"
[ -d "$WORK/cifar10" ] || "$Q" init-model --preset cifar10-ddpm --out "$WORK/cifar10" || fail=1
peak() {  # peak nvidia-smi memory.used (MiB) while "$@" runs, minus the idle level
  local idle; idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 50 > "$WORK/mem.log" &
  local pid=$!
  "$@"
  local rc=$?
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  echo "  peak device memory (nvidia-smi, above idle): $(( $(sort -n "$WORK/mem.log" | tail -1) - idle )) MiB"
  return $rc
}
# Like for like: exact f32 against PyTorch with TF32 convolutions off; --tf32 against PyTorch's
# default (TF32 convolutions on); bf16 against bf16.
for v in "f32::off" "f32:--tf32:on" "bf16::default"; do
  IFS=: read -r dt flag tf <<<"$v"
  echo "qtaylor candle-CUDA $dt $flag:"
  peak "$Q" speed --model "$WORK/cifar10" --device $DEV --model-dtype $dt $flag --batch "$BATCH" --repeats 5 --sampler qt-3 --steps 10 | sed 's/^/  /' || fail=1
  echo "PyTorch eager $dt (TF32 convolutions: $tf):"
  peak "$PY" scripts/torch_unet.py --model "$WORK/cifar10" --device $DEV --dtype $dt --tf32 $tf --batch "$BATCH" --repeats 5 --steps 10 | sed 's/^/  /' || fail=1
done

say "result"
[ $fail = 0 ] && echo "all checks passed" || echo "SOME CHECKS FAILED"
exit $fail
