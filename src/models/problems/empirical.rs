//! The empirical data distribution: a uniform mixture of Dirac points `y_1 … y_N`
//! (DESIGN §8). Its marginal is `p_t = (1/N) Σ_n N(α y_n, σ² I)`, so the exact data
//! prediction is the softmax average
//!
//! ```text
//! x̂0(x, t) = Σ_n w_n y_n,   w = softmax_n( (α/σ²) (x·y_n − α |y_n|²/2) )
//! ```
//!
//! (the `|x|²` term of the squared distance is common to all n and drops out). The dot
//! products are one matrix product per call, computed in f64, with log-sum-exp.

use anyhow::{Result, bail};
use candle_core::{D, DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal, Uniform};

use super::Problem;
use crate::io::idx::Matrix;
use crate::models::model::{Model, Parameterization};
use crate::schedule::Schedule;
use crate::tensor::ops::row_tensor;
use std::sync::Arc;

/// The exact model of an empirical data set.
pub struct EmpiricalModel {
    schedule: Arc<dyn Schedule>,
    /// (N, d) f64.
    data: Tensor,
    /// (1, N): |y_n|²/2.
    half_sq: Tensor,
    rows: usize,
    dim: usize,
}

impl EmpiricalModel {
    pub fn new(m: &Matrix, schedule: Arc<dyn Schedule>, device: &Device) -> Result<Self> {
        let data = Tensor::from_slice(&m.data, (m.rows, m.dim), device)?;
        let half_sq = (data.sqr()?.sum(1)? * 0.5)?.unsqueeze(0)?;
        Ok(EmpiricalModel {
            schedule,
            data,
            half_sq,
            rows: m.rows,
            dim: m.dim,
        })
    }

    /// Indices of and RMS distances (per dimension) to the nearest scaled point `α y_n`,
    /// for each row of `x` (shape (B, d)) at time t.
    pub fn nearest(&self, x: &Tensor, t: f64) -> Result<(Vec<usize>, Vec<f64>)> {
        let alpha = self.schedule.alpha(t);
        let x64 = x.to_dtype(DType::F64)?.to_device(self.data.device())?;
        // |x − αy|² = |x|² − 2α (x·y − α|y|²/2)
        let score = x64
            .matmul(&self.data.t()?)?
            .broadcast_sub(&(&self.half_sq * alpha)?)?;
        let idx: Vec<u32> = score.argmax(D::Minus1)?.to_vec1()?;
        let best: Vec<f64> = score.max(D::Minus1)?.to_vec1()?;
        let xx: Vec<f64> = x64.sqr()?.sum(1)?.to_vec1()?;
        let dist = xx
            .iter()
            .zip(&best)
            .map(|(xx, b)| ((xx - 2.0 * alpha * b).max(0.0) / self.dim as f64).sqrt())
            .collect();
        Ok((idx.into_iter().map(|i| i as usize).collect(), dist))
    }
}

impl Model for EmpiricalModel {
    fn parameterization(&self) -> Parameterization {
        Parameterization::X0
    }

    fn predict(&self, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        let (b, d) = x.dims2()?;
        if d != self.dim {
            bail!("x has {d} columns, the data set has dimension {}", self.dim);
        }
        if t.len() != 1 && t.len() != b {
            bail!("{} times for {b} rows", t.len());
        }
        let x64 = x.to_dtype(DType::F64)?;
        let alpha: Vec<f64> = t.iter().map(|&t| self.schedule.alpha(t)).collect();
        let scale: Vec<f64> = t
            .iter()
            .zip(&alpha)
            .map(|(&t, a)| a / self.schedule.sigma(t).powi(2))
            .collect();
        let like = Tensor::zeros((t.len(), 1), DType::F64, x.device())?;
        // logits = (α/σ²)(x·y − α|y|²/2)
        let xy = x64.matmul(&self.data.t()?)?; // (B, N)
        let shifted =
            xy.broadcast_sub(&self.half_sq.broadcast_mul(&row_tensor(&alpha, &like)?)?)?;
        let logits = shifted.broadcast_mul(&row_tensor(&scale, &like)?)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let w = logits.broadcast_sub(&max)?.exp()?;
        let w = w.broadcast_div(&w.sum_keepdim(D::Minus1)?)?;
        let x0 = w.matmul(&self.data)?; // (B, d)
        Ok(x0.to_dtype(x.dtype())?)
    }
}

/// `empirical:PATH[:N]`.
pub struct EmpiricalProblem {
    name: String,
    pub model: EmpiricalModel,
}

impl EmpiricalProblem {
    pub fn new(
        name: &str,
        m: &Matrix,
        schedule: Arc<dyn Schedule>,
        device: &Device,
    ) -> Result<Self> {
        Ok(EmpiricalProblem {
            name: name.to_string(),
            model: EmpiricalModel::new(m, schedule, device)?,
        })
    }
}

impl Problem for EmpiricalProblem {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn item_shape(&self) -> Vec<usize> {
        vec![self.model.dim]
    }
    fn model(&self) -> &dyn Model {
        &self.model
    }
    fn exact_samples(&self, t: f64, n: usize, seed: u64) -> Vec<Vec<f64>> {
        let s = &self.model.schedule;
        let (a, sg) = (s.alpha(t), s.sigma(t));
        let mut rng = ChaCha12Rng::seed_from_u64(seed);
        let pick = Uniform::new(0, self.model.rows).expect("non-empty data");
        let data: Vec<f64> = self
            .model
            .data
            .flatten_all()
            .and_then(|d| d.to_vec1())
            .expect("the data set is an f64 tensor");
        (0..n)
            .map(|_| {
                let k = pick.sample(&mut rng);
                (0..self.model.dim)
                    .map(|j| {
                        let z: f64 = StandardNormal.sample(&mut rng);
                        a * data[k * self.model.dim + j] + sg * z
                    })
                    .collect()
            })
            .collect()
    }
    fn nearest(&self, x: &Tensor, t: f64) -> Option<Result<(Vec<usize>, Vec<f64>)>> {
        Some(self.model.nearest(x, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::VpLinear;
    use crate::tensor::ops::rows_f64;

    fn points() -> Matrix {
        Matrix {
            rows: 3,
            dim: 2,
            data: vec![0.5, -0.5, -0.7, 0.2, 0.1, 0.9],
        }
    }

    #[test]
    fn empirical_x0_is_the_posterior_mean_of_the_points() {
        let s: Arc<dyn Schedule> = Arc::new(VpLinear::default());
        let m = EmpiricalModel::new(&points(), s.clone(), &Device::Cpu).unwrap();
        let x = Tensor::new(&[[0.2f64, 0.1], [-0.3, 0.4]], &Device::Cpu).unwrap();
        for &t in &[0.05, 0.4, 0.9] {
            let got = rows_f64(&m.predict(&x, &[t]).unwrap()).unwrap();
            let (a, sg) = (s.alpha(t), s.sigma(t));
            let y = points().data;
            for (r, xr) in [[0.2, 0.1], [-0.3, 0.4]].iter().enumerate() {
                // direct: w_n ∝ exp(−|x − α y_n|²/(2σ²))
                let w: Vec<f64> = (0..3)
                    .map(|n| {
                        let d2 =
                            (xr[0] - a * y[2 * n]).powi(2) + (xr[1] - a * y[2 * n + 1]).powi(2);
                        (-d2 / (2.0 * sg * sg)).exp()
                    })
                    .collect();
                let tot: f64 = w.iter().sum();
                for j in 0..2 {
                    let want: f64 = (0..3).map(|n| w[n] / tot * y[2 * n + j]).sum();
                    assert!(
                        (got[r][j] - want).abs() < 1e-12,
                        "t={t}: {} vs {want}",
                        got[r][j]
                    );
                }
            }
        }
    }

    #[test]
    fn at_low_noise_x0_snaps_to_the_nearest_point() {
        let s: Arc<dyn Schedule> = Arc::new(VpLinear::default());
        let m = EmpiricalModel::new(&points(), s.clone(), &Device::Cpu).unwrap();
        let t = 1e-3;
        let x = Tensor::new(&[[0.45f64, -0.48]], &Device::Cpu).unwrap();
        let got = rows_f64(&m.predict(&x, &[t]).unwrap()).unwrap();
        assert!((got[0][0] - 0.5).abs() < 1e-9 && (got[0][1] + 0.5).abs() < 1e-9);
        let (idx, _) = m.nearest(&x, t).unwrap();
        assert_eq!(idx, vec![0]);
    }
}
