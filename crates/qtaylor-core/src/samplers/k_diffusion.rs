//! The σ-space family of k-diffusion's `sampling.py` (Crowson, v0.1.1; Karras et al. 2022,
//! "Elucidating the Design Space of Diffusion-Based Generative Models", arXiv 2206.00364,
//! Algorithm 2), run on any VP schedule: Euler, Euler ancestral, Heun, DPM2, DPM2
//! ancestral and linear multistep (LMS). diffusers' `EulerDiscreteScheduler`,
//! `EulerAncestralDiscreteScheduler`, `HeunDiscreteScheduler`, `KDPM2DiscreteScheduler`,
//! `KDPM2AncestralDiscreteScheduler` and `LMSDiscreteScheduler` are these algorithms.
//!
//! The variable is `ς = σ/α` (k-diffusion's σ) and the state `x̃ = x/α`, where the
//! probability-flow ODE reads `dx̃/dς = (x̃ − D(x̃; ς))/ς = ε̂`. The derivative `d` of
//! k-diffusion's `to_d` is therefore ε̂, and every update below is one linear combination
//! in x̃, taken back to the VP state `x = α x̃` at the step's end. With the grid
//! `ς_i = ς(t_i)`:
//!
//! ```text
//! churn:      ς̂ = ς_i (1 + γ),  γ = min(S_churn/N, √2 − 1) on S_tmin ≤ ς_i ≤ S_tmax,
//!             x̃ ← x̃ + √(ς̂² − ς_i²) S_noise z
//! Euler:      x̃' = x̃ + (ς' − ς̂) d
//! Heun:       x̃₂ = x̃ + (ς' − ς̂) d,  x̃' = x̃ + (ς' − ς̂)(d + d(x̃₂, ς'))/2   (Euler if ς' = 0)
//! DPM2:       ς_m = √(ς̂ ς'),  x̃₂ = x̃ + (ς_m − ς̂) d,  x̃' = x̃ + (ς' − ς̂) d(x̃₂, ς_m)
//! ancestral:  ς_up = min(ς', η √(ς'² (ς² − ς'²)/ς²)),  ς_down = √(ς'² − ς_up²),
//!             the step (Euler or DPM2) to ς_down, then x̃' += ς_up S_noise z  (if ς' > 0)
//! LMS (K):    x̃' = x̃ + Σ_{j<k} c_j d_{i−j},  c_j = ∫_{ς_i}^{ς_{i+1}} Π_{l≠j} (τ − ς_{i−l})/(ς_{i−j} − ς_{i−l}) dτ,
//!             k = min(i + 1, K)
//! ```
//!
//! Euler without churn is DDIM (η = 0). A step to ς = 0 is the first-order one (x̂0),
//! except LMS's, which integrates its polynomial down to 0 as k-diffusion does. The network
//! is called at `t(ς)` for the intermediate levels (ς̂, ς_m), found on the schedule
//! (a discrete schedule's network time there is diffusers' `_sigma_to_t`).
//!
//! Variable: ς = σ/α on the state x/α (k-diffusion's σ), infinite at pure noise. k-euler and
//! k-euler-a start there (their step from ς = ∞ tends to DDIM's, taken in x̂0); the two-stage
//! ones and LMS (a node at ς = ∞) do not.

use anyhow::Result;

use super::{Backend, Ctx, Options, pure_noise};
use crate::schedule::Schedule;

/// Karras' churn parameters (in ς = σ/α units), shared by Euler, Heun and DPM2.
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
pub fn varsigma(schedule: &dyn Schedule, t: f64) -> f64 {
    (-schedule.lambda(t)).exp()
}

/// The time at level ς > 0.
fn time_at(schedule: &dyn Schedule, s: f64) -> Result<f64> {
    schedule.t_of_lambda(-s.ln())
}

/// k-diffusion's `get_ancestral_step`: `(ς_down, ς_up)` from ς to ς' with η.
pub fn ancestral_step(from: f64, to: f64, eta: f64) -> (f64, f64) {
    if eta == 0.0 {
        return (to, 0.0);
    }
    let up = (eta * (to * to * (from * from - to * to) / (from * from)).sqrt()).min(to);
    ((to * to - up * up).max(0.0).sqrt(), up)
}

/// The coefficients `c_0 … c_{k−1}` of k-diffusion's `linear_multistep_coeff` at step i
/// (k = min(i + 1, order)): the integrals over `[ς_i, ς_{i+1}]` of the Lagrange basis on
/// `ς_i, ς_{i−1}, …`, integrated exactly (k-diffusion and diffusers use adaptive
/// quadrature, exact to rounding on these polynomials).
pub fn lms_coefficients(sig: &[f64], i: usize, order: usize) -> Vec<f64> {
    let k = order.min(i + 1);
    let (a, b) = (sig[i], sig[i + 1]);
    (0..k)
        .map(|j| {
            // The basis polynomial Π_{l≠j} (τ − ς_{i−l})/(ς_{i−j} − ς_{i−l}) in monomials.
            let mut poly = vec![1.0];
            for l in (0..k).filter(|&l| l != j) {
                let (root, den) = (sig[i - l], sig[i - j] - sig[i - l]);
                let mut next = vec![0.0; poly.len() + 1];
                for (p, c) in poly.iter().enumerate() {
                    next[p + 1] += c / den;
                    next[p] -= c * root / den;
                }
                poly = next;
            }
            poly.iter()
                .enumerate()
                .map(|(p, c)| {
                    let q = (p + 1) as i32;
                    c * (b.powi(q) - a.powi(q)) / q as f64
                })
                .sum()
        })
        .collect()
}

/// The churned level ς̂ of step i of n (capped at the schedule's largest ς).
fn churned(schedule: &dyn Schedule, s: f64, n: usize, churn: &Churn) -> f64 {
    let gamma = if churn.s_tmin <= s && s <= churn.s_tmax {
        (churn.s_churn / n as f64).min(2f64.sqrt() - 1.0)
    } else {
        0.0
    };
    let cap = varsigma(schedule, schedule.t_end());
    (s * (1.0 + gamma)).min(cap.max(s))
}

/// The state at (t_i, ς_i) moved to the churned level ς̂ with fresh noise; returns
/// (x̂, t̂, ς̂).
fn churn_up<B: Backend>(
    ctx: &mut Ctx<B>,
    x: B::X,
    t: f64,
    n: usize,
    churn: &Churn,
) -> Result<(B::X, f64, f64)> {
    let sched = ctx.schedule;
    let s = varsigma(sched, t);
    let s_hat = churned(sched, s, n, churn);
    if !(s_hat > s && churn.s_noise > 0.0) {
        return Ok((x, t, s));
    }
    let t_hat = time_at(sched, s_hat)?;
    let a_hat = sched.alpha(t_hat);
    let z = ctx.noise_like(&x)?;
    let x_hat = ctx.lc(&[
        (a_hat / sched.alpha(t), &x),
        (a_hat * (s_hat * s_hat - s * s).sqrt() * churn.s_noise, &z),
    ])?;
    Ok((x_hat, t_hat, s_hat))
}

/// The second-order samplers' shared body: Heun (`mid = false`) or DPM2 (`mid = true`).
fn sample_two_stage<B: Backend>(
    ctx: &mut Ctx<B>,
    mut x: B::X,
    ts: &[f64],
    churn: &Churn,
    mid: bool,
) -> Result<B::X> {
    let n = ts.len() - 1;
    let sched = ctx.schedule;
    for i in 0..n {
        ctx.begin_step(i, ts[i], &x)?;
        let (x_hat, t_hat, s_hat) = churn_up(ctx, x, ts[i], n, churn)?;
        let a_hat = sched.alpha(t_hat);
        let (s_next, a_next) = (varsigma(sched, ts[i + 1]), sched.alpha(ts[i + 1]));
        let d = ctx.denoise(&x_hat, t_hat)?.eps;
        if s_next == 0.0 {
            x = ctx.lc(&[(a_next / a_hat, &x_hat), (-a_next * s_hat, &d)])?;
            continue;
        }
        let (t2, s2) = if mid {
            let s_mid = (s_hat * s_next).sqrt();
            (time_at(sched, s_mid)?, s_mid)
        } else {
            (ts[i + 1], s_next)
        };
        let a2 = sched.alpha(t2);
        let x2 = ctx.lc(&[(a2 / a_hat, &x_hat), (a2 * (s2 - s_hat), &d)])?;
        let d2 = ctx.denoise(&x2, t2)?.eps;
        let h = a_next * (s_next - s_hat);
        x = if mid {
            ctx.lc(&[(a_next / a_hat, &x_hat), (h, &d2)])?
        } else {
            ctx.lc(&[(a_next / a_hat, &x_hat), (0.5 * h, &d), (0.5 * h, &d2)])?
        };
    }
    Ok(x)
}

/// Euler in ς with churn (k-diffusion `sample_euler`): 1 NFE per step.
pub fn sample_k_euler<B: Backend>(
    ctx: &mut Ctx<B>,
    mut x: B::X,
    ts: &[f64],
    churn: &Churn,
) -> Result<B::X> {
    let n = ts.len() - 1;
    let sched = ctx.schedule;
    for i in 0..n {
        ctx.begin_step(i, ts[i], &x)?;
        let (x_hat, t_hat, s_hat) = churn_up(ctx, x, ts[i], n, churn)?;
        if pure_noise(sched, t_hat) {
            // ς = ∞ (rectified flow's ς = 1; churn is capped there): x/α + (ς' − ς) ε̂ tends
            // to x̂0 + ς' ε̂, DDIM's step, written in x̂0
            let den = ctx.denoise(&x_hat, t_hat)?;
            let (a_next, s_next) = (sched.alpha(ts[i + 1]), sched.sigma(ts[i + 1]));
            x = ctx.lc(&[(a_next, &den.x0), (s_next, &den.eps)])?;
            continue;
        }
        let d = ctx.denoise(&x_hat, t_hat)?.eps;
        let (s_next, a_next) = (varsigma(sched, ts[i + 1]), sched.alpha(ts[i + 1]));
        x = ctx.lc(&[
            (a_next / sched.alpha(t_hat), &x_hat),
            (a_next * (s_next - s_hat), &d),
        ])?;
    }
    Ok(x)
}

/// Heun in ς with churn (k-diffusion `sample_heun`, EDM Algorithm 2): 2 NFE per step, 1
/// for a step to ς = 0.
pub fn sample_k_heun<B: Backend>(
    ctx: &mut Ctx<B>,
    x: B::X,
    ts: &[f64],
    churn: &Churn,
) -> Result<B::X> {
    sample_two_stage(ctx, x, ts, churn, false)
}

/// DPM2 in ς with churn (k-diffusion `sample_dpm_2`: the midpoint at the geometric mean
/// of ς̂ and ς'): 2 NFE per step, 1 for a step to ς = 0.
pub fn sample_k_dpm2<B: Backend>(
    ctx: &mut Ctx<B>,
    x: B::X,
    ts: &[f64],
    churn: &Churn,
) -> Result<B::X> {
    sample_two_stage(ctx, x, ts, churn, true)
}

/// Euler ancestral (`mid = false`) or DPM2 ancestral (`mid = true`) with η and S_noise.
pub fn sample_k_ancestral<B: Backend>(
    ctx: &mut Ctx<B>,
    mut x: B::X,
    ts: &[f64],
    eta: f64,
    s_noise: f64,
    mid: bool,
) -> Result<B::X> {
    let n = ts.len() - 1;
    let sched = ctx.schedule;
    for i in 0..n {
        ctx.begin_step(i, ts[i], &x)?;
        let (s, a) = (varsigma(sched, ts[i]), sched.alpha(ts[i]));
        let (s_next, a_next) = (varsigma(sched, ts[i + 1]), sched.alpha(ts[i + 1]));
        if !mid && pure_noise(sched, ts[i]) {
            // Euler ancestral from ς = ∞: ς_up → min(η ς', ς'), ς_down = √(ς'² − ς_up²), and
            // x/α + (ς_down − ς) ε̂ → x̂0 + ς_down ε̂ (DDIM with η from pure noise)
            let den = ctx.denoise(&x, ts[i])?;
            let up = (eta * s_next).min(s_next);
            let down = (s_next * s_next - up * up).max(0.0).sqrt();
            x = if up > 0.0 && s_noise > 0.0 && s_next > 0.0 {
                let z = ctx.noise_like(&x)?;
                ctx.lc(&[
                    (a_next, &den.x0),
                    (a_next * down, &den.eps),
                    (a_next * up * s_noise, &z),
                ])?
            } else {
                ctx.lc(&[(a_next, &den.x0), (a_next * down, &den.eps)])?
            };
            continue;
        }
        let d = ctx.denoise(&x, ts[i])?.eps;
        let (down, up) = ancestral_step(s, s_next, eta);
        let slope = if mid && down > 0.0 {
            let s_mid = (s * down).sqrt();
            let t_mid = time_at(sched, s_mid)?;
            let a_mid = sched.alpha(t_mid);
            let x2 = ctx.lc(&[(a_mid / a, &x), (a_mid * (s_mid - s), &d)])?;
            ctx.denoise(&x2, t_mid)?.eps
        } else {
            d
        };
        // k-diffusion adds the noise after Euler's step whenever ς' > 0, after DPM2's only
        // when it took the midpoint (ς_down > 0).
        let noisy = up > 0.0 && s_noise > 0.0 && if mid { down > 0.0 } else { s_next > 0.0 };
        x = if noisy {
            let z = ctx.noise_like(&x)?;
            ctx.lc(&[
                (a_next / a, &x),
                (a_next * (down - s), &slope),
                (a_next * up * s_noise, &z),
            ])?
        } else {
            ctx.lc(&[(a_next / a, &x), (a_next * (down - s), &slope)])?
        };
    }
    Ok(x)
}

/// Linear multistep of order K in ς (k-diffusion `sample_lms`, diffusers'
/// `LMSDiscreteScheduler`): 1 NFE per step, the order rising from 1 over the first steps.
pub fn sample_k_lms<B: Backend>(
    ctx: &mut Ctx<B>,
    mut x: B::X,
    ts: &[f64],
    order: usize,
) -> Result<B::X> {
    let n = ts.len() - 1;
    let sched = ctx.schedule;
    let sig: Vec<f64> = ts.iter().map(|&t| varsigma(sched, t)).collect();
    let mut ds: Vec<B::X> = Vec::new();
    for i in 0..n {
        ctx.begin_step(i, ts[i], &x)?;
        let d = ctx.denoise(&x, ts[i])?.eps;
        ds.push(d);
        if ds.len() > order {
            ds.remove(0);
        }
        let (a, a_next) = (sched.alpha(ts[i]), sched.alpha(ts[i + 1]));
        let c = lms_coefficients(&sig, i, order);
        let mut terms: Vec<(f64, &B::X)> = vec![(a_next / a, &x)];
        for (j, cj) in c.iter().enumerate() {
            terms.push((a_next * cj, &ds[ds.len() - 1 - j]));
        }
        x = ctx.lc(&terms)?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lms_coefficients_integrate_polynomials_up_to_their_order_exactly() {
        // Σ_j c_j p(ς_{i−j}) = ∫ p over the step for every polynomial p of degree < k.
        let sig = [14.6, 9.0, 5.5, 3.1, 1.7, 0.9, 0.3, 0.0];
        for i in 0..sig.len() - 1 {
            for order in 1..=4 {
                let c = lms_coefficients(&sig, i, order);
                let k = order.min(i + 1);
                assert_eq!(c.len(), k);
                for deg in 0..k as i32 {
                    let got: f64 = c
                        .iter()
                        .enumerate()
                        .map(|(j, cj)| cj * sig[i - j].powi(deg))
                        .sum();
                    let want = (sig[i + 1].powi(deg + 1) - sig[i].powi(deg + 1)) / (deg + 1) as f64;
                    assert!(
                        (got - want).abs() < 1e-11 * (1.0 + want.abs()),
                        "i {i} order {order} degree {deg}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn ancestral_step_keeps_the_variance_of_the_target_level() {
        // ς_down² + ς_up² = ς'² for η ≤ 1; η = 0 is the deterministic step.
        for (from, to) in [(14.6f64, 9.0f64), (1.0, 0.2), (0.5, 0.0)] {
            for eta in [0.0, 0.5, 1.0] {
                let (d, u) = ancestral_step(from, to, eta);
                assert!((d * d + u * u - to * to).abs() < 1e-12 * (1.0 + to * to));
                assert!(u <= to && d <= to);
            }
            assert_eq!(ancestral_step(from, to, 0.0), (to, 0.0));
        }
        // η = 1: the variance of the VE posterior q(x_ς' | x_ς, x0).
        let (from, to) = (2.0f64, 1.0f64);
        let (_, u) = ancestral_step(from, to, 1.0);
        assert!((u * u - to * to * (from * from - to * to) / (from * from)).abs() < 1e-14);
    }
}
