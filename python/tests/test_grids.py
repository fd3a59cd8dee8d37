"""Time grids on discrete schedules (issue 13): karras grids as diffusers'
use_karras_sigmas, fractional timesteps, and tuned grid files in the scheduler."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

import qtaylor
from qtaylor.diffusers import QTaylorScheduler

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("QTAYLOR_BIN", REPO / "target" / "release" / "qtaylor"))

CONFIGS = [
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2", beta_start=1e-4, beta_end=0.02),
]


def diffusers_karras_timesteps(euler, steps, table_dtype):
    """diffusers' own karras construction (_convert_to_karras, _sigma_to_t), with its σ
    table in `table_dtype` (diffusers keeps it in float32)."""
    ac = euler.alphas_cumprod.numpy().astype(table_dtype)
    sig = np.sqrt((1 - ac) / ac)
    log_sigmas = np.log(sig)
    ks = euler._convert_to_karras(in_sigmas=np.flip(sig).copy(), num_inference_steps=steps)
    return np.array([euler._sigma_to_t(s, log_sigmas) for s in ks]), ks


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["beta_schedule"])
@pytest.mark.parametrize("steps", [5, 10, 25])
def test_karras_grid_on_a_discrete_schedule_equals_diffusers_use_karras_sigmas(cfg, steps):
    euler = EulerDiscreteScheduler(use_karras_sigmas=True, **cfg)
    euler.set_timesteps(steps)
    s = qtaylor.Schedule.discrete(cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"], 1000)
    t = qtaylor.continuous_grid(s, steps, "karras", to_zero=True)
    assert len(t) == steps + 1 and t[-1] == 0.0
    ours = np.asarray(s.model_time(t[:-1]))
    # The same algorithm with the σ table in float64: equal to rounding.
    ref64, ks64 = diffusers_karras_timesteps(euler, steps, np.float64)
    assert np.max(np.abs(ours - ref64)) <= 1e-6
    sig = np.sqrt((1 - s.alpha_bar(t[:-1])) / s.alpha_bar(t[:-1]))
    assert np.max(np.abs(sig / ks64 - 1)) <= 1e-9
    # diffusers' stock scheduler keeps its σ table in float32 and its timesteps as float32:
    # they differ from the exact values by that rounding only.
    assert np.max(np.abs(ours - euler.timesteps.numpy())) <= 1e-4
    assert np.max(np.abs(sig / euler.sigmas.numpy()[:-1] - 1)) <= 1e-6


def test_fractional_timesteps_are_fractional_steps_of_the_table():
    s = qtaylor.Schedule.discrete()
    n = np.array([0.0, 3.7, 412.125, 998.5, 999.0])
    t = s.time_of_model_time(n)
    assert np.max(np.abs(np.asarray(s.model_time(t)) - n)) < 1e-9
    assert t[0] == 1 / 1000 and t[-1] == 1.0
    sch = QTaylorScheduler(sampler="ddim")
    sch.set_timesteps(timesteps=[950.5, 600.25, 99.75])
    assert sch.timesteps.dtype == torch.float32
    assert np.allclose(sch.timesteps.numpy(), [950.5, 600.25, 99.75], atol=1e-4)
    with pytest.raises(ValueError, match="decrease strictly"):
        sch.set_timesteps(timesteps=[10.5, 20.5, 3.0])


@pytest.fixture(scope="module")
def grid_file(tmp_path_factory):
    if not BIN.exists():
        subprocess.run(["cargo", "build", "--release"], cwd=REPO, check=True)
    out = tmp_path_factory.mktemp("tune") / "grid.json"
    subprocess.run(
        [str(BIN), "tune", "--problem", "gmm-demo", "--schedule", "discrete", "--sampler", "ddim",
         "--nfe", "6", "--dtype", "f64", "--samples", "16", "--holdout", "16", "--out", str(out)],
        check=True, capture_output=True,
    )
    return out


def test_a_tuned_grid_file_drives_the_scheduler_through_sigmas_and_timesteps(grid_file):
    sch = QTaylorScheduler(sampler="ddim")
    g = qtaylor.read_grid_file(str(grid_file), sch.schedule)
    assert g["sampler"] == "ddim" and g["nfe"] == 6 and g["times"][-1] == 0.0
    sch.set_timesteps(sigmas=g["sigmas"])
    by_sigmas = sch.timesteps.clone()
    sch.set_timesteps(timesteps=g["timesteps"])
    by_timesteps = sch.timesteps.clone()
    assert len(by_sigmas) == g["steps"]
    assert np.allclose(by_sigmas.numpy(), g["timesteps"], atol=1e-3)
    assert np.allclose(by_timesteps.numpy(), g["timesteps"], atol=1e-3)
    # and it samples: a full loop through step() with finite output
    x = torch.randn(2, 3)
    for t in sch.timesteps:
        x = sch.step(torch.zeros_like(x), t, x).prev_sample
    assert torch.isfinite(x).all()


def test_a_bad_grid_file_is_a_value_error_naming_the_file_and_fault(grid_file, tmp_path):
    s = qtaylor.Schedule.discrete()
    g = json.loads(grid_file.read_text())
    g["times"][1], g["times"][2] = g["times"][2], g["times"][1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(g))
    with pytest.raises(ValueError) as e:
        qtaylor.read_grid_file(str(bad), s)
    assert str(bad) in str(e.value) and "decrease strictly" in str(e.value)
    with pytest.raises(ValueError, match="cannot read"):
        qtaylor.read_grid_file(str(tmp_path / "missing.json"), s)


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=lambda c: c["beta_schedule"])
def test_use_karras_sigmas_in_the_config_gives_diffusers_karras_timesteps(cfg):
    euler = EulerDiscreteScheduler(use_karras_sigmas=True, **cfg)
    euler.set_timesteps(10)
    ours = QTaylorScheduler.from_config(euler.config, sampler="dpmpp-2m")
    ours.set_timesteps(10)
    assert ours.config.use_karras_sigmas
    assert len(ours.timesteps) == 10
    # both float32 tensors: one float32 ulp near timestep 1000 is 6.1e-5
    assert np.max(np.abs(ours.timesteps.numpy() - euler.timesteps.numpy())) <= 1.3e-4
    lu = QTaylorScheduler(use_lu_lambdas=True, **cfg)
    lu.set_timesteps(8)
    lam = lu.schedule.lambda_(np.array(lu.program.call_times))
    assert np.allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-9)
    with pytest.raises(ValueError, match="choose one"):
        QTaylorScheduler(use_lu_lambdas=True, use_karras_sigmas=True).set_timesteps(5)


def test_a_grid_file_used_for_another_run_warns_as_the_command_line_does(grid_file):
    sch = QTaylorScheduler(sampler="ddim")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the run it was tuned for: no warning
        sch.set_grid_file(grid_file)
    assert len(sch.timesteps) == 6
    other = QTaylorScheduler(sampler="unipc-2")
    with pytest.warns(UserWarning, match=r"grid file .*grid\.json: it was tuned for sampler ddim, not unipc-2"):
        other.set_grid_file(grid_file)
    with pytest.warns(UserWarning, match="it was tuned for 6 NFE, this run uses 5"):
        qtaylor.read_grid_file(str(grid_file), sch.schedule, sampler="ddim", nfe=5)
    with pytest.warns(UserWarning, match="it was tuned on schedule discrete, not vp-linear"):
        qtaylor.read_grid_file(str(grid_file), qtaylor.Schedule.vp_linear(), sampler="ddim")


def test_the_sigmas_of_a_diffusers_scheduler_set_the_same_grid():
    """diffusers keeps σ in float32: its σ_max lies a float32 rounding above the float64
    table's edge, which must still be the first time of the grid (issue 31)."""
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    ref.set_timesteps(10)
    ours = QTaylorScheduler.from_config(ref.config)
    ours.set_timesteps(sigmas=ref.sigmas.tolist())
    assert np.allclose(ours.timesteps.numpy().astype(np.float64), ref.timesteps.numpy(), atol=1e-3)
