#!/usr/bin/env bash
# Fuzzes every loader of user input with libFuzzer (cargo-fuzz, nightly toolchain):
#
#   scripts/fuzz.sh                        # each target to 10 million runs or 30 minutes
#   RUNS=2000 SECONDS_EACH=20 scripts/fuzz.sh          # a smoke run (what .ci/run does)
#   TARGETS="npy idx" JOBS=2 scripts/fuzz.sh           # some targets, two at a time
#
# Seeds come from fuzz/corpus/<target>/ (committed; new inputs found go to
# fuzz/target/corpus/<target>/, not committed). A finding is written to
# fuzz/artifacts/<target>/ and fails the script; minimise it with
# `cargo +nightly fuzz tmin <target> <file>` and commit it to fuzz/corpus/<target>/, where
# tests/fuzz_corpus.rs replays it on stable. Each target's line of fuzz/target/fuzz.log gives
# its executions, seconds and findings (BENCHMARKS.md "Reliability").
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

TARGETS=${TARGETS:-"checkpoint scheduler_config idx npy mixture grid_lists"}
RUNS=${RUNS:-10000000}
SECONDS_EACH=${SECONDS_EACH:-1800}
JOBS=${JOBS:-1}

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz.sh: no nightly toolchain (cargo +nightly); libFuzzer needs one" >&2
  exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "+ cargo install cargo-fuzz --locked"
  cargo install cargo-fuzz --version 0.13.2 --locked
fi
echo "+ cargo +nightly fuzz build -O"
cargo +nightly fuzz build -O
bin=target/x86_64-unknown-linux-gnu/release
mkdir -p target
log=target/fuzz.log
[ -n "${KEEP_LOG:-}" ] || : > "$log"

run_one() {
  local t=$1 work=target/corpus/$1 art=artifacts/$1/
  mkdir -p "$work" "$art"
  local max_len=4096
  [ "$t" = checkpoint ] && max_len=65536
  local out=target/$t.out
  set +e
  "$bin/$t" "$work" "corpus/$t" -runs="$RUNS" -max_total_time="$SECONDS_EACH" \
    -max_len="$max_len" -rss_limit_mb=2048 -malloc_limit_mb=2048 -timeout=10 \
    -artifact_prefix="$art" -print_final_stats=1 > "$out" 2>&1
  local rc=$?
  set -e
  local execs secs found
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out" | grep -o '[0-9]*$' || echo 0)
  secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$out" | grep -o 'in [0-9]*' | grep -o '[0-9]*' || echo "?")
  found=$(find "$art" -type f | wc -l)
  echo "$t executions=${execs:-0} seconds=${secs:-?} findings=$found exit=$rc" | tee -a "$log"
  [ "$rc" -eq 0 ] && [ "$found" -eq 0 ]
}

status=0
running=0
for t in $TARGETS; do
  if [ "$running" -ge "$JOBS" ]; then
    wait -n || status=1   # whichever target ends first frees its slot
    running=$((running - 1))
  fi
  run_one "$t" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
  wait -n || status=1
  running=$((running - 1))
done
exit $status
