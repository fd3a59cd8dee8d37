//! `qtaylor bench`: every sampler at every NFE budget on an exact-score problem, from the
//! same start noise, against a high-accuracy reference (DESIGN §8).
//!
//! Per (sampler, budget): the most steps whose NFE fits the budget (the adaptive samplers:
//! the tolerance of a sweep whose NFE lands closest below the budget); the per-sample RMSE
//! of the end point against the reference ODE solution from the same start (deterministic
//! samplers only; a stochastic sampler does not follow the ODE); the sliced Wasserstein-2
//! distance between the samples and as many exact samples of the end marginal, next to
//! its finite-sample floor (the same distance between two independent exact sets); and for
//! data sets of points, the distance to the nearest data point and the fraction of samples
//! that land on the same point as the reference.
//!
//! Every metric is computed from per-sample outcomes ([`bench_rows`] draws them, [`report_of`]
//! computes the report): sample i's start and sampler noise come from stream (seed, i), every
//! sampler and the reference step each sample on its own, and the mean NFE is the integer
//! count of row evaluations over the samples. So `bench --shard I/N` runs every cell on rows
//! ⌊I·B/N⌋..⌊(I+1)·B/N⌋ only and writes them as a part ([`write_part`]), and `merge`
//! ([`merge_parts`]) gives the unsharded report but for the `seconds` column, which is then
//! the shards' sampling seconds added up. An adaptive sampler's tolerance sweep, cut where
//! the mean NFE over all samples first exceeds the largest budget, runs in a shard until the
//! shard's rows alone exceed it for every sample ([`sweep_over`]): at least as far as the
//! whole run, so a shard may run a few more tolerances, which merge drops.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::grid::TimeGrid;
use crate::keys;
use crate::measure::metrics::{mean, rmse_per_sample, sliced_w2};
use crate::measure::plot::{Line, Panel, loglog_png};
use crate::measure::reference::reference_endpoint;
use crate::models::problems::Problem;
use crate::sampling::samplers::{Options, Sampler, reaches_zero, sample};
use crate::sampling::spec::RunSettings;
use crate::schedule::Schedule;
use crate::shard::{BENCH_KIND, Part, Shard};
use crate::tensor::ops::rows_f64;
use crate::tensor::rng::NoiseStreams;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub samplers: Vec<Sampler>,
    pub budgets: Vec<usize>,
    pub grid: TimeGrid,
    pub batch: usize,
    pub seed: u64,
    pub dtype: DType,
    pub opts: Options,
    /// rtol = atol of the reference solution (checked against half of it).
    pub ref_tol: f64,
    /// Random directions of the sliced Wasserstein distance.
    pub projections: usize,
}

/// One (sampler, budget) cell.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub sampler: String,
    pub nfe_budget: usize,
    /// Steps on the grid (`None`: nothing fits the budget, or adaptive).
    pub steps: Option<usize>,
    /// Model evaluations per sample actually used (`None`: not run).
    pub nfe_used: Option<f64>,
    /// Mean per-sample RMSE to the reference end point (deterministic samplers).
    pub rmse: Option<f64>,
    /// Sliced W2 to exact samples of the end marginal.
    pub sw2: Option<f64>,
    /// Mean RMS distance to the nearest (scaled) data point (data sets of points).
    pub nearest_distance: Option<f64>,
    /// Fraction of samples whose nearest data point is the reference's (deterministic).
    pub same_point: Option<f64>,
    /// The adaptive samplers' relative tolerance for this budget.
    pub rtol: Option<f64>,
    /// Seconds spent sampling (merged shards: their seconds added up, compute not wall clock).
    pub seconds: Option<f64>,
}

/// The whole bench result.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub problem: String,
    pub schedule: String,
    pub grid: String,
    pub batch: usize,
    pub seed: u64,
    pub t_start: f64,
    pub t_end: f64,
    pub dtype: String,
    pub reference_tol: f64,
    /// Max |x(tol) − x(tol/2)| over all references, their own error estimate.
    pub reference_check: f64,
    pub reference_nfe: f64,
    pub sw2_floor: f64,
    /// The reference end points' RMS distance to their nearest data point.
    pub reference_nearest_distance: Option<f64>,
    pub rows: Vec<BenchRow>,
}

/// The last index k of the adaptive samplers' tolerance sweep 10^(−k/2), k = 0..=16.
const SWEEP_LAST: usize = 16;

/// The name of the array in a bench part's safetensors file that holds its [`BenchPart`]
/// (as JSON bytes).
const PART_INFO: &str = "bench.json";

/// Whether a tolerance of an adaptive sampler's sweep ends the sweep: the `row_evals` model
/// evaluations of some of the run's `batch` samples exceed what all of them would use at
/// `max_budget` NFE each. For all samples this is "the mean NFE exceeds the largest budget";
/// for a shard's rows it implies it (evaluations are never negative), so a shard runs every
/// tolerance the whole run runs, and [`report_of`] finds the whole run's end of the sweep
/// in the merged counts.
fn sweep_over(row_evals: u64, max_budget: usize, batch: usize) -> bool {
    row_evals > max_budget as u64 * batch as u64
}

/// The end points of one sampler run or reference on the rows of a bench (f64, one row per
/// sample, flattened), and for data sets of points each row's nearest data point and its
/// RMS distance to it.
#[derive(Clone, Debug, PartialEq)]
struct Rows {
    x: Vec<Vec<f64>>,
    nearest: Option<(Vec<usize>, Vec<f64>)>,
}

/// One reference solution of a bench over some rows: its grid's ends and its self-check.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RefInfo {
    pub t0: f64,
    pub t1: f64,
    /// Max |x(tol) − x(tol/2)| over the rows.
    pub check: f64,
    /// Model evaluations of the rows' tol run, summed over the rows.
    pub row_evals: u64,
}

/// One sampler run of a bench over some rows: a fixed-step cell, or one tolerance of an
/// adaptive sampler's sweep.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunInfo {
    pub sampler: String,
    /// Fixed-step samplers: the cell's NFE budget and the steps that fit it.
    pub budget: Option<usize>,
    pub steps: Option<usize>,
    /// Adaptive samplers: the tolerance (rtol) of this run of the sweep.
    pub rtol: Option<f64>,
    /// Deterministic samplers follow the ODE (RMSE and same-point columns).
    pub deterministic: bool,
    /// Its reference solution: an index into [`BenchPart::refs`].
    pub reference: usize,
    /// Model evaluations summed over the rows.
    pub row_evals: u64,
    /// Seconds spent sampling the rows (merge adds the shards' up).
    pub seconds: f64,
}

impl RunInfo {
    /// What identifies the run across shards: everything but its counts and seconds.
    fn plan(
        &self,
    ) -> (
        String,
        Option<usize>,
        Option<usize>,
        Option<u64>,
        bool,
        usize,
    ) {
        (
            self.sampler.clone(),
            self.budget,
            self.steps,
            self.rtol.map(f64::to_bits),
            self.deterministic,
            self.reference,
        )
    }
}

/// What a bench run is, whichever rows are drawn: the report's header and the plan.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BenchHeader {
    pub problem: String,
    pub schedule: String,
    pub grid: String,
    /// All samples of the run.
    pub batch: usize,
    pub seed: u64,
    pub t_start: f64,
    pub t_end: f64,
    pub dtype: String,
    pub reference_tol: f64,
    pub sw2_floor: f64,
    pub projections: usize,
    pub budgets: Vec<usize>,
    /// The samplers in order, each with whether it is adaptive.
    pub samplers: Vec<(String, bool)>,
    /// Whether the problem is a data set of points (the nearest-point arrays are stored).
    pub points: bool,
}

/// The description of the per-sample outcome of a bench over rows [start, end) of its
/// samples ([`BenchData`]); in a bench part's safetensors file it is the array `bench.json`
/// next to the arrays `exact` (the exact samples of the end marginal, all of them),
/// `ref<J>.x` and `run<K>.x` (the rows' end points) and, for data sets of points,
/// `ref<J>.nearest_index`, `ref<J>.nearest_distance`, `run<K>.nearest_index` and
/// `run<K>.nearest_distance`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BenchPart {
    pub header: BenchHeader,
    pub start: usize,
    pub end: usize,
    /// The reference from the grid's first to its last time (the report's reference NFE).
    pub main_ref: usize,
    pub refs: Vec<RefInfo>,
    pub runs: Vec<RunInfo>,
}

/// The per-sample outcome of a bench over rows [start, end) of its samples, from which
/// [`report_of`] computes every metric: a bench over all rows and the join of its shards'
/// ([`join`]) give the same report.
#[derive(Clone, Debug)]
pub struct BenchData {
    pub info: BenchPart,
    exact: Vec<Vec<f64>>,
    refs: Vec<Rows>,
    runs: Vec<Rows>,
}

/// One metric cell's numbers.
struct Outcome {
    nfe: f64,
    rmse: Option<f64>,
    sw2: f64,
    nearest_distance: Option<f64>,
    same_point: Option<f64>,
    seconds: f64,
}

/// Runs the bench over all of its samples and returns its report
/// ([`bench_rows`] over rows 0..batch, then [`report_of`]).
pub fn run_bench(
    problem: &dyn Problem,
    schedule: &dyn Schedule,
    device: &candle_core::Device,
    cfg: &BenchConfig,
    show_progress: bool,
) -> Result<BenchReport> {
    report_of(&bench_rows(
        problem,
        schedule,
        device,
        cfg,
        (0, cfg.batch),
        show_progress,
    )?)
}

/// Runs every sampler run of the bench and every reference solution they need on rows
/// `rows` = [start, end) of its `cfg.batch` samples — sample i from noise stream (seed, i),
/// as the whole run draws it — and returns their per-sample outcome. An adaptive sampler's
/// tolerance sweep stops once these rows' evaluations alone exceed the largest budget for
/// every sample ([`sweep_over`]).
pub fn bench_rows(
    problem: &dyn Problem,
    schedule: &dyn Schedule,
    device: &candle_core::Device,
    cfg: &BenchConfig,
    rows: (usize, usize),
    show_progress: bool,
) -> Result<BenchData> {
    cfg.opts.validate()?;
    if let TimeGrid::Discrete {
        timesteps: Some(_), ..
    } = cfg.grid
    {
        crate::bail_option!(
            "bench chooses the number of steps per budget: use ",
            keys::SPACING,
            ", not ",
            keys::TIMESTEPS
        );
    }
    let (first_row, end_row) = rows;
    if first_row >= end_row || end_row > cfg.batch {
        bail!(
            "bench: rows {first_row}..{end_row} are not a non-empty range of the {} samples",
            cfg.batch
        );
    }
    let count = end_row - first_row;
    let item = problem.item_shape();
    let model = problem.model();
    let start = |dtype: DType| -> Result<(Tensor, NoiseStreams)> {
        let mut noise = NoiseStreams::new(cfg.seed, first_row, count);
        let x = noise.normal(&item, dtype, device)?;
        Ok((x, noise))
    };
    let (x64, _) = start(DType::F64)?;
    let pb = if show_progress {
        crate::io::progress::Progress::new(
            "bench",
            "sampler",
            cfg.samplers.len() as u64,
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}]",
        )
    } else {
        crate::io::progress::Progress::hidden()
    };

    // References, one per (start, end) pair of the grids used (a discrete leading spacing
    // starts at a different timestep for every N), in the order first needed.
    let mut refs: Vec<(RefInfo, Rows)> = Vec::new();
    let reference = |refs: &mut Vec<(RefInfo, Rows)>, t0: f64, t1: f64| -> Result<usize> {
        let same = |r: &RefInfo| r.t0.to_bits() == t0.to_bits() && r.t1.to_bits() == t1.to_bits();
        if let Some(j) = refs.iter().position(|(r, _)| same(r)) {
            return Ok(j);
        }
        pb.set_message(format!("reference solution from t = {t0} (f64, DOPRI5)"));
        // To σ = 0 the ODE is integrated to a tiny positive time and finished with x̂0.
        let zero = reaches_zero(schedule, t1);
        let t_ode = if zero { (t0 * 1e-9).max(1e-10) } else { t1 };
        let r = reference_endpoint(model, schedule, &x64, t0, t_ode, cfg.ref_tol)?;
        let x = if zero {
            let mut noise = NoiseStreams::new(0, 0, count);
            crate::sampling::samplers::with_ctx(model, schedule, &mut noise, "reference", |ctx| {
                Ok(ctx.denoise(&r.x, t_ode)?.x0)
            })?
        } else {
            r.x.clone()
        };
        let nearest = problem.nearest(&x, t1).transpose()?;
        refs.push((
            RefInfo {
                t0,
                t1,
                check: r.check,
                row_evals: r.row_evals,
            },
            Rows {
                x: rows_f64(&x)?,
                nearest,
            },
        ));
        Ok(refs.len() - 1)
    };

    let first = cfg.grid.times(schedule, 1)?;
    let t_end = *first.last().context("bench: the time grid has no end")?;
    let exact = problem.exact_samples(t_end, cfg.batch, cfg.seed ^ 0x5eed_0001);
    let exact2 = problem.exact_samples(t_end, cfg.batch, cfg.seed ^ 0x5eed_0002);
    let sw2_floor = sliced_w2(&exact, &exact2, cfg.projections, cfg.seed ^ 0x5eed_0003);
    let main_ref = reference(&mut refs, first[0], t_end)?;

    let mut run = |sampler: Sampler, ts: &[f64], opts: &Options| -> Result<(RunInfo, Rows)> {
        let t1 = *ts.last().context("bench: an empty time grid")?;
        let key = reference(&mut refs, ts[0], t1)?;
        let (x, mut noise) = start(cfg.dtype)?;
        let clock = Instant::now();
        let out = sample(model, schedule, sampler, opts, ts, x, &mut noise, None)
            .with_context(|| format!("bench: sampler {sampler}"))?;
        let seconds = clock.elapsed().as_secs_f64();
        let nearest = problem.nearest(&out.x, t_end).transpose()?;
        Ok((
            RunInfo {
                sampler: sampler.to_string(),
                budget: None,
                steps: None,
                rtol: None,
                deterministic: !sampler.is_stochastic(opts),
                reference: key,
                // The count of row evaluations (a call on k of the B rows counts k).
                row_evals: (out.nfe * count as f64).round() as u64,
                seconds,
            },
            Rows {
                x: rows_f64(&out.x)?,
                nearest,
            },
        ))
    };

    let max_budget = cfg.budgets.iter().copied().max().unwrap_or(0);
    let mut runs: Vec<(RunInfo, Rows)> = Vec::new();
    for (i, &sampler) in cfg.samplers.iter().enumerate() {
        pb.set_position(i as u64);
        pb.set_message(sampler.to_string());
        if sampler.is_adaptive() {
            // One run per tolerance 10^0, 10^−0.5, …, 10^−8; DPM-Solver-12/23 keep the
            // reference code's ratio atol/rtol = 0.0078/0.05.
            let ts = cfg.grid.times(schedule, 1)?;
            let atol_ratio = if sampler == Sampler::Rk45 {
                1.0
            } else {
                0.0078 / 0.05
            };
            for k in 0..=SWEEP_LAST {
                let tol = 10f64.powf(-0.5 * k as f64);
                let opts = Options {
                    rtol: Some(tol),
                    atol: Some(tol * atol_ratio),
                    ..cfg.opts.clone()
                };
                let (mut info, rows) = run(sampler, &ts, &opts)?;
                info.rtol = Some(tol);
                let over = sweep_over(info.row_evals, max_budget, cfg.batch);
                runs.push((info, rows));
                if over {
                    break;
                }
            }
            continue;
        }
        for &budget in &cfg.budgets {
            if let Some((steps, ts)) = steps_for_budget(sampler, budget, schedule, cfg)? {
                let (mut info, rows) = run(sampler, &ts, &cfg.opts)?;
                info.budget = Some(budget);
                info.steps = Some(steps);
                runs.push((info, rows));
            }
        }
    }
    pb.finish();
    let points = refs[main_ref].1.nearest.is_some();
    let (ref_infos, ref_rows): (Vec<RefInfo>, Vec<Rows>) = refs.into_iter().unzip();
    let (run_infos, run_rows): (Vec<RunInfo>, Vec<Rows>) = runs.into_iter().unzip();
    Ok(BenchData {
        info: BenchPart {
            header: BenchHeader {
                problem: problem.name(),
                schedule: schedule.name(),
                grid: cfg.grid.describe(),
                batch: cfg.batch,
                seed: cfg.seed,
                t_start: first[0],
                t_end,
                dtype: format!("{:?}", cfg.dtype).to_lowercase(),
                reference_tol: cfg.ref_tol / 2.0,
                sw2_floor,
                projections: cfg.projections,
                budgets: cfg.budgets.clone(),
                samplers: cfg
                    .samplers
                    .iter()
                    .map(|s| (s.to_string(), s.is_adaptive()))
                    .collect(),
                points,
            },
            start: first_row,
            end: end_row,
            main_ref,
            refs: ref_infos,
            runs: run_infos,
        },
        exact,
        refs: ref_rows,
        runs: run_rows,
    })
}

/// The bench report of `data`, which must hold all of the run's samples (a bench over all
/// rows, or its shards' [`join`]): every metric is computed from the per-sample outcome in
/// index order — the mean NFE from the summed evaluation counts, the RMSE and nearest-point
/// columns as means over the samples, the sliced W2 from all end points — so the numbers do
/// not depend on how the rows were split. Per (sampler, budget): the fixed-step cell, or for
/// an adaptive sampler the tolerance of its sweep (cut where the mean NFE first exceeds the
/// largest budget) whose NFE is largest without exceeding the budget.
pub fn report_of(data: &BenchData) -> Result<BenchReport> {
    let h = &data.info.header;
    if (data.info.start, data.info.end) != (0, h.batch) {
        bail!(
            "bench: the report needs all {} samples, these are rows {}..{} (merge every shard)",
            h.batch,
            data.info.start,
            data.info.end
        );
    }
    let n = h.batch as f64;
    let runs = &data.info.runs;
    let nfe = |k: usize| runs[k].row_evals as f64 / n;
    let outcome = |k: usize| -> Outcome {
        let info = &runs[k];
        let x = &data.runs[k].x;
        let r = &data.refs[info.reference];
        let rmse = info.deterministic.then(|| mean(&rmse_per_sample(x, &r.x)));
        let (nearest_distance, same_point) = match &data.runs[k].nearest {
            Some((idx, dist)) => {
                let same = match (&r.nearest, info.deterministic) {
                    (Some((ridx, _)), true) => Some(
                        idx.iter().zip(ridx).filter(|(a, b)| a == b).count() as f64
                            / idx.len() as f64,
                    ),
                    _ => None,
                };
                (Some(mean(dist)), same)
            }
            None => (None, None),
        };
        Outcome {
            nfe: nfe(k),
            rmse,
            sw2: sliced_w2(x, &data.exact, h.projections, h.seed ^ 0x5eed_0003),
            nearest_distance,
            same_point,
            seconds: info.seconds,
        }
    };
    let max_budget = h.budgets.iter().copied().max().unwrap_or(0);
    let mut rows = Vec::new();
    for (name, adaptive) in &h.samplers {
        let mine: Vec<usize> = (0..runs.len())
            .filter(|&k| &runs[k].sampler == name)
            .collect();
        if *adaptive {
            let mut sweep = Vec::new();
            let mut over = false;
            for &k in &mine {
                sweep.push(k);
                if sweep_over(runs[k].row_evals, max_budget, h.batch) {
                    over = true;
                    break;
                }
            }
            if !over && sweep.len() != SWEEP_LAST + 1 {
                bail!(
                    "bench: the tolerance sweep of {name} ends after {} tolerances, before its NFE exceeds the largest budget {max_budget}: its runs are incomplete",
                    sweep.len()
                );
            }
            for &budget in &h.budgets {
                let mut row = empty_row(name, budget);
                if let Some(&k) = sweep
                    .iter()
                    .filter(|&&k| nfe(k) <= budget as f64)
                    .max_by(|&&a, &&b| nfe(a).total_cmp(&nfe(b)))
                {
                    fill(&mut row, &outcome(k));
                    row.rtol = runs[k].rtol;
                }
                rows.push(row);
            }
            continue;
        }
        for &budget in &h.budgets {
            let mut row = empty_row(name, budget);
            if let Some(&k) = mine.iter().find(|&&k| runs[k].budget == Some(budget)) {
                row.steps = runs[k].steps;
                fill(&mut row, &outcome(k));
            }
            rows.push(row);
        }
    }
    let main = data.info.main_ref;
    Ok(BenchReport {
        problem: h.problem.clone(),
        schedule: h.schedule.clone(),
        grid: h.grid.clone(),
        batch: h.batch,
        seed: h.seed,
        t_start: h.t_start,
        t_end: h.t_end,
        dtype: h.dtype.clone(),
        reference_tol: h.reference_tol,
        reference_check: data.info.refs.iter().map(|r| r.check).fold(0.0, f64::max),
        reference_nfe: data.info.refs[main].row_evals as f64 / n,
        sw2_floor: h.sw2_floor,
        reference_nearest_distance: data.refs[main].nearest.as_ref().map(|(_, d)| mean(d)),
        rows,
    })
}

/// Appends the rows of `more` to `into` (end points and nearest points, in index order).
fn append(into: &mut Rows, more: &Rows) {
    into.x.extend(more.x.iter().cloned());
    into.nearest = match (into.nearest.take(), &more.nearest) {
        (Some((mut i, mut d)), Some((mi, md))) => {
            i.extend(mi);
            d.extend(md);
            Some((i, d))
        }
        _ => None,
    };
}

/// Joins the per-sample outcomes of one bench's shards — `parts`, each named (its manifest)
/// for errors, in shard order with consecutive rows — into the outcome of all their rows:
/// the arrays concatenated in index order, evaluation counts and seconds added up, each
/// reference's check the largest of the shards'. An adaptive sampler keeps the tolerances
/// every shard ran (each shard runs at least those the whole run needs: [`sweep_over`]).
/// Parts of different runs, or whose rows do not follow each other, are an error naming
/// the part.
pub fn join(parts: &[(String, BenchData)]) -> Result<BenchData> {
    let Some((first_name, first)) = parts.first() else {
        bail!("merge: no bench parts");
    };
    let mut all = first.clone();
    for (name, d) in &parts[1..] {
        let a = &all.info;
        let refs_of = |p: &BenchPart| p.refs.iter().map(|r| (r.t0, r.t1)).collect::<Vec<_>>();
        if d.info.header != a.header
            || d.info.main_ref != a.main_ref
            || refs_of(&d.info) != refs_of(a)
            || d.exact != all.exact
        {
            bail!(
                "merge: {name} is of another bench than {first_name} (their problem, grid, samplers, references or settings differ): merge the parts of one run"
            );
        }
        if d.info.start != a.end {
            bail!(
                "merge: {name} holds rows {}..{}, expected rows from {} on",
                d.info.start,
                d.info.end,
                a.end
            );
        }
        let fixed = |p: &BenchPart| p.runs.iter().filter(|r| r.rtol.is_none()).count();
        if fixed(&d.info) != fixed(a) {
            bail!(
                "merge: {name} ran other fixed-step cells than {first_name}: merge the parts of one run"
            );
        }
        let mut runs = Vec::new();
        let mut rows = Vec::new();
        for (k, r) in all.info.runs.iter().enumerate() {
            match d.info.runs.iter().position(|o| o.plan() == r.plan()) {
                Some(j) => {
                    let o = &d.info.runs[j];
                    let mut m = r.clone();
                    m.row_evals += o.row_evals;
                    m.seconds += o.seconds;
                    let mut x = all.runs[k].clone();
                    append(&mut x, &d.runs[j]);
                    runs.push(m);
                    rows.push(x);
                }
                // A tolerance past the end of this shard's sweep: past the whole run's.
                None if r.rtol.is_some() => {}
                None => bail!(
                    "merge: {name} has no run of {} at NFE {} that {first_name} has: merge the parts of one run",
                    r.sampler,
                    r.budget.unwrap_or(0)
                ),
            }
        }
        for (j, r) in all.info.refs.iter_mut().enumerate() {
            r.check = r.check.max(d.info.refs[j].check);
            r.row_evals += d.info.refs[j].row_evals;
            append(&mut all.refs[j], &d.refs[j]);
        }
        all.info.runs = runs;
        all.runs = rows;
        all.info.end = d.info.end;
    }
    Ok(all)
}

/// A `(rows, d)` f64 tensor of the rows `x` (each of length `d`).
fn rows_tensor(x: &[Vec<f64>], d: usize) -> Result<Tensor> {
    let flat: Vec<f64> = x.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(
        flat,
        (x.len(), d),
        &candle_core::Device::Cpu,
    )?)
}

/// Adds the arrays of `rows` as `<name>.x` (and the nearest points) to `t`.
fn put_rows(t: &mut HashMap<String, Tensor>, name: &str, rows: &Rows, d: usize) -> Result<()> {
    t.insert(format!("{name}.x"), rows_tensor(&rows.x, d)?);
    if let Some((idx, dist)) = &rows.nearest {
        let idx: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
        let cpu = &candle_core::Device::Cpu;
        t.insert(
            format!("{name}.nearest_index"),
            Tensor::new(idx.as_slice(), cpu)?,
        );
        t.insert(
            format!("{name}.nearest_distance"),
            Tensor::new(dist.as_slice(), cpu)?,
        );
    }
    Ok(())
}

/// Writes `data`, shard `shard` of a bench of configuration `config` (the command line
/// without `--shard`/`--out`) whose samples have shape `item`, as a part into the folder
/// `dir`: the per-sample outcome as `part-I-of-N.safetensors` ([`BenchPart`]), then the
/// manifest `part-I-of-N.json` (both atomically, the manifest last). Returns the manifest's
/// path.
pub fn write_part(
    dir: &Path,
    shard: Shard,
    config: Vec<String>,
    item: Vec<usize>,
    data: &BenchData,
) -> Result<PathBuf> {
    let d: usize = item.iter().product();
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let info = serde_json::to_vec(&data.info)?;
    t.insert(
        PART_INFO.into(),
        Tensor::new(info.as_slice(), &candle_core::Device::Cpu)?,
    );
    t.insert("exact".into(), rows_tensor(&data.exact, d)?);
    for (j, r) in data.refs.iter().enumerate() {
        put_rows(&mut t, &format!("ref{j}"), r, d)?;
    }
    for (k, r) in data.runs.iter().enumerate() {
        put_rows(&mut t, &format!("run{k}"), r, d)?;
    }
    let part: Part = Part {
        config_hash: crate::shard::config_hash(&config),
        config,
        shard: shard.index,
        shards: shard.count,
        start: data.info.start,
        end: data.info.end,
        total: data.info.header.batch,
        kind: BENCH_KIND.into(),
        item,
        eval: None,
    };
    crate::shard::create_parts_dir(dir)?;
    let path = part.data_path(&dir.join(format!("{}.json", shard.stem())));
    crate::io::write_atomic_with(&path, |tmp| Ok(candle_core::safetensors::save(&t, tmp)?))?;
    crate::shard::write_manifest(dir, &part)
}

/// Reads the per-sample outcome of the bench part whose manifest is `json` (its
/// `part-I-of-N.safetensors`) and checks its description and every array's presence, type
/// and shape against the manifest; errors name the file and the array.
pub fn read_part_data(json: &Path, part: &Part) -> Result<BenchData> {
    let path = part.data_path(json);
    if !path.is_file() {
        bail!(
            "{}: no such file (the per-sample results of {})",
            path.display(),
            json.display()
        );
    }
    let t =
        candle_core::safetensors::load(&path, &candle_core::Device::Cpu).with_context(|| {
            format!(
                "{}: not a safetensors file of bench results",
                path.display()
            )
        })?;
    let get = |name: &str, shape: &[usize], dtype: DType| -> Result<Tensor> {
        let x = t
            .get(name)
            .with_context(|| format!("{}: no array '{name}'", path.display()))?;
        if x.dims() != shape || x.dtype() != dtype {
            bail!(
                "{}: array '{name}' is {:?} {:?}, expected {dtype:?} {shape:?}",
                path.display(),
                x.dtype(),
                x.dims()
            );
        }
        Ok(x.clone())
    };
    let raw = t
        .get(PART_INFO)
        .with_context(|| format!("{}: no array '{PART_INFO}'", path.display()))?
        .to_vec1::<u8>()
        .with_context(|| format!("{}: array '{PART_INFO}' is not bytes", path.display()))?;
    let info: BenchPart = serde_json::from_slice(&raw).with_context(|| {
        format!(
            "{}: array '{PART_INFO}' is not a bench part's description",
            path.display()
        )
    })?;
    if (info.start, info.end, info.header.batch) != (part.start, part.end, part.total) {
        bail!(
            "{}: holds rows {}..{} of {}, its manifest {} says {}..{} of {}",
            path.display(),
            info.start,
            info.end,
            info.header.batch,
            json.display(),
            part.start,
            part.end,
            part.total
        );
    }
    if info.main_ref >= info.refs.len() || info.runs.iter().any(|r| r.reference >= info.refs.len())
    {
        bail!(
            "{}: array '{PART_INFO}' names a reference it does not have",
            path.display()
        );
    }
    let d: usize = part.item.iter().product();
    let rows = part.end - part.start;
    let read_rows = |name: &str| -> Result<Rows> {
        let x = get(&format!("{name}.x"), &[rows, d], DType::F64)?.to_vec2::<f64>()?;
        let nearest = if info.header.points {
            let idx = get(&format!("{name}.nearest_index"), &[rows], DType::U32)?
                .to_vec1::<u32>()?
                .into_iter()
                .map(|i| i as usize)
                .collect();
            let dist =
                get(&format!("{name}.nearest_distance"), &[rows], DType::F64)?.to_vec1::<f64>()?;
            Some((idx, dist))
        } else {
            None
        };
        Ok(Rows { x, nearest })
    };
    let exact = get("exact", &[info.header.batch, d], DType::F64)?.to_vec2::<f64>()?;
    let refs = (0..info.refs.len())
        .map(|j| read_rows(&format!("ref{j}")))
        .collect::<Result<Vec<_>>>()?;
    let runs = (0..info.runs.len())
        .map(|k| read_rows(&format!("run{k}")))
        .collect::<Result<Vec<_>>>()?;
    Ok(BenchData {
        info,
        exact,
        refs,
        runs,
    })
}

/// Merges the bench parts `parts` — one run's, shards 0..N once each, in shard order, as
/// [`crate::shard::read_parts`] returns them — into the report the unsharded bench writes:
/// their per-sample outcomes joined ([`join`]) and every metric computed from them
/// ([`report_of`]). Only `seconds` differs: a merged cell's seconds are the shards'
/// sampling seconds added up (compute spent, not wall clock).
pub fn merge_parts(parts: &[(PathBuf, Part)]) -> Result<BenchReport> {
    let mut data = Vec::with_capacity(parts.len());
    for (p, part) in parts {
        if part.kind != BENCH_KIND {
            bail!(
                "merge: {} is a part of another command (kind {}), not of `bench`",
                p.display(),
                part.kind
            );
        }
        data.push((
            p.display().to_string(),
            read_part_data(p, part).context("merge")?,
        ));
    }
    report_of(&join(&data)?).context("merge")
}

/// A row of `sampler` at `budget` with nothing run.
fn empty_row(sampler: &str, budget: usize) -> BenchRow {
    BenchRow {
        sampler: sampler.to_string(),
        nfe_budget: budget,
        steps: None,
        nfe_used: None,
        rmse: None,
        sw2: None,
        nearest_distance: None,
        same_point: None,
        rtol: None,
        seconds: None,
    }
}

/// Fills `row` with the numbers of `o`.
fn fill(row: &mut BenchRow, o: &Outcome) {
    row.nfe_used = Some(o.nfe);
    row.rmse = o.rmse;
    row.sw2 = Some(o.sw2);
    row.nearest_distance = o.nearest_distance;
    row.same_point = o.same_point;
    row.seconds = Some(o.seconds);
}

/// The most steps (and their grid) whose NFE fits `budget`.
fn steps_for_budget(
    sampler: Sampler,
    budget: usize,
    schedule: &dyn Schedule,
    cfg: &BenchConfig,
) -> Result<Option<(usize, Vec<f64>)>> {
    let zero = cfg.grid.ends_at_zero();
    let mut best = None;
    for n in 1..=budget {
        let Ok(ts) = cfg.grid.times(schedule, n) else {
            break;
        };
        let explicit = matches!(cfg.grid, TimeGrid::Explicit { .. });
        match sampler.nfe(ts.len() - 1, zero, &cfg.opts) {
            Some(c) if c <= budget => best = Some((ts.len() - 1, ts)),
            _ if best.is_some() => break,
            _ => {}
        }
        if explicit {
            break; // a grid file fixes the grid: it fits the budget or not
        }
    }
    Ok(best)
}

fn cell(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.2e}"))
}

impl BenchReport {
    fn samplers(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for r in &self.rows {
            if !names.contains(&r.sampler) {
                names.push(r.sampler.clone());
            }
        }
        names
    }

    fn budgets(&self) -> Vec<usize> {
        let mut b: Vec<usize> = Vec::new();
        for r in &self.rows {
            if !b.contains(&r.nfe_budget) {
                b.push(r.nfe_budget);
            }
        }
        b
    }

    /// A sampler × budget table of `value`, keeping the samplers for which `keep` holds in
    /// some cell.
    fn table(
        &self,
        title: &str,
        keep: &dyn Fn(&BenchRow) -> bool,
        value: &dyn Fn(&BenchRow) -> String,
    ) -> String {
        let budgets = self.budgets();
        let mut s = format!("{title}\n\n| sampler |");
        for b in &budgets {
            let _ = write!(s, " NFE {b} |");
        }
        s.push_str("\n|---|");
        s.push_str(&"---:|".repeat(budgets.len()));
        s.push('\n');
        for name in self.samplers() {
            if !self.rows.iter().any(|r| r.sampler == name && keep(r)) {
                continue;
            }
            let _ = write!(s, "| {name} |");
            for b in &budgets {
                let r = self
                    .rows
                    .iter()
                    .find(|r| r.sampler == name && r.nfe_budget == *b);
                let _ = write!(s, " {} |", r.map_or("—".into(), value));
            }
            s.push('\n');
        }
        s
    }

    /// The Markdown report (also printed by the CLI).
    pub fn markdown(&self) -> String {
        // From pure noise (rectified flow at ς = 1) the reference starts in ρ = e^λ.
        let variable = if self.schedule.starts_with("flow") && self.t_start == 1.0 {
            "ρ = e^λ from pure noise to λ = 0, then in λ"
        } else {
            "λ"
        };
        let mut s = format!(
            "# qtaylor bench: {}\n\nschedule {}, grid {}, t {} → {}, {} samples (seed {}), dtype {}.\n\
             Reference: PF-ODE in f64 (DOPRI5 in {variable}, rtol = atol = {:.0e}; |tol − tol/2| ≤ {:.1e}; {:.0} NFE/sample).\n\n",
            self.problem,
            self.schedule,
            self.grid,
            self.t_start,
            self.t_end,
            self.batch,
            self.seed,
            self.dtype,
            self.reference_tol,
            self.reference_check,
            self.reference_nfe
        );
        s.push_str(&self.table(
            "## RMSE of the end point vs the reference ODE solution (deterministic samplers; lower is better)",
            &|r| r.rmse.is_some() || r.nfe_used.is_none(),
            &|r| {
                let mut c = cell(r.rmse);
                if let (Some(n), Some(_)) = (r.nfe_used, r.rmse)
                    && (n - r.nfe_budget as f64).abs() > 0.5
                {
                    let _ = write!(c, " ({n:.0})");
                }
                c
            },
        ));
        s.push_str(
            "\nA number in parentheses is the NFE actually used where it differs from the budget; \
             — means no run fits the budget. Stochastic samplers do not follow the ODE and appear \
             only in the next tables.\n\n",
        );
        s.push_str(&self.table(
            &format!(
                "## Sliced W2 to exact samples of the end marginal (finite-sample floor {:.2e})",
                self.sw2_floor
            ),
            &|_| true,
            &|r| cell(r.sw2),
        ));
        if let Some(rd) = self.reference_nearest_distance {
            s.push_str(&self.table(
                &format!(
                    "\n## RMS distance to the nearest data point α·y (reference solution: {rd:.2e})"
                ),
                &|_| true,
                &|r| cell(r.nearest_distance),
            ));
            s.push_str(&self.table(
                "\n## Fraction of samples that land on the same data point as the reference (deterministic samplers)",
                &|r| r.same_point.is_some() || r.nfe_used.is_none(),
                &|r| r.same_point.map_or("—".into(), |v| format!("{v:.3}")),
            ));
        }
        s
    }

    /// Writes results.csv, results.json, report.md and error_vs_nfe.png into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create output folder {}", dir.display()))?;
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:e}"));
        // Counts and times read as plain numbers (5, not 5e0).
        let plain = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v}"));
        let secs = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
        let mut csv = String::from(
            "sampler,nfe_budget,steps,nfe_used,rmse,sw2,sw2_floor,nearest_distance,same_point,rtol,seconds\n",
        );
        for r in &self.rows {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{:e},{},{},{},{}",
                r.sampler,
                r.nfe_budget,
                r.steps.map_or(String::new(), |s| s.to_string()),
                plain(r.nfe_used),
                opt(r.rmse),
                opt(r.sw2),
                self.sw2_floor,
                opt(r.nearest_distance),
                opt(r.same_point),
                opt(r.rtol),
                secs(r.seconds)
            );
        }
        crate::io::write_atomic(&dir.join("results.csv"), csv.as_bytes())?;
        crate::io::write_atomic(
            &dir.join("results.json"),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )?;
        crate::io::write_atomic(&dir.join("report.md"), self.markdown().as_bytes())?;
        let lines = |f: &dyn Fn(&BenchRow) -> Option<f64>| -> Vec<Line> {
            self.samplers()
                .into_iter()
                .filter_map(|name| {
                    let points: Vec<(f64, f64)> = self
                        .rows
                        .iter()
                        .filter(|r| r.sampler == name)
                        .filter_map(|r| Some((r.nfe_used?, f(r)?)))
                        .collect();
                    (!points.is_empty()).then_some(Line {
                        label: name,
                        points,
                    })
                })
                .collect()
        };
        loglog_png(
            &dir.join("error_vs_nfe.png"),
            &[
                Panel {
                    title: format!("{}: end-point RMSE vs reference", self.problem),
                    y_label: "RMSE".into(),
                    lines: lines(&|r| r.rmse),
                    floor: None,
                },
                Panel {
                    title: format!("{}: sliced W2 to exact samples", self.problem),
                    y_label: "sliced W2".into(),
                    lines: lines(&|r| r.sw2),
                    floor: Some((self.sw2_floor, "finite-sample floor".into())),
                },
            ],
        )
    }
}

/// A bench as a front end parsed it: the problem, schedule, grid, options, seed and device
/// ([`RunSettings`]; `grid_file` gives every sampler its times), and the bench's own
/// settings.
#[derive(Clone, Debug)]
pub struct BenchSettings {
    pub run: RunSettings,
    /// Comma-separated samplers, or `all`.
    pub samplers: String,
    /// Comma-separated NFE budgets.
    pub nfe: String,
    pub batch: usize,
    /// The samplers' state: f32 or f64.
    pub dtype: String,
    /// rtol = atol of the reference solution.
    pub ref_tol: f64,
    /// The results folder (with a shard: the folder of the parts).
    pub out: PathBuf,
    /// Only this shard of the samples, recorded with the run's configuration.
    pub shard: Option<(Shard, Vec<String>)>,
}

/// What a bench wrote.
pub enum BenchDone {
    /// The results folder: the report as Markdown, and a closing line.
    Report { markdown: String, summary: String },
    /// A shard's part: a closing line.
    Part { summary: String },
}

/// Runs the bench `s` describes: every sampler at every budget against the reference
/// solution from the same noise, written to its results folder (or, with a shard, its part).
/// `warn` gets warnings for the user (a grid file used with another sampler, schedule or
/// problem).
pub fn run(s: &BenchSettings, warn: &mut dyn FnMut(&str)) -> Result<BenchDone> {
    let r = &s.run;
    let device = crate::gpu::device::by_name(r.device.as_deref().unwrap_or("cpu"))?;
    let mut r = r.clone();
    let problem_name = r.problem.clone().unwrap_or_else(|| "gmm-demo".into());
    r.problem = Some(problem_name.clone());
    let (schedule, discrete) = r.schedule.build()?;
    let (grid_settings, grid_file) = r.grid_settings(schedule.as_ref())?;
    let grid = grid_settings.time_grid(schedule.as_ref(), discrete.as_ref())?;
    let samplers = if s.samplers == "all" {
        crate::sampling::samplers::all_samplers()
    } else {
        crate::sampling::samplers::parse_list(&s.samplers)?
    };
    let opts = r.options.build(&samplers, None, &[])?;
    for w in r.grid_file_warnings(grid_file.as_ref(), &samplers, None, schedule.as_ref()) {
        warn(&w);
    }
    if samplers.is_empty() {
        crate::bail_option!(
            keys::SAMPLERS,
            " is empty; valid samplers are listed by `qtaylor samplers`"
        );
    }
    let budgets: Vec<usize> = s
        .nfe
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    crate::option_error!(keys::NFE, format!(": '{v}' is not a positive integer"))
                        .into()
                })
        })
        .collect::<Result<_>>()?;
    if s.batch == 0 {
        crate::bail_option!((keys::BATCH, 0usize), ": at least one sample is needed");
    }
    let problem = crate::models::problems::load_problem(&problem_name, schedule.clone(), &device)?;
    let cfg = BenchConfig {
        samplers,
        budgets,
        grid,
        batch: s.batch,
        seed: r.seed.unwrap_or(0),
        dtype: crate::sampling::spec::state_dtype(keys::DTYPE, &s.dtype)?,
        opts,
        ref_tol: s.ref_tol,
        projections: 128,
    };
    let start = std::time::Instant::now();
    if let Some((shard, config)) = &s.shard {
        let rows = shard.range(s.batch);
        let data = bench_rows(
            problem.as_ref(),
            schedule.as_ref(),
            &device,
            &cfg,
            rows,
            true,
        )?;
        let json = write_part(&s.out, *shard, config.clone(), problem.item_shape(), &data)?;
        return Ok(BenchDone::Part {
            summary: format!(
                "shard {}/{}: samples {}..{} of {} of every cell ({:.1} s) -> {} (qtaylor merge computes the results)",
                shard.index,
                shard.count,
                rows.0,
                rows.1,
                s.batch,
                start.elapsed().as_secs_f64(),
                json.display()
            ),
        });
    }
    let report = run_bench(problem.as_ref(), schedule.as_ref(), &device, &cfg, true)?;
    report.write(&s.out)?;
    Ok(BenchDone::Report {
        markdown: report.markdown(),
        summary: format!(
            "bench took {:.1} s; wrote results.csv, results.json, report.md, error_vs_nfe.png to {}",
            start.elapsed().as_secs_f64(),
            s.out.display()
        ),
    })
}
