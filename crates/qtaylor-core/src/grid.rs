//! Time grids `t_0 = t_max > t_1 > … > t_N = t_min` (DESIGN §7).

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, Result, bail};

use crate::keys;
use crate::schedule::Schedule;
use crate::{bail_option, option_error};

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
            other => bail_option!(
                (keys::GRID, other),
                ": unknown grid; expected one of: uniform, quadratic, logsnr, karras"
            ),
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
    if !(t_min > 0.0 && t_min.is_finite()) {
        bail_option!((keys::T_MIN, t_min), ": expected t_min > 0");
    }
    if t_max.is_nan() || t_min >= t_max {
        bail_option!(
            (keys::T_MIN, t_min),
            " must be smaller than ",
            (keys::T_MAX, t_max)
        );
    }
    if t_max > schedule.t_end() {
        bail_option!(
            (keys::T_MAX, t_max),
            format!(
                " is beyond the end {} of schedule {}",
                schedule.t_end(),
                schedule.name()
            )
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
            bail_option!((keys::STEPS, 0usize), ": at least one step is needed");
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
            if ts[i + 1].is_nan() || ts[i + 1] >= ts[i] {
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
    fn a_float32_rounding_past_the_largest_sigma_is_the_schedules_end() {
        let s = VpLinear::default();
        let smax = (-s.lambda(s.t_end())).exp();
        let rounded_up = smax * (1.0 + 1.5 / (1u64 << 24) as f64);
        let ts = times_of_sigmas(&s, &[rounded_up, 1.0, 0.0]).unwrap();
        assert_eq!(ts[0], s.t_end());
        assert!(times_of_sigmas(&s, &[smax * (1.0 + 1e-5), 1.0]).is_err());
    }

    #[test]
    fn bad_grids_are_rejected_with_the_offending_value() {
        let s = VpLinear::default();
        let e = Grid::Uniform.times(&s, 0, 1.0, 1e-3).unwrap_err();
        assert!(e.to_string().contains("steps=0"));
        let e = Grid::Uniform.times(&s, 5, 0.5, 0.5).unwrap_err();
        assert!(e.to_string().contains("t_min=0.5"));
        let e = "cubic".parse::<Grid>().unwrap_err();
        assert!(e.to_string().contains("uniform, quadratic, logsnr, karras"));
    }
}

/// diffusers' spacings of N integer timesteps among T trained steps (`timestep_spacing`).
/// DDIM, DDPM, PNDM and the σ-space schedulers space N points; the multistep solvers
/// (DPM-Solver multistep, UniPC, DEIS) space N + 1 points and drop the last (timestep 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Spacing {
    /// `n_i = (N − 1 − i)·(T div N) + offset`.
    Leading,
    /// `n_i = round(T − i·T/N) − 1`.
    Trailing,
    /// `round(linspace(0, T − 1, N))`, reversed (ties to even, as NumPy).
    Linspace,
    /// The multistep solvers' leading: `n_i = (N − i)·(T div (N + 1)) + offset`, i < N.
    LeadingMultistep,
    /// The multistep solvers' linspace: `round(linspace(0, T − 1, N + 1))`, reversed, the
    /// last (0) dropped.
    LinspaceMultistep,
}

impl FromStr for Spacing {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            "leading-multistep" => Spacing::LeadingMultistep,
            "linspace-multistep" => Spacing::LinspaceMultistep,
            other => bail_option!(
                (keys::SPACING, other),
                ": unknown spacing; expected leading, trailing, linspace, leading-multistep or linspace-multistep"
            ),
        })
    }
}

impl fmt::Display for Spacing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Spacing::Leading => "leading",
            Spacing::Trailing => "trailing",
            Spacing::Linspace => "linspace",
            Spacing::LeadingMultistep => "leading-multistep",
            Spacing::LinspaceMultistep => "linspace-multistep",
        })
    }
}

impl Spacing {
    /// The N timesteps, descending. Errors if they are not distinct and within [0, T).
    pub fn timesteps(&self, steps: usize, train_steps: usize, offset: usize) -> Result<Vec<usize>> {
        if steps == 0 {
            bail_option!((keys::STEPS, 0usize), ": at least one step is needed");
        }
        let (n, t) = (steps, train_steps);
        let ts: Vec<i64> = match self {
            Spacing::Leading => (0..n)
                .rev()
                .map(|i| (i * (t / n) + offset) as i64)
                .collect(),
            Spacing::Trailing => (0..n)
                .map(|i| (t as f64 - i as f64 * t as f64 / n as f64).round_ties_even() as i64 - 1)
                .collect(),
            Spacing::Linspace => (0..n)
                .rev()
                .map(|i| {
                    if n == 1 {
                        0
                    } else if i == n - 1 {
                        (t - 1) as i64
                    } else {
                        (i as f64 * ((t - 1) as f64 / (n - 1) as f64)).round_ties_even() as i64
                    }
                })
                .collect(),
            Spacing::LeadingMultistep => (1..=n)
                .rev()
                .map(|i| (i * (t / (n + 1)) + offset) as i64)
                .collect(),
            Spacing::LinspaceMultistep => (1..=n)
                .rev()
                .map(|i| {
                    if i == n {
                        (t - 1) as i64
                    } else {
                        (i as f64 * ((t - 1) as f64 / n as f64)).round_ties_even() as i64
                    }
                })
                .collect(),
        };
        validate_timesteps(&ts, train_steps).map_err(|e| {
            anyhow::anyhow!(
                "{e}: {steps} steps of {train_steps} with this spacing repeat timesteps (use fewer steps, or another spacing)"
            )
        })
    }
}

/// Checks a descending list of distinct timesteps within [0, T).
pub fn validate_timesteps(ts: &[i64], train_steps: usize) -> Result<Vec<usize>> {
    for (i, &n) in ts.iter().enumerate() {
        if n < 0 || n as usize >= train_steps {
            bail!("timestep {n} (entry {i}) is outside [0, {train_steps})");
        }
        if i > 0 && n >= ts[i - 1] {
            bail!(
                "timesteps must decrease strictly: entry {i} is {n} after {}",
                ts[i - 1]
            );
        }
    }
    Ok(ts.iter().map(|&n| n as usize).collect())
}

/// How far past the schedule's largest σ a given σ may lie and still mean it: diffusers keeps
/// its sigmas in float32, so its σ_max can sit one float32 rounding (relative 2⁻²⁴, as much in
/// λ = −ln σ) above the float64 table's edge. Four roundings are allowed.
pub const SIGMA_EDGE_TOLERANCE: f64 = 4.0 / (1u64 << 24) as f64;

/// Times of a descending list of diffusers sigmas (σ/α; on rectified flow ς) through
/// [`Schedule::time_of_level`] (λ = −ln σ), σ = 0 → t = 0 (only as the last entry); a σ
/// within [`SIGMA_EDGE_TOLERANCE`] above the schedule's largest is its end.
pub fn times_of_sigmas(schedule: &dyn Schedule, sigmas: &[f64]) -> Result<Vec<f64>> {
    let n = sigmas.len();
    let edge = schedule.lambda(schedule.t_end());
    sigmas
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            if s.is_nan() || s < 0.0 {
                bail_option!(keys::SIGMAS, format!(": entry {i} is {s}; sigmas are >= 0"));
            }
            if i > 0 && s >= sigmas[i - 1] {
                bail_option!(
                    keys::SIGMAS,
                    format!(
                        " must decrease strictly: entry {i} is {s} after {}",
                        sigmas[i - 1]
                    )
                );
            }
            if s == 0.0 {
                if i + 1 != n {
                    bail_option!(
                        keys::SIGMAS,
                        format!(": 0 (x̂0) may only be the last entry, found at entry {i}")
                    );
                }
                return Ok(0.0);
            }
            let lambda = -s.ln();
            if lambda < edge && edge - lambda <= SIGMA_EDGE_TOLERANCE {
                return Ok(schedule.t_end());
            }
            schedule
                .time_of_level(s)
                .map_err(|e| option_error!(keys::SIGMAS, format!(": entry {i} ({s}): {e}")).into())
        })
        .collect()
}

/// Times of a strictly decreasing list of fractional network timesteps (`--timesteps
/// 999.5,500.25,…`) through the schedule's [`Schedule::time_of_network_time`], then the final
/// point `last` (t = 0 for [`Final::Zero`]; the last trained step for [`Final::Last`] unless
/// the list already ends there).
pub fn times_of_network_timesteps(
    schedule: &dyn Schedule,
    v: &[f64],
    last: Final,
) -> Result<Vec<f64>> {
    let mut times = Vec::with_capacity(v.len() + 1);
    for (i, &n) in v.iter().enumerate() {
        if i > 0 && n >= v[i - 1] {
            bail_option!(
                keys::TIMESTEPS,
                format!(
                    " must decrease strictly: entry {i} is {n} after {}",
                    v[i - 1]
                )
            );
        }
        times.push(
            schedule
                .time_of_network_time(n)
                .map_err(|e| option_error!(keys::TIMESTEPS, format!(": entry {i}: {e}")))?,
        );
    }
    match last {
        Final::Zero => times.push(0.0),
        Final::Last if v.last() != Some(&0.0) => times.push(schedule.time_of_network_time(0.0)?),
        Final::Last => {}
    }
    Ok(times)
}

/// The first grid index of an image-to-image run of `strength` S on a grid of `steps`
/// steps, by diffusers' img2img rule (`StableDiffusionImg2ImgPipeline.get_timesteps`): the
/// last `min(⌊steps·S⌋, steps)` steps run, so the run starts at index `steps − ⌊steps·S⌋`.
pub fn img2img_start(steps: usize, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        bail_option!((keys::STRENGTH, strength), ": expected a value in (0, 1]");
    }
    let run = ((steps as f64 * strength).floor() as usize).min(steps);
    if run == 0 {
        bail_option!(
            (keys::STRENGTH, strength),
            format!(" of {steps} steps runs no step (⌊steps·strength⌋ = 0): raise "),
            keys::STRENGTH,
            " or ",
            keys::STEPS
        );
    }
    Ok(steps - run)
}

/// Where a discrete grid ends after its last timestep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Final {
    /// At ᾱ = 1 (σ = 0, t = 0): the output is x̂0 from the last model call
    /// (diffusers' `set_alpha_to_one` / `final_sigmas_type = "zero"`).
    Zero,
    /// At the last trained step n = 0 (t = 1/T); no extra point when the timesteps already
    /// end there.
    Last,
}

impl FromStr for Final {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "zero" => Final::Zero,
            "last" => Final::Last,
            other => bail_option!(
                (keys::FINAL, other),
                ": unknown final point; expected zero or last"
            ),
        })
    }
}

/// The continuous time of discrete timestep n: `t = (n + 1)/T` (DESIGN §2).
pub fn time_of_timestep(n: f64, train_steps: usize) -> f64 {
    (n + 1.0) / train_steps as f64
}

/// How a run's times are made: a continuous grid, or discrete timesteps plus a final point.
#[derive(Clone, Debug)]
pub enum TimeGrid {
    /// A continuous grid from `t_max` to `t_min`; with `to_zero` its last step goes on to
    /// t = 0 (σ = 0, where the sample is x̂0), within the same step count. A uniform grid
    /// with `to_zero` and `t_min = 0` is N steps uniform from `t_max` to 0. On a discrete schedule the times are
    /// fractional steps (see [`crate::schedule::Tabulated::network_time`]), as diffusers'
    /// `use_karras_sigmas` grids.
    Continuous {
        grid: Grid,
        t_max: f64,
        t_min: f64,
        to_zero: bool,
    },
    /// Times given one by one (`--sigmas`, fractional `--timesteps`, a grid file).
    Explicit { times: Vec<f64>, what: String },
    Discrete {
        /// A spacing (with its offset), or an explicit list when `timesteps` is set.
        spacing: Spacing,
        offset: usize,
        timesteps: Option<Vec<usize>>,
        train_steps: usize,
        last: Final,
    },
}

impl TimeGrid {
    /// The grid times for `steps` requested steps (for an explicit timestep list, its
    /// length decides and `steps` is ignored).
    pub fn times(&self, schedule: &dyn Schedule, steps: usize) -> Result<Vec<f64>> {
        match self {
            TimeGrid::Continuous {
                grid,
                t_max,
                t_min,
                to_zero,
            } => {
                if !*to_zero {
                    return grid.times(schedule, steps, *t_max, *t_min);
                }
                if *t_min == 0.0 {
                    // uniform all the way to t = 0 (rectified flow's default, Flux's grid)
                    if steps == 0 {
                        bail_option!((keys::STEPS, 0usize), ": at least one step is needed");
                    }
                    let n = steps as f64;
                    let mut ts: Vec<f64> = (0..steps).map(|i| t_max * (n - i as f64) / n).collect();
                    ts.push(0.0);
                    return Ok(ts);
                }
                // `steps` steps in all, the last one to σ = 0 (diffusers' final sigma 0).
                let mut ts = match steps {
                    0 => bail_option!((keys::STEPS, 0usize), ": at least one step is needed"),
                    1 => vec![*t_max],
                    n => grid.times(schedule, n - 1, *t_max, *t_min)?,
                };
                ts.push(0.0);
                Ok(ts)
            }
            TimeGrid::Explicit { times, what } => {
                crate::samplers::check_grid(schedule, times).with_context(|| what.clone())?;
                Ok(times.clone())
            }
            TimeGrid::Discrete {
                spacing,
                offset,
                timesteps,
                train_steps,
                last,
            } => {
                let ns = match timesteps {
                    Some(list) => {
                        let l: Vec<i64> = list.iter().map(|&n| n as i64).collect();
                        validate_timesteps(&l, *train_steps)?
                    }
                    None => spacing.timesteps(steps, *train_steps, *offset)?,
                };
                let mut ts: Vec<f64> = ns
                    .iter()
                    .map(|&n| time_of_timestep(n as f64, *train_steps))
                    .collect();
                match last {
                    Final::Zero => ts.push(0.0),
                    Final::Last if ns.last() != Some(&0) => {
                        ts.push(time_of_timestep(0.0, *train_steps))
                    }
                    Final::Last => {}
                }
                if ts.len() < 2 {
                    bail!("one timestep ending at the last trained step leaves no step to take");
                }
                Ok(ts)
            }
        }
    }

    /// True when the grid ends at σ = 0.
    pub fn ends_at_zero(&self) -> bool {
        match self {
            TimeGrid::Discrete { last, .. } => *last == Final::Zero,
            TimeGrid::Continuous { to_zero, .. } => *to_zero,
            TimeGrid::Explicit { times, .. } => times.last() == Some(&0.0),
        }
    }

    /// A short description for reports.
    pub fn describe(&self) -> String {
        match self {
            TimeGrid::Continuous { grid, to_zero, .. } => {
                if *to_zero {
                    format!("{grid}, final zero")
                } else {
                    grid.to_string()
                }
            }
            TimeGrid::Explicit { what, .. } => what.clone(),
            TimeGrid::Discrete {
                spacing,
                offset,
                timesteps,
                last,
                ..
            } => match timesteps {
                Some(_) => format!("explicit timesteps, final {last:?}").to_lowercase(),
                None => {
                    format!("{spacing} spacing (offset {offset}), final {last:?}").to_lowercase()
                }
            },
        }
    }
}

#[cfg(test)]
mod spacing_tests {
    use super::*;

    #[test]
    fn spacings_match_diffusers_examples() {
        assert_eq!(
            Spacing::Leading.timesteps(10, 1000, 0).unwrap(),
            vec![900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
        );
        assert_eq!(Spacing::Leading.timesteps(10, 1000, 1).unwrap()[0], 901);
        assert_eq!(
            Spacing::Linspace.timesteps(10, 1000, 0).unwrap(),
            vec![999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
        );
        assert_eq!(
            Spacing::Trailing.timesteps(10, 1000, 0).unwrap(),
            vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
        );
        assert_eq!(
            Spacing::Trailing.timesteps(3, 1000, 0).unwrap(),
            vec![999, 666, 332]
        );
        assert_eq!(
            Spacing::Linspace.timesteps(20, 1000, 0).unwrap()[..4],
            [999, 946, 894, 841]
        );
        assert!(Spacing::Linspace.timesteps(1001, 1000, 0).is_err());
    }

    /// DPMSolverMultistepScheduler, UniPCMultistepScheduler and DEISMultistepScheduler
    /// (diffusers 0.42) space N + 1 points and drop the last: `leading` is
    /// `arange(0, N + 1)·(T // (N + 1))` reversed without its 0, plus the offset; `linspace` is
    /// `linspace(0, T − 1, N + 1).round()` reversed without its 0. Values printed by diffusers.
    #[test]
    fn the_multistep_spacings_match_diffusers_multistep_schedulers() {
        assert_eq!(
            Spacing::LeadingMultistep.timesteps(10, 1000, 0).unwrap(),
            vec![900, 810, 720, 630, 540, 450, 360, 270, 180, 90]
        );
        assert_eq!(
            Spacing::LeadingMultistep.timesteps(10, 1000, 1).unwrap()[..3],
            [901, 811, 721]
        );
        assert_eq!(
            Spacing::LinspaceMultistep.timesteps(10, 1000, 0).unwrap(),
            vec![999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
        );
        assert_eq!(
            Spacing::LinspaceMultistep.timesteps(25, 1000, 0).unwrap()[..4],
            [999, 959, 919, 879]
        );
        for s in ["leading-multistep", "linspace-multistep"] {
            assert_eq!(s.parse::<Spacing>().unwrap().to_string(), s);
        }
    }

    /// diffusers' DDIMScheduler steps from timestep n to `n − T div N`, which is the next
    /// scheduled timestep only for leading spacing (and trailing when N divides T). Our grid
    /// always steps to the next scheduled timestep; this test pins both facts so that a
    /// regression to the `n − T div N` rule is caught.
    #[test]
    fn previous_timestep_is_the_next_scheduled_one_for_every_spacing() {
        let s = crate::schedule::VpLinear::default();
        let mut ddim_rule_wrong = 0;
        for spacing in [Spacing::Leading, Spacing::Trailing, Spacing::Linspace] {
            for n in [3, 7, 10, 20, 50] {
                let ns = spacing.timesteps(n, 1000, 0).unwrap();
                let g = TimeGrid::Discrete {
                    spacing,
                    offset: 0,
                    timesteps: None,
                    train_steps: 1000,
                    last: Final::Zero,
                };
                let ts = g.times(&s, n).unwrap();
                for i in 0..n - 1 {
                    let prev = ts[i + 1] * 1000.0 - 1.0;
                    assert!(
                        (prev - ns[i + 1] as f64).abs() < 1e-9,
                        "{spacing} N={n} i={i}"
                    );
                    let diffusers_prev = ns[i] as i64 - (1000 / n) as i64;
                    if diffusers_prev != ns[i + 1] as i64 {
                        ddim_rule_wrong += 1;
                        assert_ne!(spacing, Spacing::Leading);
                    }
                }
                assert_eq!(*ts.last().unwrap(), 0.0);
            }
        }
        // linspace N = 10: 999 → 888, where `t − T/N` gives 899.
        assert!(ddim_rule_wrong > 0);
        let ts = Spacing::Linspace.timesteps(10, 1000, 0).unwrap();
        assert_eq!(ts[1], 888);
        assert_ne!(ts[0] - 1000 / 10, ts[1]);
    }

    #[test]
    fn final_last_ends_at_the_first_trained_step() {
        let s = crate::schedule::VpLinear::default();
        let mk = |spacing| TimeGrid::Discrete {
            spacing,
            offset: 0,
            timesteps: None,
            train_steps: 1000,
            last: Final::Last,
        };
        let ts = mk(Spacing::Trailing).times(&s, 10).unwrap();
        assert_eq!(ts.len(), 11);
        assert_eq!(*ts.last().unwrap(), 0.001);
        // leading already ends at n = 0: no duplicate point
        let ts = mk(Spacing::Leading).times(&s, 10).unwrap();
        assert_eq!(ts.len(), 10);
        assert_eq!(*ts.last().unwrap(), 0.001);
    }
}
