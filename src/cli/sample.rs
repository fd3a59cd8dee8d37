//! `qtaylor sample`: its flags, parsed into a run ([`qtaylor::sampling::sample::run`]).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use qtaylor::keys;
use qtaylor::sampling::sample::{Output, run};

use super::args::{Common, command_line, numbers};
use super::shards;
use super::spelling::render_message;

#[derive(Args)]
pub struct SampleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Sampler name (see `qtaylor samplers`)
    #[arg(long)]
    pub sampler: String,
    /// Number of steps on the grid (dpm-solver-fast: the NFE budget)
    #[arg(long, required_unless_present_any = ["timesteps", "sigmas", "grid_file"])]
    pub steps: Option<usize>,
    /// Discrete schedule: an explicit descending list of timesteps (e.g. from a diffusers
    /// scheduler), instead of --spacing; fractional values are allowed
    #[arg(long)]
    pub timesteps: Option<String>,
    /// An explicit descending list of diffusers sigmas (σ/α); a final 0 ends at x̂0
    #[arg(long)]
    pub sigmas: Option<String>,
    /// A grid file written by `qtaylor tune` (its times replace --steps and the grid)
    #[arg(long)]
    pub grid_file: Option<PathBuf>,
    /// Number of samples [default: 16, or the rows of --x-init]
    #[arg(long)]
    pub batch: Option<usize>,
    /// f32 | f64: the sampler's state (its coefficients are always f64) [default: f32]
    #[arg(long)]
    pub dtype: Option<String>,
    /// Start state at the first time, shape (B, d) or (B, C, H, W) for --model, used as given
    #[arg(long)]
    pub x_init: Option<PathBuf>,
    /// A diffusers checkpoint folder (unet/ + scheduler/, or flat) [default without --problem:
    /// the embedded class-conditional MNIST model, assets/mnist-cond-unet]
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// --model: the network's dtype f32 | f16 | bf16 [default: f32]
    #[arg(long)]
    pub model_dtype: Option<String>,
    /// --model: image size [default: the config's sample_size]
    #[arg(long)]
    pub image_size: Option<usize>,
    /// --model: do not clip x̂0 even if the scheduler config says clip_sample
    #[arg(long)]
    pub no_clip: bool,
    /// Output: .npy for problems; a PNG grid for --model; with --shard a folder for the part
    #[arg(long)]
    pub out: PathBuf,
    /// --model: also write the samples as .npy (B, C, H, W)
    #[arg(long)]
    pub save_npy: Option<PathBuf>,
    /// Draw only shard I of N (0-based) of the --batch samples, the consecutive rows
    /// ⌊I·B/N⌋..⌊(I+1)·B/N⌋, into the folder --out; `qtaylor merge` joins the parts into the
    /// unsharded run's output, byte for byte
    #[arg(long)]
    pub shard: Option<String>,
    /// Run one shard per device at once (child processes), e.g. cuda:0,cuda:1, and merge them
    /// into --out: the unsharded run's output (instead of --device)
    #[arg(long)]
    pub devices: Option<String>,
    /// A class-conditional --model: the class of every sample
    #[arg(long)]
    pub class: Option<u32>,
    /// A class-conditional --model: comma-separated classes, or `all` (every class but the
    /// null one); the samples are split into equal consecutive blocks, one per class, so the
    /// PNG grid shows class k on row k [default --batch: classes²]
    #[arg(long)]
    pub classes: Option<String>,
    /// Classifier-free guidance scale w: ε̂_∅ + w (ε̂_c − ε̂_∅); 1 = the conditional model, 0 =
    /// the unconditional (null-class) one; each guided call runs 2B rows [default: 1]
    #[arg(long)]
    pub guidance: Option<f64>,
    /// The null (unconditional) class of a class-conditional model [default: its last class]
    #[arg(long)]
    pub null_class: Option<u32>,
    /// --model: image-to-image (SDEdit): start from this image (.png, or .npy (C, H, W) or
    /// (B, C, H, W) in [−1, 1]) noised to the time --strength selects
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// With --init-image: how much of the grid runs, in (0, 1], diffusers' img2img rule: the
    /// last ⌊steps·S⌋ steps of the grid, from the image noised to their first time (S = 1:
    /// the whole grid from pure noise, as without --init-image) [default: 0.8]
    #[arg(long)]
    pub strength: Option<f64>,
}

pub fn cmd(a: &SampleArgs) -> Result<()> {
    a.sampler.parse::<qtaylor::sampling::samplers::Sampler>()?;
    if let Some(d) = &a.devices {
        qtaylor::io::check_out_dir(keys::OUT, &a.out)?;
        return shards::run_on_devices(d, &a.out);
    }
    let shard = shards::parse(a.shard.as_deref())?;
    if let Some(s) = shard
        && shards::finished(&a.out, s, &qtaylor::shard::check_rows)?
    {
        return Ok(());
    }
    let mut settings = a.common.settings();
    settings.model = a.model.clone();
    settings.model_dtype = a.model_dtype.clone();
    settings.image_size = a.image_size;
    settings.no_clip = a.no_clip;
    settings.sampler = Some(a.sampler.clone());
    settings.grid.steps = a.steps;
    settings.grid.timesteps = numbers(keys::TIMESTEPS, a.timesteps.as_deref())?;
    settings.grid.sigmas = numbers(keys::SIGMAS, a.sigmas.as_deref())?;
    settings.grid_file = a.grid_file.clone();
    settings.batch = a.batch;
    settings.dtype = a.dtype.clone();
    settings.x_init = a.x_init.clone();
    settings.guidance.class = a.class;
    settings.guidance.classes = a.classes.clone();
    settings.guidance.guidance = a.guidance;
    settings.guidance.null_class = a.null_class;
    settings.init_image = a.init_image.clone();
    settings.strength = a.strength;
    let output = Output {
        out: a.out.clone(),
        save_npy: a.save_npy.clone(),
        shard: shard.map(|s| (s, shards::config_of(&command_line()))),
    };
    let device = a.common.device()?;
    let summary = run(&settings, &output, &device, &mut |n| {
        eprintln!("{}", render_message(n))
    })?;
    eprintln!("{summary}");
    Ok(())
}
