#!/usr/bin/env bash
# Every test: the Rust tests (cargo test --release), then the Python package's tests (pytest on
# python/tests against the wheel built from this checkout and installed into a virtual env).
#
#   scripts/test.sh                  # venv: target/py-venv
#   VENV=/some/where scripts/test.sh
#
# The venv must hold the pinned test requirements (python/requirements-test.txt); when it does not
# (a fresh clone: CI), scripts/python-env.sh creates it first (~5 GB of torch wheels from PyPI).
# The package is installed with `pip install --no-build-isolation ./python`: maturin from the venv,
# no download; the Rust build shares the workspace's target/ (release profile), so with nothing
# changed it takes ~2 s (`maturin develop --release` took ~5 s and writes the extension into
# python/qtaylor/, so it is not used here).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-target/py-venv}
export VENV

echo "+ cargo test --release"
cargo test --release

if ! "$VENV/bin/python" -c 'import torch, diffusers, transformers, pytest, maturin, scipy, torchsde, torchdiffeq, torchvision
import importlib.util; assert importlib.util.find_spec("k_diffusion")' >/dev/null 2>&1; then
  echo "+ scripts/python-env.sh   ($VENV lacks the pinned test requirements)"
  scripts/python-env.sh
fi

# maturin's build backend runs the `maturin` executable from PATH: with --no-build-isolation
# that is the venv's, which is on PATH only if the venv's bin/ is.
venv_bin=$(cd "$VENV/bin" && pwd)
export PATH="$venv_bin:$PATH"

echo "+ $VENV/bin/pip install --no-build-isolation ./python"
"$VENV/bin/pip" install --disable-pip-version-check --no-build-isolation ./python

# The tests must see the installed wheel, not python/qtaylor/ of the checkout.
(cd / && "$venv_bin/python" -c 'import qtaylor; print("qtaylor", qtaylor.__version__, "from", qtaylor.__file__)')

echo "+ $VENV/bin/python -m pytest python/tests -q"
status=0
"$VENV/bin/python" -m pytest python/tests -q || status=$?
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no test in python/tests" >&2
fi
exit "$status"
