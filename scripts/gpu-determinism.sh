#!/usr/bin/env bash
# Issue 34's GPU check, one command on the GPU machine (from the repository root, with
# dist/cuda/qtaylor[.xz] from scripts/build-cuda.sh --cudnn; data/mnist-gz for the eval and
# training parts, skipped when absent). Output for BENCHMARKS.md §14 under $OUT.
#   1. per operation (`qtaylor determinism`): row 0 of every operation of a forward in batches
#      of 1, 7 and 64 and in two runs, deterministic mode off and on; the sources named; the
#      cost per forward at batches 1, 8 and 256 in both modes (one process); with
#      QTAYLOR_CONV_LOG=1 the kernels each mode chose (the census, conv-*.log).
#      CIFAR-10 architecture in bf16 and f32, the embedded model with class labels.
#   2. end to end with --deterministic: 64 samples as one batch, as shards of 16 and of 7–8
#      merged, and rows 0 and 63 alone (batch 1): byte-identical .npy; each run twice.
#      The same three models; the README's main command twice (PNG bytes).
#   3. a 2 000-sample eval row twice and 300 training steps twice, with --deterministic:
#      identical results.csv and checkpoint bytes.
# Env: WORK (default /tmp/qtaylor-det), OUT (default $WORK/out), DATA (default data/mnist-gz),
# PARTS (default 1,2,3), CONFIGS (names below, default all), STEPS (training steps, default
# 300), DEVICE (default cuda; cpu for a dry run).
set -uo pipefail
WORK=${WORK:-/tmp/qtaylor-det}
: "${OUT:=$WORK/out}"
DATA=${DATA:-data/mnist-gz}
PARTS=${PARTS:-1,2,3}
STEPS=${STEPS:-300}
DEVICE=${DEVICE:-cuda}
. "$(dirname "$0")/gpu-env.sh"
mkdir -p "$WORK" "$OUT"
fail=0
say() { echo; echo "### $*"; }
has() { [[ ",$PARTS," == *",$1,"* ]]; }
[ -d "$WORK/cifar10" ] || "$Q" init-model --preset cifar10-ddpm --out "$WORK/cifar10" >/dev/null || exit 1

# name | model flags for `determinism` | model flags for `sample`
configs=(
  "cifar-bf16|--model $WORK/cifar10 --model-dtype bf16|--model $WORK/cifar10 --model-dtype bf16"
  "cifar-f32|--model $WORK/cifar10 --model-dtype f32|--model $WORK/cifar10 --model-dtype f32"
  "embedded-guided|--labels|--classes 0,1,2,3 --guidance 2"
)

want() { [ -z "${CONFIGS:-}" ] || [[ ",$CONFIGS," == *",$1,"* ]]; }

if has 1; then
  for c in "${configs[@]}"; do
    IFS='|' read -r name dflags _ <<<"$c"
    want "$name" || continue
    say "per operation: $name"
    # shellcheck disable=SC2086
    QTAYLOR_CONV_LOG=1 timeout 300 "$Q" determinism $dflags --device "$DEVICE" --batches 1,7,64 \
      --cost-batches 1,8,256 --repeats 20 >"$OUT/trace-$name.txt" 2>"$OUT/conv-$name.log" || fail=1
    cat "$OUT/trace-$name.txt"
    echo "  kernels chosen: $(grep -c 'conv plan' "$OUT/conv-$name.log") convolution plans, $(grep -c 'conv pin' "$OUT/conv-$name.log") pins, $(grep -c 'pinned matmul' "$OUT/conv-$name.log") pinned products (conv-$name.log)"
    tail -3 "$OUT/conv-$name.log" | grep -i error && fail=1
  done
fi

if has 2; then
  for c in "${configs[@]}"; do
    IFS='|' read -r name _ sflags <<<"$c"
    want "$name" || continue
    say "end to end, --deterministic: $name"
    d=$WORK/e2e-$name
    rm -rf "$d"; mkdir -p "$d"
    run() { # label, extra args
      local label=$1; shift
      # shellcheck disable=SC2086
      timeout 120 "$Q" sample $sflags --sampler qt-3 --steps 10 --batch 64 --seed 3 --device "$DEVICE" \
        --deterministic "$@" 2>>"$d/log.txt" >/dev/null || { echo "  $label: FAILED"; fail=1; }
    }
    run one --out "$d/one.png" --save-npy "$d/one.npy"
    run again --out "$d/again.png" --save-npy "$d/again.npy"
    for n in 4 9; do
      for ((i = 0; i < n; i++)); do run "shard $i/$n" --shard "$i/$n" --out "$d/s$n/$i"; done
      timeout 60 "$Q" merge --out "$d/merged$n.png" "$d"/s$n/* 2>>"$d/log.txt" || fail=1
      if cmp -s "$d/one.png" "$d/merged$n.png"; then echo "  $n shards merged by qtaylor merge: PNG byte-identical"; else echo "  $n shards merged: PNG DIFFERS"; fail=1; fi
    done
    run "row 0 alone" --shard 0/64 --out "$d/r0"
    run "row 63 alone" --shard 63/64 --out "$d/r63"
    "$PY" - "$d" <<'EOF' || fail=1
import glob, sys, numpy as np
d = sys.argv[1]
def load(p):
    try:
        return np.load(p)
    except Exception as e:
        print(f"  {p}: missing ({e})"); return None
one = load(f"{d}/one.npy")
bad = one is None
def same(label, a, b):
    global bad
    if a is None or b is None:
        bad = True; return
    ok = a.shape == b.shape and a.tobytes() == b.tobytes()
    bad |= not ok
    diff = "" if ok else f" DIFFERS (max abs {np.abs(a.astype(np.float64) - b).max():.2e})"
    print(f"  {label}: {'byte-identical' if ok else ''}{diff}")
same("run twice (64 as one batch)", one, load(f"{d}/again.npy"))
for n, label in ((4, "4 shards of 16"), (9, "9 shards of 7-8")):
    parts = [load(f"{d}/s{n}/{i}/part-{i}-of-{n}.npy") for i in range(n)]
    same(f"{label}, rows joined", one, None if any(p is None for p in parts) else np.concatenate(parts))
for r in (0, 63):
    parts = glob.glob(f"{d}/r{r}/*.npy")
    part = load(parts[0]) if parts else None
    same(f"row {r} drawn alone (batch 1)", None if one is None else one[r:r + 1], part)
sys.exit(int(bad))
EOF
  done
  say "the README's main command twice, --deterministic (PNG bytes)"
  for k in 1 2; do
    timeout 120 "$Q" sample --sampler qt-3 --steps 10 --classes all --guidance 2 --device "$DEVICE" \
      --deterministic --out "$WORK/digits-$k.png" >/dev/null 2>&1 || fail=1
  done
  if cmp -s "$WORK/digits-1.png" "$WORK/digits-2.png"; then echo "  digits.png: byte-identical"; else echo "  digits.png: DIFFERS"; fail=1; fi
fi

if has 3 && [ -d "$DATA" ]; then
  say "eval, 2 000 samples, twice (--deterministic)"
  for k in 1 2; do
    timeout 200 "$Q" eval --model assets/mnist-unet --data "$DATA" --samplers unipc-3 --nfe 5 --n 2000 \
      --batch 500 --seed 0 --device "$DEVICE" --reference-steps 0 --deterministic \
      --out "$WORK/eval-$k" >/dev/null 2>"$WORK/eval-$k.log" || fail=1
  done
  if cmp -s "$WORK/eval-1/results.csv" "$WORK/eval-2/results.csv"; then
    echo "  results.csv: byte-identical"; grep -i unipc "$WORK/eval-1/results.csv" | head -2
  else echo "  results.csv: DIFFERS"; diff "$WORK/eval-1/results.csv" "$WORK/eval-2/results.csv" | head -6; fail=1; fi
  say "training, $STEPS steps, twice (--deterministic)"
  for k in 1 2; do
    rm -rf "$WORK/train-$k"
    timeout 300 "$Q" train --data "$DATA" --out "$WORK/train-$k" --steps "$STEPS" --batch 64 --device "$DEVICE" \
      --save-every "$STEPS" --deterministic >/dev/null 2>"$WORK/train-$k.log" || fail=1
  done
  for f in diffusion_pytorch_model.safetensors train_state.safetensors train_log.csv; do
    if cmp -s "$WORK/train-1/$f" "$WORK/train-2/$f"; then echo "  $f: byte-identical"; else echo "  $f: DIFFERS"; fail=1; fi
  done
  cp "$WORK"/eval-*.log "$WORK"/train-*.log "$OUT/" 2>/dev/null
elif has 3; then
  echo "(no $DATA: eval and training parts skipped)"
fi
say "result: $([ $fail = 0 ] && echo all checks passed || echo SOME CHECKS FAILED)"
exit $fail
