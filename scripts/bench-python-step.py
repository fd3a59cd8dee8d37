#!/usr/bin/env python3
"""Per-step overhead of QTaylorScheduler.step against diffusers' own schedulers' step, on
the CPU, for SD-like latents (1, 4, 64, 64) and (16, 4, 128, 128).

Both schedulers get the same config (Stable Diffusion's scaled-linear betas), the same
number of steps and random model outputs; only the scheduler is timed (the network is not
involved), over full sampling loops, interleaved, best of several repeats. The ratio is
ours / theirs (< 1: ours is faster).

Table 1 (VP samplers, chosen with sampler=): only `step` is timed.
Table 2 (diffusers' σ-space classes): QTaylorScheduler.from_config(that scheduler) with no
sampler= (qtaylor's k-euler, k-euler-a, k-heun, k-lms, k-dpm2, k-dpm2-a); these classes need
`scale_model_input`, so a pipeline's `scale_model_input` + `step` is timed on both sides,
with each part's best also shown. Heun and KDPM2 make 2 network calls per step: times are
per call (per `step()` call). Ancestral samplers get a torch.Generator seeded alike.

Table 3 (--where): where qtaylor's time per σ-space call goes, by timers wrapped around its
NaN/Inf check (qtaylor._ops.all_finite, on the sample and the model output), the program's x̂0
and next state (Replay.x0, Replay.feed); the rest is the σ-space wrapper (x/α to VP and back,
scale_model_input, Python); a VP DDIM row for comparison. Instrumentation only (the results are
the same); it reaches into qtaylor.diffusers' module globals (_core, all_finite).

Run: scripts/bench-python-step.py [--repeats R] [--where]
(in the Python test environment, after `pip install ./python`).
"""

import argparse
import platform
import time

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

import qtaylor.diffusers as qtaylor_diffusers
from qtaylor.diffusers import QTaylorScheduler

CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="trailing",
)


def loop_time(sched, steps, shape, outputs, x0):
    sched.set_timesteps(steps)
    x = x0.clone()
    t_total = 0.0
    for k, t in enumerate(sched.timesteps):
        out = outputs[k % len(outputs)]
        t0 = time.perf_counter()
        x = sched.step(out, t, x, return_dict=False)[0]
        t_total += time.perf_counter() - t0
    return t_total / len(sched.timesteps)


# diffusers' σ-space classes, the sampler QTaylorScheduler.from_config picks for each, and
# whether step() draws noise (then both sides get a generator seeded alike).
SIGMA_CLASSES = [
    (EulerDiscreteScheduler, "k-euler", False),
    (EulerAncestralDiscreteScheduler, "k-euler-a", True),
    (HeunDiscreteScheduler, "k-heun", False),
    (LMSDiscreteScheduler, "k-lms", False),
    (KDPM2DiscreteScheduler, "k-dpm2", False),
    (KDPM2AncestralDiscreteScheduler, "k-dpm2-a", True),
]


def sigma_loop_time(sched, steps, outputs, x0, stochastic, seed=0):
    """A pipeline's scheduler work per network call: scale_model_input + step. Returns
    (both, scale_model_input alone, step alone) per call, and the number of calls."""
    sched.set_timesteps(steps)
    x = x0 * sched.init_noise_sigma
    kw = {"generator": torch.Generator().manual_seed(seed)} if stochastic else {}
    t_scale = t_step = 0.0
    for k, t in enumerate(sched.timesteps):
        out = outputs[k % len(outputs)]
        t0 = time.perf_counter()
        sched.scale_model_input(x, t)
        t1 = time.perf_counter()
        x = sched.step(out, t, x, return_dict=False, **kw)[0]
        t2 = time.perf_counter()
        t_scale += t1 - t0
        t_step += t2 - t1
    n = len(sched.timesteps)
    return (t_scale + t_step) / n, t_scale / n, t_step / n, n


def ms(v):
    return f"{v * 1e3:.3f} ms"


class _Timers:
    """Timers around qtaylor's NaN/Inf check and its Replay's x0 and feed (instrumentation
    for --where; the wrapped calls run unchanged)."""

    def __init__(self):
        self.acc = {"check": 0.0, "x0": 0.0, "feed": 0.0}
        self._saved = None

    def _timed(self, name, f):
        def g(*args, **kwargs):
            t0 = time.perf_counter()
            r = f(*args, **kwargs)
            self.acc[name] += time.perf_counter() - t0
            return r

        return g

    def __enter__(self):
        timers, real = self, qtaylor_diffusers._core

        class TimedReplay:
            def __init__(self, *args):
                self._r = real.Replay(*args)
                self.x0 = timers._timed("x0", self._r.x0)
                self.feed = timers._timed("feed", self._r.feed)

            def __getattr__(self, name):
                return getattr(self._r, name)

        class Core:
            Replay = TimedReplay

            def __getattr__(self, name):
                return getattr(real, name)

        self._saved = (qtaylor_diffusers._core, qtaylor_diffusers.all_finite)
        qtaylor_diffusers._core = Core()
        qtaylor_diffusers.all_finite = self._timed("check", qtaylor_diffusers.all_finite)
        return self

    def __exit__(self, *exc):
        qtaylor_diffusers._core, qtaylor_diffusers.all_finite = self._saved


def where_the_time_goes(a):
    print()
    print("# where qtaylor's time per σ-space call goes (scale_model_input + step), from the loop with the")
    print(f"# best total of {a.repeats}; rest = x/α to VP and back, scale_model_input, Python (DDIM: no conversion)")
    print("| latents | diffusers class | diffusers | qtaylor | NaN/Inf checks (2) | x̂0 | next state | rest |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in [(1, 4, 64, 64), (16, 4, 128, 128)]:
        outputs = [torch.randn(shape) for _ in range(4)]
        x0 = torch.randn(shape)
        # DDIM for comparison: a VP row (no conversion), the same algorithm as k-euler.
        cases = [(cls.__name__, cls(**CONFIG), None, stochastic) for cls, _, stochastic in SIGMA_CLASSES]
        cases.append(("DDIMScheduler (VP, sampler='ddim')", DDIMScheduler(**CONFIG, clip_sample=False),
                      QTaylorScheduler(**CONFIG, sampler="ddim"), False))
        for name, theirs, ours, stochastic in cases:
            ours = ours or QTaylorScheduler.from_config(theirs)
            bt, best = float("inf"), None
            for _ in range(a.repeats):
                bt = min(bt, sigma_loop_time(theirs, a.steps, outputs, x0, stochastic)[0])
                with _Timers() as tm:
                    total, _, _, n = sigma_loop_time(ours, a.steps, outputs, x0, stochastic)
                if best is None or total < best[0]:
                    best = (total, {k: v / n for k, v in tm.acc.items()})
            total, part = best
            rest = total - sum(part.values())
            print(f"| {shape} | {name} | {ms(bt)} | {ms(total)} | {ms(part['check'])} | {ms(part['x0'])} "
                  f"| {ms(part['feed'])} | {ms(rest)} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--where", action="store_true", help="also time the parts of qtaylor's σ-space call")
    a = ap.parse_args()
    torch.manual_seed(0)
    pairs = [
        ("dpmpp-2m", DPMSolverMultistepScheduler(**CONFIG, algorithm_type="dpmsolver++", solver_order=2),
         QTaylorScheduler(**CONFIG, sampler="dpmpp-2m")),
        ("dpmpp-3m", DPMSolverMultistepScheduler(**CONFIG, algorithm_type="dpmsolver++", solver_order=3),
         QTaylorScheduler(**CONFIG, sampler="dpmpp-3m")),
        ("unipc-3", UniPCMultistepScheduler(**CONFIG, solver_order=3),
         QTaylorScheduler(**CONFIG, sampler="unipc-3")),
        ("ddim", DDIMScheduler(**CONFIG, clip_sample=False),
         QTaylorScheduler(**CONFIG, sampler="ddim")),
        ("qt-3 vs DPM++(2M)", DPMSolverMultistepScheduler(**CONFIG, algorithm_type="dpmsolver++", solver_order=2),
         QTaylorScheduler(**CONFIG, sampler="qt-3")),
    ]
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"# {a.steps} steps, best of {a.repeats} interleaved loops; time per step() call")
    print("| latents | sampler | diffusers | qtaylor | ratio (ours/theirs) |")
    print("|---|---|---:|---:|---:|")
    for shape in [(1, 4, 64, 64), (16, 4, 128, 128)]:
        outputs = [torch.randn(shape) for _ in range(4)]
        x0 = torch.randn(shape)
        for name, theirs, ours in pairs:
            bt, bo = float("inf"), float("inf")
            for _ in range(a.repeats):
                bt = min(bt, loop_time(theirs, a.steps, shape, outputs, x0))
                bo = min(bo, loop_time(ours, a.steps, shape, outputs, x0))
            print(f"| {shape} | {name} | {bt * 1e3:.3f} ms | {bo * 1e3:.3f} ms | {bo / bt:.2f} |")

    print()
    print("# σ-space: QTaylorScheduler.from_config(diffusers' scheduler), no sampler=; time per network call")
    print("# (scale_model_input + step; Heun and KDPM2: 2 calls per step), best of each part shown too")
    print("| latents | diffusers class (qtaylor sampler) | calls | diffusers | qtaylor | ratio (ours/theirs) "
          "| step alone: diffusers / qtaylor | scale_model_input alone: diffusers / qtaylor |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in [(1, 4, 64, 64), (16, 4, 128, 128)]:
        outputs = [torch.randn(shape) for _ in range(4)]
        x0 = torch.randn(shape)
        for cls, sampler, stochastic in SIGMA_CLASSES:
            theirs = cls(**CONFIG)
            ours = QTaylorScheduler.from_config(theirs)
            if ours.sampler_spec.name != sampler:
                raise SystemExit(f"from_config({cls.__name__}) runs {ours.sampler_spec.name}, expected {sampler}")
            bt, bo = [float("inf")] * 3, [float("inf")] * 3
            for _ in range(a.repeats):
                *rt, nt = sigma_loop_time(theirs, a.steps, outputs, x0, stochastic)
                *ro, no = sigma_loop_time(ours, a.steps, outputs, x0, stochastic)
                if nt != no:
                    raise SystemExit(f"{cls.__name__}: {nt} calls in diffusers, {no} in qtaylor")
                bt = [min(u, v) for u, v in zip(bt, rt)]
                bo = [min(u, v) for u, v in zip(bo, ro)]
            print(f"| {shape} | {cls.__name__} ({sampler}) | {nt} | {ms(bt[0])} | {ms(bo[0])} | {bo[0] / bt[0]:.2f} "
                  f"| {ms(bt[2])} / {ms(bo[2])} | {ms(bt[1])} / {ms(bo[1])} |")
    if a.where:
        where_the_time_goes(a)


if __name__ == "__main__":
    main()
