#!/usr/bin/env python3
"""Side-by-side check of qtaylor's discrete-schedule samplers against diffusers' schedulers.

Run by hand, not by CI. For each case it builds one diffusers scheduler (linear betas
1e-4..0.02, T = 1000 trained steps), calls set_timesteps(N), reads back
`scheduler.timesteps`, and runs the standard loop

    for t in scheduler.timesteps:
        x = scheduler.step(eps(x, t), t, x).prev_sample

with a float64 NumPy implementation of the exact noise prediction of a small diagonal
Gaussian mixture (the same formula as qtaylor's GmmModel). It then runs

    qtaylor sample --problem gmm.json --schedule discrete --timesteps <the same list>
                   --final zero|last [--lower-order-final] --x-init xT.npy --dtype f64 ...

from the same start noise x_T and prints max|x_qtaylor - x_diffusers| / max|x_diffusers|.

Cases marked "agree" implement the same algorithm on both sides and must agree to
--tol (default 1e-5 relative); the script exits with status 1 if one does not.
Cases marked "info" are known to differ and are only reported:
  - DDIM with `linspace` spacing (and `trailing` when T % N != 0): diffusers always steps
    to t - T//N, which is not the next scheduled timestep (linspace N=10: it steps
    999 -> 899, but the next model call is at 888); qtaylor steps to the next scheduled
    timestep. A point-mass check at the end (DDIM is exact there) shows which is the ODE step.
  - UniPC bh1 with final_sigmas_type "zero" (diffusers' default): diffusers returns NaN, as
    its last predictor step multiplies B(h) = -h = -inf by 0. The agreeing bh1 rows use
    final_sigmas_type "sigma_min" (qtaylor --final last).
  - DEIS orders 2, 3: diffusers' DEISMultistepScheduler extrapolates in log(sigma/alpha)
    ("logrho"), qtaylor's deis-2/3 are tAB (Lagrange in t): different algorithms.
The last two columns give each side's error against the exact probability-flow ODE end
point (RK4 with 2000 steps in lambda, independent of both codes).

Precision: diffusers keeps its schedule in float32 and does its scalar arithmetic in
float32 (alphas_cumprod, sigmas, lambda, exp(-h) ...); DPMSolverMultistep also rounds
the state to float32 in every step. The samples and model outputs passed here are
float64, but agreement is limited to about 1e-7..1e-6 relative by those float32 scalars.

Usage (from the repository root):
    scripts/compare-diffusers.sh                 # creates a pinned venv, then runs this
    python3 scripts/compare-diffusers.py         # in an environment with the pins below
Options: --qtaylor PATH (default target/release/qtaylor), --steps 10,25, --tol 1e-5,
         --keep DIR (keep the GMM, x_T and all outputs), -v (print qtaylor commands).

Pinned versions (what this was run with): Python 3.11, diffusers==0.42.1, torch==2.15.0
(CPU is enough), numpy==2.4.6.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
import diffusers  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

diffusers.utils.logging.set_verbosity_error()

T = 1000
BETAS = dict(num_train_timesteps=T, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------
# The problem: a diagonal Gaussian mixture and its exact noise prediction, in float64.
# --------------------------------------------------------------------------------------


def make_gmm(seed=20251125, dim=16, k=4):
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 2.0, k)
    weights /= weights.sum()
    means = rng.normal(0.0, 1.0, (k, dim))
    # variances from ~3e-3 to ~0.5, a different decade per component, jittered per dim
    base = 10.0 ** np.linspace(-2.5, -0.3, k)
    variances = base[:, None] * rng.uniform(0.5, 2.0, (k, dim))
    x_t = rng.standard_normal((8, dim))
    return weights, means, variances, x_t


class GmmEps:
    """eps(x, ab) = sigma * sum_k r_k (x - alpha mu_k)/(alpha^2 v_k + sigma^2)."""

    def __init__(self, weights, means, variances):
        self.logw = np.log(weights)
        self.m = means
        self.v = variances

    def __call__(self, x, ab):
        ab = float(ab)
        a = math.sqrt(ab)
        s2 = 1.0 - ab
        var = a * a * self.v + s2  # (K, d)
        diff = x[:, None, :] - a * self.m[None]  # (B, K, d)
        logp = self.logw[None] - 0.5 * np.sum(diff * diff / var + np.log(2 * np.pi * var), axis=-1)
        logp -= logp.max(axis=1, keepdims=True)
        r = np.exp(logp)
        r /= r.sum(axis=1, keepdims=True)
        return math.sqrt(s2) * np.einsum("bk,bkd->bd", r, diff / var)


def exact_ode(eps, x, ab_start, ab_end, n_lambda=2000, n_rho=200):
    """The probability-flow ODE solution from x at alphabar = ab_start to ab_end (ab_end = 1:
    sigma = 0), independent of both codes: with v = x/alpha and rho = sigma/alpha the ODE is
    dv/drho = eps(x). Classical RK4 uniform in lambda = -log rho down to ab = min(ab_end, 0.9999)
    (lambda up to 4.6), then RK4 uniform in rho to the end. Step-halving changes the result
    by about 2e-11 relative."""

    def rho_of(ab):
        return math.sqrt((1.0 - ab) / ab)

    def f_rho(v, rho):  # dv/drho
        ab = 1.0 / (1.0 + rho * rho)
        return eps(math.sqrt(ab) * v, ab) if rho > 0 else np.zeros_like(v)

    def rk4(v, y0, y1, n, f):
        h = (y1 - y0) / n
        y = y0
        for _ in range(n):
            k1 = f(v, y)
            k2 = f(v + 0.5 * h * k1, y + 0.5 * h)
            k3 = f(v + 0.5 * h * k2, y + 0.5 * h)
            k4 = f(v + h * k3, y + h)
            v = v + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
            y += h
        return v

    ab_mid = min(ab_end, 0.9999)
    v = x / math.sqrt(ab_start)
    # in lambda: drho = -rho dlambda
    v = rk4(v, -math.log(rho_of(ab_start)), -math.log(rho_of(ab_mid)), n_lambda,
            lambda v, lam: -math.exp(-lam) * f_rho(v, math.exp(-lam)))
    rho_end = rho_of(ab_end) if ab_end < 1.0 else 0.0
    v = rk4(v, rho_of(ab_mid), rho_end, n_rho, f_rho)
    return v * (1.0 / math.sqrt(1.0 + rho_end * rho_end))


# --------------------------------------------------------------------------------------
# diffusers side
# --------------------------------------------------------------------------------------


def run_diffusers(sched, x_init, eps):
    ac = sched.alphas_cumprod.double().numpy()  # float32 values, exactly, as float64
    x = torch.from_numpy(x_init.copy())  # float64
    for t in sched.timesteps:
        ti = int(t)
        e = torch.from_numpy(eps(x.numpy(), ac[ti]))
        x = sched.step(e, t, x).prev_sample
    assert x.dtype == torch.float64, x.dtype
    return x.numpy().astype(np.float64)


def distinct_descending(ts):
    """The model timesteps of a schedule, each once (PLMS/PNDM repeat some)."""
    out = []
    for t in ts:
        t = int(t)
        if t not in out:
            out.append(t)
    assert all(a > b for a, b in zip(out, out[1:])), out
    return out


# --------------------------------------------------------------------------------------
# qtaylor side
# --------------------------------------------------------------------------------------


class Qtaylor:
    def __init__(self, exe, workdir, verbose):
        self.exe = str(exe)
        self.dir = Path(workdir)
        self.verbose = verbose
        self.count = 0

    def run(self, sampler, timesteps, final, extra=(), problem="gmm.json"):
        self.count += 1
        out = self.dir / f"qt_{self.count:03d}_{sampler}.npy"
        cmd = [
            self.exe, "sample",
            "--problem", str(self.dir / problem),
            "--schedule", "discrete", "--beta-schedule", "linear",
            "--beta-start", "0.0001", "--beta-end", "0.02", "--train-steps", str(T),
            "--timesteps", ",".join(str(t) for t in timesteps),
            "--final", final,
            "--sampler", sampler,
            "--x-init", str(self.dir / "x_T.npy"),
            "--dtype", "f64",
            "--out", str(out),
            *extra,
        ]
        if self.verbose:
            print("  $ " + " ".join(cmd), file=sys.stderr)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"qtaylor failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
        return np.load(out).astype(np.float64)


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------


def ddim(spacing, alpha_one=True):
    return lambda: DDIMScheduler(
        **BETAS, timestep_spacing=spacing, set_alpha_to_one=alpha_one, clip_sample=False, steps_offset=0
    )


def dpmpp(order, lof=True, final="zero"):
    return lambda: DPMSolverMultistepScheduler(
        **BETAS, solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=lof, final_sigmas_type=final, timestep_spacing="linspace",
    )


def unipc(order, variant="bh2", corrector=True, final="zero"):
    def make():
        return UniPCMultistepScheduler(
            **BETAS, solver_order=order, solver_type=variant, predict_x0=True, lower_order_final=True,
            final_sigmas_type=final, timestep_spacing="linspace",
            disable_corrector=[] if corrector else list(range(T)),
        )
    return make


def deis(order):
    return lambda: DEISMultistepScheduler(
        **BETAS, solver_order=order, lower_order_final=True, timestep_spacing="linspace"
    )


def pndm(skip_prk):
    return lambda: PNDMScheduler(
        **BETAS, skip_prk_steps=skip_prk, set_alpha_to_one=False, timestep_spacing="leading", steps_offset=0
    )


LOF = ["--lower-order-final"]
BH1 = ["--unipc-variant", "bh1"]

# (label, N list or None for --steps, make scheduler, qtaylor sampler, --final, extra args, expect, note)
# expect: "agree" (same algorithm: must match to --tol) or "info" (known to differ; reported only).
CASES = [
    ("DDIM leading", None, ddim("leading"), "ddim", "zero", [], "agree", "set_alpha_to_one=True"),
    ("DDIM leading, ᾱ_0 end", [10], ddim("leading", False), "ddim", "last", [], "agree", "set_alpha_to_one=False"),
    ("DDIM trailing", None, ddim("trailing"), "ddim", "zero", [], "agree", "T % N == 0: t - T//N is on the grid"),
    ("DDIM linspace", [10], ddim("linspace"), "ddim", "zero", [], "info", "diffusers steps to t - T//N, off the grid"),
    ("DDIM trailing", [15], ddim("trailing"), "ddim", "zero", [], "info", "T % N != 0: t - T//N off the grid"),
    ("DPM++ 2M", None, dpmpp(2), "dpmpp-2m", "zero", LOF, "agree", "midpoint, lower_order_final"),
    ("DPM++ 3M", None, dpmpp(3), "dpmpp-3m", "zero", LOF, "agree", "lower_order_final"),
    ("DPM++ 3M, no LOF", [10], dpmpp(3, lof=False), "dpmpp-3m", "zero", [], "agree", "lower_order_final=False"),
    ("DPM++ 2M, σ_min end", [10], dpmpp(2, final="sigma_min"), "dpmpp-2m", "last", LOF, "agree", "final_sigmas_type=sigma_min"),
    ("DPM++ 3M, σ_min end", None, dpmpp(3, final="sigma_min"), "dpmpp-3m", "last", LOF, "agree", "final_sigmas_type=sigma_min"),
    ("UniPC-1 bh2", None, unipc(1), "unipc-1", "zero", LOF, "agree", "corrector on"),
    ("UniPC-2 bh2", None, unipc(2), "unipc-2", "zero", LOF, "agree", "corrector on"),
    ("UniPC-3 bh2", None, unipc(3), "unipc-3", "zero", LOF, "agree", "corrector on"),
    ("UniPC-2 bh2, no corr.", [10], unipc(2, corrector=False), "unipc-2", "zero", LOF + ["--no-corrector"], "agree", "disable_corrector=all steps"),
    ("UniPC-2 bh2, σ_min end", [10], unipc(2, final="sigma_min"), "unipc-2", "last", LOF, "agree", "final_sigmas_type=sigma_min"),
    ("UniPC-2 bh1, σ_min end", None, unipc(2, "bh1", final="sigma_min"), "unipc-2", "last", LOF + BH1, "agree", "final_sigmas_type=sigma_min"),
    ("UniPC-3 bh1, σ_min end", None, unipc(3, "bh1", final="sigma_min"), "unipc-3", "last", LOF + BH1, "agree", "final_sigmas_type=sigma_min"),
    ("UniPC-2 bh1", [10], unipc(2, "bh1"), "unipc-2", "zero", LOF + BH1, "info", "diffusers: NaN (B(h) = -h = -inf at σ = 0)"),
    ("DEIS-1", None, deis(1), "deis-1", "last", LOF, "agree", "= DDIM to ᾱ_0"),
    ("DEIS-2", None, deis(2), "deis-2", "last", LOF, "info", "logrho AB vs tAB: different algorithm"),
    ("DEIS-3", None, deis(3), "deis-3", "last", LOF, "info", "logrho AB vs tAB: different algorithm"),
    ("PNDM (PLMS)", None, pndm(True), "plms", "last", [], "agree", "skip_prk_steps, leading"),
    ("PNDM (F-PNDM)", None, pndm(False), "pndm", "last", [], "agree", "pseudo-RK4 warm-up, leading"),
]


def rel(a, b):
    d = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
    return d if math.isfinite(d) else float("nan")


def model_timesteps(sched):
    if isinstance(sched, PNDMScheduler):
        # PNDM's .timesteps repeat entries and hold the PRK midpoints; the grid is _timesteps.
        return [int(t) for t in sched._timesteps[::-1]]
    return distinct_descending(sched.timesteps)


def point_mass_check(qt, work, x_init, mean, n=10):
    """DDIM is exact on a single point mass (ε is constant along each ODE path). Run DDIM
    with linspace spacing and set_alpha_to_one=False on both sides and compare with the exact
    state at ᾱ_0: x = α_0 μ + sqrt(α_0² v + σ_0²) z, z = (x_T − α_T μ)/sqrt(α_T² v + σ_T²)."""
    var = np.full_like(mean, 1e-12)
    (work / "point.json").write_text(json.dumps(
        {"dim": int(mean.size), "weights": [1.0], "means": [mean.tolist()], "variances": [var.tolist()]}))
    eps = GmmEps(np.ones(1), mean[None], var[None])
    sched = ddim("linspace", alpha_one=False)()
    sched.set_timesteps(n)
    ts = model_timesteps(sched)
    ac = sched.alphas_cumprod.double().numpy()
    a = run_diffusers(sched, x_init, eps)
    b = qt.run("ddim", ts, "last", problem="point.json")
    ab0, ab1 = ac[ts[0]], ac[ts[-1]]
    z = (x_init - math.sqrt(ab0) * mean) / np.sqrt(ab0 * var + 1 - ab0)
    exact = math.sqrt(ab1) * mean + np.sqrt(ab1 * var + 1 - ab1) * z
    return n, ts, rel(a, exact), rel(b, exact)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qtaylor", default=str(REPO / "target" / "release" / "qtaylor"))
    ap.add_argument("--steps", default="10,25", help="comma-separated N for set_timesteps (default 10,25)")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--keep", help="keep inputs and outputs in this folder")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the qtaylor commands")
    args = ap.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    if not Path(args.qtaylor).is_file():
        sys.exit(f"error: no qtaylor binary at {args.qtaylor} (cargo build --release)")

    tmp = None
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="compare-diffusers-")
        work = Path(tmp.name)

    weights, means, variances, x_init = make_gmm()
    (work / "gmm.json").write_text(json.dumps({
        "dim": int(means.shape[1]),
        "weights": weights.tolist(),
        "means": means.tolist(),
        "variances": variances.tolist(),
    }))
    np.save(work / "x_T.npy", x_init)
    eps = GmmEps(weights, means, variances)
    qt = Qtaylor(args.qtaylor, work, args.verbose)
    ac = DDIMScheduler(**BETAS).alphas_cumprod.double().numpy()

    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"Python {sys.version.split()[0]}; qtaylor: {args.qtaylor}")
    print(f"GMM d={means.shape[1]}, K={len(weights)}, variances {variances.min():.1e}..{variances.max():.1e}; "
          f"x_T {x_init.shape[0]}x{x_init.shape[1]} f64; T={T}, linear betas 1e-4..0.02; tol {args.tol:g}")
    print("rel diff = max|x_qtaylor - x_diffusers| / max|x_diffusers|; "
          "ODE err = max|x - x_exact| / max|x_exact| (exact PF-ODE end point)")
    print()
    hdr = (f"{'case':<24} {'N':>3}  {'--final':<7} {'timesteps':<21} {'rel diff':>9}  {'result':<6} "
           f"{'ODE err diffusers':>17} {'qtaylor':>9}  note")
    print(hdr)
    print("-" * len(hdr))

    refs = {}
    failures = []
    for label, only, make, sampler, final, extra, expect, note in CASES:
        for n in only or steps:
            sched = make()
            sched.set_timesteps(n)
            ts = model_timesteps(sched)
            a = run_diffusers(sched, x_init, eps)
            b = qt.run(sampler, ts, final, extra)
            r = rel(b, a)
            if expect == "agree":
                res = "pass" if r <= args.tol else "FAIL"  # NaN fails too
                if res == "FAIL":
                    failures.append((label, n, r))
            else:
                res = "info"
            key = (ts[0], final)
            if key not in refs:
                refs[key] = exact_ode(eps, x_init, ac[ts[0]], 1.0 if final == "zero" else ac[0])
            ref = refs[key]
            tss = f"{ts[0]},{ts[1]},..,{ts[-1]} ({len(ts)})"
            print(f"{label:<24} {n:>3}  {final:<7} {tss:<21} {r:>9.2e}  {res:<6} "
                  f"{rel(a, ref):>17.2e} {rel(b, ref):>9.2e}  {note}", flush=True)
            if args.keep:
                tag = "".join(c if c.isalnum() else "_" for c in label)
                np.save(work / f"diffusers_{tag}_{n}.npy", a)

    print()
    n, ts, ea, eb = point_mass_check(qt, work, x_init, means[0])
    print(f"DDIM step check on a point mass (DDIM is exact there), linspace N={n} "
          f"({ts[0]},{ts[1]},..,{ts[-1]}), set_alpha_to_one=False / --final last:")
    print(f"  error vs the exact state at ᾱ_0: diffusers {ea:.2e}, qtaylor {eb:.2e}")
    print()
    print("info rows are expected to differ (see the notes); agree rows must match to the tolerance.")
    if failures:
        print(f"{len(failures)} agree case(s) FAILED: " + ", ".join(f"{l} N={n} ({r:.2e})" for l, n, r in failures))
        return 1
    print("all agree cases pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
