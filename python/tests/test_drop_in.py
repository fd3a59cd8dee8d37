"""``QTaylorScheduler.from_config(pipe.scheduler.config)`` reproduces the source scheduler, or
says why it cannot.

The compatibility matrix: each source class reproduced without ``sampler`` (DDIM, DDPM,
PNDM with its Runge-Kutta start, DPM-Solver multistep in its ++ forms, UniPC) × {its defaults, an SD-1.5-style config, an
SDXL-style config, trailing spacing, v-prediction} × {10, 25 steps}: the end point of a full
sampling loop equals the source scheduler's own on the exact-score Gaussian model of
``test_diffusers_parity`` to 1e-5 relative, the same generator for the stochastic ones, and
the network calls (``timesteps``) are the same; likewise the σ-space classes (Euler, Heun,
LMS, KDPM2 and their ancestral forms) and EDM's two schedulers on their own grids. Then the
refusals: a σ-only (VE) config that is not EDM's, a flow config on VP betas or with a flow
algorithm that is not reproduced (flow matching itself: ``test_flow.py``), a source key that would change the run, a class whose algorithm qtaylor does not
reproduce; each names what it refuses.
"""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    DPMSolverSinglestepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    ScoreSdeVeScheduler,
    UniPCMultistepScheduler,
)
from test_diffusers_parity import SHAPE, GaussianModel, rel_err, run_loop, start_noise

from qtaylor.diffusers import QTaylorScheduler

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TOL = 1e-5

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
SDXL = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")

# (label, source class, its own kwargs, the sampler it must map to, stochastic)
SOURCES = [
    ("ddim", DDIMScheduler, dict(clip_sample=False), "ddim", False),
    ("ddpm", DDPMScheduler, dict(clip_sample=False), "ddpm", True),
    ("pndm", PNDMScheduler, dict(), "pndm", False),
    ("plms", PNDMScheduler, dict(skip_prk_steps=True), "plms", False),
    ("dpm++2m", DPMSolverMultistepScheduler, dict(), "dpmpp-2m", False),
    ("dpm++3m", DPMSolverMultistepScheduler, dict(solver_order=3), "dpmpp-3m", False),
    ("dpm++2m-sde", DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), "dpmpp-2m-sde", True),
    ("unipc-2", UniPCMultistepScheduler, dict(), "unipc-2", False),
    ("unipc-3", UniPCMultistepScheduler, dict(solver_order=3), "unipc-3", False),
    # bh1 ending at σ = 0 gives NaN in diffusers itself (a known diffusers bug): sigma_min.
    ("unipc-2-bh1", UniPCMultistepScheduler, dict(solver_type="bh1", final_sigmas_type="sigma_min"), "unipc-2", False),
    ("deis-2", DEISMultistepScheduler, dict(), "deis-logrho-2", False),
    ("deis-3", DEISMultistepScheduler, dict(solver_order=3), "deis-logrho-3", False),
    ("dpm++2s", DPMSolverSinglestepScheduler, dict(), "dpmpp-singlestep-2", False),
    ("dpm++2s-lof", DPMSolverSinglestepScheduler, dict(lower_order_final=True, final_sigmas_type="sigma_min"), "dpmpp-singlestep-2", False),
]
CONFIGS = {
    "defaults": dict(),
    "sd15": dict(SD15, set_alpha_to_one=False),
    "sdxl": SDXL,
    "trailing": dict(timestep_spacing="trailing"),
    "v-prediction": dict(prediction_type="v_prediction", timestep_spacing="trailing"),
    # zero terminal SNR (Lin et al. 2024): v-prediction, trailing, rescaled betas
    "zero-snr": dict(SD15, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
    # "DPM++ 2M Karras": the source's karras σ, its timesteps rounded to integers for the network
    "karras": dict(SD15, use_karras_sigmas=True),
}


def _source(cls, own, cfg_name):
    # the keys the class takes (DPMSolverSinglestep has no spacing keys, …)
    keys = inspect.signature(cls.__init__).parameters
    cfg = {k: v for k, v in CONFIGS[cfg_name].items() if k in keys}
    if cls is DDPMScheduler and cfg_name == "defaults":
        cfg = {}
    return cls(**own, **cfg)


def _end_point_difference(ref, ours, model, stochastic: bool) -> float:
    """A pipeline's loop with each scheduler from the same float64 start noise (the same
    generator seed for a stochastic one): the end points' relative difference."""
    seed = 3 if stochastic else None
    x = start_noise(dtype=torch.float64)
    return rel_err(run_loop(ref, model, x, seed=seed), run_loop(ours, model, x, seed=seed))


def _vp_case(label, cls, own, sampler, stochastic, cfg_name, steps) -> float:
    """The end points' relative difference of one VP cell (after checking the mapping and the
    network calls); PNDM with v-prediction is refused, checked here (returns 0)."""
    if cfg_name == "zero-snr" and "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
        return 0.0  # PNDM and DEIS have no rescale_betas_zero_snr
    ref = _source(cls, own, cfg_name)
    if cfg_name == "zero-snr" and cls in (DDIMScheduler, DDPMScheduler):
        # ᾱ_T = 0 exactly in these two (the others hold 2⁻²⁴): refused, naming the key
        with pytest.raises(ValueError, match="'rescale_betas_zero_snr' = True .* keeps ᾱ_T = 0"):
            QTaylorScheduler.from_config(ref.config)
        return 0.0
    if cfg_name == "karras" and label in ("unipc-2-bh1", "dpm++2s-lof"):
        # sigma_min after a karras grid repeats its last level: UniPC corrects its last step
        # with that call, the singlestep solver counts it in its order list; refused
        ours = QTaylorScheduler.from_config(ref.config)
        ref.set_timesteps(steps)
        with pytest.raises(ValueError, match="'final_sigmas_type' = 'sigma_min' ends its grid on a repeated level"):
            ours.set_timesteps(steps)
        return 0.0
    if label == "deis-3" and cfg_name == "karras" and steps < 15:
        # DEIS repeats its last karras σ (a step of length zero) and lowers its order there
        ours = QTaylorScheduler.from_config(ref.config)
        ref.set_timesteps(steps)
        with pytest.raises(ValueError, match="'use_karras_sigmas' = True ends its grid on a step of length zero"):
            ours.set_timesteps(steps)
        return 0.0
    if label in ("pndm", "plms") and cfg_name == "v-prediction":
        with pytest.raises(ValueError, match="PNDMScheduler's config key 'prediction_type' = 'v_prediction'"):
            QTaylorScheduler.from_config(ref.config)
        return 0.0
    ours = QTaylorScheduler.from_config(ref.config)
    assert ours.config.sampler == sampler
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist(), (ours.timesteps.tolist(), ref.timesteps.tolist())
    if cls is DEISMultistepScheduler:
        # diffusers' DEIS evaluates its closed-form coefficients on its float32 σ table, whose
        # rounding the differences of its antiderivatives magnify (2.5e-5 at order 3, 25
        # steps; measured): in this float64 matrix its σ table is float64 too.
        ref.sigmas = ref.sigmas.double()
    model = GaussianModel(ref.alphas_cumprod.to(torch.float64), ref.config.prediction_type)
    return _end_point_difference(ref, ours, model, stochastic)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("label,cls,own,sampler,stochastic", SOURCES, ids=[s[0] for s in SOURCES])
def test_the_swap_without_a_sampler_reproduces_the_source_scheduler(label, cls, own, sampler, stochastic, cfg_name, steps):
    assert _vp_case(label, cls, own, sampler, stochastic, cfg_name, steps) <= TOL


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler])
def test_keys_left_at_their_defaults_take_the_source_classes_defaults(cls):
    """A default-built DPM-Solver / UniPC uses linspace spacing of N + 1 points; diffusers'
    own from_config would hand QTaylorScheduler's defaults (leading) to those keys."""
    ref = cls()
    assert "timestep_spacing" in ref.config["_use_default_values"]
    kw = {"sampler": "ddim"} if cls is EulerDiscreteScheduler else {}
    with pytest.warns(UserWarning) if kw else _nothing():
        ours = QTaylorScheduler.from_config(ref.config, **kw)
    assert ours.config.timestep_spacing == ref.config.timestep_spacing == "linspace"
    if cls is not EulerDiscreteScheduler:
        ref.set_timesteps(10)
        ours.set_timesteps(10)
        assert ours.timesteps.tolist() == ref.timesteps.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize(
    "cls,kw,says",
    [
        (DEISMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="flow_prediction"), "'use_flow_sigmas' = True"),
        (DPMSolverMultistepScheduler, dict(prediction_type="flow_prediction"), "'prediction_type' = 'flow_prediction'"),
        (ScoreSdeVeScheduler, dict(), "σ-only"),
        (DDIMScheduler, dict(thresholding=True), "'thresholding' = True"),
        (DDIMScheduler, dict(rescale_betas_zero_snr=True), "'rescale_betas_zero_snr' = True"),
        (DPMSolverMultistepScheduler, dict(euler_at_final=True), "'euler_at_final' = True"),
        (DPMSolverMultistepScheduler, dict(solver_type="heun"), "'solver_type' = 'heun'"),
        (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "'algorithm_type' = 'dpmsolver'"),
        (UniPCMultistepScheduler, dict(disable_corrector=[1]), "'disable_corrector' = [1]"),
        (DPMSolverSDEScheduler, dict(), "nearest: dpmpp-2m-sde"),
        (DPMSolverSinglestepScheduler, dict(solver_order=3), "'solver_order' = 3"),
        (DDPMScheduler, dict(rescale_betas_zero_snr=True), "keeps ᾱ_T = 0"),
    ],
)
def test_a_config_the_swap_cannot_reproduce_is_refused_with_its_name(cls, kw, says):
    ref = cls(**kw)
    with pytest.raises(ValueError) as e:
        QTaylorScheduler.from_config(ref.config)
    msg = str(e.value)
    assert says in msg, msg
    assert type(ref).__name__ in msg, msg


# The σ-space (k-diffusion) classes: (label, class, own kwargs, sampler, stochastic).
SIGMA_SOURCES = [
    ("euler", EulerDiscreteScheduler, dict(), "k-euler", False),
    ("euler-a", EulerAncestralDiscreteScheduler, dict(), "k-euler-a", True),
    ("heun", HeunDiscreteScheduler, dict(), "k-heun", False),
    ("kdpm2", KDPM2DiscreteScheduler, dict(), "k-dpm2", False),
    ("kdpm2-a", KDPM2AncestralDiscreteScheduler, dict(), "k-dpm2-a", True),
    ("lms", LMSDiscreteScheduler, dict(), "k-lms", False),
]
SIGMA_CONFIGS = {
    "defaults": dict(),
    "sd15": SD15,
    "sdxl": dict(SDXL, interpolation_type="linear"),
    "trailing": dict(timestep_spacing="trailing"),
    "karras": dict(SD15, use_karras_sigmas=True),
    "v-prediction": dict(prediction_type="v_prediction", timestep_spacing="trailing"),
    # Euler's own grid keys.
    "log-linear": dict(SD15, timestep_spacing="linspace", interpolation_type="log_linear"),
    "sigma-min": dict(SD15, final_sigmas_type="sigma_min"),
    "continuous-v": dict(prediction_type="v_prediction", timestep_type="continuous", use_karras_sigmas=True),
    "zero-snr": dict(SD15, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True),
}


def _sigma_case(label, cls, own, sampler, stochastic, cfg_name, steps) -> Optional[float]:
    """The end points' relative difference of one σ-space cell, None where diffusers does not
    take the config."""
    try:
        ref = cls(**own, **SIGMA_CONFIGS[cfg_name])
        ref.set_timesteps(steps)
    except TypeError:
        return None
    ours = QTaylorScheduler.from_config(ref)
    assert ours.config.sampler == sampler and ours.config.reproduces == cls.__name__
    ours.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    model = GaussianModel(ref.alphas_cumprod.to(torch.float64), ref.config.prediction_type)
    if cfg_name == "continuous-v":
        model = _NoiseLevelModel(model)
    return _end_point_difference(ref, ours, model, stochastic)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("cfg_name", list(SIGMA_CONFIGS))
@pytest.mark.parametrize("label,cls,own,sampler,stochastic", SIGMA_SOURCES, ids=[s[0] for s in SIGMA_SOURCES])
def test_the_swap_reproduces_the_sigma_space_schedulers_in_their_own_state(label, cls, own, sampler, stochastic, cfg_name, steps):
    """Euler, Euler ancestral, Heun, KDPM2 (ancestral) and LMS: the swap runs k-diffusion's
    algorithm on the source's own σ levels and network timesteps, in the source's state x/α
    (its init_noise_sigma and scale_model_input), so a pipeline's loop ends where the source
    ends, to 1e-5, with the same generator for the ancestral ones."""
    err = _sigma_case(label, cls, own, sampler, stochastic, cfg_name, steps)
    if err is None:
        pytest.skip(f"{cls.__name__} does not take {cfg_name}")
    assert err <= TOL


def _readme_matrix() -> dict:
    """README's compatibility table: row label -> the worst difference it states."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = text.split("<!-- drop-in matrix -->", 2)[1]
    rows = {}
    for line in table.splitlines():
        m = re.match(r"\s*\| `([^`]+)` \|.*\| ([0-9.]+e-[0-9]+) \|$", line)
        if m:
            rows[m.group(1)] = float(m.group(2))
    return rows


def test_readme_states_the_measured_worst_difference_of_every_class():
    """README's compatibility matrix gives, per reproduced source (the labels of SOURCES and
    SIGMA_SOURCES), the worst end-point difference over its configs and 10/25 steps, as
    measured here: the measured value to two digits, or up to 4× above it (the last digits of
    floating point can move between CPUs)."""
    stated = _readme_matrix()
    measured = {}
    for case in SOURCES:
        for cfg_name in CONFIGS:
            for steps in (10, 25):
                measured[case[0]] = max(measured.get(case[0], 0.0), _vp_case(*case, cfg_name, steps))
    for cases, configs, case_fn in ((SIGMA_SOURCES, SIGMA_CONFIGS, _sigma_case), (EDM_SOURCES, EDM_CONFIGS, _edm_case)):
        for case in cases:
            for cfg_name in configs:
                for steps in (10, 25):
                    err = case_fn(*case, cfg_name, steps)
                    if err is not None:
                        measured[case[0]] = max(measured.get(case[0], 0.0), err)
    table = "\n".join(f"{k}: {v:.1e}" for k, v in measured.items())
    assert set(stated) == set(measured), f"README's rows {sorted(stated)}; measured:\n{table}"
    for label, err in measured.items():
        assert err / 1.1 <= stated[label] <= 4 * max(err, 1e-15), f"{label}: README says {stated[label]:.1e}; measured:\n{table}"


class _NoiseLevelModel:
    """A network whose time input is EDM's c_noise = ¼ ln σ (timestep_type='continuous'):
    the Gaussian model at the fractional table step of that σ."""

    def __init__(self, model):
        self.model = model
        ac = model.ac.double()
        self.log_sigmas = (((1 - ac) / ac) ** 0.5).log().numpy()

    def __call__(self, x, t):
        step = np.interp(4 * float(t), self.log_sigmas, np.arange(len(self.log_sigmas)))
        return self.model(x, float(step))


# EDM's schedulers: (label, class, own kwargs, sampler, stochastic).
EDM_SOURCES = [
    ("edm-euler", EDMEulerScheduler, dict(), "k-euler", False),
    ("edm-dpm++2m", EDMDPMSolverMultistepScheduler, dict(), "dpmpp-2m", False),
    ("edm-dpm++3m", EDMDPMSolverMultistepScheduler, dict(solver_order=3), "dpmpp-3m", False),
    ("edm-dpm++2m-sde", EDMDPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++"), "dpmpp-2m-sde", True),
]
EDM_CONFIGS = {
    "defaults": dict(),  # karras, σ in [0.002, 80], sigma_data 0.5
    "exponential": dict(sigma_schedule="exponential"),
    "sigma-min": dict(final_sigmas_type="sigma_min"),
    "v-prediction": dict(prediction_type="v_prediction"),
    # the σ range of an SD-style VP model, sigma_data 1
    "sd-range": dict(sigma_min=0.0292, sigma_max=14.6146, sigma_data=1.0, rho=5.0),
}


class EDMGaussianModel:
    """The network F of EDM's preconditioning whose denoiser D = c_skip x + c_out F is the exact
    x̂0 of N(μ, s²) per pixel (+ 0.1·tanh(x W), as GaussianModel), at the network time
    c_noise = ¼ ln σ and input c_in x = x/√(σ² + σ_data²) (EDM's Table 1, independent of the
    schedulers' code)."""

    def __init__(self, sigma_data: float, prediction_type: str, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.mu = (torch.randn(SHAPE[1:], generator=g) * 0.5).double()
        self.sd = (torch.rand(SHAPE[1:], generator=g) * 0.5 + 0.2).double()
        self.w = (torch.randn(SHAPE[-1], SHAPE[-1], generator=g) * 0.3).double()
        self.sigma_data = sigma_data
        self.sign = -1.0 if prediction_type == "v_prediction" else 1.0

    def __call__(self, x_in, t):
        sigma, sd2 = math.exp(4 * float(t)), self.sigma_data**2
        x = x_in.double() * math.sqrt(sigma**2 + sd2)
        d = (self.sd**2 * x + sigma**2 * self.mu) / (self.sd**2 + sigma**2) + 0.1 * torch.tanh(x @ self.w) * sigma / (1 + sigma)
        c_skip, c_out = sd2 / (sigma**2 + sd2), self.sign * sigma * self.sigma_data / math.sqrt(sigma**2 + sd2)
        return ((d - c_skip * x) / c_out).to(x_in.dtype)


def _edm_case(label, cls, own, sampler, stochastic, cfg_name, steps) -> Optional[float]:
    """The end points' relative difference of one EDM cell; None where the swap refuses it
    (checked here: DPM-Solver++(3M) ending on EDM's repeated sigma_min, a step of length ~0
    that diffusers takes with its order-3 update: NaN from 15 steps on)."""
    ref = cls(**own, **EDM_CONFIGS[cfg_name])
    ours = QTaylorScheduler.from_config(ref.config)
    assert ours.config.sampler == sampler and ours.config.reproduces == cls.__name__
    ref.set_timesteps(steps)
    if label == "edm-dpm++3m" and cfg_name == "sigma-min":
        with pytest.raises(ValueError, match="'final_sigmas_type' = 'sigma_min' ends its grid on a step of length zero"):
            ours.set_timesteps(steps)
        return None
    ours.set_timesteps(steps)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    assert ours.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=1e-6, atol=0)
    model = EDMGaussianModel(ref.config.sigma_data, ref.config.prediction_type)
    return _end_point_difference(ref, ours, model, stochastic)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("cfg_name", list(EDM_CONFIGS))
@pytest.mark.parametrize("label,cls,own,sampler,stochastic", EDM_SOURCES, ids=[s[0] for s in EDM_SOURCES])
def test_the_swap_reproduces_edms_schedulers_with_their_preconditioning(label, cls, own, sampler, stochastic, cfg_name, steps):
    """EDMEulerScheduler and EDMDPMSolverMultistepScheduler: the swap runs k-euler / DPM-Solver++
    on the VE path (Schedule.ve) over the source's own σ grid and network times, with the
    source's c_in and D = c_skip x + c_out F as x̂0, and ends where the source ends, to 1e-5."""
    err = _edm_case(label, cls, own, sampler, stochastic, cfg_name, steps)
    if err is not None:
        assert err <= TOL


def test_an_explicit_sampler_on_an_edm_config_runs_on_its_grid_or_says_why_not():
    """EDM configs have no VP table: an explicit sampler runs on the source's σ grid and network
    times, which allows one call per level; a sampler with more calls per step is refused."""
    ref = EDMEulerScheduler()
    with pytest.warns(UserWarning, match="in place of EDMEulerScheduler"):
        ours = QTaylorScheduler.from_config(ref.config, sampler="dpmpp-2m")
    model = EDMGaussianModel(ref.config.sigma_data, ref.config.prediction_type)
    x = start_noise(dtype=torch.float64)
    ends = {}
    for steps in (10, 200):
        ref.set_timesteps(steps)
        ours.set_timesteps(steps)
        assert ours.timesteps.tolist() == ref.timesteps.tolist()
        ends[steps] = run_loop(ref, model, x), run_loop(ours, model, x)
    # both converge to the same flow; at 10 steps DPM-Solver++(2M) is the closer to it
    assert rel_err(*ends[200]) < 3e-2  # Euler is first order: 1e-2 from the flow at 200 steps
    truth = ends[200][1]
    assert rel_err(ends[10][1], truth) < 0.5 * rel_err(ends[10][0], truth)
    with pytest.warns(UserWarning):
        heun = QTaylorScheduler.from_config(ref.config, sampler="heun")
    with pytest.raises(ValueError, match="sampler 'heun' calls the network 19 times on EDMEulerScheduler's grid"):
        heun.set_timesteps(10)


def test_an_edm_swap_has_sigmas_and_no_beta_table():
    ours = QTaylorScheduler.from_config(EDMEulerScheduler().config)
    assert float(ours.sigmas[0]) == pytest.approx(80.0)
    with pytest.raises(AttributeError):  # as EDMEulerScheduler has none
        ours.alphas_cumprod
    ours.set_timesteps(5)
    assert ours.sigmas.tolist()[-1] == 0.0 and len(ours.timesteps) == 5


def test_naming_the_sources_own_sampler_on_a_karras_config_still_reproduces_it():
    """DPM++ 2M Karras with sampler='dpmpp-2m' (its own algorithm): the source's grid, rounded
    timesteps and all, not qtaylor's fractional one; another sampler gets qtaylor's grid and a
    warning."""
    ref = DPMSolverMultistepScheduler(**SD15, use_karras_sigmas=True)
    ours = QTaylorScheduler.from_config(ref.config, sampler="dpmpp-2m")
    assert ours.config.reproduces == "DPMSolverMultistepScheduler"
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    model = GaussianModel(ref.alphas_cumprod.to(torch.float64), "epsilon")
    x = start_noise(dtype=torch.float64)
    assert rel_err(run_loop(ref, model, x), run_loop(ours, model, x)) <= TOL
    with pytest.warns(UserWarning, match="in place of DPMSolverMultistepScheduler"):
        other = QTaylorScheduler.from_config(ref.config, sampler="unipc-2")
    other.set_timesteps(10)
    assert other.config.reproduces is None and other.timesteps.dtype == torch.float32  # fractional


@pytest.mark.parametrize("cls", [DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler])
def test_zero_terminal_snr_rescaling_gives_diffusers_table(cls):
    """rescale_betas_zero_snr: the core's rescaling (Lin et al. 2024, Algorithm 1, float32)
    gives diffusers' betas and ᾱ to float32 rounding (torch's float32 sqrt is not correctly
    rounded on every CPU: up to one ulp of √ᾱ apart, which the cancellation near ᾱ_T = 0
    magnifies), and ᾱ_T = 2⁻²⁴ exactly, as these classes hold it."""
    ref = cls(**SD15, rescale_betas_zero_snr=True)
    ours = QTaylorScheduler.from_config(ref)
    assert float(ref.betas[-1]) == float(ours.betas[-1]) == 1.0
    assert float(ours.alphas_cumprod[-1]) == float(ref.alphas_cumprod[-1]) == 2.0**-24
    torch.testing.assert_close(ours.betas, ref.betas, rtol=0, atol=5e-6)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=5e-7)


@pytest.mark.parametrize(
    "cls,kw",
    [
        (DDPMScheduler, dict(clip_sample=False)),
        (DPMSolverMultistepScheduler, dict()),
        (DPMSolverMultistepScheduler, dict(solver_order=3, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)),
        (UniPCMultistepScheduler, dict(prediction_type="v_prediction")),
        (EDMDPMSolverMultistepScheduler, dict()),
    ],
)
def test_dynamic_thresholding_is_reproduced(cls, kw):
    """thresholding=True (Imagen's dynamic thresholding of x̂0, per sample: the core's
    X0Clip::Threshold, a per-row quantile in TorchOps): the end point equals diffusers' own to
    1e-5, and differs from the unthresholded run (the threshold bites on this model)."""
    edm = cls is EDMDPMSolverMultistepScheduler
    ends = []
    for on in (True, False):
        ref = cls(thresholding=on, **kw)
        ours = QTaylorScheduler.from_config(ref.config)
        ref.set_timesteps(10)
        ours.set_timesteps(10)
        if edm:
            model = EDMGaussianModel(ref.config.sigma_data, ref.config.prediction_type)
        else:
            model = GaussianModel(ref.alphas_cumprod.to(torch.float64), ref.config.prediction_type)
        seed = 3 if cls is DDPMScheduler else None
        x = start_noise(dtype=torch.float64) * (3.0 if not edm else 1.0)
        a, b = run_loop(ref, model, x, seed=seed), run_loop(ours, model, x, seed=seed)
        assert rel_err(a, b) <= TOL
        ends.append(b)
    assert rel_err(ends[0], ends[1]) > 1e-3


def test_ddim_thresholding_is_refused_and_runs_with_an_explicit_sampler():
    ref = DDIMScheduler(thresholding=True)
    with pytest.raises(ValueError, match="'thresholding' = True .* unthresholded ε̂"):
        QTaylorScheduler.from_config(ref.config)
    with pytest.warns(UserWarning, match="in place of DDIMScheduler"):
        ours = QTaylorScheduler.from_config(ref.config, sampler="dpmpp-2m")
    assert ours.config.thresholding


def test_thresholding_in_the_loop_equals_the_scheduler():
    """qtaylor.torch.sample(threshold=(ratio, max)) runs the same core op as the scheduler."""
    import qtaylor.torch as qt

    ref = DPMSolverMultistepScheduler(thresholding=True, timestep_spacing="trailing")
    ours = QTaylorScheduler.from_config(ref.config)
    ours.set_timesteps(8)
    model = GaussianModel(ref.alphas_cumprod.to(torch.float64), "epsilon")
    x = start_noise(dtype=torch.float64)
    a = run_loop(ours, model, x)
    b = qt.sample(lambda x, t: model(x, float(t[0])), x.clone(), sampler="dpmpp-2m", steps=8, spacing="trailing",
                  threshold=(0.995, 1.0)).x
    assert rel_err(a, b) <= 1e-10


def test_pndm_with_an_odd_gap_is_refused_where_its_midpoints_leave_the_middle():
    """PNDMScheduler's Runge-Kutta start puts its midpoints T//N//2 after each timestep: with
    T//N odd (8 steps: 62 of 125) they are off the middle, which qtaylor's pndm keeps."""
    ref = PNDMScheduler(**SD15)
    ours = QTaylorScheduler.from_config(ref.config)
    with pytest.raises(ValueError, match=r"T//N//2 = 62 .* T//N = 125 \(num_inference_steps=8\)"):
        ours.set_timesteps(8)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()


def test_a_config_whose_keys_fit_several_algorithms_asks_for_its_class():
    """LMS, KDPM2 and KDPM2 ancestral have the same config keys: a config built in memory
    (no '_class_name') cannot say which it is. The scheduler itself, or the class name, can."""
    ref = KDPM2DiscreteScheduler()
    with pytest.raises(ValueError, match="KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LMSDiscreteScheduler"):
        QTaylorScheduler.from_config(ref.config)
    assert QTaylorScheduler.from_config(ref).config.sampler == "k-dpm2"
    named = dict(ref.config, _class_name="LMSDiscreteScheduler")
    assert QTaylorScheduler.from_config(named).config.sampler == "k-lms"


def test_a_sigma_space_swap_keeps_the_sources_state_for_img2img_and_copies():
    """add_noise gives the source's state x0 + σ ε at a grid timestep; a copy made mid-setup
    keeps the source's grid and its network timesteps."""
    import copy

    ref = EulerDiscreteScheduler(**SD15)
    ours = QTaylorScheduler.from_config(ref)
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    x0, eps = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), torch.randn(2, 4)
    t = ref.timesteps[3:4]
    torch.testing.assert_close(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), rtol=1e-5, atol=1e-5)
    twin = copy.deepcopy(ours)
    assert twin.timesteps.tolist() == ours.timesteps.tolist()
    assert twin.init_noise_sigma == ours.init_noise_sigma
    model = GaussianModel(ref.alphas_cumprod.to(torch.float64), "epsilon")
    assert rel_err(run_loop(ours, model, start_noise(dtype=torch.float64)), run_loop(twin, model, start_noise(dtype=torch.float64))) == 0.0


def test_an_explicit_sampler_runs_on_any_vp_config_and_says_what_it_replaces():
    ref = EulerDiscreteScheduler(**SD15)
    with pytest.warns(UserWarning, match="in place of EulerDiscreteScheduler"):
        ours = QTaylorScheduler.from_config(ref.config, sampler="ddim")
    assert ours.config.sampler == "ddim" and ours.config.beta_schedule == "scaled_linear"
    # A source whose own algorithm is refused still runs a sampler the user chose.
    with pytest.warns(UserWarning, match="in place of DPMSolverMultistepScheduler"):
        QTaylorScheduler.from_config(DPMSolverMultistepScheduler(solver_type="heun").config, sampler="dpmpp-2m")
    # On a flow config the sampler runs on the flow path (test_flow.py), with the same warning.
    with pytest.warns(UserWarning, match="in place of FlowMatchEulerDiscreteScheduler"):
        ours = QTaylorScheduler.from_config(FlowMatchEulerDiscreteScheduler().config, sampler="qt-3")
    assert ours.config.prediction_type == "flow_prediction" and ours.schedule.name.startswith("flow")


def test_euler_names_which_euler_it_is():
    with pytest.warns(UserWarning, match="EulerDiscreteScheduler .Euler in σ. computes qtaylor's 'ddim'"):
        QTaylorScheduler(sampler="euler")


def test_set_alpha_to_one_false_ends_at_the_first_trained_step_as_ddim_does():
    ref = DDIMScheduler(**SD15, set_alpha_to_one=False, clip_sample=False)
    ours = QTaylorScheduler.from_config(ref.config)
    assert ours.config.final_sigmas_type == "sigma_min"
    on = QTaylorScheduler.from_config(DDIMScheduler(**SD15, clip_sample=False).config)
    assert on.config.final_sigmas_type == "zero"


@pytest.mark.parametrize("cls", [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler])
def test_the_tables_equal_the_source_schedulers(cls):
    if cls is DDPMScheduler:
        ref = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    else:
        ref = cls(**SD15, **({"clip_sample": False} if cls is DDIMScheduler else {}))
    ours = QTaylorScheduler.from_config(ref.config)
    assert torch.equal(ours.betas, ref.betas.float())
    assert torch.equal(ours.alphas, ref.alphas.float())
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod.float(), rtol=0, atol=0)
    if isinstance(ref, DPMSolverMultistepScheduler):
        ref.set_timesteps(10)
        ours.set_timesteps(10)
        np.testing.assert_allclose(ours.sigmas.numpy(), ref.sigmas.numpy(), rtol=1e-6)


def test_trained_betas_survive_a_save_and_a_load(tmp_path):
    """diffusers' SchedulerCommonTest.test_trained_betas, as its own test."""
    s = QTaylorScheduler(trained_betas=np.array([0.1, 0.3]), sampler="ddim")
    s.save_pretrained(tmp_path)
    t = QTaylorScheduler.from_pretrained(tmp_path)
    assert s.betas.tolist() == t.betas.tolist()
    assert torch.allclose(s.betas, torch.tensor([0.1, 0.3]))


@pytest.mark.parametrize("cls", [DDIMScheduler, PNDMScheduler])
def test_a_grid_whose_gaps_the_sources_step_cannot_take_is_refused(cls):
    """DDIM steps to t - T//N and PNDM puts its midpoints T//N//2 on: on a grid with other
    gaps (linspace, trailing with N not dividing T) their run is not reproducible."""
    kw = {"clip_sample": False} if cls is DDIMScheduler else {}
    ours = QTaylorScheduler.from_config(cls(timestep_spacing="trailing", **kw).config)
    ours.set_timesteps(25)  # 1000 / 25: every gap is 40
    with pytest.raises(ValueError, match="'timestep_spacing' = 'trailing' with 30 steps"):
        ours.set_timesteps(30)
    ours = QTaylorScheduler.from_config(cls(timestep_spacing="linspace", **kw).config)
    with pytest.raises(ValueError, match=f"reproduces {cls.__name__}"):
        ours.set_timesteps(10)
    # With an explicit sampler it is qtaylor's own run on that grid: allowed.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = QTaylorScheduler.from_config(cls(timestep_spacing="linspace", **kw).config, sampler="ddim")
    s.set_timesteps(10)
    assert s.config.reproduces is None
