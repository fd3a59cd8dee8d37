//! DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12) and
//! DDPM ancestral sampling (Ho, Jain & Abbeel 2020, eq. 6–7) on an arbitrary time grid.
//!
//! DDIM, from t to s with x̂0 = (x_t − σ_t ε̂)/α_t:
//!
//! ```text
//! x_s = α_s x̂0 + sqrt(1 − α_s² − c²) ε̂ + c z,
//! c = η · sqrt((1 − ᾱ_s)/(1 − ᾱ_t)) · sqrt(1 − ᾱ_t/ᾱ_s)
//! ```
//!
//! η = 0 is the exact solution of the probability-flow ODE under the single point
//! approximation; η = 1 is the DDPM posterior `q(x_s | x_t, x̂0)`.
//!
//! DDPM, posterior mean with `ᾱ_{t|s} = ᾱ_t/ᾱ_s`, `β_{t|s} = 1 − ᾱ_{t|s}`:
//!
//! ```text
//! μ̃ = α_s β_{t|s}/σ_t² · x̂0 + sqrt(ᾱ_{t|s}) σ_s²/σ_t² · x_t,   x_s = μ̃ + c z,
//! c² = β̃ = σ_s²/σ_t² · β_{t|s}  (beta-tilde)   or   c² = β_{t|s}  (beta).
//! ```
//!
//! Variable: none to integrate: the step is the closed form in α and σ at the grid's two
//! times (exact under the SPA in any time variable). From pure noise (α_t = 0, rectified
//! flow's ς = 1) it is written in x̂0.

use anyhow::Result;

use super::{Backend, Ctx, DdpmVariance, pure_noise, reaches_zero};
use crate::schedule::Schedule;

/// `(A, B)` of the deterministic DDIM step `x_s = A x_t + B ε̂`:
/// `A = α_s/α_t`, `B = σ_s − α_s σ_t/α_t`.
pub fn ddim_coefficients(schedule: &dyn Schedule, t: f64, s: f64) -> (f64, f64) {
    let (a, b, _) = ddim_eta_coefficients(schedule, t, s, 0.0);
    (a, b)
}

/// `(K₀, K_ε, C)` of the DDIM step with η written in x̂0: `x_s = K₀ x̂0 + K_ε ε̂ + C z` with
/// `K₀ = α_s`, `K_ε = √(σ_s² − C²)` (finite at pure noise, α_t = 0).
pub fn ddim_x0_coefficients(schedule: &dyn Schedule, t: f64, s: f64, eta: f64) -> (f64, f64, f64) {
    let st = schedule.sigma(t);
    let (as_, ss) = (schedule.alpha(s), schedule.sigma(s));
    // 1 − ᾱ_t/ᾱ_s without cancellation.
    let beta_ts = -(schedule.log_alpha_bar(t) - schedule.log_alpha_bar(s)).exp_m1();
    let c = eta * (ss / st) * beta_ts.sqrt();
    (as_, (ss * ss - c * c).max(0.0).sqrt(), c)
}

/// `(A, B, C)` of the DDIM step with η: `x_s = A x_t + B ε̂ + C z` (x̂0 = (x_t − σ_t ε̂)/α_t in
/// [`ddim_x0_coefficients`]: `A = K₀/α_t`, `B = K_ε − K₀ σ_t/α_t`).
pub fn ddim_eta_coefficients(schedule: &dyn Schedule, t: f64, s: f64, eta: f64) -> (f64, f64, f64) {
    let (at, st) = (schedule.alpha(t), schedule.sigma(t));
    let (as_, dir, c) = ddim_x0_coefficients(schedule, t, s, eta);
    (as_ / at, dir - as_ * st / at, c)
}

/// `(K₀, K_x, C)` of DDPM's ancestral step written in x̂0: `x_s = K₀ x̂0 + K_x x_t + C z`,
/// the posterior mean's two terms and the standard deviation of `variance` (finite at pure
/// noise, where `K_x = 0`).
pub fn ddpm_x0_coefficients(
    schedule: &dyn Schedule,
    t: f64,
    s: f64,
    variance: DdpmVariance,
) -> (f64, f64, f64) {
    let st = schedule.sigma(t);
    let (as_, ss) = (schedule.alpha(s), schedule.sigma(s));
    let log_ratio = schedule.log_alpha_bar(t) - schedule.log_alpha_bar(s);
    let beta_ts = -log_ratio.exp_m1();
    let k0 = as_ * beta_ts / (st * st); // coefficient of x̂0
    let k1 = (0.5 * log_ratio).exp() * ss * ss / (st * st); // coefficient of x_t
    let var = match variance {
        DdpmVariance::BetaTilde => ss * ss / (st * st) * beta_ts,
        DdpmVariance::Beta => beta_ts,
    };
    (k0, k1, var.sqrt())
}

/// `(A, B, C)` of DDPM's ancestral step `x_s = μ̃ + C z`, `μ̃ = A x_t + B ε̂`
/// ([`ddpm_x0_coefficients`] with x̂0 = (x_t − σ_t ε̂)/α_t).
pub fn ddpm_coefficients(
    schedule: &dyn Schedule,
    t: f64,
    s: f64,
    variance: DdpmVariance,
) -> (f64, f64, f64) {
    let (at, st) = (schedule.alpha(t), schedule.sigma(t));
    let (k0, k1, c) = ddpm_x0_coefficients(schedule, t, s, variance);
    (k1 + k0 / at, -k0 * st / at, c)
}

/// DDIM with η (η = 0: deterministic; one NFE per step).
pub fn sample_ddim<B: Backend>(
    ctx: &mut Ctx<B>,
    mut x: B::X,
    ts: &[f64],
    eta: f64,
) -> Result<B::X> {
    for i in 0..ts.len() - 1 {
        let (t, s) = (ts[i], ts[i + 1]);
        ctx.begin_step(i, t, &x)?;
        let d = ctx.denoise(&x, t)?;
        if reaches_zero(ctx.schedule, s) {
            x = d.x0;
            continue;
        }
        if pure_noise(ctx.schedule, t) {
            // α_t = 0 (ς = 1): A x_t + B ε̂ is ∞ − ∞; the step in x̂0 is the same formula
            let (a_s, dir, c) = ddim_x0_coefficients(ctx.schedule, t, s, eta);
            x = if c > 0.0 {
                let z = ctx.noise_like(&x)?;
                ctx.lc(&[(a_s, &d.x0), (dir, &d.eps), (c, &z)])?
            } else {
                ctx.lc(&[(a_s, &d.x0), (dir, &d.eps)])?
            };
            continue;
        }
        let (a, b, c) = ddim_eta_coefficients(ctx.schedule, t, s, eta);
        x = if c > 0.0 {
            let z = ctx.noise_like(&x)?;
            ctx.lc(&[(a, &x), (b, &d.eps), (c, &z)])?
        } else {
            ctx.lc(&[(a, &x), (b, &d.eps)])?
        };
    }
    Ok(x)
}

/// DDPM ancestral sampling on the grid (one NFE per step).
pub fn sample_ddpm<B: Backend>(
    ctx: &mut Ctx<B>,
    mut x: B::X,
    ts: &[f64],
    variance: DdpmVariance,
) -> Result<B::X> {
    for i in 0..ts.len() - 1 {
        let (t, s) = (ts[i], ts[i + 1]);
        ctx.begin_step(i, t, &x)?;
        let d = ctx.denoise(&x, t)?;
        if reaches_zero(ctx.schedule, s) {
            x = d.x0;
            continue;
        }
        if pure_noise(ctx.schedule, t) {
            // α_t = 0: ᾱ_{t|s} = 0, so μ̃ = α_s x̂0 (K_x = 0), written in x̂0
            let (k0, _, c) = ddpm_x0_coefficients(ctx.schedule, t, s, variance);
            let z = ctx.noise_like(&x)?;
            x = ctx.lc(&[(k0, &d.x0), (c, &z)])?;
            continue;
        }
        let (a, b, c) = ddpm_coefficients(ctx.schedule, t, s, variance);
        let z = ctx.noise_like(&x)?;
        x = ctx.lc(&[(a, &x), (b, &d.eps), (c, &z)])?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::VpLinear;

    #[test]
    fn ddim_with_eta_one_equals_the_ddpm_posterior() {
        let s = VpLinear::default();
        for &(t, sn) in &[(1.0, 0.9), (0.5, 0.3), (0.05, 0.001)] {
            let (a, b, c) = ddim_eta_coefficients(&s, t, sn, 1.0);
            let (pa, pb, pc) = ddpm_coefficients(&s, t, sn, DdpmVariance::BetaTilde);
            for (u, v) in [(a, pa), (b, pb), (c, pc)] {
                assert!(
                    (u - v).abs() < 1e-10 * (1.0 + v.abs()),
                    "{t}->{sn}: {u} vs {v}"
                );
            }
        }
    }

    #[test]
    fn at_pure_noise_the_x0_forms_are_the_limits_of_the_steps_just_below_it() {
        // rectified flow at ς = 1: α_t = 0; just below, the x̂0 forms are continuous in t
        let f = crate::schedule::Flow::new(3.0).unwrap();
        let s = 0.7;
        for eta in [0.0, 0.5, 1.0] {
            let at = ddim_x0_coefficients(&f, 1.0, s, eta);
            let near = ddim_x0_coefficients(&f, 1.0 - 1e-9, s, eta);
            for (u, v) in [(at.0, near.0), (at.1, near.1), (at.2, near.2)] {
                assert!(u.is_finite() && (u - v).abs() < 1e-6, "η {eta}: {u} vs {v}");
            }
        }
        for var in [DdpmVariance::BetaTilde, DdpmVariance::Beta] {
            let at = ddpm_x0_coefficients(&f, 1.0, s, var);
            let near = ddpm_x0_coefficients(&f, 1.0 - 1e-9, s, var);
            assert_eq!(at.1, 0.0);
            for (u, v) in [(at.0, near.0), (at.1, near.1), (at.2, near.2)] {
                assert!(u.is_finite() && (u - v).abs() < 1e-6, "{var:?}: {u} vs {v}");
            }
        }
        // β̃ is DDIM with η = 1; the β variance is 1 there (ᾱ_t/ᾱ_s = 0)
        let tilde = ddpm_x0_coefficients(&f, 1.0, s, DdpmVariance::BetaTilde);
        assert!((tilde.2 - f.sigma(s)).abs() < 1e-15);
        assert_eq!(ddpm_x0_coefficients(&f, 1.0, s, DdpmVariance::Beta).2, 1.0);
    }

    #[test]
    fn ddpm_beta_variance_is_one_minus_the_alpha_bar_ratio() {
        let s = VpLinear::default();
        let (t, sn) = (0.5, 0.45);
        let (_, _, c) = ddpm_coefficients(&s, t, sn, DdpmVariance::Beta);
        assert!((c * c - (1.0 - s.alpha_bar(t) / s.alpha_bar(sn))).abs() < 1e-14);
    }
}
