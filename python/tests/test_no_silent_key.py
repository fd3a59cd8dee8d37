"""No silent key: every config key of every source class that ``from_config`` reproduces,
set to another value the class accepts, is either honoured (the swap without ``sampler``
still ends where the class itself ends, to 1e-5, on the exact-score Gaussian model) or
refused with an error that names the key. One key at a time, from each class's defaults
(DDIM: with clip_sample=False, see BASE)."""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from test_diffusers_parity import GaussianModel, rel_err, run_loop, start_noise
from test_drop_in import EDMGaussianModel

from qtaylor.diffusers import QTaylorScheduler

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

CLASSES = [
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
    DEISMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    EulerAncestralDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    KDPM2DiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    EDMEulerScheduler,
    EDMDPMSolverMultistepScheduler,
]

# Values other than the defaults, per key (the first the class accepts is used; a key with
# several listed is tried with each).
OTHER = {
    "num_train_timesteps": [500],
    "beta_start": [0.00085],
    "beta_end": [0.012],
    "beta_schedule": ["scaled_linear", "squaredcos_cap_v2"],
    "trained_betas": [[0.0001 + i * (0.02 - 0.0001) / 999 for i in range(1000)]],
    "clip_sample": [True, False],
    "clip_sample_range": [0.5],
    "set_alpha_to_one": [False],
    "steps_offset": [1],
    "prediction_type": ["v_prediction", "sample"],
    "thresholding": [True],
    "dynamic_thresholding_ratio": [0.9],
    "sample_max_value": [0.5],
    "timestep_spacing": ["leading", "trailing", "linspace"],
    "rescale_betas_zero_snr": [True],
    "variance_type": ["fixed_large", "fixed_small"],
    "skip_prk_steps": [True],
    "solver_order": [1, 3],
    "algorithm_type": ["sde-dpmsolver++", "dpmsolver"],
    "solver_type": ["heun", "bh1"],
    "lower_order_final": [False],
    "euler_at_final": [True],
    "use_karras_sigmas": [True],
    "use_exponential_sigmas": [True],
    "use_beta_sigmas": [True],
    "use_lu_lambdas": [True],
    "use_flow_sigmas": [True],
    "flow_shift": [3.0],
    "final_sigmas_type": ["sigma_min"],
    "lambda_min_clipped": [-5.0],
    "use_dynamic_shifting": [True],
    "time_shift_type": ["linear"],
    "predict_x0": [False],
    "disable_corrector": [[1]],
    "solver_p": [None],
    "sigma_min": [0.01],
    "sigma_max": [50.0],
    "shift_terminal": [0.1],
    "interpolation_type": ["log_linear"],
    "timestep_type": ["continuous"],
    "sigma_data": [1.0],
    "sigma_schedule": ["exponential"],
    "rho": [5.0],
}

STOCHASTIC = {"ddpm", "dpmpp-2m-sde", "k-euler-a", "k-dpm2-a"}

# What each class's variants start from: its defaults, but DDIM's clip_sample, whose default
# (True) is refused (its own variant checks that), so that the other keys are seen.
BASE = {DDIMScheduler: {"clip_sample": False}}


def _variants():
    out = []
    for cls in CLASSES:
        params = inspect.signature(cls.__init__).parameters
        for key, p in params.items():
            if key in ("self", "kwargs"):
                continue
            assert key in OTHER, f"{cls.__name__}.{key} has no test value: add one to OTHER"
            for v in OTHER[key]:
                if p.default is not inspect.Parameter.empty and v == p.default:
                    continue
                out.append((cls, key, v))
    return out


VARIANTS = _variants()


@pytest.mark.parametrize("cls,key,value", VARIANTS, ids=[f"{c.__name__}-{k}={v!r}"[:80] for c, k, v in VARIANTS])
def test_every_key_of_a_reproduced_class_is_honoured_or_refused(cls, key, value):
    base = dict(BASE.get(cls, {}))
    base[key] = value
    try:
        ref = cls(**base)
        ref.set_timesteps(10)
    except Exception:  # noqa: BLE001 - diffusers itself does not take this value
        pytest.skip(f"{cls.__name__} does not accept {key}={value!r}")
    try:
        ours = QTaylorScheduler.from_config(ref)  # the scheduler itself: its class is known
    except ValueError as e:
        assert f"'{key}'" in str(e), f"refused, but the message does not name '{key}': {e}"
        return
    if not torch.isfinite(ref.timesteps.double()).all():
        # diffusers' own grid is NaN (KDPM2 ancestral's midpoints on squaredcos_cap_v2)
        with pytest.raises(ValueError, match="non-finite timesteps"):
            ours.set_timesteps(10)
        return
    try:
        ours.set_timesteps(10)
    except ValueError as e:  # a grid the source's own step cannot be reproduced on
        assert f"'{key}'" in str(e), f"set_timesteps refused, but does not name '{key}': {e}"
        return
    assert ours.timesteps.tolist() == ref.timesteps.tolist(), (key, value, ours.timesteps.tolist(), ref.timesteps.tolist())
    if cls is DEISMultistepScheduler:
        ref.sigmas = ref.sigmas.double()  # its float32 σ table rounds its coefficients (test_drop_in)
    if cls in (EDMEulerScheduler, EDMDPMSolverMultistepScheduler):
        model = EDMGaussianModel(ref.config.sigma_data, ref.config.prediction_type)
    else:
        model = GaussianModel(ref.alphas_cumprod.to(torch.float64), ref.config.prediction_type)
    x = start_noise(dtype=torch.float64)
    seed = 5 if ours.config.sampler in STOCHASTIC else None
    try:
        a = run_loop(ref, model, x, seed=seed)
    except Exception:  # noqa: BLE001 - diffusers' own step does not take this value
        pytest.skip(f"{cls.__name__}.step fails with {key}={value!r}")
    if not torch.isfinite(a).all():
        pytest.skip(f"{cls.__name__} with {key}={value!r} gives NaN itself")
    b = run_loop(ours, model, x, seed=seed)
    assert rel_err(a, b) <= 1e-5, f"{key}={value!r} was taken but not reproduced: {rel_err(a, b):.2e}"
