//! `qtaylor eval`: its flags, parsed into [`qtaylor::measure::eval::EvalOptions`].

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::args::command_line;
use super::shards;

#[derive(Args)]
#[command(
    override_usage = "qtaylor eval --model <MODEL> --out <OUT> [OPTIONS]\n       qtaylor eval --render-only --out <OUT>"
)]
pub struct EvalArgs {
    /// A diffusers checkpoint folder (e.g. from `qtaylor train`)
    #[arg(long, required_unless_present = "render_only")]
    pub model: Option<PathBuf>,
    /// Comma-separated sampler names (see `qtaylor samplers`)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "qt-1,qt-2,qt-3,qt-4,qit-1,qit-2,ddim,ddpm,heun,dpmpp-2m,unipc-3"
    )]
    pub samplers: Vec<String>,
    /// Comma-separated NFE budgets
    #[arg(long, value_delimiter = ',', default_value = "5,10,20,50,100")]
    pub nfe: Vec<usize>,
    /// Comma-separated tolerances (rtol = atol) for the adaptive samplers (rk45, dpm-solver-12/23)
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.01,0.001")]
    pub tolerances: Vec<f64>,
    /// Samples per row
    #[arg(long, default_value_t = 10000)]
    pub n: usize,
    /// Samples per network batch (results do not depend on it)
    #[arg(long, default_value_t = 500)]
    pub batch: usize,
    /// Sample i draws its noise from stream (seed, i)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder
    #[arg(long)]
    pub out: PathBuf,
    /// Only re-render results.csv, report.md and fid_vs_nfe.png of --out from its results.json
    #[arg(long)]
    pub render_only: bool,
    /// Reference data set: its test split is compared against (mnist | fashion-mnist | DIR)
    #[arg(long, default_value = "mnist")]
    pub data: String,
    /// Classifier folder [default: assets/classifier-fashion-mnist for fashion-mnist, else assets/classifier-mnist]
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Steps of the DDPM ancestral reference row (0: none)
    #[arg(long, default_value_t = 1000)]
    pub reference_steps: usize,
    /// NFE budget whose first 64 samples are saved as grid-<sampler>-nfe<N>.png
    #[arg(long, default_value_t = 10)]
    pub grid_nfe: usize,
    /// Start no new row after this many seconds (rows done are written)
    #[arg(long)]
    pub max_seconds: Option<f64>,
    /// Time grids of the fixed-budget rows, comma-separated: default (the checkpoint's
    /// spacing), uniform, quadratic, logsnr, karras (on the discrete schedule, ending at x̂0),
    /// tuned (the grid files of --grid-dir)
    #[arg(long, default_value = "default")]
    pub grids: String,
    /// A folder of grid files written by `qtaylor tune` (for --grids tuned)
    #[arg(long)]
    pub grid_dir: Option<PathBuf>,
    /// A class-conditional model: the classifier-free guidance scale w (sample i asks for
    /// class i mod classes; adds a conditional-accuracy column)
    #[arg(long)]
    pub guidance: Option<f64>,
    /// cpu, cuda or cuda:N (GPU N)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Draw only shard I of N (0-based) of the --n samples of every row, ⌊I·n/N⌋..⌊(I+1)·n/N⌋,
    /// and write their per-sample results as a part into the folder --out; `qtaylor merge`
    /// computes the results from the merged parts. A complete part of this configuration
    /// already in --out is not redone
    #[arg(long)]
    pub shard: Option<String>,
    /// Run one shard per device at once (child processes), e.g. cuda:0,cuda:1, and merge them
    /// into the results folder --out (instead of --device)
    #[arg(long)]
    pub devices: Option<String>,
}

pub fn cmd_eval(a: &EvalArgs) -> Result<()> {
    if let Some(d) = &a.devices {
        if a.out.is_file() {
            bail!(
                "--out {}: eval writes a results folder, not a file",
                a.out.display()
            );
        }
        return shards::run_on_devices(d, &a.out);
    }
    let shard = shards::parse(a.shard.as_deref())?;
    if let Some(s) = shard {
        for (flag, set) in [
            ("--render-only", a.render_only),
            ("--max-seconds", a.max_seconds.is_some()),
        ] {
            if set {
                bail!(
                    "--shard takes no {flag}: every shard draws every row, and merge writes the results"
                );
            }
        }
        if a.out.is_file() {
            bail!(
                "--out {}: with --shard, --out is the folder of the parts, not a file",
                a.out.display()
            );
        }
        let check = |j: &Path, p: &qtaylor::shard::Part| {
            qtaylor::measure::eval::read_part_data(j, p).map(|_| ())
        };
        if shards::finished(&a.out, s, &check)? {
            return Ok(());
        }
    }
    if a.render_only {
        if a.model.is_some() || a.guidance.is_some() {
            bail!("--model and --guidance do nothing with --render-only (it re-renders --out)");
        }
        let report = qtaylor::measure::eval::render(&a.out)?;
        println!("{}", qtaylor::measure::eval::markdown(&report));
        return Ok(());
    }
    let device = qtaylor::gpu::device::by_name(&a.device)?;
    let model = a.model.as_ref().context("--model is required")?;
    let names: Vec<&str> = a.samplers.iter().map(|s| s.trim()).collect();
    let mut o = qtaylor::measure::eval::EvalOptions::new(model, &names, &a.out);
    o.nfe = a.nfe.clone();
    o.tolerances = a.tolerances.clone();
    o.n = a.n;
    o.batch = a.batch;
    o.seed = a.seed;
    o.data = a.data.clone();
    o.classifier = a.classifier.clone().unwrap_or_else(|| {
        PathBuf::from(if a.data == "fashion-mnist" {
            "assets/classifier-fashion-mnist"
        } else {
            "assets/classifier-mnist"
        })
    });
    o.reference_steps = a.reference_steps;
    o.grid_nfe = a.grid_nfe;
    o.max_seconds = a.max_seconds;
    o.grids = a
        .grids
        .split(',')
        .map(|g| g.trim().to_string())
        .filter(|g| !g.is_empty())
        .collect();
    o.grid_dir = a.grid_dir.clone();
    o.guidance = a.guidance;
    if let Some(s) = shard {
        let config = shards::config_of(&command_line());
        let json = qtaylor::measure::eval::eval_shard(&o, s, config, &device)?;
        let (start, end) = s.range(o.n);
        eprintln!(
            "shard {}/{}: samples {start}..{end} of {} of every row -> {} (qtaylor merge computes the results)",
            s.index,
            s.count,
            o.n,
            json.display()
        );
        return Ok(());
    }
    let report = qtaylor::measure::eval::eval(&o, &device)?;
    println!("{}", qtaylor::measure::eval::markdown(&report));
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
