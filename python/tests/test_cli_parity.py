"""The Python route (``qtaylor.torch.sample`` with qtaylor's noise streams) gives the end
points of the ``qtaylor sample`` command line, for every sampler.

Both routes run the same Rust sampler code; the Python one moves torch tensors through
``qtaylor._ops.TorchOps`` and calls a Python model (the exact ε̂ of gmm-demo), the command
line uses candle tensors and the problem's own model. In f64 they agree to rounding.
"""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest
import torch

import qtaylor
import qtaylor.torch as qt
from qtaylor import _core

SEED = 3
BATCH = 4
STEPS = 10
REL_TOL = 1e-10

# (python sampler options, CLI flags) of the option variants.
VARIANTS = [
    ("ddim", {"eta": 0.5}, ["--eta", "0.5"]),
    ("unipc-2", {"unipc_variant": "bh1"}, ["--unipc-variant", "bh1"]),
    ("unipc-3", {"unipc_corrector": False}, ["--no-corrector"]),
    ("dpmpp-3m", {"lower_order_final": True}, ["--lower-order-final"]),
    ("dpmpp-2m", {"lower_order_final": True}, ["--lower-order-final"]),
    ("qt-3", {"expand": "logsnr"}, ["--expand", "logsnr"]),
    ("qt-3", {"expand": "abar"}, ["--expand", "abar"]),
    ("qt-4", {"qt_last": "taylor"}, ["--qt-last", "taylor"]),
    ("dpm-solver-fast", {}, []),
    ("ddpm", {"ddpm_variance": "beta"}, ["--ddpm-variance", "beta"]),
    ("dpmpp-2m-sde", {"eta": 0.5}, ["--eta", "0.5"]),
    ("edm-heun", {"s_churn": 2.0, "s_tmin": 0.05, "s_tmax": 50.0}, ["--s-churn", "2", "--s-tmin", "0.05", "--s-tmax", "50"]),
    ("rk45", {"rtol": 1e-4, "atol": 1e-4}, ["--rtol", "1e-4", "--atol", "1e-4"]),
]

LOGSNR_SUBSET = [
    "qt-1", "qt-2", "qt-3", "qt-4", "ddim", "heun", "dpm-solver-2", "dpm-solver-3",
    "dpm-solver-fast", "dpmpp-2m", "dpmpp-3m", "dpmpp-2s", "unipc-3", "deis-3", "pndm",
    "ipndm", "edm-heun", "rk45", "dpm-solver-23", "ddpm", "qit-2", "dpmpp-2m-sde",
]
OTHER_GRIDS = [("karras", "qt-3"), ("karras", "dpmpp-2m"), ("karras", "dpm-solver-12"), ("quadratic", "qt-2"), ("quadratic", "unipc-2")]


def _cases():
    cases = []
    for name in qtaylor.all_sampler_names():
        cases.append(pytest.param(name, "uniform", {}, [], id=f"uniform-{name}"))
    for name, opts, flags in VARIANTS:
        tag = ",".join(f"{k}={v}" for k, v in opts.items()) or "default"
        cases.append(pytest.param(name, "uniform", opts, flags, id=f"uniform-{name}[{tag}]"))
    for name in LOGSNR_SUBSET:
        cases.append(pytest.param(name, "logsnr", {}, [], id=f"logsnr-{name}"))
    for grid, name in OTHER_GRIDS:
        cases.append(pytest.param(name, grid, {}, [], id=f"{grid}-{name}"))
    return cases


NFE_RE = re.compile(r",\s*(\d+(?:\.\d+)?) NFE,")


def run_cli(qtaylor_bin, tmp_path, sampler, grid, flags, *, seed=SEED, batch=BATCH, steps=STEPS):
    out = tmp_path / f"{sampler}-{grid}-b{batch}.npy"
    cmd = [
        str(qtaylor_bin), "sample", "--problem", "gmm-demo", "--sampler", sampler,
        "--steps", str(steps), "--grid", grid, "--dtype", "f64", "--seed", str(seed),
        "--batch", str(batch), "--out", str(out), *flags,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}"
    m = NFE_RE.search(r.stderr)
    assert m, f"no ', N NFE,' in the CLI's report: {r.stderr!r}"
    x = np.load(out)
    return x, float(m.group(1))


def run_python(exact_eps_model, sampler, grid, opts, *, seed=SEED, rows=BATCH, first=0, steps=STEPS):
    schedule = _core.Schedule.vp_linear()
    exact = exact_eps_model(schedule)
    seen = []

    def model(x, t):
        assert t.dtype == torch.float64, f"network time dtype {t.dtype}, expected float64"
        seen.append(t.clone())
        return exact(x, t)

    draw, noise_sampler = qt.stream_noise(seed, rows, first)
    x = draw([64])
    assert x.dtype == torch.float64 and tuple(x.shape) == (rows, 64)
    res = qt.sample(
        model, x, sampler, steps, schedule=schedule, grid=grid, noise_sampler=noise_sampler, **opts
    )
    if seen:
        ts = torch.cat(seen)
        # The network time of a continuous schedule is t itself, inside [t_min, t_max].
        assert float(ts.min()) >= 0.0 and float(ts.max()) <= 1.0 + 1e-12
    return res


def rel_diff(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("sampler,grid,opts,flags", _cases())
def test_python_route_gives_the_cli_end_points(
    qtaylor_bin, tmp_path, exact_eps_model, sampler, grid, opts, flags
):
    cli_x, cli_nfe = run_cli(qtaylor_bin, tmp_path, sampler, grid, flags)
    assert cli_x.dtype == np.float64 and cli_x.shape == (BATCH, 64)
    assert np.isfinite(cli_x).all()

    res = run_python(exact_eps_model, sampler, grid, opts)
    py_x = res.x.numpy()
    assert res.x.dtype == torch.float64 and py_x.shape == (BATCH, 64)

    d = rel_diff(py_x, cli_x)
    assert d <= REL_TOL, f"{sampler} on {grid} {opts}: max |python - cli| / max |cli| = {d:.3e}"
    # The CLI prints the NFE per sample rounded to an integer ({:.0}); adaptive samplers
    # report a fractional mean over the batch in Python.
    assert abs(res.nfe - cli_nfe) <= 0.5, f"{sampler}: python NFE {res.nfe}, CLI NFE {cli_nfe}"


@pytest.mark.parametrize(
    "sampler", ["qt-3", "ddpm", "dpmpp-2m-sde", "qit-2", "rk45", "dpm-solver-23"]
)
def test_a_sample_does_not_depend_on_its_batch(qtaylor_bin, tmp_path, exact_eps_model, sampler):
    # Rows 2..3 of a batch of 4 == a batch of 2 drawing from streams (seed, 2) and (seed, 3).
    full = run_python(exact_eps_model, sampler, "uniform", {}, rows=4, first=0)
    tail = run_python(exact_eps_model, sampler, "uniform", {}, rows=2, first=2)
    d = rel_diff(full.x[2:4].numpy(), tail.x.numpy())
    assert d <= 1e-12, f"{sampler}: rows 2..3 of batch 4 differ from a first=2 batch of 2 by {d:.3e}"
    # The start noise itself: streams (seed, 2..3) whatever the batch.
    draw4, _ = qt.stream_noise(SEED, 4)
    draw2, _ = qt.stream_noise(SEED, 2, first=2)
    assert torch.equal(draw4([64])[2:4], draw2([64]))
    # And the command line's batch of 4 holds the same rows.
    cli_x, _ = run_cli(qtaylor_bin, tmp_path, sampler, "uniform", [], batch=4)
    d = rel_diff(tail.x.numpy(), cli_x[2:4])
    assert d <= REL_TOL, f"{sampler}: CLI rows 2..3 differ from the first=2 python batch by {d:.3e}"
