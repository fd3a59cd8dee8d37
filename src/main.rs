//! The `qtaylor` command line: a thin layer over the library.

use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use qtaylor::bench::{BenchConfig, run_bench};

/// mimalloc keeps freed memory for reuse: with the system allocator every large activation
/// is a fresh mmap, and page faults cost the CPU UNet 45 % of its time (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
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
    /// CUDA with cuDNN: let f32 convolutions use TF32 tensor cores, as PyTorch does by default
    /// (torch.backends.cudnn.allow_tf32); without it f32 convolutions are exact f32
    #[arg(long, global = true)]
    tf32: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Draw samples with one sampler: from the class-conditional MNIST model embedded in the
    /// binary (default; writes a PNG grid; --classes all --guidance W for one row per digit),
    /// a diffusers checkpoint (--model; PNG) or an exact-score problem (--problem; .npy).
    Sample(Box<SampleArgs>),
    /// Error vs NFE of several samplers against a high-accuracy reference.
    Bench(BenchArgs),
    /// Find a time grid for one sampler, model and NFE so that its end points come close to
    /// a teacher's from the same noise (GITS-style dynamic programming over a fine candidate
    /// grid); writes a grid file for --grid-file and the Python scheduler.
    Tune(TuneArgs),
    /// List every sampler with its NFE per step.
    Samplers,
    /// Throughput of a checkpoint: one network forward, and a full sample with a sampler.
    Speed(SpeedArgs),
    /// Write a UNet2DModel checkpoint with random weights (PyTorch's default init) in the
    /// diffusers layout, for benchmarks: --preset cifar10-ddpm is google/ddpm-cifar10-32's
    /// architecture (35.7 M parameters).
    InitModel(InitArgs),
    /// Compare a fixture model's outputs with the diffusers reference stored next to it
    /// (reference.safetensors written by scripts/make-parity-fixtures.py).
    Parity(ParityArgs),
    /// Train a UNet2DModel (ε-prediction, 1000-step linear β) on an IDX image data set;
    /// writes resumable checkpoints in the diffusers layout.
    Train(TrainArgs),
    /// Train the small CNN classifier whose 128-d features `eval` uses for MNIST-feature
    /// FID / KID / precision-recall (writes model.safetensors + classifier.json).
    TrainClassifier(TrainClassifierArgs),
    /// Sample quality vs NFE of a trained 28×28 model: MNIST-feature FID (not comparable to
    /// Inception FID), KID, precision/recall and classifier confidence per sampler and NFE,
    /// with a 1000-step DDPM reference row; writes CSV, JSON, Markdown, a plot and grids.
    Eval(EvalArgs),
    /// Join the parts of a `sample`, `eval` or `bench` run with --shard I/N (the folders their
    /// --out named) into the output the unsharded run writes: the same .npy or PNG bytes; for
    /// eval and bench the results folder, computed from the merged per-sample results.
    Merge(MergeArgs),
}

#[derive(Args)]
struct MergeArgs {
    /// Folders holding part-I-of-N.json files (with their .npy or .safetensors data)
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// The merged output: sample parts: .npy, or .png for a model's run (a grid of all
    /// samples); eval and bench parts: the results folder (results.json, results.csv,
    /// report.md, ...)
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
#[command(
    override_usage = "qtaylor eval --model <MODEL> --out <OUT> [OPTIONS]\n       qtaylor eval --render-only --out <OUT>"
)]
struct EvalArgs {
    /// A diffusers checkpoint folder (e.g. from `qtaylor train`)
    #[arg(long, required_unless_present = "render_only")]
    model: Option<PathBuf>,
    /// Comma-separated sampler names (see `qtaylor samplers`)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "qt-1,qt-2,qt-3,qt-4,qit-1,qit-2,ddim,ddpm,heun,dpmpp-2m,unipc-3"
    )]
    samplers: Vec<String>,
    /// Comma-separated NFE budgets
    #[arg(long, value_delimiter = ',', default_value = "5,10,20,50,100")]
    nfe: Vec<usize>,
    /// Comma-separated tolerances (rtol = atol) for the adaptive samplers (rk45, dpm-solver-12/23)
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.01,0.001")]
    tolerances: Vec<f64>,
    /// Samples per row
    #[arg(long, default_value_t = 10000)]
    n: usize,
    /// Samples per network batch (results do not depend on it)
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Sample i draws its noise from stream (seed, i)
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder
    #[arg(long)]
    out: PathBuf,
    /// Only re-render results.csv, report.md and fid_vs_nfe.png of --out from its results.json
    #[arg(long)]
    render_only: bool,
    /// Reference data set: its test split is compared against (mnist | fashion-mnist | DIR)
    #[arg(long, default_value = "mnist")]
    data: String,
    /// Classifier folder [default: assets/classifier-fashion-mnist for fashion-mnist, else assets/classifier-mnist]
    #[arg(long)]
    classifier: Option<PathBuf>,
    /// Steps of the DDPM ancestral reference row (0: none)
    #[arg(long, default_value_t = 1000)]
    reference_steps: usize,
    /// NFE budget whose first 64 samples are saved as grid-<sampler>-nfe<N>.png
    #[arg(long, default_value_t = 10)]
    grid_nfe: usize,
    /// Start no new row after this many seconds (rows done are written)
    #[arg(long)]
    max_seconds: Option<f64>,
    /// Time grids of the fixed-budget rows, comma-separated: default (the checkpoint's
    /// spacing), uniform, quadratic, logsnr, karras (on the discrete schedule, ending at x̂0),
    /// tuned (the grid files of --grid-dir)
    #[arg(long, default_value = "default")]
    grids: String,
    /// A folder of grid files written by `qtaylor tune` (for --grids tuned)
    #[arg(long)]
    grid_dir: Option<PathBuf>,
    /// A class-conditional model: the classifier-free guidance scale w (sample i asks for
    /// class i mod classes; adds a conditional-accuracy column)
    #[arg(long)]
    guidance: Option<f64>,
    /// cpu, cuda or cuda:N (GPU N)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Draw only shard I of N (0-based) of the --n samples of every row, ⌊I·n/N⌋..⌊(I+1)·n/N⌋,
    /// and write their per-sample results as a part into the folder --out; `qtaylor merge`
    /// computes the results from the merged parts. A complete part of this configuration
    /// already in --out is not redone
    #[arg(long)]
    shard: Option<String>,
    /// Run one shard per device at once (child processes), e.g. cuda:0,cuda:1, and merge them
    /// into the results folder --out (instead of --device)
    #[arg(long)]
    devices: Option<String>,
}

#[derive(Args)]
struct TrainClassifierArgs {
    /// mnist | fashion-mnist | a folder with the train and t10k IDX files
    #[arg(long)]
    data: String,
    /// Output folder (model.safetensors, classifier.json)
    #[arg(long)]
    out: PathBuf,
    /// Passes over the training set
    #[arg(long, default_value_t = 3)]
    epochs: usize,
    /// Images per step
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Peak AdamW learning rate (cosine decay to 0)
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Seed of the initial weights and the batch order
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// cpu, cuda or cuda:N (GPU N)
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Args)]
struct TrainArgs {
    /// mnist | fashion-mnist | a folder with train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]
    #[arg(long)]
    data: String,
    /// Checkpoint folder (config.json, diffusion_pytorch_model.safetensors with the EMA
    /// weights, scheduler_config.json, train_state.safetensors, train_log.csv)
    #[arg(long)]
    out: PathBuf,
    /// Total number of optimiser steps (a resumed run continues up to it)
    #[arg(long, default_value_t = 10_000)]
    steps: usize,
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// AdamW learning rate (after a linear warm-up of --warmup steps)
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Decay of the exponential moving average of the weights (the saved model)
    #[arg(long, default_value_t = 0.999)]
    ema: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write a checkpoint every this many steps (and at the end)
    #[arg(long, default_value_t = 1000)]
    save_every: usize,
    /// Continue the run in this checkpoint folder (may be --out itself)
    #[arg(long)]
    resume: Option<PathBuf>,
    /// The network's config.json [default: the MNIST UNet, channels 32/64/64]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Train on the first N images only
    #[arg(long)]
    limit: Option<usize>,
    /// dtype of the saved model weights: f32 | f16 (the training state stays f32)
    #[arg(long, default_value = "f32")]
    save_dtype: String,
    /// Stop with a checkpoint after this many seconds (continue later with --resume)
    #[arg(long)]
    max_seconds: Option<f64>,
    /// A class-conditional --config (num_class_embeds = classes + 1): the fraction of labels
    /// dropped to the null class (the last one) for classifier-free guidance [default: 0.1]
    #[arg(long)]
    label_dropout: Option<f64>,
    /// cpu, cuda or cuda:N (GPU N)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Data-parallel training, one replica per device (instead of --device): e.g.
    /// cuda:0,cuda:1 (gradients all-reduced with NCCL) or cpu,cpu. --batch is the global
    /// batch, split evenly over the devices; checkpoints are the one-device format, and
    /// --resume works with any number of devices
    #[arg(long, conflicts_with = "device")]
    devices: Option<String>,
}

#[derive(Args)]
struct ParityArgs {
    /// Fixture folder (unet/, scheduler/, reference.safetensors)
    #[arg(long)]
    model: PathBuf,
    /// cpu, cuda or cuda:N (GPU N)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 | f16 | bf16
    #[arg(long, default_value = "f32")]
    model_dtype: String,
    /// Largest accepted max|Δ|/max|reference|
    #[arg(long, default_value_t = 1e-4)]
    tol: f64,
}

#[derive(Args)]
struct InitArgs {
    /// cifar10-ddpm
    #[arg(long, default_value = "cifar10-ddpm")]
    preset: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder (unet/ and scheduler/ are created in it)
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct SpeedArgs {
    /// A diffusers checkpoint folder
    #[arg(long)]
    model: PathBuf,
    /// Images per batch
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed repetitions (after one warm-up)
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// cpu, cuda or cuda:N (GPU N)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 | f16 | bf16
    #[arg(long, default_value = "f32")]
    model_dtype: String,
    /// Also time a full sample with this sampler ("none" to skip)
    #[arg(long, default_value = "qt-3")]
    sampler: String,
    /// Steps of the timed sample
    #[arg(long, default_value_t = 10)]
    steps: usize,
}

/// Options shared by `sample` and `bench`.
#[derive(Args)]
struct Common {
    /// gmm-demo (bench's default), a mixture FILE.json, or empirical:PATH[:N] (PATH: a .npy
    /// (N, d) array, an IDX file, a folder of MNIST IDX files, or mnist for data/mnist).
    /// `sample` without --problem and --model uses the embedded MNIST model
    #[arg(long)]
    problem: Option<String>,
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
    /// uniform | quadratic | logsnr | karras [default: uniform; a discrete schedule takes
    /// --spacing unless --grid is given, and then fractional timesteps (diffusers'
    /// use_karras_sigmas)]
    #[arg(long)]
    grid: Option<String>,
    /// --grid karras: the exponent ρ [default: 7]
    #[arg(long)]
    rho: Option<f64>,
    /// --grid: the smallest σ/α (diffusers' sigma_min), instead of --t-min [default: the
    /// first trained step on a discrete schedule]
    #[arg(long)]
    sigma_min: Option<f64>,
    /// --grid: the largest σ/α (diffusers' sigma_max), instead of --t-max
    #[arg(long)]
    sigma_max: Option<f64>,
    /// Discrete schedule: diffusers timestep spacing leading | trailing | linspace
    /// [default: the checkpoint's timestep_spacing, else leading]
    #[arg(long)]
    spacing: Option<String>,
    /// Discrete schedule: steps_offset added by the leading spacing [default: the
    /// checkpoint's, else 0]
    #[arg(long)]
    steps_offset: Option<usize>,
    /// Discrete schedule: end at zero (ᾱ = 1, returns x̂0) or at the last trained step
    #[arg(long, default_value = "zero")]
    r#final: String,
    /// Continuous grids: final time [default: 1e-3; a discrete schedule: its first trained
    /// step 1/T]
    #[arg(long, allow_negative_numbers = true)]
    t_min: Option<f64>,
    /// Continuous grids: start time [default: 1, or the schedule's end (cosine: 0.9946)]
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
    /// DDPM variance: beta-tilde (posterior) | beta [default: the checkpoint's variance_type,
    /// else beta-tilde]
    #[arg(long)]
    ddpm_variance: Option<String>,
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
    /// cpu, cuda or cuda:N (GPU N; CUDA needs a binary built with --features cuda)
    #[arg(long, default_value = "cpu")]
    device: String,
}

impl Common {
    fn problem(&self) -> &str {
        self.problem.as_deref().unwrap_or("gmm-demo")
    }
}

#[derive(Args)]
struct TuneArgs {
    #[command(flatten)]
    common: Common,
    /// The sampler whose grid is tuned
    #[arg(long)]
    sampler: String,
    /// The NFE budget (the tuned grid has the steps that fit it)
    #[arg(long)]
    nfe: usize,
    /// The teacher SAMPLER:STEPS whose end points the tuned grid chases (a deterministic
    /// fixed-grid sampler; its steps are spread uniformly in log-SNR over the candidates)
    #[arg(long, default_value = "dpmpp-3m:100")]
    teacher: String,
    /// Tuning samples (noise streams no evaluation draws)
    #[arg(long, default_value_t = 64)]
    samples: usize,
    /// Held-out samples for the before/after check
    #[arg(long, default_value_t = 32)]
    holdout: usize,
    /// Candidate intervals of the fine grid (uniform in log-SNR)
    #[arg(long, default_value_t = 40)]
    candidates: usize,
    /// Sweeps of the global refinement after the dynamic program: a compass search that
    /// keeps a move of one time only when the full sampler's end points get closer to the
    /// teacher's (0: the dynamic program's grid as it is)
    #[arg(long, default_value_t = 30)]
    refine_sweeps: usize,
    /// f32 | f64: the state's dtype
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// A diffusers checkpoint folder [default without --problem: the embedded class-conditional
    /// MNIST model, whose unconditional (null-class) model is tuned]
    #[arg(long)]
    model: Option<PathBuf>,
    /// --model: the network's dtype f32 | f16 | bf16
    #[arg(long, default_value = "f32")]
    model_dtype: String,
    /// Where to write the grid file (JSON)
    #[arg(long)]
    out: PathBuf,
    /// Data-parallel tuning, one replica per device (instead of --device), e.g.
    /// cuda:0,cuda:1: each holds its share of the --samples and --holdout samples, and every
    /// error is the mean over all of them; the grid is the one-device grid
    #[arg(long, conflicts_with = "device")]
    devices: Option<String>,
}

#[derive(Args)]
struct SampleArgs {
    #[command(flatten)]
    common: Common,
    /// Sampler name (see `qtaylor samplers`)
    #[arg(long)]
    sampler: String,
    /// Number of steps on the grid (dpm-solver-fast: the NFE budget)
    #[arg(long, required_unless_present_any = ["timesteps", "sigmas", "grid_file"])]
    steps: Option<usize>,
    /// Discrete schedule: an explicit descending list of timesteps (e.g. from a diffusers
    /// scheduler), instead of --spacing; fractional values are allowed
    #[arg(long)]
    timesteps: Option<String>,
    /// An explicit descending list of diffusers sigmas (σ/α); a final 0 ends at x̂0
    #[arg(long)]
    sigmas: Option<String>,
    /// A grid file written by `qtaylor tune` (its times replace --steps and the grid)
    #[arg(long)]
    grid_file: Option<PathBuf>,
    /// Number of samples [default: 16, or the rows of --x-init]
    #[arg(long)]
    batch: Option<usize>,
    /// f32 | f64: the sampler's state (its coefficients are always f64)
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Start state at the first time, shape (B, d) or (B, C, H, W) for --model, used as given
    #[arg(long)]
    x_init: Option<PathBuf>,
    /// A diffusers checkpoint folder (unet/ + scheduler/, or flat) [default without --problem:
    /// the embedded class-conditional MNIST model, assets/mnist-cond-unet]
    #[arg(long)]
    model: Option<PathBuf>,
    /// --model: the network's dtype f32 | f16 | bf16
    #[arg(long, default_value = "f32")]
    model_dtype: String,
    /// --model: image size [default: the config's sample_size]
    #[arg(long)]
    image_size: Option<usize>,
    /// --model: do not clip x̂0 even if the scheduler config says clip_sample
    #[arg(long)]
    no_clip: bool,
    /// Output: .npy for problems; a PNG grid for --model; with --shard a folder for the part
    #[arg(long)]
    out: PathBuf,
    /// --model: also write the samples as .npy (B, C, H, W)
    #[arg(long)]
    save_npy: Option<PathBuf>,
    /// Draw only shard I of N (0-based) of the --batch samples, the consecutive rows
    /// ⌊I·B/N⌋..⌊(I+1)·B/N⌋, into the folder --out; `qtaylor merge` joins the parts into the
    /// unsharded run's output, byte for byte
    #[arg(long)]
    shard: Option<String>,
    /// Run one shard per device at once (child processes), e.g. cuda:0,cuda:1, and merge them
    /// into --out: the unsharded run's output (instead of --device)
    #[arg(long)]
    devices: Option<String>,
    /// A class-conditional --model: the class of every sample
    #[arg(long)]
    class: Option<u32>,
    /// A class-conditional --model: comma-separated classes, or `all` (every class but the
    /// null one); the samples are split into equal consecutive blocks, one per class, so the
    /// PNG grid shows class k on row k [default --batch: classes²]
    #[arg(long)]
    classes: Option<String>,
    /// Classifier-free guidance scale w: ε̂_∅ + w (ε̂_c − ε̂_∅); 1 = the conditional model, 0 =
    /// the unconditional (null-class) one; each guided call runs 2B rows [default: 1]
    #[arg(long)]
    guidance: Option<f64>,
    /// The null (unconditional) class of a class-conditional model [default: its last class]
    #[arg(long)]
    null_class: Option<u32>,
    /// --model: image-to-image (SDEdit): start from this image (.png, or .npy (C, H, W) or
    /// (B, C, H, W) in [−1, 1]) noised to the time --strength selects
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// With --init-image: how much of the grid runs, in (0, 1], diffusers' img2img rule: the
    /// last ⌊steps·S⌋ steps of the grid, from the image noised to their first time (S = 1:
    /// the whole grid from pure noise, as without --init-image) [default: 0.8]
    #[arg(long)]
    strength: Option<f64>,
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
    /// A grid file written by `qtaylor tune`: every sampler runs on its times (budgets that
    /// its NFE on that grid exceeds are skipped)
    #[arg(long)]
    grid_file: Option<PathBuf>,
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
    /// Output folder (results.csv, results.json, report.md, error_vs_nfe.png); with --shard
    /// the folder of the parts
    #[arg(long)]
    out: PathBuf,
    /// Run every cell on shard I of N (0-based) of the --batch samples only, the consecutive
    /// rows ⌊I·B/N⌋..⌊(I+1)·B/N⌋, and write their per-sample end points as a part into the
    /// folder --out; `qtaylor merge` computes the unsharded run's results from the parts. A
    /// complete part of this configuration already in --out is not redone
    #[arg(long)]
    shard: Option<String>,
    /// Run one shard per device at once (child processes), e.g. cuda:0,cuda:1, and merge them
    /// into the results folder --out (instead of --device)
    #[arg(long)]
    devices: Option<String>,
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
        "cuda" if cfg!(feature = "cuda") => {
            qtaylor::kernels::open_cuda(0).map_err(|e| {
            // candle's error text carries a backtrace after its first line
            let first = e.to_string().lines().next().unwrap_or_default().to_string();
            anyhow::anyhow!("--device cuda: no usable CUDA device ({first}); run on a machine with an NVIDIA GPU and driver, or use --device cpu")
            })
        }
        "cuda" => bail!(
            "--device cuda: this binary was built without CUDA support; build it with scripts/build-cuda.sh"
        ),
        other if other.starts_with("cuda:") => {
            let n: usize = other[5..].parse().map_err(|_| {
                anyhow::anyhow!(
                    "--device {other}: expected cuda:N with a GPU number N, e.g. cuda:1"
                )
            })?;
            if !cfg!(feature = "cuda") {
                bail!(
                    "--device {other}: this binary was built without CUDA support; build it with scripts/build-cuda.sh"
                );
            }
            qtaylor::kernels::open_cuda(n).map_err(|e| {
                let first = e.to_string().lines().next().unwrap_or_default().to_string();
                anyhow::anyhow!("--device {other}: no usable CUDA device {n} ({first})")
            })
        }
        other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}

/// Explicit lists: `--timesteps` (integers give a discrete grid; fractional ones, times
/// through the table's log-σ interpolation) and `--sigmas` (σ/α, a final 0 for x̂0).
struct ExplicitGrid<'a> {
    timesteps: Option<&'a str>,
    sigmas: Option<&'a str>,
    file: Option<&'a Path>,
}

impl ExplicitGrid<'_> {
    fn none() -> Self {
        ExplicitGrid {
            timesteps: None,
            sigmas: None,
            file: None,
        }
    }
    fn given(&self) -> bool {
        self.timesteps.is_some() || self.sigmas.is_some() || self.file.is_some()
    }
}

/// Defaults a discrete grid takes from a checkpoint's scheduler config.
struct DiscreteDefaults {
    spacing: String,
    offset: usize,
    train_steps: usize,
}

/// The time grid: continuous (grid, t range), discrete (spacing, offset, final) or an
/// explicit list.
fn time_grid(
    c: &Common,
    schedule: &dyn Schedule,
    discrete: Option<DiscreteDefaults>,
    explicit: ExplicitGrid,
) -> Result<TimeGrid> {
    if c.rho.is_some() && c.grid.as_deref() != Some("karras") {
        bail!("--rho applies to --grid karras only");
    }
    for (flag, v) in [("--sigma-min", c.sigma_min), ("--sigma-max", c.sigma_max)] {
        if let Some(v) = v
            && !(v > 0.0 && v.is_finite())
        {
            bail!("{flag} {v}: expected a positive number");
        }
    }
    if c.sigma_min.is_some() && c.t_min.is_some() {
        bail!("give --sigma-min or --t-min, not both");
    }
    if c.sigma_max.is_some() && c.t_max.is_some() {
        bail!("give --sigma-max or --t-max, not both");
    }
    let continuous_flags = [
        ("--grid", c.grid.is_some()),
        ("--t-min", c.t_min.is_some()),
        ("--t-max", c.t_max.is_some()),
        ("--sigma-min", c.sigma_min.is_some()),
        ("--sigma-max", c.sigma_max.is_some()),
    ];
    if explicit.given() {
        for (flag, given) in continuous_flags.iter().chain(&[
            ("--spacing", c.spacing.is_some()),
            ("--steps-offset", c.steps_offset.is_some()),
        ]) {
            if *given {
                bail!("{flag} does nothing with an explicit --timesteps, --sigmas or --grid-file");
            }
        }
        let n = [
            explicit.timesteps.is_some(),
            explicit.sigmas.is_some(),
            explicit.file.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if n > 1 {
            bail!("give one of --timesteps, --sigmas and --grid-file");
        }
    }
    if let Some(path) = explicit.file {
        let g = qtaylor::gridfile::GridFile::read(path, schedule)?;
        return Ok(TimeGrid::Explicit {
            times: g.times,
            what: format!("grid file {}", path.display()),
        });
    }
    if let Some(list) = explicit.sigmas {
        let sigmas = qtaylor::grid::parse_numbers("--sigmas", list)?;
        return Ok(TimeGrid::Explicit {
            times: qtaylor::grid::times_of_sigmas(schedule, &sigmas)?,
            what: "explicit sigmas".into(),
        });
    }
    match discrete {
        Some(d) => {
            let last: qtaylor::grid::Final = c.r#final.parse()?;
            if let Some(list) = explicit.timesteps {
                let v = qtaylor::grid::parse_numbers("--timesteps", list)?;
                if v.iter().all(|x| x.fract() == 0.0 && *x >= 0.0) {
                    return Ok(TimeGrid::Discrete {
                        spacing: qtaylor::grid::Spacing::Leading,
                        offset: 0,
                        timesteps: Some(v.iter().map(|&x| x as usize).collect()),
                        train_steps: d.train_steps,
                        last,
                    });
                }
                let times = qtaylor::grid::times_of_network_timesteps(schedule, &v, last)?;
                return Ok(TimeGrid::Explicit {
                    times,
                    what: format!("explicit fractional timesteps, final {last:?}").to_lowercase(),
                });
            }
            if let Some(g) = &c.grid {
                // A continuous grid on the discrete schedule, as diffusers' use_karras_sigmas:
                // from the last trained step (t = 1) to the first (t = 1/T).
                if c.spacing.is_some() || c.steps_offset.is_some() {
                    bail!("--spacing and --steps-offset do nothing with --grid");
                }
                let first = qtaylor::grid::time_of_timestep(0.0, d.train_steps);
                let (t_max, t_min) = grid_range(c, schedule, first)?;
                return Ok(TimeGrid::Continuous {
                    grid: parse_grid(g, c.rho)?,
                    t_max,
                    t_min,
                    to_zero: last == qtaylor::grid::Final::Zero,
                });
            }
            for (flag, given) in continuous_flags {
                if given {
                    bail!(
                        "{flag} applies to continuous grids; give --grid on a discrete schedule (or --spacing, --steps-offset, --final)"
                    );
                }
            }
            Ok(TimeGrid::Discrete {
                spacing: c.spacing.as_deref().unwrap_or(&d.spacing).parse()?,
                offset: c.steps_offset.unwrap_or(d.offset),
                timesteps: None,
                train_steps: d.train_steps,
                last,
            })
        }
        None => {
            if explicit.timesteps.is_some() {
                bail!(
                    "--timesteps needs a discrete schedule (--schedule discrete or --model); use --sigmas"
                );
            }
            if c.spacing.is_some() || c.steps_offset.is_some() {
                bail!(
                    "--spacing and --steps-offset apply to discrete schedules (--schedule discrete or --model)"
                );
            }
            let (t_max, t_min) = grid_range(c, schedule, 1e-3)?;
            Ok(TimeGrid::Continuous {
                grid: parse_grid(c.grid.as_deref().unwrap_or("uniform"), c.rho)?,
                t_max,
                t_min,
                to_zero: false,
            })
        }
    }
}

/// The continuous grid's `(t_max, t_min)` from `--t-max`/`--sigma-max` and
/// `--t-min`/`--sigma-min` (σ/α mapped to t through λ = −ln σ), checked against the schedule.
fn grid_range(c: &Common, schedule: &dyn Schedule, default_t_min: f64) -> Result<(f64, f64)> {
    let t_of = |t: Option<f64>, sigma: Option<f64>, default: f64| -> Result<f64> {
        Ok(match (t, sigma) {
            (Some(t), _) => t,
            (None, Some(s)) => schedule.t_of_lambda(-s.ln())?,
            (None, None) => default,
        })
    };
    let t_max = t_of(c.t_max, c.sigma_max, schedule.t_end())?;
    let t_min = t_of(c.t_min, c.sigma_min, default_t_min)?;
    qtaylor::grid::check_interval(schedule, t_max, t_min)?;
    Ok((t_max, t_min))
}

/// `--grid` with `--rho` for karras.
fn parse_grid(name: &str, rho: Option<f64>) -> Result<qtaylor::grid::Grid> {
    let g: qtaylor::grid::Grid = name.parse()?;
    Ok(match (g, rho) {
        (qtaylor::grid::Grid::Karras { .. }, Some(r)) => {
            if !(r > 0.0 && r.is_finite()) {
                bail!("--rho {r}: expected a positive number");
            }
            qtaylor::grid::Grid::Karras { rho: r }
        }
        (g, _) => g,
    })
}

/// Refuses the schedule flags that the schedule in use does not read: `model` is true when
/// a checkpoint brings its own schedule.
fn check_schedule_flags(c: &Common, model: bool) -> Result<()> {
    let vp = [
        ("--beta-min", c.beta_min != 0.1),
        ("--beta-max", c.beta_max != 20.0),
    ];
    let discrete = [
        ("--beta-schedule", c.beta_schedule != "linear"),
        ("--beta-start", c.beta_start != 1e-4),
        ("--beta-end", c.beta_end != 0.02),
        ("--train-steps", c.train_steps != 1000),
    ];
    let ckpt = "the checkpoint brings its own schedule (scheduler_config.json)";
    let vp_why = if model {
        ckpt
    } else {
        "it applies to --schedule vp-linear"
    };
    let discrete_why = if model {
        ckpt
    } else {
        "it applies to --schedule discrete"
    };
    let vp_used = !model && c.schedule == "vp-linear";
    let discrete_used = !model && c.schedule == "discrete";
    let unused = vp
        .iter()
        .filter(|f| f.1 && !vp_used)
        .map(|f| (f.0, vp_why))
        .chain(
            discrete
                .iter()
                .filter(|f| f.1 && !discrete_used)
                .map(|f| (f.0, discrete_why)),
        )
        .next();
    if let Some((flag, why)) = unused {
        bail!("{flag} does nothing here: {why}");
    }
    if c.schedule != "discrete" && !model && c.r#final != "zero" {
        bail!("--final applies to discrete schedules (--schedule discrete or --model)");
    }
    Ok(())
}

/// The schedule named by --schedule (and, for discrete, the grid defaults).
fn schedule_of(c: &Common) -> Result<(Arc<dyn Schedule>, Option<DiscreteDefaults>)> {
    check_schedule_flags(c, false)?;
    if c.schedule == "discrete" {
        let s = Tabulated::diffusers(&c.beta_schedule, c.beta_start, c.beta_end, c.train_steps)?;
        let d = DiscreteDefaults {
            spacing: "leading".into(),
            offset: 0,
            train_steps: c.train_steps,
        };
        Ok((Arc::new(s), Some(d)))
    } else {
        Ok((
            schedule_by_name(&c.schedule, c.beta_min, c.beta_max)?.into(),
            None,
        ))
    }
}

/// Every option set must be read by one of `run`, each in its valid range.
fn check_sampler_options(c: &Common, run: &[Sampler], opts: &Options) -> Result<()> {
    let mut given = opts.set_flags();
    if let Some(v) = &c.ddpm_variance {
        given.push(("--ddpm-variance", v.clone()));
    }
    samplers::check_flags_used(run, &given)?;
    for s in run {
        if s.option_flags().contains(&"--eta") {
            s.check_options(opts)?;
        }
    }
    Ok(())
}

/// Sampler options from the flags; `variance_type` is a checkpoint's default DDPM variance.
fn options(c: &Common, variance_type: Option<&str>) -> Result<Options> {
    let ddpm_variance = match (&c.ddpm_variance, variance_type) {
        (Some(v), _) => v.parse()?,
        (None, Some(v)) if v.starts_with("fixed_large") => samplers::DdpmVariance::Beta,
        _ => samplers::DdpmVariance::BetaTilde,
    };
    let opts = Options {
        eta: c.eta,
        expand: c.expand.parse()?,
        qt_last: c.qt_last.parse()?,
        ddpm_variance,
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
    Ok(opts)
}

fn parse_model_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("--model-dtype {other}: expected f32, f16 or bf16"),
    })
}

/// How a grid file names the model it was tuned for.
fn model_id(model: Option<&Path>, problem: Option<&str>) -> String {
    match (model, problem) {
        (Some(d), _) => d.display().to_string(),
        (None, Some(p)) => p.to_string(),
        (None, None) => "embedded:mnist-cond-unet".into(),
    }
}

fn cmd_sample(a: &SampleArgs) -> Result<()> {
    let sampler: Sampler = a.sampler.parse()?;
    if let Some(d) = &a.devices {
        qtaylor::io::check_out_dir("--out", &a.out)?;
        return run_on_devices(d, &a.out);
    }
    let shard = parse_shard(a.shard.as_deref())?;
    if shard.is_none() {
        qtaylor::io::check_out_dir("--out", &a.out)?;
    } else if a.out.is_file() {
        bail!(
            "--out {}: with --shard, --out is the folder of the parts, not a file",
            a.out.display()
        );
    } else {
        for (flag, set) in [
            ("--x-init", a.x_init.is_some()),
            ("--init-image", a.init_image.is_some()),
            ("--save-npy", a.save_npy.is_some()),
        ] {
            if set {
                bail!("--shard takes no {flag} (merge writes the joined output)");
            }
        }
    }
    if let Some(s) = shard
        && skip_finished_shard(&a.out, s)?
    {
        return Ok(());
    }
    if let Some(p) = &a.save_npy {
        qtaylor::io::check_out_dir("--save-npy", p)?;
    }
    let dtype = parse_dtype(&a.dtype)?;
    let device = parse_device(&a.common.device)?;
    // What is sampled: a diffusers checkpoint, or an exact-score problem.
    let checkpoint;
    let mut conditional: Option<&qtaylor::checkpoint::DiffusersModel> = None;
    let problem;
    let (model, schedule, item, name, grid, opts): (
        &dyn qtaylor::model::Model,
        Arc<dyn Schedule>,
        Vec<usize>,
        String,
        TimeGrid,
        Options,
    ) = match (&a.model, &a.common.problem) {
        (Some(_), _) | (None, None) => {
            // Without --model and --problem: the MNIST model embedded in the binary.
            let dir = a.model.as_ref();
            if a.common.problem.is_some() || a.common.schedule != "vp-linear" {
                bail!("--model brings its own model and schedule: drop --problem/--schedule");
            }
            check_schedule_flags(&a.common, true)?;
            let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or("");
            if shard.is_none() && !ext.eq_ignore_ascii_case("png") {
                bail!(
                    "--out {}: with --model the output is a PNG grid (use --save-npy for the array)",
                    a.out.display()
                );
            }
            let dtype = parse_model_dtype(&a.model_dtype)?;
            let mut m = match dir {
                Some(dir) => qtaylor::checkpoint::DiffusersModel::load(dir, dtype, &device)?,
                None => qtaylor::checkpoint::DiffusersModel::embedded_mnist(dtype, &device)?,
            };
            if a.no_clip {
                m.clip = None;
            }
            let schedule: Arc<dyn Schedule> = m.schedule.clone();
            let defaults = DiscreteDefaults {
                spacing: m.scheduler.timestep_spacing.clone(),
                offset: m.scheduler.steps_offset,
                train_steps: m.scheduler.num_train_timesteps,
            };
            let grid = time_grid(
                &a.common,
                schedule.as_ref(),
                Some(defaults),
                ExplicitGrid {
                    timesteps: a.timesteps.as_deref(),
                    sigmas: a.sigmas.as_deref(),
                    file: a.grid_file.as_deref(),
                },
            )?;
            let item = m.item_shape(a.image_size)?;
            let opts = options(&a.common, Some(&m.scheduler.variance_type))?;
            let name = format!(
                "{} ({:.1} M parameters)",
                dir.map_or("the embedded MNIST model".into(), |d| d
                    .display()
                    .to_string()),
                m.parameters as f64 / 1e6
            );
            checkpoint = m;
            conditional = Some(&checkpoint);
            (
                &checkpoint as &dyn qtaylor::model::Model,
                schedule,
                item,
                name,
                grid,
                opts,
            )
        }
        (None, Some(_)) => {
            if a.image_size.is_some() || a.save_npy.is_some() || a.no_clip {
                bail!("--image-size, --save-npy and --no-clip apply to --model");
            }
            let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or("");
            if shard.is_none() && !ext.eq_ignore_ascii_case("npy") {
                bail!(
                    "--out {}: a problem's samples are written as a NumPy array; name the file .npy (PNG grids are for image models: --model, or neither flag for the embedded one)",
                    a.out.display()
                );
            }
            let (schedule, discrete) = schedule_of(&a.common)?;
            let grid = time_grid(
                &a.common,
                schedule.as_ref(),
                discrete,
                ExplicitGrid {
                    timesteps: a.timesteps.as_deref(),
                    sigmas: a.sigmas.as_deref(),
                    file: a.grid_file.as_deref(),
                },
            )?;
            let opts = options(&a.common, None)?;
            problem = load_problem(a.common.problem(), schedule.clone(), &device)?;
            (
                problem.model(),
                schedule,
                problem.item_shape(),
                problem.name(),
                grid,
                opts,
            )
        }
    };
    check_sampler_options(&a.common, &[sampler], &opts)?;
    let classes = match conditional {
        Some(m) => sample_classes(a, m.unet.num_classes())?,
        None => {
            if a.class.is_some()
                || a.classes.is_some()
                || a.guidance.is_some()
                || a.null_class.is_some()
            {
                bail!(
                    "--class, --classes, --guidance and --null-class apply to a class-conditional --model"
                );
            }
            None
        }
    };
    let mut ts = grid.times(schedule.as_ref(), a.steps.unwrap_or(0))?;
    let steps = ts.len() - 1;
    if let Some(s) = a.steps
        && (a.timesteps.is_some() || a.sigmas.is_some() || a.grid_file.is_some())
        && s != steps
    {
        bail!(
            "--steps {s} disagrees with the explicit grid, which makes {steps} steps; give one of them"
        );
    }
    // Image-to-image: the last ⌊steps·strength⌋ steps of the grid.
    let init_image = match (&a.init_image, a.strength) {
        (None, Some(_)) => bail!("--strength does nothing without --init-image"),
        (None, None) => None,
        (Some(path), s) => {
            if conditional.is_none() {
                bail!("--init-image applies to --model (an image model)");
            }
            if a.x_init.is_some() {
                bail!("give one of --init-image and --x-init");
            }
            let s = s.unwrap_or(0.8);
            let first = qtaylor::grid::img2img_start(steps, s)?;
            let img = qtaylor::io::read_image(path, item[0], item[1], item[2])?;
            ts.drain(..first);
            Some(img)
        }
    };
    let steps = ts.len() - 1;
    if let Some(path) = &a.grid_file {
        let model_id = model_id(a.model.as_deref(), a.common.problem.as_deref());
        let g = qtaylor::gridfile::GridFile::read(path, schedule.as_ref())?;
        let nfe = sampler.nfe(steps, grid.ends_at_zero(), &opts);
        for w in g.mismatches(&sampler.to_string(), nfe, schedule.as_ref(), &model_id) {
            eprintln!("warning: grid file {}: {w}", path.display());
        }
    }
    // A shard's rows: first_row..first_row + rows of the run's `total_rows` (None: unsharded).
    let mut first_row = 0usize;
    let mut total_rows: Option<usize> = None;
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
            let x = x.to_dtype(dtype)?.to_device(&device)?;
            // Consume the start draws, so that the sampler's own noise is the same as in a
            // run without --x-init: an x-init equal to the default start noise reproduces it.
            let mut noise = NoiseStreams::new(a.common.seed, 0, b);
            noise.normal(&item, DType::F64, &Device::Cpu)?;
            (x, noise)
        }
        None if init_image.is_some() => {
            let img = init_image.expect("checked");
            let b = a.batch.unwrap_or(img.dims()[0].max(match &classes {
                Some((c, _)) if a.classes.is_some() => c.len() * c.len(),
                _ => 1,
            }));
            if b == 0 {
                bail!("--batch 0: at least one sample is needed");
            }
            let n = img.dims()[0];
            if n != 1 && n != b {
                bail!(
                    "--init-image {}: {n} images for --batch {b}; give one image or one per sample",
                    a.init_image.as_ref().expect("given").display()
                );
            }
            let img = img
                .broadcast_as((b, item[0], item[1], item[2]))?
                .contiguous()?;
            // SDEdit (Meng et al. 2021): x = α(t_s) x0 + σ(t_s) ε, with ε the draws a
            // pure-noise start takes; strength 1 is that pure-noise start itself.
            let mut noise = NoiseStreams::new(a.common.seed, 0, b);
            let eps = noise.normal(&item, DType::F64, &Device::Cpu)?;
            let x = if a.strength.unwrap_or(0.8) >= 1.0 {
                eps
            } else {
                let t0 = ts[0];
                let img = img.to_dtype(DType::F64)?;
                ((img * schedule.alpha(t0))? + (eps * schedule.sigma(t0))?)?
            };
            (x.to_dtype(dtype)?.to_device(&device)?, noise)
        }
        None => {
            let b = a.batch.unwrap_or(match &classes {
                Some((c, _)) if a.classes.is_some() => c.len() * c.len(),
                _ => 16,
            });
            if b == 0 {
                bail!("--batch 0: at least one sample is needed");
            }
            total_rows = Some(b);
            let (first, end) = match shard {
                Some(s) => s.rows(b, "--batch")?,
                None => (0, b),
            };
            first_row = first;
            let mut noise = NoiseStreams::new(a.common.seed, first, end - first);
            (noise.normal(&item, dtype, &device)?, noise)
        }
    };
    // Class labels and guidance (a class-conditional checkpoint only).
    let total = total_rows;
    let guided;
    let (model, rows_per_call) = match (conditional, classes) {
        (Some(m), Some((list, null))) => {
            // Sample i's class from its index in the whole run (a shard's rows start at first_row).
            let b = x.dims()[0];
            let total = total.unwrap_or(b);
            let labels: Vec<u32> = (first_row..first_row + b)
                .map(|i| list[i * list.len() / total])
                .collect();
            guided = qtaylor::guidance::Guided::new(m, labels, null, a.guidance.unwrap_or(1.0))?;
            let rows = guided.rows_per_call();
            (&guided as &dyn qtaylor::model::Model, rows)
        }
        (Some(m), None) if m.unet.num_classes().is_some() => {
            guided = qtaylor::guidance::Guided::unconditional(m)?;
            eprintln!(
                "note: {name} is class-conditional; without --class/--classes it samples the unconditional model (null class {}); --classes all --guidance 2 gives one row per class",
                guided.null()
            );
            (&guided as &dyn qtaylor::model::Model, 1)
        }
        _ => (model, 1),
    };
    let pb = qtaylor::progress::Progress::new(
        "sample",
        "step",
        steps as u64,
        "{bar:30} step {pos}/{len} {msg} [{elapsed_precise}]",
    );
    let start = Instant::now();
    let run = samplers::sample(
        model,
        schedule.as_ref(),
        sampler,
        &opts,
        &ts,
        x,
        &mut noise,
        Some(&pb),
    )?;
    pb.finish();
    let image = a.model.is_some() || a.common.problem.is_none();
    if let Some(s) = shard {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let config = qtaylor::shard::config_of(&args);
        let b = run.x.dims()[0];
        let part = qtaylor::shard::Part {
            config_hash: qtaylor::shard::config_hash(&config),
            config,
            shard: s.index,
            shards: s.count,
            start: first_row,
            end: first_row + b,
            total: total.unwrap_or(b),
            kind: if image { "png" } else { "npy" }.into(),
            item: run.x.dims()[1..].to_vec(),
            eval: None,
        };
        let json = qtaylor::shard::write_part(&a.out, &part, &run.x)?;
        eprintln!(
            "shard {}/{}: samples {}..{} of {} -> {} (qtaylor merge joins the parts)",
            s.index,
            s.count,
            part.start,
            part.end,
            part.total,
            json.display()
        );
        return Ok(());
    }
    if image {
        qtaylor::io::write_png_grid(&a.out, &run.x)?;
        if let Some(npy) = &a.save_npy {
            qtaylor::io::write_npy(npy, &run.x)?;
        }
    } else {
        qtaylor::io::write_npy(&a.out, &run.x)?;
    }
    let guidance = match (&a.class, &a.classes) {
        (None, None) => String::new(),
        _ => format!(
            ", guidance {} ({rows_per_call} network row{} per sample and call)",
            a.guidance.unwrap_or(1.0),
            if rows_per_call == 1 { "" } else { "s" }
        ),
    };
    eprintln!(
        "{} samples of {name} with {sampler}, {steps} steps ({}), {:.0} NFE{guidance}, {:.2} s -> {}",
        run.x.dims()[0],
        grid.describe(),
        run.nfe,
        start.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

/// The classes of `sample --class/--classes` for a model of `k` classes (`all`: every
/// class but the null one) and that null class (`--null-class`, or the last); None without
/// either flag (a class-conditional model then samples its null class).
fn sample_classes(a: &SampleArgs, k: Option<usize>) -> Result<Option<(Vec<u32>, u32)>> {
    let given = a.class.is_some() || a.classes.is_some();
    if !given {
        for (flag, set) in [
            ("--guidance", a.guidance.is_some()),
            ("--null-class", a.null_class.is_some()),
        ] {
            if set {
                bail!("{flag} does nothing without --class or --classes");
            }
        }
        // A class-conditional model without a class: its unconditional (null-class) model.
        return Ok(None);
    }
    let Some(k) = k else {
        bail!(
            "--class/--classes: this model is not class-conditional (its config.json has no num_class_embeds)"
        );
    };
    let null = a.null_class.unwrap_or(k as u32 - 1);
    let list = match (a.class, a.classes.as_deref()) {
        (Some(_), Some(_)) => bail!("give one of --class and --classes"),
        (Some(c), None) => vec![c],
        (None, Some("all")) => (0..k as u32).filter(|&c| c != null).collect(),
        (None, Some(list)) => list
            .split(',')
            .map(|v| {
                v.trim().parse::<u32>().map_err(|_| {
                    anyhow::anyhow!("--classes {list}: '{}' is not a class number", v.trim())
                })
            })
            .collect::<Result<Vec<_>>>()?,
        (None, None) => unreachable!("checked above"),
    };
    if list.is_empty() {
        bail!("--classes all: the model's only class is the null class {null}");
    }
    Ok(Some((list, null)))
}

fn cmd_tune(a: &TuneArgs) -> Result<()> {
    let sampler: Sampler = a.sampler.parse()?;
    let (teacher, teacher_steps) = match a.teacher.split_once(':') {
        Some((s, n)) => (
            s.parse::<Sampler>()?,
            n.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                anyhow::anyhow!(
                    "--teacher {}: '{n}' is not a positive step count",
                    a.teacher
                )
            })?,
        ),
        None => bail!(
            "--teacher {}: expected SAMPLER:STEPS, e.g. dpmpp-3m:100",
            a.teacher
        ),
    };
    for (flag, v) in [("--samples", a.samples), ("--holdout", a.holdout)] {
        if v == 0 {
            bail!("{flag} 0: at least one sample is needed");
        }
    }
    let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !ext.eq_ignore_ascii_case("json") {
        bail!("--out {}: a grid file is JSON (.json)", a.out.display());
    }
    qtaylor::io::check_out_dir("--out", &a.out)?;
    let dtype = parse_dtype(&a.dtype)?;
    let devices = match &a.devices {
        Some(list) => parse_device_list(list)?,
        None => vec![parse_device(&a.common.device)?],
    };
    let device = devices[0].clone();
    let checkpoint;
    let guided;
    let problem;
    let (model, schedule, item, grid, opts, t_min): (
        &dyn qtaylor::model::Model,
        Arc<dyn Schedule>,
        Vec<usize>,
        TimeGrid,
        Options,
        f64,
    ) = match &a.common.problem {
        None => {
            if a.common.schedule != "vp-linear" {
                bail!("--model brings its own schedule: drop --schedule");
            }
            check_schedule_flags(&a.common, true)?;
            let mdt = parse_model_dtype(&a.model_dtype)?;
            let m = match &a.model {
                Some(dir) => qtaylor::checkpoint::DiffusersModel::load(dir, mdt, &device)?,
                None => qtaylor::checkpoint::DiffusersModel::embedded_mnist(mdt, &device)?,
            };
            let schedule: Arc<dyn Schedule> = m.schedule.clone();
            let defaults = DiscreteDefaults {
                spacing: m.scheduler.timestep_spacing.clone(),
                offset: m.scheduler.steps_offset,
                train_steps: m.scheduler.num_train_timesteps,
            };
            let t_min = qtaylor::grid::time_of_timestep(0.0, m.scheduler.num_train_timesteps);
            let grid = time_grid(
                &a.common,
                schedule.as_ref(),
                Some(defaults),
                ExplicitGrid::none(),
            )?;
            let item = m.item_shape(None)?;
            let opts = options(&a.common, Some(&m.scheduler.variance_type))?;
            checkpoint = m;
            let model: &dyn qtaylor::model::Model = if checkpoint.unet.num_classes().is_some() {
                guided = qtaylor::guidance::Guided::unconditional(&checkpoint)?;
                eprintln!(
                    "note: the model is class-conditional; tuning its unconditional model (null class {})",
                    guided.null()
                );
                &guided
            } else {
                &checkpoint
            };
            (model, schedule, item, grid, opts, t_min)
        }
        Some(p) => {
            if a.model.is_some() {
                bail!("give --model or --problem, not both");
            }
            let (schedule, discrete) = schedule_of(&a.common)?;
            let t_min = match &discrete {
                Some(d) => qtaylor::grid::time_of_timestep(0.0, d.train_steps),
                None => a.common.t_min.unwrap_or(1e-3),
            };
            let grid = time_grid(&a.common, schedule.as_ref(), discrete, ExplicitGrid::none())?;
            let opts = options(&a.common, None)?;
            problem = load_problem(p, schedule.clone(), &device)?;
            (
                problem.model(),
                schedule,
                problem.item_shape(),
                grid,
                opts,
                t_min,
            )
        }
    };
    // The other replicas' copies of the model (data-parallel tuning).
    let mut copies = Vec::new();
    let mut problems = Vec::new();
    for d in &devices[1..] {
        match &a.common.problem {
            None => copies.push(match &a.model {
                Some(dir) => qtaylor::checkpoint::DiffusersModel::load(
                    dir,
                    parse_model_dtype(&a.model_dtype)?,
                    d,
                )?,
                None => qtaylor::checkpoint::DiffusersModel::embedded_mnist(
                    parse_model_dtype(&a.model_dtype)?,
                    d,
                )?,
            }),
            Some(p) => problems.push(load_problem(p, schedule.clone(), d)?),
        }
    }
    let guided_copies = copies
        .iter()
        .filter(|c| c.unet.num_classes().is_some())
        .map(qtaylor::guidance::Guided::unconditional)
        .collect::<Result<Vec<_>>>()?;
    let mut models: Vec<&dyn qtaylor::model::Model> = vec![model];
    if !guided_copies.is_empty() {
        models.extend(
            guided_copies
                .iter()
                .map(|g| g as &dyn qtaylor::model::Model),
        );
    } else {
        models.extend(copies.iter().map(|c| c as &dyn qtaylor::model::Model));
    }
    models.extend(problems.iter().map(|p| p.model()));
    check_sampler_options(&a.common, &[sampler], &opts)?;
    qtaylor::tune::check_tunable(sampler, &opts)?;
    let zero = grid.ends_at_zero();
    let steps = sampler
        .steps_for_budget(a.nfe, zero, &opts)
        .ok_or_else(|| anyhow::anyhow!("--nfe {}: not even one step of {sampler} fits", a.nfe))?;
    let default_times = grid.times(schedule.as_ref(), steps)?;
    let cfg = qtaylor::tune::TuneConfig {
        sampler,
        opts: opts.clone(),
        default_times: default_times.clone(),
        t_min,
        teacher,
        teacher_steps,
        candidates: a.candidates,
        refine_sweeps: a.refine_sweeps,
        samples: a.samples,
        holdout: a.holdout,
        seed: a.common.seed,
        dtype,
        device: device.clone(),
    };
    let mut log = qtaylor::progress::Log::new("tune");
    let r = if devices.len() == 1 {
        let whole = qtaylor::tune::Share::whole();
        qtaylor::tune::tune(model, schedule.as_ref(), &item, &cfg, whole, &mut |m| {
            log.line(m)
        })?
    } else {
        tune_on_devices(&models, &devices, schedule.as_ref(), &item, &cfg, &mut log)?
    };
    let device_name = a.devices.as_deref().unwrap_or(&a.common.device);
    let nfe = sampler.nfe(steps, zero, &opts).unwrap_or(a.nfe);
    let tuning = serde_json::json!({
        "method": "GITS-style dynamic programming over a fine candidate grid (arXiv 2405.11326), then a compass search on the full run's end-point error",
        "teacher": a.teacher,
        "teacher_steps": r.teacher_steps,
        "candidates": a.candidates,
        "refine_sweeps": a.refine_sweeps,
        "refine_evals": r.refine_evals,
        "tuning_error_start": r.refine_start,
        "tuning_error_end": r.refine_end,
        "gits_times": r.gits_times,
        "error_gits": r.error_gits,
        "samples": a.samples,
        "holdout": a.holdout,
        "seed": a.common.seed,
        "default_grid": grid.describe(),
        "default_times": default_times,
        "error_default": r.error_default,
        "error_tuned": r.error_tuned,
        "seconds": r.seconds,
        "device": device_name,
    });
    let file = qtaylor::gridfile::GridFile::new(
        &sampler.to_string(),
        nfe,
        schedule.as_ref(),
        &model_id(a.model.as_deref(), a.common.problem.as_deref()),
        r.times.clone(),
        tuning,
    );
    file.write(&a.out)?;
    // Network times: diffusers timesteps on a discrete schedule, t otherwise.
    let discrete = schedule.network_time(1.0) > 1.5;
    let show = |ts: &[f64]| -> String {
        ts.iter()
            .map(|&t| match (t > 0.0, discrete) {
                (false, _) => "x0".to_string(),
                (true, true) => format!("{:.1}", schedule.network_time(t)),
                (true, false) => format!("{t:.4}"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "{sampler} at {nfe} NFE ({steps} steps), teacher {}",
        a.teacher
    );
    println!("  default ({}): {}", grid.describe(), show(&default_times));
    println!("  dynamic program: {}", show(&r.gits_times));
    println!("  tuned:   {}", show(&r.times));
    println!(
        "  held-out end-point RMSE vs teacher ({} samples): default {:.5}, dynamic program {:.5}, tuned {:.5} ({:.2}x)",
        a.holdout,
        r.error_default,
        r.error_gits,
        r.error_tuned,
        r.error_tuned / r.error_default
    );
    println!(
        "  refinement: {} evaluations, tuning-sample error {:.5} -> {:.5}",
        r.refine_evals, r.refine_start, r.refine_end
    );
    println!(
        "  tuning time {:.1} s on {} ({} samples, {} candidates) -> {}",
        r.seconds,
        device_name,
        a.samples,
        a.candidates,
        a.out.display()
    );
    Ok(())
}

/// `tune --devices`: one replica per device, replica `r` on `models[r]` (a copy of the model
/// on `devices[r]`), in threads that gather their per-sample errors through a
/// [`qtaylor::data_parallel::Group`]; replica 0 logs and its result is returned.
fn tune_on_devices(
    models: &[&dyn qtaylor::model::Model],
    devices: &[Device],
    schedule: &dyn Schedule,
    item: &[usize],
    cfg: &qtaylor::tune::TuneConfig,
    log: &mut qtaylor::progress::Log,
) -> Result<qtaylor::tune::Tuned> {
    let log = std::sync::Mutex::new(log);
    qtaylor::data_parallel::run_replicas(devices, |rank, device, group| {
        let mut cfg = cfg.clone();
        cfg.device = device.clone();
        let share = qtaylor::tune::Share {
            rank,
            group: Some(group),
        };
        let mut progress = |m: &str| {
            if rank == 0 {
                log.lock().unwrap_or_else(|p| p.into_inner()).line(m)
            }
        };
        qtaylor::tune::tune(models[rank], schedule, item, &cfg, share, &mut progress)
    })
}

fn cmd_bench(a: &BenchArgs) -> Result<()> {
    if a.out.is_file() {
        bail!(
            "--out {}: bench writes a results folder{}, not a file",
            a.out.display(),
            if a.shard.is_some() {
                " (with --shard: the folder of the parts)"
            } else {
                ""
            }
        );
    }
    if let Some(d) = &a.devices {
        return run_on_devices(d, &a.out);
    }
    let shard = parse_shard(a.shard.as_deref())?;
    if let Some(s) = shard {
        s.rows(a.batch, "--batch")?;
        if skip_finished_shard(&a.out, s)? {
            return Ok(());
        }
    }
    let device = parse_device(&a.common.device)?;
    let (schedule, discrete) = schedule_of(&a.common)?;
    let grid = time_grid(
        &a.common,
        schedule.as_ref(),
        discrete,
        ExplicitGrid {
            file: a.grid_file.as_deref(),
            ..ExplicitGrid::none()
        },
    )?;
    let opts = options(&a.common, None)?;
    let samplers = if a.samplers == "all" {
        samplers::all_samplers()
    } else {
        samplers::parse_list(&a.samplers)?
    };
    check_sampler_options(&a.common, &samplers, &opts)?;
    if let Some(path) = &a.grid_file {
        let g = qtaylor::gridfile::GridFile::read(path, schedule.as_ref())?;
        let model = model_id(None, a.common.problem.as_deref().or(Some("gmm-demo")));
        // One line per difference: the schedule and model ones are the same for every sampler.
        let mut warnings: Vec<String> = Vec::new();
        for s in &samplers {
            for w in g.mismatches(&s.to_string(), None, schedule.as_ref(), &model) {
                if !warnings.contains(&w) {
                    eprintln!("warning: grid file {}: {w}", path.display());
                    warnings.push(w);
                }
            }
        }
    }
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
    let problem = load_problem(a.common.problem(), schedule.clone(), &device)?;
    let cfg = BenchConfig {
        samplers,
        budgets,
        grid,
        batch: a.batch,
        seed: a.common.seed,
        dtype: parse_dtype(&a.dtype)?,
        opts,
        ref_tol: a.ref_tol,
        projections: 128,
    };
    let start = Instant::now();
    if let Some(s) = shard {
        let rows = s.range(a.batch);
        let data = qtaylor::bench::bench_rows(
            problem.as_ref(),
            schedule.as_ref(),
            &device,
            &cfg,
            rows,
            true,
        )?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        let config = qtaylor::shard::config_of(&args);
        let json = qtaylor::bench::write_part(&a.out, s, config, problem.item_shape(), &data)?;
        eprintln!(
            "shard {}/{}: samples {}..{} of {} of every cell ({:.1} s) -> {} (qtaylor merge computes the results)",
            s.index,
            s.count,
            rows.0,
            rows.1,
            a.batch,
            start.elapsed().as_secs_f64(),
            json.display()
        );
        return Ok(());
    }
    let report = run_bench(problem.as_ref(), schedule.as_ref(), &device, &cfg, true)?;
    report.write(&a.out)?;
    println!("{}", report.markdown());
    eprintln!(
        "bench took {:.1} s; wrote results.csv, results.json, report.md, error_vs_nfe.png to {}",
        start.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

/// Median of timings in seconds.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The time outside the network as a share of the network's. A negative measured share
/// means the sampler ran faster than the chained forwards alone: the difference is timing
/// noise, reported as such rather than as a negative share.
fn outside_share(share: f64, of: &str) -> String {
    if share >= 0.0 {
        format!("time outside the network {:.1} % of {of}", 100.0 * share)
    } else {
        format!(
            "time outside the network below the timing noise ({:.1} % faster than {of} alone)",
            -100.0 * share
        )
    }
}

fn cmd_speed(a: &SpeedArgs) -> Result<()> {
    if a.batch == 0 || a.repeats == 0 {
        bail!("--batch and --repeats must be positive");
    }
    let device = parse_device(&a.device)?;
    let m = qtaylor::checkpoint::DiffusersModel::load(
        &a.model,
        parse_model_dtype(&a.model_dtype)?,
        &device,
    )?;
    let item = m.item_shape(None)?;
    let mut noise = NoiseStreams::new(0, 0, a.batch);
    let x = noise.normal(&item, DType::F32, &device)?;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?; // warm-up (plans, kernels and allocations are made here)
        device.synchronize()?;
        qtaylor::unet::profile_reset()?;
        let mut v = Vec::with_capacity(a.repeats);
        for _ in 0..a.repeats {
            let t0 = Instant::now();
            f()?;
            device.synchronize()?;
            v.push(t0.elapsed().as_secs_f64());
        }
        Ok(median(v))
    };
    let mut enqueue = Vec::with_capacity(a.repeats + 1);
    let fwd = time(&mut || {
        let t0 = Instant::now();
        m.unet.forward(&x, &[500.0])?;
        enqueue.push(t0.elapsed().as_secs_f64());
        Ok(())
    })?;
    // On CUDA the host returns once every kernel is queued: if that takes about as long as
    // the pass, the pass is bound by the host's launch overhead, not by the GPU.
    let enqueue = median(enqueue.split_off(1));
    println!(
        "model {} ({:.2} M parameters), {:?}, dtype {}, batch {}; convolutions: {}{}",
        a.model.display(),
        m.parameters as f64 / 1e6,
        item,
        a.model_dtype,
        a.batch,
        qtaylor::kernels::conv_path(&device),
        if device.is_cuda() && qtaylor::cuda_graph::enabled()? {
            "; passes replayed from CUDA graphs (QTAYLOR_CUDA_GRAPH=on)"
        } else {
            ""
        }
    );
    println!(
        "forward: {:.4} s per batch, {:.1} images/s (median of {})",
        fwd,
        a.batch as f64 / fwd,
        a.repeats
    );
    if device.is_cuda() {
        println!("  host time to queue one forward: {enqueue:.4} s");
    }
    if a.sampler != "none" {
        let sampler: Sampler = a.sampler.parse()?;
        let opts = Options::default();
        let grid = TimeGrid::Discrete {
            spacing: m.scheduler.timestep_spacing.parse()?,
            offset: m.scheduler.steps_offset,
            timesteps: None,
            train_steps: m.scheduler.num_train_timesteps,
            last: qtaylor::grid::Final::Zero,
        };
        // The start noise is drawn before the clock starts (on the host: about 15 ms for
        // batch 256, as much as 6 % of a 10-step bf16 sample on an H200); the sampler gets
        // fresh streams for any noise it draws on the way. Returns the median time, the NFE
        // and the median time of copying the result to the host (after the device is done).
        let sample_time = |steps: usize| -> Result<(f64, f64, f64)> {
            let ts = grid.times(m.schedule.as_ref(), steps)?;
            let mut nfe = 0.0;
            let mut copies = Vec::with_capacity(a.repeats + 1);
            let t = time(&mut || {
                let mut noise = NoiseStreams::new(0, 0, a.batch);
                let run = samplers::sample(
                    &m,
                    m.schedule.as_ref(),
                    sampler,
                    &opts,
                    &ts,
                    x.clone(),
                    &mut noise,
                    None,
                )?;
                nfe = run.nfe;
                device.synchronize()?;
                let t0 = Instant::now();
                run.x.to_device(&Device::Cpu)?;
                copies.push(t0.elapsed().as_secs_f64());
                Ok(())
            })?;
            Ok((t, nfe, median(copies.split_off(1))))
        };
        let (full, nfe, copy) = sample_time(a.steps)?;
        // The sampler's share: the sample against the same number of forward passes queued
        // back to back (as the sampler queues them, without a synchronization in between).
        let n = (nfe.round() as usize).max(1);
        let chained = time(&mut || {
            for _ in 0..n {
                m.unet.forward(&x, &[500.0])?;
            }
            Ok(())
        })? / n as f64;
        let overhead = (full - nfe * chained) / (nfe * chained);
        println!(
            "sample {sampler}, {} steps ({nfe:.0} NFE): {:.4} s per batch, {:.1} images/s; {} ({n} forwards queued back to back: {:.4} s each; copying the result to the host: {:.4} s)",
            a.steps,
            full,
            a.batch as f64 / full,
            outside_share(overhead, "the network's"),
            chained,
            copy
        );
        // Per step: the slope between this sample and one of twice the steps, so that what
        // a sample pays once (setup, the final read-back and copy) drops out.
        let (full2, nfe2, _) = sample_time(2 * a.steps)?;
        if nfe2 > nfe {
            let per_nfe = (full2 - full) / (nfe2 - nfe);
            println!(
                "  per step ({} vs {} steps): {:.4} s per NFE, {}; once per sample: {:.4} s",
                2 * a.steps,
                a.steps,
                per_nfe,
                outside_share((per_nfe - chained) / chained, "a forward's"),
                full - nfe * per_nfe
            );
        }
    }
    if let Some(p) = peak_rss_mib() {
        println!("peak resident memory: {p:.0} MiB");
    }
    let span = format!("after the warm-up, {} timed passes", a.repeats);
    for line in device_report(&device, &span, None)? {
        println!("{line}");
    }
    Ok(())
}

/// The lines `speed` and `train` end with: CUDA's peak allocation, and the QTAYLOR_PROFILE
/// table of what `span` covers: each operation's total time, or its mean per `unit` over
/// `count` of them (nested operations count in each row; `backward: X` runs from X's backward
/// marker to the next).
fn device_report(device: &Device, span: &str, per: Option<(&str, usize)>) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    if let Some(b) = qtaylor::kernels::cuda_peak_allocated(device)? {
        lines.push(format!(
            "peak device memory allocated (CUDA memory pool high-water mark, as torch.cuda.max_memory_allocated): {:.0} MiB",
            b as f64 / (1u64 << 20) as f64
        ));
    }
    let profile = qtaylor::unet::profile_report()?;
    if !profile.is_empty() {
        lines.push(format!(
            "profile (QTAYLOR_PROFILE; {}; {span}; nested operations count in each row, `backward: X` is from X's backward marker to the next):",
            if device.is_cuda() {
                "GPU time between CUDA events"
            } else {
                "wall time, device synchronized around each operation"
            }
        ));
        for (name, secs, calls) in profile {
            lines.push(match per {
                Some((unit, count)) => format!(
                    "  {name:<40} {:>9.2} ms per {unit} ({calls} calls)",
                    1e3 * secs / count.max(1) as f64
                ),
                None => format!("  {name:<40} {:>9.1} ms ({calls} calls)", 1e3 * secs),
            });
        }
    }
    Ok(lines)
}

fn cmd_init_model(a: &InitArgs) -> Result<()> {
    let (config, scheduler) = match a.preset.as_str() {
        "cifar10-ddpm" => (
            qtaylor::checkpoint::CIFAR10_DDPM_CONFIG,
            qtaylor::checkpoint::DDPM_SCHEDULER_CONFIG,
        ),
        other => bail!("--preset {other}: expected cifar10-ddpm"),
    };
    let n = qtaylor::checkpoint::write_random_checkpoint(&a.out, config, scheduler, a.seed)?;
    eprintln!(
        "wrote {} ({:.2} M parameters, random weights, seed {})",
        a.out.display(),
        n as f64 / 1e6,
        a.seed
    );
    Ok(())
}

fn cmd_parity(a: &ParityArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let m = qtaylor::checkpoint::DiffusersModel::load(
        &a.model,
        parse_model_dtype(&a.model_dtype)?,
        &device,
    )?;
    let file = a.model.join("reference.safetensors");
    let r = candle_core::safetensors::load(&file, &device)
        .map_err(|e| anyhow::anyhow!("{}: cannot read the reference ({e})", file.display()))?;
    let get = |k: &str| {
        r.get(k)
            .ok_or_else(|| anyhow::anyhow!("{}: tensor '{k}' is missing", file.display()))
    };
    let x = get("x")?;
    // A class-conditional model: the plain outputs are at the null class (the last), and
    // `out_labels` is at t = [3, 999] with the reference's `labels`.
    let null = m.unet.num_classes().map(|k| vec![k as u32 - 1]);
    type Case<'a> = (&'a str, Vec<f64>, Option<Vec<u32>>);
    let mut cases: Vec<Case> = vec![
        ("out", vec![3.0, 999.0], null.clone()),
        ("out_t500", vec![500.0], null.clone()),
        ("out_t37_5", vec![37.5], null.clone()),
    ];
    if null.is_some() {
        let labels = get("labels")?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        cases.push((
            "out_labels",
            vec![3.0, 999.0],
            Some(labels.iter().map(|&l| l as u32).collect()),
        ));
    }
    let mut worst = 0.0f64;
    for (key, t, labels) in cases {
        let want = get(key)?.to_dtype(DType::F64)?;
        let got = m
            .unet
            .forward_labels(x, &t, labels.as_deref())?
            .to_dtype(DType::F64)?;
        let d = (got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let e = d / want.abs()?.max_all()?.to_scalar::<f64>()?;
        println!(
            "{} {key} on {} ({}): max relative error {e:.2e}",
            a.model.display(),
            a.device,
            a.model_dtype
        );
        worst = worst.max(e);
    }
    if worst > a.tol {
        bail!("max relative error {worst:.2e} exceeds --tol {:.1e}", a.tol);
    }
    Ok(())
}

/// `--devices D1,D2,...` of `train`: the devices, each GPU at most once.
fn parse_device_list(list: &str) -> Result<Vec<Device>> {
    let names: Vec<&str> = list.split(',').map(str::trim).collect();
    if names.iter().any(|d| d.is_empty()) {
        bail!("--devices {list}: expected a comma-separated list of devices, e.g. cuda:0,cuda:1");
    }
    let gpu = |d: &str| match d {
        "cuda" => Some(0),
        _ => d
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok()),
    };
    for (i, a) in names.iter().enumerate() {
        if let Some(n) = gpu(a)
            && names[..i].iter().any(|b| gpu(b) == Some(n))
        {
            bail!("--devices {list}: GPU {n} appears twice; give each GPU once");
        }
    }
    names
        .iter()
        .map(|d| parse_device(d).map_err(|e| anyhow::anyhow!("--devices {list}: {e}")))
        .collect()
}

fn cmd_train(a: &TrainArgs) -> Result<()> {
    let devices = match &a.devices {
        Some(list) => parse_device_list(list)?,
        None => vec![parse_device(&a.device)?],
    };
    let device = devices[0].clone();
    let mut o = qtaylor::train::TrainOptions::new(&a.data, &a.out);
    if let Some(c) = &a.config {
        o.config = std::fs::read_to_string(c)
            .map_err(|e| anyhow::anyhow!("--config {}: cannot read it ({e})", c.display()))?;
    }
    o.resume = a.resume.clone();
    o.steps = a.steps;
    o.batch = a.batch;
    o.lr = a.lr;
    o.warmup = a.warmup;
    o.weight_decay = a.weight_decay;
    o.ema = a.ema;
    o.seed = a.seed;
    o.save_every = a.save_every;
    o.limit = a.limit;
    o.max_seconds = a.max_seconds;
    o.label_dropout = a.label_dropout;
    o.save_dtype = match a.save_dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        other => bail!("--save-dtype {other}: expected f32 or f16"),
    };
    o.progress = true;
    // `--devices` takes the data-parallel path even with one device (how a one-GPU machine
    // runs the NCCL code); `--device` the plain one.
    let r = if a.devices.is_some() {
        qtaylor::train::train_on(&o, &devices)?
    } else {
        qtaylor::train::train(&o, &device)?
    };
    eprintln!(
        "trained steps {}..{} ({:.2} M parameters) in {:.1} s: loss {:.4} (first 100 steps of this run) -> {:.4} (last 100); wrote {}",
        r.start_step,
        r.end_step,
        r.parameters as f64 / 1e6,
        r.seconds,
        r.first_loss,
        r.last_loss,
        a.out.display()
    );
    if let Some((steps, secs)) = r.steady.filter(|&(n, _)| n > 0) {
        eprintln!(
            "steady rate (after the first {} steps): {:.3} steps/s, {:.1} ms per step of batch {}{}",
            qtaylor::train::WARM_UP_STEPS,
            steps as f64 / secs,
            1e3 * secs / steps as f64,
            a.batch,
            if devices.len() > 1 {
                format!(
                    " ({} replicas of batch {})",
                    devices.len(),
                    a.batch / devices.len()
                )
            } else {
                String::new()
            }
        );
        let span = format!("{steps} steps after the warm-up");
        for line in device_report(&device, &span, Some(("step", steps)))? {
            eprintln!("{line}");
        }
    }
    Ok(())
}

/// A shard about to run (`--shard`, parts folder `out`): true when its complete part of this
/// configuration is already in `out` (a note says so and the run is skipped); an error when
/// `out` holds a part of another run.
fn skip_finished_shard(out: &Path, s: qtaylor::shard::Shard) -> Result<bool> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = qtaylor::shard::config_of(&args);
    match qtaylor::shard::existing_part(out, s, &config)? {
        Some(json) => {
            eprintln!(
                "note: shard {}/{} is already done: {} is complete for configuration {}; not redone (delete it to redo the shard)",
                s.index,
                s.count,
                json.display(),
                qtaylor::shard::config_hash(&config)
            );
            Ok(true)
        }
        None => Ok(false),
    }
}

/// `--shard I/N`, if given.
fn parse_shard(s: Option<&str>) -> Result<Option<qtaylor::shard::Shard>> {
    s.map(qtaylor::shard::Shard::parse).transpose()
}

/// `--devices D1,D2,...`: shard I of this command on device I, all at once in child processes
/// ([`qtaylor::shard::run_on_devices`]), then their merge into `out`; the parts are removed
/// once merged.
fn run_on_devices(devices: &str, out: &Path) -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let exe = std::env::current_exe().context("--devices: locating this program")?;
    let parts = qtaylor::shard::run_on_devices(&exe, &args, devices, out)?;
    cmd_merge(&MergeArgs {
        dirs: vec![parts.clone()],
        out: out.to_path_buf(),
    })?;
    std::fs::remove_dir_all(&parts)
        .with_context(|| format!("removing the merged parts {}", parts.display()))
}

fn cmd_merge(a: &MergeArgs) -> Result<()> {
    let parts = qtaylor::shard::read_parts(&a.dirs)?;
    let part = parts[0].1.clone();
    let results = [qtaylor::shard::EVAL_KIND, qtaylor::shard::BENCH_KIND];
    if results.contains(&part.kind.as_str()) {
        let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or("");
        if a.out.is_file() || ["npy", "png"].iter().any(|e| ext.eq_ignore_ascii_case(e)) {
            bail!(
                "--out {}: the parts are of `{}` (configuration {}): --out is the results folder, not a file",
                a.out.display(),
                part.kind,
                part.config_hash
            );
        }
    }
    if part.kind == qtaylor::shard::BENCH_KIND {
        let report = qtaylor::bench::merge_parts(&parts)?;
        report.write(&a.out)?;
        println!("{}", report.markdown());
        eprintln!(
            "merged {} bench shards ({} samples, configuration {}) -> {}",
            part.shards,
            part.total,
            part.config_hash,
            a.out.display()
        );
        return Ok(());
    }
    if part.kind == qtaylor::shard::EVAL_KIND {
        let report = qtaylor::eval::merge_parts(&parts, &a.out)?;
        println!("{}", qtaylor::eval::markdown(&report));
        eprintln!(
            "merged {} eval shards ({} samples per row, configuration {}) -> {}",
            part.shards,
            part.total,
            part.config_hash,
            a.out.display()
        );
        return Ok(());
    }
    qtaylor::io::check_out_dir("--out", &a.out)?;
    let ext = a.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !ext.eq_ignore_ascii_case(&part.kind) {
        bail!(
            "--out {}: the parts are of a run whose output is .{} (configuration {})",
            a.out.display(),
            part.kind,
            part.config_hash
        );
    }
    let (part, rows) = qtaylor::shard::join_rows(&parts)?;
    if part.kind == "png" {
        qtaylor::io::write_png_grid(&a.out, &rows)?;
    } else {
        qtaylor::io::write_npy(&a.out, &rows)?;
    }
    eprintln!(
        "merged {} shards ({} samples, configuration {}) -> {}",
        part.shards,
        part.total,
        part.config_hash,
        a.out.display()
    );
    Ok(())
}

fn cmd_eval(a: &EvalArgs) -> Result<()> {
    if let Some(d) = &a.devices {
        if a.out.is_file() {
            bail!(
                "--out {}: eval writes a results folder, not a file",
                a.out.display()
            );
        }
        return run_on_devices(d, &a.out);
    }
    let shard = parse_shard(a.shard.as_deref())?;
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
        if skip_finished_shard(&a.out, s)? {
            return Ok(());
        }
    }
    if a.render_only {
        if a.model.is_some() || a.guidance.is_some() {
            bail!("--model and --guidance do nothing with --render-only (it re-renders --out)");
        }
        let report = qtaylor::eval::render(&a.out)?;
        println!("{}", qtaylor::eval::markdown(&report));
        return Ok(());
    }
    let device = parse_device(&a.device)?;
    let model = a.model.as_ref().context("--model is required")?;
    let names: Vec<&str> = a.samplers.iter().map(|s| s.trim()).collect();
    let mut o = qtaylor::eval::EvalOptions::new(model, &names, &a.out);
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
        let args: Vec<String> = std::env::args().skip(1).collect();
        let config = qtaylor::shard::config_of(&args);
        let json = qtaylor::eval::eval_shard(&o, s, config, &device)?;
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
    let report = qtaylor::eval::eval(&o, &device)?;
    println!("{}", qtaylor::eval::markdown(&report));
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn cmd_train_classifier(a: &TrainClassifierArgs) -> Result<()> {
    let device = parse_device(&a.device)?;
    let opts = qtaylor::classifier::ClassifierTrainOptions {
        epochs: a.epochs,
        batch: a.batch,
        lr: a.lr,
        seed: a.seed,
        command: Some(format!(
            "qtaylor train-classifier --data {} --out {} --epochs {} --batch {} --lr {} --seed {} --device {}",
            a.data,
            a.out.display(),
            a.epochs,
            a.batch,
            a.lr,
            a.seed,
            a.device
        )),
    };
    let acc = qtaylor::classifier::train_and_save(&a.data, &a.out, &opts, &device)?;
    println!(
        "test accuracy {:.2} % on the {} test split; wrote {}",
        100.0 * acc,
        a.data,
        a.out.display()
    );
    Ok(())
}

fn cmd_samplers() {
    let c = samplers::catalog();
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

/// `mi_option_purge_delay` in mimalloc's `mi_option_t` (index 15 in both v2 and v3 headers;
/// libmimalloc-sys exports no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Never hand freed memory back to the OS: the next step's activations of the same sizes
    // then reuse it instead of faulting fresh pages in (BENCHMARKS.md §5.2: CPU training
    // 1.2× faster, sampling ≈ 8 %; the peak memory is the same).
    // SAFETY: sets a process-wide allocator option; mimalloc allows it at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // A closed pipe (`qtaylor samplers | head`) ends the process quietly, as for any Unix
    // tool, instead of a panic in println!.
    // SAFETY: restores the default disposition of one signal before any thread starts.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    qtaylor::kernels::set_tf32(cli.tf32);
    let result = match &cli.command {
        Command::Sample(a) => cmd_sample(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Tune(a) => cmd_tune(a),
        Command::Speed(a) => cmd_speed(a),
        Command::InitModel(a) => cmd_init_model(a),
        Command::Parity(a) => cmd_parity(a),
        Command::Train(a) => cmd_train(a),
        Command::TrainClassifier(a) => cmd_train_classifier(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Merge(a) => cmd_merge(a),
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

#[cfg(test)]
mod tests {
    use super::outside_share;

    #[test]
    fn the_time_outside_the_network_is_never_a_negative_share() {
        assert!(outside_share(0.123, "x").contains("12.3 %"));
        let s = outside_share(-0.05, "the network's");
        assert!(
            s.contains("below the timing noise") && s.contains("5.0 %"),
            "{s}"
        );
        assert!(!s.contains('-') || !s.contains("-5"), "{s}");
    }
}
