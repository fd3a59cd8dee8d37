"""k-diffusion's sampler functions, computed by qtaylor's Rust core.

A k-diffusion script changes one import and nothing else:

>>> from qtaylor.k_diffusion import sample_dpmpp_2m      # was: from k_diffusion.sampling import ...
>>> x = sample_dpmpp_2m(model, x, sigmas, extra_args={"cond": c}, callback=cb)

Every function takes k-diffusion's arguments: ``model(x, sigma * s_in, **extra_args)`` is a
denoiser returning x̂0 for the state ``x = x0 + σ ε`` (k-diffusion's variance-exploding
scaling), ``x`` is the state at ``sigmas[0]``, ``sigmas`` descend to the last level (a final 0
returns x̂0), and ``callback`` receives, once per step after the step's first network call,
the dict ``{"x", "i", "sigma", "sigma_hat", "denoised"}``: the network's input, the step, the
step's level, the level the network was called at (σ̂ > σ where churn raised it) and its
output. ``disable`` hides the progress bar (``None``: shown on a terminal only).

**How.** The core samples VP models; k-diffusion's path is its schedule
``qtaylor.Schedule.ve``: time t = σ, ᾱ(t) = 1/(1 + σ²), so the VE state is the VP state over
α: ``x_ve = x_vp / α(σ)``. :func:`qtaylor.torch.sample` works in the model's own state, so
the functions hand it your ``x`` and a model that calls yours with σ = t and reads its
output as the data prediction (``prediction_type="sample"``), run the grid ``sigmas`` as
the schedule's times, and return the end state; the core converts between the VE and VP
states with the schedule's ``state_scale`` (1/α), like every coefficient; this module only
moves tensors.

**Exact equivalents** (same algorithm; tested against k-diffusion 0.1.1.post1 in float64,
``python/tests/test_k_diffusion.py``):

=============================  ==================  ==============================================
k-diffusion                    qtaylor sampler      parameters
=============================  ==================  ==============================================
``sample_euler``               ``k-euler``          s_churn, s_tmin, s_tmax, s_noise
``sample_heun``                ``k-heun``           s_churn, s_tmin, s_tmax, s_noise
``sample_dpm_2``               ``k-dpm2``           s_churn, s_tmin, s_tmax, s_noise
``sample_euler_ancestral``     ``k-euler-a``        eta, s_noise, noise_sampler
``sample_dpm_2_ancestral``     ``k-dpm2-a``         eta, s_noise, noise_sampler
``sample_lms``                 ``k-lms-K``          order = K
``sample_dpmpp_2m``            ``dpmpp-2m``
``sample_dpmpp_2m_sde``        ``dpmpp-2m-sde``     eta ∈ [0, 1], noise_sampler; s_noise = 1 and
                                                    solver_type = "midpoint" only
``sample_dpmpp_2s_ancestral``  ``dpmpp-2s``         eta = 0 only (DPM-Solver++(2S))
``sample_dpmpp_sde``           ``dpmpp-2s``         eta = 0 and r = 1/2 only
``sample_dpm_fast``            ``dpm-solver-fast``  eta = 0 only; k-diffusion builds its λ grid in
                                                    torch's default dtype (float32 unless set)
=============================  ==================  ==============================================

A parameter value qtaylor does not reproduce is a ``ValueError`` naming it, its value and
the way out; none is ignored. ``sample_dpmpp_3m_sde`` and ``sample_dpm_adaptive`` are
different algorithms in qtaylor and are not provided (reading them names the nearest
sampler).

**Noise.** The churn of ``sample_euler``/``heun``/``dpm_2`` draws ``torch.randn_like(x)``
once per step, whether the step churns or not, as k-diffusion does, so the same
``torch.manual_seed`` gives the same samples. The other stochastic functions call
``noise_sampler(sigmas[i], sigmas[i + 1])`` for their step-i draw, as k-diffusion does;
without one they draw ``torch.randn_like(x)`` (k-diffusion's ``sample_dpmpp_2m_sde`` defaults
to a Brownian tree instead; pass it one to get its noise). Where k-diffusion draws noise that
it multiplies by zero (η = 0) qtaylor draws none.

**Every other qtaylor sampler** runs on the same arguments through :func:`sample`:

>>> x = sample(model, x, sigmas, sampler="qt-3")
>>> x = sample(model, x, sigmas, sampler="unipc-3", unipc_variant="bh1")

with the sampler's options as keywords (``qtaylor.all_sampler_names()`` lists the samplers,
``qtaylor.catalog()`` describes them).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import numpy as np
import torch

from . import _core
from . import torch as _qt

__all__ = [
    "K_DIFFUSION_EQUIVALENTS",
    "sample",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpm_fast",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lms",
]

K_DIFFUSION_EQUIVALENTS = {
    "sample_euler": "k-euler",
    "sample_euler_ancestral": "k-euler-a",
    "sample_heun": "k-heun",
    "sample_dpm_2": "k-dpm2",
    "sample_dpm_2_ancestral": "k-dpm2-a",
    "sample_lms": "k-lms",
    "sample_dpmpp_2m": "dpmpp-2m",
    "sample_dpmpp_2m_sde": "dpmpp-2m-sde",
    "sample_dpmpp_2s_ancestral": "dpmpp-2s",
    "sample_dpmpp_sde": "dpmpp-2s",
    "sample_dpm_fast": "dpm-solver-fast",
}
"""k-diffusion's function name → the qtaylor sampler it runs (``sample_lms`` with
``order=K`` runs ``k-lms-K``)."""

_NOT_PROVIDED = {
    "sample_dpmpp_3m_sde": (
        "its second step weights the first difference of x̂0 by φ₂ = (e^(−h) − 1)/h + 1, where "
        "DPM-Solver++(3M) as diffusers writes it (qtaylor's dpmpp-3m) takes the 2M midpoint weight "
        "(1 − e^(−h))/2, and qtaylor has no 3M SDE; the nearest is "
        "qtaylor.k_diffusion.sample(model, x, sigmas, sampler='dpmpp-3m') (the ODE solver), or keep "
        "k_diffusion.sampling.sample_dpmpp_3m_sde"
    ),
    "sample_dpm_adaptive": (
        "k-diffusion controls one step size for the whole batch with a PID controller, qtaylor's "
        "dpm-solver-12/23 control the step of every sample separately; the nearest is "
        "qtaylor.k_diffusion.sample(model, x, [sigma_max, sigma_min], sampler='dpm-solver-23'), or "
        "keep k_diffusion.sampling.sample_dpm_adaptive"
    ),
}


def __getattr__(name):
    if name in _NOT_PROVIDED:
        raise AttributeError(
            f"qtaylor.k_diffusion has no {name}: it is not an algorithm qtaylor reproduces ({_NOT_PROVIDED[name]})"
        )
    raise AttributeError(f"module 'qtaylor.k_diffusion' has no attribute '{name}'")


class _Run:
    """One k-diffusion-style call: the VE ↔ VP change of variables around
    :func:`qtaylor.torch.sample`, k-diffusion's callback dict and its noise conventions."""

    def __init__(
        self,
        model: Callable,
        x: torch.Tensor,
        extra_args: Optional[dict],
        callback: Optional[Callable[[dict], None]],
        disable: Optional[bool],
        sigmas=None,
        span: Optional[tuple] = None,
    ):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if extra_args is not None and not isinstance(extra_args, dict):
            raise TypeError(f"extra_args must be a dict of keyword arguments for the model, got {type(extra_args).__name__}")
        self.model = model
        self.x = x
        self.extra_args = {} if extra_args is None else extra_args
        self.callback = callback
        self.progress = (not disable) if disable is not None else sys.stderr.isatty()
        if sigmas is not None:
            self.sigmas, self.times = _sigma_grid(sigmas)
            top = max(self.times)
            self.grid = {"times": self.times}
        else:
            # sample_dpm_fast: the core builds the grid, uniform in λ over (sigma_max, sigma_min).
            self.sigmas, self.times = None, None
            top = span[1]
            self.grid = {"grid": "logsnr", "t_max": span[1], "t_min": span[0]}
        # The schedule's top must lie above every level the sampler calls the network at:
        # churn raises σ to at most √2 σ (k-diffusion caps γ at √2 − 1).
        self.schedule = _core.Schedule.ve(sigma_max=2.0 * top)
        self.step = 0
        self.step_sigma = 0.0
        self.draws = 0
        self.per_step_z: Optional[torch.Tensor] = None
        self.fired: Optional[int] = None
        self.last_input: Optional[torch.Tensor] = None
        self.noise_sampler = None
        self.per_step_noise = False
        self.dpm_solver_keys = False

    # -- the model -----------------------------------------------------------------------
    def _model(self, x_ve: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # qtaylor.torch.sample hands the model its own state: the VE state x0 + σ ε
        self.last_input = x_ve
        return self.model(x_ve, t.to(dtype=x_ve.dtype), **self.extra_args)

    # -- steps, callback and noise --------------------------------------------------------
    def _on_step(self, i: int, t: float, x: torch.Tensor) -> None:
        self.step, self.step_sigma, self.draws = i, t, 0
        if self.per_step_noise:
            self.per_step_z = torch.randn_like(x)

    def _level(self, value):
        """A σ (or per-row σs) as k-diffusion hands it over: a tensor like ``sigmas``."""
        if self.sigmas is not None:
            return self.sigmas.new_tensor(value)
        return torch.tensor(value, device=self.x.device)

    def _callback(self, d: dict) -> None:
        i = d["i"]
        if i == self.fired:
            return
        self.fired = i
        s = self.step_sigma
        sigma = self.sigmas[i] if self.times is not None and i < len(self.times) and self.times[i] == s else self._level(s)
        info = {"x": self.last_input, "i": i, "sigma": sigma, "sigma_hat": self._level(d["t"]), "denoised": d["output"]}
        if self.dpm_solver_keys:
            lam = self._level(float(self.schedule.lambda_(s)))
            info.update(t=lam, t_up=lam)
        self.callback(info)

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        self.draws += 1
        if self.per_step_noise:
            z, self.per_step_z = self.per_step_z, None
            if z is None:
                raise RuntimeError(f"step {self.step} asked for a second churn draw; k-diffusion's samplers draw one per step")
            return z
        if self.noise_sampler is None:
            return torch.randn_like(like)
        if self.draws > 1:
            raise ValueError(
                f"noise_sampler: this sampler draws {self.draws} normal tensors in step {self.step}, but a k-diffusion "
                "noise_sampler(sigma, sigma_next) gives one per step (a Brownian tree would repeat it); "
                "leave noise_sampler=None for independent torch.randn_like draws"
            )
        i = self.step
        last = len(self.sigmas) - 1
        return self.noise_sampler(self.sigmas[min(i, last)], self.sigmas[min(i + 1, last)])

    def run(self, sampler: str, steps: Optional[int] = None, **options) -> torch.Tensor:
        out = _qt.sample(
            self._model,
            self.x,
            sampler,
            steps,
            schedule=self.schedule,
            prediction_type="sample",
            noise_sampler=self._noise,
            callback=None if self.callback is None else self._callback,
            step_callback=self._on_step,
            progress=self.progress,
            **self.grid,
            **options,
        )
        return out.x


def _sigma_grid(sigmas):
    """``sigmas`` as a tensor (kept for the callback and noise_sampler) and as the float
    times of the VE schedule."""
    s = sigmas if isinstance(sigmas, torch.Tensor) else torch.as_tensor(sigmas, dtype=torch.float64)
    if s.dim() != 1:
        raise ValueError(f"sigmas has shape {tuple(s.shape)}; expected a 1-D grid σ_0 > σ_1 > … > σ_N (a final 0 allowed)")
    times = [float(v) for v in s.detach().cpu().tolist()]
    if len(times) < 2 or not all(np.isfinite(times)) or max(times) <= 0.0:
        raise ValueError(
            f"sigmas={_show(times)}: expected at least two finite levels σ_0 > … > σ_N >= 0, e.g. from "
            "k_diffusion.sampling.get_sigmas_karras"
        )
    try:
        _qt.make_grid(_core.Schedule.ve(sigma_max=2.0 * max(times)), times=times)
    except ValueError as e:
        raise ValueError(f"sigmas={_show(times)}: {e}; k-diffusion's sigmas are qtaylor's times on the VE schedule") from None
    return s, times


def _show(values) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:6])
    return f"[{shown}{', …' if len(values) > 6 else ''}]"


def _refuse(name: str, value, why: str, way_out: str) -> ValueError:
    return ValueError(f"{name}={value!r}: {why}; {way_out}")


# ---------------------------------------------------------------------------------------
# Any qtaylor sampler


def sample(
    model,
    x,
    sigmas,
    extra_args=None,
    callback=None,
    disable=None,
    *,
    sampler: str = "qt-3",
    noise_sampler=None,
    **options,
):
    """Any qtaylor ``sampler`` (``qtaylor.all_sampler_names()``) on k-diffusion's arguments.

    ``sigmas`` are the sampler's grid (multistep samplers start at lower orders and keep their
    history over it; ``dpm-solver-fast`` and the adaptive ``rk45``/``dpm-solver-12/23`` use its
    end points, the first spending ``len(sigmas) − 1`` network calls). ``options`` are the
    sampler's options (eta, expand, qt_last, ddpm_variance, rtol, atol, lower_order_final,
    unipc_variant, unipc_corrector, s_churn, s_tmin, s_tmax, s_noise, denoise_final), the same
    keywords as :func:`qtaylor.torch.sample`. A stochastic sampler's step-i draw is
    ``noise_sampler(sigmas[i], sigmas[i + 1])`` (``torch.randn_like(x)`` without one); a
    deterministic run, or a sampler drawing several normals per step, refuses a
    noise_sampler. Returns the samples.
    """
    if noise_sampler is not None and not _core.SamplerSpec(sampler, **options).is_stochastic:
        raise _refuse(
            "noise_sampler",
            noise_sampler,
            f"sampler '{sampler}' draws no noise with these options",
            "drop it, or choose a stochastic sampler or option (e.g. eta > 0, s_churn > 0)",
        )
    run = _Run(model, x, extra_args, callback, disable, sigmas=sigmas)
    run.noise_sampler = noise_sampler
    return run.run(sampler, **options)


# ---------------------------------------------------------------------------------------
# k-diffusion's functions


def _churn_sampler(name, model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise):
    if s_churn > 0 and s_noise <= 0:
        raise _refused_noise(s_noise, s_churn)
    run = _Run(model, x, extra_args, callback, disable, sigmas=sigmas)
    run.per_step_noise = True
    return run.run(name, s_churn=float(s_churn), s_tmin=float(s_tmin), s_tmax=float(s_tmax), s_noise=float(s_noise))


def _refused_noise(s_noise, s_churn) -> ValueError:
    return _refuse(
        "s_noise",
        s_noise,
        f"with s_churn={s_churn!r} k-diffusion calls the network at the churned σ̂ while adding no noise; "
        "qtaylor churns only with s_noise > 0",
        "pass s_churn=0 for no churn, or s_noise > 0",
    )


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """Euler steps in σ with Karras et al.'s churn (``k-euler``)."""
    return _churn_sampler("k-euler", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                s_tmax=float("inf"), s_noise=1.0):
    """Heun steps in σ with churn, an Euler step to σ = 0 (``k-heun``)."""
    return _churn_sampler("k-heun", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise)


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                 s_tmax=float("inf"), s_noise=1.0):
    """DPM2 in σ (midpoint at the geometric mean of σ̂ and σ') with churn (``k-dpm2``)."""
    return _churn_sampler("k-dpm2", model, x, sigmas, extra_args, callback, disable, s_churn, s_tmin, s_tmax, s_noise)


def _ancestral(name, model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler):
    run = _Run(model, x, extra_args, callback, disable, sigmas=sigmas)
    run.noise_sampler = noise_sampler
    return run.run(name, eta=float(eta), s_noise=float(s_noise))


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """Euler steps down to σ_down, then noise of level σ_up (``k-euler-a``)."""
    return _ancestral("k-euler-a", model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                           noise_sampler=None):
    """DPM2 steps down to σ_down, then noise of level σ_up (``k-dpm2-a``)."""
    return _ancestral("k-dpm2-a", model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler)


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4):
    """Linear multistep of ``order`` in σ (``k-lms-K``, K = order)."""
    if isinstance(order, bool) or not isinstance(order, int):
        raise _refuse("order", order, "expected an integer", "pass e.g. order=4")
    try:
        _core.SamplerSpec(f"k-lms-{order}")
    except ValueError as e:
        raise _refuse("order", order, str(e), "pass one of those orders") from None
    run = _Run(model, x, extra_args, callback, disable, sigmas=sigmas)
    return run.run(f"k-lms-{order}")


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver++(2M): a first-order first step, x̂0 at σ = 0 (``dpmpp-2m``)."""
    run = _Run(model, x, extra_args, callback, disable, sigmas=sigmas)
    return run.run("dpmpp-2m", lower_order_final=False)


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                        noise_sampler=None, solver_type="midpoint"):
    """SDE-DPM-Solver++(2M) with stochasticity η, midpoint form (``dpmpp-2m-sde``)."""
    if solver_type != "midpoint":
        raise _refuse(
            "solver_type",
            solver_type,
            "qtaylor's dpmpp-2m-sde is the midpoint form",
            "pass solver_type='midpoint', or keep k_diffusion.sampling.sample_dpmpp_2m_sde",
        )
    if s_noise != 1.0:
        raise _refuse(
            "s_noise",
            s_noise,
            "qtaylor's dpmpp-2m-sde adds the SDE's own noise level",
            "pass s_noise=1 (and eta < 1 for less noise)",
        )
    run = _Run(model, x, extra_args, callback, disable, sigmas=sigmas)
    run.noise_sampler = noise_sampler
    return run.run("dpmpp-2m-sde", eta=float(eta), lower_order_final=False)


def _deterministic_2s(model, x, sigmas, extra_args, callback, disable, eta):
    if eta != 0:
        raise _refuse(
            "eta",
            eta,
            "qtaylor's dpmpp-2s is DPM-Solver++(2S) without ancestral noise",
            "pass eta=0, or keep k-diffusion's function for η > 0",
        )
    run = _Run(model, x, extra_args, callback, disable, sigmas=sigmas)
    return run.run("dpmpp-2s")


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                              noise_sampler=None):
    """DPM-Solver++(2S) (``dpmpp-2s``): k-diffusion's ancestral variant at ``eta=0`` only,
    where ``s_noise`` and ``noise_sampler`` have no effect."""
    return _deterministic_2s(model, x, sigmas, extra_args, callback, disable, eta)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, s_noise=1.0,
                     noise_sampler=None, r=1 / 2):
    """DPM-Solver++(2S) (``dpmpp-2s``): k-diffusion's stochastic single-step solver at
    ``eta=0`` and ``r=1/2`` only, where ``s_noise`` and ``noise_sampler`` have no effect."""
    if r != 0.5:
        raise _refuse(
            "r",
            r,
            "qtaylor's dpmpp-2s puts its intermediate point at the λ-midpoint",
            "pass r=1/2, or keep k_diffusion.sampling.sample_dpmpp_sde",
        )
    return _deterministic_2s(model, x, sigmas, extra_args, callback, disable, eta)


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.0,
                    s_noise=1.0, noise_sampler=None):
    """DPM-Solver-fast (``dpm-solver-fast``): ``n`` network calls in steps of orders 3, …, 3
    then 2, 1 / 1 / 2, uniform in λ = −log σ from ``sigma_max`` to ``sigma_min`` (no step to
    σ = 0). The callback dict adds k-diffusion's ``t`` and ``t_up`` (λ of the step's level).
    ``eta=0`` only, where ``s_noise`` and ``noise_sampler`` have no effect."""
    if eta != 0:
        raise _refuse(
            "eta",
            eta,
            "qtaylor's dpm-solver-fast is the deterministic DPM-Solver",
            "pass eta=0, or keep k_diffusion.sampling.sample_dpm_fast",
        )
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise _refuse("n", n, "expected the number of network calls, a positive integer", "pass e.g. n=10")
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if not (np.isfinite(float(v)) and float(v) > 0):
            raise _refuse(name, v, "expected a finite level > 0 (the solver does not step to σ = 0)", "pass e.g. 0.03")
    if not float(sigma_min) < float(sigma_max):
        raise _refuse("sigma_min", sigma_min, f"expected below sigma_max={sigma_max!r}", "swap them")
    run = _Run(model, x, extra_args, callback, disable, span=(float(sigma_min), float(sigma_max)))
    run.dpm_solver_keys = True
    return run.run("dpm-solver-fast", n)
