#!/usr/bin/env bash
# Downloads the wheels pinned (with their sha256) in scripts/gpu-diffusers-wheels.txt into
# dist/wheels: diffusers 0.42.1 and what it imports, for the GPU machine's Python 3.12, where
# scripts/gpu-torch-baseline.sh unpacks them (no index, no download there). ~21 MB.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$repo/dist/wheels"
pip download --quiet --no-deps --require-hashes --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any \
  -r "$repo/scripts/gpu-diffusers-wheels.txt" -d "$repo/dist/wheels"
ls "$repo/dist/wheels" | wc -l | sed 's/$/ wheels in dist\/wheels/'
