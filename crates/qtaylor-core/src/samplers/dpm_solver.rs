//! DPM-Solver (Lu et al. 2022, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic
//! Model Sampling in Around 10 Steps", arXiv 2206.00927): single-step exponential
//! integrators in the log-SNR λ for the noise prediction, the reference code's default
//! `solver_type = 'dpmsolver'` forms.
//!
//! Step from t to s, `h = λ_s − λ_t`, `E = e^h − 1`, intermediate points at `λ_t + r h`:
//!
//! ```text
//! DPM-Solver-1: x_s = (α_s/α_t) x_t − σ_s E ε_t                                   (= DDIM)
//! DPM-Solver-2: x_u = (α_u/α_t) x_t − σ_u (e^{r₁h} − 1) ε_t
//!               x_s = (α_s/α_t) x_t − σ_s E ε_t − σ_s E/(2r₁) (ε_u − ε_t)            (r₁ = ½)
//! DPM-Solver-3: x_u₁ as above with r₁ = ⅓,
//!               x_u₂ = (α_u₂/α_t) x_t − σ_u₂ (e^{r₂h} − 1) ε_t
//!                      − (r₂/r₁) σ_u₂ ((e^{r₂h} − 1)/(r₂h) − 1)(ε_u₁ − ε_t)        (r₂ = ⅔)
//!               x_s = (α_s/α_t) x_t − σ_s E ε_t − (σ_s/r₂)(E/h − 1)(ε_u₂ − ε_t)
//! ```
//!
//! `dpm-solver-fast` is the paper's mixed-order schedule for an NFE budget (steps uniform in
//! λ, orders 3,…,3 then 2,1 / 1 / 2 to use the budget exactly); `dpm-solver-12/23` are the
//! paper's adaptive pairs (lower order for the error estimate, continue from the higher;
//! `h ← min(θ h E^{−1/order}, λ_end − λ)`, θ = 0.9, h₀ = 0.05), with the step size controlled
//! for every sample separately (the reference controls the batch as a whole).
//!
//! Variable: λ = ln(α/σ), on the noise prediction. λ = −∞ at pure noise, where the
//! singlestep midpoints are undefined: these samplers do not start there.

use anyhow::{Result, bail};

use super::{Backend, Ctx, reaches_zero};
use crate::exec::{Coef, Tolerance};
use crate::schedule::Schedule;

/// Per-row scalars of a set of points: time, ln α, σ, λ.
#[derive(Clone, Debug)]
pub(crate) struct Points {
    pub t: Vec<f64>,
    pub log_alpha: Vec<f64>,
    pub sigma: Vec<f64>,
    pub lambda: Vec<f64>,
}

impl Points {
    pub fn at_times(schedule: &dyn Schedule, t: &[f64]) -> Points {
        Points {
            t: t.to_vec(),
            log_alpha: t.iter().map(|&t| 0.5 * schedule.log_alpha_bar(t)).collect(),
            sigma: t.iter().map(|&t| schedule.sigma(t)).collect(),
            lambda: t.iter().map(|&t| schedule.lambda(t)).collect(),
        }
    }

    pub fn at_lambdas(schedule: &dyn Schedule, lambda: &[f64]) -> Result<Points> {
        let t: Vec<f64> = lambda
            .iter()
            .map(|&l| schedule.t_of_lambda(l))
            .collect::<Result<_>>()?;
        Ok(Points::at_times(schedule, &t))
    }

    fn len(&self) -> usize {
        self.t.len()
    }
}

fn rows(n: usize, f: impl Fn(usize) -> f64) -> Coef {
    Coef::from((0..n).map(f).collect::<Vec<f64>>())
}

/// DPM-Solver-1 from `p` to `q` given ε at `p`: `(α_q/α_p) x − σ_q (e^h − 1) ε`.
fn first_order<B: Backend>(
    ctx: &mut Ctx<B>,
    p: &Points,
    q: &Points,
    x: &B::X,
    eps: &B::X,
) -> Result<B::X> {
    let n = p.len();
    ctx.lincomb(&[
        (rows(n, |i| (q.log_alpha[i] - p.log_alpha[i]).exp()), x),
        (
            rows(n, |i| -q.sigma[i] * (q.lambda[i] - p.lambda[i]).exp_m1()),
            eps,
        ),
    ])
}

/// Points at `λ_p + r h` for per-row steps `h`.
fn between(schedule: &dyn Schedule, p: &Points, h: &[f64], r: f64) -> Result<Points> {
    let lam: Vec<f64> = (0..p.len()).map(|i| p.lambda[i] + r * h[i]).collect();
    let mut u = Points::at_lambdas(schedule, &lam)?;
    // Exact values where the step is zero (finished rows of an adaptive run).
    for (i, &hi) in h.iter().enumerate() {
        if hi == 0.0 {
            u.t[i] = p.t[i];
            u.log_alpha[i] = p.log_alpha[i];
            u.sigma[i] = p.sigma[i];
            u.lambda[i] = p.lambda[i];
        }
    }
    Ok(u)
}

/// DPM-Solver-2 with intermediate fraction `r1`; returns x_q and ε at the intermediate point.
fn second_order<B: Backend>(
    ctx: &mut Ctx<B>,
    p: &Points,
    q: &Points,
    x: &B::X,
    eps: &B::X,
    r1: f64,
    active: usize,
) -> Result<(B::X, B::X)> {
    let n = p.len();
    let h: Vec<f64> = (0..n).map(|i| q.lambda[i] - p.lambda[i]).collect();
    let u = between(ctx.schedule, p, &h, r1)?;
    let x_u = first_order(ctx, p, &u, x, eps)?;
    let eps_u = ctx.denoise_rows(&x_u, &u.t, active)?.eps;
    let e = |i: usize| h[i].exp_m1();
    let x_q = ctx.lincomb(&[
        (rows(n, |i| (q.log_alpha[i] - p.log_alpha[i]).exp()), x),
        (rows(n, |i| -q.sigma[i] * e(i) * (1.0 - 0.5 / r1)), eps),
        (rows(n, |i| -q.sigma[i] * e(i) * 0.5 / r1), &eps_u),
    ])?;
    Ok((x_q, eps_u))
}

/// DPM-Solver-3 with r₁ = ⅓, r₂ = ⅔; `eps_u1` may come from a DPM-Solver-2 step with
/// r₁ = ⅓ over the same interval (the adaptive pair).
fn third_order<B: Backend>(
    ctx: &mut Ctx<B>,
    p: &Points,
    q: &Points,
    x: &B::X,
    eps: &B::X,
    eps_u1: Option<B::X>,
    active: usize,
) -> Result<B::X> {
    let (r1, r2) = (1.0 / 3.0, 2.0 / 3.0);
    let n = p.len();
    let h: Vec<f64> = (0..n).map(|i| q.lambda[i] - p.lambda[i]).collect();
    let eps_u1 = match eps_u1 {
        Some(e) => e,
        None => {
            let u1 = between(ctx.schedule, p, &h, r1)?;
            let x_u1 = first_order(ctx, p, &u1, x, eps)?;
            ctx.denoise_rows(&x_u1, &u1.t, active)?.eps
        }
    };
    let u2 = between(ctx.schedule, p, &h, r2)?;
    // ((e^{r₂h} − 1)/(r₂h) − 1), with its h → 0 limit 0 for finished rows.
    let phi = |i: usize| {
        let z = r2 * h[i];
        if z == 0.0 { 0.0 } else { z.exp_m1() / z - 1.0 }
    };
    let c = |i: usize| (r2 / r1) * u2.sigma[i] * phi(i);
    let x_u2 = ctx.lincomb(&[
        (rows(n, |i| (u2.log_alpha[i] - p.log_alpha[i]).exp()), x),
        (rows(n, |i| -u2.sigma[i] * (r2 * h[i]).exp_m1() + c(i)), eps),
        (rows(n, |i| -c(i)), &eps_u1),
    ])?;
    let eps_u2 = ctx.denoise_rows(&x_u2, &u2.t, active)?.eps;
    let psi2 = |i: usize| {
        if h[i] == 0.0 {
            0.0
        } else {
            h[i].exp_m1() / h[i] - 1.0
        }
    };
    let d = |i: usize| q.sigma[i] / r2 * psi2(i);
    ctx.lincomb(&[
        (rows(n, |i| (q.log_alpha[i] - p.log_alpha[i]).exp()), x),
        (rows(n, |i| -q.sigma[i] * h[i].exp_m1() + d(i)), eps),
        (rows(n, |i| -d(i)), &eps_u2),
    ])
}

/// One single-step DPM-Solver step of `order` from t to s (order NFE).
fn step<B: Backend>(ctx: &mut Ctx<B>, x: &B::X, t: f64, s: f64, order: usize) -> Result<B::X> {
    let b = ctx.rows();
    let d = ctx.denoise(x, t)?;
    if reaches_zero(ctx.schedule, s) {
        return Ok(d.x0);
    }
    let (p, q) = (
        Points::at_times(ctx.schedule, &[t]),
        Points::at_times(ctx.schedule, &[s]),
    );
    match order {
        1 => first_order(ctx, &p, &q, x, &d.eps),
        2 => Ok(second_order(ctx, &p, &q, x, &d.eps, 0.5, b)?.0),
        _ => third_order(ctx, &p, &q, x, &d.eps, None, b),
    }
}

/// DPM-Solver-K on the grid: K NFE per step.
pub fn sample_dpm_solver<B: Backend>(
    ctx: &mut Ctx<B>,
    mut x: B::X,
    ts: &[f64],
    order: usize,
) -> Result<B::X> {
    for i in 0..ts.len() - 1 {
        ctx.begin_step(i, ts[i], &x)?;
        x = step(ctx, &x, ts[i], ts[i + 1], order)?;
    }
    Ok(x)
}

/// The orders of DPM-Solver-fast for an NFE budget (reference code,
/// `get_orders_and_timesteps_for_singlestep_solver`, order 3): `K = nfe/3 + 1` steps,
/// `[3,…,3,2,1]` if nfe ≡ 0, `[3,…,3,1]` if ≡ 1, `[3,…,3,2]` if ≡ 2 (mod 3). Sums to nfe.
pub fn fast_orders(nfe: usize) -> Vec<usize> {
    let k = nfe / 3 + 1;
    let mut o = vec![3; k.saturating_sub(1)];
    match nfe % 3 {
        0 => {
            o.truncate(k - 2);
            o.extend([2, 1]);
        }
        1 => o.push(1),
        _ => o.push(2),
    }
    o
}

/// DPM-Solver-fast: `ts.len() − 1` is the NFE budget; only the grid's end points are used,
/// the steps are uniform in λ between them (the paper's `skip_type = logSNR`).
pub fn sample_dpm_solver_fast<B: Backend>(
    ctx: &mut Ctx<B>,
    mut x: B::X,
    ts: &[f64],
) -> Result<B::X> {
    let n = ts.len() - 1;
    let zero = reaches_zero(ctx.schedule, ts[n]);
    // With a final step to σ = 0 the solver works up to the last positive grid time and
    // spends its last NFE on x̂0 there.
    let (t_end, budget) = if zero { (ts[n - 1], n - 1) } else { (ts[n], n) };
    if budget > 0 {
        let orders = fast_orders(budget);
        let (l0, l1) = (ctx.schedule.lambda(ts[0]), ctx.schedule.lambda(t_end));
        let k = orders.len();
        let grid: Vec<f64> = (0..=k)
            .map(|j| match j {
                0 => Ok(ts[0]),
                j if j == k => Ok(t_end),
                j => ctx
                    .schedule
                    .t_of_lambda(l0 + (l1 - l0) * j as f64 / k as f64),
            })
            .collect::<Result<_>>()?;
        for (j, &order) in orders.iter().enumerate() {
            ctx.begin_step(j, grid[j], &x)?;
            x = step(ctx, &x, grid[j], grid[j + 1], order)?;
        }
    }
    if zero {
        ctx.begin_step(n - 1, t_end, &x)?;
        x = ctx.denoise(&x, t_end)?.x0;
    }
    Ok(x)
}

/// Per-row RMS of `(hi − lo)/δ`, `δ = max(atol, rtol·max(|lo|, |prev|))` (reference code).
fn error_norm<B: Backend>(
    ctx: &mut Ctx<B>,
    hi: &B::X,
    lo: &B::X,
    prev: &B::X,
    rtol: f64,
    atol: f64,
) -> Result<Vec<f64>> {
    let diff = ctx.lc(&[(1.0, hi), (-1.0, lo)])?;
    ctx.error_norm(&diff, lo, prev, rtol, atol, Tolerance::Max)
}

/// Adaptive DPM-Solver-12 (`order` 2) or -23 (`order` 3) between the grid's end points.
pub fn sample_dpm_solver_adaptive<B: Backend>(
    ctx: &mut Ctx<B>,
    mut x: B::X,
    ts: &[f64],
    order: usize,
    rtol: f64,
    atol: f64,
) -> Result<B::X> {
    const THETA: f64 = 0.9;
    const H_INIT: f64 = 0.05;
    let n = ts.len() - 1;
    let zero = reaches_zero(ctx.schedule, ts[n]);
    let t_end = if zero { ts[n - 1] } else { ts[n] };
    let b = ctx.rows();
    let sched = ctx.schedule;
    let lam_end = sched.lambda(t_end);
    let mut lam = vec![sched.lambda(ts[0]); b];
    let mut h = vec![H_INIT; b];
    let mut done = vec![ts[0] == t_end; b];
    let mut x_prev = x.clone();
    ctx.begin_step(0, ts[0], &x)?;
    for iter in 0..100_000 {
        if done.iter().all(|&d| d) {
            break;
        }
        if iter == 99_999 {
            bail!(
                "dpm-solver-{}{order}: no convergence in 100000 steps",
                order - 1
            );
        }
        let active = done.iter().filter(|d| !**d).count();
        let hs: Vec<f64> = (0..b)
            .map(|i| {
                if done[i] {
                    0.0
                } else {
                    h[i].min(lam_end - lam[i])
                }
            })
            .collect();
        let p = Points::at_lambdas(sched, &lam)?;
        let mut q = between(sched, &p, &hs, 1.0)?;
        for i in 0..b {
            if hs[i] > 0.0 && hs[i] == lam_end - lam[i] {
                q.t[i] = t_end; // land exactly on the end point
            }
        }
        let eps = ctx.denoise_rows(&x, &p.t, active)?.eps;
        let (lo, hi) = if order == 2 {
            let lo = first_order(ctx, &p, &q, &x, &eps)?;
            let (hi, _) = second_order(ctx, &p, &q, &x, &eps, 0.5, active)?;
            (lo, hi)
        } else {
            let (lo, eps_u1) = second_order(ctx, &p, &q, &x, &eps, 1.0 / 3.0, active)?;
            let hi = third_order(ctx, &p, &q, &x, &eps, Some(eps_u1), active)?;
            (lo, hi)
        };
        let err = error_norm(ctx, &hi, &lo, &x_prev, rtol, atol)?;
        let mut take = vec![0.0; b];
        for i in 0..b {
            if done[i] {
                continue;
            }
            if !err[i].is_finite() {
                bail!(
                    "dpm-solver-{}{order}: non-finite error estimate at lambda = {}",
                    order - 1,
                    lam[i]
                );
            }
            if err[i] <= 1.0 {
                take[i] = 1.0;
                if hs[i] == lam_end - lam[i] {
                    lam[i] = lam_end;
                    done[i] = true;
                } else {
                    lam[i] += hs[i];
                }
            }
            h[i] = (THETA * h[i] * err[i].powf(-1.0 / order as f64)).min(lam_end - lam[i]);
        }
        let keep: Vec<f64> = take.iter().map(|t| 1.0 - t).collect();
        x_prev = ctx.lincomb(&[
            (Coef::Rows(take.clone()), &lo),
            (Coef::Rows(keep.clone()), &x_prev),
        ])?;
        x = ctx.lincomb(&[(Coef::Rows(take), &hi), (Coef::Rows(keep), &x)])?;
    }
    if zero {
        ctx.begin_step(n - 1, t_end, &x)?;
        x = ctx.denoise(&x, t_end)?.x0;
    }
    Ok(x)
}

/// `(A, B)` of DPM-Solver-1 for shared times (used by tests and other families).
pub fn dpm_solver_1_coefficients(schedule: &dyn Schedule, t: f64, s: f64) -> (f64, f64) {
    let (p, q) = (
        Points::at_times(schedule, &[t]),
        Points::at_times(schedule, &[s]),
    );
    (
        (q.log_alpha[0] - p.log_alpha[0]).exp(),
        -q.sigma[0] * (q.lambda[0] - p.lambda[0]).exp_m1(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samplers::ddim::ddim_coefficients;
    use crate::schedule::VpLinear;

    #[test]
    fn dpm_solver_1_equals_ddim() {
        let s = VpLinear::default();
        for &(t, sn) in &[(1.0, 0.9), (0.5, 0.2), (0.05, 0.001)] {
            let (a, b) = dpm_solver_1_coefficients(&s, t, sn);
            let (da, db) = ddim_coefficients(&s, t, sn);
            assert!((a - da).abs() < 1e-12 * da.abs(), "{a} {da}");
            assert!((b - db).abs() < 1e-12 * (1.0 + db.abs()), "{b} {db}");
        }
    }

    #[test]
    fn fast_orders_spend_the_budget_exactly_with_low_orders_last() {
        for nfe in 1..40 {
            let o = fast_orders(nfe);
            assert_eq!(o.iter().sum::<usize>(), nfe, "{nfe}: {o:?}");
            assert_eq!(o.len(), nfe / 3 + 1);
            assert!(o.windows(2).all(|w| w[0] >= w[1]), "{o:?}");
        }
        assert_eq!(fast_orders(10), vec![3, 3, 3, 1]);
        assert_eq!(fast_orders(12), vec![3, 3, 3, 2, 1]);
        assert_eq!(fast_orders(20), vec![3, 3, 3, 3, 3, 3, 2]);
    }
}
