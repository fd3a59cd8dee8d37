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

from typing import Callable, NamedTuple, Optional, Sequence

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
    t_min: float = 1e-3,
    rho: float = 7.0,
    spacing: Optional[str] = None,
    steps_offset: int = 0,
    final: str = "zero",
    timesteps: Optional[Sequence[int]] = None,
    times: Optional[Sequence[float]] = None,
) -> list:
    """The grid of schedule times (``t_0 > … > t_N``) a sampler runs on.

    ``times`` gives it directly; discrete schedules take diffusers' ``spacing``
    (leading, trailing, linspace) with ``steps_offset`` and ``final`` ("zero": end at
    ᾱ = 1, "last": at the first trained step), or explicit descending ``timesteps``;
    continuous schedules take ``grid`` (uniform, quadratic, logsnr, karras) from ``t_max``
    to ``t_min``. Options that do not apply to the schedule are an error.
    """
    if times is not None:
        for name, v in (("grid", grid), ("spacing", spacing), ("timesteps", timesteps)):
            if v is not None:
                raise ValueError(f"times= gives the grid; {name}={v!r} would be ignored")
        return [float(t) for t in times]
    if schedule.num_train_timesteps is not None:
        if grid is not None:
            raise ValueError(
                f"grid={grid!r} applies to continuous schedules; a discrete schedule takes spacing= "
                "(leading, trailing, linspace), timesteps= or times="
            )
        return discrete_times(schedule, steps, spacing or "leading", steps_offset, final, timesteps)
    if spacing is not None or timesteps is not None:
        raise ValueError(
            "spacing= and timesteps= apply to discrete schedules; a continuous schedule takes grid= or times="
        )
    if steps is None:
        raise ValueError("give steps= (or times=)")
    return _core.continuous_grid(
        schedule, steps, grid or "uniform", t_max=t_max, t_min=t_min, rho=rho
    ).tolist()


def discrete_times(schedule, steps, spacing, steps_offset, final, timesteps) -> list:
    ts = None
    if timesteps is not None:
        bad = [v for v in timesteps if float(v) != int(v)]
        if bad:
            raise ValueError(
                f"timesteps must be integers for a discrete grid; got {bad[0]!r} (use times= for fractional times)"
            )
        ts = [int(v) for v in timesteps]
    return _core.discrete_grid(
        schedule,
        steps=steps,
        spacing=spacing,
        steps_offset=steps_offset,
        final_=final,
        timesteps=ts,
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
    grid: Optional[str] = None,
    t_max: Optional[float] = None,
    t_min: float = 1e-3,
    rho: float = 7.0,
    spacing: Optional[str] = None,
    steps_offset: int = 0,
    final: str = "zero",
    timesteps: Optional[Sequence[int]] = None,
    times: Optional[Sequence[float]] = None,
    generator: Optional[torch.Generator] = None,
    noise_sampler: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    callback: Optional[Callable[[dict], None]] = None,
    **sampler_options,
) -> SampleResult:
    """Samples from ``x`` (the state at the grid's first time) with ``sampler``.

    ``model(x, t)`` returns the prediction named by ``prediction_type`` (epsilon, sample,
    v_prediction); ``t`` is a 1-D tensor with one network time per row (the diffusers
    timestep t·T − 1 on a discrete schedule, the continuous time otherwise). ``schedule``
    defaults to DDPM's linear β (``Schedule.discrete()``). ``clip_sample`` clamps x̂0 to
    ±value. ``generator`` drives the noise of stochastic samplers (or ``noise_sampler(like)``
    supplies it). ``callback({"i", "t", "x"})`` is called at the start of every step.
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
    given = times if times is not None else timesteps
    if given is not None and steps is not None and steps != len(given) - (times is not None):
        raise ValueError(
            f"steps={steps} disagrees with the {len(given)} entries of "
            f"{'times' if times is not None else 'timesteps'}; give one of them"
        )
    if given is None and steps is None:
        steps = 10
    spec = _core.SamplerSpec(sampler, **sampler_options)
    schedule = schedule if schedule is not None else _core.Schedule.discrete()
    ts = make_grid(
        schedule,
        steps if given is None else None,
        grid=grid,
        t_max=t_max,
        t_min=t_min,
        rho=rho,
        spacing=spacing,
        steps_offset=steps_offset,
        final=final,
        timesteps=timesteps,
        times=times,
    )
    ops = TorchOps(model, generator=generator, noise_sampler=noise_sampler, callback=callback)
    out, nfe = _core.run(
        schedule,
        spec,
        ts,
        x,
        ops,
        x.shape[0],
        prediction_type=prediction_type,
        clip=clip_sample,
    )
    return SampleResult(out, nfe)
