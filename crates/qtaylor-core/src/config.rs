//! The math half of a run's configuration: what a front end parsed, and the one builder of
//! each part.
//!
//! - [`ScheduleSettings`] → the noise schedule (and, for a discrete one, its grid defaults);
//! - [`GridSettings`] → the [`TimeGrid`] and its times;
//! - [`SamplerSettings`] → the sampler's [`Options`], each value parsed, in range, and read
//!   by the sampler.
//!
//! Every field is `None` unless the user set it; a value equal to its default counts as not
//! set, so a front end may pass its defaults along. The command line (`qtaylor` flags) and
//! the Python package (keywords) are two parsers into these types; the errors name
//! [`keys`](crate::keys), which each front end spells its own way. The root crate's run
//! specification adds what needs tensors: the model, guidance, device and noise.

use std::sync::Arc;

use anyhow::Result;

use crate::bail_option;
use crate::grid::{self, Final, Grid, Spacing, TimeGrid};
use crate::keys::{self, Key, Value};
use crate::samplers::{self, DdpmVariance, Options, Sampler};
use crate::schedule::{Flow, Schedule, Tabulated, Ve, schedule_by_name};

/// The schedule a run uses when none is named.
pub const DEFAULT_SCHEDULE: &str = "vp-linear";
/// The vp-linear schedule's β range (score_sde's; DDPM's continuous limit).
pub const DEFAULT_BETA_MIN: f64 = 0.1;
pub const DEFAULT_BETA_MAX: f64 = 20.0;
/// A discrete schedule's defaults: DDPM's 1000 linear betas from 1e-4 to 0.02.
pub const DEFAULT_BETA_SCHEDULE: &str = "linear";
pub const DEFAULT_BETA_START: f64 = 1e-4;
pub const DEFAULT_BETA_END: f64 = 0.02;
pub const DEFAULT_TRAIN_STEPS: usize = 1000;
/// The final time of a continuous grid on a continuous schedule (on rectified flow with a
/// grid other than uniform, the unshifted time of its last level before 0).
pub const DEFAULT_T_MIN: f64 = 1e-3;
/// The VE schedule's largest σ/α (EDM's σ_max = 80; its σ_min is [`Schedule::default_t_min`]).
pub const DEFAULT_VE_SIGMA_MAX: f64 = 80.0;

/// `Some(v)` with `v` other than `default`.
fn set<T: PartialEq>(v: &Option<T>, default: T) -> bool {
    v.as_ref().is_some_and(|v| *v != default)
}

/// The schedule as a front end parsed it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScheduleSettings {
    /// vp-linear (default), cosine, scaled-linear or discrete.
    pub schedule: Option<String>,
    pub beta_min: Option<f64>,
    pub beta_max: Option<f64>,
    /// Discrete: diffusers' `beta_schedule` (linear, scaled_linear, squaredcos_cap_v2).
    pub beta_schedule: Option<String>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub train_steps: Option<usize>,
    /// Flow: the static time shift s (diffusers' `shift`) [default: 1].
    pub shift: Option<f64>,
    /// Flow: the dynamic shift μ (diffusers' `mu`), instead of `shift`.
    pub mu: Option<f64>,
    /// Flow: how μ shifts, exponential (s = e^μ) or linear (s = μ).
    pub time_shift: Option<String>,
    /// VE: the largest σ/α, the schedule's end (the grid's `sigma_max`) [default: 80].
    pub ve_sigma_max: Option<f64>,
}

/// What a discrete grid takes by default: the spacing, its offset and the trained steps (a
/// checkpoint's scheduler config, or leading / 0 / `--train-steps`).
#[derive(Clone, Debug, PartialEq)]
pub struct DiscreteDefaults {
    pub spacing: String,
    pub offset: usize,
    pub train_steps: usize,
}

impl ScheduleSettings {
    /// The schedule's name.
    pub fn name(&self) -> &str {
        self.schedule.as_deref().unwrap_or(DEFAULT_SCHEDULE)
    }

    /// True when a schedule other than the default is named (a checkpoint brings its own).
    pub fn names_one(&self) -> bool {
        set(&self.schedule.as_deref(), DEFAULT_SCHEDULE)
    }

    /// Refuses the settings the schedule in use does not read; `checkpoint` is true when a
    /// checkpoint brings its own schedule (scheduler_config.json).
    pub fn check_used(&self, checkpoint: bool) -> Result<()> {
        let vp = [
            (keys::BETA_MIN, set(&self.beta_min, DEFAULT_BETA_MIN)),
            (keys::BETA_MAX, set(&self.beta_max, DEFAULT_BETA_MAX)),
        ];
        let discrete = [
            (
                keys::BETA_SCHEDULE,
                set(&self.beta_schedule.as_deref(), DEFAULT_BETA_SCHEDULE),
            ),
            (keys::BETA_START, set(&self.beta_start, DEFAULT_BETA_START)),
            (keys::BETA_END, set(&self.beta_end, DEFAULT_BETA_END)),
            (
                keys::TRAIN_STEPS,
                set(&self.train_steps, DEFAULT_TRAIN_STEPS),
            ),
        ];
        let vp_used = !checkpoint && self.name() == "vp-linear";
        let discrete_used = !checkpoint && self.name() == "discrete";
        let unused = vp
            .iter()
            .filter(|f| f.1 && !vp_used)
            .map(|f| (f.0, "vp-linear"))
            .chain(
                discrete
                    .iter()
                    .filter(|f| f.1 && !discrete_used)
                    .map(|f| (f.0, "discrete")),
            )
            .next();
        let flow_used = !checkpoint && self.name() == "flow";
        let unused = unused.or_else(|| {
            [
                (keys::SHIFT, self.shift.is_some()),
                (keys::MU, self.mu.is_some()),
                (keys::TIME_SHIFT, self.time_shift.is_some()),
            ]
            .into_iter()
            .find(|f| f.1 && !flow_used)
            .map(|f| (f.0, "flow"))
        });
        if let Some((key, schedule)) = unused {
            if checkpoint {
                bail_option!(
                    key,
                    " does nothing here: the checkpoint brings its own schedule (scheduler_config.json)"
                );
            }
            bail_option!(
                key,
                " does nothing here: it applies to ",
                (keys::SCHEDULE, schedule)
            );
        }
        Ok(())
    }

    /// The schedule, and for a discrete one the defaults of its grid.
    pub fn build(&self) -> Result<(Arc<dyn Schedule>, Option<DiscreteDefaults>)> {
        self.check_used(false)?;
        if self.name() == "discrete" {
            let steps = self.train_steps.unwrap_or(DEFAULT_TRAIN_STEPS);
            let s = Tabulated::diffusers(
                self.beta_schedule
                    .as_deref()
                    .unwrap_or(DEFAULT_BETA_SCHEDULE),
                self.beta_start.unwrap_or(DEFAULT_BETA_START),
                self.beta_end.unwrap_or(DEFAULT_BETA_END),
                steps,
            )?;
            let d = DiscreteDefaults {
                spacing: "leading".into(),
                offset: 0,
                train_steps: steps,
            };
            return Ok((Arc::new(s), Some(d)));
        }
        if self.name() == "flow" {
            let flow = Flow::from_settings(self.shift, self.mu, self.time_shift.as_deref())?;
            return Ok((Arc::new(flow), None));
        }
        if self.name() == "ve" {
            let ve = Ve::new(self.ve_sigma_max.unwrap_or(DEFAULT_VE_SIGMA_MAX))?;
            return Ok((Arc::new(ve), None));
        }
        let s = schedule_by_name(
            self.name(),
            self.beta_min.unwrap_or(DEFAULT_BETA_MIN),
            self.beta_max.unwrap_or(DEFAULT_BETA_MAX),
        )?;
        Ok((s.into(), None))
    }
}

/// Times given one by one with `key` (a grid file, Python's `times=`), described by `what`.
#[derive(Clone, Debug, PartialEq)]
pub struct GivenTimes {
    pub key: Key,
    pub what: String,
    pub times: Vec<f64>,
}

/// The time grid as a front end parsed it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GridSettings {
    /// Steps on the grid (an explicit list decides its own).
    pub steps: Option<usize>,
    /// A continuous grid: uniform, quadratic, logsnr or karras.
    pub grid: Option<String>,
    /// Karras' ρ.
    pub rho: Option<f64>,
    pub t_min: Option<f64>,
    pub t_max: Option<f64>,
    /// The grid's ends in diffusers' σ/α, instead of t.
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    /// A discrete grid: leading, trailing or linspace.
    pub spacing: Option<String>,
    pub steps_offset: Option<usize>,
    /// A discrete grid's end: zero (ᾱ = 1, x̂0) or last (the first trained step).
    pub final_: Option<String>,
    /// Explicit descending network timesteps (fractional ones allowed).
    pub timesteps: Option<Vec<f64>>,
    /// Explicit descending diffusers sigmas (σ/α; a final 0 ends at x̂0).
    pub sigmas: Option<Vec<f64>>,
    /// Explicit times (a grid file's, or Python's `times=`).
    pub times: Option<GivenTimes>,
}

impl GridSettings {
    fn explicit_keys(&self) -> Vec<Key> {
        let mut k = Vec::new();
        if self.timesteps.is_some() {
            k.push(keys::TIMESTEPS);
        }
        if self.sigmas.is_some() {
            k.push(keys::SIGMAS);
        }
        if let Some(g) = &self.times {
            k.push(g.key);
        }
        k
    }

    /// The time grid on `schedule`: continuous (grid, t range), discrete (spacing, offset,
    /// final; `discrete` holds a discrete schedule's defaults) or an explicit list.
    pub fn time_grid(
        &self,
        schedule: &dyn Schedule,
        discrete: Option<&DiscreteDefaults>,
    ) -> Result<TimeGrid> {
        let flow = schedule.final_zero_by_default();
        if discrete.is_none() && !flow && set(&self.final_.as_deref(), "zero") {
            bail_option!(
                keys::FINAL,
                " applies to discrete schedules (",
                (keys::SCHEDULE, "discrete"),
                " or ",
                keys::MODEL,
                ")"
            );
        }
        if self.rho.is_some() && self.grid.as_deref() != Some("karras") {
            bail_option!(keys::RHO, " applies to ", (keys::GRID, "karras"), " only");
        }
        for (key, v) in [
            (keys::SIGMA_MIN, self.sigma_min),
            (keys::SIGMA_MAX, self.sigma_max),
        ] {
            if let Some(v) = v
                && !(v > 0.0 && v.is_finite())
            {
                bail_option!((key, v), ": expected a positive number");
            }
        }
        if self.sigma_min.is_some() && self.t_min.is_some() {
            bail_option!("give ", keys::SIGMA_MIN, " or ", keys::T_MIN, ", not both");
        }
        if self.sigma_max.is_some() && self.t_max.is_some() {
            bail_option!("give ", keys::SIGMA_MAX, " or ", keys::T_MAX, ", not both");
        }
        let continuous = [
            (keys::GRID, self.grid.is_some()),
            (keys::T_MIN, self.t_min.is_some()),
            (keys::T_MAX, self.t_max.is_some()),
            (keys::SIGMA_MIN, self.sigma_min.is_some()),
            (keys::SIGMA_MAX, self.sigma_max.is_some()),
        ];
        let explicit = self.explicit_keys();
        if !explicit.is_empty() {
            for (key, given) in continuous.iter().chain(&[
                (keys::SPACING, self.spacing.is_some()),
                (keys::STEPS_OFFSET, self.steps_offset.is_some()),
            ]) {
                if *given {
                    bail_option!(
                        *key,
                        " does nothing with an explicit ",
                        keys::TIMESTEPS,
                        ", ",
                        keys::SIGMAS,
                        " or ",
                        keys::GRID_FILE
                    );
                }
            }
            if explicit.len() > 1 {
                bail_option!(
                    "give one of ",
                    keys::TIMESTEPS,
                    ", ",
                    keys::SIGMAS,
                    " and ",
                    keys::GRID_FILE
                );
            }
        }
        if let Some(g) = &self.times {
            return Ok(TimeGrid::Explicit {
                times: g.times.clone(),
                what: g.what.clone(),
            });
        }
        if let Some(sigmas) = &self.sigmas {
            return Ok(TimeGrid::Explicit {
                times: grid::times_of_sigmas(schedule, sigmas)?,
                what: "explicit sigmas".into(),
            });
        }
        let Some(d) = discrete else {
            if self.timesteps.is_some() {
                bail_option!(
                    keys::TIMESTEPS,
                    " needs a discrete schedule (",
                    (keys::SCHEDULE, "discrete"),
                    " or ",
                    keys::MODEL,
                    "); use ",
                    keys::SIGMAS
                );
            }
            if self.spacing.is_some() || self.steps_offset.is_some() {
                bail_option!(
                    keys::SPACING,
                    " and ",
                    keys::STEPS_OFFSET,
                    " apply to discrete schedules (",
                    (keys::SCHEDULE, "discrete"),
                    " or ",
                    keys::MODEL,
                    ")"
                );
            }
            let default_t_min = schedule.default_t_min().unwrap_or(DEFAULT_T_MIN);
            let (t_max, mut t_min) = self.range(schedule, default_t_min)?;
            // Rectified flow ends at ς = 0 (diffusers' terminal 0) unless final = last.
            let to_zero = flow
                && match &self.final_ {
                    Some(f) => f.parse::<Final>()? == Final::Zero,
                    None => true,
                };
            let uniform = matches!(self.grid.as_deref(), None | Some("uniform"));
            if to_zero && uniform && self.t_min.is_none() && self.sigma_min.is_none() {
                // Flux's grid: N steps uniform in the unshifted time from t_max to 0
                // (`linspace(1, 1/N, N)` shifted, then 0), see TimeGrid::Continuous.
                t_min = 0.0;
            }
            return Ok(TimeGrid::Continuous {
                grid: self.parse_grid(self.grid.as_deref().unwrap_or("uniform"))?,
                t_max,
                t_min,
                to_zero,
            });
        };
        let last: Final = match &self.final_ {
            Some(f) => f.parse()?,
            None => Final::Zero,
        };
        if let Some(v) = &self.timesteps {
            if v.iter().all(|x| x.fract() == 0.0 && *x >= 0.0) {
                return Ok(TimeGrid::Discrete {
                    spacing: Spacing::Leading,
                    offset: 0,
                    timesteps: Some(v.iter().map(|&x| x as usize).collect()),
                    train_steps: d.train_steps,
                    last,
                });
            }
            let times = grid::times_of_network_timesteps(schedule, v, last)?;
            return Ok(TimeGrid::Explicit {
                times,
                what: format!("explicit fractional timesteps, final {last:?}").to_lowercase(),
            });
        }
        if let Some(g) = &self.grid {
            // A continuous grid on the discrete schedule, as diffusers' use_karras_sigmas:
            // from the last trained step (t = 1) to the first (t = 1/T).
            if self.spacing.is_some() || self.steps_offset.is_some() {
                bail_option!(
                    keys::SPACING,
                    " and ",
                    keys::STEPS_OFFSET,
                    " do nothing with ",
                    keys::GRID
                );
            }
            let first = grid::time_of_timestep(0.0, d.train_steps);
            let (t_max, t_min) = self.range(schedule, first)?;
            return Ok(TimeGrid::Continuous {
                grid: self.parse_grid(g)?,
                t_max,
                t_min,
                to_zero: last == Final::Zero,
            });
        }
        for (key, given) in continuous {
            if given {
                bail_option!(
                    key,
                    " applies to continuous grids; give ",
                    keys::GRID,
                    " on a discrete schedule (or ",
                    keys::SPACING,
                    ", ",
                    keys::STEPS_OFFSET,
                    ", ",
                    keys::FINAL,
                    ")"
                );
            }
        }
        Ok(TimeGrid::Discrete {
            spacing: self.spacing.as_deref().unwrap_or(&d.spacing).parse()?,
            offset: self.steps_offset.unwrap_or(d.offset),
            timesteps: None,
            train_steps: d.train_steps,
            last,
        })
    }

    /// The continuous grid's `(t_max, t_min)` from t_max / sigma_max and t_min / sigma_min
    /// (σ/α mapped to t through λ = −ln σ), checked against the schedule.
    fn range(&self, schedule: &dyn Schedule, default_t_min: f64) -> Result<(f64, f64)> {
        let t_of = |t: Option<f64>, sigma: Option<f64>, default: f64| -> Result<f64> {
            Ok(match (t, sigma) {
                (Some(t), _) => t,
                (None, Some(s)) => schedule.t_of_lambda(-s.ln())?,
                (None, None) => default,
            })
        };
        let t_max = t_of(self.t_max, self.sigma_max, schedule.t_end())?;
        let t_min = t_of(self.t_min, self.sigma_min, default_t_min)?;
        grid::check_interval(schedule, t_max, t_min)?;
        Ok((t_max, t_min))
    }

    /// The grid named `name`, with this grid's ρ for karras.
    fn parse_grid(&self, name: &str) -> Result<Grid> {
        Self::grid_of(name, self.rho)
    }

    /// The grid named `name`, with ρ (checked: positive) for karras.
    pub fn grid_of(name: &str, rho: Option<f64>) -> Result<Grid> {
        let g: Grid = name.parse()?;
        Ok(match (g, rho) {
            (Grid::Karras { .. }, Some(r)) => {
                if !(r > 0.0 && r.is_finite()) {
                    bail_option!((keys::RHO, r), ": expected a positive number");
                }
                Grid::Karras { rho: r }
            }
            (g, _) => g,
        })
    }

    /// The times of `grid` (made by [`GridSettings::time_grid`]): `steps` steps, or as many
    /// as an explicit list has (then `steps`, if set, must agree with it).
    pub fn times(&self, schedule: &dyn Schedule, grid: &TimeGrid) -> Result<Vec<f64>> {
        let ts = grid.times(schedule, self.steps.unwrap_or(0))?;
        let steps = ts.len() - 1;
        if let Some(s) = self.steps
            && !self.explicit_keys().is_empty()
            && s != steps
        {
            bail_option!(
                (keys::STEPS, s),
                " disagrees with the explicit grid, which makes ",
                format!("{steps} steps; give one of them")
            );
        }
        Ok(ts)
    }
}

/// A sampler's options as a front end parsed them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SamplerSettings {
    pub eta: Option<f64>,
    pub expand: Option<String>,
    pub qt_last: Option<String>,
    pub ddpm_variance: Option<String>,
    pub rtol: Option<f64>,
    pub atol: Option<f64>,
    pub lower_order_final: Option<bool>,
    pub unipc_variant: Option<String>,
    pub unipc_corrector: Option<bool>,
    pub s_churn: Option<f64>,
    pub s_tmin: Option<f64>,
    pub s_tmax: Option<f64>,
    pub s_noise: Option<f64>,
    pub denoise_final: Option<bool>,
}

impl SamplerSettings {
    /// The options, each value parsed and checked, and every option set read by one of
    /// `samplers` (with each one's range checked). `variance_type` is a checkpoint's
    /// `variance_type`, the DDPM variance's default; `carried` lists keys a source config
    /// carries for every sampler, which are not checked for use.
    pub fn build(
        &self,
        samplers: &[Sampler],
        variance_type: Option<&str>,
        carried: &[Key],
    ) -> Result<Options> {
        let d = Options::default();
        let ddpm_variance = match (&self.ddpm_variance, variance_type) {
            (Some(v), _) => v.parse()?,
            (None, Some(v)) if v.starts_with("fixed_large") => DdpmVariance::Beta,
            _ => DdpmVariance::BetaTilde,
        };
        let opts = Options {
            eta: self.eta,
            expand: match &self.expand {
                Some(v) => v.parse()?,
                None => d.expand,
            },
            qt_last: match &self.qt_last {
                Some(v) => v.parse()?,
                None => d.qt_last,
            },
            ddpm_variance,
            rtol: self.rtol,
            atol: self.atol,
            lower_order_final: self.lower_order_final.unwrap_or(d.lower_order_final),
            unipc_variant: match &self.unipc_variant {
                Some(v) => v.parse()?,
                None => d.unipc_variant,
            },
            unipc_corrector: self.unipc_corrector.unwrap_or(d.unipc_corrector),
            s_churn: self.s_churn.unwrap_or(d.s_churn),
            s_tmin: self.s_tmin.unwrap_or(d.s_tmin),
            s_tmax: self.s_tmax.unwrap_or(d.s_tmax),
            s_noise: self.s_noise.unwrap_or(d.s_noise),
            denoise_final: self.denoise_final.unwrap_or(d.denoise_final),
        };
        opts.validate()?;
        let mut given: Vec<(Key, Value)> = opts
            .set_keys()
            .into_iter()
            .filter(|(k, _)| !carried.contains(k))
            .collect();
        if let Some(v) = &self.ddpm_variance
            && !carried.contains(&keys::DDPM_VARIANCE)
        {
            given.push((keys::DDPM_VARIANCE, v.into()));
        }
        samplers::check_keys_used(samplers, &given)?;
        for s in samplers {
            if s.option_keys().contains(&keys::ETA) {
                s.check_options(&opts)?;
            }
        }
        Ok(opts)
    }
}

/// A comma-separated list of finite numbers given with `key` (timesteps, sigmas).
pub fn parse_numbers(key: Key, list: &str) -> Result<Vec<f64>> {
    list.split(',')
        .map(|v| {
            let v = v.trim();
            let x: f64 = v
                .parse()
                .map_err(|_| crate::option_error!(key, format!(": '{v}' is not a number")))?;
            if !x.is_finite() {
                bail_option!(key, format!(": '{v}' is not a finite number"));
            }
            Ok(x)
        })
        .collect()
}
