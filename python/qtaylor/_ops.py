"""The tensor operations the Rust core asks for, on PyTorch tensors.

The core (``qtaylor._core``) runs every sampler and computes every coefficient in f64; it
moves tensors only through the methods of an ops object: a network call, a linear
combination ``Σ c_k x_k``, normal noise, a clamp and (adaptive solvers) a per-row error
norm. This module is that object for PyTorch. It holds no sampler formula.

Precision: float64 tensors are combined in float64, every other floating dtype in float32
(as diffusers' schedulers upcast), and the result is cast back to the dtype of the first
term (the state).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import math

import torch

Coef = Union[float, Sequence[float]]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def all_finite(x: torch.Tensor) -> bool:
    """True when no entry is NaN or Inf. First the sum in the tensor's own dtype (one
    reduction, no copy): any NaN or Inf makes it non-finite, so a finite sum proves every
    entry finite. Only a non-finite sum (a NaN, an Inf, or finite entries whose sum
    overflows, e.g. large float16 values) takes the exact elementwise check."""
    if math.isfinite(x.sum().item()):
        return True
    return bool(torch.isfinite(x).all())


class TorchOps:
    """Executes the core's operations on PyTorch tensors.

    ``model(x, t)`` is called with ``t`` a 1-D tensor of the network's time argument, one
    entry per row (the diffusers timestep for discrete schedules, the continuous time
    otherwise), of dtype float64 when ``x`` is float64 and float32 otherwise.
    """

    def __init__(
        self,
        model: Optional[Callable] = None,
        generator: Optional[torch.Generator] = None,
        noise_sampler: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        callback: Optional[Callable[[dict], None]] = None,
        check_finite: bool = True,
    ):
        self.user_model = model
        self.calls = 0
        self.on_call: Optional[Callable[[int], None]] = None
        self.generator = generator
        self.noise_sampler = noise_sampler
        self.callback = callback
        self.check_finite = check_finite

    # -- network -----------------------------------------------------------------------
    def model(self, x: torch.Tensor, t: Sequence[float], step: int) -> torch.Tensor:
        if self.user_model is None:
            raise RuntimeError("this ops object has no model (the scheduler feeds outputs)")
        tdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        tt = torch.tensor(list(t), dtype=tdtype, device=x.device)
        if tt.numel() == 1 and x.shape[0] != 1:
            tt = tt.expand(x.shape[0])
        out = self.user_model(x, tt)
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the model returned {type(out).__name__}; expected a torch.Tensor shaped like x {tuple(x.shape)}"
            )
        if out.shape != x.shape:
            raise ValueError(
                f"the model returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}; expected the same shape"
            )
        if self.check_finite and not all_finite(out):
            when = f"t = {t[0]}" if len(t) == 1 else f"t in [{min(t)}, {max(t)}]"
            raise FloatingPointError(
                f"model output contains NaN or Inf at step {step} ({when})"
            )
        self.calls += 1
        if self.callback is not None:
            self.callback({"i": step, "t": t[0] if len(t) == 1 else list(t), "x": x, "output": out, "nfe": self.calls})
        if self.on_call is not None:
            self.on_call(self.calls)
        return out

    # -- arithmetic ----------------------------------------------------------------------
    def lincomb(self, coefs: Sequence[Coef], xs: Sequence[torch.Tensor]) -> torch.Tensor:
        first = xs[0]
        work = work_dtype(first.dtype)
        acc = None
        for c, x in zip(coefs, xs):
            if x.dtype != work:
                x = x.to(work)
            if isinstance(c, (list, tuple)):
                shape = (-1,) + (1,) * (x.dim() - 1)
                ct = torch.tensor(c, dtype=work, device=x.device).view(shape)
                if acc is None:
                    acc = x * ct
                else:
                    acc.addcmul_(x, ct)
            else:
                if acc is None:
                    acc = x * c
                else:
                    acc.add_(x, alpha=c)
        return acc if acc.dtype == first.dtype else acc.to(first.dtype)

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        if self.noise_sampler is not None:
            z = self.noise_sampler(like)
            if z.shape != like.shape:
                raise ValueError(
                    f"noise_sampler returned shape {tuple(z.shape)}; expected {tuple(like.shape)}"
                )
            return z.to(device=like.device, dtype=like.dtype)
        g = self.generator
        device = g.device if g is not None else like.device
        z = torch.randn(like.shape, generator=g, device=device, dtype=like.dtype)
        return z.to(like.device)

    def clamp(self, x: torch.Tensor, limit: float) -> torch.Tensor:
        return x.clamp(-limit, limit)

    def threshold(self, x: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
        """Dynamic thresholding per sample (the core's X0Clip::Threshold, as diffusers'
        ``_threshold_sample``): s = the ``ratio`` quantile of |x| over each row, clamped to
        [1, max_value] (torch.clamp's order), then clamp(x, −s, s) / s; half precision in f32."""
        flat = x.reshape(x.shape[0], -1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()
        s = torch.quantile(flat.abs(), ratio, dim=1)
        s = torch.clamp(s, min=1, max=max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(x.shape).to(x.dtype)

    def error_norm(self, e, a, b, rtol: float, atol: float, kind: str):
        m = torch.maximum(a.abs(), b.abs())
        if kind == "sum":
            scale = m * rtol + atol
        else:
            scale = torch.clamp(m * rtol, min=atol)
        r = (e / scale).to(torch.float64).reshape(e.shape[0], -1)
        return r.square().mean(dim=1).sqrt().tolist()

    def begin_step(self, i: int, t: float, x: torch.Tensor) -> None:
        """The sampler starts step ``i`` at network time ``t`` (the callback fires per
        network call instead, in :meth:`model`)."""
