"""The scalar API (schedules, grids, quasi-Taylor coefficients) against independent
references: closed forms written out here, their derivatives by torch autograd in f64,
finite differences, and diffusers' own schedulers."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import qtaylor
from qtaylor import Schedule, continuous_grid, discrete_grid, quasi_taylor_coefficients

# ---------------------------------------------------------------------------------------
# Closed forms of the continuous schedules, as functions of a float64 torch tensor.


def vp_log_abar(b0, b1):
    return lambda t: -(b0 * t + 0.5 * (b1 - b0) * t * t)


def scaled_linear_log_abar():
    a = math.sqrt(0.00085 * 1000.0)
    b = math.sqrt(0.012 * 1000.0)
    return lambda t: -(a * a * t + a * (b - a) * t**2 + (b - a) ** 2 * t**3 / 3.0)


def cosine_log_abar(s=0.008):
    def f(t):
        return 2.0 * torch.log(torch.cos((t + s) / (1.0 + s) * math.pi / 2))

    f0 = 2.0 * math.log(math.cos(s / (1.0 + s) * math.pi / 2))
    return lambda t: f(t) - f0


def quantities(log_abar):
    """Each quantity as a function of t, from log ᾱ(t)."""

    def alpha(t):
        return torch.exp(0.5 * log_abar(t))

    def sigma(t):
        return torch.sqrt(-torch.expm1(log_abar(t)))

    def lam(t):
        return torch.log(alpha(t)) - torch.log(sigma(t))

    def beta(t):
        (g,) = torch.autograd.grad(log_abar(t), t, create_graph=True)
        return -g

    return {"alpha": alpha, "sigma": sigma, "lambda": lam, "beta": beta, "log_alpha_bar": log_abar}


def autograd_derivatives(f, t0, order):
    """[f(t0), f'(t0), …, f^(order)(t0)] by nested autograd in float64."""
    t = torch.tensor(t0, dtype=torch.float64, requires_grad=True)
    y = f(t)
    out = [float(y.detach())]
    for _ in range(order):
        if not y.requires_grad:  # a polynomial's derivatives end in constants
            out.append(0.0)
            y = torch.zeros((), dtype=torch.float64)
            continue
        (y,) = torch.autograd.grad(y, t, create_graph=True)
        out.append(float(y.detach()))
    return out


CONTINUOUS = [
    pytest.param(Schedule.vp_linear, (), vp_log_abar(0.1, 20.0), 1.0, id="vp-linear-0.1-20"),
    pytest.param(Schedule.vp_linear, (0.05, 12.0), vp_log_abar(0.05, 12.0), 1.0, id="vp-linear-0.05-12"),
    pytest.param(Schedule.scaled_linear, (), scaled_linear_log_abar(), 1.0, id="scaled-linear"),
    pytest.param(Schedule.cosine, (), cosine_log_abar(), 0.9946, id="cosine"),
]


@pytest.mark.parametrize("make,args,log_abar,t_end", CONTINUOUS)
def test_schedule_values_match_their_closed_forms(make, args, log_abar, t_end):
    sched = make(*args)
    assert sched.num_train_timesteps is None
    assert sched.t_end == pytest.approx(t_end, abs=0)
    t = np.linspace(1e-3, t_end, 201)
    tt = torch.from_numpy(t)
    L = log_abar(tt).numpy()
    abar = np.exp(L)
    alpha = np.exp(0.5 * L)
    sigma = np.sqrt(-np.expm1(L))
    lam = np.log(alpha) - np.log(sigma)
    q = quantities(log_abar)
    beta = np.array([autograd_derivatives(q["beta"], float(v), 0)[0] for v in t])
    np.testing.assert_allclose(sched.log_alpha_bar(t), L, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(sched.alpha_bar(t), abar, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(sched.alpha(t), alpha, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(sched.sigma(t), sigma, rtol=1e-12)
    np.testing.assert_allclose(sched.lambda_(t), lam, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(sched.beta(t), beta, rtol=1e-11)
    # α² + σ² = 1 and scalars give the same values as arrays.
    np.testing.assert_allclose(sched.alpha(t) ** 2 + sched.sigma(t) ** 2, 1.0, rtol=1e-14)
    assert isinstance(sched.alpha(0.5), float)
    assert sched.alpha(0.5) == sched.alpha(np.array([0.5]))[0]
    # The continuous model time is t itself.
    np.testing.assert_array_equal(sched.model_time(t), t)
    np.testing.assert_array_equal(sched.time_of_model_time(t), t)


def test_vp_linear_matches_the_formula_written_out():
    # ᾱ = exp(−(β_min t + ½(β_max − β_min) t²)), β = β_min + (β_max − β_min) t, in numpy.
    b0, b1 = 0.1, 20.0
    s = Schedule.vp_linear(b0, b1)
    t = np.linspace(0.0, 1.0, 101)
    abar = np.exp(-(b0 * t + 0.5 * (b1 - b0) * t**2))
    np.testing.assert_allclose(s.alpha_bar(t), abar, rtol=1e-13)
    np.testing.assert_allclose(s.beta(t), b0 + (b1 - b0) * t, rtol=1e-13)
    assert s.alpha(0.0) == 1.0 and s.sigma(0.0) == 0.0


@pytest.mark.parametrize("make,args,log_abar,t_end", CONTINUOUS)
@pytest.mark.parametrize("quantity", ["alpha", "sigma", "lambda", "beta", "log_alpha_bar"])
def test_schedule_derivatives_match_autograd_of_the_closed_form(make, args, log_abar, t_end, quantity):
    sched = make(*args)
    f = quantities(log_abar)[quantity]
    order = 5
    for t0 in (0.02, 0.3, 0.7, min(0.95, t_end)):
        got = sched.derivatives(quantity, t0, order)
        want = autograd_derivatives(f, t0, order)
        assert len(got) == order + 1
        for k, (g, w) in enumerate(zip(got, want)):
            assert g == pytest.approx(w, rel=1e-9, abs=1e-9 * max(1.0, abs(want[1]))), (
                f"{quantity}^({k}) at t={t0}: {g} vs autograd {w}"
            )


@pytest.mark.parametrize("t0", [0.05, 0.4, 0.9, 1.0])
def test_vp_linear_first_derivatives_have_their_closed_forms(t0):
    b0, b1 = 0.1, 20.0
    s = Schedule.vp_linear(b0, b1)
    a, sg, beta = s.alpha(t0), s.sigma(t0), b0 + (b1 - b0) * t0
    assert s.derivatives("sigma", t0, 1)[1] == pytest.approx(beta * a * a / (2 * sg), rel=1e-12)
    assert s.derivatives("alpha", t0, 1)[1] == pytest.approx(-0.5 * beta * a, rel=1e-12)
    assert s.derivatives("lambda", t0, 1)[1] == pytest.approx(-beta / (2 * sg * sg), rel=1e-12)
    assert s.derivatives("log_alpha_bar", t0, 2)[1:] == pytest.approx([-beta, -(b1 - b0)], rel=1e-12)
    assert s.derivatives("beta", t0, 3)[1:] == pytest.approx([b1 - b0, 0.0, 0.0], abs=1e-12)


def test_discrete_schedule_derivatives_match_finite_differences():
    s = Schedule.discrete()
    h = 1e-6
    for n in (3, 100, 499, 900):
        t0 = (n + 1.5) / 1000  # mid-way between two knots, where the spline is smooth
        for q, f in (("alpha", s.alpha), ("sigma", s.sigma), ("lambda", s.lambda_), ("log_alpha_bar", s.log_alpha_bar)):
            d = s.derivatives(q, t0, 2)
            assert d[0] == pytest.approx(f(t0), rel=1e-14)
            fd1 = (f(t0 + h) - f(t0 - h)) / (2 * h)
            fd2 = (f(t0 + h) - 2 * f(t0) + f(t0 - h)) / (h * h)
            assert d[1] == pytest.approx(fd1, rel=1e-6, abs=1e-9), (q, n)
            assert d[2] == pytest.approx(fd2, rel=1e-3, abs=1e-3), (q, n)
        assert s.beta(t0) == pytest.approx(-s.derivatives("log_alpha_bar", t0, 1)[1], rel=1e-12)


# ---------------------------------------------------------------------------------------
# Discrete schedules against diffusers


@pytest.mark.parametrize(
    "beta_schedule,beta_start,beta_end",
    [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 1e-4, 0.02)],
)
def test_discrete_schedule_matches_diffusers_alphas_cumprod(beta_schedule, beta_start, beta_end):
    from diffusers import DDPMScheduler

    T = 1000
    ref = DDPMScheduler(
        num_train_timesteps=T, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end
    ).alphas_cumprod.double().numpy()
    s = Schedule.discrete(beta_schedule, beta_start, beta_end, T)
    assert s.num_train_timesteps == T
    t = (np.arange(T) + 1.0) / T
    np.testing.assert_allclose(s.alpha_bar(t), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(s.alpha(t) ** 2, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(s.sigma(t) ** 2, 1 - ref, rtol=0, atol=1e-6)
    # Step n sits at t = (n + 1)/T; its model time is n.
    np.testing.assert_allclose(s.model_time(t), np.arange(T), rtol=0, atol=1e-9)
    np.testing.assert_allclose(s.time_of_model_time(np.arange(T, dtype=np.float64)), t, rtol=1e-15)
    assert s.alpha_bar(0.0) == pytest.approx(1.0, abs=1e-15)


def test_trained_betas_match_diffusers_and_the_named_schedule():
    from diffusers import DDPMScheduler

    betas = DDPMScheduler().betas.double().numpy()
    ref = DDPMScheduler(trained_betas=betas).alphas_cumprod.double().numpy()
    a = Schedule.discrete(trained_betas=[float(b) for b in betas])
    assert a.num_train_timesteps == len(betas)
    t = (np.arange(len(betas)) + 1.0) / len(betas)
    np.testing.assert_allclose(a.alpha_bar(t), ref, rtol=0, atol=1e-6)
    # diffusers multiplies the cumulative product in float32; the named schedule does too,
    # the trained_betas one in f64: they agree to float32 rounding.
    b = Schedule.discrete()
    t = np.linspace(0.0, 1.0, 777)
    np.testing.assert_allclose(a.alpha_bar(t), b.alpha_bar(t), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------
# Grids


def test_uniform_grid_is_a_linspace_from_t_max_to_t_min():
    s = Schedule.vp_linear()
    ts = continuous_grid(s, 10, "uniform")
    np.testing.assert_allclose(ts, np.linspace(1.0, 1e-3, 11), rtol=0, atol=1e-15)
    assert ts[0] == 1.0 and ts[-1] == 1e-3
    ts = continuous_grid(s, 7, "uniform", t_max=0.8, t_min=0.01)
    np.testing.assert_allclose(ts, np.linspace(0.8, 0.01, 8), rtol=0, atol=1e-15)


def test_quadratic_grid_is_quadratic_in_the_step_index():
    s = Schedule.vp_linear()
    N, tmax, tmin = 9, 1.0, 1e-3
    ts = continuous_grid(s, N, "quadratic")
    u = (N - np.arange(N + 1)) / N
    np.testing.assert_allclose(ts, tmin + (tmax - tmin) * u * u, rtol=1e-14)


@pytest.mark.parametrize("make", [Schedule.vp_linear, Schedule.cosine, Schedule.scaled_linear])
@pytest.mark.parametrize("steps", [1, 6, 20])
def test_logsnr_grid_is_uniform_in_lambda(make, steps):
    s = make()
    ts = continuous_grid(s, steps, "logsnr")
    assert ts[0] == min(s.t_end, 1.0) and ts[-1] == 1e-3
    lam = s.lambda_(ts)
    expect = np.linspace(lam[0], lam[-1], steps + 1)
    np.testing.assert_allclose(lam, expect, rtol=0, atol=1e-9 * (abs(lam[-1] - lam[0])))
    assert np.all(np.diff(ts) < 0)


@pytest.mark.parametrize("rho", [7.0, 3.0, 1.0])
def test_karras_grid_is_rho_spaced_in_sigma_over_alpha(rho):
    s = Schedule.vp_linear()
    N = 12
    ts = continuous_grid(s, N, "karras", rho=rho)
    assert ts[0] == 1.0 and ts[-1] == 1e-3
    r = (s.sigma(ts) / s.alpha(ts)) ** (1.0 / rho)
    smax = (s.sigma(1.0) / s.alpha(1.0)) ** (1.0 / rho)
    smin = (s.sigma(1e-3) / s.alpha(1e-3)) ** (1.0 / rho)
    np.testing.assert_allclose(r, smax + (smin - smax) * np.arange(N + 1) / N, rtol=1e-9)


@pytest.mark.parametrize(
    "spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)]
)
@pytest.mark.parametrize("steps", [10, 7, 50])
def test_discrete_grids_have_diffusers_ddim_timesteps(spacing, offset, steps):
    from diffusers import DDIMScheduler

    T = 1000
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(steps)
    want = ref.timesteps.numpy().astype(np.int64)
    s = Schedule.discrete()
    ts = discrete_grid(s, steps=steps, spacing=spacing, steps_offset=offset)
    # final "zero": one extra point at ᾱ = 1 (t = 0).
    assert len(ts) == steps + 1 and ts[-1] == 0.0
    np.testing.assert_allclose(ts[:-1], (want + 1.0) / T, rtol=0, atol=1e-15)
    np.testing.assert_allclose(s.model_time(ts[:-1]), want, rtol=0, atol=1e-9)
    # final "last": ends at the first trained step (t = 1/T), without repeating it.
    last = discrete_grid(s, steps=steps, spacing=spacing, steps_offset=offset, final_="last")
    assert last[-1] == pytest.approx(1.0 / T, abs=1e-15)
    np.testing.assert_allclose(last[: len(want)], (want + 1.0) / T, rtol=0, atol=1e-15)
    assert len(last) == steps + (0 if want[-1] == 0 else 1)


def test_explicit_timesteps_give_their_times():
    s = Schedule.discrete()
    ts = discrete_grid(s, timesteps=[999, 500, 250, 3])
    np.testing.assert_allclose(ts, [1.0, 0.501, 0.251, 0.004, 0.0], rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------
# Quasi-Taylor coefficients

# DESIGN golden table: linear β 0.1/20, one step t → s, (A, B) of x_s = A x_t + B ε̂.
GOLDEN = [
    (1.0, 0.9, 1, 2.000000, -1.000022),
    (1.0, 0.9, 2, 2.450250, -1.450303),
    (1.0, 0.9, 3, 2.567167, -1.567242),
    (1.0, 0.9, 4, 2.585196, -1.585281),
    (0.5, 0.4, 1, 1.502500, -0.523626),
    (0.5, 0.4, 2, 1.579003, -0.614640),
    (0.5, 0.4, 3, 1.575151, -0.614553),
    (0.5, 0.4, 4, 1.572764, -0.612464),
]


@pytest.mark.parametrize("t,s,order,A,B", GOLDEN, ids=[f"qt-{g[2]}-{g[0]}to{g[1]}" for g in GOLDEN])
def test_quasi_taylor_coefficients_reproduce_the_design_golden_table(t, s, order, A, B):
    sched = Schedule.vp_linear(0.1, 20.0)
    a, b = quasi_taylor_coefficients(sched, np.array([t]), np.array([s]), order)
    assert a.shape == (1,) and b.shape == (1,)
    assert a[0] == pytest.approx(A, abs=2e-6)
    assert b[0] == pytest.approx(B, abs=2e-6)


def test_quasi_taylor_coefficients_are_elementwise_over_arrays():
    sched = Schedule.vp_linear()
    t = np.array([1.0, 0.5, 0.9])
    s = np.array([0.9, 0.4, 0.3])
    a, b = quasi_taylor_coefficients(sched, t, s, 3)
    for i in range(3):
        ai, bi = quasi_taylor_coefficients(sched, t[i : i + 1], s[i : i + 1], 3)
        assert (a[i], b[i]) == (ai[0], bi[0])


def ddim_coefficients(sched, t, s):
    a_t, s_t = sched.alpha(t), sched.sigma(t)
    a_s, s_s = sched.alpha(s), sched.sigma(s)
    return a_s / a_t, s_s - a_s * s_t / a_t


@pytest.mark.parametrize("expand", ["t", "logsnr"])
@pytest.mark.parametrize("t0", [0.8, 1.0])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_quasi_taylor_minus_ddim_shrinks_like_the_step_to_the_order_plus_one(order, t0, expand):
    sched = Schedule.vp_linear()
    d = np.array([0.02, 0.01, 0.005, 0.0025])
    t = np.full_like(d, t0)
    s = t0 - d
    A, B = ddim_coefficients(sched, t, s)
    a, b = quasi_taylor_coefficients(sched, t, s, order, expand)
    for name, err in (("A", np.abs(a - A)), ("B", np.abs(b - B))):
        assert np.all(err > 0), (name, err)
        slope = np.polyfit(np.log(d), np.log(err), 1)[0]
        assert abs(slope - (order + 1)) <= 0.2, (
            f"qt-{order} ({expand}) {name} error slope {slope:.3f}, expected {order + 1}: {err}"
        )


def test_quasi_taylor_tends_to_ddim_as_the_order_grows():
    sched = Schedule.vp_linear()
    t, s = np.array([1.0, 0.5]), np.array([0.9, 0.4])
    A, B = ddim_coefficients(sched, t, s)
    errs = []
    for K in (2, 4, 8, 16, 32):
        a, b = quasi_taylor_coefficients(sched, t, s, K)
        errs.append(max(np.max(np.abs(a - A)), np.max(np.abs(b - B))))
    assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:4]))
    assert errs[-1] < 1e-12


# ---------------------------------------------------------------------------------------
# The catalog


def test_samplers_lists_every_family():
    cat = qtaylor.samplers()
    assert cat == qtaylor.catalog()
    families = {name for name, _, _ in cat}
    assert len(families) == len(cat), "a family is listed twice"
    for name, nfe, desc in cat:
        assert isinstance(nfe, str) and nfe and isinstance(desc, str) and desc
    names = qtaylor.all_sampler_names()
    assert len(names) == len(set(names))
    for n in names:
        fam = "qt-K" if re.fullmatch(r"qt-\d+", n) else n
        assert fam in families, f"sampler {n} has no family in qtaylor.samplers()"
    for fam in families:
        if fam == "qt-K":
            assert any(re.fullmatch(r"qt-\d+", n) for n in names)
        else:
            assert fam in names, f"family {fam} is missing from all_sampler_names()"
    # Every listed sampler builds, and a fixed NFE per step gives the NFE of 10 steps.
    for name, nfe, _ in cat:
        n = "qt-3" if name == "qt-K" else name
        spec = qtaylor.SamplerSpec(n)
        assert spec.name == n
        if nfe == "adaptive":
            assert spec.is_adaptive and spec.nfe(10) is None
        elif nfe.isdigit():
            assert not spec.is_adaptive and spec.nfe(10) == 10 * int(nfe), (name, nfe, spec.nfe(10))
