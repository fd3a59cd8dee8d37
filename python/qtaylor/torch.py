"""A k-diffusion-style sampling loop for any PyTorch model.

>>> import qtaylor.torch as qt
>>> out = qt.sample(lambda x, t: unet(x, t).sample, torch.randn(4, 3, 32, 32),
...                 sampler="qt-3", steps=10)
>>> out.x, out.nfe

The loop itself runs in the Rust core (``qtaylor._core.run``), the same sampler code as the
``qtaylor`` command line; the tensors stay PyTorch tensors on their device and in their
dtype, moved by :class:`qtaylor._ops.TorchOps`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch

from . import _core
from ._ops import TorchOps

__all__ = ["SampleResult", "sample", "make_grid", "stream_noise"]


class SampleResult(NamedTuple):
    """The samples and the network evaluations per sample that produced them."""

    x: torch.Tensor
    nfe: float


_SPEC_KEYS = (
    "eta",
    "expand",
    "qt_last",
    "ddpm_variance",
    "rtol",
    "atol",
    "lower_order_final",
    "unipc_variant",
    "unipc_corrector",
    "s_churn",
    "s_tmin",
    "s_tmax",
    "s_noise",
    "denoise_final",
)


def make_grid(
    schedule: _core.Schedule,
    steps: Optional[int] = None,
    *,
    grid: Optional[str] = None,
    t_max: Optional[float] = None,
    t_min: Optional[float] = None,
    rho: Optional[float] = None,
    sigma_max: Optional[float] = None,
    sigma_min: Optional[float] = None,
    spacing: Optional[str] = None,
    steps_offset: Optional[int] = None,
    final: Optional[str] = None,
    timesteps: Optional[Sequence[float]] = None,
    sigmas: Optional[Sequence[float]] = None,
    times: Optional[Sequence[float]] = None,
) -> list:
    """The grid of schedule times (``t_0 > … > t_N``) a sampler runs on, made by the Rust
    core exactly as ``qtaylor sample`` makes it from the same flags.

    ``times`` gives it directly; discrete schedules take diffusers' ``spacing`` (leading by
    default, trailing, linspace) with ``steps_offset`` and ``final`` ("zero", the default:
    end at ᾱ = 1; "last": at the first trained step), explicit descending ``timesteps``
    (fractional ones allowed), or a continuous ``grid`` in fractional timesteps; continuous
    schedules take ``grid`` (uniform by default, quadratic, logsnr, karras with ``rho``,
    default 7) from ``t_max`` (or ``sigma_max``) to ``t_min`` (or ``sigma_min``; default
    1e-3). ``sigmas`` are diffusers' σ/α, descending, a final 0 for x̂0. A setting the grid
    does not use is an error that names it.
    """
    return _core.grid_times(
        schedule,
        steps,
        grid=grid,
        rho=rho,
        t_max=t_max,
        t_min=t_min,
        sigma_max=sigma_max,
        sigma_min=sigma_min,
        spacing=spacing,
        steps_offset=steps_offset,
        final_=final,
        timesteps=None if timesteps is None else [float(v) for v in timesteps],
        sigmas=None if sigmas is None else [float(v) for v in sigmas],
        times=None if times is None else [float(v) for v in times],
    ).tolist()


def stream_noise(seed: int, rows: int, first: int = 0):
    """Start noise and a ``noise_sampler`` drawing from qtaylor's per-sample streams.

    Returns ``(draw, noise_sampler)``: ``draw(item_shape)`` gives the next normal draws as
    a float64 tensor of shape ``(rows, *item_shape)``; ``noise_sampler(like)`` the same,
    shaped, typed and placed like ``like``. Sample i draws from stream (seed, first + i),
    exactly as ``qtaylor sample --seed`` does, so results match the command line bit for
    bit and do not depend on the batch.
    """
    streams = _core.NoiseStreams(seed, rows, first)

    def draw(item_shape) -> torch.Tensor:
        return torch.from_numpy(streams.normal(list(item_shape)))

    def noise_sampler(like: torch.Tensor) -> torch.Tensor:
        return draw(like.shape[1:]).to(device=like.device, dtype=like.dtype)

    return draw, noise_sampler


def sample(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sampler: str = "qt-3",
    steps: Optional[int] = None,
    *,
    schedule: Optional[_core.Schedule] = None,
    prediction_type: str = "epsilon",
    clip_sample: Optional[float] = None,
    threshold: Optional[Tuple[float, float]] = None,
    grid: Optional[str] = None,
    t_max: Optional[float] = None,
    t_min: Optional[float] = None,
    rho: Optional[float] = None,
    sigma_max: Optional[float] = None,
    sigma_min: Optional[float] = None,
    spacing: Optional[str] = None,
    steps_offset: Optional[int] = None,
    final: Optional[str] = None,
    timesteps: Optional[Sequence[float]] = None,
    sigmas: Optional[Sequence[float]] = None,
    times: Optional[Sequence[float]] = None,
    generator: Optional[torch.Generator] = None,
    noise_sampler: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    callback: Optional[Callable[[dict], None]] = None,
    step_callback: Optional[Callable[[int, float, torch.Tensor], None]] = None,
    progress: bool = False,
    grad: bool = False,
    **sampler_options,
) -> SampleResult:
    """Samples from ``x`` (the state at the grid's first time) with ``sampler``.

    ``model(x, t)`` returns the prediction named by ``prediction_type`` (epsilon, sample,
    v_prediction, flow_prediction); ``t`` is a 1-D tensor with one network time per row (the
    diffusers timestep t·T − 1 on a discrete schedule, ``1000 ς`` on ``Schedule.flow``, the
    continuous time otherwise). ``x``, the model's input and the result are in the model's
    own state: the VP state, the flow state ``(1 − ς) x0 + ς ε`` on ``Schedule.flow`` (start
    from pure noise at ``t_max=1``), ``x0 + t ε`` on ``Schedule.ve``. ``schedule``
    defaults to DDPM's linear β (``Schedule.discrete()``). ``clip_sample`` clamps x̂0 to
    ±value; ``threshold=(ratio, max)`` thresholds it dynamically per sample instead
    (diffusers' ``thresholding`` with ``dynamic_thresholding_ratio``, ``sample_max_value``). ``generator`` drives the noise of stochastic samplers (or ``noise_sampler(like)``
    supplies it). ``callback({"i", "t", "x", "output", "nfe"})`` is called once after every
    network call, adaptive samplers included: the grid step ``i``, the call's network time
    ``t``, its input ``x`` and ``output``, and the network calls so far ``nfe``.
    ``step_callback(i, t, x)`` is called when the sampler starts step ``i`` at network time
    ``t`` in state ``x``, before the step's noise draws and network calls.
    ``progress=True`` shows a tqdm bar over the network calls. The run keeps no autograd
    graph unless ``grad=True`` (gradients through the sampler, e.g. for a tuner).
    ``sampler_options`` are the sampler's options (eta, expand, qt_last, ddpm_variance,
    rtol, atol, lower_order_final, unipc_variant, unipc_corrector, s_churn, s_tmin,
    s_tmax, s_noise, denoise_final). Every sampler works, the adaptive ``rk45`` and
    ``dpm-solver-12/23`` included.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (batch, ...) with batch >= 1")
    if not x.is_floating_point():
        raise ValueError(f"x has dtype {x.dtype}; expected a floating-point tensor")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf; the start state must be finite")
    unknown = sorted(set(sampler_options) - set(_SPEC_KEYS))
    if unknown:
        raise TypeError(
            f"unknown sampler option(s) {', '.join(unknown)}; expected one of: {', '.join(_SPEC_KEYS)}"
        )
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps={steps!r}: expected a positive integer")
    explicit = times is not None or timesteps is not None or sigmas is not None
    if not explicit and steps is None:
        steps = 10
    spec = _core.SamplerSpec(sampler, **sampler_options)
    schedule = schedule if schedule is not None else _core.Schedule.discrete()
    ts = make_grid(
        schedule,
        steps,
        grid=grid,
        t_max=t_max,
        t_min=t_min,
        rho=rho,
        sigma_max=sigma_max,
        sigma_min=sigma_min,
        spacing=spacing,
        steps_offset=steps_offset,
        final=final,
        timesteps=timesteps,
        sigmas=sigmas,
        times=times,
    )
    ops = TorchOps(model, generator=generator, noise_sampler=noise_sampler, callback=callback)
    if step_callback is not None:
        ops.begin_step = step_callback  # the core calls ops.begin_step(i, t, x) per step
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=spec.nfe(len(ts) - 1, ts[-1] == 0.0), desc=spec.name, unit="NFE")
        ops.on_call = lambda n: bar.update(1)
    try:
        with torch.set_grad_enabled(grad):
            out, nfe = _core.run(
                schedule,
                spec,
                ts,
                x,
                ops,
                x.shape[0],
                prediction_type=prediction_type,
                clip=clip_sample,
                threshold=threshold,
                model_state=True,
            )
    finally:
        if bar is not None:
            bar.close()
    return SampleResult(out, nfe)
