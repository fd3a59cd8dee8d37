"""Shared fixtures of the qtaylor Python tests (kept small and generic).

- ``repo_root``: the repository root (the folder holding Cargo.toml);
- ``qtaylor_bin``: the ``qtaylor`` command-line binary, ``$QTAYLOR_BIN`` or
  ``<repo>/target/release/qtaylor``, built with ``cargo build --release`` when missing;
- ``exact_eps_model``: ``exact_eps_model(schedule, problem="gmm-demo")`` gives a
  ``model(x, t)`` returning the exact ε̂ of the problem (float64), for
  ``qtaylor.torch.sample`` on a continuous schedule (network time = t).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def qtaylor_bin(repo_root) -> Path:
    env = os.environ.get("QTAYLOR_BIN")
    if env:
        path = Path(env)
        if not path.is_file():
            pytest.fail(f"QTAYLOR_BIN={env} is not a file")
        return path
    path = repo_root / "target" / "release" / "qtaylor"
    if not path.is_file():
        cargo = shutil.which("cargo")
        if cargo is None:
            pytest.fail(f"{path} does not exist and cargo is not on PATH to build it")
        subprocess.run([cargo, "build", "--release"], cwd=repo_root, check=True)
        if not path.is_file():
            pytest.fail(f"cargo build --release did not produce {path}")
    return path


@pytest.fixture(scope="session")
def exact_eps_model():
    import torch

    from qtaylor import _core

    def make(schedule, problem: str = "gmm-demo"):
        exact = _core.ExactProblem(problem, schedule)

        def model(x, t):
            assert isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == x.shape[0], (
                f"the network time should be one entry per row, got {t!r} for x {tuple(x.shape)}"
            )
            xs = np.ascontiguousarray(x.detach().cpu().to(torch.float64).numpy())
            eps = exact.eps(xs, [float(v) for v in t.tolist()])
            return torch.from_numpy(eps).to(dtype=x.dtype, device=x.device)

        model.problem = exact
        return model

    return make
