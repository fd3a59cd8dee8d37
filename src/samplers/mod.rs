//! Samplers, one file per family, all with one signature (k-diffusion style):
//!
//! ```text
//! fn sample_xxx(ctx: &mut Ctx, x: Tensor, ts: &[f64], …options) -> Result<Tensor>
//! ```
//!
//! `ts` runs from `t_max` down to `t_min`; each sampler turns (schedule, grid, model
//! output) into f64 coefficients and one fused tensor update per step
//! ([`crate::ops::lincomb`]). [`Ctx`] is the only door to the model: it counts NFE,
//! converts predictions, and stops on NaN/Inf naming the step, the time and the sampler.

pub mod ddim;
pub mod euler_maruyama;
pub mod quasi_ito_taylor;
pub mod quasi_taylor;
pub mod runge_kutta;

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};
use candle_core::Tensor;
use indicatif::ProgressBar;

use crate::model::{Denoised, Model, to_eps_x0};
use crate::rng::NoiseStreams;
use crate::schedule::Schedule;

pub use quasi_taylor::{Expansion, LastStep};

/// Everything a sampler may touch besides its state: the model (through NFE-counting,
/// finiteness-checking calls), the schedule and the per-sample noise streams.
pub struct Ctx<'a> {
    model: &'a dyn Model,
    pub schedule: &'a dyn Schedule,
    noise: &'a mut NoiseStreams,
    sampler: String,
    step: usize,
    /// Model evaluations, counted per sample: a call on k of the B rows adds k/B.
    evals: f64,
    batch: usize,
    progress: Option<&'a ProgressBar>,
}

impl<'a> Ctx<'a> {
    pub fn new(
        model: &'a dyn Model,
        schedule: &'a dyn Schedule,
        noise: &'a mut NoiseStreams,
        sampler: &str,
        progress: Option<&'a ProgressBar>,
    ) -> Self {
        let batch = noise.len();
        Ctx {
            model,
            schedule,
            noise,
            sampler: sampler.to_string(),
            step: 0,
            evals: 0.0,
            batch,
            progress,
        }
    }

    /// Marks the start of step `i` (for progress and error messages).
    pub fn begin_step(&mut self, i: usize, t: f64) {
        self.step = i;
        if let Some(pb) = self.progress {
            pb.set_position(i as u64);
            pb.set_message(format!("t = {t:.4}"));
        }
    }

    /// One model evaluation at a time shared by all rows.
    pub fn denoise(&mut self, x: &Tensor, t: f64) -> Result<Denoised> {
        self.denoise_rows(x, &[t], self.batch)
    }

    /// One model evaluation with per-row times; `active` rows count toward the NFE.
    pub fn denoise_rows(&mut self, x: &Tensor, t: &[f64], active: usize) -> Result<Denoised> {
        let pred = self.model.predict(x, t)?;
        self.evals += active as f64 / self.batch.max(1) as f64;
        if !crate::ops::all_finite(&pred)? {
            let when = if t.len() == 1 {
                format!("t = {}", t[0])
            } else {
                format!("t in [{}, {}]", fmin(t), fmax(t))
            };
            bail!(
                "model output contains NaN or Inf at step {} ({when}) of sampler {}; nothing was written",
                self.step,
                self.sampler
            );
        }
        to_eps_x0(self.model.parameterization(), &pred, x, t, self.schedule)
    }

    /// Fresh standard normal noise shaped like `x`, from the per-sample streams.
    pub fn noise_like(&mut self, x: &Tensor) -> Result<Tensor> {
        self.noise.normal(&x.dims()[1..], x.dtype(), x.device())
    }

    /// Model evaluations per sample so far.
    pub fn nfe(&self) -> f64 {
        self.evals
    }
}

fn fmin(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::INFINITY, f64::min)
}
fn fmax(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
}

/// The variance of DDPM's ancestral step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DdpmVariance {
    /// Posterior variance `β̃ = (1 − ᾱ_s)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_s)` (`fixed_small`).
    BetaTilde,
    /// `β = 1 − ᾱ_t/ᾱ_s` (`fixed_large`).
    Beta,
}

impl FromStr for DdpmVariance {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "beta-tilde" | "posterior" => DdpmVariance::BetaTilde,
            "beta" => DdpmVariance::Beta,
            other => bail!("unknown --ddpm-variance '{other}'; expected beta-tilde or beta"),
        })
    }
}

/// Options shared by the samplers (each reads the ones it needs).
#[derive(Clone, Debug)]
pub struct Options {
    /// DDIM's η ∈ [0, 1] (0: deterministic).
    pub eta: f64,
    /// Expansion variable of the quasi-Taylor series.
    pub expand: Expansion,
    /// How quasi-Taylor takes the final step.
    pub qt_last: LastStep,
    pub ddpm_variance: DdpmVariance,
    /// Tolerances of the adaptive rk45.
    pub rtol: f64,
    pub atol: f64,
    /// One extra NFE at the end that returns x̂0 at t_min.
    pub denoise_final: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            eta: 0.0,
            expand: Expansion::T,
            qt_last: LastStep::Ddim,
            ddpm_variance: DdpmVariance::BetaTilde,
            rtol: 1e-5,
            atol: 1e-5,
            denoise_final: false,
        }
    }
}

impl Options {
    /// Rejects option values no sampler accepts.
    pub fn validate(&self) -> Result<()> {
        if !(self.eta >= 0.0 && self.eta.is_finite()) {
            bail!("--eta {}: expected a value >= 0", self.eta);
        }
        if !(self.rtol > 0.0 && self.atol > 0.0) {
            bail!(
                "--rtol {} / --atol {}: expected positive tolerances",
                self.rtol,
                self.atol
            );
        }
        Ok(())
    }
}

/// A sampler, parsed from its command-line name.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    /// `qt-K`: quasi-Taylor of order K on the probability-flow ODE.
    QuasiTaylor(usize),
    /// `qit-1`, `qit-2`: quasi-Itô-Taylor on the reverse SDE.
    QuasiItoTaylor(usize),
    /// `qit-inf`: the exact SPA transition (the DDPM posterior).
    QitInf,
    Ddim,
    Ddpm,
    Euler,
    Heun,
    Rk4,
    Rk45,
    EulerMaruyama,
}

/// One line of `qtaylor samplers`.
pub struct CatalogEntry {
    pub name: &'static str,
    pub nfe_per_step: &'static str,
    pub description: &'static str,
}

/// Every sampler with its NFE per step and a one-line description.
pub fn catalog() -> Vec<CatalogEntry> {
    let e = |name, nfe_per_step, description| CatalogEntry {
        name,
        nfe_per_step,
        description,
    };
    vec![
        e(
            "qt-K",
            "1",
            "quasi-Taylor order K >= 1 on the PF-ODE, ideal derivatives (arXiv 2112.13339); --expand t|abar|logsnr",
        ),
        e(
            "qit-1",
            "1",
            "quasi-Ito-Taylor order 1 on the reverse SDE (= Euler-Maruyama)",
        ),
        e(
            "qit-2",
            "1",
            "quasi-Ito-Taylor order 2: Kloeden-Platen strong 1.5 scheme with ideal derivatives",
        ),
        e(
            "qit-inf",
            "1",
            "exact single-point transition of the reverse SDE (DDPM posterior)",
        ),
        e("ddim", "1", "DDIM (Song et al. 2021), --eta in [0,1]"),
        e(
            "ddpm",
            "1",
            "DDPM ancestral sampling, --ddpm-variance beta-tilde|beta",
        ),
        e("euler", "1", "Euler on the probability-flow ODE in t"),
        e("heun", "2", "Heun (explicit trapezoid) on the PF-ODE in t"),
        e("rk4", "4", "classical Runge-Kutta 4 on the PF-ODE in t"),
        e(
            "rk45",
            "adaptive",
            "Dormand-Prince 5(4), per-sample step control, --rtol/--atol",
        ),
        e("em", "1", "Euler-Maruyama on the reverse SDE"),
    ]
}

fn valid_names() -> String {
    catalog()
        .iter()
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for Sampler {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let order = |rest: &str| -> Result<usize> {
            let k: usize = rest.parse().map_err(|_| {
                anyhow::anyhow!("sampler '{s}': the order '{rest}' is not a positive integer")
            })?;
            if k == 0 {
                bail!("sampler '{s}': order 0 is not a sampler; the order must be >= 1");
            }
            Ok(k)
        };
        Ok(match s {
            "qit-inf" => Sampler::QitInf,
            "ddim" => Sampler::Ddim,
            "ddpm" => Sampler::Ddpm,
            "euler" => Sampler::Euler,
            "heun" => Sampler::Heun,
            "rk4" => Sampler::Rk4,
            "rk45" => Sampler::Rk45,
            "em" => Sampler::EulerMaruyama,
            _ if s.starts_with("qit-") => {
                let k = order(&s[4..])?;
                if k > 2 {
                    bail!("sampler '{s}': quasi-Ito-Taylor exists for orders 1, 2 and inf");
                }
                Sampler::QuasiItoTaylor(k)
            }
            _ if s.starts_with("qt-") => Sampler::QuasiTaylor(order(&s[3..])?),
            _ => bail!("unknown sampler '{s}'; valid samplers: {}", valid_names()),
        })
    }
}

impl fmt::Display for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sampler::QuasiTaylor(k) => write!(f, "qt-{k}"),
            Sampler::QuasiItoTaylor(k) => write!(f, "qit-{k}"),
            Sampler::QitInf => write!(f, "qit-inf"),
            Sampler::Ddim => write!(f, "ddim"),
            Sampler::Ddpm => write!(f, "ddpm"),
            Sampler::Euler => write!(f, "euler"),
            Sampler::Heun => write!(f, "heun"),
            Sampler::Rk4 => write!(f, "rk4"),
            Sampler::Rk45 => write!(f, "rk45"),
            Sampler::EulerMaruyama => write!(f, "em"),
        }
    }
}

/// Parses a comma-separated list of sampler names.
pub fn parse_list(s: &str) -> Result<Vec<Sampler>> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim().parse())
        .collect()
}

impl Sampler {
    /// Model evaluations per step on a fixed grid (`None`: adaptive).
    pub fn nfe_per_step(&self) -> Option<usize> {
        match self {
            Sampler::Heun => Some(2),
            Sampler::Rk4 => Some(4),
            Sampler::Rk45 => None,
            _ => Some(1),
        }
    }

    /// True for samplers that draw fresh noise during sampling.
    pub fn is_stochastic(&self, opts: &Options) -> bool {
        match self {
            Sampler::QuasiItoTaylor(_)
            | Sampler::QitInf
            | Sampler::Ddpm
            | Sampler::EulerMaruyama => true,
            Sampler::Ddim => opts.eta > 0.0,
            _ => false,
        }
    }

    /// The most steps whose NFE fits in `budget` (`None` if not even one step fits or the
    /// sampler is adaptive).
    pub fn steps_for_budget(&self, budget: usize, opts: &Options) -> Option<usize> {
        let per = self.nfe_per_step()?;
        let fixed = usize::from(opts.denoise_final);
        let steps = budget.checked_sub(fixed)? / per;
        (steps >= 1).then_some(steps)
    }

    /// Runs the sampler from `x` at `ts[0]` down to `ts[N]`.
    pub fn run(&self, ctx: &mut Ctx, x: Tensor, ts: &[f64], opts: &Options) -> Result<Tensor> {
        match *self {
            Sampler::QuasiTaylor(k) => {
                quasi_taylor::sample_qt(ctx, x, ts, k, opts.expand, opts.qt_last)
            }
            Sampler::QuasiItoTaylor(1) => euler_maruyama::sample_em(ctx, x, ts),
            Sampler::QuasiItoTaylor(_) => quasi_ito_taylor::sample_qit2(ctx, x, ts),
            Sampler::QitInf => ddim::sample_ddim(ctx, x, ts, 1.0),
            Sampler::Ddim => ddim::sample_ddim(ctx, x, ts, opts.eta),
            Sampler::Ddpm => ddim::sample_ddpm(ctx, x, ts, opts.ddpm_variance),
            Sampler::Euler => runge_kutta::sample_euler(ctx, x, ts),
            Sampler::Heun => runge_kutta::sample_heun(ctx, x, ts),
            Sampler::Rk4 => runge_kutta::sample_rk4(ctx, x, ts),
            Sampler::Rk45 => runge_kutta::sample_rk45(ctx, x, ts, opts.rtol, opts.atol),
            Sampler::EulerMaruyama => euler_maruyama::sample_em(ctx, x, ts),
        }
    }
}

/// The result of a sampling run.
pub struct Run {
    pub x: Tensor,
    /// Model evaluations per sample.
    pub nfe: f64,
}

/// Runs `sampler` from `x_init` (the state at `ts[0]`) over the grid `ts`, adding the final
/// x̂0 call when `opts.denoise_final` is set.
#[allow(clippy::too_many_arguments)] // the k-diffusion signature plus noise and progress
pub fn sample(
    model: &dyn Model,
    schedule: &dyn Schedule,
    sampler: Sampler,
    opts: &Options,
    ts: &[f64],
    x_init: Tensor,
    noise: &mut NoiseStreams,
    progress: Option<&ProgressBar>,
) -> Result<Run> {
    opts.validate()?;
    if ts.len() < 2 {
        bail!("a time grid needs at least one step");
    }
    if x_init.dims().first() != Some(&noise.len()) {
        bail!(
            "the start state has {} rows but there are {} noise streams",
            x_init.dims().first().copied().unwrap_or(0),
            noise.len()
        );
    }
    let name = sampler.to_string();
    let mut ctx = Ctx::new(model, schedule, noise, &name, progress);
    let mut x = sampler.run(&mut ctx, x_init, ts, opts)?;
    if opts.denoise_final {
        let n = ts.len() - 1;
        ctx.begin_step(n, ts[n]);
        x = ctx.denoise(&x, ts[n])?.x0;
    }
    if let Some(pb) = progress {
        pb.set_position((ts.len() - 1) as u64);
    }
    Ok(Run { x, nfe: ctx.nfe() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_names_round_trip_and_bad_names_list_the_valid_ones() {
        for n in [
            "qt-1", "qt-7", "qit-1", "qit-2", "qit-inf", "ddim", "ddpm", "euler", "heun", "rk4",
            "rk45", "em",
        ] {
            assert_eq!(n.parse::<Sampler>().unwrap().to_string(), n);
        }
        let e = "foo".parse::<Sampler>().unwrap_err().to_string();
        assert!(
            e.contains("unknown sampler 'foo'") && e.contains("qt-K") && e.contains("rk45"),
            "{e}"
        );
        let e = "qt-0".parse::<Sampler>().unwrap_err().to_string();
        assert!(e.contains("order 0"), "{e}");
        assert!("qit-3".parse::<Sampler>().is_err());
        assert!("qt-x".parse::<Sampler>().is_err());
    }

    #[test]
    fn step_budget_uses_the_most_steps_that_fit() {
        let o = Options::default();
        assert_eq!(Sampler::Heun.steps_for_budget(5, &o), Some(2));
        assert_eq!(Sampler::Rk4.steps_for_budget(5, &o), Some(1));
        assert_eq!(Sampler::Rk4.steps_for_budget(3, &o), None);
        assert_eq!(Sampler::QuasiTaylor(3).steps_for_budget(10, &o), Some(10));
        let o = Options {
            denoise_final: true,
            ..o
        };
        assert_eq!(Sampler::QuasiTaylor(3).steps_for_budget(10, &o), Some(9));
    }
}
