#!/usr/bin/env bash
# Training speed on the GPU machine, qtaylor and PyTorch side by side in one command (run from
# the repository root with dist/cuda/qtaylor[.gz] from `scripts/build-cuda.sh --cudnn`, the
# MNIST IDX files in $DATA, and diffusers' wheels with their dependencies in $WHEELS, made by
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_28_x86_64 -d dist/pywheels diffusers==0.42.1 pip==25.3
# minus numpy and pillow, which the machine's PyTorch environment has).
#   1. qtaylor train, the class-conditional MNIST UNet (configs/mnist-class-cond.json), batch
#      256: exact f32 and --tf32, steady steps/s after 10 warm-up steps and the CUDA pool's
#      peak; then the same with QTAYLOR_PROFILE=1 (per-operation forward and backward time);
#   2. scripts/torch_train.py: diffusers' UNet2DModel from the same config.json, the same step
#      (AdamW, clipping, EMA), eager / fused AdamW / channels_last / torch.compile, TF32 on
#      (PyTorch's default for convolutions) and off (exact f32).
# Env: STEPS (qtaylor timed steps, 100), TORCH_STEPS (100), BATCH (256), DATA (data/mnist-gz),
#      WHEELS (dist/pywheels), CONFIG (configs/mnist-class-cond.json), PROFILE (1: also profile),
#      TORCH_OFF_VARIANTS (the variants with TF32 off: eager,eager-fused,compile).
# It also checks the fused group-norm backward against the composed one on the GPU (loss curves).
set -uo pipefail
: "${OUT:=/tmp/qtaylor-train-speed}"
. "$(dirname "$0")/gpu-env.sh"
DATA=${DATA:-data/mnist-gz}
WHEELS=${WHEELS:-dist/pywheels}
CONFIG=${CONFIG:-configs/mnist-class-cond.json}
BATCH=${BATCH:-256}
STEPS=${STEPS:-100}
W=$(mktemp -d)
fail=0

echo "== diffusers for the PyTorch side (from $WHEELS, no network)"
# A venv that sees the PyTorch environment's packages through a .pth file (a venv made from a
# venv's python would see only the base interpreter's with --system-site-packages).
SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -m venv --without-pip "$W/venv" &&
  echo "$SP" > "$("$W/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/pytorch-env.pth" &&
  "$W/venv/bin/python" "$(ls "$WHEELS"/pip-*.whl | head -1)/pip" install --quiet --no-index \
    --find-links "$WHEELS" diffusers==0.42.1 && TPY=$W/venv/bin/python || {
  echo "venv install failed; installing the wheels without dependencies into a target folder"
  "$PY" "$(ls "$WHEELS"/pip-*.whl | head -1)/pip" install --quiet --no-index --no-deps \
    --target "$W/site" "$WHEELS"/*.whl && export PYTHONPATH=$W/site TPY=$PY
}
"$TPY" -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)' || fail=1

qt() { # label, env..., -- extra flags
  local label=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  rm -rf "$W/run"
  env "${envs[@]}" "$Q" "$@" train --data "$DATA" --config "$CONFIG" --out "$W/run" \
    --steps $((STEPS + 10)) --batch "$BATCH" --save-every 100000 --device cuda \
    > "$W/$label.log" 2>&1 || { fail=1; tail -5 "$W/$label.log"; return; }
  echo "qtaylor-train $label: $(grep -o 'steady rate.*' "$W/$label.log"); $(grep -o 'peak device memory allocated.*: [0-9]* MiB' "$W/$label.log" | grep -o '[0-9]* MiB$')"
  grep -A60 '^profile' "$W/$label.log" | head -45
}
echo "== qtaylor (warm-up: first use of the kernels on this card)"
"$Q" train --data "$DATA" --config "$CONFIG" --out "$W/warm" --steps 3 --batch "$BATCH" --device cuda > /dev/null 2>&1 || fail=1
echo "== fused group-norm backward against the composed one (exact f32, 30 steps at lr 1e-3 without warm-up, batch 64)"
for gn in fused composed; do
  QTAYLOR_GN_BACKWARD=$gn "$Q" train --data "$DATA" --config "$CONFIG" --out "$W/gn-$gn" --steps 30 \
    --warmup 0 --batch 64 --device cuda > "$W/gn-$gn.log" 2>&1 || { fail=1; tail -3 "$W/gn-$gn.log"; }
done
"$PY" - "$W/gn-fused/train_log.csv" "$W/gn-composed/train_log.csv" <<'EOF'
import csv, sys
a, b = ([float(r["loss"]) for r in csv.DictReader(open(f))] for f in sys.argv[1:])
rel = max(abs(x - y) / abs(y) for x, y in zip(a, b))
print(f"  loss at step 1 / 30: fused {a[0]:.6f} / {a[-1]:.6f}, composed {b[0]:.6f} / {b[-1]:.6f}; largest relative difference over the 30 steps {rel:.2e}")
sys.exit(0 if len(a) == len(b) == 30 and rel < 1e-2 else 1)
EOF
[ $? = 0 ] || { fail=1; echo "  FAILED: the fused group-norm backward disagrees (see $OUT/gn-check-failed)"; touch "$OUT/gn-check-failed"; }
qt exact-f32 QTAYLOR_X=0 --
qt tf32 QTAYLOR_X=0 -- --tf32
if [ "${PROFILE:-1}" = 1 ]; then
  qt exact-f32-profile QTAYLOR_PROFILE=1 --
fi

echo "== PyTorch (diffusers UNet2DModel, same config and step)"
"$TPY" scripts/torch_train.py --config "$CONFIG" --data "$DATA" --batch "$BATCH" \
  --steps "${TORCH_STEPS:-100}" --tf32 on || fail=1
"$TPY" scripts/torch_train.py --config "$CONFIG" --data "$DATA" --batch "$BATCH" \
  --steps "${TORCH_STEPS:-100}" --tf32 off --variants "${TORCH_OFF_VARIANTS:-eager,eager-fused,compile}" || fail=1
tar -C "$W" -czf "$OUT/train-speed-logs.tgz" $(cd "$W" && ls *.log) 2>/dev/null
exit $fail
