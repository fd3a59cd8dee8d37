//! Euler–Maruyama on the reverse SDE (Kloeden & Platen 1992, §10.2; Song et al. 2021,
//! "Score-Based Generative Modeling through SDEs", reverse diffusion).
//!
//! In reverse time with step `Δ = t − s > 0`, drift `a = ½ β x − (β/σ) ε̂` and diffusion
//! `b = sqrt(β)` (all at t):
//!
//! ```text
//! x_s = x_t + a Δ + b sqrt(Δ) ξ = (1 + ½βΔ) x_t − (βΔ/σ) ε̂ + sqrt(βΔ) ξ.
//! ```
//!
//! It is also the order-1 quasi-Itô-Taylor scheme (`qit-1`, DESIGN §5).
//!
//! Variable: t, on the reverse SDE (drift β x/2 − β ε̂/σ), singular at pure noise (β = ∞ on
//! rectified flow at ς = 1).

use anyhow::Result;

use super::{Backend, Ctx, reaches_zero};
use crate::schedule::Schedule;

/// `(A, B, C)` of the Euler–Maruyama step `x_s = A x_t + B ε̂ + C ξ`.
pub fn em_coefficients(schedule: &dyn Schedule, t: f64, s: f64) -> (f64, f64, f64) {
    let (beta, sigma, dt) = (schedule.beta(t), schedule.sigma(t), t - s);
    (
        1.0 + 0.5 * beta * dt,
        -beta * dt / sigma,
        (beta * dt).sqrt(),
    )
}

/// Euler–Maruyama sampler (one NFE per step).
pub fn sample_em<B: Backend>(ctx: &mut Ctx<B>, mut x: B::X, ts: &[f64]) -> Result<B::X> {
    for i in 0..ts.len() - 1 {
        let (t, s) = (ts[i], ts[i + 1]);
        ctx.begin_step(i, t, &x)?;
        let d = ctx.denoise(&x, t)?;
        if reaches_zero(ctx.schedule, s) {
            x = d.x0;
            continue;
        }
        let (a, b, c) = em_coefficients(ctx.schedule, t, s);
        let z = ctx.noise_like(&x)?;
        x = ctx.lc(&[(a, &x), (b, &d.eps), (c, &z)])?;
    }
    Ok(x)
}
