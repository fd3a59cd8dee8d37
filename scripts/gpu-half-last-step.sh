#!/usr/bin/env bash
# bf16 and f16 on the last step to sigma = 0 (issue 14), on the GPU machine: the embedded model,
# 6 steps ending at x̂0 (--final zero), batch 4, eight samplers, in f32, f16 and bf16 from the
# same noise; prints, per sampler and dtype, whether the result is finite and its rms
# difference from f32 (the GPU form of tests/hardening.rs
# an_f16_model_stays_finite_on_the_last_step_to_sigma_zero_where_f32_does).
# Run from the repository root with dist/cuda/qtaylor (scripts/build-cuda.sh) or its .gz.
set -euo pipefail
OUT=${OUT:-/tmp/qtaylor-half}
. "$(dirname "$0")/gpu-env.sh"
work=$(mktemp -d)
for s in ddim qt-3 dpmpp-2m unipc-3 euler heun ipndm deis-3; do
  for d in f32 f16 bf16; do
    "$Q" sample --sampler "$s" --steps 6 --batch 4 --final zero --model-dtype "$d" --device cuda \
      --out "$work/x.png" --save-npy "$work/$s-$d.npy" 2> "$work/$s-$d.log" || { cat "$work/$s-$d.log"; exit 1; }
  done
done
"$PY" - "$work" <<'PY' | tee "$OUT/half-last-step.txt"
import sys, numpy as np
w = sys.argv[1]
print("| sampler | f16 finite | f16 rms vs f32 | bf16 finite | bf16 rms vs f32 |")
print("|---|---|---:|---|---:|")
bad = False
for s in ["ddim", "qt-3", "dpmpp-2m", "unipc-3", "euler", "heun", "ipndm", "deis-3"]:
    ref = np.load(f"{w}/{s}-f32.npy").astype(np.float64)
    row = [s]
    for d in ["f16", "bf16"]:
        x = np.load(f"{w}/{s}-{d}.npy").astype(np.float64)
        fin = bool(np.isfinite(x).all())
        rms = float(np.sqrt(np.mean((x - ref) ** 2)))
        bad |= (not fin) or rms > 0.1
        row += [str(fin), f"{rms:.4f}"]
    print("| " + " | ".join(row) + " |")
sys.exit(1 if bad else 0)
PY
