#!/usr/bin/env bash
# Runs scripts/diffusers-load-check.py (diffusers loads the checkpoint `qtaylor train` wrote,
# assets/mnist-unet, and its outputs equal ours) and scripts/compare-diffusers.py (qtaylor vs
# diffusers' schedulers on the same GMM) in a virtual environment with pinned versions,
# creating it on first use. Run by hand, not by CI.
#
# Usage: scripts/compare-diffusers.sh [compare-diffusers.py options]   (e.g. --steps 10,25 -v)
# Environment: VENV   where the environment lives (default: target/compare-diffusers-venv)
#              PYTHON the interpreter that creates it (default: python3; 3.11 was used)
# Needs: the release binary (cargo build --release) and access to PyPI. torch is taken from
# the PyTorch CPU index when it is reachable (smaller), otherwise from PyPI.
set -euo pipefail
DIFFUSERS=diffusers==0.42.1
TORCH=torch==2.15.0
NUMPY=numpy==2.4.6

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-"$repo/target/compare-diffusers-venv"}
py=$venv/bin/python

if ! "$py" -c 'import diffusers, torch, numpy' >/dev/null 2>&1; then
  echo "creating $venv ($DIFFUSERS, $TORCH, $NUMPY)" >&2
  "${PYTHON:-python3}" -m venv "$venv"
  if ! "$py" -m pip install --quiet --retries 1 --timeout 15 \
      --index-url https://download.pytorch.org/whl/cpu "$TORCH" 2>/dev/null; then
    echo "PyTorch CPU index not reachable: installing $TORCH from PyPI" >&2
    "$py" -m pip install --quiet "$TORCH"
  fi
  "$py" -m pip install --quiet "$DIFFUSERS" "$NUMPY"
fi
"$py" "$repo/scripts/diffusers-load-check.py"
exec "$py" "$repo/scripts/compare-diffusers.py" "$@"
