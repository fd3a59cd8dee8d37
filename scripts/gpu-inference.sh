#!/usr/bin/env bash
# Issue 16's side-by-side run on the GPU machine (from the repository root, with
# dist/cuda/qtaylor[.xz] from scripts/build-cuda.sh --cudnn and dist/wheels from
# scripts/fetch-diffusers-wheels.sh): qtaylor against diffusers' own UNet2DModel in PyTorch's
# strongest variants (scripts/torch_diffusers_bench.py: eager NCHW / channels_last with
# cudnn.benchmark, torch.compile max-autotune-no-cudagraphs and max-autotune), on the same
# weights (the CIFAR-10 DDPM architecture from `qtaylor init-model`).
#   PART=graphs   CUDA-graph replay (QTAYLOR_CUDA_GRAPH=on) against plain passes: samples
#                 bit for bit equal (fixture UNet f32, CIFAR-10 architecture bf16, the
#                 class-conditional default with guidance)
#   PART=qtaylor  qtaylor speed, batches $BATCHES in bf16 with graphs off and on; TF32 and
#                 exact f32 at batch 256
#   PART=torch    the PyTorch variants: bf16 at $BATCHES, TF32 and exact f32 at 256
#   PART=all      (default) all three
# Env: WORK (default /tmp/qtaylor-inf), OUT (results), DEADLINE (epoch s: PyTorch variants
# that would start later are skipped), TORCH_BATCHES (default $BATCHES), TORCH_VARIANTS.
# Compile times on the H200 machine (16 cores): max-autotune-no-cudagraphs took 478 s at
# batch 256 in bf16, so the whole PyTorch matrix (10 compiled variants) needs more device time
# than one 30-minute session: split it with TORCH_BATCHES / TORCH_VARIANTS.
set -uo pipefail
WORK=${WORK:-/tmp/qtaylor-inf}
: "${OUT:=$WORK}"
PART=${PART:-all}
BATCHES=${BATCHES:-1,8,64,256}
. "$(dirname "$0")/gpu-env.sh"
mkdir -p "$WORK"
fail=0
say() { echo; echo "### $*"; }
[ -d "$WORK/cifar10" ] || "$Q" init-model --preset cifar10-ddpm --out "$WORK/cifar10" >/dev/null || exit 1

if [ "$PART" = all ] || [ "$PART" = graphs ]; then
  say "CUDA graphs: replayed samples equal plain ones bit for bit"
  for g in off on; do
    QTAYLOR_CUDA_GRAPH=$g "$Q" sample --model tests/fixtures/unet2d/multihead --sampler unipc-3 --steps 8 --batch 8 \
      --device cuda --out "$WORK/fix-$g.png" --save-npy "$WORK/fix-$g.npy" 2>/dev/null || fail=1
    QTAYLOR_CUDA_GRAPH=$g "$Q" sample --model "$WORK/cifar10" --model-dtype bf16 --sampler qt-3 --steps 10 --batch 16 \
      --device cuda --out "$WORK/cif-$g.png" --save-npy "$WORK/cif-$g.npy" 2>/dev/null || fail=1
    QTAYLOR_CUDA_GRAPH=$g "$Q" sample --sampler qt-3 --steps 10 --classes all --guidance 2 \
      --device cuda --out "$WORK/cond-$g.png" --save-npy "$WORK/cond-$g.npy" 2>/dev/null || fail=1
  done
  "$PY" - "$WORK" <<'EOF' || fail=1
import sys, numpy as np
d = sys.argv[1]
bad = 0
for name in ["fix", "cif", "cond"]:
    try:
        a, b = np.load(f"{d}/{name}-off.npy"), np.load(f"{d}/{name}-on.npy")
    except Exception as e:
        print(f"  {name}: missing output ({e})"); bad = 1; continue
    same = a.shape == b.shape and np.array_equal(a, b)
    print(f"  {name} {a.shape}: graph replay {'bit-identical' if same else 'DIFFERS, max abs %.2e' % np.abs(a - b).max()}")
    bad |= not same
sys.exit(bad)
EOF
fi

speed() { # label env... -- args
  local label=$1; shift
  echo "qtaylor $label:"
  env "$@" 2>&1 | grep -E "^(forward|  host|sample|  per step|peak device|CUDA)|error" | sed 's/^/  /' || fail=1
}
if [ "$PART" = all ] || [ "$PART" = qtaylor ]; then
  say "qtaylor speed, CIFAR-10 DDPM architecture (35.7 M parameters)"
  for b in ${BATCHES//,/ }; do
    r=10; (( b <= 8 )) && r=30
    for g in off on; do
      speed "bf16 batch $b graphs $g" QTAYLOR_CUDA_GRAPH=$g "$Q" speed --model "$WORK/cifar10" --device cuda \
        --model-dtype bf16 --batch "$b" --repeats $r --sampler qt-3 --steps 10
    done
  done
  for v in "TF32:--tf32" "exact f32:"; do
    IFS=: read -r name flag <<<"$v"
    for g in off on; do
      speed "$name batch 256 graphs $g" QTAYLOR_CUDA_GRAPH=$g "$Q" speed --model "$WORK/cifar10" --device cuda \
        --model-dtype f32 $flag --batch 256 --repeats 10 --sampler qt-3 --steps 10
    done
  done
fi

if [ "$PART" = all ] || [ "$PART" = torch ]; then
  say "PyTorch: diffusers UNet2DModel, same weights"
  rm -rf /tmp/pydeps && mkdir -p /tmp/pydeps
  "$PY" -c 'import glob, sys, zipfile
for w in sorted(glob.glob("dist/wheels/*.whl")): zipfile.ZipFile(w).extractall("/tmp/pydeps")' || exit 1
  export PYTHONPATH=/tmp/pydeps TORCHINDUCTOR_CACHE_DIR=$WORK/inductor
  tb=${TORCH_BATCHES:-$BATCHES}
  "$PY" scripts/torch_diffusers_bench.py --model "$WORK/cifar10" --dtype bf16 --batches "$tb" --variants "${TORCH_VARIANTS:-eager,eager-cl,compile-nocg,compile}" --json "$OUT/torch-bf16.json" 2>"$OUT/torch-bf16.log" | tee "$OUT/torch-bf16.out"; [ "${PIPESTATUS[0]}" = 0 ] || { tail -20 "$OUT/torch-bf16.log"; fail=1; }
  "$PY" scripts/torch_diffusers_bench.py --model "$WORK/cifar10" --dtype tf32 --batches 256 --json "$OUT/torch-tf32.json" 2>"$OUT/torch-tf32.log" | tee "$OUT/torch-tf32.out"; [ "${PIPESTATUS[0]}" = 0 ] || { tail -20 "$OUT/torch-tf32.log"; fail=1; }
  "$PY" scripts/torch_diffusers_bench.py --model "$WORK/cifar10" --dtype f32 --batches 256 --variants eager,eager-cl --json "$OUT/torch-f32.json" 2>"$OUT/torch-f32.log" | tee "$OUT/torch-f32.out"; [ "${PIPESTATUS[0]}" = 0 ] || { tail -20 "$OUT/torch-f32.log"; fail=1; }
fi
say "result"
[ $fail = 0 ] && echo "all steps ran" || echo "SOME STEPS FAILED"
exit $fail
