//! Reference end points for ODE samplers (DESIGN §8): the probability-flow ODE from
//! the same start noise, integrated in f64 to high accuracy, its accuracy checked by
//! halving the tolerance.
//!
//! The ODE is integrated in its exponential-integrator form (Lu et al. 2022,
//! DPM-Solver++ eq. 9): with `y = x/σ` and the log-SNR λ as the independent variable,
//!
//! ```text
//! dy/dλ = e^λ x̂0(σ y, t(λ)),
//! ```
//!
//! where x̂0 is nearly constant at low noise, so adaptive DOPRI5 needs few steps. Every
//! sample has its own steps ([`dopri5`]).
//!
//! From pure noise (α = 0, λ = −∞: rectified flow at ς = 1) the interval in λ is infinite;
//! there the ODE is first integrated in `ρ = e^λ = α/σ` (`dy/dρ = x̂0`, regular at ρ = 0:
//! the VE form, in which DDIM is Euler) up to λ = 0, then in λ.

use anyhow::{Result, bail};
use candle_core::{DType, Tensor};

use crate::models::model::Model;
use crate::sampling::samplers::runge_kutta::dopri5;
use crate::sampling::samplers::{CandleBackend, Ctx, with_ctx};
use crate::schedule::Schedule;
use crate::tensor::ops::{Coef, lincomb_rows, rows_f64};
use crate::tensor::rng::NoiseStreams;

/// A reference solution and its self-check.
pub struct Reference {
    /// End points at t_min, f64, shape of the start state.
    pub x: Tensor,
    /// The tolerance it was computed with (rtol = atol).
    pub tol: f64,
    /// Max |x(tol) − x(tol/2)| over all entries: the estimate of its own error.
    pub check: f64,
    /// Model evaluations per sample of the tol run.
    pub nfe: f64,
    /// Model evaluations of the tol run summed over the samples (`nfe` × rows, exactly).
    pub row_evals: u64,
}

/// Integrates the PF-ODE from `x_init` at `t_max` to `t_min` with rtol = atol = `tol`;
/// returns the end points and the model evaluations summed over the samples.
pub fn integrate_pf_ode(
    model: &dyn Model,
    schedule: &dyn Schedule,
    x_init: &Tensor,
    t_max: f64,
    t_min: f64,
    tol: f64,
) -> Result<(Tensor, u64)> {
    let b = x_init.dims()[0];
    let x = x_init.to_dtype(DType::F64)?;
    let (l0, l1) = (schedule.lambda(t_max), schedule.lambda(t_min));
    let mut noise = NoiseStreams::new(0, 0, b);
    // The time of log-SNR l (the ends exactly).
    let time = |l: f64| -> Result<f64> {
        if l == l0 {
            Ok(t_max)
        } else if l == l1 {
            Ok(t_min)
        } else {
            schedule.t_of_lambda(l)
        }
    };
    // dy/dλ = e^λ x̂0 (in_rho = false) or dy/dρ = x̂0 at λ = ln ρ (in_rho = true).
    let field = |in_rho: bool| {
        move |ctx: &mut Ctx<CandleBackend>,
              y: &Tensor,
              v: &[f64],
              active: usize|
              -> Result<Tensor> {
            let lam: Vec<f64> = v.iter().map(|&v| if in_rho { v.ln() } else { v }).collect();
            let t: Vec<f64> = lam.iter().map(|&l| time(l)).collect::<Result<_>>()?;
            let sig: Vec<f64> = t.iter().map(|&t| schedule.sigma(t)).collect();
            let x = lincomb_rows(&[(Coef::Rows(sig), y)])?;
            let d = ctx.denoise_rows(&x, &t, active)?;
            if in_rho {
                return Ok(d.x0);
            }
            lincomb_rows(&[(Coef::Rows(lam.iter().map(|l| l.exp()).collect()), &d.x0)])
        }
    };
    let y0 = (x / schedule.sigma(t_max))?;
    let (y, evals) = with_ctx(model, schedule, &mut noise, "reference", |ctx| {
        let mut y = y0;
        let mut evals = 0u64;
        let mut from = l0;
        if l0 == f64::NEG_INFINITY {
            let to = l1.min(0.0);
            let sol = dopri5(
                ctx,
                &mut field(true),
                y,
                0.0,
                to.exp(),
                tol,
                tol,
                10_000_000,
            )?;
            evals += sol.evals.iter().sum::<usize>() as u64;
            y = sol.y;
            from = to;
        }
        if from < l1 {
            let sol = dopri5(ctx, &mut field(false), y, from, l1, tol, tol, 10_000_000)?;
            evals += sol.evals.iter().sum::<usize>() as u64;
            y = sol.y;
        }
        Ok((y, evals))
    })?;
    Ok(((y * schedule.sigma(t_min))?, evals))
}

/// The reference end point, computed at `tol` and at `tol/2`; `check` is their largest
/// difference.
pub fn reference_endpoint(
    model: &dyn Model,
    schedule: &dyn Schedule,
    x_init: &Tensor,
    t_max: f64,
    t_min: f64,
    tol: f64,
) -> Result<Reference> {
    if tol.is_nan() || tol <= 0.0 {
        bail!("reference tolerance must be positive, got {tol}");
    }
    let b = x_init.dims()[0];
    let (x, row_evals) = integrate_pf_ode(model, schedule, x_init, t_max, t_min, tol)?;
    let (x2, _) = integrate_pf_ode(model, schedule, x_init, t_max, t_min, tol / 2.0)?;
    let check = rows_f64(&x)?
        .iter()
        .flatten()
        .zip(rows_f64(&x2)?.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    Ok(Reference {
        x: x2,
        tol: tol / 2.0,
        check,
        nfe: row_evals as f64 / b as f64,
        row_evals,
    })
}
