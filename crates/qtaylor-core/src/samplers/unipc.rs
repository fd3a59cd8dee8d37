//! UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
//! Sampling of Diffusion Models", arXiv 2302.04867), data prediction (diffusers'
//! `UniPCMultistepScheduler` default, `predict_x0 = True`).
//!
//! Step from s₀ to t, `h = λ_t − λ_{s₀}`, `hh = −h`, model outputs m (x̂0) at s₀, s₁, …
//! (older grid points), `r_k = (λ_{s_k} − λ_{s₀})/h`, `D_k = (m_{s_k} − m₀)/r_k`, and
//!
//! ```text
//! base:   x_t = (σ_t/σ_{s₀}) x − α_t (e^{hh} − 1) m₀
//! b_i = hh φ_{i+1}(hh) i! / B(h),  φ₁(z) = (e^z − 1)/z,  φ_{k+1}(z) = (φ_k(z) − 1/k!)/z
//! B(h) = hh (bh1) or e^{hh} − 1 (bh2)
//! UniP-p: x_t = base − α_t B(h) Σ_{k<p} ρ_k D_k,  ρ = R⁻¹b on the first p − 1 rows
//!         (R[i][k] = r_kⁱ), with ρ = [½] for p = 2
//! UniC-p: x_t^c = base − α_t B(h) (Σ_{k<p} ρ_k D_k + ρ_p (m_t − m₀)),  ρ = R⁻¹b with the
//!         node r_p = 1 of the new output m_t (evaluated at the predicted x_t); ρ = [½] for p = 1
//! ```
//!
//! The corrected state replaces the predicted one before the next step, but the model
//! output stored for t is the one at the predicted point, so UniC costs no NFE; the last
//! step is not corrected. The order warms up 1, 2, …, p; with `lower_order_final` it is
//! `min(p, steps left)` (diffusers, unconditionally).
//!
//! Variable: λ = ln(α/σ), on the data prediction; starts at pure noise (a node at λ = −∞
//! drops out of the Vandermonde system).

use std::fmt;
use std::str::FromStr;

use anyhow::Result;

use super::{Backend, Ctx, reaches_zero};

/// UniPC's B(h).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UniPcVariant {
    /// B(h) = −h (data prediction): the official code's default.
    Bh1,
    /// B(h) = e^{−h} − 1: diffusers' default.
    Bh2,
}

impl FromStr for UniPcVariant {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "bh1" => UniPcVariant::Bh1,
            "bh2" => UniPcVariant::Bh2,
            other => crate::bail_option!(
                (crate::keys::UNIPC_VARIANT, other),
                ": unknown variant; expected bh1 or bh2"
            ),
        })
    }
}

impl fmt::Display for UniPcVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UniPcVariant::Bh1 => "bh1",
            UniPcVariant::Bh2 => "bh2",
        })
    }
}

/// `(B(h), b₁ … b_p)` for `hh = −h`.
fn b_vector(hh: f64, p: usize, variant: UniPcVariant) -> (f64, Vec<f64>) {
    let h_phi_1 = hh.exp_m1();
    let bh = match variant {
        UniPcVariant::Bh1 => hh,
        UniPcVariant::Bh2 => h_phi_1,
    };
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut fact = 1.0;
    let mut b = Vec::with_capacity(p);
    for i in 1..=p {
        b.push(h_phi_k * fact / bh);
        fact *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / fact;
    }
    (bh, b)
}

/// Solves the small dense system `R ρ = b` (Gaussian elimination with partial pivoting).
fn solve(mut r: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| r[i][c].abs().total_cmp(&r[j][c].abs()))
            .unwrap_or(c);
        r.swap(c, p);
        b.swap(c, p);
        for i in c + 1..n {
            let f = r[i][c] / r[c][c];
            let pivot = r[c].clone();
            for (rik, rck) in r[i].iter_mut().zip(&pivot).skip(c) {
                *rik -= f * rck;
            }
            b[i] -= f * b[c];
        }
    }
    let mut x = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| r[i][k] * x[k]).sum();
        x[i] = (b[i] - s) / r[i][i];
    }
    x
}

/// `R[i][k] = r_kⁱ` for the first `n` nodes.
fn vandermonde(rks: &[f64], n: usize) -> Vec<Vec<f64>> {
    (0..n)
        .map(|i| rks[..n].iter().map(|r| r.powi(i as i32)).collect())
        .collect()
}

/// One UniPC update from s₀ to t. `hist` holds (λ, m) of the grid points up to s₀, newest
/// last; `m_t` is the new model output for the corrector (None: predictor).
#[allow(clippy::too_many_arguments)]
fn update<B: Backend>(
    ctx: &mut Ctx<B>,
    x: &B::X,
    hist: &[(f64, B::X)],
    s0: f64,
    t: f64,
    order: usize,
    m_t: Option<&B::X>,
    variant: UniPcVariant,
) -> Result<B::X> {
    let sc = ctx.schedule;
    let (lam0, m0) = (&hist[hist.len() - 1].0, &hist[hist.len() - 1].1);
    let h = sc.lambda(t) - lam0;
    let hh = -h;
    let (alpha_t, ratio) = (sc.alpha(t), sc.sigma(t) / sc.sigma(s0));
    let (bh, b) = b_vector(hh, order, variant);
    // Older nodes r_k and differences D_k, k = 1 … order − 1.
    let older = |k: usize| &hist[hist.len() - 1 - k];
    let mut rks: Vec<f64> = (1..order).map(|k| (older(k).0 - lam0) / h).collect();
    rks.push(1.0);
    // Coefficients ρ on D_1 … D_{p−1} (and on m_t − m₀ for the corrector).
    let rho: Vec<f64> = match m_t {
        None => match order {
            1 => vec![],
            2 => vec![0.5],
            _ => solve(vandermonde(&rks, order - 1), b[..order - 1].to_vec()),
        },
        Some(_) => match order {
            1 => vec![0.5],
            _ => solve(vandermonde(&rks, order), b.clone()),
        },
    };
    let scale = -alpha_t * bh;
    let mut m0_coef = -alpha_t * hh.exp_m1();
    let mut terms: Vec<(f64, &B::X)> = vec![(ratio, x)];
    for k in 1..order {
        // D_k = (m_k − m₀)/r_k
        let c = scale * rho[k - 1] / rks[k - 1];
        terms.push((c, &older(k).1));
        m0_coef -= c;
    }
    if let Some(mt) = m_t {
        let c = scale * rho[order - 1];
        terms.push((c, mt));
        m0_coef -= c;
    }
    terms.push((m0_coef, m0));
    ctx.lc(&terms)
}

/// UniPC of order `order` (1 NFE per step).
#[allow(clippy::too_many_arguments)]
pub fn sample_unipc<B: Backend>(
    ctx: &mut Ctx<B>,
    mut x: B::X,
    ts: &[f64],
    order: usize,
    variant: UniPcVariant,
    corrector: bool,
    lower_order_final: bool,
) -> Result<B::X> {
    let n = ts.len() - 1;
    let mut hist: Vec<(f64, B::X)> = Vec::with_capacity(order + 1);
    // The state the previous predictor started from, and its order.
    let mut last: Option<(B::X, usize)> = None;
    for i in 0..n {
        let (t, s) = (ts[i], ts[i + 1]);
        ctx.begin_step(i, t, &x)?;
        let m = ctx.denoise(&x, t)?.x0;
        if corrector && let Some((x_start, p)) = &last {
            x = update(ctx, x_start, &hist, ts[i - 1], t, *p, Some(&m), variant)?;
        }
        if reaches_zero(ctx.schedule, s) {
            x = m;
            continue;
        }
        if hist.len() == order {
            hist.remove(0);
        }
        hist.push((ctx.schedule.lambda(t), m));
        // A node at pure noise (λ = −∞, rectified flow's ς = 1) is infinitely far in λ: its
        // divided difference is 0 in the limit, so it is not used (r_k = −∞ has no
        // Vandermonde system).
        let older = &hist[..hist.len() - 1];
        let finite = older.iter().filter(|(l, _)| l.is_finite()).count();
        let mut p = order.min(hist.len()).min(finite + 1);
        if lower_order_final {
            p = p.min(n - i);
        }
        let next = update(ctx, &x, &hist, t, s, p, None, variant)?;
        last = Some((x, p));
        x = next;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b_vector_matches_the_phi_functions() {
        // b_i = hh φ_{i+1}(hh) i! / B(h); φ₂(z) = (e^z − 1 − z)/z², φ₃(z) = (e^z − 1 − z − z²/2)/z³
        let hh = -0.37f64;
        let (bh, b) = b_vector(hh, 3, UniPcVariant::Bh1);
        assert_eq!(bh, hh);
        let phi2 = (hh.exp() - 1.0 - hh) / (hh * hh);
        let phi3 = (hh.exp() - 1.0 - hh - hh * hh / 2.0) / hh.powi(3);
        let phi4 = (hh.exp() - 1.0 - hh - hh * hh / 2.0 - hh.powi(3) / 6.0) / hh.powi(4);
        assert!((b[0] - hh * phi2 / bh).abs() < 1e-12);
        assert!((b[1] - hh * phi3 * 2.0 / bh).abs() < 1e-12);
        assert!((b[2] - hh * phi4 * 6.0 / bh).abs() < 1e-10);
    }

    #[test]
    fn solve_inverts_a_vandermonde_system() {
        let r = vandermonde(&[-0.8, -1.7, 1.0], 3);
        let want = [0.3, -1.2, 2.5];
        let b: Vec<f64> = r
            .iter()
            .map(|row| row.iter().zip(&want).map(|(a, x)| a * x).sum())
            .collect();
        let got = solve(r, b);
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12);
        }
    }
}
