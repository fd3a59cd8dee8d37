#!/usr/bin/env bash
# A short check of every GPU code path, for after a change that moves or touches them (the
# redesign of issue 30 moved the kernels, cuDNN and CUDA-graph code into src/gpu/): parity with
# diffusers of every fixture in f32/bf16/f16 and in both layouts, the main command, the speed of
# the CIFAR-10 architecture with and without CUDA graphs, and 20 training steps (the fused
# group-norm backward) on a synthetic IDX set. Prints fail=0 when every check passed.
# Run on the GPU machine from the repository root with the binary of `scripts/build-cuda.sh
# --cudnn` in dist/cuda/ (qtaylor, or qtaylor.xz: see scripts/gpu-env.sh); OUT receives the grid.
OUT=${OUT:-/tmp/gpu-smoke}
. scripts/gpu-env.sh >/dev/null; export Q
fail=0
for f in tests/fixtures/unet2d/*/; do
  for d in f32:1e-4 bf16:5e-2 f16:1e-2; do $Q parity --model $f --device cuda --model-dtype ${d%%:*} --tol ${d##*:} 2>&1 | tail -1; [ ${PIPESTATUS[0]} -eq 0 ] || fail=1; done
  QTAYLOR_LAYOUT=nhwc $Q parity --model $f --device cuda --model-dtype f32 --tol 1e-4 2>&1 | tail -1; [ ${PIPESTATUS[0]} -eq 0 ] || fail=1
  QTAYLOR_LAYOUT=nchw $Q parity --model $f --device cuda --model-dtype bf16 --tol 5e-2 2>&1 | tail -1; [ ${PIPESTATUS[0]} -eq 0 ] || fail=1
done
$Q sample --device cuda --sampler qt-3 --steps 10 --classes all --guidance 2 --out $OUT/digits-cuda.png 2>&1 | tail -1 || fail=1
$Q sample --device cuda --sampler ddim --steps 10 --model tests/fixtures/unet2d/class_cond --classes all --guidance 3 --model-dtype bf16 --out /tmp/cc.png 2>&1 | tail -1 || fail=1
$Q init-model --out /tmp/c10 >/dev/null 2>&1
$Q speed --model /tmp/c10 --device cuda --model-dtype bf16 --batch 64 --repeats 5 --sampler qt-3 --steps 10 2>&1 | head -4
QTAYLOR_CUDA_GRAPH=on $Q speed --model /tmp/c10 --device cuda --model-dtype bf16 --batch 64 --repeats 5 --sampler qt-3 --steps 10 2>&1 | head -4
$PY - <<'PY'
import numpy as np, struct, os
os.makedirs("/tmp/syn", exist_ok=True)
rng = np.random.default_rng(0)
img = (rng.random((64, 28, 28)) * 255).astype(np.uint8); lab = (np.arange(64) % 10).astype(np.uint8)
open("/tmp/syn/train-images-idx3-ubyte", "wb").write(struct.pack(">IIII", 0x803, 64, 28, 28) + img.tobytes())
open("/tmp/syn/train-labels-idx1-ubyte", "wb").write(struct.pack(">II", 0x801, 64) + lab.tobytes())
PY
$Q train --data /tmp/syn --steps 20 --batch 16 --save-every 20 --device cuda --out /tmp/tr 2>&1 | tail -2 || fail=1
echo "fail=$fail"
