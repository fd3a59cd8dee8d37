"""Every qtaylor sampler as a drop-in diffusers scheduler.

>>> from qtaylor.diffusers import QTaylorScheduler
>>> pipe.scheduler = QTaylorScheduler.from_config(pipe.scheduler.config, sampler="qt-3")

How it works: ``set_timesteps`` asks the Rust core to run the sampler once on a recorder,
which writes down the whole run as a program (network calls, linear combinations with
their f64 coefficients, noise draws). ``timesteps`` are the program's network calls;
``step`` feeds one network output into the program and runs it to the next call. The state
kept between calls is explicit (the program and its registers, :class:`qtaylor._core.Replay`),
and the samplers are the same code the ``qtaylor`` command line runs.

Samplers with several network calls per step (heun, rk4, dpm-solver-2/3, dpmpp-2s,
edm-heun) list every call in ``timesteps`` and set ``order`` to the calls per step, as
diffusers' HeunDiscreteScheduler does. The adaptive solvers (rk45, dpm-solver-12/23)
decide their calls from the tensors, so they raise an error that points to
:func:`qtaylor.torch.sample`.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin, FrozenDict, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from . import _core
from ._ops import TorchOps, all_finite, work_dtype

__all__ = ["QTaylorScheduler", "QTaylorSchedulerOutput"]


@dataclass
class QTaylorSchedulerOutput(BaseOutput):
    """``prev_sample``: the state for the next network call (or the final sample);
    ``pred_original_sample``: x̂0 implied by this call's output."""

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


_UNSUPPORTED = {
    "use_exponential_sigmas": "exponential sigmas (pass sigmas= to set_timesteps)",
    "use_beta_sigmas": "beta sigmas (pass sigmas= to set_timesteps)",
    "invert_sigmas": "inverted flow sigmas (1 − ς, ending at pure noise)",
    "stochastic_sampling": "FlowMatchEuler's stochastic step (1 − ς') x̂0 + ς' z, fresh noise only; nearest: "
    "sampler='ddpm' or 'dpmpp-2m-sde'",
}


# ---------------------------------------------------------------------------------------
# Reproducing another scheduler from its config


def _dpm_multistep(cfg: dict) -> str:
    algo, order = cfg.get("algorithm_type", "dpmsolver++"), cfg.get("solver_order", 2)
    if order >= 2 and cfg.get("solver_type", "midpoint") != "midpoint":
        raise _refused(
            cfg, "solver_type", "qtaylor's DPM-Solver++ multistep is the midpoint form", "nearest: sampler='dpmpp-2m'"
        )
    if algo == "dpmsolver++" and order in (2, 3):
        return f"dpmpp-{order}m"
    if algo == "dpmsolver++" and order == 1:
        return "ddim"
    if algo == "sde-dpmsolver++" and order == 2:
        return "dpmpp-2m-sde"
    raise _refused(
        cfg,
        "algorithm_type",
        f"with solver_order={order}, qtaylor has no multistep sampler of this kind",
        "nearest: sampler='dpmpp-2m', 'dpmpp-3m' or 'dpmpp-2m-sde'",
    )


def _unipc(cfg: dict) -> str:
    order = cfg.get("solver_order", 2)
    if not 1 <= order <= 3:
        raise _refused(cfg, "solver_order", "qtaylor's UniPC has orders 1 to 3", "nearest: sampler='unipc-3'")
    return f"unipc-{order}"


def _dpm_singlestep(cfg: dict) -> str:
    """diffusers' DPMSolverSinglestepScheduler with DPM-Solver++ (midpoint), orders 1 and 2:
    dpmpp-singlestep-K (its order list over the grid's own points)."""
    algo, order = cfg.get("algorithm_type", "dpmsolver++"), cfg.get("solver_order", 2)
    if algo != "dpmsolver++":
        raise _refused(
            cfg, "algorithm_type", "qtaylor's singlestep DPM-Solver is the ++ (data prediction) form",
            "nearest: sampler='dpm-solver-2' (noise prediction, λ-midpoint)",
        )
    if order >= 2 and cfg.get("solver_type", "midpoint") != "midpoint":
        raise _refused(
            cfg, "solver_type", "qtaylor's singlestep DPM-Solver++ is the midpoint form",
            "nearest: sampler='dpmpp-singlestep-2'",
        )
    if order not in (1, 2):
        raise _refused(
            cfg, "solver_order", "qtaylor's singlestep DPM-Solver++ has orders 1 and 2",
            "nearest: sampler='dpmpp-singlestep-2' or 'dpm-solver-3'",
        )
    return f"dpmpp-singlestep-{order}"


def _deis(cfg: dict) -> str:
    """diffusers' DEIS (algorithm 'deis', solver 'logrho': ε Lagrange in ln ρ, integrated in
    ρ = σ/α), orders 1 to 3: deis-logrho-K."""
    order = cfg.get("solver_order", 2)
    if not 1 <= order <= 3:
        raise _refused(cfg, "solver_order", "qtaylor's DEIS has orders 1 to 3", "nearest: sampler='deis-logrho-3'")
    return f"deis-logrho-{order}"


def _pndm(cfg: dict) -> str:
    """PNDM with its Runge-Kutta start (pndm), or with skip_prk_steps PLMS (plms: one
    pseudo-Heun step, then Adams-Bashforth 2, 3, 4, the network's calls as diffusers lists
    them)."""
    if cfg.get("prediction_type") == "v_prediction":
        raise _refused(
            cfg,
            "prediction_type",
            "diffusers' PNDM turns v into ε with the sample and ᾱ of the step's start, not the call's "
            "(its Runge-Kutta calls differ by 0.18, measured)",
            "nearest: sampler='pndm' (which converts at each call)",
        )
    return "plms" if cfg.get("skip_prk_steps", False) else "pndm"


# The diffusers classes reproduced from their config without `sampler`: the qtaylor sampler
# of the same algorithm (tested against the class itself, python/tests/test_drop_in.py).
SOURCES = {
    "DDIMScheduler": lambda cfg: "ddim",
    "DDPMScheduler": lambda cfg: "ddpm",
    "PNDMScheduler": _pndm,
    "DPMSolverMultistepScheduler": _dpm_multistep,
    "UniPCMultistepScheduler": _unipc,
    "DEISMultistepScheduler": _deis,
    "DPMSolverSinglestepScheduler": _dpm_singlestep,
    "EulerDiscreteScheduler": lambda cfg: "k-euler",
    "EulerAncestralDiscreteScheduler": lambda cfg: "k-euler-a",
    "HeunDiscreteScheduler": lambda cfg: "k-heun",
    "KDPM2DiscreteScheduler": lambda cfg: "k-dpm2",
    "KDPM2AncestralDiscreteScheduler": lambda cfg: "k-dpm2-a",
    "LMSDiscreteScheduler": lambda cfg: "k-lms",
    "EDMEulerScheduler": lambda cfg: "k-euler",
    "EDMDPMSolverMultistepScheduler": _dpm_multistep,
    # x + (ς' − ς) v̂ is DDIM on the flow path, exactly (from ς = 1 too)
    "FlowMatchEulerDiscreteScheduler": lambda cfg: "ddim",
}

# Rectified-flow (SD3, Flux) sources: FlowMatchEulerDiscreteScheduler, and DPM-Solver
# multistep / UniPC with use_flow_sigmas. The source's own set_timesteps makes the levels ς
# (shift, mu, shift_terminal, karras/exponential/beta sigmas, and the pipeline's sigmas=),
# the sampler runs on Schedule.flow at those levels in VP coordinates, and the state the
# pipeline holds is the flow state (1 − ς) x0 + ς ε = VP state × state_scale.
_FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler",)


def _is_flow(cfg: dict, name: str) -> bool:
    return name in _FLOW_CLASSES or bool(cfg.get("use_flow_sigmas")) or cfg.get("prediction_type") == "flow_prediction"

# The σ-space (k-diffusion) classes: their state is x/α (``init_noise_sigma`` σ_max or
# √(σ_max² + 1), ``scale_model_input`` divides by √(σ² + 1)), and their grid — spacing,
# interpolation, karras / exponential / beta sigmas, timestep_type, final sigma — is the
# source class's own: set_timesteps asks the source class for its sigmas and network
# timesteps, and the qtaylor sampler runs on exactly those levels and calls the network
# at exactly those timesteps.
_SIGMA_CLASSES = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "LMSDiscreteScheduler",
)
# EDM's schedulers (Karras et al. 2022): the variance-exploding path x0 + σ ε (qtaylor's
# Schedule.ve, in VP coordinates), the source's own σ grid (karras or exponential between
# sigma_min and sigma_max), network times c_noise = ¼ ln σ, input scaling c_in and output
# preconditioning D = c_skip x + c_out F (the source class's precondition_inputs/outputs, with
# its sigma_data): the qtaylor sampler takes D as its x̂0 (prediction "sample").
_EDM_CLASSES = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
# The continuous σ grids of the multistep classes, made by the source class itself when its
# algorithm is reproduced (its network timesteps are those σ rounded to integer steps).
_SOURCE_GRIDS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


def _repeat_key(cfg) -> tuple:
    """The config key behind a source grid's repeated last level: final_sigmas_type =
    'sigma_min', else the continuous grid that is on (DEIS repeats its last karras σ)."""
    if cfg.get("final_sigmas_type") == "sigma_min":
        return "final_sigmas_type", "sigma_min"
    key = next((k for k in _SOURCE_GRIDS if cfg.get(k)), "final_sigmas_type")
    return key, cfg.get(key)


# Grid keys of the classes whose source makes the grid (σ-space, EDM, and multistep with a
# continuous σ grid), honoured by the source's own set_timesteps.
_GRID_BY_SOURCE = {
    "use_lu_lambdas",
    "sigma_data",
    "sigma_schedule",
    "rho",
    "interpolation_type",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "sigma_min",
    "sigma_max",
    "timestep_type",
    "final_sigmas_type",
}

# Classes whose spacing is the multistep one (N + 1 points, the last dropped).
_MULTISTEP = (
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "DPMSolverSinglestepScheduler",
)

# VP classes that run with an explicit `sampler` (their schedule keys are honoured), but
# whose own algorithm qtaylor does not reproduce, with the nearest qtaylor sampler.
_NEAREST = {
    "DPMSolverSDEScheduler": "dpmpp-2m-sde",
    "LCMScheduler": "ddim",
    "TCDScheduler": "ddim",
}

# The samplers whose lower_order_final lowers the order over the last steps (diffusers'
# multistep rule: min(order, steps left) with fewer than 15 steps).
_LOWERS_AT_THE_END = (
    "dpmpp-2m",
    "dpmpp-3m",
    "dpmpp-2m-sde",
    "unipc-2",
    "unipc-3",
    "deis-2",
    "deis-3",
    "deis-logrho-2",
    "deis-logrho-3",
)
_SECOND_ORDER_AT_THE_END = ("dpmpp-2m", "dpmpp-2m-sde", "deis-2", "deis-logrho-2")

# Source keys honoured by choosing the sampler or its options (above, and in _translate).
_CONSUMED = {"solver_order", "algorithm_type", "solver_type", "skip_prk_steps", "set_alpha_to_one", "disable_corrector", "predict_x0"}

# Source keys QTaylorScheduler does not implement, with the one value that leaves the run as
# it is (any other value is refused, naming the key).
_NEUTRAL = {
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "euler_at_final": False,
    "lambda_min_clipped": -float("inf"),
    "solver_p": None,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_type": "discrete",
    "interpolation_type": "linear",
}
# Keys that matter only through another.
_IDLE: set = set()


@functools.lru_cache(maxsize=None)
def _classes_by_keys() -> dict:
    """diffusers' scheduler classes by the set of their config keys (their __init__'s)."""
    import diffusers.schedulers as schedulers

    by_keys: dict = {}
    for n in sorted(dir(schedulers)):
        c = getattr(schedulers, n, None)
        if isinstance(c, type) and issubclass(c, SchedulerMixin) and c is not SchedulerMixin:
            keys = frozenset(k for k in inspect.signature(c.__init__).parameters if k not in ("self", "kwargs"))
            by_keys.setdefault(keys, []).append(n)
    return by_keys


def _source_name(config) -> Optional[str]:
    """The class whose config this is: its ``_class_name`` (a config read from a file), or,
    for a scheduler built in memory (whose config has none), the diffusers scheduler class
    whose config keys are exactly these (of equals, the plain one: DDIMScheduler before
    DDIMParallelScheduler, the same algorithm; other equals, e.g. LMS and KDPM2, are an
    error that asks for the class)."""
    name = config.get("_class_name")
    if name is not None:
        return name
    keys = frozenset(k for k in config if not k.startswith("_"))
    if "sampler" in keys:
        return None  # QTaylorScheduler's own
    names = _classes_by_keys().get(keys, [])
    if len({n.replace("Parallel", "") for n in names}) > 1:
        raise ValueError(
            "QTaylorScheduler.from_config: this config has no '_class_name' (a scheduler built in memory) and "
            f"its keys fit {', '.join(names)} alike, which are different algorithms; pass the scheduler itself, "
            "QTaylorScheduler.from_config(pipe.scheduler), or add its '_class_name' to the config"
        )
    return min(names, key=len) if names else None


def _refused(cfg: dict, key: str, why: str, way_out: str) -> ValueError:
    name = cfg.get("_class_name", "the source scheduler")
    return ValueError(
        f"QTaylorScheduler.from_config: {name}'s config key '{key}' = {cfg.get(key)!r} is not reproduced ({why}); "
        f"{way_out}"
    )


def _translate(cfg: dict, kwargs: dict):
    """``cfg`` of the diffusers class ``cfg["_class_name"]`` as QTaylorScheduler's config."""
    name = cfg["_class_name"]
    explicit = kwargs.get("sampler") is not None or "sampler" in cfg
    flow = _is_flow(cfg, name)
    if cfg.get("use_flow_sigmas") and name not in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        raise _refused(
            cfg,
            "use_flow_sigmas",
            f"{name}'s algorithm on the flow path is not reproduced (qtaylor reproduces FlowMatchEulerDiscreteScheduler "
            "and DPM-Solver multistep / UniPC with use_flow_sigmas)",
            "nearest: the same keys in DPMSolverMultistepScheduler or UniPCMultistepScheduler, or "
            "QTaylorScheduler.from_config(FlowMatchEulerDiscreteScheduler().config, sampler=...)",
        )
    if flow and name not in _FLOW_CLASSES + ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        raise ValueError(
            f"QTaylorScheduler.from_config: {name} is a flow-matching (rectified flow) configuration whose "
            "algorithm QTaylorScheduler does not reproduce; it reproduces FlowMatchEulerDiscreteScheduler and "
            "DPMSolverMultistepScheduler / UniPCMultistepScheduler with use_flow_sigmas. Nearest: "
            "QTaylorScheduler.from_config(FlowMatchEulerDiscreteScheduler.from_config(config), sampler=...), or "
            "keep the pipeline's own scheduler."
        )
    if flow and not cfg.get("use_flow_sigmas") and name not in _FLOW_CLASSES:
        raise ValueError(
            f"QTaylorScheduler.from_config: {name}'s config key 'prediction_type' = 'flow_prediction' with "
            "'use_flow_sigmas' = False is not reproduced (a flow model on the config's VP betas is not a Gaussian "
            "path qtaylor can sample); set use_flow_sigmas=True"
        )
    if (name.startswith("EDM") and name not in _EDM_CLASSES) or name in (
        "ScoreSdeVeScheduler",
        "CMStochasticIterativeScheduler",
    ):
        raise ValueError(
            f"QTaylorScheduler.from_config: {name} is a σ-only (VE) configuration whose algorithm and network "
            "preconditioning QTaylorScheduler does not reproduce (it reproduces EDMEulerScheduler and "
            "EDMDPMSolverMultistepScheduler); nearest: those, or qtaylor.k_diffusion with your own denoiser. "
            "Keep the pipeline's own scheduler."
        )
    src = getattr(diffusers, name, None)
    if src is None or not isinstance(src, type):
        raise ValueError(f"QTaylorScheduler.from_config: unknown scheduler class '{name}' in _class_name")
    if not explicit and name not in SOURCES:
        nearest = _NEAREST.get(name, "ddim")
        raise ValueError(
            f"QTaylorScheduler.from_config: {name}'s own algorithm is not reproduced by any qtaylor sampler; "
            f"nearest: {nearest}. Pass sampler=... to run a qtaylor sampler on this config."
        )
    # Keys the source left at its defaults, and keys it has but the config lacks, take the
    # source class's defaults (diffusers' from_config would give them ours).
    params = {k: v for k, v in inspect.signature(src.__init__).parameters.items() if k not in ("self", "kwargs")}
    for key in cfg.pop("_use_default_values", None) or []:
        if key in params and params[key].default is not inspect.Parameter.empty:
            cfg[key] = params[key].default
    for key, prm in params.items():
        if key not in cfg and prm.default is not inspect.Parameter.empty:
            cfg[key] = prm.default
    ours = set(inspect.signature(QTaylorScheduler.__init__).parameters) - {"self"}
    out = {k: v for k, v in cfg.items() if k.startswith("_")}
    chosen = kwargs.get("sampler", cfg.get("sampler"))
    # The source's own sampler (None where it is refused: then only an explicit one runs). An
    # explicit sampler that is the source's own algorithm reproduces it all the same.
    try:
        own = SOURCES[name](cfg) if name in SOURCES else None
    except ValueError:
        own = None
    reproduced = not explicit or (own is not None and chosen == own)
    sigma_source = name in _SIGMA_CLASSES and reproduced
    # An EDM config has no VP schedule to run another sampler on: its source always makes the
    # grid (a sampler with one call per level runs there; see _set_source_timesteps).
    sigma_source = sigma_source or name in _EDM_CLASSES
    # The multistep classes with a continuous σ grid (karras, exponential, beta, Lu's λ): the
    # source makes the grid (its σ levels, and its timesteps rounded to integers as the
    # network's input); the state stays VP.
    grid_source = name in _MULTISTEP and reproduced and any(cfg.get(k) for k in _SOURCE_GRIDS)
    sigma_source = sigma_source or grid_source
    # A flow config's source always makes the levels ς (any sampler runs on them).
    sigma_source = sigma_source or flow
    if sigma_source:
        out["source_config"] = {
            k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in cfg.items() if not k.startswith("_")
        }
        out["source_config"]["_class_name"] = name
    for key, value in cfg.items():
        if key.startswith("_") or key in _IDLE:
            continue
        if sigma_source and key in _GRID_BY_SOURCE:
            continue  # the source class makes the grid (source_config)
        if key in _UNSUPPORTED and value:
            raise _refused(cfg, key, _UNSUPPORTED[key], "set it to False, or keep the pipeline's own scheduler")
        if key in ours:
            out[key] = value
        elif key in _NEUTRAL:
            neutral = _NEUTRAL[key]
            if value != neutral:
                raise _refused(
                    cfg, key, "QTaylorScheduler does not implement it", f"set it to {neutral!r}, or keep the pipeline's own scheduler"
                )
        elif key not in _CONSUMED:
            raise _refused(cfg, key, "QTaylorScheduler has no such key", "keep the pipeline's own scheduler")
    if name == "DPMSolverSinglestepScheduler":
        # no timestep_spacing key: its grid is always the multistep linspace one
        out["timestep_spacing"] = "linspace"
    if name == "DEISMultistepScheduler":
        # DEIS ends at the first trained step's σ (it has no final_sigmas_type key)
        out["final_sigmas_type"] = "sigma_min"
    if "set_alpha_to_one" in cfg:
        # DDIM/PNDM: the last step goes to ᾱ = 1 (x̂0), or to the first trained step.
        out["final_sigmas_type"] = "zero" if cfg["set_alpha_to_one"] else "sigma_min"
    if name in _MULTISTEP:
        out["spacing_family"] = "multistep"
    if name in ("DDIMScheduler", "DDPMScheduler") and cfg.get("rescale_betas_zero_snr"):
        why = (
            f"{name} keeps ᾱ_T = 0 at its first step, where qtaylor's schedules need ᾱ > 0 (λ = −∞); "
            "qtaylor takes ᾱ_T = 2⁻²⁴ (σ_max ≈ 4096), as diffusers' Euler, DPM-Solver multistep and UniPC do"
        )
        if not explicit:
            raise _refused(
                cfg,
                "rescale_betas_zero_snr",
                why,
                "nearest: the same config in EulerDiscreteScheduler, DPMSolverMultistepScheduler or "
                "UniPCMultistepScheduler (reproduced), or pass sampler= to run a qtaylor sampler on ᾱ_T = 2⁻²⁴",
            )
        warnings.warn(f"QTaylorScheduler.from_config: 'rescale_betas_zero_snr' = True: {why}", stacklevel=3)
    if name == "DDIMScheduler" and cfg.get("thresholding") and not explicit:
        raise _refused(
            cfg,
            "thresholding",
            "qtaylor's DDIM makes ε̂ consistent with the thresholded x̂0, as DDIMScheduler.step with "
            "use_clipped_model_output=True; its default keeps the unthresholded ε̂",
            "pass sampler='ddim' for the consistent form, or keep the pipeline's own scheduler",
        )
    if name == "DDIMScheduler" and cfg.get("clip_sample") and not cfg.get("thresholding") and not explicit:
        raise _refused(
            cfg,
            "clip_sample",
            "qtaylor's DDIM makes ε̂ consistent with the clipped x̂0, as DDIMScheduler.step with "
            "use_clipped_model_output=True; its default keeps the unclipped ε̂ (about 1e-2 apart)",
            "set clip_sample=False, or pass sampler='ddim' for the clipped-ε̂ form",
        )
    if name == "UniPCMultistepScheduler":
        out["unipc_variant"] = cfg.get("solver_type", "bh2")
        if cfg.get("disable_corrector"):
            raise _refused(
                cfg,
                "disable_corrector",
                "qtaylor's UniPC turns the corrector off for every step or none",
                "nearest: unipc_corrector=False",
            )
        if cfg.get("predict_x0") is False:
            raise _refused(cfg, "predict_x0", "qtaylor's UniPC predicts x0", "keep the pipeline's own scheduler")
    if name in _FLOW_CLASSES:
        out["prediction_type"] = "flow_prediction"
    if sigma_source and explicit and name not in _EDM_CLASSES and not flow:
        kwargs = {k: v for k, v in kwargs.items() if k != "sampler"}
        out.pop("sampler", None)
        explicit = False
    if explicit:
        if chosen != own:
            warnings.warn(
                f"QTaylorScheduler.from_config: running qtaylor's {chosen} on the config of {name} "
                f"(its schedule, spacing and prediction type), in place of {name}'s own algorithm",
                stacklevel=3,
            )
        if name == "UniPCMultistepScheduler" and not str(chosen).startswith("unipc"):
            out.pop("unipc_variant", None)
    else:
        out["sampler"] = SOURCES[name](cfg)
        out["reproduces"] = name
    return out, kwargs


# Classes whose step assumes every gap between timesteps is T // N: DDIM steps from t to
# t - T//N (not to the next timestep on other grids, diffusers #11347), PNDM puts its
# Runge-Kutta midpoints T//N//2 after each timestep.
_FIXED_GAP = {
    "DDIMScheduler": "steps from t to t - T//N, not to the next timestep",
    "PNDMScheduler": "puts its Runge-Kutta midpoints T//N//2 after each timestep, not in the middle of the gap",
}


# The dtype diffusers draws a stochastic step's noise in, where it is not the state's:
# DPMSolverMultistepScheduler draws its SDE noise in float32 (and steps in float32) whatever
# the sample's dtype, so a float64 run takes the same draws from the generator.
_NOISE_DTYPE = {"dpmpp-2m-sde": torch.float32}  # (EDMDPMSolverMultistepScheduler: the sample's)


class _FedOps(TorchOps):
    """Ops for a replay: the pipeline calls the network, so ``model`` is never used.
    ``noise_dtype``: draw the noise in this dtype (then cast to the state's), as the
    diffusers class of the same algorithm does."""

    noise_dtype: Optional[torch.dtype] = None

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        if self.noise_dtype is None or self.noise_sampler is not None or like.dtype == self.noise_dtype:
            return super().noise(like)
        return super().noise(like.to(self.noise_dtype)).to(like.dtype)


class QTaylorScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running any qtaylor sampler (``sampler="qt-3"``, ``"unipc-3"``,
    ``"dpmpp-2m"``, …; ``qtaylor.samplers()`` lists them).

    Config keys: the schedule keys of DDPMScheduler / DDIMScheduler / DPMSolverMultistep /
    UniPCMultistep (``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule``, ``trained_betas``, ``prediction_type``, ``timestep_spacing``,
    ``steps_offset``, ``clip_sample``, ``clip_sample_range``, ``final_sigmas_type``,
    ``lower_order_final``, ``variance_type``, ``use_karras_sigmas``, ``use_lu_lambdas``,
    ``rescale_betas_zero_snr``: zero terminal SNR, with ᾱ_T = 2⁻²⁴ as diffusers' Euler,
    DPM-Solver multistep and UniPC hold it; ``thresholding`` with
    ``dynamic_thresholding_ratio`` and ``sample_max_value``: dynamic thresholding of x̂0), and
    the sampler's options (``sampler``,
    ``expand``, ``qt_last``, ``eta``, ``unipc_variant``, ``unipc_corrector``,
    ``ddpm_variance``, ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``).

    ``final_sigmas_type="zero"`` (default) ends at ᾱ = 1, where the last call returns
    x̂0; ``"sigma_min"`` ends at the first trained timestep.

    Flow-matching models (``prediction_type="flow_prediction"``; SD3, Flux): the keys of
    ``FlowMatchEulerDiscreteScheduler`` (``shift``, ``use_dynamic_shifting`` with ``mu`` at
    ``set_timesteps``, ``base_shift``, ``max_shift``, ``base_image_seq_len``,
    ``max_image_seq_len``, ``time_shift_type``, ``shift_terminal``; ``invert_sigmas`` and
    ``stochastic_sampling`` are refused) and of DPM-Solver / UniPC on flow sigmas
    (``use_flow_sigmas``, ``flow_shift``). The levels ς are the flow source class's own;
    the sampler runs on ``Schedule.flow`` and the pipeline's state is the flow state
    ``(1 − ς) x0 + ς ε``. On a VP config a flow key other than its default is refused.
    """

    # The classes whose config it takes: the VP ones, EDM's two and FlowMatch Euler.
    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + [
        "EDMDPMSolverMultistepScheduler",
        "FlowMatchEulerDiscreteScheduler",
    ]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        spacing_family: str = "ddim",
        reproduces: Optional[str] = None,
        source_config: Optional[dict] = None,
        steps_offset: int = 0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        final_sigmas_type: str = "zero",
        lower_order_final: bool = True,
        variance_type: Optional[str] = None,
        sampler: str = "qt-3",
        expand: str = "t",
        qt_last: str = "ddim",
        eta: Optional[float] = None,
        unipc_variant: str = "bh2",
        unipc_corrector: bool = True,
        ddpm_variance: Optional[str] = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        rescale_betas_zero_snr: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: Optional[float] = 0.5,
        max_shift: Optional[float] = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        time_shift_type: str = "exponential",
        shift_terminal: Optional[float] = None,
        invert_sigmas: bool = False,
        stochastic_sampling: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
    ):
        for key, what in _UNSUPPORTED.items():
            if locals()[key]:
                raise ValueError(
                    f"QTaylorScheduler: config key '{key}' = True ({what}) is not supported; set it to False"
                )
        if prediction_type not in ("epsilon", "sample", "v_prediction", "flow_prediction"):
            raise ValueError(
                f"prediction_type '{prediction_type}' is not supported; expected one of: epsilon, sample, "
                "v_prediction, flow_prediction"
            )
        for key, value in (("shift", shift), ("flow_shift", flow_shift)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"QTaylorScheduler: config key '{key}' = {value!r}: the flow time shift must be a positive number")
        if time_shift_type not in ("exponential", "linear"):
            raise ValueError(
                f"QTaylorScheduler: config key 'time_shift_type' = {time_shift_type!r}; expected exponential or linear"
            )
        flow = prediction_type == "flow_prediction" or use_flow_sigmas
        if use_flow_sigmas and prediction_type != "flow_prediction":
            raise ValueError(
                f"QTaylorScheduler: config key 'use_flow_sigmas' = True with 'prediction_type' = {prediction_type!r}: "
                "qtaylor samples flow models that predict the velocity; set prediction_type='flow_prediction'"
            )
        if not flow:
            for key, value, neutral in (
                ("shift", shift, 1.0),
                ("use_dynamic_shifting", use_dynamic_shifting, False),
                ("base_shift", base_shift, 0.5),
                ("max_shift", max_shift, 1.15),
                ("base_image_seq_len", base_image_seq_len, 256),
                ("max_image_seq_len", max_image_seq_len, 4096),
                ("time_shift_type", time_shift_type, "exponential"),
                ("shift_terminal", shift_terminal, None),
                ("flow_shift", flow_shift, 1.0),
            ):
                if value != neutral:
                    raise ValueError(
                        f"QTaylorScheduler: config key '{key}' = {value!r} applies to flow configs "
                        f"(prediction_type='flow_prediction'); set it to {neutral!r}"
                    )
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(
                f"timestep_spacing '{timestep_spacing}' is not supported; expected one of: leading, trailing, linspace"
            )
        if spacing_family not in ("ddim", "multistep"):
            raise ValueError(
                f"spacing_family '{spacing_family}' is not supported; expected ddim (DDIM, DDPM, PNDM: N "
                "points) or multistep (DPM-Solver, UniPC, DEIS: N + 1 points, the last dropped)"
            )
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(
                f"final_sigmas_type '{final_sigmas_type}' is not supported; expected one of: zero, sigma_min"
            )
        if trained_betas is not None:
            self._schedule = _core.Schedule.discrete(
                trained_betas=[float(b) for b in np.asarray(trained_betas).reshape(-1)],
                rescale_betas_zero_snr=bool(rescale_betas_zero_snr),
            )
        else:
            if beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
                raise ValueError(
                    f"beta_schedule '{beta_schedule}' is not supported; expected one of: linear, scaled_linear, squaredcos_cap_v2 (or trained_betas)"
                )
            self._schedule = _core.Schedule.discrete(
                beta_schedule,
                beta_start,
                beta_end,
                num_train_timesteps,
                rescale_betas_zero_snr=bool(rescale_betas_zero_snr),
            )
        if ddpm_variance is None:
            learned_large = variance_type is not None and variance_type.startswith("fixed_large")
            ddpm_variance = "beta" if learned_large else "beta-tilde"
        self._spec_options = dict(
            eta=eta,
            expand=expand,
            qt_last=qt_last,
            ddpm_variance=ddpm_variance,
            lower_order_final=lower_order_final,
            unipc_variant=unipc_variant,
            unipc_corrector=unipc_corrector,
            s_churn=s_churn,
            s_tmin=s_tmin,
            s_tmax=s_tmax,
            s_noise=s_noise,
        )
        self._spec = self._base_spec = _core.SamplerSpec(sampler, **self._spec_options)
        if sampler == "euler":
            warnings.warn(
                "QTaylorScheduler: sampler 'euler' is Euler on the probability-flow ODE in t; diffusers' "
                "EulerDiscreteScheduler (Euler in σ) computes qtaylor's 'ddim'",
                stacklevel=2,
            )
        if self._spec.is_adaptive:
            raise ValueError(
                f"sampler '{sampler}' is adaptive: its network calls depend on the tensors, so it cannot run "
                "through a scheduler's step(); use qtaylor.torch.sample(model, x, sampler=...) instead"
            )
        self._source = None
        self._source_sigmas: Optional[torch.Tensor] = None
        self._edm = False
        self._scaled_state = False
        self._flow = flow
        if flow and source_config is None:
            # Built directly (not from a source config): FlowMatchEulerDiscreteScheduler of these
            # keys makes the levels, exactly as diffusers would.
            if use_flow_sigmas:
                raise ValueError(
                    "QTaylorScheduler: use_flow_sigmas=True is a DPMSolverMultistepScheduler / UniPCMultistepScheduler "
                    "key; build with QTaylorScheduler.from_config(that_scheduler.config) instead"
                )
            source_config = dict(
                _class_name="FlowMatchEulerDiscreteScheduler",
                num_train_timesteps=num_train_timesteps,
                shift=shift,
                use_dynamic_shifting=use_dynamic_shifting,
                base_shift=base_shift,
                max_shift=max_shift,
                base_image_seq_len=base_image_seq_len,
                max_image_seq_len=max_image_seq_len,
                time_shift_type=time_shift_type,
                shift_terminal=shift_terminal,
                use_karras_sigmas=use_karras_sigmas,
            )
        if source_config is not None:
            source_config = dict(source_config)
            name = source_config.pop("_class_name", reproduces)
            if flow and name not in _FLOW_CLASSES + ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
                raise ValueError(f"source_config of {name!r} is not a flow scheduler's; prediction_type='flow_prediction' needs one")
            if not flow and name not in _SIGMA_CLASSES + _EDM_CLASSES + _MULTISTEP:
                raise ValueError(
                    f"source_config is given for the class {name!r}; it applies to the σ-space, EDM and "
                    f"multistep classes {', '.join(_SIGMA_CLASSES + _EDM_CLASSES + _MULTISTEP)} only"
                )
            # The source class itself, for its grid, network timesteps and (EDM) its
            # preconditioning (never its step).
            self._source = getattr(diffusers, name)(**source_config)
            self._edm = name in _EDM_CLASSES
            # the source's state is x/α (σ-space and EDM classes), the flow state, or the VP
            # state (multistep)
            self._scaled_state = flow or name not in _MULTISTEP
            if flow:
                self._schedule = self._flow_schedule()
            if self._edm:
                # Headroom over sigma_max: the source's float32 top level may round above it.
                self._schedule = _core.Schedule.ve(sigma_max=float(self._source.config.sigma_max) * (1 + 1e-6))
        # The program reads the network's output as this (EDM: the preconditioned D = x̂0).
        self._prediction = "sample" if self._edm else prediction_type
        self._labels: Optional[List[float]] = None
        self._label_dtype = None
        # diffusers: thresholding, else clip_sample (the core applies either to x̂0)
        self._threshold = (float(dynamic_thresholding_ratio), float(sample_max_value)) if thresholding else None
        self._clip = float(clip_sample_range) if clip_sample and not thresholding else None
        if self._clip is not None and not (self._clip > 0 and math.isfinite(self._clip)):
            raise ValueError(f"clip_sample_range {clip_sample_range}: expected a positive number")
        # VP state: the start is N(0, I). A σ-space source's state is x/α, started as it does;
        # a flow state starts at pure noise ε.
        self.init_noise_sigma = 1.0 if self._source is None else float(getattr(self._source, "init_noise_sigma", 1.0))
        self.num_inference_steps: Optional[int] = None
        self.timesteps = torch.from_numpy(
            np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64)
        )
        self._times: Optional[List[float]] = None
        self._program: Optional[_core.Program] = None
        self._replay: Optional[_core.Replay] = None
        self._begin_index: Optional[int] = None
        self._ops = _FedOps()
        self._ops.noise_dtype = None if self._edm else _NOISE_DTYPE.get(self._spec.name)

    def _flow_schedule(self, mu: Optional[float] = None) -> "_core.Schedule":
        """Schedule.flow of this config: the source's static shift (FlowMatch's ``shift``,
        DPM-Solver's and UniPC's ``flow_shift``), or diffusers' dynamic ``mu`` with
        ``time_shift_type``. The levels ς come from the source; the shift decides the time t
        they sit at (the variable qt-K expands in)."""
        cfg = self._source.config
        if mu is not None:
            kind = cfg.get("time_shift_type", "exponential")
            self._flow_shift = (None, float(mu), kind)
        else:
            key = "shift" if type(self._source).__name__ in _FLOW_CLASSES else "flow_shift"
            self._flow_shift = (float(cfg.get(key, 1.0)), None, None)
        shift, m, kind = self._flow_shift
        return _core.Schedule.flow(shift=shift, mu=m, time_shift=kind)

    # -- from another scheduler's config --------------------------------------------------
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """The scheduler that reproduces ``config``'s scheduler (``pipe.scheduler.config``).

        The source class (``_class_name``) decides: keys it left at their defaults
        (``_use_default_values``) take *its* defaults, its spacing keeps its own definition,
        every key of it is honoured or refused with an error that names it, and without
        ``sampler`` the sampler is the source's own algorithm (:data:`SOURCES`). An explicit
        ``sampler`` runs on any VP config; the source's algorithm keys then give way to it,
        which a warning says. EDM's two schedulers are reproduced on their own σ grid and
        preconditioning (another sampler runs there too if it makes one call per level).
        Flow-matching configs (FlowMatchEulerDiscreteScheduler; DPM-Solver multistep and
        UniPC with ``use_flow_sigmas``) are reproduced on the source's own levels ς, and any
        sampler runs there (the ones that cannot start at pure noise, ς = 1, say so).
        """
        if isinstance(config, SchedulerMixin) and isinstance(config, ConfigMixin):
            # The scheduler itself (``from_config(pipe.scheduler)``): its class is known.
            config = dict(config.config, _class_name=type(config).__name__)
        if isinstance(config, (dict, FrozenDict)):
            source = _source_name(config)
            if source not in (None, cls.__name__):
                config, kwargs = _translate(dict(config, _class_name=source), dict(kwargs))
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # -- copies ------------------------------------------------------------------------
    def __getstate__(self):
        """A copy (``copy.deepcopy``, ``pickle``) is rebuilt from the config and the current
        grid; a run in progress is not copied (the copy starts its grid afresh)."""
        cfg = dict(self.config)
        return {
            "config": cfg,
            "times": self._times,
            "tail": getattr(self, "_tail", 0),
            "device": str(self.timesteps.device),
            "num_inference_steps": self.num_inference_steps,
            "begin_index": self._begin_index,
            "labels": None if self._labels is None else self.timesteps.tolist(),
            "label_dtype": self._label_dtype if self._labels is not None else None,
            "init_noise_sigma": self.init_noise_sigma,
            "source_sigmas": None if self._source_sigmas is None else self._source_sigmas.tolist(),
            "spec_lowered": self._spec is not self._base_spec,
            "flow_shift": getattr(self, "_flow_shift", None),
        }

    def __setstate__(self, state):
        cfg = state["config"]
        self.__init__(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        # diffusers' bookkeeping keys (_class_name, _use_default_values, ...) as they were.
        self.register_to_config(**{k: v for k, v in cfg.items() if k.startswith("_")})
        if state.get("flow_shift") is not None and self._flow:
            shift, mu, kind = state["flow_shift"]
            self._flow_shift = (shift, mu, kind)
            self._schedule = _core.Schedule.flow(shift=shift, mu=mu, time_shift=kind)
        if state["times"] is not None:
            if state.get("spec_lowered"):
                self._spec = _core.SamplerSpec(self._spec.name, **dict(self._spec_options, lower_order_final=False))
            self._install(
                state["times"], state["device"], state["tail"], labels=state.get("labels"),
                label_dtype=state.get("label_dtype"),
            )
            self.num_inference_steps = state["num_inference_steps"]
            self.init_noise_sigma = state.get("init_noise_sigma", self.init_noise_sigma)
            if state.get("source_sigmas") is not None:
                self._source_sigmas = torch.tensor(state["source_sigmas"], dtype=torch.float32)
            self._begin_index = state["begin_index"]

    # -- the schedule -------------------------------------------------------------------
    @property
    def schedule(self) -> "_core.Schedule":
        """The qtaylor schedule built from this config."""
        return self._schedule

    @property
    def sampler_spec(self) -> "_core.SamplerSpec":
        return self._spec

    @property
    def program(self) -> Optional["_core.Program"]:
        """The recorded program of the current grid (after ``set_timesteps``)."""
        return self._program

    @property
    def step_index(self) -> Optional[int]:
        """Network calls already fed on this grid (None before the first ``step``)."""
        return None if self._replay is None else self._replay.calls_done

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def _no_table(self, what: str):
        if self._flow:
            raise AttributeError(
                f"'{what}': this scheduler samples a rectified-flow model ((1 - ς) x0 + ς ε), whose path has "
                "no beta table; its levels are `sigmas` (ς)"
            )
        if self._edm:
            raise AttributeError(
                f"'{what}': this scheduler reproduces {type(self._source).__name__}, whose variance-exploding path "
                "(x0 + σ ε) has no beta table; its levels are `sigmas`"
            )

    @property
    def betas(self) -> torch.Tensor:
        """β_n of the trained steps, float32, as diffusers' schedulers hold them."""
        self._no_table("betas")
        return torch.tensor(self._schedule.betas, dtype=torch.float32)

    @property
    def alphas(self) -> torch.Tensor:
        """1 − β_n, float32."""
        self._no_table("alphas")
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_n of the trained steps, float32 (the table the schedule interpolates)."""
        self._no_table("alphas_cumprod")
        return torch.tensor(self._schedule.alphas_cumprod, dtype=torch.float32)

    @property
    def sigmas(self) -> torch.Tensor:
        """diffusers' σ = √((1 − ᾱ)/ᾱ): after ``set_timesteps`` at every point of the grid, the
        last one 0 when the grid ends at ᾱ = 1; before it, at every trained step, descending."""
        if self._source is not None:
            # the source's own levels (a repeated last one included)
            return self._source_sigmas if self._source_sigmas is not None else self._source.sigmas
        if self._times is None:
            return (((1 - self.alphas_cumprod.double()) / self.alphas_cumprod.double()) ** 0.5).flip(0).float()
        a = np.asarray(self._schedule.alpha(np.array(self._times, dtype=np.float64)))
        s = np.asarray(self._schedule.sigma(np.array(self._times, dtype=np.float64)))
        return torch.from_numpy(s / a).float()

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network's input: the state itself (VP), or for a σ-space source the state
        x/α times α = 1/√(σ² + 1) at this call, as the source class scales it."""
        if self._source is None or not self._scaled_state or self._flow:
            return sample
        k = self._call_index(timestep)
        if self._edm:
            return self._source.precondition_inputs(sample, self._level_at_call(k))
        return sample * self._vp_factor_at_call(k)

    def _call_index(self, timestep) -> int:
        """The network call a pipeline is at: the next one of the run in progress, else the
        first call at ``timestep`` (or the first call)."""
        if self._program is None:
            raise ValueError("call set_timesteps before scale_model_input")
        if self._replay is not None and not self._replay.finished:
            return self._replay.calls_done
        if timestep is not None:
            calls = self._calls_at(float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep))
            if calls:
                return calls[0]
        return 0

    def _calls_at(self, t: float) -> List[int]:
        """The network calls whose timestep is ``t`` (to 1e-3 relative, the tolerance of every
        lookup of a pipeline's timestep), in order."""
        return [k for k, v in enumerate(self._label_values) if abs(v - t) <= 1e-3 * max(1.0, abs(v))]

    def _level_at_call(self, k: int) -> float:
        """σ/α at network call k (EDM's σ), the grid's end past the last call."""
        t = self._call_times[k] if k < len(self._call_times) else self._times[-1]
        return float(self._schedule.sigma(float(t)) / self._schedule.alpha(float(t)))

    def _vp_factor_at_call(self, k: int) -> float:
        """The factor from the source's state to the VP state at network call k (at the grid's
        end past the last call): α for a σ-space source's x/α, 1/state_scale for the flow
        state (from the core, once per grid)."""
        return self._call_factors[min(k, len(self._call_factors) - 1)]

    # -- grids --------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
        mu: Optional[float] = None,
    ):
        """Sets the grid: ``num_inference_steps`` with the config's spacing, or explicit
        descending ``timesteps`` (fractional ones are fractional steps of the table, linear
        in log σ as diffusers' ``_sigma_to_t``), or diffusers ``sigmas`` (σ/α, descending;
        a final 0 ends at x̂0), and records the sampler's program on it. A tuned grid file
        (``qtaylor tune``) goes in through either:
        ``set_timesteps(sigmas=qtaylor.read_grid_file(path, scheduler.schedule)["sigmas"])``.

        Flow configs (SD3, Flux) take the arguments of FlowMatchEulerDiscreteScheduler, as
        ``retrieve_timesteps`` passes them: ``sigmas`` (ς, unshifted; Flux passes
        ``linspace(1, 1/N, N)``) shifted by ``shift`` or by ``mu`` (required with
        ``use_dynamic_shifting``), float ``timesteps = ς·1000``, and a terminal 0. The levels
        are exactly diffusers': its default grid, ``linspace`` from ``σ_max`` to the stored
        ``σ_min``, shifts σ_min a second time (diffusers #13243: the last level lands at
        ``shift(shift(1/T))``, 0.009 for shift 3, and its network call does little), and
        qtaylor keeps that for parity; pass ``sigmas`` (as Flux does) for a grid shifted
        once."""
        given = [n for n, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None]
        if len(given) > 1 and not self._flow:
            raise ValueError("give only one of timesteps= and sigmas=")
        if mu is not None and not self._flow:
            raise ValueError(
                f"set_timesteps(mu={mu}): mu is the dynamic shift of flow configs (prediction_type="
                "'flow_prediction'); this config is a VP one"
            )
        if self._source is not None:
            self._set_source_timesteps(num_inference_steps, device, timesteps, sigmas, mu)
            return
        final = "zero" if self.config.final_sigmas_type == "zero" else "last"
        # With final_sigmas_type "sigma_min" a grid that already ends at timestep 0 keeps that
        # network call, as diffusers does: its step (from timestep 0 to sigma_min, of length
        # zero) returns the sample unchanged.
        tail = False
        if sigmas is not None:
            sig = [float(s) for s in (sigmas.tolist() if hasattr(sigmas, "tolist") else sigmas)]
            if num_inference_steps is not None and num_inference_steps != len(sig) - 1:
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} disagrees with {len(sig)} sigmas "
                    f"({len(sig) - 1} steps)"
                )
            times = _core.grid_times(self._schedule, sigmas=sig).tolist()
        else:
            if timesteps is not None:
                ts = timesteps.tolist() if hasattr(timesteps, "tolist") else list(timesteps)
                if num_inference_steps is not None and num_inference_steps != len(ts):
                    raise ValueError(
                        f"num_inference_steps={num_inference_steps} disagrees with {len(ts)} timesteps"
                    )
                vals = [float(v) for v in ts]
                tail = final == "last" and len(vals) > 0 and vals[-1] == 0.0
                # Integer timesteps are steps of the table; fractional ones (e.g. a tuned grid
                # file's `timesteps`) lie between them, linear in log σ (diffusers' _sigma_to_t).
                times = _core.grid_times(self._schedule, timesteps=vals, final_=final).tolist()
            else:
                if (
                    num_inference_steps is None
                    or isinstance(num_inference_steps, bool)
                    or int(num_inference_steps) != num_inference_steps
                    or num_inference_steps < 1
                ):
                    raise ValueError(
                        f"num_inference_steps={num_inference_steps!r}: expected a positive integer"
                    )
                cont = [g for g, on in (("karras", self.config.use_karras_sigmas),
                                        ("logsnr", self.config.use_lu_lambdas)) if on]
                if len(cont) > 1:
                    raise ValueError("use_karras_sigmas and use_lu_lambdas are both set; choose one")
                if cont:
                    # A continuous grid on the trained table, in fractional timesteps, from the
                    # last trained step to the first (then x̂0), as diffusers' use_karras_sigmas
                    # / use_lu_lambdas; timestep_spacing does not apply.
                    times = _core.continuous_grid(
                        self._schedule, int(num_inference_steps), cont[0], to_zero=final == "zero"
                    ).tolist()
                else:
                    times = _core.discrete_grid(
                        self._schedule,
                        steps=int(num_inference_steps),
                        spacing=self._spacing(),
                        steps_offset=self.config.steps_offset,
                        final_=final,
                    ).tolist()
                tail = final == "last" and not cont and len(times) - 1 == int(num_inference_steps) - 1
        given = timesteps if timesteps is not None else sigmas
        self._check_reproduced(times, len(given) if given is not None else int(num_inference_steps), given is not None)
        self._install(times, device, tail)
        self.num_inference_steps = len(times) - 1 + int(tail)

    def _set_source_timesteps(self, num_inference_steps, device, timesteps, sigmas, mu=None):
        """The σ-space source's own grid: its sigmas (the levels the sampler steps through)
        and its timesteps (the network's time at each call), from the source class's
        set_timesteps with the same arguments."""
        src = self._source
        name = type(src).__name__
        params = inspect.signature(src.set_timesteps).parameters
        kw = {}
        for key, value in (("timesteps", timesteps), ("sigmas", sigmas), ("mu", mu)):
            if value is not None:
                if key not in params:
                    raise ValueError(
                        f"set_timesteps({key}=...): {name}, which this scheduler reproduces, takes no {key}; "
                        "pass num_inference_steps"
                    )
                kw[key] = value
        if not kw and (
            num_inference_steps is None
            or isinstance(num_inference_steps, bool)
            or int(num_inference_steps) != num_inference_steps
            or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: expected a positive integer")
        if self._flow:
            if sigmas is not None:
                bad = [float(v) for v in np.asarray(sigmas, dtype=np.float64).reshape(-1) if not 0.0 < float(v) <= 1.0]
                if bad:
                    raise ValueError(
                        f"set_timesteps(sigmas=...): flow sigma {bad[0]} is outside (0, 1] (x = (1 - σ) x0 + σ ε; "
                        "1 is pure noise, and the terminal 0 is appended)"
                    )
            if mu is not None and not math.isfinite(float(mu)):
                raise ValueError(f"set_timesteps(mu={mu}): expected a finite number")
        src.set_timesteps(num_inference_steps=num_inference_steps, device="cpu", **kw)
        if self._flow:
            self._schedule = self._flow_schedule(mu if self._source.config.get("use_dynamic_shifting") else None)
        self._source_sigmas = src.sigmas.detach().cpu().clone()
        raw = src.sigmas.detach().cpu().to(torch.float64).tolist()
        # Consecutive levels equal to float32 rounding are one level (EDM DPM-Solver's
        # final sigma_min, 2e-7 above its karras grid's float32 last level, is a step of
        # length zero, as Euler's repeated last level is).
        same = [i > 0 and abs(v - raw[i - 1]) <= 1e-6 * max(abs(v), abs(raw[i - 1])) for i, v in enumerate(raw)]
        levels = [v for i, v in enumerate(raw) if not same[i]]
        labels = [float(v) for v in src.timesteps.detach().cpu().tolist()]
        if not all(math.isfinite(v) for v in labels + raw):
            raise ValueError(
                f"{name}'s own set_timesteps({num_inference_steps}) gives non-finite timesteps or sigmas on this "
                f"config (timesteps {[round(v, 3) for v in labels[:4]]}…): diffusers' run is NaN here too, and "
                "there is nothing to reproduce. Choose another beta_schedule or number of steps, or pass "
                "sampler= to run a qtaylor sampler on this schedule"
            )
        # A grid that ends on a repeated level (Euler's final_sigmas_type='sigma_min' on a grid
        # whose last timestep is 0): the source's steps of length zero leave the state as it is
        # and still call the network; they are reproduced as idle calls after the run.
        idle = 0
        self._spec = self._base_spec
        if len(raw) >= 2 and same[-1]:
            idle = max(0, len(labels) - self._spec.nfe(len(levels) - 1, levels[-1] == 0.0))
        if idle and self._spec.name.startswith(("unipc-", "dpmpp-singlestep-")):
            # UniPC spends the repeated level's call on correcting its last step (qtaylor's
            # UniPC does not correct the last step); the singlestep solver's order list counts
            # the zero step, so its groups shift.
            key, value = _repeat_key(src.config)
            raise ValueError(
                f"{name}'s config key '{key}' = {value!r} ends its grid on a repeated level, whose network "
                f"call {name} uses ({'to correct its last step' if self._spec.name.startswith('unipc-') else 'in its order list'}); "
                f"{self._spec.name} does not reproduce that. Use final_sigmas_type='zero' or another grid"
            )
        if idle and self._spec.name in _LOWERS_AT_THE_END:
            # The source's grid ends on a step of length zero (EDM DPM-Solver's final
            # sigma_min, DEIS's repeated last karras σ): with lower_order_final and fewer than
            # 15 steps the source lowers the order there, so the real last step keeps
            # min(order, 2); an order-2 sampler is that without lower_order_final, an order-3
            # one would need to drop to 2 on its last step, which qtaylor cannot express.
            # DPM-Solver++(3M) divides by the zero step (NaN in diffusers from 15 steps on).
            lowering = self.config.lower_order_final and len(labels) < 15
            second = self._spec.name in _SECOND_ORDER_AT_THE_END
            if not second and (lowering or self._spec.name == "dpmpp-3m"):
                key, value = _repeat_key(src.config)
                raise ValueError(
                    f"{name}'s config key '{key}' = {value!r} ends its grid on a step of length zero, which "
                    f"{self._spec.name} cannot take as {name} does (under 15 steps it lowers the order of the step "
                    "before; DPM-Solver++(3M) divides by the zero step, NaN in diffusers). Use solver_order=2, "
                    "15 or more steps (not for DPM-Solver++(3M)), or another grid"
                )
            if second and lowering:
                self._spec = _core.SamplerSpec(self._spec.name, **dict(self._spec_options, lower_order_final=False))
        if self._spec.nfe(len(levels) - 1, levels[-1] == 0.0) != len(labels) and self._spec.nfe(1, False) == 1:
            # One call per step, but fewer calls than levels (Euler with log_linear
            # interpolation): the source stops at the level after its last call.
            if len(labels) + 1 < len(levels):
                warnings.warn(
                    f"{name} makes {len(levels)} levels but calls the network {len(labels)} times: its run stops "
                    f"at σ = {levels[len(labels)]:.4g}, short of its last level {levels[-1]:.4g}; reproduced as it is",
                    stacklevel=3,
                )
                levels = levels[: len(labels) + 1]
        if self._flow:
            if not all(0.0 <= v <= 1.0 for v in levels):
                key = next((k for k in _SOURCE_GRIDS if src.config.get(k)), None)
                if key is not None:
                    raise ValueError(
                        f"{name}'s config key '{key}' = True with use_flow_sigmas gives levels up to {max(levels):.4g}: "
                        f"diffusers makes VP σ/α levels there and steps them as flow levels (α = 1 − σ < 0); set {key}=False"
                    )
                raise ValueError(f"{name} gives flow levels outside [0, 1] ({max(levels):.4g}); nothing to reproduce")
            # FlowMatch's network times are ς·1000 in float32 at every call (so a sampler with
            # several calls per step runs too), unless timesteps= were given or its
            # num_train_timesteps is not 1000 (then the source's own ς·T, one call per level)
            if name in _FLOW_CLASSES and timesteps is None and src.config.num_train_timesteps == 1000:
                labels = None
        # the levels' times (σ/α, or ς on a flow schedule: Schedule.time_of_level)
        times = _core.grid_times(self._schedule, sigmas=levels).tolist()
        self._install(times, device, tail=idle, labels=labels, label_dtype=src.timesteps.dtype)
        self.init_noise_sigma = float(getattr(src, "init_noise_sigma", 1.0))
        self.num_inference_steps = len(times) - 1 + idle

    def set_grid_file(self, path, device: Union[str, torch.device, None] = None):
        """Sets the grid of a grid file written by ``qtaylor tune`` (its sigmas), warning for
        each way it was tuned for another run (sampler, NFE, schedule), as ``qtaylor sample
        --grid-file`` does; errors name the file."""
        g = _core.read_grid_file(str(path), self._schedule, spec=self._spec)
        if self._flow:
            # the file's times on this flow schedule (its levels ς are already shifted: the
            # source's set_timesteps(sigmas=) would shift them again)
            times = [float(t) for t in g["times"]]
            self._spec = self._base_spec
            self._install(times, device)
            self._source_sigmas = torch.tensor([float(v) for v in g["sigmas"]], dtype=torch.float32)
            self.num_inference_steps = len(times) - 1
            return
        self.set_timesteps(sigmas=g["sigmas"], device=device)

    def _check_reproduced(self, times: List[float], n: int, explicit: bool):
        """A config that reproduces a class whose step assumes gaps of T // N between its N
        timesteps (DDIM, PNDM) is refused on a grid whose gaps differ: that class's run
        cannot be reproduced there. (The last step, to ᾱ = 1 or ᾱ_0, is either class's own.)"""
        why = _FIXED_GAP.get(self.config.reproduces)
        if why is None:
            return
        net = [float(v) for v in self._schedule.model_time(np.array(times[:-1], dtype=np.float64))]
        gap = self.config.num_train_timesteps // max(n, 1)
        if any(abs((a - b) - gap) > 1e-6 for a, b in zip(net, net[1:])):
            what = "the given timesteps" if explicit else (
                f"'timestep_spacing' = {self.config.timestep_spacing!r} with {n} steps"
            )
            raise ValueError(
                f"QTaylorScheduler: this config reproduces {self.config.reproduces}, which {why}; on "
                f"{what} (timesteps {[round(v, 3) for v in net[:4]]}…, gaps other than {gap}) its run cannot "
                f"be reproduced. Use leading spacing or a number of steps dividing "
                f"{self.config.num_train_timesteps}, or pass sampler= to run qtaylor's sampler on this grid"
            )
        if self.config.reproduces == "PNDMScheduler" and self.config.sampler == "pndm" and gap % 2:
            raise ValueError(
                f"QTaylorScheduler: this config reproduces PNDMScheduler, which puts its Runge-Kutta midpoints "
                f"T//N//2 = {gap // 2} after each timestep, off the middle of its gap T//N = {gap} "
                f"(num_inference_steps={n}); its run cannot be reproduced. Use a number of steps with T//N even, "
                "or pass sampler='pndm' to run qtaylor's PNDM with its midpoints in the middle"
            )

    def _spacing(self) -> str:
        """The core's name of this config's spacing: the multistep solvers' leading and
        linspace space N + 1 points and drop the last (trailing is the same for both)."""
        spacing = self.config.timestep_spacing
        if self.config.spacing_family == "multistep" and spacing != "trailing":
            return f"{spacing}-multistep"
        return spacing

    def _install(self, times: List[float], device=None, tail: int = 0, labels=None, label_dtype=None):
        """Records the program of ``times``. ``tail`` idle calls follow the run: steps of
        length zero that the source makes at the end of its grid (the state is returned as it
        is); ``labels`` are a σ-space source's own timesteps, one per call."""
        program = _core.Program(
            self._schedule,
            self._spec,
            times,
            prediction_type=self._prediction,
            clip=self._clip,
            threshold=self._threshold,
        )
        self._times = times
        self._program = program
        self._replay = None
        self._begin_index = None
        model_times = program.call_model_times
        if labels is not None:
            # A σ-space source's own network timesteps, one per call of the same sampler.
            if len(labels) != len(model_times) + int(tail):
                source = type(self._source).__name__
                if self.config.reproduces is None:
                    raise ValueError(
                        f"sampler '{self._spec.name}' calls the network {len(model_times)} times on "
                        f"{source}'s grid of {len(labels)} network times: on a {source} config the network "
                        "times are the source's own, one per level, so only a sampler with one call per step "
                        "runs there (e.g. k-euler, ddim, dpmpp-2m, unipc-3, qt-3)"
                    )
                raise ValueError(
                    f"{source} calls the network {len(labels)} times on this grid, "
                    f"{self._spec.name} {len(model_times)} times (a step of length zero?); this grid is not "
                    "reproduced: choose another number of steps"
                )
            ts = torch.tensor(labels, dtype=label_dtype)
        elif self._flow:
            ts = torch.tensor(model_times, dtype=torch.float32)  # ς·1000, as FlowMatch's timesteps
        elif all(abs(v - round(v)) < 1e-9 for v in model_times):
            ts = torch.tensor([int(round(v)) for v in model_times], dtype=torch.int64)
        else:
            ts = torch.tensor(model_times, dtype=torch.float32)
        self._labels = labels
        self._label_dtype = label_dtype
        self._tail = int(tail)
        self._tail_done = 0
        if tail and labels is None:
            ts = torch.cat([ts, torch.zeros(int(tail), dtype=ts.dtype)])
        self.timesteps = ts.to(device) if device is not None else ts
        self._call_times = program.call_times
        self._call_steps = program.call_steps
        # α at each call and at the grid's end; the timestep each call expects, as floats
        points = np.array(list(self._call_times) + [times[-1]])
        if self._flow:
            # the flow state is the VP state times state_scale
            factors = 1.0 / np.asarray(self._schedule.state_scale(points))
        else:
            factors = np.asarray(self._schedule.alpha(points))
        self._call_factors = [float(a) for a in factors]
        self._label_values = [float(v) for v in self.timesteps.tolist()]
        self.order = self._calls_per_step(program)

    @staticmethod
    def _calls_per_step(program) -> int:
        steps = program.call_steps
        counts = [steps.count(s) for s in sorted(set(steps))]
        if not counts:
            return 1
        body = counts[:-1] if len(counts) > 1 else counts
        return body[0] if all(c == body[0] for c in body) else 1

    def _first_call_of_step(self, step: int) -> Optional[int]:
        for k, s in enumerate(self._call_steps):
            if s == step:
                return k
        return None

    def set_begin_index(self, begin_index: int = 0):
        """Starts the sampler at network call ``begin_index`` (img2img slices
        ``timesteps[t_start * order:]``): the sampler is run on the grid from that call's
        step, its multistep history starting afresh there."""
        if self._program is None:
            raise ValueError("call set_timesteps before set_begin_index")
        self._restart_at_call(int(begin_index))
        self._begin_index = int(begin_index)

    def _restart_at_call(self, k: int):
        n = len(self._call_steps)
        if not 0 <= k < n:
            raise ValueError(f"begin index {k} is outside the {n} network calls of this grid")
        if k == 0 and self._times is not None and self._call_steps[0] == 0:
            self._replay = None
            return
        step = self._call_steps[k]
        if self._first_call_of_step(step) != k:
            raise ValueError(
                f"network call {k} is inside step {step} of sampler {self._spec.name}; a run can only "
                "start at a step's first call (use a sampler with the same number of calls per step, "
                "or qtaylor.torch.sample)"
            )
        old = self._program.call_model_times[k:]
        full = self._times
        sub = full[step:]
        new = _core.Program(
            self._schedule, self._spec, sub, prediction_type=self._prediction, clip=self._clip,
            threshold=self._threshold,
        )
        if not np.allclose(new.call_model_times, old, rtol=0, atol=1e-9):
            raise ValueError(
                f"sampler {self._spec.name} starts differently from step {step} (e.g. a warm-up), so its "
                "calls no longer match the pipeline's timesteps; start from the beginning or use "
                "qtaylor.torch.sample"
            )
        device = self.timesteps.device
        self._program = new
        self._times = sub
        self._call_times = new.call_times
        self._call_steps = new.call_steps
        self.timesteps = self.timesteps[k:].to(device)
        self._call_factors = self._call_factors[k:]
        self._label_values = self._label_values[k:]
        self._replay = None

    # -- stepping -----------------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, float, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[QTaylorSchedulerOutput, tuple]:
        """Feeds the network output at ``timestep`` and returns the state for the next call
        (``prev_sample``); after the last call, the sample."""
        if self._program is None:
            raise ValueError("call set_timesteps before step")
        t_val = float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)
        if not math.isfinite(t_val):
            raise ValueError(f"step() got timestep {t_val}; expected one of the scheduler's timesteps")
        if not all_finite(sample):
            raise ValueError("sample contains NaN or Inf; the state passed to step() must be finite")
        if self._source is not None and self._scaled_state:
            return self._step_sigma_space(model_output, t_val, sample, generator, return_dict)
        return self._step_vp(model_output, t_val, sample, generator, return_dict)

    def _step_vp(self, model_output, t_val, sample, generator, return_dict):
        """step() on the VP state."""
        prev, x0 = self._advance(model_output, t_val, sample, generator, return_dict)
        if not return_dict:
            return (prev,)
        return QTaylorSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _advance(self, model_output, t_val, sample, generator, want_x0):
        """Feeds one network call to the replay: the next VP state, and x̂0 if asked for."""
        if self._replay is None:
            self._start(t_val, sample)
        replay = self._replay
        if replay.finished and self._tail_done < self._tail:
            # A zero-length step after the run (a sigma_min grid that ends at timestep 0): the
            # state stays as it is.
            expected = float(self.timesteps[len(self._call_times) + self._tail_done].item())
            if abs(t_val - expected) <= 1e-3 * max(1.0, abs(expected)):
                self._tail_done += 1
                x0 = replay.x0(model_output, sample, self._times[-1], self._ops) if want_x0 else None
                return sample, (x0.to(sample.dtype) if x0 is not None else None)
        if replay.finished:
            raise ValueError(
                f"step() called after the last of the {len(self._call_times)} network calls; call set_timesteps again"
            )
        k = replay.calls_done
        expected = self._label_values[k]
        if abs(t_val - expected) > 1e-3 * max(1.0, abs(expected)):
            raise ValueError(
                f"step() got timestep {t_val} but the sampler's network call {k} is at timestep "
                f"{self.timesteps[k].item()}; pass the scheduler's timesteps in order"
            )
        if model_output.shape != sample.shape:
            c = sample.shape[1] if sample.dim() > 1 else None
            if c is not None and model_output.dim() == sample.dim() and model_output.shape[1] == 2 * c:
                model_output = model_output[:, :c]  # learned variance: the first C channels
            else:
                raise ValueError(
                    f"model_output has shape {tuple(model_output.shape)}; expected the sample's {tuple(sample.shape)}"
                )
        if not all_finite(model_output):
            raise ValueError(
                f"model_output contains NaN or Inf at network call {k} (timestep {self.timesteps[k].item()})"
            )
        self._ops.generator = generator
        x0 = replay.x0(model_output, sample, self._call_times[k], self._ops) if want_x0 else None
        prev = replay.feed(model_output, sample, self._ops)
        if prev.dtype != sample.dtype:
            prev = prev.to(sample.dtype)
        if x0 is not None and x0.dtype != sample.dtype:
            x0 = x0.to(sample.dtype)
        return prev, x0

    def _step_sigma_space(self, model_output, t_val, sample, generator, return_dict):
        """step() for a σ-space source: its state x/α goes to the VP state of this call and
        the next call's (or the end's) VP state back to x/α."""
        if self._replay is None or self._replay.finished:
            k = self._call_index(t_val) if self._replay is None else len(self._call_times)
        else:
            k = self._replay.calls_done
        if self._edm:
            # EDM: the network's output F becomes the denoiser D = c_skip x + c_out F (the
            # source's precondition_outputs), which the program reads as x̂0.
            model_output = self._source.precondition_outputs(sample, model_output, self._level_at_call(k))
        work = work_dtype(sample.dtype)
        vp = (sample if sample.dtype == work else sample.to(work)) * self._vp_factor_at_call(k)
        prev, x0 = self._advance(model_output, t_val, vp if vp.dtype == sample.dtype else vp.to(sample.dtype),
                                 generator, return_dict)
        prev = (prev if prev.dtype == work else prev.to(work)) / self._vp_factor_at_call(self._replay.calls_done)
        if prev.dtype != sample.dtype:
            prev = prev.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return QTaylorSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _start(self, t_val: float, sample: torch.Tensor):
        first = float(self.timesteps[0].item())
        if abs(t_val - first) > 1e-3 * max(1.0, abs(first)):
            # A pipeline that sliced the timesteps without set_begin_index: start at the
            # first step whose first call is at this timestep.
            for k in self._calls_at(t_val):
                if self._first_call_of_step(self._call_steps[k]) == k:
                    self._restart_at_call(k)
                    break
            else:
                raise ValueError(
                    f"step() got timestep {t_val}, which starts no step of this grid (timesteps {self._label_values})"
                )
        self._replay = _core.Replay(self._program, sample, self._ops)

    # -- forward process ----------------------------------------------------------------
    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """``x_t = α(t) x0 + σ(t) ε`` at diffusers timesteps (one per row, or one); for a
        σ-space source its state ``x0 + (σ/α) ε``, at the grid's level of that timestep (the
        network timesteps of such a source are its own labels)."""
        tv = timesteps if isinstance(timesteps, torch.Tensor) else torch.tensor(timesteps)
        steps = np.atleast_1d(tv.detach().cpu().to(torch.float64).numpy())
        if self._source is not None and self._labels is not None:
            t = []
            for v in steps:
                calls = self._calls_at(float(v))
                if not calls:
                    raise ValueError(f"add_noise: timestep {v} is not one of this grid's timesteps {self._label_values}")
                t.append(self._call_times[calls[0]])
            t = np.array(t, dtype=np.float64)
        else:
            t = np.atleast_1d(self._schedule.time_of_model_time(steps))
        a, s = np.atleast_1d(self._schedule.alpha(t)), np.atleast_1d(self._schedule.sigma(t))
        if self._flow:  # the flow state (1 − ς) x0 + ς ε: the VP coefficients times state_scale
            c = np.atleast_1d(self._schedule.state_scale(t))
            a, s = c * a, c * s
        elif self._source is not None and self._scaled_state:  # the σ-space state x0 + (σ/α) ε
            a, s = np.ones_like(a), s / a
        work = work_dtype(original_samples.dtype)
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        at = torch.tensor(a, dtype=work, device=original_samples.device).view(shape)
        st = torch.tensor(s, dtype=work, device=original_samples.device).view(shape)
        out = at * original_samples.to(work) + st * noise.to(device=original_samples.device, dtype=work)
        return out.to(original_samples.dtype)

    def scale_noise(
        self,
        sample: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        noise: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """FlowMatchEulerDiscreteScheduler's forward process, which the flow img2img pipelines
        call: ``ς noise + (1 − ς) sample`` at the level of ``timestep`` (one per row, or one).
        On a VP config it is :meth:`add_noise`."""
        if noise is None:
            raise ValueError("scale_noise: noise is required (a tensor shaped like sample)")
        tv = timestep if isinstance(timestep, torch.Tensor) else torch.tensor([float(timestep)])
        return self.add_noise(sample, noise, tv.reshape(-1))
