#!/usr/bin/env bash
# A/B of environment settings on the GPU machine: one batch-${BATCH:-256} forward of the CIFAR-10
# DDPM architecture (random weights) per setting and precision, settings interleaved over
# ${ROUNDS:-2} rounds so that drift hits all of them alike. Each argument is one setting, a
# space-separated list of VAR=value ("-" for none), e.g.
#   scripts/gpu-ab.sh - QTAYLOR_DOWNSAMPLE=pad
# MODES picks the precisions (default "tf32 bf16"; also f32). Run from the repository root.
set -uo pipefail
: "${OUT:=/tmp/qtaylor-ab}"
. "$(dirname "$0")/gpu-env.sh"
WORK=${WORK:-/tmp/qtaylor-gpu}
BATCH=${BATCH:-256}
[ -d "$WORK/cifar10" ] || "$Q" init-model --preset cifar10-ddpm --out "$WORK/cifar10" || exit 1
fail=0
for mode in ${MODES:-tf32 bf16}; do
  case $mode in
    tf32) qa=(--model-dtype f32 --tf32) ;;
    f32) qa=(--model-dtype f32) ;;
    bf16) qa=(--model-dtype bf16) ;;
  esac
  for round in $(seq "${ROUNDS:-2}"); do
    for setting in "$@"; do
      envs=(); [ "$setting" = - ] || read -r -a envs <<<"$setting"
      r=$(env "${envs[@]}" "$Q" speed --model "$WORK/cifar10" --device cuda --batch "$BATCH" --repeats 7 --sampler none "${qa[@]}" 2>&1) || { fail=1; echo "$r" | tail -3; }
      printf '%-5s round %s  %-40s %s\n' "$mode" "$round" "$setting" "$(echo "$r" | grep -o '^forward: [0-9.]* s')"
    done
  done
done
exit $fail
