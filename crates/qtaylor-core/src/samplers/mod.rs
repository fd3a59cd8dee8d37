//! Samplers, one file per family, all with one signature (k-diffusion style):
//!
//! ```text
//! fn sample_xxx<B: Backend>(ctx: &mut Ctx<B>, x: B::X, ts: &[f64], …options) -> Result<B::X>
//! ```
//!
//! `ts` runs from `t_max` down to `t_min`; each sampler turns (schedule, grid, model
//! output) into f64 coefficients and one linear combination per update
//! ([`Ctx::lc`]). [`Ctx`] is the only door to the tensors (see [`crate::exec`]): the same
//! code runs on candle tensors, on PyTorch tensors through the Python bindings, and on the
//! recorder that writes a diffusers scheduler's program.

pub mod ddim;
pub mod deis;
pub mod dpm_solver;
pub mod dpm_solver_pp;
pub mod edm;
pub mod euler_maruyama;
pub mod k_diffusion;
pub mod pndm;
pub mod quasi_ito_taylor;
pub mod quasi_taylor;
pub mod runge_kutta;
pub mod unipc;

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};

pub use crate::exec::{Backend, Ctx, Denoised};
use crate::keys::{self, Key, Value};
use crate::schedule::Schedule;
use crate::{bail_option, option_error};

pub use quasi_taylor::{Expansion, LastStep};
pub use unipc::UniPcVariant;

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
            other => bail_option!(
                (keys::DDPM_VARIANCE, other),
                ": unknown DDPM variance; expected beta-tilde or beta"
            ),
        })
    }
}

/// Options shared by the samplers (each reads the ones it needs).
#[derive(Clone, Debug)]
pub struct Options {
    /// Stochasticity η ≥ 0: DDIM's η (default 0) and dpmpp-2m-sde's η (default 1). `None`
    /// takes each sampler's default.
    pub eta: Option<f64>,
    /// Expansion variable of the quasi-Taylor series.
    pub expand: Expansion,
    /// How quasi-Taylor takes the final step.
    pub qt_last: LastStep,
    pub ddpm_variance: DdpmVariance,
    /// Tolerances of the adaptive solvers (`None`: rk45 1e-5/1e-5, DPM-Solver-12/23 the
    /// reference code's rtol 0.05, atol 0.0078).
    pub rtol: Option<f64>,
    pub atol: Option<f64>,
    /// Multistep samplers lower their order over the last steps (when fewer than 15 steps;
    /// UniPC always), as the reference implementations do.
    pub lower_order_final: bool,
    /// UniPC's B(h): bh1 (B = h) or bh2 (B = e^h − 1).
    pub unipc_variant: UniPcVariant,
    /// UniPC's corrector UniC (on by default).
    pub unipc_corrector: bool,
    /// EDM stochastic churn: S_churn, S_tmin, S_tmax, S_noise (in σ/α units).
    pub s_churn: f64,
    pub s_tmin: f64,
    pub s_tmax: f64,
    pub s_noise: f64,
    /// One extra NFE at the end that returns x̂0 at t_min.
    pub denoise_final: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            eta: None,
            expand: Expansion::T,
            qt_last: LastStep::Ddim,
            ddpm_variance: DdpmVariance::BetaTilde,
            rtol: None,
            atol: None,
            lower_order_final: false,
            unipc_variant: UniPcVariant::Bh2,
            unipc_corrector: true,
            s_churn: 0.0,
            s_tmin: 0.0,
            s_tmax: f64::INFINITY,
            s_noise: 1.0,
            denoise_final: false,
        }
    }
}

impl Options {
    /// Rejects option values no sampler accepts.
    pub fn validate(&self) -> Result<()> {
        if let Some(eta) = self.eta
            && !(eta >= 0.0 && eta.is_finite())
        {
            bail_option!((keys::ETA, eta), ": expected a value >= 0");
        }
        for (key, v) in [(keys::RTOL, self.rtol), (keys::ATOL, self.atol)] {
            if let Some(v) = v
                && !(v > 0.0 && v.is_finite())
            {
                bail_option!((key, v), ": expected a positive tolerance");
            }
        }
        if !(self.s_churn >= 0.0
            && self.s_noise >= 0.0
            && self.s_tmin >= 0.0
            && self.s_tmax >= self.s_tmin)
        {
            bail_option!(
                (keys::S_CHURN, self.s_churn),
                " ",
                (keys::S_NOISE, self.s_noise),
                " ",
                (keys::S_TMIN, self.s_tmin),
                " ",
                (keys::S_TMAX, self.s_tmax),
                ": expected churn, noise >= 0 and 0 <= s_tmin <= s_tmax"
            );
        }
        Ok(())
    }

    /// The options set to something other than their defaults, with their values, for
    /// [`check_keys_used`]. Not listed: the DDPM variance, whose default comes from a
    /// checkpoint's `variance_type` (the caller knows whether the user gave it), and
    /// `denoise_final`, which every sampler honours.
    pub fn set_keys(&self) -> Vec<(Key, Value)> {
        let d = Options::default();
        let mut g = Vec::new();
        let mut put = |on: bool, key: Key, v: Value| {
            if on {
                g.push((key, v));
            }
        };
        if let Some(eta) = self.eta {
            put(true, keys::ETA, eta.into());
        }
        put(
            self.expand != d.expand,
            keys::EXPAND,
            self.expand.to_string().into(),
        );
        put(
            self.qt_last != d.qt_last,
            keys::QT_LAST,
            self.qt_last.to_string().into(),
        );
        if let Some(v) = self.rtol {
            put(true, keys::RTOL, v.into());
        }
        if let Some(v) = self.atol {
            put(true, keys::ATOL, v.into());
        }
        put(
            self.lower_order_final != d.lower_order_final,
            keys::LOWER_ORDER_FINAL,
            self.lower_order_final.into(),
        );
        put(
            self.unipc_variant != d.unipc_variant,
            keys::UNIPC_VARIANT,
            self.unipc_variant.to_string().into(),
        );
        put(
            self.unipc_corrector != d.unipc_corrector,
            keys::UNIPC_CORRECTOR,
            self.unipc_corrector.into(),
        );
        put(
            self.s_churn != d.s_churn,
            keys::S_CHURN,
            self.s_churn.into(),
        );
        put(self.s_tmin != d.s_tmin, keys::S_TMIN, self.s_tmin.into());
        put(self.s_tmax != d.s_tmax, keys::S_TMAX, self.s_tmax.into());
        put(
            self.s_noise != d.s_noise,
            keys::S_NOISE,
            self.s_noise.into(),
        );
        g
    }

    /// η with a sampler's default.
    pub fn eta_or(&self, default: f64) -> f64 {
        self.eta.unwrap_or(default)
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
    /// `dpm-solver-K`, K = 1, 2, 3: single-step DPM-Solver in λ (noise prediction).
    DpmSolver(usize),
    /// `dpm-solver-fast`: the paper's order-3 mix for an NFE budget.
    DpmSolverFast,
    /// `dpm-solver-12` / `dpm-solver-23` (alias `dpm-solver-adaptive`): embedded pairs with
    /// step-size control; the number is the higher order.
    DpmSolverAdaptive(usize),
    /// `dpmpp-2m`, `dpmpp-3m`: multistep DPM-Solver++ (data prediction).
    DpmPpMultistep(usize),
    /// `dpmpp-2s`: single-step DPM-Solver++(2S).
    DpmPp2S,
    /// `dpmpp-2m-sde`: SDE-DPM-Solver++(2M).
    DpmPp2MSde,
    /// `unipc-K`, K = 1, 2, 3.
    UniPc(usize),
    Pndm,
    Plms,
    Ipndm,
    /// `deis-K`, K = 1, 2, 3 (tAB).
    Deis(usize),
    /// `deis-logrho-K`, K = 1, 2, 3 (diffusers' DEIS: Lagrange in ln ρ, integrated in ρ).
    DeisLogRho(usize),
    /// `dpmpp-singlestep-K`, K = 1, 2: diffusers' DPMSolverSinglestep (DPM-Solver++ in groups
    /// of the grid's own points).
    DpmPpSinglestep(usize),
    EdmHeun,
    /// `k-euler`: Euler in ς = σ/α with Karras' churn (k-diffusion, diffusers' Euler).
    KEuler,
    /// `k-euler-a`: Euler ancestral in ς, η (default 1).
    KEulerAncestral,
    /// `k-heun`: Heun in ς with churn on the given grid.
    KHeun,
    /// `k-dpm2`: DPM2 in ς (midpoint at the geometric mean) with churn.
    KDpm2,
    /// `k-dpm2-a`: DPM2 ancestral in ς, η (default 1).
    KDpm2Ancestral,
    /// `k-lms` (order 4) or `k-lms-K`, K = 1 … 4: linear multistep in ς.
    KLms(usize),
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
        e(
            "dpm-solver-1",
            "1",
            "DPM-Solver-1 (= DDIM), arXiv 2206.00927",
        ),
        e(
            "dpm-solver-2",
            "2",
            "DPM-Solver-2, single-step, midpoint in lambda",
        ),
        e(
            "dpm-solver-3",
            "3",
            "DPM-Solver-3, single-step, r = 1/3, 2/3",
        ),
        e(
            "dpm-solver-fast",
            "1",
            "DPM-Solver-fast: order-3 steps uniform in lambda, --steps is the NFE",
        ),
        e(
            "dpm-solver-12",
            "adaptive",
            "adaptive DPM-Solver-1/2 pair, per-sample steps, --rtol/--atol",
        ),
        e(
            "dpm-solver-23",
            "adaptive",
            "adaptive DPM-Solver-2/3 pair (alias dpm-solver-adaptive)",
        ),
        e(
            "dpmpp-2m",
            "1",
            "DPM-Solver++(2M), multistep, data prediction, arXiv 2211.01095",
        ),
        e(
            "dpmpp-3m",
            "1",
            "DPM-Solver++(3M), multistep, data prediction",
        ),
        e(
            "dpmpp-2s",
            "2",
            "DPM-Solver++(2S), single-step, data prediction",
        ),
        e(
            "dpmpp-2m-sde",
            "1",
            "SDE-DPM-Solver++(2M), --eta (default 1)",
        ),
        e(
            "unipc-1",
            "1",
            "UniPC order 1 (arXiv 2302.04867), --unipc-variant bh1|bh2, --no-corrector",
        ),
        e("unipc-2", "1", "UniPC order 2 (UniP-2 + UniC)"),
        e("unipc-3", "1", "UniPC order 3 (UniP-3 + UniC)"),
        e(
            "pndm",
            "1 (+3x3 warm-up)",
            "PNDM (arXiv 2202.09778): pseudo-RK4 warm-up, then 4-step linear multistep",
        ),
        e(
            "plms",
            "1 (+1)",
            "PLMS: PNDM without the RK warm-up (one Heun step, then AB2..AB4)",
        ),
        e(
            "ipndm",
            "1",
            "improved PNDM (DEIS paper): Adams-Bashforth 1..4 on eps, DDIM transfer",
        ),
        e("deis-1", "1", "DEIS tAB order 1 (= DDIM), arXiv 2204.13902"),
        e(
            "deis-2",
            "1",
            "DEIS tAB order 2: exponential integrator, Lagrange extrapolation of eps in t",
        ),
        e("deis-3", "1", "DEIS tAB order 3"),
        e(
            "deis-logrho-1",
            "1",
            "DEIS in log rho order 1 (= DDIM; diffusers' DEISMultistep)",
        ),
        e(
            "deis-logrho-2",
            "1",
            "DEIS in log rho order 2: eps Lagrange in ln(sigma/alpha), integrated in sigma/alpha (diffusers' DEISMultistep)",
        ),
        e("deis-logrho-3", "1", "DEIS in log rho order 3"),
        e(
            "dpmpp-singlestep-1",
            "1",
            "DPM-Solver++ singlestep order 1 (= DDIM; diffusers' DPMSolverSinglestep)",
        ),
        e(
            "dpmpp-singlestep-2",
            "1",
            "DPM-Solver++(2S) on groups of the grid's own points (diffusers' DPMSolverSinglestep), --lower-order-final",
        ),
        e(
            "edm-heun",
            "2",
            "EDM Heun (arXiv 2206.00364 Alg. 2) on its own Karras grid, --s-churn --s-tmin --s-tmax --s-noise",
        ),
        e(
            "k-euler",
            "1",
            "Euler in sigma/alpha (k-diffusion, diffusers' Euler; = ddim without churn), --s-churn",
        ),
        e(
            "k-euler-a",
            "1",
            "Euler ancestral in sigma/alpha (k-diffusion, diffusers' EulerAncestral), --eta --s-noise",
        ),
        e(
            "k-heun",
            "2",
            "Heun in sigma/alpha on the given grid (k-diffusion, diffusers' Heun), --s-churn",
        ),
        e(
            "k-dpm2",
            "2",
            "DPM2 in sigma/alpha, geometric midpoint (k-diffusion, diffusers' KDPM2), --s-churn",
        ),
        e(
            "k-dpm2-a",
            "2",
            "DPM2 ancestral in sigma/alpha (k-diffusion, diffusers' KDPM2Ancestral), --eta --s-noise",
        ),
        e(
            "k-lms",
            "1",
            "linear multistep order 4 in sigma/alpha (k-diffusion, diffusers' LMS); k-lms-K for K = 1..4",
        ),
    ]
}

fn valid_names() -> String {
    catalog()
        .iter()
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The highest quasi-Taylor order accepted. The family exists for every order, but in f64
/// the terms past order ~10 fall below the rounding of the lower ones, and the coefficients'
/// cost grows as the order squared per step (a `qt-3498` once took seconds per step).
pub const MAX_QT_ORDER: usize = 16;

impl FromStr for Sampler {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let order = |rest: &str, max: usize| -> Result<usize> {
            let k: usize = rest.parse().map_err(|_| {
                anyhow::anyhow!("sampler '{s}': the order '{rest}' is not a positive integer")
            })?;
            if k == 0 {
                bail!("sampler '{s}': order 0 is not a sampler; the order must be >= 1");
            }
            if k > max {
                bail!("sampler '{s}': this family exists for orders 1 to {max}");
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
            "dpm-solver-fast" => Sampler::DpmSolverFast,
            "dpm-solver-12" => Sampler::DpmSolverAdaptive(2),
            "dpm-solver-23" | "dpm-solver-adaptive" => Sampler::DpmSolverAdaptive(3),
            "dpmpp-2m" => Sampler::DpmPpMultistep(2),
            "dpmpp-3m" => Sampler::DpmPpMultistep(3),
            "dpmpp-2s" => Sampler::DpmPp2S,
            "dpmpp-2m-sde" => Sampler::DpmPp2MSde,
            "pndm" => Sampler::Pndm,
            "plms" => Sampler::Plms,
            "ipndm" => Sampler::Ipndm,
            "edm-heun" => Sampler::EdmHeun,
            "k-euler" => Sampler::KEuler,
            "k-euler-a" => Sampler::KEulerAncestral,
            "k-heun" => Sampler::KHeun,
            "k-dpm2" => Sampler::KDpm2,
            "k-dpm2-a" => Sampler::KDpm2Ancestral,
            "k-lms" => Sampler::KLms(4),
            _ if s.starts_with("k-lms-") => Sampler::KLms(order(&s[6..], 4)?),
            _ if s.starts_with("qit-") => Sampler::QuasiItoTaylor(order(&s[4..], 2)?),
            _ if s.starts_with("qt-") => Sampler::QuasiTaylor(order(&s[3..], MAX_QT_ORDER)?),
            _ if s.starts_with("dpm-solver-") => Sampler::DpmSolver(order(&s[11..], 3)?),
            _ if s.starts_with("unipc-") => Sampler::UniPc(order(&s[6..], 3)?),
            _ if s.starts_with("deis-logrho-") => Sampler::DeisLogRho(order(&s[12..], 3)?),
            _ if s.starts_with("dpmpp-singlestep-") => {
                Sampler::DpmPpSinglestep(order(&s[17..], 2)?)
            }
            _ if s.starts_with("deis-") => Sampler::Deis(order(&s[5..], 3)?),
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
            Sampler::DpmSolver(k) => write!(f, "dpm-solver-{k}"),
            Sampler::DpmSolverFast => write!(f, "dpm-solver-fast"),
            Sampler::DpmSolverAdaptive(k) => write!(f, "dpm-solver-{}{k}", k - 1),
            Sampler::DpmPpMultistep(k) => write!(f, "dpmpp-{k}m"),
            Sampler::DpmPp2S => write!(f, "dpmpp-2s"),
            Sampler::DpmPp2MSde => write!(f, "dpmpp-2m-sde"),
            Sampler::UniPc(k) => write!(f, "unipc-{k}"),
            Sampler::Pndm => write!(f, "pndm"),
            Sampler::Plms => write!(f, "plms"),
            Sampler::Ipndm => write!(f, "ipndm"),
            Sampler::Deis(k) => write!(f, "deis-{k}"),
            Sampler::DeisLogRho(k) => write!(f, "deis-logrho-{k}"),
            Sampler::DpmPpSinglestep(k) => write!(f, "dpmpp-singlestep-{k}"),
            Sampler::EdmHeun => write!(f, "edm-heun"),
            Sampler::KEuler => write!(f, "k-euler"),
            Sampler::KEulerAncestral => write!(f, "k-euler-a"),
            Sampler::KHeun => write!(f, "k-heun"),
            Sampler::KDpm2 => write!(f, "k-dpm2"),
            Sampler::KDpm2Ancestral => write!(f, "k-dpm2-a"),
            Sampler::KLms(4) => write!(f, "k-lms"),
            Sampler::KLms(k) => write!(f, "k-lms-{k}"),
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

/// Every sampler of the library, with the listed orders (the bench's "all").
pub fn all_samplers() -> Vec<Sampler> {
    use Sampler::*;
    vec![
        QuasiTaylor(1),
        QuasiTaylor(2),
        QuasiTaylor(3),
        QuasiTaylor(4),
        Ddim,
        Euler,
        Heun,
        Rk4,
        Rk45,
        DpmSolver(1),
        DpmSolver(2),
        DpmSolver(3),
        DpmSolverFast,
        DpmSolverAdaptive(2),
        DpmSolverAdaptive(3),
        DpmPpMultistep(2),
        DpmPpMultistep(3),
        DpmPp2S,
        UniPc(1),
        UniPc(2),
        UniPc(3),
        Pndm,
        Plms,
        Ipndm,
        Deis(1),
        Deis(2),
        Deis(3),
        DeisLogRho(1),
        DeisLogRho(2),
        DeisLogRho(3),
        DpmPpSinglestep(1),
        DpmPpSinglestep(2),
        EdmHeun,
        KEuler,
        KHeun,
        KDpm2,
        KLms(4),
        QuasiItoTaylor(1),
        QuasiItoTaylor(2),
        QitInf,
        Ddpm,
        EulerMaruyama,
        DpmPp2MSde,
        KEulerAncestral,
        KDpm2Ancestral,
    ]
}

/// True when a step to `s` reaches σ = 0 (ᾱ = 1, only on discrete schedules with
/// `--final zero`). Every sampler takes such a step as x_s = x̂0 at the current point: the
/// first-order limit of all the schemes here (DDIM, DPM-Solver(++)-1, UniPC's and EDM's
/// last Euler step), at one NFE.
pub fn reaches_zero(schedule: &dyn Schedule, s: f64) -> bool {
    schedule.sigma(s) == 0.0
}

/// True at pure noise: α(t) = 0 (ᾱ = 0, λ = −∞), where rectified flow starts (ς = 1). There
/// `x = ε`, ε̂ = x and only x̂0 carries information; a sampler whose step is written as
/// `A x_t + B ε̂` or in λ either takes that step in x̂0 or cannot start there
/// ([`Sampler::starts_at_pure_noise`]).
pub fn pure_noise(schedule: &dyn Schedule, t: f64) -> bool {
    schedule.alpha(t) == 0.0
}

impl Sampler {
    /// True for samplers that can start at pure noise (α = 0: rectified flow's ς = 1, where
    /// diffusers' flow pipelines start): their first step is written in x̂0 (DDIM, DDPM,
    /// quasi-Taylor in t or state, Euler/Heun/RK4 with the drift α' x̂0 + σ' ε̂, k-euler and
    /// k-euler-a as their ς → ∞ limit) or its λ-increment enters only through `e^{−h}`
    /// (DPM-Solver++ multistep and 2M-SDE, UniPC, singlestep order 1). The others divide by
    /// α or place a stage at λ = −∞ + h/2.
    pub fn starts_at_pure_noise(&self) -> bool {
        matches!(
            self,
            Sampler::QuasiTaylor(_)
                | Sampler::QitInf
                | Sampler::Ddim
                | Sampler::Ddpm
                | Sampler::Euler
                | Sampler::Heun
                | Sampler::Rk4
                | Sampler::DpmPpMultistep(_)
                | Sampler::DpmPp2MSde
                | Sampler::UniPc(_)
                | Sampler::DpmPpSinglestep(1)
                | Sampler::KEuler
                | Sampler::KEulerAncestral
        )
    }

    /// True for samplers with step-size control (their NFE is not fixed by the grid).
    pub fn is_adaptive(&self) -> bool {
        matches!(self, Sampler::Rk45 | Sampler::DpmSolverAdaptive(_))
    }

    /// Model evaluations for `steps` steps on a fixed grid (`None`: adaptive). A final step
    /// to σ = 0 costs one NFE whatever the sampler; `ends_at_zero` says whether the grid
    /// has one.
    pub fn nfe(&self, steps: usize, ends_at_zero: bool, opts: &Options) -> Option<usize> {
        if steps == 0 {
            return Some(usize::from(opts.denoise_final));
        }
        let inner = if ends_at_zero { steps - 1 } else { steps };
        let body = match self {
            Sampler::Heun
            | Sampler::DpmPp2S
            | Sampler::EdmHeun
            | Sampler::KHeun
            | Sampler::KDpm2
            | Sampler::KDpm2Ancestral => 2 * inner,
            Sampler::Rk4 => 4 * inner,
            Sampler::DpmSolver(k) => k * inner,
            Sampler::Rk45 | Sampler::DpmSolverAdaptive(_) => return None,
            Sampler::Pndm => 4 * inner.min(3) + inner.saturating_sub(3),
            Sampler::Plms => inner + usize::from(inner >= 1),
            _ => inner,
        };
        Some(body + usize::from(ends_at_zero) + usize::from(opts.denoise_final))
    }

    /// The options this sampler reads (besides the grid and `denoise_final`, which every
    /// sampler honours). An option set to something other than its default for a sampler
    /// that does not read it is an error ([`check_keys_used`], for every front end), never
    /// silence.
    pub fn option_keys(&self) -> &'static [Key] {
        use keys::*;
        match self {
            Sampler::QuasiTaylor(_) => &[EXPAND, QT_LAST],
            Sampler::Ddim => &[ETA],
            Sampler::Ddpm => &[DDPM_VARIANCE],
            Sampler::Rk45 | Sampler::DpmSolverAdaptive(_) => &[RTOL, ATOL],
            Sampler::DpmPpMultistep(_)
            | Sampler::Deis(_)
            | Sampler::DeisLogRho(_)
            | Sampler::DpmPpSinglestep(_) => &[LOWER_ORDER_FINAL],
            Sampler::DpmPp2MSde => &[ETA, LOWER_ORDER_FINAL],
            Sampler::UniPc(_) => &[UNIPC_VARIANT, UNIPC_CORRECTOR, LOWER_ORDER_FINAL],
            Sampler::EdmHeun | Sampler::KEuler | Sampler::KHeun | Sampler::KDpm2 => {
                &[S_CHURN, S_TMIN, S_TMAX, S_NOISE]
            }
            Sampler::KEulerAncestral | Sampler::KDpm2Ancestral => &[ETA, S_NOISE],
            _ => &[],
        }
    }

    /// Checks the options this sampler reads against their valid ranges: η ∈ [0, 1] for
    /// DDIM (0: deterministic DDIM, 1: the DDPM posterior variance) and for dpmpp-2m-sde
    /// (1: the reverse SDE, 0: the ODE).
    pub fn check_options(&self, opts: &Options) -> Result<()> {
        opts.validate()?;
        // The ancestral samplers take any η ≥ 0 (k-diffusion caps ς_up at ς').
        if let Some(eta) = opts.eta
            && matches!(self, Sampler::Ddim | Sampler::DpmPp2MSde)
            && !(0.0..=1.0).contains(&eta)
        {
            bail_option!(
                (keys::ETA, eta),
                format!(": {self} takes η in [0, 1] (0: deterministic, 1: fully stochastic)")
            );
        }
        Ok(())
    }

    /// True for samplers that draw fresh noise during sampling.
    pub fn is_stochastic(&self, opts: &Options) -> bool {
        match self {
            Sampler::QuasiItoTaylor(_)
            | Sampler::QitInf
            | Sampler::Ddpm
            | Sampler::EulerMaruyama => true,
            Sampler::Ddim => opts.eta_or(0.0) > 0.0,
            Sampler::DpmPp2MSde => opts.eta_or(1.0) > 0.0,
            Sampler::EdmHeun | Sampler::KEuler | Sampler::KHeun | Sampler::KDpm2 => {
                opts.s_churn > 0.0 && opts.s_noise > 0.0
            }
            Sampler::KEulerAncestral | Sampler::KDpm2Ancestral => {
                opts.eta_or(1.0) > 0.0 && opts.s_noise > 0.0
            }
            _ => false,
        }
    }

    /// The most steps whose NFE fits in `budget` (`None` if not even one step fits or the
    /// sampler is adaptive).
    pub fn steps_for_budget(
        &self,
        budget: usize,
        ends_at_zero: bool,
        opts: &Options,
    ) -> Option<usize> {
        if self.is_adaptive() {
            return None;
        }
        let fits = |n: usize| self.nfe(n, ends_at_zero, opts).is_some_and(|c| c <= budget);
        if !fits(1) {
            return None;
        }
        let mut n = 1;
        while fits(n + 1) {
            n += 1;
        }
        Some(n)
    }

    /// Runs the sampler from `x` at `ts[0]` down to `ts[N]`.
    pub fn dispatch<B: Backend>(
        &self,
        ctx: &mut Ctx<B>,
        x: B::X,
        ts: &[f64],
        opts: &Options,
    ) -> Result<B::X> {
        let tol = |default: f64| (opts.rtol.unwrap_or(default), opts.atol.unwrap_or(default));
        let churn = k_diffusion::Churn::from(opts);
        match *self {
            Sampler::QuasiTaylor(k) => {
                quasi_taylor::sample_qt(ctx, x, ts, k, opts.expand, opts.qt_last)
            }
            Sampler::QuasiItoTaylor(1) => euler_maruyama::sample_em(ctx, x, ts),
            Sampler::QuasiItoTaylor(_) => quasi_ito_taylor::sample_qit2(ctx, x, ts),
            Sampler::QitInf => ddim::sample_ddim(ctx, x, ts, 1.0),
            Sampler::Ddim => ddim::sample_ddim(ctx, x, ts, opts.eta_or(0.0)),
            Sampler::Ddpm => ddim::sample_ddpm(ctx, x, ts, opts.ddpm_variance),
            Sampler::Euler => runge_kutta::sample_euler(ctx, x, ts),
            Sampler::Heun => runge_kutta::sample_heun(ctx, x, ts),
            Sampler::Rk4 => runge_kutta::sample_rk4(ctx, x, ts),
            Sampler::Rk45 => {
                let (rtol, atol) = tol(1e-5);
                runge_kutta::sample_rk45(ctx, x, ts, rtol, atol)
            }
            Sampler::EulerMaruyama => euler_maruyama::sample_em(ctx, x, ts),
            Sampler::DpmSolver(k) => dpm_solver::sample_dpm_solver(ctx, x, ts, k),
            Sampler::DpmSolverFast => dpm_solver::sample_dpm_solver_fast(ctx, x, ts),
            Sampler::DpmSolverAdaptive(k) => {
                let (rtol, atol) = (opts.rtol.unwrap_or(0.05), opts.atol.unwrap_or(0.0078));
                dpm_solver::sample_dpm_solver_adaptive(ctx, x, ts, k, rtol, atol)
            }
            Sampler::DpmPpMultistep(k) => {
                dpm_solver_pp::sample_dpmpp_multistep(ctx, x, ts, k, opts.lower_order_final)
            }
            Sampler::DpmPp2S => dpm_solver_pp::sample_dpmpp_2s(ctx, x, ts),
            Sampler::DpmPp2MSde => dpm_solver_pp::sample_dpmpp_2m_sde(
                ctx,
                x,
                ts,
                opts.eta_or(1.0),
                opts.lower_order_final,
            ),
            Sampler::UniPc(k) => unipc::sample_unipc(
                ctx,
                x,
                ts,
                k,
                opts.unipc_variant,
                opts.unipc_corrector,
                opts.lower_order_final,
            ),
            Sampler::Pndm => pndm::sample_pndm(ctx, x, ts),
            Sampler::Plms => pndm::sample_plms(ctx, x, ts),
            Sampler::Ipndm => pndm::sample_ipndm(ctx, x, ts),
            Sampler::Deis(k) => {
                deis::sample_deis(ctx, x, ts, k, opts.lower_order_final, deis::Variant::TAb)
            }
            Sampler::DpmPpSinglestep(k) => {
                dpm_solver_pp::sample_dpmpp_singlestep(ctx, x, ts, k, opts.lower_order_final)
            }
            Sampler::DeisLogRho(k) => {
                deis::sample_deis(ctx, x, ts, k, opts.lower_order_final, deis::Variant::LogRho)
            }
            Sampler::EdmHeun => edm::sample_edm_heun(ctx, x, ts, &churn),
            Sampler::KEuler => k_diffusion::sample_k_euler(ctx, x, ts, &churn),
            Sampler::KHeun => k_diffusion::sample_k_heun(ctx, x, ts, &churn),
            Sampler::KDpm2 => k_diffusion::sample_k_dpm2(ctx, x, ts, &churn),
            Sampler::KEulerAncestral | Sampler::KDpm2Ancestral => k_diffusion::sample_k_ancestral(
                ctx,
                x,
                ts,
                opts.eta_or(1.0),
                opts.s_noise,
                *self == Sampler::KDpm2Ancestral,
            ),
            Sampler::KLms(k) => k_diffusion::sample_k_lms(ctx, x, ts, k),
        }
    }
}

/// Refuses options that none of `samplers` reads: `given` lists the options the user set (to
/// a value other than the default), each with its value.
pub fn check_keys_used(samplers: &[Sampler], given: &[(Key, Value)]) -> Result<()> {
    for (key, value) in given {
        if samplers.iter().any(|s| s.option_keys().contains(key)) {
            continue;
        }
        // The catalog's names that read it ("qt-K" stands for every order).
        let readers: Vec<&str> = catalog()
            .into_iter()
            .filter(|e| {
                e.name
                    .replace('K', "2")
                    .parse::<Sampler>()
                    .is_ok_and(|s| s.option_keys().contains(key))
            })
            .map(|e| e.name)
            .collect();
        let names: Vec<String> = samplers.iter().map(|s| s.to_string()).collect();
        return Err(option_error!(
            (*key, value.clone()),
            format!(
                ": {} {} not use it (it applies to {}); drop it",
                names.join(", "),
                if names.len() == 1 { "does" } else { "do" },
                readers.join(", ")
            )
        )
        .into());
    }
    Ok(())
}

/// Checks a grid: at least one step, finite, strictly decreasing, every time inside the
/// schedule's domain `[0, t_end]`.
pub fn check_grid(schedule: &dyn Schedule, ts: &[f64]) -> Result<()> {
    if ts.len() < 2 {
        bail!(
            "a time grid needs at least one step (got {} times)",
            ts.len()
        );
    }
    for (i, &t) in ts.iter().enumerate() {
        if !(t.is_finite() && t >= 0.0 && t <= schedule.t_end()) {
            bail!(
                "time {t} (entry {i} of the grid) is outside the domain [0, {}] of schedule {}",
                schedule.t_end(),
                schedule.name()
            );
        }
        if i > 0 && t >= ts[i - 1] {
            bail!(
                "the time grid must decrease strictly: entry {i} is {t} after {}",
                ts[i - 1]
            );
        }
    }
    Ok(())
}

/// Runs `sampler` from `x` (the state at `ts[0]`) over the grid `ts`, adding the final
/// x̂0 call when `opts.denoise_final` is set. The one entry point of every backend.
pub fn run<B: Backend>(
    ctx: &mut Ctx<B>,
    sampler: Sampler,
    opts: &Options,
    ts: &[f64],
    x: B::X,
) -> Result<B::X> {
    sampler.check_options(opts)?;
    check_grid(ctx.schedule, ts)?;
    let n = ts.len() - 1;
    if opts.denoise_final && reaches_zero(ctx.schedule, ts[n]) {
        bail_option!(
            keys::DENOISE_FINAL,
            ": the grid already ends at sigma = 0, where the sample is x̂0"
        );
    }
    if pure_noise(ctx.schedule, ts[0]) && !sampler.starts_at_pure_noise() {
        let natives: Vec<String> = all_samplers()
            .into_iter()
            .filter(|s| s.starts_at_pure_noise())
            .map(|s| s.to_string())
            .collect();
        bail_option!(
            (keys::SAMPLER, sampler.to_string()),
            format!(
                ": the grid starts at pure noise (t = {}, alpha = 0, log-SNR -inf: rectified flow's sigma = 1), where this sampler's step is undefined; start the grid below it (",
                ts[0]
            ),
            (keys::T_MAX, 0.999),
            ", or sigmas below 1) or use a sampler that starts there: ",
            natives.join(", ")
        );
    }
    let mut x = sampler.dispatch(ctx, x, ts, opts)?;
    if opts.denoise_final {
        ctx.begin_step(n, ts[n], &x)?;
        x = ctx.denoise(&x, ts[n])?.x0;
    }
    Ok(x)
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
        for s in all_samplers() {
            assert_eq!(s.to_string().parse::<Sampler>().unwrap(), s);
        }
        assert_eq!(
            "dpm-solver-adaptive".parse::<Sampler>().unwrap(),
            Sampler::DpmSolverAdaptive(3)
        );
        for bad in ["dpm-solver-4", "unipc-0", "deis-4"] {
            assert!(bad.parse::<Sampler>().is_err(), "{bad}");
        }
        let e = "foo".parse::<Sampler>().unwrap_err().to_string();
        assert!(
            e.contains("unknown sampler 'foo'") && e.contains("qt-K") && e.contains("rk45"),
            "{e}"
        );
        let e = "qt-0".parse::<Sampler>().unwrap_err().to_string();
        assert!(e.contains("order 0"), "{e}");
        assert!(format!("qt-{MAX_QT_ORDER}").parse::<Sampler>().is_ok());
        let e = "qt-3498".parse::<Sampler>().unwrap_err().to_string();
        assert!(e.contains("orders 1 to 16"), "{e}");
        assert!("qit-3".parse::<Sampler>().is_err());
        assert!("qt-x".parse::<Sampler>().is_err());
    }

    #[test]
    fn step_budget_uses_the_most_steps_that_fit() {
        let o = Options::default();
        assert_eq!(Sampler::Heun.steps_for_budget(5, false, &o), Some(2));
        assert_eq!(Sampler::Rk4.steps_for_budget(5, false, &o), Some(1));
        assert_eq!(Sampler::Rk4.steps_for_budget(3, false, &o), None);
        assert_eq!(
            Sampler::QuasiTaylor(3).steps_for_budget(10, false, &o),
            Some(10)
        );
        assert_eq!(
            Sampler::DpmSolver(3).steps_for_budget(10, false, &o),
            Some(3)
        );
        // PNDM: three pseudo-RK4 warm-up steps of 4 NFE, then one NFE per step.
        assert_eq!(Sampler::Pndm.nfe(10, false, &o), Some(19));
        assert_eq!(Sampler::Pndm.steps_for_budget(15, false, &o), Some(6));
        assert_eq!(Sampler::Pndm.steps_for_budget(5, false, &o), Some(1));
        assert_eq!(Sampler::Plms.nfe(10, false, &o), Some(11));
        // A final step to sigma = 0 is one NFE: EDM's 2N - 1.
        assert_eq!(Sampler::EdmHeun.nfe(18, true, &o), Some(35));
        assert_eq!(Sampler::Rk4.nfe(3, true, &o), Some(9));
        assert_eq!(Sampler::Rk45.steps_for_budget(50, false, &o), None);
        let o = Options {
            denoise_final: true,
            ..o
        };
        assert_eq!(
            Sampler::QuasiTaylor(3).steps_for_budget(10, false, &o),
            Some(9)
        );
    }
}
