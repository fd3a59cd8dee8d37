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

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::grid::TimeGrid;
use crate::metrics::{mean, rmse_per_sample, sliced_w2};
use crate::ops::rows_f64;
use crate::plot::{Line, Panel, loglog_png};
use crate::problems::Problem;
use crate::reference::reference_endpoint;
use crate::rng::NoiseStreams;
use crate::samplers::{Options, Sampler, reaches_zero, sample};
use crate::schedule::Schedule;

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

/// A reference solution with what the metrics need of it.
struct RefSolution {
    rows: Vec<Vec<f64>>,
    nearest: Option<(Vec<usize>, Vec<f64>)>,
    check: f64,
    nfe: f64,
}

/// One sampler run on a grid with given options.
type RunFn<'a> = dyn FnMut(Sampler, &[f64], &Options) -> Result<Outcome> + 'a;

struct Outcome {
    nfe: f64,
    rmse: Option<f64>,
    sw2: f64,
    nearest_distance: Option<f64>,
    same_point: Option<f64>,
    seconds: f64,
}

/// Runs the bench.
pub fn run_bench(
    problem: &dyn Problem,
    schedule: &dyn Schedule,
    device: &candle_core::Device,
    cfg: &BenchConfig,
    show_progress: bool,
) -> Result<BenchReport> {
    cfg.opts.validate()?;
    if let TimeGrid::Discrete {
        timesteps: Some(_), ..
    } = cfg.grid
    {
        bail!("bench chooses the number of steps per budget: use --spacing, not --timesteps");
    }
    let item = problem.item_shape();
    let model = problem.model();
    let start = |dtype: DType| -> Result<(Tensor, NoiseStreams)> {
        let mut noise = NoiseStreams::new(cfg.seed, 0, cfg.batch);
        let x = noise.normal(&item, dtype, device)?;
        Ok((x, noise))
    };
    let (x64, _) = start(DType::F64)?;
    let pb = if show_progress {
        crate::progress::Progress::new(
            "bench",
            "sampler",
            cfg.samplers.len() as u64,
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}]",
        )
    } else {
        crate::progress::Progress::hidden()
    };

    // References, one per (start, end) pair of the grids used (a discrete leading spacing
    // starts at a different timestep for every N).
    let mut refs: HashMap<(u64, u64), RefSolution> = HashMap::new();
    let reference =
        |refs: &mut HashMap<(u64, u64), RefSolution>, t0: f64, t1: f64| -> Result<(u64, u64)> {
            let key = (t0.to_bits(), t1.to_bits());
            if let std::collections::hash_map::Entry::Vacant(slot) = refs.entry(key) {
                pb.set_message(format!("reference solution from t = {t0} (f64, DOPRI5)"));
                // To σ = 0 the ODE is integrated to a tiny positive time and finished with x̂0.
                let zero = reaches_zero(schedule, t1);
                let t_ode = if zero { (t0 * 1e-9).max(1e-10) } else { t1 };
                let r = reference_endpoint(model, schedule, &x64, t0, t_ode, cfg.ref_tol)?;
                let x = if zero {
                    let mut noise = NoiseStreams::new(0, 0, cfg.batch);
                    crate::samplers::with_ctx(model, schedule, &mut noise, "reference", |ctx| {
                        Ok(ctx.denoise(&r.x, t_ode)?.x0)
                    })?
                } else {
                    r.x.clone()
                };
                let nearest = problem.nearest(&x, t1).transpose()?;
                slot.insert(RefSolution {
                    rows: rows_f64(&x)?,
                    nearest,
                    check: r.check,
                    nfe: r.nfe,
                });
            }
            Ok(key)
        };

    let first = cfg.grid.times(schedule, 1)?;
    let t_end = *first.last().expect("a grid has two points");
    let exact = problem.exact_samples(t_end, cfg.batch, cfg.seed ^ 0x5eed_0001);
    let exact2 = problem.exact_samples(t_end, cfg.batch, cfg.seed ^ 0x5eed_0002);
    let sw_seed = cfg.seed ^ 0x5eed_0003;
    let sw2_floor = sliced_w2(&exact, &exact2, cfg.projections, sw_seed);
    let main_ref = reference(&mut refs, first[0], t_end)?;

    let mut run = |sampler: Sampler, ts: &[f64], opts: &Options| -> Result<Outcome> {
        let key = reference(&mut refs, ts[0], *ts.last().expect("grid"))?;
        let (x, mut noise) = start(cfg.dtype)?;
        let clock = Instant::now();
        let out = sample(model, schedule, sampler, opts, ts, x, &mut noise, None)
            .with_context(|| format!("bench: sampler {sampler}"))?;
        let seconds = clock.elapsed().as_secs_f64();
        let rows = rows_f64(&out.x)?;
        let r = &refs[&key];
        let deterministic = !sampler.is_stochastic(opts);
        let rmse = deterministic.then(|| mean(&rmse_per_sample(&rows, &r.rows)));
        let (nearest_distance, same_point) = match problem.nearest(&out.x, t_end).transpose()? {
            Some((idx, dist)) => {
                let same = match (&r.nearest, deterministic) {
                    (Some((ridx, _)), true) => Some(
                        idx.iter().zip(ridx).filter(|(a, b)| a == b).count() as f64
                            / idx.len() as f64,
                    ),
                    _ => None,
                };
                (Some(mean(&dist)), same)
            }
            None => (None, None),
        };
        Ok(Outcome {
            nfe: out.nfe,
            rmse,
            sw2: sliced_w2(&rows, &exact, cfg.projections, sw_seed),
            nearest_distance,
            same_point,
            seconds,
        })
    };

    let mut rows = Vec::new();
    for (i, &sampler) in cfg.samplers.iter().enumerate() {
        pb.set_position(i as u64);
        pb.set_message(sampler.to_string());
        if sampler.is_adaptive() {
            rows.extend(adaptive_rows(&mut run, sampler, schedule, cfg)?);
            continue;
        }
        for &budget in &cfg.budgets {
            let mut row = empty_row(sampler, budget);
            if let Some((steps, ts)) = steps_for_budget(sampler, budget, schedule, cfg)? {
                let o = run(sampler, &ts, &cfg.opts)?;
                row.steps = Some(steps);
                fill(&mut row, &o);
            }
            rows.push(row);
        }
    }
    pb.finish();
    let refs_all: Vec<&RefSolution> = refs.values().collect();
    let main = &refs[&main_ref];
    Ok(BenchReport {
        problem: problem.name(),
        schedule: schedule.name(),
        grid: cfg.grid.describe(),
        batch: cfg.batch,
        seed: cfg.seed,
        t_start: first[0],
        t_end,
        dtype: format!("{:?}", cfg.dtype).to_lowercase(),
        reference_tol: cfg.ref_tol / 2.0,
        reference_check: refs_all.iter().map(|r| r.check).fold(0.0, f64::max),
        reference_nfe: main.nfe,
        sw2_floor,
        reference_nearest_distance: main.nearest.as_ref().map(|(_, d)| mean(d)),
        rows,
    })
}

fn empty_row(sampler: Sampler, budget: usize) -> BenchRow {
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

/// The adaptive samplers: one run per tolerance of a sweep (10^0, 10^−0.5, …, 10^−8);
/// each budget takes the run whose NFE is largest without exceeding it. DPM-Solver-12/23
/// keep the reference code's ratio atol/rtol = 0.0078/0.05.
fn adaptive_rows(
    run: &mut RunFn,
    sampler: Sampler,
    schedule: &dyn Schedule,
    cfg: &BenchConfig,
) -> Result<Vec<BenchRow>> {
    let max_budget = cfg.budgets.iter().copied().max().unwrap_or(0) as f64;
    let ts = cfg.grid.times(schedule, 1)?;
    let atol_ratio = if sampler == Sampler::Rk45 {
        1.0
    } else {
        0.0078 / 0.05
    };
    let mut sweep: Vec<(f64, Outcome)> = Vec::new();
    for k in 0..=16 {
        let tol = 10f64.powf(-0.5 * k as f64);
        let opts = Options {
            rtol: Some(tol),
            atol: Some(tol * atol_ratio),
            ..cfg.opts.clone()
        };
        let o = run(sampler, &ts, &opts)?;
        let over = o.nfe > max_budget;
        sweep.push((tol, o));
        if over {
            break;
        }
    }
    Ok(cfg
        .budgets
        .iter()
        .map(|&budget| {
            let mut row = empty_row(sampler, budget);
            if let Some((tol, o)) = sweep
                .iter()
                .filter(|(_, o)| o.nfe <= budget as f64)
                .max_by(|a, b| a.1.nfe.total_cmp(&b.1.nfe))
            {
                fill(&mut row, o);
                row.rtol = Some(*tol);
            }
            row
        })
        .collect())
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
        let mut s = format!(
            "# qtaylor bench: {}\n\nschedule {}, grid {}, t {} → {}, {} samples (seed {}), dtype {}.\n\
             Reference: PF-ODE in f64 (DOPRI5 in λ, rtol = atol = {:.0e}; |tol − tol/2| ≤ {:.1e}; {:.0} NFE/sample).\n\n",
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
