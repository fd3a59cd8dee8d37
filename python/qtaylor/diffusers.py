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

import math
from dataclasses import dataclass
from typing import List, Optional, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
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
    "thresholding": "dynamic thresholding",
    "rescale_betas_zero_snr": "zero-terminal-SNR rescaling of the betas",
    "use_exponential_sigmas": "exponential sigmas (pass sigmas= to set_timesteps)",
    "use_beta_sigmas": "beta sigmas (pass sigmas= to set_timesteps)",
}


class _FedOps(TorchOps):
    """Ops for a replay: the pipeline calls the network, so ``model`` is never used."""


class QTaylorScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running any qtaylor sampler (``sampler="qt-3"``, ``"unipc-3"``,
    ``"dpmpp-2m"``, …; ``qtaylor.samplers()`` lists them).

    Config keys: the schedule keys of DDPMScheduler / DDIMScheduler / DPMSolverMultistep /
    UniPCMultistep (``num_train_timesteps``, ``beta_start``, ``beta_end``,
    ``beta_schedule``, ``trained_betas``, ``prediction_type``, ``timestep_spacing``,
    ``steps_offset``, ``clip_sample``, ``clip_sample_range``, ``final_sigmas_type``,
    ``lower_order_final``, ``variance_type``, ``use_karras_sigmas``, ``use_lu_lambdas``), and
    the sampler's options (``sampler``,
    ``expand``, ``qt_last``, ``eta``, ``unipc_variant``, ``unipc_corrector``,
    ``ddpm_variance``, ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``).

    ``final_sigmas_type="zero"`` (default) ends at ᾱ = 1, where the last call returns
    x̂0; ``"sigma_min"`` ends at the first trained timestep.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
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
        rescale_betas_zero_snr: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
    ):
        for key, what in _UNSUPPORTED.items():
            if locals()[key]:
                raise ValueError(
                    f"QTaylorScheduler: config key '{key}' = True ({what}) is not supported; set it to False"
                )
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(
                f"prediction_type '{prediction_type}' is not supported; expected one of: epsilon, sample, v_prediction"
            )
        if timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(
                f"timestep_spacing '{timestep_spacing}' is not supported; expected one of: leading, trailing, linspace"
            )
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(
                f"final_sigmas_type '{final_sigmas_type}' is not supported; expected one of: zero, sigma_min"
            )
        if trained_betas is not None:
            self._schedule = _core.Schedule.discrete(
                trained_betas=[float(b) for b in np.asarray(trained_betas).reshape(-1)]
            )
        else:
            if beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
                raise ValueError(
                    f"beta_schedule '{beta_schedule}' is not supported; expected one of: linear, scaled_linear, squaredcos_cap_v2 (or trained_betas)"
                )
            self._schedule = _core.Schedule.discrete(
                beta_schedule, beta_start, beta_end, num_train_timesteps
            )
        if ddpm_variance is None:
            learned_large = variance_type is not None and variance_type.startswith("fixed_large")
            ddpm_variance = "beta" if learned_large else "beta-tilde"
        self._spec = _core.SamplerSpec(
            sampler,
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
        if self._spec.is_adaptive:
            raise ValueError(
                f"sampler '{sampler}' is adaptive: its network calls depend on the tensors, so it cannot run "
                "through a scheduler's step(); use qtaylor.torch.sample(model, x, sampler=...) instead"
            )
        self._clip = float(clip_sample_range) if clip_sample else None
        if self._clip is not None and not (self._clip > 0 and math.isfinite(self._clip)):
            raise ValueError(f"clip_sample_range {clip_sample_range}: expected a positive number")
        self.init_noise_sigma = 1.0
        self.num_inference_steps: Optional[int] = None
        self.timesteps = torch.from_numpy(
            np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64)
        )
        self._times: Optional[List[float]] = None
        self._program: Optional[_core.Program] = None
        self._replay: Optional[_core.Replay] = None
        self._begin_index: Optional[int] = None
        self._ops = _FedOps()

    # -- copies ------------------------------------------------------------------------
    def __getstate__(self):
        """A copy (``copy.deepcopy``, ``pickle``) is rebuilt from the config and the current
        grid; a run in progress is not copied (the copy starts its grid afresh)."""
        cfg = dict(self.config)
        return {
            "config": cfg,
            "times": self._times,
            "tail": getattr(self, "_tail", False),
            "device": str(self.timesteps.device),
            "num_inference_steps": self.num_inference_steps,
            "begin_index": self._begin_index,
        }

    def __setstate__(self, state):
        cfg = state["config"]
        self.__init__(**{k: v for k, v in cfg.items() if not k.startswith("_")})
        # diffusers' bookkeeping keys (_class_name, _use_default_values, ...) as they were.
        self.register_to_config(**{k: v for k, v in cfg.items() if k.startswith("_")})
        if state["times"] is not None:
            self._install(state["times"], state["device"], state["tail"])
            self.num_inference_steps = state["num_inference_steps"]
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

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """VP models take the state unscaled."""
        return sample

    # -- grids --------------------------------------------------------------------------
    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
    ):
        """Sets the grid: ``num_inference_steps`` with the config's spacing, or explicit
        descending ``timesteps`` (fractional ones are fractional steps of the table, linear
        in log σ as diffusers' ``_sigma_to_t``), or diffusers ``sigmas`` (σ/α, descending;
        a final 0 ends at x̂0), and records the sampler's program on it. A tuned grid file
        (``qtaylor tune``) goes in through either:
        ``set_timesteps(sigmas=qtaylor.read_grid_file(path, scheduler.schedule)["sigmas"])``."""
        given = [n for n, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None]
        if len(given) > 1:
            raise ValueError("give only one of timesteps= and sigmas=")
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
                        spacing=self.config.timestep_spacing,
                        steps_offset=self.config.steps_offset,
                        final_=final,
                    ).tolist()
                tail = final == "last" and not cont and len(times) - 1 == int(num_inference_steps) - 1
        self._install(times, device, tail)
        self.num_inference_steps = len(times) - 1 + int(tail)

    def _install(self, times: List[float], device=None, tail: bool = False):
        program = _core.Program(
            self._schedule,
            self._spec,
            times,
            prediction_type=self.config.prediction_type,
            clip=self._clip,
        )
        self._times = times
        self._program = program
        self._replay = None
        self._begin_index = None
        model_times = program.call_model_times
        integral = all(abs(v - round(v)) < 1e-9 for v in model_times)
        if integral:
            ts = torch.tensor([int(round(v)) for v in model_times], dtype=torch.int64)
        else:
            ts = torch.tensor(model_times, dtype=torch.float32)
        self._tail = tail
        self._tail_done = False
        if tail:
            ts = torch.cat([ts, torch.zeros(1, dtype=ts.dtype)])
        self.timesteps = ts.to(device) if device is not None else ts
        self._call_times = program.call_times
        self._call_steps = program.call_steps
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
            self._schedule, self._spec, sub, prediction_type=self.config.prediction_type, clip=self._clip
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
        if self._replay is None:
            self._start(t_val, sample)
        replay = self._replay
        if replay.finished and self._tail and not self._tail_done and abs(t_val) < 1e-6:
            # The zero-length last step of a sigma_min grid that ends at timestep 0.
            self._tail_done = True
            prev = sample
            if not return_dict:
                return (prev,)
            x0 = replay.x0(model_output, sample, self._schedule.time_of_model_time(0.0), self._ops)
            return QTaylorSchedulerOutput(prev_sample=prev, pred_original_sample=x0.to(sample.dtype))
        if replay.finished:
            raise ValueError(
                f"step() called after the last of the {len(self._call_times)} network calls; call set_timesteps again"
            )
        k = replay.calls_done
        expected = self.timesteps[k].item()
        if abs(t_val - float(expected)) > 1e-3 * max(1.0, abs(float(expected))):
            raise ValueError(
                f"step() got timestep {t_val} but the sampler's network call {k} is at timestep {expected}; "
                "pass the scheduler's timesteps in order"
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
                f"model_output contains NaN or Inf at network call {k} (timestep {expected})"
            )
        self._ops.generator = generator
        x0 = None
        if return_dict:
            x0 = replay.x0(model_output, sample, self._call_times[k], self._ops)
        prev = replay.feed(model_output, sample, self._ops)
        if prev.dtype != sample.dtype:
            prev = prev.to(sample.dtype)
        if x0 is not None and x0.dtype != sample.dtype:
            x0 = x0.to(sample.dtype)
        if not return_dict:
            return (prev,)
        return QTaylorSchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def _start(self, t_val: float, sample: torch.Tensor):
        first = float(self.timesteps[0].item())
        if abs(t_val - first) > 1e-3 * max(1.0, abs(first)):
            # A pipeline that sliced the timesteps without set_begin_index: start at the
            # first step whose first call is at this timestep.
            ts = [float(v) for v in self.timesteps.tolist()]
            for k, v in enumerate(ts):
                if abs(v - t_val) <= 1e-3 * max(1.0, abs(v)) and self._first_call_of_step(
                    self._call_steps[k]
                ) == k:
                    self._restart_at_call(k)
                    break
            else:
                raise ValueError(
                    f"step() got timestep {t_val}, which starts no step of this grid (timesteps {ts})"
                )
        self._replay = _core.Replay(self._program, sample, self._ops)

    # -- forward process ----------------------------------------------------------------
    def add_noise(
        self,
        original_samples: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """``x_t = α(t) x0 + σ(t) ε`` at diffusers timesteps (one per row, or one)."""
        tv = timesteps if isinstance(timesteps, torch.Tensor) else torch.tensor(timesteps)
        steps = np.atleast_1d(tv.detach().cpu().to(torch.float64).numpy())
        t = self._schedule.time_of_model_time(steps)
        a = np.atleast_1d(self._schedule.alpha(t))
        s = np.atleast_1d(self._schedule.sigma(t))
        work = work_dtype(original_samples.dtype)
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        at = torch.tensor(a, dtype=work, device=original_samples.device).view(shape)
        st = torch.tensor(s, dtype=work, device=original_samples.device).view(shape)
        out = at * original_samples.to(work) + st * noise.to(device=original_samples.device, dtype=work)
        return out.to(original_samples.dtype)
