//! Runge–Kutta solvers for the probability-flow ODE in t (Song et al. 2021, eq. 13):
//!
//! ```text
//! dx/dt = f(x, t) = −½ β(t) x + β(t)/(2σ(t)) ε̂(x, t)
//! ```
//!
//! Euler (order 1), Heun's explicit trapezoid (order 2, 2 NFE/step), classical RK4
//! (order 4, 4 NFE/step) on the given grid, and adaptive Dormand–Prince 5(4)
//! (Dormand & Prince 1980; Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.4–5), which
//! is what score_sde's probability-flow sampler runs through `scipy.integrate.solve_ivp`.
//! Our DOPRI5 controls the step of every sample separately (per-row times), so a
//! sample's result does not depend on the rest of the batch.
//!
//! Variable: t, on the probability-flow ODE. At pure noise the drift −½βx + β/(2σ) ε̂ is
//! written α′ x̂0 + σ′ ε̂ (finite where α, σ are analytic), so Euler, Heun and RK4 start
//! there; RK45 does not.

use anyhow::{Result, bail};

use super::{Backend, Ctx, pure_noise, reaches_zero};
use crate::exec::{Coef, Tolerance};

/// `f(x, t)` as a tensor: `−½β x + β/(2σ) ε̂` (one NFE).
fn drift<B: Backend>(ctx: &mut Ctx<B>, x: &B::X, t: f64) -> Result<B::X> {
    let d = ctx.denoise(x, t)?;
    drift_of(ctx, x, t, &d.eps)
}

fn drift_of<B: Backend>(ctx: &mut Ctx<B>, x: &B::X, t: f64, eps: &B::X) -> Result<B::X> {
    let (beta, sigma) = (ctx.schedule.beta(t), ctx.schedule.sigma(t));
    ctx.lc(&[(-0.5 * beta, x), (beta / (2.0 * sigma), eps)])
}

/// The first stage of a step; `None` when the step reaches σ = 0, where the drift is
/// singular and the step returns x̂0 instead (one NFE).
fn first_stage<B: Backend>(ctx: &mut Ctx<B>, x: &mut B::X, t: f64, s: f64) -> Result<Option<B::X>> {
    let d = ctx.denoise(x, t)?;
    if reaches_zero(ctx.schedule, s) {
        *x = d.x0;
        return Ok(None);
    }
    if pure_noise(ctx.schedule, t) {
        // α_t = 0: −½β x + β/(2σ) ε̂ is ∞ − ∞; the same drift is α' x̂0 + σ' ε̂
        // (differentiate x = α x̂0 + σ ε̂ with x̂0, ε̂ fixed), finite where α, σ are analytic.
        let (a, s) = (
            ctx.schedule.alpha_series(t, 1),
            ctx.schedule.sigma_series(t, 1),
        );
        return Ok(Some(ctx.lc(&[(a.0[1], &d.x0), (s.0[1], &d.eps)])?));
    }
    Ok(Some(drift_of(ctx, x, t, &d.eps)?))
}

/// Euler: `x_s = x_t + (s − t) f(x_t, t)`.
pub fn sample_euler<B: Backend>(ctx: &mut Ctx<B>, mut x: B::X, ts: &[f64]) -> Result<B::X> {
    for i in 0..ts.len() - 1 {
        let (t, s) = (ts[i], ts[i + 1]);
        ctx.begin_step(i, t, &x)?;
        let Some(k1) = first_stage(ctx, &mut x, t, s)? else {
            continue;
        };
        x = ctx.lc(&[(1.0, &x), (s - t, &k1)])?;
    }
    Ok(x)
}

/// Heun: `k₁ = f(x, t)`, `k₂ = f(x + h k₁, s)`, `x_s = x + h/2 (k₁ + k₂)`, `h = s − t`.
pub fn sample_heun<B: Backend>(ctx: &mut Ctx<B>, mut x: B::X, ts: &[f64]) -> Result<B::X> {
    for i in 0..ts.len() - 1 {
        let (t, s) = (ts[i], ts[i + 1]);
        let h = s - t;
        ctx.begin_step(i, t, &x)?;
        let Some(k1) = first_stage(ctx, &mut x, t, s)? else {
            continue;
        };
        let x1 = ctx.lc(&[(1.0, &x), (h, &k1)])?;
        let k2 = drift(ctx, &x1, s)?;
        x = ctx.lc(&[(1.0, &x), (0.5 * h, &k1), (0.5 * h, &k2)])?;
    }
    Ok(x)
}

/// Classical RK4: stages at t, t + h/2, t + h/2, s; weights 1/6, 1/3, 1/3, 1/6.
pub fn sample_rk4<B: Backend>(ctx: &mut Ctx<B>, mut x: B::X, ts: &[f64]) -> Result<B::X> {
    for i in 0..ts.len() - 1 {
        let (t, s) = (ts[i], ts[i + 1]);
        let h = s - t;
        ctx.begin_step(i, t, &x)?;
        let Some(k1) = first_stage(ctx, &mut x, t, s)? else {
            continue;
        };
        let x2 = ctx.lc(&[(1.0, &x), (0.5 * h, &k1)])?;
        let k2 = drift(ctx, &x2, t + 0.5 * h)?;
        let x3 = ctx.lc(&[(1.0, &x), (0.5 * h, &k2)])?;
        let k3 = drift(ctx, &x3, t + 0.5 * h)?;
        let x4 = ctx.lc(&[(1.0, &x), (h, &k3)])?;
        let k4 = drift(ctx, &x4, s)?;
        x = ctx.lc(&[
            (1.0, &x),
            (h / 6.0, &k1),
            (h / 3.0, &k2),
            (h / 3.0, &k3),
            (h / 6.0, &k4),
        ])?;
    }
    Ok(x)
}

// Dormand–Prince 5(4) tableau.
const C: [f64; 7] = [0.0, 1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];
const A: [&[f64]; 7] = [
    &[],
    &[1.0 / 5.0],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[
        19372.0 / 6561.0,
        -25360.0 / 2187.0,
        64448.0 / 6561.0,
        -212.0 / 729.0,
    ],
    &[
        9017.0 / 3168.0,
        -355.0 / 33.0,
        46732.0 / 5247.0,
        49.0 / 176.0,
        -5103.0 / 18656.0,
    ],
    &[
        35.0 / 384.0,
        0.0,
        500.0 / 1113.0,
        125.0 / 192.0,
        -2187.0 / 6784.0,
        11.0 / 84.0,
    ],
];
/// 5th-order weights (= the last row of A, FSAL) minus 4th-order weights: the error estimate.
const E: [f64; 7] = [
    35.0 / 384.0 - 5179.0 / 57600.0,
    0.0,
    500.0 / 1113.0 - 7571.0 / 16695.0,
    125.0 / 192.0 - 393.0 / 640.0,
    -2187.0 / 6784.0 + 92097.0 / 339200.0,
    11.0 / 84.0 - 187.0 / 2100.0,
    -1.0 / 40.0,
];

/// Result of [`dopri5`].
pub struct OdeSolution<X> {
    pub y: X,
    /// Vector-field evaluations per row.
    pub evals: Vec<usize>,
    /// Accepted and rejected steps over all rows.
    pub accepted: usize,
    pub rejected: usize,
}

/// Per-row RMS of `e / (atol + rtol·max(|y0|, |y1|))`.
fn scaled_rms<B: Backend>(
    ctx: &mut Ctx<B>,
    e: &B::X,
    y0: &B::X,
    y1: &B::X,
    rtol: f64,
    atol: f64,
) -> Result<Vec<f64>> {
    ctx.error_norm(e, y0, y1, rtol, atol, Tolerance::Sum)
}

/// Adaptive Dormand–Prince 5(4) for `dy/ds = f(y, s)` from `s0` to `s1` (either direction),
/// every row with its own step size. `f(ctx, y, s_rows, active)` must return the field at
/// per-row abscissae; rows that have finished are evaluated at their end point with a
/// zero step and do not count as evaluations. Initial step: Hairer's heuristic
/// (*Solving ODEs I*, §II.4), which costs one extra evaluation, as in scipy.
#[allow(clippy::too_many_arguments)]
pub fn dopri5<B: Backend, F>(
    ctx: &mut Ctx<B>,
    f: &mut F,
    y0: B::X,
    s0: f64,
    s1: f64,
    rtol: f64,
    atol: f64,
    max_iters: usize,
) -> Result<OdeSolution<B::X>>
where
    F: FnMut(&mut Ctx<B>, &B::X, &[f64], usize) -> Result<B::X>,
{
    let b = ctx.rows();
    let dir = (s1 - s0).signum();
    let span = (s1 - s0).abs();
    let mut evals = vec![0usize; b];
    let mut s = vec![s0; b];
    let mut y = y0;
    // Initial step per row.
    let f0 = f(ctx, &y, &s, b)?;
    evals.iter_mut().for_each(|e| *e += 1);
    let d0 = scaled_rms(ctx, &y, &y, &y, rtol, atol)?; // ‖y‖ in the error norm (atol + rtol|y|)
    let d1 = scaled_rms(ctx, &f0, &y, &y, rtol, atol)?;
    let h0: Vec<f64> = d0
        .iter()
        .zip(&d1)
        .map(|(&a, &b)| {
            if a < 1e-5 || b < 1e-5 {
                1e-6
            } else {
                0.01 * a / b
            }
        })
        .map(|h: f64| h.min(span))
        .collect();
    let y1 = ctx.lincomb(&[
        (Coef::All(1.0), &y),
        (Coef::Rows(h0.iter().map(|h| dir * h).collect()), &f0),
    ])?;
    let s_probe: Vec<f64> = h0.iter().map(|h| s0 + dir * h).collect();
    let f1 = f(ctx, &y1, &s_probe, b)?;
    evals.iter_mut().for_each(|e| *e += 1);
    let df = ctx.lc(&[(1.0, &f1), (-1.0, &f0)])?;
    let d2 = scaled_rms(ctx, &df, &y, &y, rtol, atol)?;
    let mut h: Vec<f64> = (0..b)
        .map(|i| {
            let d2 = d2[i] / h0[i];
            let h1 = if d1[i].max(d2) <= 1e-15 {
                (h0[i] * 1e-3).max(1e-6)
            } else {
                (0.01 / d1[i].max(d2)).powf(1.0 / 5.0)
            };
            (100.0 * h0[i]).min(h1).min(span)
        })
        .collect();
    let mut k1 = f0;
    let (mut accepted, mut rejected) = (0, 0);
    let mut done = vec![false; b];
    for _ in 0..max_iters {
        if done.iter().all(|&d| d) {
            return Ok(OdeSolution {
                y,
                evals,
                accepted,
                rejected,
            });
        }
        // Signed per-row steps, clipped to the end point; 0 for finished rows.
        let hs: Vec<f64> = (0..b)
            .map(|i| {
                if done[i] {
                    0.0
                } else {
                    dir * h[i].min((s1 - s[i]).abs())
                }
            })
            .collect();
        let active = done.iter().filter(|d| !**d).count();
        let mut ks: Vec<B::X> = vec![k1.clone()];
        let mut y_new = y.clone();
        for j in 1..7 {
            let mut terms = vec![(Coef::All(1.0), &y)];
            for (l, &a) in A[j].iter().enumerate() {
                if a != 0.0 {
                    terms.push((Coef::Rows(hs.iter().map(|h| h * a).collect()), &ks[l]));
                }
            }
            let yj = ctx.lincomb(&terms)?;
            let sj: Vec<f64> = (0..b).map(|i| s[i] + C[j] * hs[i]).collect();
            let kj = f(ctx, &yj, &sj, active)?;
            for (i, e) in evals.iter_mut().enumerate() {
                if !done[i] {
                    *e += 1;
                }
            }
            ks.push(kj);
            if j == 6 {
                // The last stage is evaluated at the 5th-order solution (FSAL).
                y_new = yj;
            }
        }
        let err_terms: Vec<(Coef, &B::X)> = E
            .iter()
            .enumerate()
            .filter(|(_, e)| **e != 0.0)
            .map(|(l, &e)| (Coef::Rows(hs.iter().map(|h| h * e).collect()), &ks[l]))
            .collect();
        let err_vec = ctx.lincomb(&err_terms)?;
        let err = scaled_rms(ctx, &err_vec, &y, &y_new, rtol, atol)?;
        let mut take = vec![0.0; b];
        for i in 0..b {
            if done[i] {
                take[i] = 1.0; // no-op: y_new == y for a zero step
                continue;
            }
            if !err[i].is_finite() {
                bail!("rk45: the error estimate is not finite at s = {}", s[i]);
            }
            if err[i] <= 1.0 {
                take[i] = 1.0;
                accepted += 1;
                s[i] += hs[i];
                if (s1 - s[i]) * dir <= 1e-14 * span {
                    s[i] = s1;
                    done[i] = true;
                }
                let fac = if err[i] == 0.0 {
                    10.0
                } else {
                    (0.9 * err[i].powf(-0.2)).clamp(0.2, 10.0)
                };
                h[i] *= fac;
            } else {
                rejected += 1;
                h[i] *= (0.9 * err[i].powf(-0.2)).clamp(0.2, 1.0);
            }
        }
        let keep: Vec<f64> = take.iter().map(|t| 1.0 - t).collect();
        y = ctx.lincomb(&[
            (Coef::Rows(take.clone()), &y_new),
            (Coef::Rows(keep.clone()), &y),
        ])?;
        // FSAL: the last stage of an accepted step is the first of the next.
        k1 = ctx.lincomb(&[(Coef::Rows(take), &ks[6]), (Coef::Rows(keep), &ks[0])])?;
    }
    bail!(
        "rk45 did not reach the end point within {max_iters} iterations (rtol {rtol}, atol {atol})"
    )
}

/// Adaptive DOPRI5 on the probability-flow ODE in t, every sample with its own steps.
/// Only the grid's end points are used.
pub fn sample_rk45<B: Backend>(
    ctx: &mut Ctx<B>,
    x: B::X,
    ts: &[f64],
    rtol: f64,
    atol: f64,
) -> Result<B::X> {
    let n = ts.len() - 1;
    let zero = reaches_zero(ctx.schedule, ts[n]);
    // To σ = 0: integrate to the last positive grid time, then one NFE for x̂0.
    let (t0, t1) = (ts[0], if zero { ts[n - 1] } else { ts[n] });
    if zero && n == 1 {
        return Ok(ctx.denoise(&x, t0)?.x0);
    }
    ctx.begin_step(0, t0, &x)?;
    let schedule = ctx.schedule;
    let mut field = |ctx: &mut Ctx<B>, x: &B::X, t: &[f64], active: usize| -> Result<B::X> {
        let d = ctx.denoise_rows(x, t, active)?;
        let cx: Vec<f64> = t.iter().map(|&t| -0.5 * schedule.beta(t)).collect();
        let ce: Vec<f64> = t
            .iter()
            .map(|&t| schedule.beta(t) / (2.0 * schedule.sigma(t)))
            .collect();
        ctx.lincomb(&[(Coef::from(cx), x), (Coef::from(ce), &d.eps)])
    };
    let sol = dopri5(ctx, &mut field, x, t0, t1, rtol, atol, 1_000_000)?;
    if zero {
        ctx.begin_step(n - 1, t1, &sol.y)?;
        return Ok(ctx.denoise(&sol.y, t1)?.x0);
    }
    Ok(sol.y)
}
