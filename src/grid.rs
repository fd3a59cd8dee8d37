//! Time grids `t_0 = t_max > t_1 > … > t_N = t_min` (DESIGN §7).

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};

use crate::schedule::Schedule;

/// How the N steps are spaced.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Grid {
    /// `t_i = t_max + (t_min − t_max) i/N`.
    Uniform,
    /// `t_i = t_min + (t_max − t_min) ((N − i)/N)²` (DDIM's quadratic spacing).
    Quadratic,
    /// λ uniform between `λ(t_max)` and `λ(t_min)` (DPM-Solver).
    LogSnr,
    /// Karras et al. (EDM) ρ-spacing in `ς = σ/α`:
    /// `ς_i = (ς_max^{1/ρ} + i/N (ς_min^{1/ρ} − ς_max^{1/ρ}))^ρ`, mapped back to t through λ = −ln ς.
    Karras { rho: f64 },
}

impl FromStr for Grid {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "uniform" => Grid::Uniform,
            "quadratic" => Grid::Quadratic,
            "logsnr" => Grid::LogSnr,
            "karras" => Grid::Karras { rho: 7.0 },
            other => {
                bail!("unknown grid '{other}'; expected one of: uniform, quadratic, logsnr, karras")
            }
        })
    }
}

impl fmt::Display for Grid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Grid::Uniform => write!(f, "uniform"),
            Grid::Quadratic => write!(f, "quadratic"),
            Grid::LogSnr => write!(f, "logsnr"),
            Grid::Karras { .. } => write!(f, "karras"),
        }
    }
}

/// Checks the interval of integration against the schedule's domain.
pub fn check_interval(schedule: &dyn Schedule, t_max: f64, t_min: f64) -> Result<()> {
    if t_min.is_nan() || t_min <= 0.0 {
        bail!("--t-min {t_min}: expected t_min > 0");
    }
    if t_min >= t_max {
        bail!("--t-min {t_min} must be smaller than --t-max {t_max}");
    }
    if t_max > schedule.t_end() {
        bail!(
            "--t-max {t_max} is beyond the end {} of schedule {}",
            schedule.t_end(),
            schedule.name()
        );
    }
    Ok(())
}

impl Grid {
    /// The `steps + 1` times from `t_max` down to `t_min`; endpoints are exact.
    pub fn times(
        &self,
        schedule: &dyn Schedule,
        steps: usize,
        t_max: f64,
        t_min: f64,
    ) -> Result<Vec<f64>> {
        if steps == 0 {
            bail!("--steps 0: at least one step is needed");
        }
        check_interval(schedule, t_max, t_min)?;
        let n = steps as f64;
        let mut ts: Vec<f64> = match *self {
            Grid::Uniform => (0..=steps)
                .map(|i| t_max + (t_min - t_max) * i as f64 / n)
                .collect(),
            Grid::Quadratic => (0..=steps)
                .map(|i| {
                    let u = (steps - i) as f64 / n;
                    t_min + (t_max - t_min) * u * u
                })
                .collect(),
            Grid::LogSnr => {
                let (l0, l1) = (schedule.lambda(t_max), schedule.lambda(t_min));
                (0..=steps)
                    .map(|i| schedule.t_of_lambda(l0 + (l1 - l0) * i as f64 / n))
                    .collect::<Result<_>>()?
            }
            Grid::Karras { rho } => {
                let smax = (-schedule.lambda(t_max)).exp().powf(1.0 / rho);
                let smin = (-schedule.lambda(t_min)).exp().powf(1.0 / rho);
                (0..=steps)
                    .map(|i| {
                        let s = (smax + (smin - smax) * i as f64 / n).powf(rho);
                        schedule.t_of_lambda(-s.ln())
                    })
                    .collect::<Result<_>>()?
            }
        };
        ts[0] = t_max;
        ts[steps] = t_min;
        for i in 0..steps {
            if ts[i + 1] >= ts[i] {
                bail!(
                    "grid {self} with {steps} steps is not strictly decreasing at step {i}: {} -> {}",
                    ts[i],
                    ts[i + 1]
                );
            }
        }
        Ok(ts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::VpLinear;

    #[test]
    fn every_grid_runs_from_t_max_to_t_min_and_decreases() {
        let s = VpLinear::default();
        for g in [
            Grid::Uniform,
            Grid::Quadratic,
            Grid::LogSnr,
            Grid::Karras { rho: 7.0 },
        ] {
            let ts = g.times(&s, 10, 1.0, 1e-3).unwrap();
            assert_eq!(ts.len(), 11);
            assert_eq!(ts[0], 1.0);
            assert_eq!(ts[10], 1e-3);
            assert!(ts.windows(2).all(|w| w[1] < w[0]), "{g}");
        }
    }

    #[test]
    fn logsnr_grid_is_uniform_in_lambda_and_karras_in_sigma_over_alpha() {
        let s = VpLinear::default();
        let ts = Grid::LogSnr.times(&s, 8, 1.0, 1e-3).unwrap();
        let l: Vec<f64> = ts.iter().map(|&t| s.lambda(t)).collect();
        let d = l[1] - l[0];
        for w in l.windows(2) {
            assert!((w[1] - w[0] - d).abs() < 1e-9);
        }
        let ts = Grid::Karras { rho: 7.0 }.times(&s, 8, 1.0, 1e-3).unwrap();
        let r: Vec<f64> = ts
            .iter()
            .map(|&t| (s.sigma(t) / s.alpha(t)).powf(1.0 / 7.0))
            .collect();
        let d = r[1] - r[0];
        for w in r.windows(2) {
            assert!((w[1] - w[0] - d).abs() < 1e-9);
        }
    }

    #[test]
    fn bad_grids_are_rejected_with_the_offending_value() {
        let s = VpLinear::default();
        let e = Grid::Uniform.times(&s, 0, 1.0, 1e-3).unwrap_err();
        assert!(e.to_string().contains("--steps 0"));
        let e = Grid::Uniform.times(&s, 5, 0.5, 0.5).unwrap_err();
        assert!(e.to_string().contains("--t-min 0.5"));
        let e = "cubic".parse::<Grid>().unwrap_err();
        assert!(e.to_string().contains("uniform, quadratic, logsnr, karras"));
    }
}
