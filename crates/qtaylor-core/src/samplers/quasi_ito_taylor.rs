//! Quasi-Itô-Taylor samplers on the reverse SDE (arXiv 2112.13339; DESIGN §5).
//!
//! Reverse time, step `Δ = t − s`, drift `a = ½βx − (β/σ)ε̂`, diffusion `b = sqrt(β)`, and
//! the ideal derivatives under the single point approximation (β' = dβ/dt, all at t):
//!
//! ```text
//! L⁰a = (β²/4 − β'/2) x_t + (β'/σ) ε̂,   L¹a = sqrt(β) (β/2 − β/σ²),
//! L⁰b = −β'/(2 sqrt(β)),                L¹b = 0.
//! ```
//!
//! Order 2 is the Kloeden–Platen strong order 1.5 scheme for additive noise
//! (Kloeden & Platen 1992, eq. 11.2.19):
//!
//! ```text
//! x_s = x_t + aΔ + ½L⁰aΔ² + bΔW + L¹aΔZ + L⁰b(ΔΔW − ΔZ),
//! ΔW = sqrt(Δ) ξ₁,   ΔZ = ½Δ^{3/2}(ξ₁ + ξ₂/√3).
//! ```
//!
//! (L⁰a re-derived symbolically from `L⁰ = −∂_t + a·∇ + ½b²Δ` applied to the SPA drift
//! `½βx − β(x − αx̂0)/σ²`; it agrees with DESIGN §5.) Order 1 is Euler–Maruyama
//! ([`super::euler_maruyama`]); the infinite order is the exact SPA transition, the DDPM
//! posterior, which `qit-inf` runs through [`super::ddim::sample_ddim`] with η = 1.
//!
//! Variable: t, on the reverse SDE; `qit-inf` (the DDPM posterior) starts at pure noise,
//! `qit-1/2` do not (β = ∞ there).

use anyhow::Result;

use super::{Backend, Ctx, reaches_zero};
use crate::schedule::Schedule;

/// Coefficients of the order-2 step `x_s = A x_t + B ε̂ + C₁ ξ₁ + C₂ ξ₂`.
#[derive(Clone, Copy, Debug)]
pub struct Qit2Coefficients {
    pub a: f64,
    pub b: f64,
    pub c1: f64,
    pub c2: f64,
}

/// The order-2 quasi-Itô-Taylor coefficients for the step t → s.
pub fn qit2_coefficients(schedule: &dyn Schedule, t: f64, s: f64) -> Qit2Coefficients {
    let bs = schedule.beta_series(t, 1);
    let (beta, dbeta) = (bs.0[0], bs.0[1]);
    let sigma = schedule.sigma(t);
    let dt = t - s;
    let sb = beta.sqrt();
    // Drift a = ax·x + ae·ε̂ and L⁰a = lx·x + le·ε̂.
    let (ax, ae) = (0.5 * beta, -beta / sigma);
    let (lx, le) = (beta * beta / 4.0 - dbeta / 2.0, dbeta / sigma);
    let l1a = sb * (beta / 2.0 - beta / (sigma * sigma));
    let l0b = -dbeta / (2.0 * sb);
    let h32 = dt.powf(1.5);
    // ΔW = √Δ ξ₁; ΔZ = ½Δ^{3/2}(ξ₁ + ξ₂/√3).
    // bΔW + (L¹a − L⁰b)ΔZ + L⁰b Δ ΔW
    let q = l1a - l0b;
    Qit2Coefficients {
        a: 1.0 + ax * dt + 0.5 * lx * dt * dt,
        b: ae * dt + 0.5 * le * dt * dt,
        c1: sb * dt.sqrt() + 0.5 * q * h32 + l0b * h32,
        c2: 0.5 * q * h32 / 3f64.sqrt(),
    }
}

/// Order-2 quasi-Itô-Taylor sampler (one NFE and two normal draws per step).
pub fn sample_qit2<B: Backend>(ctx: &mut Ctx<B>, mut x: B::X, ts: &[f64]) -> Result<B::X> {
    for i in 0..ts.len() - 1 {
        let (t, s) = (ts[i], ts[i + 1]);
        ctx.begin_step(i, t, &x)?;
        let d = ctx.denoise(&x, t)?;
        if reaches_zero(ctx.schedule, s) {
            x = d.x0;
            continue;
        }
        let c = qit2_coefficients(ctx.schedule, t, s);
        let xi1 = ctx.noise_like(&x)?;
        let xi2 = ctx.noise_like(&x)?;
        x = ctx.lc(&[(c.a, &x), (c.b, &d.eps), (c.c1, &xi1), (c.c2, &xi2)])?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loglog_slope as fit_slope;
    use crate::samplers::DdpmVariance;
    use crate::samplers::ddim::ddpm_coefficients;
    use crate::samplers::euler_maruyama::em_coefficients;
    use crate::schedule::VpLinear;

    /// The exact SPA transition from x_t given x̂0: the DDPM posterior, written with
    /// x̂0 = (x_t − σ_t ε̂)/α_t as mean `m_x x_t + m_e ε̂` and variance `v`.
    fn posterior(s: &dyn Schedule, t: f64, sn: f64) -> (f64, f64, f64) {
        let (at, st, as_, ss) = (s.alpha(t), s.sigma(t), s.alpha(sn), s.sigma(sn));
        let abar_ts = (at * at) / (as_ * as_);
        let beta_ts = 1.0 - abar_ts;
        let k0 = as_ * beta_ts / (st * st);
        let k1 = abar_ts.sqrt() * ss * ss / (st * st);
        (k1 + k0 / at, -k0 * st / at, ss * ss / (st * st) * beta_ts)
    }

    #[test]
    fn qit_inf_matches_the_ddpm_posterior_mean_and_variance() {
        // qit-inf runs DDIM with η = 1; compare its coefficients with the posterior
        // written independently above.
        let s = VpLinear::default();
        for &(t, sn) in &[(0.9, 0.8), (0.4, 0.1), (0.02, 0.001)] {
            let (a, b, c) = crate::samplers::ddim::ddim_eta_coefficients(&s, t, sn, 1.0);
            let (mx, me, v) = posterior(&s, t, sn);
            assert!((a - mx).abs() < 1e-9 * mx.abs());
            assert!((b - me).abs() < 1e-9 * (1.0 + me.abs()));
            assert!((c * c - v).abs() < 1e-9 * v);
            let (pa, pb, pc) = ddpm_coefficients(&s, t, sn, DdpmVariance::BetaTilde);
            assert!(
                (pa - mx).abs() < 1e-9 * mx.abs()
                    && (pb - me).abs() < 1e-9 * (1.0 + me.abs())
                    && (pc * pc - v).abs() < 1e-9 * v
            );
        }
    }

    /// One-step error of the mean (both coefficients) and of the variance against the
    /// exact SPA transition.
    fn one_step_errors(s: &dyn Schedule, t: f64, dt: f64, order: usize) -> (f64, f64) {
        let (mx, me, v) = posterior(s, t, t - dt);
        let (a, b, var) = if order == 1 {
            let (a, b, c) = em_coefficients(s, t, t - dt);
            (a, b, c * c)
        } else {
            let c = qit2_coefficients(s, t, t - dt);
            (c.a, c.b, c.c1 * c.c1 + c.c2 * c.c2)
        };
        ((a - mx).abs() + (b - me).abs(), (var - v).abs())
    }

    #[test]
    fn qit2_one_step_mean_and_variance_error_is_order_delta_cubed() {
        let s = VpLinear::default();
        for &t in &[0.8, 0.5, 0.2] {
            let dts = [0.008, 0.004, 0.002, 0.001];
            let (em, ev): (Vec<f64>, Vec<f64>) =
                dts.iter().map(|&d| one_step_errors(&s, t, d, 2)).unzip();
            let (sm, sv) = (fit_slope(&dts, &em), fit_slope(&dts, &ev));
            assert!(sm > 2.85, "t={t}: mean slope {sm} {em:?}");
            assert!(sv > 2.85, "t={t}: variance slope {sv} {ev:?}");
            // and order 1 (Euler–Maruyama) is only O(Δ²)
            let (em1, _): (Vec<f64>, Vec<f64>) =
                dts.iter().map(|&d| one_step_errors(&s, t, d, 1)).unzip();
            let s1 = fit_slope(&dts, &em1);
            assert!((s1 - 2.0).abs() < 0.15, "t={t}: EM mean slope {s1}");
        }
    }
}
