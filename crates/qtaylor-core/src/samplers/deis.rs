//! DEIS, the tAB variant (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with
//! Exponential Integrator", arXiv 2204.13902, eq. 14 and Alg. 1).
//!
//! The probability-flow ODE in `v = x/α`, `ρ = σ/α` is `dv/dρ = ε̂`, so exactly
//!
//! ```text
//! x_{i+1} = (α_{i+1}/α_i) x_i + α_{i+1} ∫_{t_i}^{t_{i+1}} ε̂(τ) ρ'(τ) dτ,   ρ' = β/(2ασ).
//! ```
//!
//! tAB replaces ε̂(τ) by the Lagrange polynomial in t through the last r + 1 outputs
//! ε_i, ε_{i−1}, …, so `x_{i+1} = (α_{i+1}/α_i) x_i + Σ_j C_ij ε_{i−j}` with
//! `C_ij = α_{i+1} ∫ ℓ_j(τ) ρ'(τ) dτ`. The reference code integrates in t with a 10 000-point
//! Riemann sum; here 32-point Gauss–Legendre quadrature in ln ρ, where the integrand is
//! smooth (to about 1e-14 per step). Order 1 is DDIM. The order warms up 1, 2, …; with
//! `lower_order_final` and fewer than 15 steps it drops to 2, 1 at the end (diffusers).
//!
//! The log-ρ variant (diffusers' `DEISMultistepScheduler`, `solver_type="logrho"`) takes the
//! Lagrange polynomial in `u = ln ρ` through the same outputs and integrates it in ρ:
//! `x_{i+1}/α_{i+1} = x_i/α_i + Σ_j ε_{i−j} ∫_{ρ_i}^{ρ_{i+1}} ℓ_j(ln ρ) dρ`, the integral by
//! the same quadrature in u (`dρ = e^u du`; exact to rounding for these polynomial × e^u).
//!
//! Variable: `deis-K` integrates in t (the paper's tAB); `deis-logrho-K` interpolates in ln
//! ρ and integrates in ρ = σ/α. ρ is infinite at pure noise, so neither starts there.

use anyhow::Result;

use super::dpm_solver_pp::multistep_order;
use super::{Backend, Ctx, reaches_zero};
use crate::schedule::Schedule;

/// Nodes and weights of n-point Gauss–Legendre quadrature on [−1, 1] (Newton iteration on
/// the Legendre polynomial from Tricomi's initial guesses).
pub fn gauss_legendre(n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut nodes = vec![0.0; n];
    let mut weights = vec![0.0; n];
    for i in 0..n {
        let mut x = (std::f64::consts::PI * (i as f64 + 0.75) / (n as f64 + 0.5)).cos();
        let mut dp = 0.0;
        for _ in 0..100 {
            // P_n(x) and P_n'(x) by the three-term recurrence.
            let (mut p0, mut p1) = (1.0, x);
            for k in 2..=n {
                let p2 = ((2 * k - 1) as f64 * x * p1 - (k - 1) as f64 * p0) / k as f64;
                p0 = p1;
                p1 = p2;
            }
            dp = n as f64 * (x * p1 - p0) / (x * x - 1.0);
            let dx = p1 / dp;
            x -= dx;
            if dx.abs() < 1e-16 {
                break;
            }
        }
        nodes[i] = x;
        weights[i] = 2.0 / ((1.0 - x * x) * dp * dp);
    }
    (nodes, weights)
}

/// `C_j = α_s ∫_t^s ℓ_j(τ) ρ'(τ) dτ` for the Lagrange basis on `nodes` (newest first),
/// integrated in `u = ln ρ = −λ` (`dρ = ρ du`), where the integrand is smooth even for steps
/// that reach small t (in t, ρ' grows like t^{−1/2}).
pub fn tab_coefficients(schedule: &dyn Schedule, t: f64, s: f64, nodes: &[f64]) -> Vec<f64> {
    let (gx, gw) = gauss_legendre(32);
    let (u0, u1) = (-schedule.lambda(t), -schedule.lambda(s));
    let (mid, half) = (0.5 * (u0 + u1), 0.5 * (u1 - u0));
    let alpha_s = schedule.alpha(s);
    // Quadrature nodes in u, their times and ρ = e^u.
    let pts: Vec<(f64, f64, f64)> = gx
        .iter()
        .zip(&gw)
        .map(|(&x, &w)| {
            let u = mid + half * x;
            let tau = schedule
                .t_of_lambda(-u)
                .unwrap_or(if x < 0.0 { t } else { s });
            (w, tau, u.exp())
        })
        .collect();
    (0..nodes.len())
        .map(|j| {
            let basis = |tau: f64| {
                nodes
                    .iter()
                    .enumerate()
                    .filter(|&(k, _)| k != j)
                    .map(|(_, &tk)| (tau - tk) / (nodes[j] - tk))
                    .product::<f64>()
            };
            let integral: f64 = pts.iter().map(|&(w, tau, rho)| w * basis(tau) * rho).sum();
            alpha_s * half * integral
        })
        .collect()
}

/// `C_j = α_s ∫_{ρ(t)}^{ρ(s)} ℓ_j(ln ρ) dρ` for the Lagrange basis in `u = ln ρ` on the
/// times `nodes` (newest first): diffusers' DEIS coefficients (its closed-form `ind_fn`),
/// by 32-point Gauss–Legendre in u. A step to ρ = 0 (σ = 0) integrates to ρ = 0 (ρ ℓ(ln ρ)
/// → 0), its lower end taken where e^u is below f64 resolution of ρ(t).
pub fn logrho_coefficients(schedule: &dyn Schedule, t: f64, s: f64, nodes: &[f64]) -> Vec<f64> {
    let (gx, gw) = gauss_legendre(32);
    let u_of = |tau: f64| -schedule.lambda(tau);
    let u0 = u_of(t);
    let u1 = if schedule.sigma(s) > 0.0 {
        u_of(s)
    } else {
        u0 - 60.0
    };
    let (mid, half) = (0.5 * (u0 + u1), 0.5 * (u1 - u0));
    let us: Vec<f64> = nodes.iter().map(|&tk| u_of(tk)).collect();
    (0..nodes.len())
        .map(|j| {
            let basis = |u: f64| {
                us.iter()
                    .enumerate()
                    .filter(|&(k, _)| k != j)
                    .map(|(_, &uk)| (u - uk) / (us[j] - uk))
                    .product::<f64>()
            };
            let integral: f64 = gx
                .iter()
                .zip(&gw)
                .map(|(&x, &w)| {
                    let u = mid + half * x;
                    w * basis(u) * u.exp()
                })
                .sum();
            schedule.alpha(s) * half * integral
        })
        .collect()
}

/// Which DEIS: tAB (Lagrange in t) or diffusers' log-ρ form.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Variant {
    TAb,
    LogRho,
}

/// DEIS of `order` (1 NFE per step), tAB or log-ρ.
pub fn sample_deis<B: Backend>(
    ctx: &mut Ctx<B>,
    mut x: B::X,
    ts: &[f64],
    order: usize,
    lower_order_final: bool,
    variant: Variant,
) -> Result<B::X> {
    let n = ts.len() - 1;
    // (t, ε) of the last `order` grid points, newest first.
    let mut hist: Vec<(f64, B::X)> = Vec::with_capacity(order);
    for i in 0..n {
        let (t, s) = (ts[i], ts[i + 1]);
        ctx.begin_step(i, t, &x)?;
        let d = ctx.denoise(&x, t)?;
        if reaches_zero(ctx.schedule, s) {
            x = d.x0;
            continue;
        }
        hist.insert(0, (t, d.eps));
        hist.truncate(order);
        let k = multistep_order(order, i, n, hist.len(), lower_order_final);
        let nodes: Vec<f64> = hist[..k].iter().map(|(t, _)| *t).collect();
        let c = match variant {
            Variant::TAb => tab_coefficients(ctx.schedule, t, s, &nodes),
            Variant::LogRho => logrho_coefficients(ctx.schedule, t, s, &nodes),
        };
        let ratio = ctx.schedule.alpha(s) / ctx.schedule.alpha(t);
        let mut terms: Vec<(f64, &B::X)> = vec![(ratio, &x)];
        terms.extend(c.iter().copied().zip(hist[..k].iter().map(|(_, e)| e)));
        x = ctx.lc(&terms)?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samplers::ddim::ddim_coefficients;
    use crate::schedule::VpLinear;

    #[test]
    fn gauss_legendre_integrates_polynomials_exactly() {
        let (x, w) = gauss_legendre(8);
        for p in 0..16 {
            let q: f64 = x.iter().zip(&w).map(|(x, w)| w * x.powi(p)).sum();
            let want = if p % 2 == 1 {
                0.0
            } else {
                2.0 / (p as f64 + 1.0)
            };
            assert!((q - want).abs() < 1e-14, "x^{p}: {q} vs {want}");
        }
    }

    #[test]
    fn deis_order_one_coefficient_is_ddim() {
        // C₀ = α_s (ρ_s − ρ_t) = σ_s − α_s σ_t/α_t, DDIM's ε coefficient.
        let s = VpLinear::default();
        for &(t, sn) in &[(1.0, 0.9), (0.5, 0.3), (0.05, 0.01), (1.0, 1e-3)] {
            let c = tab_coefficients(&s, t, sn, &[t]);
            let (_, b) = ddim_coefficients(&s, t, sn);
            assert!(
                (c[0] - b).abs() < 1e-11 * (1.0 + b.abs()),
                "{t}->{sn}: {} vs {b}",
                c[0]
            );
        }
    }

    #[test]
    fn logrho_coefficients_equal_the_closed_form_antiderivatives() {
        // diffusers' DEIS integrates the Lagrange basis in ln ρ against dρ in closed form:
        // order 2, ∫ (ln ρ − ln c)/(ln b − ln c) dρ = ρ (ln ρ − ln c − 1)/(ln b − ln c); order 3,
        // ∫ (ln ρ − ln c)(ln ρ − ln d) dρ / ((ln b − ln c)(ln b − ln d)) = ρ [(ln ρ − ln c)(ln ρ −
        // ln d) − (2 ln ρ − ln c − ln d) + 2] / (…). Order 1 is DDIM.
        let s = VpLinear::default();
        let rho = |t: f64| s.sigma(t) / s.alpha(t);
        let ind2 = |r: f64, b: f64, c: f64| r * (r.ln() - c.ln() - 1.0) / (b.ln() - c.ln());
        let ind3 = |r: f64, b: f64, c: f64, d: f64| {
            let (l, lc, ld) = (r.ln(), c.ln(), d.ln());
            r * ((l - lc) * (l - ld) - (2.0 * l - lc - ld) + 2.0) / ((b.ln() - lc) * (b.ln() - ld))
        };
        for &(t, sn, t1, t2) in &[
            (0.5, 0.4, 0.6, 0.7),
            (0.2, 0.1, 0.3, 0.45),
            (0.05, 0.02, 0.08, 0.12),
        ] {
            let (rt, rs, r1, r2) = (rho(t), rho(sn), rho(t1), rho(t2));
            let a = s.alpha(sn);
            let c1 = logrho_coefficients(&s, t, sn, &[t]);
            let (_, b) = ddim_coefficients(&s, t, sn);
            assert!((c1[0] - b).abs() < 1e-12 * (1.0 + b.abs()));
            let c2 = logrho_coefficients(&s, t, sn, &[t, t1]);
            let want2 = [
                a * (ind2(rs, rt, r1) - ind2(rt, rt, r1)),
                a * (ind2(rs, r1, rt) - ind2(rt, r1, rt)),
            ];
            let c3 = logrho_coefficients(&s, t, sn, &[t, t1, t2]);
            let want3 = [
                a * (ind3(rs, rt, r1, r2) - ind3(rt, rt, r1, r2)),
                a * (ind3(rs, r1, r2, rt) - ind3(rt, r1, r2, rt)),
                a * (ind3(rs, r2, rt, r1) - ind3(rt, r2, rt, r1)),
            ];
            for (got, want) in c2.iter().zip(want2).chain(c3.iter().zip(want3)) {
                assert!(
                    (got - want).abs() < 1e-12 * (1.0 + want.abs()),
                    "{t}->{sn}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn tab_coefficients_sum_to_the_order_one_coefficient() {
        // The Lagrange basis sums to one, so Σ_j C_j = C for a single node.
        let s = VpLinear::default();
        let c = tab_coefficients(&s, 0.4, 0.35, &[0.4, 0.45, 0.5]);
        let c1 = tab_coefficients(&s, 0.4, 0.35, &[0.4]);
        assert!((c.iter().sum::<f64>() - c1[0]).abs() < 1e-13);
    }
}
