//! qtaylor-core: the math of qtaylor, with no tensor library.
//!
//! - [`series`]: truncated power series (Taylor-mode differentiation);
//! - [`schedule`], [`grid`]: noise schedules and time grids (scalars only);
//! - [`exec`]: the [`exec::Backend`] trait through which samplers move tensors, and the
//!   shared [`exec::Ctx`] (prediction conversion, `clip_sample`, NFE count);
//! - [`samplers`]: one file per sampler family, one shared signature, generic over the
//!   backend;
//! - [`program`]: a fixed-grid sampler run recorded as a list of operations (the diffusers
//!   scheduler replays it);
//! - [`keys`]: the neutral names of settings, and errors that name them so that each front
//!   end spells them its own way (`--qt-last`, `qt_last=`);
//! - [`config`]: a run's schedule, grid and sampler settings as a front end parsed them, and
//!   the one builder of each.
//!
//! The `qtaylor` crate runs these samplers on candle tensors; the `qtaylor` Python
//! package runs them on PyTorch tensors. Neither writes a coefficient of its own.

pub mod config;
pub mod exec;
pub mod grid;
pub mod keys;
pub mod program;
pub mod samplers;
pub mod schedule;
pub mod series;
pub mod tune;

/// Least-squares slope of `ln y` against `ln x` (the order of convergence when y is an
/// error and x a step size; its negative when x is a step count).
pub fn loglog_slope(x: &[f64], y: &[f64]) -> f64 {
    assert_eq!(x.len(), y.len());
    let n = x.len() as f64;
    let lx: Vec<f64> = x.iter().map(|v| v.ln()).collect();
    let ly: Vec<f64> = y.iter().map(|v| v.ln()).collect();
    let (mx, my) = (lx.iter().sum::<f64>() / n, ly.iter().sum::<f64>() / n);
    let cov: f64 = lx.iter().zip(&ly).map(|(a, b)| (a - mx) * (b - my)).sum();
    let var: f64 = lx.iter().map(|a| (a - mx) * (a - mx)).sum();
    cov / var
}
