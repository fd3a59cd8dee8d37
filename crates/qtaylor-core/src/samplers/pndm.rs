//! Pseudo numerical methods (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
//! Models on Manifolds", arXiv 2202.09778) and iPNDM (Zhang & Chen 2023, DEIS paper §4).
//!
//! All three move the state with the DDIM "transfer" `φ(x, ε, t → t')` (the paper's eq. 9,
//! which is the η = 0 DDIM step) and differ in the ε they feed it:
//!
//! - `pndm` (F-PNDM): the first three steps are pseudo-RK4 — `e₁ = ε(x, t)`,
//!   `e₂ = ε(φ(x, e₁, t → m), m)`, `e₃ = ε(φ(x, e₂, t → m), m)`, `e₄ = ε(φ(x, e₃, t → t'), t')`,
//!   `ε' = (e₁ + 2e₂ + 2e₃ + e₄)/6` with the midpoint `m = (t + t')/2` (4 NFE) — storing
//!   only e₁; then `ε' = (55e₀ − 59e₋₁ + 37e₋₂ − 9e₋₃)/24` (1 NFE).
//! - `plms` (PNDM without the RK warm-up, as diffusers' `skip_prk_steps`): the first step is
//!   Heun (`ε' = (e₀ + ε(φ(x, e₀, t → t'), t'))/2`, 2 NFE, only e₀ stored), then
//!   Adams–Bashforth 2, 3, 4: `(3e₀ − e₋₁)/2`, `(23e₀ − 16e₋₁ + 5e₋₂)/12`, the AB4 above.
//! - `ipndm`: Adams–Bashforth of growing order 1, 2, 3, 4 with the same fixed
//!   coefficients from the first step on (1 NFE per step).
//!
//! The coefficients are those of a uniform grid, whatever the grid (as in the papers).
//!
//! Variable: t, with DDIM's transfer between the grid's times written as `A x_t + B ε̂` (A
//! = α_s/α_t): it does not start at pure noise.

use std::collections::VecDeque;

use anyhow::Result;

use super::ddim::ddim_coefficients;
use super::{Backend, Ctx, reaches_zero};

/// The DDIM transfer `φ(x, ε, t → s)`.
fn transfer<B: Backend>(ctx: &mut Ctx<B>, x: &B::X, eps: &B::X, t: f64, s: f64) -> Result<B::X> {
    let (a, b) = ddim_coefficients(ctx.schedule, t, s);
    ctx.lc(&[(a, x), (b, eps)])
}

/// Adams–Bashforth combinations of the stored ε (newest first), orders 1 to 4.
const AB: [&[f64]; 4] = [
    &[1.0],
    &[1.5, -0.5],
    &[23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0],
    &[55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0],
];

/// `Σ_j c_j e_j` with the AB coefficients of the history's length.
fn adams_bashforth<B: Backend>(ctx: &mut Ctx<B>, hist: &VecDeque<B::X>) -> Result<B::X> {
    let c = AB[hist.len() - 1];
    let terms: Vec<(f64, &B::X)> = c.iter().copied().zip(hist.iter()).collect();
    ctx.lc(&terms)
}

fn push<X>(hist: &mut VecDeque<X>, e: X) {
    hist.push_front(e);
    hist.truncate(4);
}

/// F-PNDM: pseudo-RK4 for the first three steps, then the 4-step linear multistep.
pub fn sample_pndm<B: Backend>(ctx: &mut Ctx<B>, mut x: B::X, ts: &[f64]) -> Result<B::X> {
    let mut hist: VecDeque<B::X> = VecDeque::with_capacity(4);
    for i in 0..ts.len() - 1 {
        let (t, s) = (ts[i], ts[i + 1]);
        ctx.begin_step(i, t, &x)?;
        let d = ctx.denoise(&x, t)?;
        if reaches_zero(ctx.schedule, s) {
            x = d.x0;
            continue;
        }
        let e1 = d.eps;
        if i < 3 {
            let mid = 0.5 * (t + s);
            let xe2 = transfer(ctx, &x, &e1, t, mid)?;
            let e2 = ctx.denoise(&xe2, mid)?.eps;
            let xe3 = transfer(ctx, &x, &e2, t, mid)?;
            let e3 = ctx.denoise(&xe3, mid)?.eps;
            let xe4 = transfer(ctx, &x, &e3, t, s)?;
            let e4 = ctx.denoise(&xe4, s)?.eps;
            let e = ctx.lc(&[
                (1.0 / 6.0, &e1),
                (1.0 / 3.0, &e2),
                (1.0 / 3.0, &e3),
                (1.0 / 6.0, &e4),
            ])?;
            push(&mut hist, e1);
            x = transfer(ctx, &x, &e, t, s)?;
        } else {
            push(&mut hist, e1);
            let e = adams_bashforth(ctx, &hist)?;
            x = transfer(ctx, &x, &e, t, s)?;
        }
    }
    Ok(x)
}

/// PLMS: one Heun step, then Adams–Bashforth 2, 3, 4.
pub fn sample_plms<B: Backend>(ctx: &mut Ctx<B>, mut x: B::X, ts: &[f64]) -> Result<B::X> {
    let mut hist: VecDeque<B::X> = VecDeque::with_capacity(4);
    for i in 0..ts.len() - 1 {
        let (t, s) = (ts[i], ts[i + 1]);
        ctx.begin_step(i, t, &x)?;
        let d = ctx.denoise(&x, t)?;
        if reaches_zero(ctx.schedule, s) {
            x = d.x0;
            continue;
        }
        let e = d.eps;
        if i == 0 {
            let x1 = transfer(ctx, &x, &e, t, s)?;
            let e_next = ctx.denoise(&x1, s)?.eps;
            let heun = ctx.lc(&[(0.5, &e), (0.5, &e_next)])?;
            push(&mut hist, e);
            x = transfer(ctx, &x, &heun, t, s)?;
        } else {
            push(&mut hist, e);
            let e = adams_bashforth(ctx, &hist)?;
            x = transfer(ctx, &x, &e, t, s)?;
        }
    }
    Ok(x)
}

/// iPNDM: Adams–Bashforth of orders 1, 2, 3, 4 from the start, one NFE per step.
pub fn sample_ipndm<B: Backend>(ctx: &mut Ctx<B>, mut x: B::X, ts: &[f64]) -> Result<B::X> {
    let mut hist: VecDeque<B::X> = VecDeque::with_capacity(4);
    for i in 0..ts.len() - 1 {
        let (t, s) = (ts[i], ts[i + 1]);
        ctx.begin_step(i, t, &x)?;
        let d = ctx.denoise(&x, t)?;
        if reaches_zero(ctx.schedule, s) {
            x = d.x0;
            continue;
        }
        push(&mut hist, d.eps);
        let e = adams_bashforth(ctx, &hist)?;
        x = transfer(ctx, &x, &e, t, s)?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adams_bashforth_rows_are_consistent() {
        // Each row sums to one (exact for constant ε) and integrates a linear ε exactly:
        // Σ_j c_j (−j) = ½ (the midpoint of the step in units of the step).
        for row in AB {
            assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-14);
            if row.len() > 1 {
                let m: f64 = row.iter().enumerate().map(|(j, c)| -(j as f64) * c).sum();
                assert!((m - 0.5).abs() < 1e-14, "{row:?}");
            }
        }
    }
}
