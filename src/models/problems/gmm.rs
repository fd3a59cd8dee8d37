//! Diagonal Gaussian mixtures with a closed-form noise prediction (DESIGN §8).
//!
//! Data `x0 ~ Σ_k w_k N(μ_k, diag v_k)` diffused by the VP schedule has the marginal
//! `p_t = Σ_k w_k N(α μ_k, diag(α² v_k + σ²))`, whose score is
//! `∇log p_t(x) = −Σ_k r_k(x) (x − α μ_k) / (α² v_k + σ²)` with responsibilities
//! `r_k ∝ w_k N(x; α μ_k, α² v_k + σ²)` (a softmax over log-densities, computed with
//! log-sum-exp in f64). The exact noise prediction is `ε̂ = −σ ∇log p_t`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal, Uniform};
use serde::{Deserialize, Serialize};

use crate::models::model::{Model, Parameterization};
use crate::schedule::Schedule;
use crate::tensor::ops::row_tensor;

/// A diagonal Gaussian mixture, in the JSON layout
/// `{"dim": d, "weights": [..], "means": [[..]], "variances": [[..]]}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gmm {
    pub dim: usize,
    pub weights: Vec<f64>,
    pub means: Vec<Vec<f64>>,
    pub variances: Vec<Vec<f64>>,
}

impl Gmm {
    /// Reads and validates a mixture from a JSON file; errors name the file and the key.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read mixture file {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("in mixture file {}", path.display()))
    }

    /// Parses and validates a mixture; weights are normalised to sum to one.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let g: Gmm = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "malformed mixture JSON: {e} (expected keys: dim, weights, means, variances)"
            )
        })?;
        g.validated()
    }

    fn validated(mut self) -> Result<Self> {
        let k = self.weights.len();
        if self.dim == 0 {
            bail!("key 'dim': expected a positive integer, got 0");
        }
        if k == 0 {
            bail!("key 'weights': expected at least one component, got an empty list");
        }
        if self.means.len() != k {
            bail!(
                "key 'means': {} rows, expected one per weight ({k})",
                self.means.len()
            );
        }
        if self.variances.len() != k {
            bail!(
                "key 'variances': {} rows, expected one per weight ({k})",
                self.variances.len()
            );
        }
        for (i, &w) in self.weights.iter().enumerate() {
            if !(w.is_finite() && w >= 0.0) {
                bail!("key 'weights': weights[{i}] = {w}, expected a finite value >= 0");
            }
        }
        let total: f64 = self.weights.iter().sum();
        if total.is_nan() || total <= 0.0 {
            bail!("key 'weights': the weights sum to {total}, expected a positive sum");
        }
        for w in &mut self.weights {
            *w /= total;
        }
        for (key, rows, positive) in [
            ("means", &self.means, false),
            ("variances", &self.variances, true),
        ] {
            for (i, row) in rows.iter().enumerate() {
                if row.len() != self.dim {
                    bail!(
                        "key '{key}': {key}[{i}] has {} entries, expected dim = {}",
                        row.len(),
                        self.dim
                    );
                }
                for (j, &v) in row.iter().enumerate() {
                    if !v.is_finite() || (positive && v <= 0.0) {
                        let want = if positive {
                            "a finite value > 0"
                        } else {
                            "a finite value"
                        };
                        bail!("key '{key}': {key}[{i}][{j}] = {v}, expected {want}");
                    }
                }
            }
        }
        Ok(self)
    }

    /// The built-in `gmm-demo`: d = 64, 8 components whose spreads range over two and a
    /// half decades (variances from 1e-3 to 0.3, jittered per dimension), means with
    /// entries of scale 0.5, unequal weights. Fully determined by `seed`.
    pub fn demo(seed: u64) -> Self {
        let (dim, k) = (64, 8);
        let mut rng = ChaCha12Rng::seed_from_u64(seed);
        let jitter = Uniform::new(0.5f64, 2.0).expect("valid range");
        let wdist = Uniform::new(0.5f64, 1.5).expect("valid range");
        let mut weights = Vec::with_capacity(k);
        let mut means = Vec::with_capacity(k);
        let mut variances = Vec::with_capacity(k);
        for c in 0..k {
            let base = 1e-3f64 * (300f64).powf(c as f64 / (k - 1) as f64);
            weights.push(wdist.sample(&mut rng));
            means.push(
                (0..dim)
                    .map(|_| 0.5 * Distribution::<f64>::sample(&StandardNormal, &mut rng))
                    .collect(),
            );
            variances.push((0..dim).map(|_| base * jitter.sample(&mut rng)).collect());
        }
        Gmm {
            dim,
            weights,
            means,
            variances,
        }
        .validated()
        .expect("the demo mixture is valid")
    }

    /// `ln p_t(x)` for `p_t = Σ_k w_k N(α μ_k, α² v_k + σ²)`, in f64.
    pub fn log_density(&self, x: &[f64], alpha: f64, sigma: f64) -> f64 {
        let terms: Vec<f64> = (0..self.weights.len())
            .map(|k| {
                let mut l = self.weights[k].ln();
                for ((&xj, &m), &v) in x.iter().zip(&self.means[k]).zip(&self.variances[k]) {
                    let s2 = alpha * alpha * v + sigma * sigma;
                    let d = xj - alpha * m;
                    l -= 0.5 * (d * d / s2 + (2.0 * std::f64::consts::PI * s2).ln());
                }
                l
            })
            .collect();
        let m = terms.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + terms.iter().map(|l| (l - m).exp()).sum::<f64>().ln()
    }

    /// `n` exact samples of `p_t` (α, σ of the time t), and the component each came from.
    pub fn sample(
        &self,
        n: usize,
        alpha: f64,
        sigma: f64,
        rng: &mut impl Rng,
    ) -> (Vec<Vec<f64>>, Vec<usize>) {
        let u = Uniform::new(0.0f64, 1.0).expect("valid range");
        let mut xs = Vec::with_capacity(n);
        let mut ks = Vec::with_capacity(n);
        for _ in 0..n {
            let mut r: f64 = u.sample(rng);
            let mut k = self.weights.len() - 1;
            for (i, &w) in self.weights.iter().enumerate() {
                if r < w {
                    k = i;
                    break;
                }
                r -= w;
            }
            let x = (0..self.dim)
                .map(|j| {
                    let z1: f64 = StandardNormal.sample(rng);
                    let z2: f64 = StandardNormal.sample(rng);
                    alpha * (self.means[k][j] + self.variances[k][j].sqrt() * z1) + sigma * z2
                })
                .collect();
            xs.push(x);
            ks.push(k);
        }
        (xs, ks)
    }
}

/// The exact ε̂ of a [`Gmm`] under a schedule, as a [`Model`] on any candle device. On a
/// schedule that reaches pure noise (α = 0 at its end, rectified flow at ς = 1), where ε̂
/// no longer determines x̂0, it predicts the flow velocity `ε̂ − x̂0` instead, as a
/// flow-matching network does.
pub struct GmmModel {
    pub gmm: Arc<Gmm>,
    pub schedule: Arc<dyn Schedule>,
    param: Parameterization,
    means: Tensor,     // (K, d) f64
    variances: Tensor, // (K, d) f64
    log_w: Tensor,     // (K,) f64
}

impl GmmModel {
    pub fn new(gmm: Arc<Gmm>, schedule: Arc<dyn Schedule>, device: &Device) -> Result<Self> {
        let k = gmm.weights.len();
        let flat = |rows: &[Vec<f64>]| rows.iter().flatten().copied().collect::<Vec<f64>>();
        let means = Tensor::from_vec(flat(&gmm.means), (k, gmm.dim), device)?;
        let variances = Tensor::from_vec(flat(&gmm.variances), (k, gmm.dim), device)?;
        let log_w = Tensor::from_vec(
            gmm.weights.iter().map(|w| w.ln()).collect::<Vec<_>>(),
            k,
            device,
        )?;
        let param = if qtaylor_core::samplers::pure_noise(schedule.as_ref(), schedule.t_end()) {
            Parameterization::Flow
        } else {
            Parameterization::Eps
        };
        Ok(GmmModel {
            gmm,
            schedule,
            param,
            means,
            variances,
            log_w,
        })
    }
}

/// Per-time constants of the marginal: `1/(α² v_kj + σ²)` and
/// `ln w_k − ½ Σ_j ln(2π (α² v_kj + σ²))`.
struct Marginal {
    alpha: f64,
    sigma: f64,
    inv_var: Vec<f64>,
    log_norm: Vec<f64>,
}

impl GmmModel {
    fn marginal(&self, t: f64) -> Marginal {
        let (alpha, sigma) = (self.schedule.alpha(t), self.schedule.sigma(t));
        let g = &self.gmm;
        let mut inv_var = Vec::with_capacity(g.weights.len() * g.dim);
        let log_norm = (0..g.weights.len())
            .map(|k| {
                // Σ_j ln(2π s2_j) as logs of products of 8 factors (each factor is in
                // [σ², α²v + σ²], so a product of 8 neither under- nor overflows): an eighth
                // of the logarithms, which dominate this per-time set-up.
                let mut log_det = 0.0;
                for chunk in g.variances[k].chunks(8) {
                    let mut prod = 1.0;
                    for &v in chunk {
                        let s2 = alpha * alpha * v + sigma * sigma;
                        inv_var.push(1.0 / s2);
                        prod *= 2.0 * std::f64::consts::PI * s2;
                    }
                    log_det += prod.ln();
                }
                g.weights[k].ln() - 0.5 * log_det
            })
            .collect();
        Marginal {
            alpha,
            sigma,
            inv_var,
            log_norm,
        }
    }

    /// The prediction of one row (CPU path): responsibilities by log-sum-exp, then the
    /// weighted sums of ε̂ and (for the flow velocity) x̂0.
    fn eps_row(&self, m: &Marginal, x: &[f64], out: &mut [f64]) {
        let g = &self.gmm;
        let (k, d) = (g.weights.len(), g.dim);
        let mut logits = vec![0.0; k];
        for (c, logit) in logits.iter_mut().enumerate() {
            let (mu, iv) = (&g.means[c], &m.inv_var[c * d..(c + 1) * d]);
            let mut q = 0.0;
            for j in 0..d {
                let diff = x[j] - m.alpha * mu[j];
                q += diff * diff * iv[j];
            }
            *logit = m.log_norm[c] - 0.5 * q;
        }
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let mut total = 0.0;
        for l in logits.iter_mut() {
            *l = (*l - max).exp();
            total += *l;
        }
        out.fill(0.0);
        for (c, &w) in logits.iter().enumerate() {
            let r = w / total;
            let (mu, iv) = (&g.means[c], &m.inv_var[c * d..(c + 1) * d]);
            for j in 0..d {
                out[j] += r * (x[j] - m.alpha * mu[j]) * iv[j];
            }
        }
        if self.param == Parameterization::Flow {
            // x̂0 = E[x0 | x] = Σ_k r_k (μ_k + α v_k z_k), z_k = (x − α μ_k)/(α² v_k + σ²);
            // the flow velocity is ε̂ − x̂0.
            let mut x0 = vec![0.0; d];
            for (c, &w) in logits.iter().enumerate() {
                let r = w / total;
                let (mu, iv, var) = (&g.means[c], &m.inv_var[c * d..(c + 1) * d], &g.variances[c]);
                for j in 0..d {
                    x0[j] += r * (mu[j] + m.alpha * var[j] * (x[j] - m.alpha * mu[j]) * iv[j]);
                }
            }
            for (o, x0) in out.iter_mut().zip(&x0) {
                *o = *o * m.sigma - x0;
            }
            return;
        }
        for o in out.iter_mut() {
            *o *= m.sigma;
        }
    }

    /// The CPU path: one fused pass per row, rows in parallel (each row's arithmetic is
    /// the same whatever the batch or thread count).
    fn predict_cpu(&self, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        use rayon::prelude::*;
        let (b, d) = x.dims2()?;
        let xs: Vec<f64> = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let shared = (t.len() == 1).then(|| self.marginal(t[0]));
        let mut out = vec![0.0; b * d];
        out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
            let row = &xs[i * d..(i + 1) * d];
            match &shared {
                Some(m) => self.eps_row(m, row, o),
                None => self.eps_row(&self.marginal(t[i]), row, o),
            }
        });
        Ok(Tensor::from_vec(out, (b, d), &Device::Cpu)?.to_dtype(x.dtype())?)
    }

    /// The tensor path (any device): the same formula with broadcast candle ops.
    fn predict_tensor(&self, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        let x64 = x.to_dtype(DType::F64)?.unsqueeze(1)?; // (B,1,d)
        let a: Vec<f64> = t.iter().map(|&t| self.schedule.alpha(t)).collect();
        let s: Vec<f64> = t.iter().map(|&t| self.schedule.sigma(t)).collect();
        let a2: Vec<f64> = a.iter().map(|a| a * a).collect();
        let s2v: Vec<f64> = s.iter().map(|s| s * s).collect();
        let like = Tensor::zeros((t.len(), 1, 1), DType::F64, x.device())?;
        let (at, a2t, s2t) = (
            row_tensor(&a, &like)?,
            row_tensor(&a2, &like)?,
            row_tensor(&s2v, &like)?,
        );
        let mu = self.means.unsqueeze(0)?; // (1,K,d)
        let var = self.variances.unsqueeze(0)?;
        let total_var = var.broadcast_mul(&a2t)?.broadcast_add(&s2t)?; // (T,K,d)
        let diff = x64.broadcast_sub(&mu.broadcast_mul(&at)?)?; // (B,K,d)
        let z = diff.broadcast_div(&total_var)?; // (B,K,d)
        let log_norm = (total_var.log()? + (2.0 * std::f64::consts::PI).ln())?;
        let quad = (diff.mul(&z)?.broadcast_add(&log_norm)?).sum(D::Minus1)?; // (B,K)
        let logits = (quad * -0.5)?.broadcast_add(&self.log_w.unsqueeze(0)?)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let w = logits.broadcast_sub(&max)?.exp()?;
        let r = w.broadcast_div(&w.sum_keepdim(D::Minus1)?)?; // (B,K)
        let weighted = z.broadcast_mul(&r.unsqueeze(2)?)?.sum(1)?; // (B,d)
        let mut out = weighted.broadcast_mul(&row_tensor(&s, &weighted)?)?;
        if self.param == Parameterization::Flow {
            // v̂ = ε̂ − x̂0 with x̂0 = Σ_k r_k (μ_k + α v_k z_k)
            let post = mu
                .broadcast_add(&var.broadcast_mul(&z)?.broadcast_mul(&at)?)?
                .broadcast_mul(&r.unsqueeze(2)?)?
                .sum(1)?;
            out = (out - post)?;
        }
        Ok(out.to_dtype(x.dtype())?)
    }
}

impl Model for GmmModel {
    fn parameterization(&self) -> Parameterization {
        self.param
    }

    /// `ε̂ = σ Σ_k r_k (x − α μ_k)/(α² v_k + σ²)` (or the flow velocity `ε̂ − x̂0`, see
    /// [`GmmModel`]), computed in f64 and returned in x's dtype.
    fn predict(&self, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        let (b, d) = x
            .dims2()
            .context("the mixture model expects x of shape (B, d)")?;
        if d != self.gmm.dim {
            bail!("x has {d} columns, the mixture has dim = {}", self.gmm.dim);
        }
        if t.len() != 1 && t.len() != b {
            bail!("{} times for {b} rows", t.len());
        }
        if x.device().is_cpu() {
            self.predict_cpu(x, t)
        } else {
            self.predict_tensor(x, t)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::VpLinear;
    use crate::tensor::ops::rows_f64;

    #[test]
    fn gmm_eps_equals_minus_sigma_grad_log_density_by_finite_differences() {
        let g = Arc::new(Gmm::demo(3));
        let sched: Arc<dyn Schedule> = Arc::new(VpLinear::default());
        let m = GmmModel::new(g.clone(), sched.clone(), &Device::Cpu).unwrap();
        let mut rng = ChaCha12Rng::seed_from_u64(1);
        for &t in &[0.02, 0.3, 0.9] {
            let (a, s) = (sched.alpha(t), sched.sigma(t));
            let (xs, _) = g.sample(3, a, s, &mut rng);
            let flat: Vec<f64> = xs.iter().flatten().copied().collect();
            let x = Tensor::from_vec(flat, (3, g.dim), &Device::Cpu).unwrap();
            let eps = rows_f64(&m.predict(&x, &[t]).unwrap()).unwrap();
            for (xi, ei) in xs.iter().zip(&eps) {
                for j in [0, 17, 63] {
                    let h = 1e-5 * s.max(0.05);
                    let mut xp = xi.clone();
                    let mut xm = xi.clone();
                    xp[j] += h;
                    xm[j] -= h;
                    let grad = (g.log_density(&xp, a, s) - g.log_density(&xm, a, s)) / (2.0 * h);
                    let want = -s * grad;
                    assert!(
                        (ei[j] - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "t={t} j={j}: {} vs {want}",
                        ei[j]
                    );
                }
            }
        }
    }

    #[test]
    fn on_flow_the_mixture_predicts_the_velocity_eps_minus_posterior_mean() {
        // One Gaussian N(μ, v): E[x0 | x] = μ + α v (x − α μ)/(α² v + σ²) and
        // ε̂ = σ (x − α μ)/(α² v + σ²), written out; at pure noise (t = 1) v̂ = x − μ.
        let g = Gmm {
            dim: 2,
            weights: vec![1.0],
            means: vec![vec![0.5, -1.0]],
            variances: vec![vec![0.3, 2.0]],
        };
        let sched: Arc<dyn Schedule> = Arc::new(crate::schedule::Flow::new(3.0).unwrap());
        let m = GmmModel::new(Arc::new(g.clone()), sched.clone(), &Device::Cpu).unwrap();
        assert_eq!(m.parameterization(), Parameterization::Flow);
        let x = Tensor::new(&[[0.7f64, -0.2], [-1.5, 2.5]], &Device::Cpu).unwrap();
        let xs = rows_f64(&x).unwrap();
        for t in [1.0, 0.8, 0.3, 0.01] {
            let (a, s) = (sched.alpha(t), sched.sigma(t));
            for path in [m.predict_cpu(&x, &[t]), m.predict_tensor(&x, &[t])] {
                let got = rows_f64(&path.unwrap()).unwrap();
                for (row, xr) in got.iter().zip(&xs) {
                    for j in 0..2 {
                        let (mu, v) = (g.means[0][j], g.variances[0][j]);
                        let z = (xr[j] - a * mu) / (a * a * v + s * s);
                        let want = s * z - (mu + a * v * z);
                        assert!((row[j] - want).abs() < 1e-13, "t={t}: {} vs {want}", row[j]);
                    }
                }
            }
        }
    }

    #[test]
    fn cpu_and_tensor_paths_compute_the_same_eps() {
        let g = Arc::new(Gmm::demo(3));
        let sched: Arc<dyn Schedule> = Arc::new(VpLinear::default());
        let m = GmmModel::new(g, sched, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f64, 1.0, (5, 64), &Device::Cpu).unwrap();
        for t in [vec![0.01], vec![0.5], vec![0.1, 0.2, 0.3, 0.9, 1.0]] {
            let a = rows_f64(&m.predict_cpu(&x, &t).unwrap()).unwrap();
            let b = rows_f64(&m.predict_tensor(&x, &t).unwrap()).unwrap();
            for (ra, rb) in a.iter().zip(&b) {
                for (u, v) in ra.iter().zip(rb) {
                    assert!((u - v).abs() < 1e-12 * (1.0 + v.abs()), "{u} vs {v}");
                }
            }
        }
    }

    #[test]
    fn per_sample_times_agree_with_shared_times() {
        let g = Arc::new(Gmm::demo(3));
        let sched: Arc<dyn Schedule> = Arc::new(VpLinear::default());
        let m = GmmModel::new(g.clone(), sched, &Device::Cpu).unwrap();
        let x = Tensor::randn(0f64, 1.0, (2, 64), &Device::Cpu).unwrap();
        let both = rows_f64(&m.predict(&x, &[0.2, 0.6]).unwrap()).unwrap();
        let a = rows_f64(&m.predict(&x.narrow(0, 0, 1).unwrap(), &[0.2]).unwrap()).unwrap();
        let b = rows_f64(&m.predict(&x.narrow(0, 1, 1).unwrap(), &[0.6]).unwrap()).unwrap();
        assert_eq!(both[0], a[0]);
        assert_eq!(both[1], b[0]);
    }

    #[test]
    fn malformed_mixture_json_names_the_key() {
        let e = Gmm::from_json_str(r#"{"dim": 2, "weights": [1.0], "variances": [[1,1]]}"#)
            .unwrap_err();
        assert!(format!("{e:#}").contains("means"), "{e:#}");
        let e = Gmm::from_json_str(
            r#"{"dim": 2, "weights": [1.0], "means": [[0,0,0]], "variances": [[1,1]]}"#,
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("means[0] has 3 entries, expected dim = 2"),
            "{e:#}"
        );
        let e = Gmm::from_json_str(
            r#"{"dim": 2, "weights": [1.0], "means": [[0,0]], "variances": [[1,-1]]}"#,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("variances[0][1] = -1"), "{e:#}");
        let e = Gmm::from_json_str(
            r#"{"dim": 2, "weights": [-1.0], "means": [[0,0]], "variances": [[1,1]]}"#,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("weights[0]"), "{e:#}");
        let e = Gmm::from_json_str("{not json").unwrap_err();
        assert!(format!("{e:#}").contains("malformed mixture JSON"), "{e:#}");
    }
}
