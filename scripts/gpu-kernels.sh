#!/usr/bin/env bash
# GPU kernels of one forward, qtaylor vs PyTorch eager (CIFAR-10 DDPM architecture, random
# weights, batch ${BATCH:-256}), by Nsight Systems (nsys) where the GPU machine has it, else by
# Nsight Compute (ncu, each kernel replayed on its own; clocks and caches left alone). Also the
# GPU's idle gaps during a 10-NFE qt-3 sample (nsys only). Run from the repository root with
# dist/cuda/qtaylor built by `scripts/build-cuda.sh --cudnn`; MODES picks the precisions
# (default "tf32 bf16"); TORCH=0 skips PyTorch. Writes per-kernel CSVs and summaries to $OUT/kernels.tgz.
set -uo pipefail
: "${OUT:=/tmp/qtaylor-kernels}"
. "$(dirname "$0")/gpu-env.sh"
WORK=${WORK:-/tmp/qtaylor-gpu}
K=$WORK/kernels
BATCH=${BATCH:-256}
mkdir -p "$K"
[ -d "$WORK/cifar10" ] || "$Q" init-model --preset cifar10-ddpm --out "$WORK/cifar10" || exit 1
NSYS=$(command -v nsys || ls /usr/local/cuda/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/nsight-systems*/bin/nsys 2>/dev/null | head -1)
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
echo "nsys: ${NSYS:-none}; ncu: ${NCU:-none}"
fail=0
# name, forwards run by the command, command...
kern() {
  local name=$1 n=$2; shift 2
  if [ -n "$NSYS" ]; then
    "$NSYS" profile -t cuda -o "$K/$name" --force-overwrite true "$@" > "$K/$name.log" 2>&1 || { fail=1; tail -5 "$K/$name.log"; return; }
    "$NSYS" stats -r cuda_gpu_kern_sum --format csv -o "$K/$name" "$K/$name.nsys-rep" > /dev/null 2>&1 || fail=1
    "$PY" - "$K/${name}_cuda_gpu_kern_sum.csv" "$n" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
n = float(sys.argv[2])
tot = sum(float(r["Total Time (ns)"]) for r in rows)
print(f"  GPU kernel time per forward: {tot / n / 1e6:.2f} ms ({sum(int(r['Instances']) for r in rows) / n:.0f} kernels)")
for r in sorted(rows, key=lambda r: -float(r["Total Time (ns)"]))[:25]:
    print(f"  {float(r['Total Time (ns)']) / n / 1e6:7.3f} ms {int(r['Instances']) / n:5.0f}x  {r['Name'][:110]}")
EOF
  elif [ -n "$NCU" ]; then
    "$NCU" --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv "$@" > "$K/$name.csv" 2> "$K/$name.log" || { fail=1; tail -5 "$K/$name.log"; return; }
    "$PY" - "$K/$name.csv" "$n" <<'EOF'
import csv, sys, collections
lines = [l for l in open(sys.argv[1]) if l.startswith('"')]
rows = list(csv.DictReader(lines))
n = float(sys.argv[2])
t = collections.Counter(); c = collections.Counter()
for r in rows:
    v = float(r["Metric Value"].replace(",", ""))
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(r["Metric Unit"], 1e-6)
    t[r["Kernel Name"]] += v * scale; c[r["Kernel Name"]] += 1
print(f"  GPU kernel time per forward: {sum(t.values()) / n:.2f} ms ({sum(c.values()) / n:.0f} kernels)")
for k, v in t.most_common(25):
    print(f"  {v / n:7.3f} ms {c[k] / n:5.0f}x  {k[:110]}")
EOF
  fi
}
for mode in ${MODES:-tf32 bf16}; do
  case $mode in
    tf32) qa=(--model-dtype f32 --tf32); ta=(--dtype f32 --tf32 on) ;;
    f32) qa=(--model-dtype f32); ta=(--dtype f32 --tf32 off) ;;
    bf16) qa=(--model-dtype bf16); ta=(--dtype bf16) ;;
  esac
  echo "### $mode: qtaylor (QTAYLOR_CUDNN_ALGO=${QTAYLOR_CUDNN_ALGO:-auto})"
  kern "qt-$mode" 2 "$Q" speed --model "$WORK/cifar10" --device cuda --batch "$BATCH" --repeats 1 --sampler none "${qa[@]}"
  [ "${TORCH:-1}" = 0 ] && continue
  echo "### $mode: PyTorch eager"
  kern "torch-$mode" 4 "$PY" scripts/torch_unet.py --model "$WORK/cifar10" --device cuda --batch "$BATCH" --repeats 1 --steps 1 "${ta[@]}"
done
if [ -n "$NSYS" ]; then
  echo "### GPU idle gaps during a 10-NFE qt-3 sample (bf16; speed's timed sample = the last one)"
  "$NSYS" profile -t cuda,osrt -o "$K/sample" --force-overwrite true "$Q" speed --model "$WORK/cifar10" --device cuda --batch "$BATCH" --repeats 1 --model-dtype bf16 --sampler qt-3 --steps 10 > "$K/sample.log" 2>&1 || fail=1
  "$NSYS" stats -r cuda_gpu_trace --format csv -o "$K/sample" "$K/sample.nsys-rep" > /dev/null 2>&1 || fail=1
  "$PY" - "$K/sample_cuda_gpu_trace.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
ev = sorted((int(r["Start (ns)"]), int(r["Duration (ns)"]), r["Name"]) for r in rows)
gaps = []
end = None
for s, d, name in ev:
    if end is not None and s - end > 100_000:
        gaps.append((s - end, end, name))
    end = max(end or 0, s + d)
print(f"  {len(ev)} GPU operations, {len(gaps)} gaps > 0.1 ms; the 40 longest (gap ms, at s, next op):")
t0 = ev[0][0]
for g, at, name in sorted(gaps, reverse=True)[:40]:
    print(f"  {g / 1e6:8.3f} ms at {(at - t0) / 1e9:8.4f} s  {name[:90]}")
EOF
fi
rm -f "$K"/*.sqlite
tar czf "$OUT/kernels.tgz" -C "$WORK" kernels
exit $fail
