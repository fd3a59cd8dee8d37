//! The small commands: `samplers`, `speed`, `determinism`, `parity` and `init-model`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use qtaylor::measure::determinism::DeterminismSettings;
use qtaylor::measure::speed::{self, SpeedSettings};

#[derive(Args)]
pub struct SpeedArgs {
    /// A diffusers checkpoint folder
    #[arg(long)]
    pub model: PathBuf,
    /// Images per batch
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Timed repetitions (after one warm-up)
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// cpu, cuda or cuda:N (GPU N)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32 | f16 | bf16
    #[arg(long, default_value = "f32")]
    pub model_dtype: String,
    /// Also time a full sample with this sampler ("none" to skip)
    #[arg(long, default_value = "qt-3")]
    pub sampler: String,
    /// Steps of the timed sample
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
}

#[derive(Args)]
pub struct DeterminismArgs {
    /// A diffusers checkpoint folder (default: the model embedded in the binary)
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// cpu, cuda or cuda:N (GPU N)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32 | f16 | bf16
    #[arg(long, default_value = "f32")]
    pub model_dtype: String,
    /// Batch sizes whose first row is compared operation by operation (the largest is also
    /// run twice)
    #[arg(long, value_delimiter = ',', default_value = "1,7,64")]
    pub batches: Vec<usize>,
    /// Batch sizes at which a forward is timed with the deterministic mode off and on
    #[arg(long, value_delimiter = ',', default_value = "1,8,256")]
    pub cost_batches: Vec<usize>,
    /// Timed forwards per mode and batch (after one warm-up)
    #[arg(long, default_value_t = 20)]
    pub repeats: usize,
    /// Give row i the class label i mod (classes + 1), the null class included, as a guided
    /// sample's batch has (class-conditional models)
    #[arg(long)]
    pub labels: bool,
}

pub fn cmd_determinism(a: &DeterminismArgs) -> Result<()> {
    let (lines, _) = qtaylor::measure::determinism::run(&DeterminismSettings {
        model: a.model.clone(),
        device: a.device.clone(),
        model_dtype: a.model_dtype.clone(),
        batches: a.batches.clone(),
        cost_batches: a.cost_batches.clone(),
        repeats: a.repeats,
        labels: a.labels,
    })?;
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

#[derive(Args)]
pub struct ParityArgs {
    /// Fixture folder (unet/, scheduler/, reference.safetensors)
    #[arg(long)]
    pub model: PathBuf,
    /// cpu, cuda or cuda:N (GPU N)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32 | f16 | bf16
    #[arg(long, default_value = "f32")]
    pub model_dtype: String,
    /// Largest accepted max|Δ|/max|reference|
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f64,
}

#[derive(Args)]
pub struct InitArgs {
    /// cifar10-ddpm
    #[arg(long, default_value = "cifar10-ddpm")]
    pub preset: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder (unet/ and scheduler/ are created in it)
    #[arg(long)]
    pub out: PathBuf,
}

pub fn cmd_samplers() {
    let c = qtaylor::sampling::samplers::catalog();
    // The name column is as wide as the longest name.
    let w = c
        .iter()
        .map(|e| e.name.len())
        .max()
        .unwrap_or(0)
        .max("sampler".len());
    let n = c
        .iter()
        .map(|e| e.nfe_per_step.chars().count())
        .max()
        .unwrap_or(0)
        .max("NFE/step".len());
    println!("{:<w$} {:>n$}  description", "sampler", "NFE/step");
    for e in c {
        println!("{:<w$} {:>n$}  {}", e.name, e.nfe_per_step, e.description);
    }
}

pub fn cmd_init_model(a: &InitArgs) -> Result<()> {
    let (config, scheduler) = match a.preset.as_str() {
        "cifar10-ddpm" => (
            qtaylor::models::checkpoint::CIFAR10_DDPM_CONFIG,
            qtaylor::models::checkpoint::DDPM_SCHEDULER_CONFIG,
        ),
        other => bail!("--preset {other}: expected cifar10-ddpm"),
    };
    let n =
        qtaylor::models::checkpoint::write_random_checkpoint(&a.out, config, scheduler, a.seed)?;
    eprintln!(
        "wrote {} ({:.2} M parameters, random weights, seed {})",
        a.out.display(),
        n as f64 / 1e6,
        a.seed
    );
    Ok(())
}

pub fn cmd_speed(a: &SpeedArgs) -> Result<()> {
    let lines = speed::run(&SpeedSettings {
        model: a.model.clone(),
        batch: a.batch,
        repeats: a.repeats,
        device: a.device.clone(),
        model_dtype: a.model_dtype.clone(),
        sampler: a.sampler.clone(),
        steps: a.steps,
    })?;
    for l in lines {
        println!("{l}");
    }
    Ok(())
}

pub fn cmd_parity(a: &ParityArgs) -> Result<()> {
    let p = qtaylor::measure::parity::run(&a.model, &a.device, &a.model_dtype)?;
    for l in &p.lines {
        println!("{l}");
    }
    p.check(a.tol)
}
