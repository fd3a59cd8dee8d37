//! The `qtaylor` command line: a thin parser over the library. Each command's flags and the
//! few lines that turn them into the library's settings are in `cli/`; the work is the
//! library's (`sampling::sample::run`, `tune::run::run`, `measure::bench::run`, …), and every
//! error is printed with the library's option keys spelled as flags (`cli/spelling.rs`).

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc keeps freed memory for reuse: with the system allocator every large activation
/// is a fresh mmap, and page faults cost the CPU UNet 45 % of its time (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// CUDA: deterministic kernels, so that a sample's bits depend only on its seed, not on
    /// the run, its batch or its shard (src/gpu/determinism.rs; BENCHMARKS.md §14 for the
    /// cost). `--deterministic` is `--deterministic=on`. Default: the environment variable QTAYLOR_DETERMINISTIC
    /// (1 or 0), else off. No effect on the CPU, where this holds already
    #[arg(long, global = true, value_name = "on|off", num_args = 0..=1, require_equals = true, default_missing_value = "on", value_parser = parse_on_off)]
    deterministic: Option<bool>,
}

/// `--deterministic`'s value.
fn parse_on_off(v: &str) -> Result<bool, String> {
    qtaylor::gpu::determinism::parse(v)
        .filter(|_| !v.trim().is_empty())
        .ok_or_else(|| format!("expected on or off, not {v:?}"))
}

#[derive(Subcommand)]
enum Command {
    /// Draw samples with one sampler: from the class-conditional MNIST model embedded in the
    /// binary (default; writes a PNG grid; --classes all --guidance W for one row per digit),
    /// a diffusers checkpoint (--model; PNG) or an exact-score problem (--problem; .npy).
    Sample(Box<cli::sample::SampleArgs>),
    /// Error vs NFE of several samplers against a high-accuracy reference.
    Bench(cli::bench::BenchArgs),
    /// Find a time grid for one sampler, model and NFE so that its end points come close to
    /// a teacher's from the same noise (GITS-style dynamic programming over a fine candidate
    /// grid); writes a grid file for --grid-file and the Python scheduler.
    Tune(cli::tune::TuneArgs),
    /// List every sampler with its NFE per step.
    Samplers,
    /// Throughput of a checkpoint: one network forward, and a full sample with a sampler.
    Speed(cli::misc::SpeedArgs),
    /// Whether a network's output for one sample depends only on that sample on this device:
    /// every operation of a forward compared between two runs and between batch sizes, with
    /// the deterministic mode off and on, and the mode's cost per forward.
    Determinism(cli::misc::DeterminismArgs),
    /// Write a UNet2DModel checkpoint with random weights (PyTorch's default init) in the
    /// diffusers layout, for benchmarks: --preset cifar10-ddpm is google/ddpm-cifar10-32's
    /// architecture (35.7 M parameters).
    InitModel(cli::misc::InitArgs),
    /// Compare a fixture model's outputs with the diffusers reference stored next to it
    /// (reference.safetensors written by scripts/make-parity-fixtures.py).
    Parity(cli::misc::ParityArgs),
    /// Train a UNet2DModel (ε-prediction, 1000-step linear β) on an IDX image data set;
    /// writes resumable checkpoints in the diffusers layout.
    Train(cli::train::TrainArgs),
    /// Train the small CNN classifier whose 128-d features `eval` uses for MNIST-feature
    /// FID / KID / precision-recall (writes model.safetensors + classifier.json).
    TrainClassifier(cli::train::TrainClassifierArgs),
    /// Sample quality vs NFE of a trained 28×28 model: MNIST-feature FID (not comparable to
    /// Inception FID), KID, precision/recall and classifier confidence per sampler and NFE,
    /// with a 1000-step DDPM reference row; writes CSV, JSON, Markdown, a plot and grids.
    Eval(cli::eval::EvalArgs),
    /// Join the parts of a `sample`, `eval` or `bench` run with --shard I/N (the folders their
    /// --out named) into the output the unsharded run writes: the same .npy or PNG bytes; for
    /// eval and bench the results folder, computed from the merged per-sample results.
    Merge(cli::merge::MergeArgs),
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
    qtaylor::gpu::device::set_tf32(cli.tf32);
    if let Err(e) = qtaylor::gpu::determinism::configure(cli.deterministic) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let result = match &cli.command {
        Command::Sample(a) => cli::sample::cmd(a),
        Command::Bench(a) => cli::bench::cmd(a),
        Command::Tune(a) => cli::tune::cmd(a),
        Command::Speed(a) => cli::misc::cmd_speed(a),
        Command::Determinism(a) => cli::misc::cmd_determinism(a),
        Command::InitModel(a) => cli::misc::cmd_init_model(a),
        Command::Parity(a) => cli::misc::cmd_parity(a),
        Command::Train(a) => cli::train::cmd_train(a),
        Command::TrainClassifier(a) => cli::train::cmd_train_classifier(a),
        Command::Eval(a) => cli::eval::cmd_eval(a),
        Command::Merge(a) => cli::merge::cmd(a),
        Command::Samplers => {
            cli::misc::cmd_samplers();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::spelling::render(&e));
            ExitCode::FAILURE
        }
    }
}
