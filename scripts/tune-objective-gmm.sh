#!/usr/bin/env bash
# Issue 33 on an exact-score problem (CPU, about 2 minutes): for each sampler and NFE, a grid
# tuned for l2 and one tuned for fd (`qtaylor tune`, 256 tuning and 256 held-out samples from
# streams >= 2^40), then `qtaylor bench` on the default trailing grid and on each tuned grid
# (1024 samples from streams 0..1024): sliced W2 to exact samples of the data and end-point
# RMSE to the reference ODE solution. Prints a markdown table (the excess is over bench's
# finite-sample floor of the sliced W2). Env: Q (binary), OUT, PROBLEM, SAMPLERS, NFES.
set -euo pipefail
Q=${Q:-target/release/qtaylor}
OUT=${OUT:-/tmp/qtaylor-tune-gmm}
PROBLEM=${PROBLEM:-gmm-demo}
SAMPLERS=${SAMPLERS:-unipc-3 dpmpp-3m ipndm ddim qt-2}
NFES=${NFES:-4 5 6}
mkdir -p "$OUT"
common=(--problem "$PROBLEM" --schedule discrete --dtype f64)
for s in $SAMPLERS; do
  for n in $NFES; do
    for o in l2 fd; do
      "$Q" tune "${common[@]}" --spacing trailing --sampler "$s" --nfe "$n" --samples 256 --holdout 256 \
        --objective "$o" --out "$OUT/$s-$n-$o.json" > "$OUT/tune-$s-$n-$o.txt" 2>/dev/null
      "$Q" bench "${common[@]}" --samplers "$s" --nfe "$n" --grid-file "$OUT/$s-$n-$o.json" \
        --out "$OUT/b-$s-$n-$o" > /dev/null 2>&1
    done
    "$Q" bench "${common[@]}" --spacing trailing --samplers "$s" --nfe "$n" --out "$OUT/b-$s-$n-default" > /dev/null 2>&1
  done
done
python3 - "$OUT" "$SAMPLERS" "$NFES" <<'EOF'
import re, sys
out, samplers, nfes = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
def cell(d, section):
    t = open(f"{out}/{d}/report.md").read()
    rows = [l for l in t[t.index(section):].split("\n") if l.startswith("| ") and not l.startswith("| sampler")]
    return float(rows[0].split("|")[2].split()[0])
print("| sampler | NFE | SW2 default | SW2 l2 | SW2 fd | excess ratio l2 | excess ratio fd | RMSE default | RMSE l2 | RMSE fd |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for s in samplers:
    for n in nfes:
        ds = [f"b-{s}-{n}-{g}" for g in ("default", "l2", "fd")]
        floor = float(re.search(r"finite-sample floor ([0-9.e-]+)", open(f"{out}/{ds[0]}/report.md").read()).group(1))
        sw = [cell(d, "Sliced W2") for d in ds]
        rm = [cell(d, "RMSE of the end") for d in ds]
        ex = [v - floor for v in sw]
        print(f"| {s} | {n} | {sw[0]:.4f} | {sw[1]:.4f} | {sw[2]:.4f} | {ex[1]/ex[0]:.2f} | {ex[2]/ex[0]:.2f} | {rm[0]:.4f} | {rm[1]:.4f} | {rm[2]:.4f} |")
print(f"\nfinite-sample floor of the sliced W2: {floor}")
EOF
