//! `qtaylor bench`: every sampler at every NFE budget on an exact-score problem, from the
//! same start noise, against a high-accuracy reference (DESIGN §8).
//!
//! Per (sampler, budget): the most steps whose NFE fits the budget (rk45: the tolerance
//! of a sweep whose NFE lands closest below the budget); the per-sample RMSE of the end
//! point against the reference ODE solution (deterministic samplers only; a stochastic
//! sampler does not follow the ODE); and the sliced Wasserstein-2 distance between the
//! samples and as many exact samples of `p_{t_min}`, next to its finite-sample floor
//! (the same distance between two independent exact sets).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::grid::Grid;
use crate::metrics::{mean, rmse_per_sample, sliced_w2};
use crate::ops::rows_f64;
use crate::plot::{Line, Panel, loglog_png};
use crate::problems::Problem;
use crate::reference::reference_endpoint;
use crate::rng::NoiseStreams;
use crate::samplers::{Options, Sampler, sample};
use crate::schedule::Schedule;

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub samplers: Vec<Sampler>,
    pub budgets: Vec<usize>,
    pub grid: Grid,
    pub batch: usize,
    pub seed: u64,
    pub t_max: f64,
    pub t_min: f64,
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
    /// Sliced W2 to exact samples of p_{t_min}.
    pub sw2: Option<f64>,
    /// rk45's tolerance for this budget.
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
    pub t_max: f64,
    pub t_min: f64,
    pub dtype: String,
    pub reference_tol: f64,
    /// Max |x(tol) − x(tol/2)|, the reference's own error estimate.
    pub reference_check: f64,
    pub reference_nfe: f64,
    pub sw2_floor: f64,
    pub rows: Vec<BenchRow>,
}

type RunFn<'a> = dyn Fn(Sampler, &[f64], &Options) -> Result<Outcome> + 'a;

struct Outcome {
    nfe: f64,
    rmse: Option<f64>,
    sw2: f64,
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
    crate::grid::check_interval(schedule, cfg.t_max, cfg.t_min)?;
    let item = problem.item_shape();
    let model = problem.model();
    let start = |dtype: DType| -> Result<(Tensor, NoiseStreams)> {
        let mut noise = NoiseStreams::new(cfg.seed, 0, cfg.batch);
        let x = noise.normal(&item, dtype, device)?;
        Ok((x, noise))
    };
    let (x64, _) = start(DType::F64)?;
    let pb = if show_progress {
        ProgressBar::new(1)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed_precise}]")
            .expect("valid template"),
    );
    pb.set_message("reference solution (f64, DOPRI5)");
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    let reference = reference_endpoint(model, schedule, &x64, cfg.t_max, cfg.t_min, cfg.ref_tol)?;
    let ref_rows = rows_f64(&reference.x)?;
    let exact = problem.exact_samples(cfg.t_min, cfg.batch, cfg.seed ^ 0x5eed_0001);
    let exact2 = problem.exact_samples(cfg.t_min, cfg.batch, cfg.seed ^ 0x5eed_0002);
    let sw_seed = cfg.seed ^ 0x5eed_0003;
    let sw2_floor = sliced_w2(&exact, &exact2, cfg.projections, sw_seed);

    let run = |sampler: Sampler, ts: &[f64], opts: &Options| -> Result<Outcome> {
        let (x, mut noise) = start(cfg.dtype)?;
        let t0 = Instant::now();
        let out = sample(model, schedule, sampler, opts, ts, x, &mut noise, None)
            .with_context(|| format!("bench: sampler {sampler}"))?;
        let seconds = t0.elapsed().as_secs_f64();
        let rows = rows_f64(&out.x)?;
        let rmse = (!sampler.is_stochastic(opts)).then(|| mean(&rmse_per_sample(&rows, &ref_rows)));
        Ok(Outcome {
            nfe: out.nfe,
            rmse,
            sw2: sliced_w2(&rows, &exact, cfg.projections, sw_seed),
            seconds,
        })
    };

    let mut rows = Vec::new();
    pb.set_length(cfg.samplers.len() as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise}]")
            .expect("valid template"),
    );
    for (i, &sampler) in cfg.samplers.iter().enumerate() {
        pb.set_position(i as u64);
        pb.set_message(sampler.to_string());
        if sampler == Sampler::Rk45 {
            rows.extend(rk45_rows(&run, schedule, cfg)?);
            continue;
        }
        for &budget in &cfg.budgets {
            let mut row = BenchRow {
                sampler: sampler.to_string(),
                nfe_budget: budget,
                steps: None,
                nfe_used: None,
                rmse: None,
                sw2: None,
                rtol: None,
                seconds: None,
            };
            if let Some(steps) = sampler.steps_for_budget(budget, &cfg.opts) {
                let ts = cfg.grid.times(schedule, steps, cfg.t_max, cfg.t_min)?;
                let o = run(sampler, &ts, &cfg.opts)?;
                row.steps = Some(steps);
                row.nfe_used = Some(o.nfe);
                row.rmse = o.rmse;
                row.sw2 = Some(o.sw2);
                row.seconds = Some(o.seconds);
            }
            rows.push(row);
        }
    }
    pb.finish_and_clear();
    Ok(BenchReport {
        problem: problem.name(),
        schedule: schedule.name(),
        grid: cfg.grid.to_string(),
        batch: cfg.batch,
        seed: cfg.seed,
        t_max: cfg.t_max,
        t_min: cfg.t_min,
        dtype: format!("{:?}", cfg.dtype).to_lowercase(),
        reference_tol: reference.tol,
        reference_check: reference.check,
        reference_nfe: reference.nfe,
        sw2_floor,
        rows,
    })
}

/// rk45: one run per tolerance of a sweep (10^0, 10^-0.5, …, 10^-8); each budget takes
/// the run whose NFE is largest without exceeding it.
fn rk45_rows(run: &RunFn, schedule: &dyn Schedule, cfg: &BenchConfig) -> Result<Vec<BenchRow>> {
    let max_budget = cfg.budgets.iter().copied().max().unwrap_or(0) as f64;
    let ts = crate::grid::Grid::Uniform.times(schedule, 1, cfg.t_max, cfg.t_min)?;
    let mut sweep: Vec<(f64, Outcome)> = Vec::new();
    for k in 0..=16 {
        let tol = 10f64.powf(-0.5 * k as f64);
        let opts = Options {
            rtol: tol,
            atol: tol,
            ..cfg.opts.clone()
        };
        let o = run(Sampler::Rk45, &ts, &opts)?;
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
            let best = sweep
                .iter()
                .filter(|(_, o)| o.nfe <= budget as f64)
                .max_by(|a, b| a.1.nfe.total_cmp(&b.1.nfe));
            BenchRow {
                sampler: "rk45".into(),
                nfe_budget: budget,
                steps: None,
                nfe_used: best.map(|b| b.1.nfe),
                rmse: best.and_then(|b| b.1.rmse),
                sw2: best.map(|b| b.1.sw2),
                rtol: best.map(|b| b.0),
                seconds: best.map(|b| b.1.seconds),
            }
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
            self.t_max,
            self.t_min,
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
             only in the next table.\n\n",
        );
        s.push_str(&self.table(
            &format!(
                "## Sliced W2 to exact samples of p(t_min) (finite-sample floor {:.2e})",
                self.sw2_floor
            ),
            &|_| true,
            &|r| cell(r.sw2),
        ));
        s
    }

    /// Writes results.csv, results.json, report.md and error_vs_nfe.png into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create output folder {}", dir.display()))?;
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:e}"));
        let mut csv =
            String::from("sampler,nfe_budget,steps,nfe_used,rmse,sw2,sw2_floor,rtol,seconds\n");
        for r in &self.rows {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{:e},{},{}",
                r.sampler,
                r.nfe_budget,
                r.steps.map_or(String::new(), |s| s.to_string()),
                opt(r.nfe_used),
                opt(r.rmse),
                opt(r.sw2),
                self.sw2_floor,
                opt(r.rtol),
                opt(r.seconds)
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
