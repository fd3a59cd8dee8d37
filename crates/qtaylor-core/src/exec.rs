//! The door between the samplers and the tensors.
//!
//! A sampler is scalar algebra: from the schedule and the grid it computes f64
//! coefficients, and it moves tensors only through the few operations of a [`Backend`]:
//! a network call, a linear combination `Σ_k c_k x_k`, fresh normal noise, a clamp and (for
//! the adaptive solvers) a per-row error norm. The backend owns the data; the sampler holds
//! opaque handles ([`Backend::X`]). Three backends run the same sampler code:
//!
//! - candle tensors (the `qtaylor` crate: CLI, bench, eval);
//! - Python objects through callbacks (the `qtaylor` Python package: PyTorch tensors);
//! - [`crate::program::Recorder`], which writes the operations down as a
//!   [`crate::program::Program`] (the diffusers scheduler replays it one network call at a
//!   time).
//!
//! [`Ctx`] wraps a backend with what every sampler shares, written once: the conversion of
//! the network's prediction to `(ε̂, x̂0)`, `clip_sample`, the NFE count and the step index.

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};

use crate::schedule::Schedule;

/// A coefficient: one value for the whole batch, or one per row (sample).
#[derive(Clone, Debug, PartialEq)]
pub enum Coef {
    All(f64),
    Rows(Vec<f64>),
}

impl Coef {
    /// The coefficient of row `row`.
    pub fn at(&self, row: usize) -> f64 {
        match self {
            Coef::All(c) => *c,
            Coef::Rows(v) => v[row],
        }
    }
}

impl From<f64> for Coef {
    fn from(c: f64) -> Self {
        Coef::All(c)
    }
}

/// One value per row, or one for all rows when the vector has a single entry.
impl From<Vec<f64>> for Coef {
    fn from(v: Vec<f64>) -> Self {
        if v.len() == 1 {
            Coef::All(v[0])
        } else {
            Coef::Rows(v)
        }
    }
}

/// What a network predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parameterization {
    /// Noise ε̂ (diffusers `epsilon`).
    Eps,
    /// Data x̂0 (diffusers `sample`).
    X0,
    /// Velocity `v̂ = α ε̂ − σ x̂0` (diffusers `v_prediction`).
    V,
    /// Flow velocity `v̂ = ε̂ − x̂0 = dx/dς` on a rectified-flow path (diffusers
    /// `flow_prediction`, SD3 and Flux).
    Flow,
}

impl FromStr for Parameterization {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "epsilon" | "eps" => Parameterization::Eps,
            "sample" | "x0" => Parameterization::X0,
            "v_prediction" | "v" => Parameterization::V,
            "flow_prediction" | "flow" => Parameterization::Flow,
            other => {
                bail!(
                    "unknown prediction type '{other}'; expected one of: epsilon, sample, v_prediction, flow_prediction"
                )
            }
        })
    }
}

impl fmt::Display for Parameterization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Parameterization::Eps => "epsilon",
            Parameterization::X0 => "sample",
            Parameterization::V => "v_prediction",
            Parameterization::Flow => "flow_prediction",
        })
    }
}

/// `([e_x, e_p], [d_x, d_p])`: see [`conversion`].
pub type Conversion = ([f64; 2], [f64; 2]);

/// Coefficients of the exact conversion of a prediction `p` made at `(x, t)` into
/// `ε̂ = e_x x + e_p p` and `x̂0 = d_x x + d_p p`, given α and σ at t:
///
/// - from ε̂: `x̂0 = (x − σ ε̂)/α`;
/// - from x̂0: `ε̂ = (x − α x̂0)/σ`;
/// - from v̂: `ε̂ = σ x + α v̂`, `x̂0 = α x − σ v̂` (using `α² + σ² = 1`);
/// - from the flow velocity `v̂ = ε̂ − x̂0`: the model state is `x/(α + σ)` (the flow path
///   `(1 − ς) x0 + ς ε` scaled to the VP state), so `x = α x̂0 + σ ε̂` and `ε̂ − x̂0 = v̂` give
///   `ε̂ = (x + α v̂)/(α + σ)`, `x̂0 = (x − σ v̂)/(α + σ)` (finite at ς = 1, where α = 0).
///
/// Returns `([e_x, e_p], [d_x, d_p])`.
pub fn conversion(p: Parameterization, alpha: f64, sigma: f64) -> Conversion {
    match p {
        Parameterization::Eps => ([0.0, 1.0], [1.0 / alpha, -sigma / alpha]),
        Parameterization::X0 => ([1.0 / sigma, -alpha / sigma], [0.0, 1.0]),
        Parameterization::V => ([sigma, alpha], [alpha, -sigma]),
        Parameterization::Flow => {
            let k = 1.0 / (alpha + sigma);
            ([k, alpha * k], [k, -sigma * k])
        }
    }
}

/// How [`Backend::error_norm`] scales the error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tolerance {
    /// `atol + rtol·max(|a|, |b|)` (Hairer's DOPRI5, scipy).
    Sum,
    /// `max(atol, rtol·max(|a|, |b|))` (DPM-Solver's adaptive pairs).
    Max,
}

/// What is done to x̂0 after each network call, before the sampler uses it (ε̂ is then
/// recomputed from it: ε̂ = (x − α x̂0)/σ).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum X0Clip {
    /// diffusers' `clip_sample`: x̂0 clamped to `[−limit, limit]`.
    Clamp(f64),
    /// diffusers' dynamic thresholding (Saharia et al. 2022, "Photorealistic Text-to-Image
    /// Diffusion Models with Deep Language Understanding", §2.3): per sample, `s` = the
    /// `ratio` quantile of |x̂0| (linear interpolation, as `torch.quantile`), clamped to
    /// `[1, max]`; then `x̂0 ← clamp(x̂0, −s, s) / s`.
    Threshold { ratio: f64, max: f64 },
}

impl X0Clip {
    /// `x̂0` clamped or thresholded on `backend`.
    pub fn apply<B: Backend>(&self, backend: &mut B, x0: &B::X) -> Result<B::X> {
        match *self {
            X0Clip::Clamp(limit) => backend.clamp(x0, limit),
            X0Clip::Threshold { ratio, max } => backend.threshold(x0, ratio, max),
        }
    }
}

/// The tensor operations a sampler needs. `X` is a handle the backend understands.
pub trait Backend {
    type X: Clone;

    /// The network's raw prediction at `x` and one time per row (or one shared time).
    /// `step` is the sampler's current step, for error messages.
    fn predict(&mut self, x: &Self::X, t: &[f64], step: usize) -> Result<Self::X>;

    /// `Σ_k c_k x_k`, all terms of one shape; coefficients may differ per row.
    fn lincomb(&mut self, terms: &[(Coef, &Self::X)]) -> Result<Self::X>;

    /// Fresh standard normal noise shaped like `like`.
    fn noise(&mut self, like: &Self::X) -> Result<Self::X>;

    /// `x` clamped to `[−limit, limit]` (diffusers' `clip_sample`).
    fn clamp(&mut self, x: &Self::X, limit: f64) -> Result<Self::X>;

    /// `x` dynamically thresholded per row ([`X0Clip::Threshold`]). Backends without a
    /// per-row quantile say so.
    fn threshold(&mut self, _x: &Self::X, ratio: f64, max: f64) -> Result<Self::X> {
        bail!(
            "dynamic thresholding (ratio {ratio}, max {max}) is not available on this backend; it runs in the Python scheduler (QTaylorScheduler with thresholding=True)"
        )
    }

    /// Per-row RMS of `e / scale` with the [`Tolerance`] scale built from `a` and `b`
    /// (the adaptive solvers' error norm).
    fn error_norm(
        &mut self,
        e: &Self::X,
        a: &Self::X,
        b: &Self::X,
        rtol: f64,
        atol: f64,
        kind: Tolerance,
    ) -> Result<Vec<f64>>;

    /// Called when the sampler starts step `i` at time `t` in state `x` (progress bars,
    /// callbacks).
    fn begin_step(&mut self, _i: usize, _t: f64, _x: &Self::X) -> Result<()> {
        Ok(())
    }
}

/// A model output converted to both the noise and the data prediction.
#[derive(Clone, Debug)]
pub struct Denoised<X> {
    pub eps: X,
    pub x0: X,
}

/// Everything a sampler may touch besides its own state: the backend (through
/// NFE-counting calls), the schedule and how predictions are read.
pub struct Ctx<'a, B: Backend> {
    pub backend: &'a mut B,
    pub schedule: &'a dyn Schedule,
    param: Parameterization,
    clip: Option<X0Clip>,
    rows: usize,
    step: usize,
    /// Model evaluations, counted per sample: a call on k of the B rows adds k/B.
    evals: f64,
}

impl<'a, B: Backend> Ctx<'a, B> {
    /// A context for `rows` samples of a network predicting `param`. With `clip`, x̂0 is
    /// clamped or thresholded ([`X0Clip`]) and ε̂ recomputed from it.
    pub fn new(
        backend: &'a mut B,
        schedule: &'a dyn Schedule,
        param: Parameterization,
        clip: Option<X0Clip>,
        rows: usize,
    ) -> Self {
        Ctx {
            backend,
            schedule,
            param,
            clip,
            rows: rows.max(1),
            step: 0,
            evals: 0.0,
        }
    }

    /// Marks the start of step `i` (for progress, callbacks and error messages).
    pub fn begin_step(&mut self, i: usize, t: f64, x: &B::X) -> Result<()> {
        self.step = i;
        self.backend.begin_step(i, t, x)
    }

    /// The current step index.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Rows (samples) of the batch.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// One model evaluation at a time shared by all rows.
    pub fn denoise(&mut self, x: &B::X, t: f64) -> Result<Denoised<B::X>> {
        self.denoise_rows(x, &[t], self.rows)
    }

    /// One model evaluation with per-row times (or one shared time); `active` rows count
    /// toward the NFE.
    pub fn denoise_rows(&mut self, x: &B::X, t: &[f64], active: usize) -> Result<Denoised<B::X>> {
        let pred = self.backend.predict(x, t, self.step)?;
        self.evals += active as f64 / self.rows as f64;
        let coefs: Vec<Conversion> = t
            .iter()
            .map(|&t| conversion(self.param, self.schedule.alpha(t), self.schedule.sigma(t)))
            .collect();
        let col = |f: &dyn Fn(&Conversion) -> f64| -> Coef {
            Coef::from(coefs.iter().map(f).collect::<Vec<f64>>())
        };
        let mut d = match self.param {
            Parameterization::Eps => Denoised {
                x0: self.lincomb(&[(col(&|c| c.1[0]), x), (col(&|c| c.1[1]), &pred)])?,
                eps: pred,
            },
            Parameterization::X0 => Denoised {
                eps: self.lincomb(&[(col(&|c| c.0[0]), x), (col(&|c| c.0[1]), &pred)])?,
                x0: pred,
            },
            Parameterization::V | Parameterization::Flow => Denoised {
                eps: self.lincomb(&[(col(&|c| c.0[0]), x), (col(&|c| c.0[1]), &pred)])?,
                x0: self.lincomb(&[(col(&|c| c.1[0]), x), (col(&|c| c.1[1]), &pred)])?,
            },
        };
        if let Some(clip) = self.clip {
            // x̂0 clipped or thresholded, ε̂ made consistent with it: ε̂ = (x − α x̂0)/σ.
            d.x0 = clip.apply(self.backend, &d.x0)?;
            let back: Vec<Conversion> = t
                .iter()
                .map(|&t| {
                    let (a, s) = (self.schedule.alpha(t), self.schedule.sigma(t));
                    conversion(Parameterization::X0, a, s)
                })
                .collect();
            let ex = Coef::from(back.iter().map(|c| c.0[0]).collect::<Vec<f64>>());
            let ep = Coef::from(back.iter().map(|c| c.0[1]).collect::<Vec<f64>>());
            d.eps = self.lincomb(&[(ex, x), (ep, &d.x0)])?;
        }
        Ok(d)
    }

    /// `Σ_k c_k x_k` (coefficients may be per row).
    pub fn lincomb(&mut self, terms: &[(Coef, &B::X)]) -> Result<B::X> {
        self.backend.lincomb(terms)
    }

    /// `Σ_k c_k x_k` for batch-wide coefficients.
    pub fn lc(&mut self, terms: &[(f64, &B::X)]) -> Result<B::X> {
        let terms: Vec<(Coef, &B::X)> = terms.iter().map(|&(c, x)| (Coef::All(c), x)).collect();
        self.backend.lincomb(&terms)
    }

    /// Fresh standard normal noise shaped like `x`.
    pub fn noise_like(&mut self, x: &B::X) -> Result<B::X> {
        self.backend.noise(x)
    }

    /// See [`Backend::error_norm`].
    pub fn error_norm(
        &mut self,
        e: &B::X,
        a: &B::X,
        b: &B::X,
        rtol: f64,
        atol: f64,
        kind: Tolerance,
    ) -> Result<Vec<f64>> {
        self.backend.error_norm(e, a, b, rtol, atol, kind)
    }

    /// Model evaluations per sample so far.
    pub fn nfe(&self) -> f64 {
        self.evals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_between_parameterizations_are_exact_inverses() {
        // With α² + σ² = 1, x = α x0 + σ ε; each parameterization's prediction converts
        // back to (ε, x0).
        let (x0, eps) = (0.3f64, -1.1f64);
        for t in [0.2f64, 0.7] {
            let alpha_bar: f64 = (-3.0 * t).exp();
            let (a, s) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
            let x = a * x0 + s * eps;
            for (p, pred) in [
                (Parameterization::Eps, eps),
                (Parameterization::X0, x0),
                (Parameterization::V, a * eps - s * x0),
                (Parameterization::Flow, eps - x0),
            ] {
                let (e, d) = conversion(p, a, s);
                assert!((e[0] * x + e[1] * pred - eps).abs() < 1e-14, "{p}");
                assert!((d[0] * x + d[1] * pred - x0).abs() < 1e-14, "{p}");
            }
        }
    }
}
