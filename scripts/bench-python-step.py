#!/usr/bin/env python3
"""Per-step overhead of QTaylorScheduler.step against diffusers' own schedulers' step, on
the CPU, for SD-like latents (1, 4, 64, 64) and (16, 4, 128, 128).

Both schedulers get the same config (Stable Diffusion's scaled-linear betas), the same
number of steps and random model outputs; only `step` is timed (the network is not
involved), over full sampling loops, interleaved, best of several repeats. The ratio is
ours / theirs (< 1: ours is faster). Run: scripts/bench-python-step.py [--repeats R]
(in the Python test environment, after `pip install ./python`).
"""

import argparse
import platform
import time

import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler, DDIMScheduler

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20)
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


if __name__ == "__main__":
    main()
