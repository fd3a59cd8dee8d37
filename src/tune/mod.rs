//! Tuned grids ([`run`] runs the `tune` command): a time grid for one sampler, model and NFE
//! budget, chosen so that the sampler's end points match a teacher's: as a distribution
//! (objectives `fd`, `kid`, in a feature space) or point by point from the same noise (`l2`);
//! see [`objective`].
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
//! objective on the tuning samples, a compass search over the grid's log-SNR values moves
//! one time at a time and keeps a move only when the whole sampler run (multistep history
//! and last-step rule included) lowers the objective. The dynamic program's local cost
//! cannot see a multistep sampler's history, nor a distribution; this stage optimizes the
//! quantity the grid is judged by, as LD3 (arXiv 2412.09785) does by gradients.
//!
//! Overfitting is guarded by `H` held-out samples from other streams (from 2⁴¹ on): after
//! every sweep the grid's held-out objective is measured; the refinement stops after
//! `patience` sweeps without a held-out improvement, and the grid with the best held-out
//! objective is the result. The report gives the objective and the end-point RMSE against
//! the teacher, on both sets, for the default, dynamic-program and tuned grids.
//!
//! Every L2 error above is a mean over samples of a per-sample RMS, and every feature
//! distance is taken over all samples' features gathered in sample order, so tuning runs
//! data parallel (`tune --devices`, [`Share`]): replica r holds samples ⌊r·M/R⌋..⌊(r+1)·M/R⌋
//! of each set (the same noise streams). The replicas see the same costs and objective
//! values and make the same decisions. On the CPU, where the network computes each sample
//! independently of its batch, the result is bit for bit the one-device result.

pub mod objective;
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
use objective::{Features, Objective};
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
    /// What the refinement minimises (the dynamic program's local costs are always L2).
    pub objective: Objective,
    /// The refinement stops after this many sweeps (at least 1) without a held-out
    /// improvement, and the grid with the best held-out objective is the result.
    pub patience: usize,
    /// Tuning samples M and held-out samples H.
    pub samples: usize,
    pub holdout: usize,
    pub seed: u64,
    pub dtype: DType,
    pub device: Device,
}

/// A grid's scores on a set of samples: the objective, and the end-point RMSE beside it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    pub objective: f64,
    pub l2: f64,
}

/// One sweep of the refinement: the objective on the tuning samples where it ended, and
/// the held-out scores of that grid.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sweep {
    pub sweep: usize,
    pub tuning: f64,
    pub holdout: Score,
}

/// The outcome.
#[derive(Clone, Debug)]
pub struct Tuned {
    pub times: Vec<f64>,
    pub candidates: Vec<f64>,
    /// Held-out scores of the default grid, the dynamic program's and the tuned one.
    pub holdout_default: Score,
    pub holdout_gits: Score,
    pub holdout_tuned: Score,
    /// The same on the tuning samples.
    pub tuning_default: Score,
    pub tuning_gits: Score,
    pub tuning_tuned: Score,
    /// The dynamic program's grid.
    pub gits_times: Vec<f64>,
    /// Where the refinement started: the default grid or the dynamic program's (the lower
    /// tuning objective).
    pub refine_from: &'static str,
    /// Objective evaluations of the refinement, and its sweeps.
    pub refine_evals: usize,
    pub sweeps: Vec<Sweep>,
    /// The sweep whose grid is the result (0: the start), chosen on held-out data.
    pub best_sweep: usize,
    /// The tuned path's summed one-step L2 cost on the tuning samples.
    pub tuning_cost: f64,
    pub seconds: f64,
    pub teacher_steps: usize,
}

/// The models of the two sample sets: the same model, or a class-conditional one whose
/// sample i asks for class `classes[i mod len]` within each set (one class list per set's
/// share of rows).
#[derive(Clone, Copy)]
pub struct SetModels<'a> {
    pub tuning: &'a dyn Model,
    pub holdout: &'a dyn Model,
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
    /// values): gathered by [`Share::rows`], then summed in sample order.
    fn means(&self, n: usize, locals: &[Vec<f64>]) -> Result<Vec<f64>> {
        let (lo, hi) = self.range(n);
        if let Some(l) = locals.iter().find(|l| l.len() != hi - lo) {
            bail!(
                "replica {}: {} values for samples {lo}..{hi}",
                self.rank,
                l.len()
            );
        }
        let mine = (0..hi - lo)
            .map(|i| locals.iter().map(|l| l[i]).collect())
            .collect();
        let all = self.rows(n, mine)?;
        Ok((0..locals.len())
            .map(|j| all.iter().map(|r| r[j]).sum::<f64>() / n as f64)
            .collect())
    }

    /// The rows of all `n` samples of a set, in sample order, from this replica's `local`
    /// rows: each replica puts its rows in place among zeros and the replicas' vectors are
    /// summed, which is exact.
    fn rows(&self, n: usize, local: Vec<Vec<f64>>) -> Result<Vec<Vec<f64>>> {
        let Some(g) = self.group else {
            return Ok(local);
        };
        let (lo, hi) = self.range(n);
        // every replica holds at least one sample (checked in `tune`)
        let d = local.first().map_or(0, Vec::len);
        if local.len() != hi - lo {
            bail!(
                "replica {}: {} rows for samples {lo}..{hi}",
                self.rank,
                local.len()
            );
        }
        let mut v = vec![0.0; n * d];
        for (i, r) in local.iter().enumerate() {
            v[(lo + i) * d..(lo + i + 1) * d].copy_from_slice(r);
        }
        let all = g.exchange(self.rank, v)?;
        Ok(all.chunks(d.max(1)).map(<[f64]>::to_vec).collect())
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

/// Tunes the grid of `cfg.sampler` for `models` (the tuning and held-out sets' models);
/// `features` is the feature map of a distribution objective (None for `l2`); `share` is
/// this replica's part of a data-parallel run ([`Share::whole`] on one device).
pub fn tune(
    models: SetModels,
    schedule: &dyn Schedule,
    item: &[usize],
    cfg: &TuneConfig,
    features: Option<&dyn Features>,
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
    if cfg.patience == 0 {
        crate::bail_option!((keys::PATIENCE, 0usize), ": at least 1");
    }
    if cfg.objective.uses_features() != features.is_some() {
        bail!(
            "tune: the {} objective {} a feature map",
            cfg.objective,
            if features.is_some() {
                "takes no"
            } else {
                "needs"
            }
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
        if n < 2 && cfg.objective.uses_features() {
            crate::bail_option!(
                (key, n),
                format!(
                    ": the {} objective compares sets of samples; at least 2 are needed",
                    cfg.objective
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
    let (states, teacher_steps) = teacher_states(models.tuning, schedule, cfg, &cand, &x_tune)?;
    // Costs of every candidate step.
    let n = cand.len();
    let last = n - 1;
    let mut cost = vec![vec![f64::INFINITY; n]; n];
    let cached = Cached {
        model: models.tuning,
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
    // A set of samples with the teacher's end points (and their features).
    struct Set<'m> {
        model: &'m dyn Model,
        x: Tensor,
        n: usize,
        end: Tensor,
        features: Option<Vec<Vec<f64>>>,
    }
    let teacher_features = |end: &Tensor, n: usize| -> Result<Option<Vec<Vec<f64>>>> {
        features.map(|f| share.rows(n, f.rows(end)?)).transpose()
    };
    let score = |ts: &[f64], s: &Set| -> Result<Score> {
        let x = run(s.model, schedule, cfg.sampler, &cfg.opts, ts, &s.x)?;
        let l2 = share.mean_rmse(s.n, &x, &s.end)?;
        let objective = match (features, &s.features) {
            (Some(f), Some(teacher)) => cfg
                .objective
                .distance(&share.rows(s.n, f.rows(&x)?)?, teacher)?,
            _ => l2,
        };
        Ok(Score { objective, l2 })
    };
    let end = states.last().expect("teacher end").clone();
    let tuning = Set {
        model: models.tuning,
        x: x_tune,
        n: cfg.samples,
        features: teacher_features(&end, cfg.samples)?,
        end,
    };
    drop(states);
    progress("held-out teacher");
    let x_hold = noise_x(HOLDOUT_STREAM, cfg.holdout)?;
    let (hs, _) = teacher_states(models.holdout, schedule, cfg, &cand, &x_hold)?;
    let end = hs.last().expect("teacher end").clone();
    let holdout = Set {
        model: models.holdout,
        x: x_hold,
        n: cfg.holdout,
        features: teacher_features(&end, cfg.holdout)?,
        end,
    };
    drop(hs);
    let tuning_default = score(def, &tuning)?;
    let tuning_gits = score(&gits_times, &tuning)?;
    let holdout_default = score(def, &holdout)?;
    let holdout_gits = score(&gits_times, &holdout)?;
    // Global refinement of the positive times' λ against the whole run's objective, from
    // the better start on the tuning samples; the held-out objective picks the sweep.
    let (refine_from, start_times, start_tuning, start_holdout) =
        if cfg.refine_sweeps > 0 && tuning_default.objective < tuning_gits.objective {
            ("default", def.clone(), tuning_default, holdout_default)
        } else {
            (
                "dynamic program",
                gits_times.clone(),
                tuning_gits,
                holdout_gits,
            )
        };
    let n_pos = if zero { steps } else { steps + 1 };
    let mut sweeps = Vec::new();
    let mut best = (0usize, start_times.clone(), start_holdout);
    let mut refine_evals = 0;
    if cfg.refine_sweeps > 0 && n_pos >= 2 {
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
            Ok(score(&to_times(l)?, &tuning)?.objective)
        };
        let mut since_best = 0usize;
        // A sweep that kept no move (its step is halved) leaves the grid as it was: its
        // held-out score is the last one, and it counts towards the patience.
        let mut last: Option<(Vec<f64>, Score)> = None;
        let mut after_sweep = |sweep: usize, l: &[f64], tuning_cost: f64| -> Result<bool> {
            let ts = to_times(l)?;
            let h = match &last {
                Some((prev, h)) if *prev == ts => *h,
                _ => score(&ts, &holdout)?,
            };
            last = Some((ts.clone(), h));
            sweeps.push(Sweep {
                sweep,
                tuning: tuning_cost,
                holdout: h,
            });
            if h.objective < best.2.objective {
                best = (sweep, ts, h);
                since_best = 0;
            } else {
                since_best += 1;
            }
            Ok(since_best >= cfg.patience)
        };
        let r = qtaylor_core::tune::refine(
            &lam,
            bound,
            cfg.refine_sweeps,
            1.0 / 64.0,
            &mut objective,
            &mut after_sweep,
        )?;
        refine_evals = r.evals;
    }
    let (best_sweep, times, holdout_tuned) = best;
    // The start's tuning scores are known; a refined grid's l2 on them is not.
    let tuning_tuned = if best_sweep == 0 {
        start_tuning
    } else {
        score(&times, &tuning)?
    };
    Ok(Tuned {
        times,
        candidates: cand,
        holdout_default,
        holdout_gits,
        holdout_tuned,
        tuning_default,
        tuning_gits,
        tuning_tuned,
        gits_times,
        refine_from,
        refine_evals,
        sweeps,
        best_sweep,
        tuning_cost: total,
        seconds: start.elapsed().as_secs_f64(),
        teacher_steps,
    })
}
