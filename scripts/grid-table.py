#!/usr/bin/env python3
"""End-point RMSE against the reference solution, per sampler x NFE x grid, on an exact-score
problem (issue 13's table for gmm-demo and empirical:mnist), through the Python package.

Schedule: DDPM's discrete linear betas (T = 1000). Grids: default (trailing timesteps, as
diffusers), karras and logsnr (continuous grids on the discrete schedule, as
use_karras_sigmas), tuned (`qtaylor tune`, run here unless the grid file exists). Every grid
ends at x̂0 (σ = 0). The reference: rk45 at rtol = atol = 1e-7 from the same start noise on the
default grid's span. Evaluation noise: streams 0..n of --seed; tuning uses streams from 2^40.

Run (from the repository root, qtaylor installed, release binary built):
  scripts/grid-table.py --problem gmm-demo --out bench-out/grids-gmm
"""

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import qtaylor
import qtaylor.torch as qtt

REPO = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("QTAYLOR_BIN", REPO / "target" / "release" / "qtaylor"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", default="gmm-demo")
    ap.add_argument("--samplers", default="qt-2,qt-3,ddim,unipc-3,dpmpp-3m,ipndm,deis-3")
    ap.add_argument("--nfe", default="4,5,6,8,10")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    sched = qtaylor.Schedule.discrete()
    prob = qtaylor.ExactProblem(a.problem, sched)
    item = prob.item_shape

    def model(x, t):
        tt = sched.time_of_model_time(t.to(torch.float64).numpy())
        return torch.from_numpy(prob.eps(x.numpy(), list(np.atleast_1d(tt))))

    draw, _ = qtt.stream_noise(a.seed, a.n)
    x = draw(item)
    t0 = time.time()
    ref = qtt.sample(model, x.clone(), "rk45", times=[1.0, 0.001, 0.0], schedule=sched,
                     rtol=1e-7, atol=1e-7)
    print(f"# reference rk45 1e-7: {ref.nfe:.0f} NFE, {time.time() - t0:.1f} s")

    def rmse(y):
        d = (y - ref.x).reshape(a.n, -1)
        return float(d.square().mean(1).sqrt().mean())

    rows = []
    tune_seconds = {}
    for s in a.samplers.split(","):
        spec = qtaylor.SamplerSpec(s)
        for nfe in [int(v) for v in a.nfe.split(",")]:
            steps = spec.steps_for_budget(nfe, True)
            row = {"sampler": s, "nfe": nfe, "steps": steps}
            row["default"] = rmse(qtt.sample(model, x.clone(), s, schedule=sched,
                                             steps=steps, spacing="trailing").x)
            for g in ("karras", "logsnr"):
                ts = qtaylor.continuous_grid(sched, steps, g, to_zero=True).tolist()
                row[g] = rmse(qtt.sample(model, x.clone(), s, schedule=sched, times=ts).x)
            gf = out / "grids" / f"{s}-{nfe}.json"
            if not gf.exists():
                t1 = time.time()
                subprocess.run([str(BIN), "tune", "--problem", a.problem, "--schedule", "discrete",
                                "--spacing", "trailing", "--sampler", s, "--nfe", str(nfe),
                                "--dtype", "f64", "--out", str(gf)], check=True,
                               capture_output=True)
                tune_seconds[f"{s}-{nfe}"] = time.time() - t1
            g = qtaylor.read_grid_file(str(gf), sched)
            row["tuned"] = rmse(qtt.sample(model, x.clone(), s, schedule=sched, times=g["times"]).x)
            rows.append(row)
            print(json.dumps(row))
    (out / "results.json").write_text(json.dumps({"rows": rows, "tune_seconds": tune_seconds,
                                                  "reference_nfe": ref.nfe}, indent=1))
    lines = [f"| sampler | NFE | default (trailing) | karras | logsnr | tuned | tuned / default |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['nfe']} | {r['default']:.4f} | {r['karras']:.4f} | "
                     f"{r['logsnr']:.4f} | {r['tuned']:.4f} | {r['tuned'] / r['default']:.2f} |")
    lines.append("")
    for nfe in sorted({r["nfe"] for r in rows}):
        at = [r for r in rows if r["nfe"] == nfe]
        bd = min(at, key=lambda r: r["default"])
        bt = min(at, key=lambda r: r["tuned"])
        lines.append(f"NFE {nfe}: best default {bd['sampler']} {bd['default']:.4f}, best tuned "
                     f"{bt['sampler']} {bt['tuned']:.4f} ({bt['tuned'] / bd['default']:.2f}x)")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
