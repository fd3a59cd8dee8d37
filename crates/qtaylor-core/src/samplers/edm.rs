//! The EDM sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
//! Generative Models", arXiv 2206.00364, Algorithm 2), run on a VP model.
//!
//! It works in the variance-exploding coordinates `x̃ = x/α`, `ς = σ/α` (so `λ = −ln ς`),
//! where the probability-flow ODE is `dx̃/dς = (x̃ − D(x̃; ς))/ς = ε̂`, on its own grid
//! (`--grid` is ignored): Karras' ρ = 7 spacing between ς(t_max) and ς(t_min),
//!
//! ```text
//! ς_i = (ς_max^{1/ρ} + i/N (ς_min^{1/ρ} − ς_max^{1/ρ}))^ρ,   i = 0 … N,
//! ```
//!
//! ending at ς = 0 instead when the grid ends at σ = 0. Per step, with
//! `γ = min(S_churn/N, √2 − 1)` for `S_tmin ≤ ς_i ≤ S_tmax` (else 0):
//!
//! ```text
//! ς̂ = ς_i (1 + γ),   x̂ = x̃ + √(ς̂² − ς_i²) S_noise z
//! d = ε̂(x̂, ς̂),  x̃' = x̂ + (ς_{i+1} − ς̂) d
//! if ς_{i+1} > 0:  d' = ε̂(x̃', ς_{i+1}),  x̃ = x̂ + (ς_{i+1} − ς̂)(d + d')/2   (Heun, 2 NFE)
//! else:            x̃ = x̃'  (= x̂0, Euler, 1 NFE)
//! ```
//!
//! ς̂ is capped at ς(t_max) (the schedule cannot go noisier). S_churn = 0 is the
//! deterministic Heun sampler.

use anyhow::Result;

use super::{Backend, Ctx, Options, reaches_zero};
use crate::schedule::Schedule;

/// EDM's stochasticity parameters (in ς = σ/α units).
#[derive(Clone, Debug)]
pub struct Churn {
    pub s_churn: f64,
    pub s_tmin: f64,
    pub s_tmax: f64,
    pub s_noise: f64,
}

impl From<&Options> for Churn {
    fn from(o: &Options) -> Self {
        Churn {
            s_churn: o.s_churn,
            s_tmin: o.s_tmin,
            s_tmax: o.s_tmax,
            s_noise: o.s_noise,
        }
    }
}

/// `ς = σ/α` at t.
fn varsigma(schedule: &dyn Schedule, t: f64) -> f64 {
    (-schedule.lambda(t)).exp()
}

/// The Karras ρ = 7 grid of N steps in ς, from `t_max` to `t_end` (or to 0).
pub fn karras_sigmas(
    schedule: &dyn Schedule,
    t_max: f64,
    t_end: f64,
    steps: usize,
    to_zero: bool,
) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let (hi, lo) = (varsigma(schedule, t_max), varsigma(schedule, t_end));
    let n = if to_zero { steps - 1 } else { steps };
    let mut s: Vec<f64> = (0..=n)
        .map(|i| {
            let f = if n == 0 { 0.0 } else { i as f64 / n as f64 };
            (hi.powf(1.0 / RHO) + f * (lo.powf(1.0 / RHO) - hi.powf(1.0 / RHO))).powf(RHO)
        })
        .collect();
    s[0] = hi;
    s[n] = lo;
    if to_zero {
        s.push(0.0);
    }
    s
}

/// ε̂ at VE state `xv` and ς (one NFE); returns (ε̂, x̂0 in VE units = x̂0).
fn denoise_ve<B: Backend>(ctx: &mut Ctx<B>, xv: &B::X, sig: f64) -> Result<(B::X, B::X)> {
    let t = ctx.schedule.t_of_lambda(-sig.ln())?;
    let alpha = ctx.schedule.alpha(t);
    let x = ctx.lc(&[(alpha, xv)])?;
    let d = ctx.denoise(&x, t)?;
    Ok((d.eps, d.x0))
}

/// EDM Heun with churn: 2 NFE per step (1 for a final step to σ = 0).
pub fn sample_edm_heun<B: Backend>(
    ctx: &mut Ctx<B>,
    x: B::X,
    ts: &[f64],
    churn: &Churn,
) -> Result<B::X> {
    let n = ts.len() - 1;
    let sched = ctx.schedule;
    let zero = reaches_zero(sched, ts[n]);
    let t_end = if zero { ts[n - 1] } else { ts[n] };
    let sig = karras_sigmas(sched, ts[0], t_end, n, zero);
    let sig_cap = varsigma(sched, sched.t_end());
    let mut xv = ctx.lc(&[(1.0 / sched.alpha(ts[0]), &x)])?;
    for i in 0..n {
        ctx.begin_step(i, ts[i], &x)?;
        let (si, sn) = (sig[i], sig[i + 1]);
        let gamma = if churn.s_tmin <= si && si <= churn.s_tmax {
            (churn.s_churn / n as f64).min(2f64.sqrt() - 1.0)
        } else {
            0.0
        };
        let s_hat = (si * (1.0 + gamma)).min(sig_cap.max(si));
        let x_hat = if s_hat > si && churn.s_noise > 0.0 {
            let z = ctx.noise_like(&xv)?;
            ctx.lc(&[
                (1.0, &xv),
                ((s_hat * s_hat - si * si).sqrt() * churn.s_noise, &z),
            ])?
        } else {
            xv.clone()
        };
        let (d, x0) = denoise_ve(ctx, &x_hat, s_hat)?;
        if sn == 0.0 {
            xv = x0;
            continue;
        }
        let x_euler = ctx.lc(&[(1.0, &x_hat), (sn - s_hat, &d)])?;
        let (d2, _) = denoise_ve(ctx, &x_euler, sn)?;
        xv = ctx.lc(&[
            (1.0, &x_hat),
            (0.5 * (sn - s_hat), &d),
            (0.5 * (sn - s_hat), &d2),
        ])?;
    }
    ctx.lc(&[(sched.alpha(ts[n]), &xv)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::VpLinear;

    #[test]
    fn karras_grid_runs_between_the_end_points_with_rho_seven_spacing() {
        let s = VpLinear::default();
        let g = karras_sigmas(&s, 1.0, 1e-3, 10, false);
        assert_eq!(g.len(), 11);
        assert_eq!(g[0], varsigma(&s, 1.0));
        assert_eq!(g[10], varsigma(&s, 1e-3));
        let r: Vec<f64> = g.iter().map(|v| v.powf(1.0 / 7.0)).collect();
        for w in r.windows(2) {
            assert!((w[1] - w[0] - (r[1] - r[0])).abs() < 1e-12);
        }
        let z = karras_sigmas(&s, 1.0, 1e-3, 10, true);
        assert_eq!(z.len(), 11);
        assert_eq!(z[10], 0.0);
        assert_eq!(z[9], varsigma(&s, 1e-3));
    }
}
