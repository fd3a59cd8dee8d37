//! The `qtaylor` command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use qtaylor::bench::{BenchConfig, run_bench};
use qtaylor::grid::TimeGrid;
use qtaylor::problems::load_problem;
use qtaylor::rng::NoiseStreams;
use qtaylor::samplers::{self, Options, Sampler};
use qtaylor::schedule::{Schedule, Tabulated, schedule_by_name};

#[derive(Parser)]
#[command(
    name = "qtaylor",
    version,
    about = "Few-NFE sampling of diffusion models: quasi-Taylor samplers and the baselines they are compared against"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Draw samples from an exact-score problem with one sampler; writes a .npy array.
    Sample(SampleArgs),
    /// Error vs NFE of several samplers against a high-accuracy reference.
    Bench(BenchArgs),
    /// List every sampler with its NFE per step.
    Samplers,
}

/// Options shared by `sample` and `bench`.
#[derive(Args)]
struct Common {
    /// gmm-demo (built in), a mixture FILE.json, or empirical:PATH[:N] (PATH: a .npy (N, d)
    /// array, an IDX file, a folder of MNIST IDX files, or mnist for data/mnist)
    #[arg(long, default_value = "gmm-demo")]
    problem: String,
    /// vp-linear | cosine | scaled-linear | discrete
    #[arg(long, default_value = "vp-linear")]
    schedule: String,
    /// β_min of the vp-linear schedule
    #[arg(long, default_value_t = 0.1)]
    beta_min: f64,
    /// β_max of the vp-linear schedule
    #[arg(long, default_value_t = 20.0)]
    beta_max: f64,
    /// Discrete schedule: diffusers beta_schedule (linear | scaled_linear | squaredcos_cap_v2)
    #[arg(long, default_value = "linear")]
    beta_schedule: String,
    /// Discrete schedule: first beta
    #[arg(long, default_value_t = 1e-4)]
    beta_start: f64,
    /// Discrete schedule: last beta
    #[arg(long, default_value_t = 0.02)]
    beta_end: f64,
    /// Discrete schedule: number of trained steps T (step n sits at t = (n + 1)/T)
    #[arg(long, default_value_t = 1000)]
    train_steps: usize,
    /// Continuous schedules: uniform | quadratic | logsnr | karras [default: uniform]
    #[arg(long)]
    grid: Option<String>,
    /// Discrete schedule: diffusers timestep spacing leading | trailing | linspace
    #[arg(long, default_value = "leading")]
    spacing: String,
    /// Discrete schedule: steps_offset added by the leading spacing
    #[arg(long, default_value_t = 0)]
    steps_offset: usize,
    /// Discrete schedule: end at zero (ᾱ = 1, returns x̂0) or at the last trained step
    #[arg(long, default_value = "zero")]
    r#final: String,
    /// Continuous schedules: final time [default: 1e-3]
    #[arg(long, allow_negative_numbers = true)]
    t_min: Option<f64>,
    /// Continuous schedules: start time [default: 1, or the schedule's end (cosine: 0.9946)]
    #[arg(long, allow_negative_numbers = true)]
    t_max: Option<f64>,
    /// Stochasticity η >= 0: DDIM (default 0), dpmpp-2m-sde (default 1)
    #[arg(long, allow_negative_numbers = true)]
    eta: Option<f64>,
    /// Seed: sample i draws its noise from stream (seed, i)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Expansion variable of the quasi-Taylor samplers: t | abar | logsnr
    #[arg(long, default_value = "t")]
    expand: String,
    /// Final step of the quasi-Taylor samplers: ddim (K → ∞ limit) | taylor
    #[arg(long, default_value = "ddim")]
    qt_last: String,
    /// DDPM variance: beta-tilde (posterior) | beta
    #[arg(long, default_value = "beta-tilde")]
    ddpm_variance: String,
    /// Relative tolerance of the adaptive samplers [rk45: 1e-5; dpm-solver-12/23: 0.05]
    #[arg(long)]
    rtol: Option<f64>,
    /// Absolute tolerance of the adaptive samplers [rk45: 1e-5; dpm-solver-12/23: 0.0078]
    #[arg(long)]
    atol: Option<f64>,
    /// Multistep samplers use lower orders over the last steps (below 15 steps; UniPC always)
    #[arg(long)]
    lower_order_final: bool,
    /// UniPC's B(h): bh1 | bh2
    #[arg(long, default_value = "bh2")]
    unipc_variant: String,
    /// Turn UniPC's corrector (UniC) off
    #[arg(long)]
    no_corrector: bool,
    /// EDM: stochastic churn S_churn (0: deterministic Heun)
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    s_churn: f64,
    /// EDM: churn only where σ/α >= S_tmin
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    s_tmin: f64,
    /// EDM: churn only where σ/α <= S_tmax
    #[arg(long, default_value_t = f64::INFINITY, allow_negative_numbers = true)]
    s_tmax: f64,
    /// EDM: noise scale S_noise of the churn
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    s_noise: f64,
    /// Add one NFE at the end that returns x̂0 at the last time
    #[arg(long)]
    denoise_final: bool,
    /// cpu (cuda arrives with the GPU build)
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct SampleArgs {
    #[command(flatten)]
    common: Common,
    /// Sampler name (see `qtaylor samplers`)
    #[arg(long)]
    sampler: String,
    /// Number of steps on the grid (dpm-solver-fast: the NFE budget)
    #[arg(long, required_unless_present = "timesteps")]
    steps: Option<usize>,
    /// Discrete schedule: an explicit descending list of timesteps (e.g. from a diffusers
    /// scheduler), instead of --steps and --spacing
    #[arg(long)]
    timesteps: Option<String>,
    /// Number of samples [default: 16, or the rows of --x-init]
    #[arg(long)]
    batch: Option<usize>,
    /// f32 | f64
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Start state at t_max, shape (B, d), used as given
    #[arg(long)]
    x_init: Option<PathBuf>,
    /// Output .npy, shape (B, d)
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    common: Common,
    /// Comma-separated sampler names
    #[arg(
        long,
        default_value = "qt-1,qt-2,qt-3,qt-4,ddim,euler,heun,rk4,rk45,qit-1,qit-2,qit-inf,ddpm,em"
    )]
    samplers: String,
    /// Comma-separated NFE budgets
    #[arg(long, default_value = "5,10,20,50")]
    nfe: String,
    /// Number of samples
    #[arg(long, default_value_t = 1024)]
    batch: usize,
    /// f32 | f64 (of the samplers' state; the reference is always f64)
    #[arg(long, default_value = "f64")]
    dtype: String,
    /// rtol = atol of the reference solution
    #[arg(long, default_value_t = 1e-9)]
    ref_tol: f64,
    /// Output folder (results.csv, results.json, report.md, error_vs_nfe.png)
    #[arg(long)]
    out: PathBuf,
}

fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f64" => DType::F64,
        other => bail!("--dtype {other}: expected f32 or f64"),
    })
}

fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => bail!(
            "--device cuda: this binary was built without CUDA support; build it with scripts/build-cuda.sh"
        ),
        other => bail!("--device {other}: expected cpu or cuda"),
    }
}

struct Setup {
    schedule: Arc<dyn Schedule>,
    grid: TimeGrid,
    opts: Options,
    device: Device,
}

fn setup(c: &Common, timesteps: Option<&str>) -> Result<Setup> {
    let discrete = c.schedule == "discrete";
    let schedule: Arc<dyn Schedule> = if discrete {
        Arc::new(Tabulated::diffusers(
            &c.beta_schedule,
            c.beta_start,
            c.beta_end,
            c.train_steps,
        )?)
    } else {
        schedule_by_name(&c.schedule, c.beta_min, c.beta_max)?.into()
    };
    let grid = if discrete {
        for (flag, given) in [
            ("--grid", c.grid.is_some()),
            ("--t-min", c.t_min.is_some()),
            ("--t-max", c.t_max.is_some()),
        ] {
            if given {
                bail!(
                    "{flag} applies to continuous schedules; a discrete schedule takes --spacing, --steps-offset and --final"
                );
            }
        }
        let timesteps = timesteps
            .map(|list| {
                list.split(',')
                    .map(|v| {
                        v.trim().parse::<usize>().map_err(|_| {
                            anyhow::anyhow!("--timesteps: '{v}' is not a non-negative integer")
                        })
                    })
                    .collect::<Result<Vec<usize>>>()
            })
            .transpose()?;
        TimeGrid::Discrete {
            spacing: c.spacing.parse()?,
            offset: c.steps_offset,
            timesteps,
            train_steps: c.train_steps,
            last: c.r#final.parse()?,
        }
    } else {
        if timesteps.is_some() {
            bail!("--timesteps needs --schedule discrete");
        }
        let t_max = c.t_max.unwrap_or(schedule.t_end());
        let t_min = c.t_min.unwrap_or(1e-3);
        qtaylor::grid::check_interval(schedule.as_ref(), t_max, t_min)?;
        TimeGrid::Continuous {
            grid: c.grid.as_deref().unwrap_or("uniform").parse()?,
            t_max,
            t_min,
        }
    };
    let opts = Options {
        eta: c.eta,
        expand: c.expand.parse()?,
        qt_last: c.qt_last.parse()?,
        ddpm_variance: c.ddpm_variance.parse()?,
        rtol: c.rtol,
        atol: c.atol,
        lower_order_final: c.lower_order_final,
        unipc_variant: c.unipc_variant.parse()?,
        unipc_corrector: !c.no_corrector,
        s_churn: c.s_churn,
        s_tmin: c.s_tmin,
        s_tmax: c.s_tmax,
        s_noise: c.s_noise,
        denoise_final: c.denoise_final,
    };
    opts.validate()?;
    Ok(Setup {
        schedule,
        grid,
        opts,
        device: parse_device(&c.device)?,
    })
}

fn cmd_sample(a: &SampleArgs) -> Result<()> {
    let sampler: Sampler = a.sampler.parse()?;
    let s = setup(&a.common, a.timesteps.as_deref())?;
    let dtype = parse_dtype(&a.dtype)?;
    let ts = s.grid.times(s.schedule.as_ref(), a.steps.unwrap_or(0))?;
    let steps = ts.len() - 1;
    let problem = load_problem(&a.common.problem, s.schedule.clone(), &s.device)?;
    let item = problem.item_shape();
    let (x, mut noise) = match &a.x_init {
        Some(path) => {
            let mut want = vec![None];
            want.extend(item.iter().map(|&d| Some(d)));
            let x = qtaylor::io::read_npy(path, &want)?;
            let b = x.dims()[0];
            if let Some(batch) = a.batch
                && batch != b
            {
                bail!(
                    "--batch {batch} disagrees with --x-init {}, which has {b} rows",
                    path.display()
                );
            }
            let x = x.to_dtype(dtype)?.to_device(&s.device)?;
            // Consume the start draws, so that the sampler's own noise is the same as in a
            // run without --x-init: an x-init equal to the default start noise reproduces it.
            let mut noise = NoiseStreams::new(a.common.seed, 0, b);
            noise.normal(&item, DType::F64, &Device::Cpu)?;
            (x, noise)
        }
        None => {
            let b = a.batch.unwrap_or(16);
            if b == 0 {
                bail!("--batch 0: at least one sample is needed");
            }
            let mut noise = NoiseStreams::new(a.common.seed, 0, b);
            (noise.normal(&item, dtype, &s.device)?, noise)
        }
    };
    let pb = ProgressBar::new(steps as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} [{elapsed_precise}]")
            .expect("valid template"),
    );
    let start = Instant::now();
    let run = samplers::sample(
        problem.model(),
        s.schedule.as_ref(),
        sampler,
        &s.opts,
        &ts,
        x,
        &mut noise,
        Some(&pb),
    )?;
    pb.finish_and_clear();
    qtaylor::io::write_npy(&a.out, &run.x)?;
    eprintln!(
        "{} samples of {} with {sampler}, {} steps on the {} grid, {:.0} NFE, {:.2} s -> {}",
        run.x.dims()[0],
        problem.name(),
        steps,
        s.grid.describe(),
        run.nfe,
        start.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

fn cmd_bench(a: &BenchArgs) -> Result<()> {
    let s = setup(&a.common, None)?;
    let samplers = if a.samplers == "all" {
        samplers::all_samplers()
    } else {
        samplers::parse_list(&a.samplers)?
    };
    if samplers.is_empty() {
        bail!("--samplers is empty; valid samplers are listed by `qtaylor samplers`");
    }
    let budgets: Vec<usize> = a
        .nfe
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| anyhow::anyhow!("--nfe: '{v}' is not a positive integer"))
        })
        .collect::<Result<_>>()?;
    if a.batch == 0 {
        bail!("--batch 0: at least one sample is needed");
    }
    let problem = load_problem(&a.common.problem, s.schedule.clone(), &s.device)?;
    let cfg = BenchConfig {
        samplers,
        budgets,
        grid: s.grid,
        batch: a.batch,
        seed: a.common.seed,
        dtype: parse_dtype(&a.dtype)?,
        opts: s.opts,
        ref_tol: a.ref_tol,
        projections: 128,
    };
    let start = Instant::now();
    let report = run_bench(problem.as_ref(), s.schedule.as_ref(), &s.device, &cfg, true)?;
    report.write(&a.out)?;
    println!("{}", report.markdown());
    eprintln!(
        "bench took {:.1} s; wrote results.csv, results.json, report.md, error_vs_nfe.png to {}",
        start.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

fn cmd_samplers() {
    println!("{:<10} {:>9}  description", "sampler", "NFE/step");
    for e in samplers::catalog() {
        println!("{:<10} {:>9}  {}", e.name, e.nfe_per_step, e.description);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Sample(a) => cmd_sample(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Samplers => {
            cmd_samplers();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
