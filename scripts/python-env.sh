#!/usr/bin/env bash
# The Python test environment: a virtual environment (default target/py-venv, or $VENV) with
# the pinned versions of python/requirements-test.txt (torch, diffusers, transformers, numpy,
# safetensors, maturin, pytest, and the imports of k-diffusion's sampling module) from PyPI,
# plus k-diffusion 0.1.1.post1 without its dependencies (python/tests/test_k_diffusion.py
# loads only k_diffusion.sampling; the package's other modules need scikit-image, clean-fid,
# wandb, …). Creates the venv if it is missing; re-running it on an existing venv only installs
# what differs from the pins.
#
#   scripts/python-env.sh                 # -> target/py-venv
#   VENV=/some/where scripts/python-env.sh
#   PYTHON=python3.12 scripts/python-env.sh   # the interpreter the venv is made from
#
# torch from PyPI pulls ~5 GB of CUDA wheels (about 2 minutes and ~7 GB on disk here); the tests
# use only its CPU side. Needs Python >= 3.10 (the wheel is abi3-py310); python3.11 is preferred.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-target/py-venv}
if [ -z "${PYTHON:-}" ]; then
  for p in python3.11 python3 python; do
    if command -v "$p" >/dev/null 2>&1; then PYTHON=$p; break; fi
  done
fi
if [ -z "${PYTHON:-}" ]; then
  echo "python-env.sh: no Python interpreter found (set PYTHON=...)" >&2
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "python-env.sh: $PYTHON is $("$PYTHON" --version 2>&1); qtaylor needs Python >= 3.10" >&2
  exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "+ $PYTHON -m venv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "+ $VENV/bin/pip install -r python/requirements-test.txt"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q -r python/requirements-test.txt
echo "+ $VENV/bin/pip install --no-deps k-diffusion==0.1.1.post1"
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps k-diffusion==0.1.1.post1
"$VENV/bin/python" -c 'import torch, diffusers, transformers, numpy, safetensors, pytest, maturin
import scipy, torchvision, torchdiffeq, torchsde, tqdm, PIL
print("python-env.sh: torch", torch.__version__, "| diffusers", diffusers.__version__,
      "| transformers", transformers.__version__, "| numpy", numpy.__version__)'
