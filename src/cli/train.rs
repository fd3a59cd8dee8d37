//! `qtaylor train` and `qtaylor train-classifier`: their flags, parsed into the training
//! options of [`qtaylor::train`] and [`qtaylor::models::classifier`].

use std::path::PathBuf;

use anyhow::{Result, bail};
use candle_core::DType;
use clap::Args;
use qtaylor::train::{Objective, SigmaSampling};
use qtaylor::{bail_option, keys};

#[derive(Args)]
pub struct TrainArgs {
    /// mnist | fashion-mnist | a folder with train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]
    #[arg(long)]
    pub data: String,
    /// Checkpoint folder (config.json, diffusion_pytorch_model.safetensors with the EMA
    /// weights, scheduler_config.json, train_state.safetensors, train_log.csv)
    #[arg(long)]
    pub out: PathBuf,
    /// Total number of optimiser steps (a resumed run continues up to it)
    #[arg(long, default_value_t = 10_000)]
    pub steps: usize,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// AdamW learning rate (after a linear warm-up of --warmup steps)
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Decay of the exponential moving average of the weights (the saved model)
    #[arg(long, default_value_t = 0.999)]
    pub ema: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write a checkpoint every this many steps (and at the end)
    #[arg(long, default_value_t = 1000)]
    pub save_every: usize,
    /// Continue the run in this checkpoint folder (may be --out itself)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// The network's config.json [default: the MNIST UNet, channels 32/64/64]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Train on the first N images only
    #[arg(long)]
    pub limit: Option<usize>,
    /// dtype of the saved model weights: f32 | f16 (the training state stays f32)
    #[arg(long, default_value = "f32")]
    pub save_dtype: String,
    /// Stop with a checkpoint after this many seconds (continue later with --resume)
    #[arg(long)]
    pub max_seconds: Option<f64>,
    /// A class-conditional --config (num_class_embeds = classes + 1): the fraction of labels
    /// dropped to the null class (the last one) for classifier-free guidance [default: 0.1]
    #[arg(long)]
    pub label_dropout: Option<f64>,
    /// The loss: eps (DDPM's ε-prediction; a DDPMScheduler checkpoint) or flow (rectified
    /// flow, SD3-style: the velocity ε − x0 at x = (1 − σ) x0 + σ ε, timestep 1000σ; a
    /// FlowMatchEulerDiscreteScheduler checkpoint)
    #[arg(long, default_value = "eps", value_parser = ["eps", "flow"])]
    pub objective: String,
    /// With --objective flow: how each image's σ is drawn: uniform on (0, 1), or
    /// logit-normal (SD3's σ = sigmoid(z), z ~ N(0, 1)) [default: logit-normal]
    #[arg(long, value_parser = ["uniform", "logit-normal"])]
    pub sigma_sampling: Option<String>,
    /// cpu, cuda or cuda:N (GPU N)
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Data-parallel training, one replica per device (instead of --device): e.g.
    /// cuda:0,cuda:1 (gradients all-reduced with NCCL) or cpu,cpu. --batch is the global
    /// batch, split evenly over the devices; checkpoints are the one-device format, and
    /// --resume works with any number of devices
    #[arg(long, conflicts_with = "device")]
    pub devices: Option<String>,
}

#[derive(Args)]
pub struct TrainClassifierArgs {
    /// mnist | fashion-mnist | a folder with the train and t10k IDX files
    #[arg(long)]
    pub data: String,
    /// Output folder (model.safetensors, classifier.json)
    #[arg(long)]
    pub out: PathBuf,
    /// Passes over the training set
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Images per step
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Peak AdamW learning rate (cosine decay to 0)
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Seed of the initial weights and the batch order
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda or cuda:N (GPU N)
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The objective of `--objective` and `--sigma-sampling`.
fn objective(a: &TrainArgs) -> Result<Objective> {
    let sampling = match a.sigma_sampling.as_deref() {
        None | Some("logit-normal") => SigmaSampling::default(),
        Some("uniform") => SigmaSampling::Uniform,
        Some(other) => bail_option!(
            (keys::SIGMA_SAMPLING, other),
            ": expected uniform or logit-normal"
        ),
    };
    match (a.objective.as_str(), &a.sigma_sampling) {
        ("flow", _) => Ok(Objective::Flow(sampling)),
        ("eps", None) => Ok(Objective::Eps),
        ("eps", Some(s)) => bail_option!(
            (keys::SIGMA_SAMPLING, s),
            " applies to ",
            (keys::OBJECTIVE, "flow"),
            " only (this run's objective is eps)"
        ),
        (other, _) => bail_option!((keys::OBJECTIVE, other), ": expected eps or flow"),
    }
}

pub fn cmd_train(a: &TrainArgs) -> Result<()> {
    let objective = objective(a)?;
    let devices = match &a.devices {
        Some(list) => qtaylor::gpu::device::by_names(list)?,
        None => vec![qtaylor::gpu::device::by_name(&a.device)?],
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
    o.objective = objective;
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
        for line in qtaylor::gpu::profile::device_report(&device, &span, Some(("step", steps)))? {
            eprintln!("{line}");
        }
    }
    Ok(())
}

pub fn cmd_train_classifier(a: &TrainClassifierArgs) -> Result<()> {
    let device = qtaylor::gpu::device::by_name(&a.device)?;
    let opts = qtaylor::models::classifier::ClassifierTrainOptions {
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
    let acc = qtaylor::models::classifier::train_and_save(&a.data, &a.out, &opts, &device)?;
    println!(
        "test accuracy {:.2} % on the {} test split; wrote {}",
        100.0 * acc,
        a.data,
        a.out.display()
    );
    Ok(())
}
