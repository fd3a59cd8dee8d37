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
//!
//! Variable: ς = σ/α (EDM's σ), infinite at pure noise: it does not start there.

use anyhow::Result;

use super::k_diffusion::{Churn, sample_k_heun, varsigma};
use super::{Backend, Ctx, reaches_zero};
use crate::schedule::Schedule;

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

/// EDM Heun with churn: k-diffusion's Heun ([`sample_k_heun`]) on the Karras grid between
/// the grid's end points. 2 NFE per step (1 for a final step to σ = 0).
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
    // The grid's own end points exactly, the levels between them on the schedule.
    let mut times = Vec::with_capacity(n + 1);
    for (i, &s) in sig.iter().enumerate() {
        times.push(match i {
            0 => ts[0],
            _ if i == n => ts[n],
            _ if zero && i == n - 1 => t_end,
            _ => sched.t_of_lambda(-s.ln())?,
        });
    }
    sample_k_heun(ctx, x, &times, churn)
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
