//! Tuned grids ([`run`] runs the `tune` command): a time grid for one sampler, model and NFE budget, chosen so that the
//! sampler's end points come as close as possible to a teacher's from the same noise.
//!
//! Method: GITS (Chen et al. 2024, arXiv 2405.11326), dynamic programming over a fine
//! candidate grid ([`qtaylor_core::tune::cheapest_path`]):
//!
//! 1. candidates: `K + 1` times uniform in log-SNR λ from the default grid's first time to
//!    the schedule's last usable time (the first trained step of a discrete model), plus
//!    t = 0 when the default grid ends at x̂0;
//! 2. teacher: the teacher sampler on the candidates refined `r` times (uniform in λ), from
//!    `M` start noises whose streams no evaluation uses (stream indices from 2⁴⁰ on); its
//!    states at the candidates are recorded;
//! 3. cost of a step `c_k → c_l`: one step of the tuned sampler from the teacher's state at
//!    `c_k` (with the rule it uses inside a grid: quasi-Taylor's last-step rule only for a
//!    step to the end), RMS distance to the teacher's state at `c_l`, averaged over the M
//!    samples. Multistep samplers take that step without history (their first-order start,
//!    as GITS does for iPNDM): the grid is tuned for the local error;
//! 4. the cheapest path with the default grid's number of steps.
//!
//! Then a global refinement ([`qtaylor_core::tune::refine`], `--refine-sweeps`, 0 to skip):
//! starting from whichever of the default and the dynamic-programming grid has the lower
//! *full-run* end-point error on the tuning samples, a compass search over the grid's
//! log-SNR values moves one time at a time and keeps a move only when the whole sampler
//! (multistep history and last-step rule included) lands closer to the teacher's end points.
//! The dynamic program's local cost cannot see a multistep sampler's history; this stage
//! optimizes the quantity the grid is judged by, as LD3 (arXiv 2412.09785) does by gradients.
//!
//! The held-out check draws `H` more samples from other streams (from 2⁴¹ on) and reports
//! the full sampler's end-point RMSE against the teacher on the default grid, the dynamic
//! program's grid and the tuned (refined) grid.
//!
//! Every error above is a mean over samples of a per-sample RMS, so tuning runs data
//! parallel (`tune --devices`, [`Share`]): replica r holds samples ⌊r·M/R⌋..⌊(r+1)·M/R⌋ of
//! each set (the same noise streams), and each mean is taken over the per-sample values of
//! all replicas gathered in sample order. The replicas see the same costs and objective values
//! and make the same decisions. On the CPU, where the network computes each sample
//! independently of its batch, the result is bit for bit the one-device result.

pub mod run;

use std::time::Instant;

use crate::keys;
use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};

use crate::models::model::{Model, Parameterization};
use crate::sampling::samplers::{self, Backend, CandleBackend, Ctx, LastStep, Options, Sampler};
use crate::schedule::Schedule;
use crate::tensor::data_parallel::Group;
use crate::tensor::ops::Coef;
use crate::tensor::rng::NoiseStreams;
use qtaylor_core::exec::Tolerance;

/// First noise stream of the tuning samples and of the held-out check: far from the
/// streams `0..n` an evaluation draws.
pub const TUNE_STREAM: usize = 1 << 40;
pub const HOLDOUT_STREAM: usize = 1 << 41;

/// What to tune.
#[derive(Clone, Debug)]
pub struct TuneConfig {
    pub sampler: Sampler,
    pub opts: Options,
    /// The default grid (its first time, length and end decide the tuned grid's).
    pub default_times: Vec<f64>,
    /// The last positive time candidates may reach when the grid ends at x̂0 (otherwise the
    /// default grid's end is kept).
    pub t_min: f64,
    pub teacher: Sampler,
    /// Teacher steps over the whole run (spread over the candidate intervals).
    pub teacher_steps: usize,
    /// Candidate intervals K.
    pub candidates: usize,
    /// Sweeps of the global refinement (0: the dynamic program's grid as it is).
    pub refine_sweeps: usize,
    /// Tuning samples M and held-out samples H.
    pub samples: usize,
    pub holdout: usize,
    pub seed: u64,
    pub dtype: DType,
    pub device: Device,
}

/// The outcome.
#[derive(Clone, Debug)]
pub struct Tuned {
    pub times: Vec<f64>,
    pub candidates: Vec<f64>,
    /// Held-out end-point RMSE against the teacher: default grid, tuned grid.
    pub error_default: f64,
    pub error_tuned: f64,
    /// Held-out error of the dynamic program's grid (before the refinement).
    pub error_gits: f64,
    /// The dynamic program's grid.
    pub gits_times: Vec<f64>,
    /// Full-run end-point error on the tuning samples: where the refinement started (the
    /// better of default and dynamic program) and where it ended; objective evaluations.
    pub refine_start: f64,
    pub refine_end: f64,
    pub refine_evals: usize,
    /// Summed one-step cost of the default path is not defined (its times are not
    /// candidates); the tuned path's summed cost on the tuning samples:
    pub tuning_cost: f64,
    pub seconds: f64,
    pub teacher_steps: usize,
}

/// Wraps the model: the last prediction is reused when the same tensor is asked again at
/// the same time (every candidate step from `c_k` starts with the same call).
struct Cached<'a> {
    model: &'a dyn Model,
    last: std::sync::Mutex<Option<(candle_core::TensorId, Vec<u64>, Tensor)>>,
}

impl Model for Cached<'_> {
    fn parameterization(&self) -> Parameterization {
        self.model.parameterization()
    }
    fn predict(&self, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        let key: Vec<u64> = t.iter().map(|v| v.to_bits()).collect();
        let mut last = self.last.lock().expect("cache lock");
        if let Some((id, k, p)) = &*last
            && *id == x.id()
            && *k == key
        {
            return Ok(p.clone());
        }
        let p = self.model.predict(x, t)?;
        *last = Some((x.id(), key, p.clone()));
        Ok(p)
    }
}

/// A backend that records the state at the start of every step.
struct Recording<'a> {
    inner: CandleBackend<'a>,
    states: Vec<(f64, Tensor)>,
}

impl Backend for Recording<'_> {
    type X = Tensor;
    fn predict(&mut self, x: &Tensor, t: &[f64], step: usize) -> Result<Tensor> {
        self.inner.predict(x, t, step)
    }
    fn lincomb(&mut self, terms: &[(Coef, &Tensor)]) -> Result<Tensor> {
        self.inner.lincomb(terms)
    }
    fn noise(&mut self, like: &Tensor) -> Result<Tensor> {
        self.inner.noise(like)
    }
    fn clamp(&mut self, x: &Tensor, limit: f64) -> Result<Tensor> {
        self.inner.clamp(x, limit)
    }
    fn error_norm(
        &mut self,
        e: &Tensor,
        a: &Tensor,
        b: &Tensor,
        rtol: f64,
        atol: f64,
        kind: Tolerance,
    ) -> Result<Vec<f64>> {
        self.inner.error_norm(e, a, b, rtol, atol, kind)
    }
    fn begin_step(&mut self, i: usize, t: f64, x: &Tensor) -> Result<()> {
        self.states.push((t, x.clone()));
        self.inner.begin_step(i, t, x)
    }
}

/// The per-sample RMS difference of two batches, in f64.
fn per_sample_rmse(a: &Tensor, b: &Tensor) -> Result<Vec<f64>> {
    let rows = a.dims()[0];
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.reshape((rows, ()))?;
    Ok(d.sqr()?.mean(1)?.sqrt()?.to_vec1::<f64>()?)
}

/// This replica's share of the samples in data-parallel tuning (see the module doc).
#[derive(Clone, Copy)]
pub struct Share<'a> {
    pub rank: usize,
    /// With `world` > 1: the group through which the replicas gather per-sample errors.
    pub group: Option<&'a Group>,
}

impl Share<'_> {
    /// All samples on one device.
    pub fn whole() -> Self {
        Share {
            rank: 0,
            group: None,
        }
    }

    fn world(&self) -> usize {
        self.group.map_or(1, Group::world)
    }

    /// This replica's samples `lo..hi` of a set of `n`.
    pub fn range(&self, n: usize) -> (usize, usize) {
        let w = self.world();
        (self.rank * n / w, (self.rank + 1) * n / w)
    }

    /// The means over all `n` samples of a set of each of `locals` (this replica's per-sample
    /// values): gathered in sample order (zeros elsewhere, summed over the replicas, which
    /// is exact), then summed in that order.
    fn means(&self, n: usize, locals: &[Vec<f64>]) -> Result<Vec<f64>> {
        let full: Vec<f64> = match self.group {
            None => locals.concat(),
            Some(g) => {
                let (lo, hi) = self.range(n);
                let mut v = vec![0.0; n * locals.len()];
                for (j, l) in locals.iter().enumerate() {
                    if l.len() != hi - lo {
                        bail!(
                            "replica {}: {} values for samples {lo}..{hi}",
                            self.rank,
                            l.len()
                        );
                    }
                    v[j * n + lo..j * n + hi].copy_from_slice(l);
                }
                g.exchange(self.rank, v)?.to_vec()
            }
        };
        Ok(full
            .chunks(n)
            .map(|c| c.iter().sum::<f64>() / n as f64)
            .collect())
    }

    /// [`Share::means`] of one per-sample RMS difference.
    fn mean_rmse(&self, n: usize, a: &Tensor, b: &Tensor) -> Result<f64> {
        Ok(self.means(n, &[per_sample_rmse(a, b)?])?[0])
    }
}

/// λ at `hi`, or where it is −∞ (pure noise, rectified flow's ς = 1) λ at
/// `hi − (hi − lo)/1000`: the finite top of the candidates' λ range.
fn finite_top_lambda(schedule: &dyn Schedule, hi: f64, lo: f64) -> f64 {
    let l = schedule.lambda(hi);
    if l == f64::NEG_INFINITY {
        schedule.lambda(hi - (hi - lo) / 1000.0)
    } else {
        l
    }
}

/// `n` times uniform in λ from `hi` to `lo` (end points exact; from pure noise the inner
/// ones from [`finite_top_lambda`]).
fn lambda_uniform(schedule: &dyn Schedule, hi: f64, lo: f64, n: usize) -> Result<Vec<f64>> {
    let (l0, l1) = (finite_top_lambda(schedule, hi, lo), schedule.lambda(lo));
    let mut v = Vec::with_capacity(n + 1);
    for i in 0..=n {
        v.push(match i {
            0 => hi,
            i if i == n => lo,
            i => schedule.t_of_lambda(l0 + (l1 - l0) * i as f64 / n as f64)?,
        });
    }
    Ok(v)
}

/// Runs `sampler` over `ts` from `x` (deterministic samplers only: the noise streams are
/// never drawn from).
fn run(
    model: &dyn Model,
    schedule: &dyn Schedule,
    sampler: Sampler,
    opts: &Options,
    ts: &[f64],
    x: &Tensor,
) -> Result<Tensor> {
    let rows = x.dims()[0];
    let mut noise = NoiseStreams::new(0, 0, rows);
    Ok(samplers::sample(
        model,
        schedule,
        sampler,
        opts,
        ts,
        x.clone(),
        &mut noise,
        None,
    )?
    .x)
}

/// The teacher's states at every candidate (the last entry: its end point).
fn teacher_states(
    model: &dyn Model,
    schedule: &dyn Schedule,
    cfg: &TuneConfig,
    candidates: &[f64],
    x: &Tensor,
) -> Result<(Vec<Tensor>, usize)> {
    let zero = *candidates.last().expect("candidates") == 0.0;
    let positive = if zero {
        &candidates[..candidates.len() - 1]
    } else {
        candidates
    };
    let intervals = positive.len() - 1;
    let r = cfg.teacher_steps.div_ceil(intervals.max(1)).max(1);
    let mut fine = vec![positive[0]];
    let mut at = vec![0usize]; // index in `fine` of each candidate
    for w in positive.windows(2) {
        let sub = lambda_uniform(schedule, w[0], w[1], r)?;
        fine.extend_from_slice(&sub[1..]);
        at.push(fine.len() - 1);
    }
    if zero {
        fine.push(0.0);
        at.push(fine.len() - 1);
    }
    let rows = x.dims()[0];
    let mut noise = NoiseStreams::new(0, 0, rows);
    let name = cfg.teacher.to_string();
    let mut rec = Recording {
        inner: CandleBackend::new(model, &mut noise, &name, None),
        states: Vec::new(),
    };
    let end = {
        let mut ctx = Ctx::new(&mut rec, schedule, model.parameterization(), None, rows);
        samplers::run(&mut ctx, cfg.teacher, &Options::default(), &fine, x.clone())?
    };
    rec.inner.finish()?;
    if rec.states.len() != fine.len() - 1 {
        bail!(
            "teacher {} reported {} steps on a {}-step grid; use a fixed-grid teacher",
            cfg.teacher,
            rec.states.len(),
            fine.len() - 1
        );
    }
    let mut out: Vec<Tensor> = at[..at.len() - 1]
        .iter()
        .map(|&i| rec.states[i].1.clone())
        .collect();
    out.push(end);
    Ok((out, fine.len() - 1))
}

/// Samplers whose grid a tuned grid can replace.
pub fn check_tunable(sampler: Sampler, opts: &Options) -> Result<()> {
    if sampler.is_adaptive() {
        bail!("sampler {sampler} chooses its own steps (adaptive); there is no grid to tune");
    }
    if matches!(sampler, Sampler::EdmHeun | Sampler::DpmSolverFast) {
        bail!(
            "sampler {sampler} builds its own grid from the end points; a tuned grid would not be used"
        );
    }
    if sampler.is_stochastic(opts) {
        bail!(
            "sampler {sampler} is stochastic here; tuning matches deterministic end points (use an ODE sampler, or eta 0)"
        );
    }
    if opts.denoise_final {
        crate::bail_option!(keys::DENOISE_FINAL, ": tune the grid without it");
    }
    Ok(())
}

/// Tunes the grid of `cfg.sampler` for `model`; `share` is this replica's part of a
/// data-parallel run ([`Share::whole`] on one device).
pub fn tune(
    model: &dyn Model,
    schedule: &dyn Schedule,
    item: &[usize],
    cfg: &TuneConfig,
    share: Share,
    progress: &mut dyn FnMut(&str),
) -> Result<Tuned> {
    check_tunable(cfg.sampler, &cfg.opts)?;
    if cfg.teacher.is_adaptive() || cfg.teacher.is_stochastic(&Options::default()) {
        bail!(
            "teacher {}: expected a deterministic fixed-grid sampler (e.g. dpmpp-3m, rk4)",
            cfg.teacher
        );
    }
    let start = Instant::now();
    let def = &cfg.default_times;
    let steps = def.len() - 1;
    let zero = *def.last().expect("grid") == 0.0;
    let t_hi = def[0];
    // A grid that ends at a positive time keeps that end; one that ends at x̂0 may place
    // its last positive time anywhere down to t_min.
    let t_lo = if zero { cfg.t_min } else { def[steps] };
    if !(t_lo > 0.0 && t_lo < t_hi) {
        bail!("tune: the last positive time {t_lo} must lie in (0, {t_hi})");
    }
    let positive = if zero { steps - 1 } else { steps };
    if cfg.candidates < positive.max(1) {
        crate::bail_option!(
            (keys::CANDIDATES, cfg.candidates),
            format!(
                ": at least {} are needed for {steps} steps",
                positive.max(1)
            )
        );
    }
    let mut cand = lambda_uniform(schedule, t_hi, t_lo, cfg.candidates)?;
    if zero {
        cand.push(0.0);
    }
    for (key, n) in [(keys::SAMPLES, cfg.samples), (keys::HOLDOUT, cfg.holdout)] {
        if n < share.world() {
            crate::bail_option!(
                (key, n),
                format!(
                    ": data-parallel tuning needs at least one sample per device ({})",
                    share.world()
                )
            );
        }
    }
    // This replica's samples of a set of `n` whose streams start at `first`.
    let noise_x = |first: usize, n: usize| -> Result<Tensor> {
        let (lo, hi) = share.range(n);
        let mut s = NoiseStreams::new(cfg.seed, first + lo, hi - lo);
        s.normal(item, cfg.dtype, &cfg.device)
    };
    progress(&format!(
        "teacher {} on {} candidates x {} samples",
        cfg.teacher,
        cand.len(),
        cfg.samples
    ));
    let x_tune = noise_x(TUNE_STREAM, cfg.samples)?;
    let (states, teacher_steps) = teacher_states(model, schedule, cfg, &cand, &x_tune)?;
    // Costs of every candidate step.
    let n = cand.len();
    let last = n - 1;
    let mut cost = vec![vec![f64::INFINITY; n]; n];
    let cached = Cached {
        model,
        last: std::sync::Mutex::new(None),
    };
    for k in 0..last {
        progress(&format!("costs from candidate {k} of {last}"));
        let mut locals = Vec::with_capacity(n - k - 1);
        for l in k + 1..n {
            // A step to σ = 0 is x̂0 whatever the sampler: only from the last positive
            // candidate that the path can still reach in time.
            let mut opts = cfg.opts.clone();
            if l != last {
                opts.qt_last = LastStep::Taylor;
            }
            let x = run(
                &cached,
                schedule,
                cfg.sampler,
                &opts,
                &[cand[k], cand[l]],
                &states[k],
            )?;
            locals.push(per_sample_rmse(&x, &states[l])?);
        }
        for (l, c) in (k + 1..n).zip(share.means(cfg.samples, &locals)?) {
            cost[k][l] = c;
        }
    }
    let (path, total) = qtaylor_core::tune::cheapest_path(&cost, steps)?;
    let gits_times: Vec<f64> = path.iter().map(|&i| cand[i]).collect();
    // Global refinement of the positive times' λ against the full run's end-point error.
    let teacher_end = states.last().expect("teacher end");
    let full = |ts: &[f64]| -> Result<f64> {
        let x = run(model, schedule, cfg.sampler, &cfg.opts, ts, &x_tune)?;
        share.mean_rmse(cfg.samples, &x, teacher_end)
    };
    let (start_times, start_cost) = {
        let g = full(&gits_times)?;
        if cfg.refine_sweeps == 0 {
            (gits_times.clone(), g)
        } else {
            let d = full(def)?;
            if d < g {
                (def.clone(), d)
            } else {
                (gits_times.clone(), g)
            }
        }
    };
    let n_pos = if zero { steps } else { steps + 1 };
    let (times, refine_end, refine_evals) = if cfg.refine_sweeps == 0 || n_pos < 2 {
        (start_times, start_cost, 0)
    } else {
        let mut lam: Vec<f64> = start_times[..n_pos]
            .iter()
            .map(|&t| schedule.lambda(t))
            .collect();
        if lam[0] == f64::NEG_INFINITY && lam.len() > 1 {
            // pure noise (flow's ς = 1): the first time stays t_hi (`to_times`), its λ only
            // has to lie below the others
            lam[0] = lam[1].min(finite_top_lambda(schedule, t_hi, t_lo)) - 1.0;
        }
        let to_times = |l: &[f64]| -> Result<Vec<f64>> {
            let mut ts = Vec::with_capacity(steps + 1);
            for (i, &v) in l.iter().enumerate() {
                ts.push(match i {
                    0 => t_hi,
                    i if i == n_pos - 1 && !zero => def[steps],
                    _ => schedule.t_of_lambda(v)?,
                });
            }
            if zero {
                ts.push(0.0);
            }
            Ok(ts)
        };
        let bound = zero.then(|| schedule.lambda(t_lo));
        let mut evals = 0usize;
        let mut objective = |l: &[f64]| -> Result<f64> {
            evals += 1;
            if evals % 20 == 1 {
                progress(&format!("refinement: objective evaluation {evals}"));
            }
            full(&to_times(l)?)
        };
        let r =
            qtaylor_core::tune::refine(&lam, bound, cfg.refine_sweeps, 1.0 / 64.0, &mut objective)?;
        (to_times(&r.x)?, r.cost, r.evals)
    };
    // Held-out check against a fresh teacher run.
    progress("held-out check");
    let x_hold = noise_x(HOLDOUT_STREAM, cfg.holdout)?;
    let (hs, _) = teacher_states(model, schedule, cfg, &cand, &x_hold)?;
    let hold_end = hs.last().expect("teacher end");
    let err = |ts: &[f64]| -> Result<f64> {
        let x = run(model, schedule, cfg.sampler, &cfg.opts, ts, &x_hold)?;
        share.mean_rmse(cfg.holdout, &x, hold_end)
    };
    let error_default = err(def)?;
    let error_gits = err(&gits_times)?;
    let error_tuned = err(&times)?;
    Ok(Tuned {
        times,
        candidates: cand,
        error_default,
        error_tuned,
        error_gits,
        gits_times,
        refine_start: start_cost,
        refine_end,
        refine_evals,
        tuning_cost: total,
        seconds: start.elapsed().as_secs_f64(),
        teacher_steps,
    })
}
