//! Training a diffusers `UNet2DModel` on an image data set.
//!
//! Objective: DDPM's simplified loss (Ho et al. 2020, Algorithm 1, ε-prediction): for an
//! image x0 of the data (scaled to [−1, 1]), a timestep n uniform in {0, …, T−1} and
//! ε ~ N(0, I), minimise `‖ε̂(√ᾱ_n·x0 + √(1−ᾱ_n)·ε, n) − ε‖²` (mean over pixels and batch),
//! with ᾱ_n of diffusers' linear β schedule (1e-4 … 0.02, T = 1000) in its float32 values.
//!
//! Or ([`Objective::Flow`]) the flow-matching loss of rectified flow (Liu et al. 2022,
//! "Flow Straight and Fast"; Esser et al. 2024, "Scaling Rectified Flow Transformers", the
//! SD3 paper, §2 and §3.1): for x0, a noise level σ ∈ (0, 1) and ε ~ N(0, I), the network
//! gets `x_σ = (1 − σ)·x0 + σ·ε` at the float timestep `1000·σ` (as diffusers'
//! `FlowMatchEulerDiscreteScheduler` passes `timesteps = σ·1000`) and minimises
//! `‖v̂(x_σ, 1000σ) − (ε − x0)‖²` (mean over pixels and batch): it predicts the velocity
//! `dx_σ/dσ = ε − x0`. σ is drawn per image ([`SigmaSampling`]): uniform on (0, 1), or SD3's
//! logit-normal `σ = sigmoid(m + s·z)`, z ~ N(0, 1) (§3.1, "lognorm(m, s)"; m = 0, s = 1 by
//! default). The uniform draw is rand's `Open01` (multiples of 2⁻⁵³ strictly inside (0, 1)),
//! so σ is never exactly 0 or 1; the logit-normal one is in (0, 1) in exact arithmetic and
//! rounds to an end in f64 only for |m + s·z| > 36 (never at m = 0, s = 1 in practice). No
//! clamp is applied: the loss is well defined at both ends (σ = 0: x_σ = x0 at timestep 0;
//! σ = 1: pure noise at timestep 1000), so such a draw is harmless. A flow checkpoint's
//! `scheduler_config.json` is [`FLOW_SCHEDULER_CONFIG`], which qtaylor loads as a flow model.
//!
//! Optimiser: AdamW as `torch.optim.AdamW` (Loshchilov & Hutter 2019; decoupled weight decay
//! `p ← p − lr·wd·p`, then `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `p ← p − lr·(m/(1−β1^k)) / (√(v/(1−β2^k)) + ε)`), with the gradient clipped to a global
//! norm of 1 and a linear learning-rate warm-up. The model that is saved is an exponential
//! moving average of the weights with diffusers' `EMAModel` warm-up decay
//! `min(decay, (1 + k)/(10 + k))` after update k.
//!
//! Exact resume: the images, timesteps (or σ) and noise of step k are functions of (seed, k) only
//! (the data order of epoch e is a shuffle seeded by (seed, e)), and the checkpoint holds the
//! weights, both Adam moments, the EMA and the step, so a run split into chunks (`--resume`)
//! computes what one uninterrupted run computes.
//!
//! A checkpoint folder is a diffusers checkpoint (`config.json`,
//! `diffusion_pytorch_model.safetensors` with the EMA weights, `scheduler_config.json`: what
//! `UNet2DModel.from_pretrained` and `DDPMScheduler.from_pretrained` (a flow run:
//! `FlowMatchEulerDiscreteScheduler.from_pretrained`) read) plus
//! `train_state.safetensors` (the optimiser state, with the run's settings in its metadata)
//! and `train_log.csv`. Every file is written atomically; a run that fails writes nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use qtaylor_core::keys;
use qtaylor_core::{bail_option, option_error};
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, Open01, StandardNormal, Uniform};
use serde::{Deserialize, Serialize};

use crate::gpu::profile::timed;
use crate::io::idx::{ImageSet, Split, load_image_set};
use crate::models::checkpoint::SchedulerConfig;
use crate::models::unet::{UNet2D, UNet2DConfig, Weights};
use crate::schedule::{diffusers_alphas_cumprod, diffusers_betas};
use crate::tensor::data_parallel::{Reducer, new_nccl_id, run_replicas};

/// The MNIST network: diffusers' `UNet2DModel` with channels (32, 64, 64), two resnets per
/// level, self-attention at the lowest resolution (7×7) and in the middle block.
pub const MNIST_UNET_CONFIG: &str = r#"{
  "_class_name": "UNet2DModel",
  "act_fn": "silu",
  "add_attention": true,
  "attention_head_dim": null,
  "block_out_channels": [32, 64, 64],
  "center_input_sample": false,
  "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 1,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 8,
  "out_channels": 1,
  "resnet_time_scale_shift": "default",
  "sample_size": 28,
  "time_embedding_type": "positional",
  "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]
}
"#;

/// The training schedule as a diffusers `DDPMScheduler` config (linear β, ε-prediction,
/// x̂0 clipped to [−1, 1] when sampling, as diffusers' default).
pub const TRAIN_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "DDPMScheduler",
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "beta_start": 0.0001,
  "clip_sample": true,
  "clip_sample_range": 1.0,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "steps_offset": 0,
  "timestep_spacing": "trailing",
  "trained_betas": null,
  "variance_type": "fixed_small"
}
"#;

/// The schedule of a flow run ([`Objective::Flow`]) as a diffusers
/// `FlowMatchEulerDiscreteScheduler` config: what diffusers 0.42 saves for
/// `FlowMatchEulerDiscreteScheduler(shift=1.0)` (less `_diffusers_version`). The network
/// predicts the velocity ε − x0 at timestep 1000·σ.
pub const FLOW_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "FlowMatchEulerDiscreteScheduler",
  "base_image_seq_len": 256,
  "base_shift": 0.5,
  "invert_sigmas": false,
  "max_image_seq_len": 4096,
  "max_shift": 1.15,
  "num_train_timesteps": 1000,
  "shift": 1.0,
  "shift_terminal": null,
  "stochastic_sampling": false,
  "time_shift_type": "exponential",
  "use_beta_sigmas": false,
  "use_dynamic_shifting": false,
  "use_exponential_sigmas": false,
  "use_karras_sigmas": false
}
"#;

/// The training objective.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// DDPM's ε-prediction loss on the linear β schedule ([`TRAIN_SCHEDULER_CONFIG`]).
    #[default]
    Eps,
    /// Rectified flow's velocity loss (SD3-style), σ drawn by the rule given
    /// ([`FLOW_SCHEDULER_CONFIG`]).
    Flow(SigmaSampling),
}

impl Objective {
    /// True for [`Objective::Flow`].
    pub fn is_flow(&self) -> bool {
        matches!(self, Objective::Flow(_))
    }
}

impl std::fmt::Display for Objective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Objective::Eps => f.write_str("eps"),
            Objective::Flow(SigmaSampling::Uniform) => f.write_str("flow (sigma uniform)"),
            Objective::Flow(SigmaSampling::LogitNormal { mean, std }) => {
                write!(f, "flow (sigma logit-normal, mean {mean}, std {std})")
            }
        }
    }
}

/// How a flow run draws each image's noise level σ ∈ (0, 1).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SigmaSampling {
    /// Uniform on (0, 1) (rectified flow, Liu et al. 2022).
    Uniform,
    /// `σ = sigmoid(mean + std·z)`, z ~ N(0, 1): SD3's logit-normal (Esser et al. 2024,
    /// §3.1), which weights the middle of the path; the default is mean 0, std 1.
    LogitNormal { mean: f64, std: f64 },
}

impl Default for SigmaSampling {
    /// Logit-normal with mean 0 and std 1 (SD3's choice).
    fn default() -> Self {
        SigmaSampling::LogitNormal {
            mean: 0.0,
            std: 1.0,
        }
    }
}

impl SigmaSampling {
    /// One draw of σ.
    fn sample(&self, rng: &mut ChaCha12Rng) -> f64 {
        match *self {
            SigmaSampling::Uniform => Open01.sample(rng),
            SigmaSampling::LogitNormal { mean, std } => {
                let z: f64 = StandardNormal.sample(rng);
                1.0 / (1.0 + (-(mean + std * z)).exp())
            }
        }
    }
}

/// What a training run does. `steps` is the total: a resumed run continues up to it.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// `mnist`, `fashion-mnist` or a folder with IDX files.
    pub data: String,
    /// The checkpoint folder written.
    pub out: PathBuf,
    /// A checkpoint folder to continue from (may be `out` itself).
    pub resume: Option<PathBuf>,
    /// `config.json` text of the network.
    pub config: String,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub ema: f64,
    pub weight_decay: f64,
    pub warmup: usize,
    pub seed: u64,
    /// Save a checkpoint every this many steps (and at the end).
    pub save_every: usize,
    /// Train on the first `limit` images only.
    pub limit: Option<usize>,
    /// dtype of `diffusion_pytorch_model.safetensors` (the optimiser state stays f32).
    pub save_dtype: DType,
    /// Stop (with a checkpoint) at the first step boundary after this many seconds, so a
    /// run fits a time-limited machine; `--resume` continues it exactly.
    pub max_seconds: Option<f64>,
    /// A class-conditional network (`num_class_embeds` = K in the config): the fraction of
    /// labels replaced by the null class K − 1 (classifier-free guidance's label dropout,
    /// Ho & Salimans 2022), so one model is conditional and unconditional. `None`: 0.1.
    pub label_dropout: Option<f64>,
    /// The loss: ε-prediction (the default) or flow matching.
    pub objective: Objective,
    pub progress: bool,
}

impl TrainOptions {
    /// The defaults of `qtaylor train` for a data set and an output folder.
    pub fn new(data: &str, out: &Path) -> Self {
        TrainOptions {
            data: data.to_string(),
            out: out.to_path_buf(),
            resume: None,
            config: MNIST_UNET_CONFIG.to_string(),
            steps: 10_000,
            batch: 128,
            lr: 1e-3,
            ema: 0.999,
            weight_decay: 0.0,
            warmup: 200,
            seed: 0,
            save_every: 1000,
            limit: None,
            save_dtype: DType::F32,
            max_seconds: None,
            label_dropout: None,
            objective: Objective::Eps,
            progress: false,
        }
    }
}

/// The settings a resumed run must share with the run it continues (stored in the
/// metadata of `train_state.safetensors`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct RunSettings {
    config: serde_json::Value,
    data: String,
    limit: Option<usize>,
    batch: usize,
    seed: u64,
    lr: f64,
    ema: f64,
    weight_decay: f64,
    warmup: usize,
    /// Label dropout of a class-conditional run (absent for an unconditional one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label_dropout: Option<f64>,
    /// The objective (absent for ε-prediction, as in folders written before flow runs).
    #[serde(default, skip_serializing_if = "is_eps")]
    objective: Objective,
}

fn is_eps(o: &Objective) -> bool {
    *o == Objective::Eps
}

impl RunSettings {
    /// `key: the folder's value vs this run's` for every setting that differs.
    fn differences(&self, asked: &RunSettings) -> Vec<String> {
        let a = serde_json::to_value(self).expect("serialisable");
        let b = serde_json::to_value(asked).expect("serialisable");
        let mut out = Vec::new();
        if self.objective != asked.objective {
            out.push(format!(
                "objective: {} in the folder, {} asked for",
                self.objective, asked.objective
            ));
        }
        for (k, va) in a.as_object().expect("object") {
            if k == "objective" {
                continue;
            }
            let vb = &b[k];
            if k == "config" {
                let (ca, cb) = (va.as_object(), vb.as_object());
                if let (Some(ca), Some(cb)) = (ca, cb) {
                    let mut keys: Vec<&String> = ca.keys().chain(cb.keys()).collect();
                    keys.sort();
                    keys.dedup();
                    for key in keys {
                        let (x, y) = (ca.get(key), cb.get(key));
                        if x != y && !key.starts_with('_') {
                            out.push(format!(
                                "config key '{key}': {} in the folder, {} asked for",
                                x.map_or("absent".into(), |v| v.to_string()),
                                y.map_or("absent".into(), |v| v.to_string())
                            ));
                        }
                    }
                    continue;
                }
            }
            if va != vb {
                out.push(format!("{k}: {va} in the folder, {vb} asked for"));
            }
        }
        out
    }
}

/// The trainable state: weights, Adam moments and the EMA, by parameter name.
/// The weights (one `Var` per tensor, for autograd) and the optimiser state. Both Adam
/// moments and the EMA are flat f32 vectors: the parameters laid end to end in the order of
/// `names`, so that one AdamW step is a handful of operations on 1.6 M numbers instead of
/// twenty per tensor (250 tensors); [`State::pieces`] cuts a flat vector back into tensors.
struct State {
    step: usize,
    names: Vec<String>,
    params: Vec<Var>,
    m: Tensor,
    v: Tensor,
    ema: Tensor,
}

/// Tensors laid end to end as one flat vector.
fn flatten(ts: &[Tensor]) -> Result<Tensor> {
    let flat: Vec<Tensor> = ts
        .iter()
        .map(|t| t.flatten_all())
        .collect::<candle_core::Result<_>>()?;
    Ok(Tensor::cat(&flat, 0)?)
}

impl State {
    /// `flat` cut into tensors of the parameters' shapes (views, no copies).
    fn pieces(&self, flat: &Tensor) -> Result<Vec<Tensor>> {
        let mut at = 0;
        self.params
            .iter()
            .map(|p| {
                let n = p.as_tensor().elem_count();
                let piece = flat.narrow(0, at, n)?.reshape(p.as_tensor().shape())?;
                at += n;
                Ok(piece)
            })
            .collect()
    }

    fn weights(&self, device: &Device) -> Weights {
        let map: HashMap<String, Tensor> = self
            .names
            .iter()
            .zip(&self.params)
            .map(|(n, p)| (n.clone(), p.as_tensor().clone()))
            .collect();
        Weights::from_tensors("<training weights>", map, DType::F32, device)
    }

    fn ema_weights(&self, device: &Device) -> Result<Weights> {
        let map: HashMap<String, Tensor> = self
            .names
            .iter()
            .cloned()
            .zip(self.pieces(&self.ema)?)
            .collect();
        Ok(Weights::from_tensors(
            "<EMA weights>",
            map,
            DType::F32,
            device,
        ))
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct TrainReport {
    pub start_step: usize,
    pub end_step: usize,
    /// Mean loss of the first and the last (up to) 100 steps of this run.
    pub first_loss: f64,
    pub last_loss: f64,
    pub seconds: f64,
    pub parameters: usize,
    /// Steps and seconds after the first [`WARM_UP_STEPS`] of this run (CUDA kernel
    /// compilation, cuDNN plans and memory-pool growth happen in those): the steady rate.
    pub steady: Option<(usize, f64)>,
}

/// Steps of a run left out of [`TrainReport::steady`] and of the `QTAYLOR_PROFILE` table.
pub const WARM_UP_STEPS: usize = 10;

const STATE_FILE: &str = "train_state.safetensors";
const LOG_FILE: &str = "train_log.csv";
const META_KEY: &str = "qtaylor.train";

/// A run's data and settings, checked before anything is written.
struct Prepared {
    config: UNet2DConfig,
    config_value: serde_json::Value,
    settings: RunSettings,
    data: ImageSet,
    alpha_bars: Vec<f64>,
}

fn prepare(opts: &TrainOptions) -> Result<Prepared> {
    if opts.batch == 0 || opts.steps == 0 || opts.save_every == 0 {
        bail_option!(
            keys::BATCH,
            ", ",
            keys::STEPS,
            " and ",
            keys::SAVE_EVERY,
            format!(
                " must be positive (got {}, {}, {})",
                opts.batch, opts.steps, opts.save_every
            )
        );
    }
    if !(opts.lr > 0.0 && opts.lr.is_finite()) {
        bail_option!((keys::LR, opts.lr), " must be a positive number");
    }
    if !(0.0..1.0).contains(&opts.ema) {
        bail_option!((keys::EMA, opts.ema), " must lie in [0, 1)");
    }
    if let Objective::Flow(SigmaSampling::LogitNormal { mean, std }) = opts.objective
        && !(mean.is_finite() && std.is_finite() && std > 0.0)
    {
        bail_option!(
            (keys::SIGMA_SAMPLING, "logit-normal"),
            format!(
                ": mean {mean} and std {std}; expected a finite mean and a positive, finite std"
            )
        );
    }
    let mut data = load_image_set(&opts.data, Split::Train)?;
    if let Some(n) = opts.limit {
        if n == 0 || n > data.n {
            bail_option!(
                (keys::LIMIT, n),
                format!(
                    ": the training set of '{}' has {} images",
                    opts.data, data.n
                )
            );
        }
        data.n = n;
        data.images.truncate(n * data.h * data.w);
        data.labels.truncate(n);
    }
    let mut value: serde_json::Value =
        serde_json::from_str(&opts.config).context("the network config is not valid JSON")?;
    let obj = value
        .as_object_mut()
        .context("the network config must be a JSON object")?;
    obj.insert("_class_name".into(), "UNet2DModel".into());
    obj.insert("sample_size".into(), data.h.into());
    let config = UNet2DConfig::from_json(&value.to_string(), Path::new("network config"))?;
    if config.in_channels != 1 || config.out_channels != 1 {
        bail!(
            "the network has in_channels {} and out_channels {}; grey-scale data needs 1 and 1",
            config.in_channels,
            config.out_channels
        );
    }
    let f = config.downsample_factor();
    if data.h != data.w || data.h % f != 0 {
        bail!(
            "'{}' holds {}x{} images; the network's {} downsamplings need square images with a side that is a multiple of {f}",
            opts.data,
            data.h,
            data.w,
            config.block_out_channels.len() - 1
        );
    }
    let label_dropout = match (config.num_class_embeds, opts.label_dropout) {
        (None, None) => None,
        (None, Some(_)) => bail_option!(
            keys::LABEL_DROPOUT,
            " does nothing: the network is not class-conditional (give a ",
            keys::CONFIG,
            " with num_class_embeds)"
        ),
        (Some(k), p) => {
            let p = p.unwrap_or(0.1);
            if !(0.0..=1.0).contains(&p) {
                bail_option!((keys::LABEL_DROPOUT, p), ": expected a fraction in [0, 1]");
            }
            if k < 2 {
                bail!(
                    "key 'num_class_embeds': {k}; a class-conditional run needs the classes plus the null class"
                );
            }
            if let Some(&bad) = data.labels.iter().find(|&&l| l as usize >= k - 1) {
                bail!(
                    "'{}' has label {bad}, but num_class_embeds = {k} leaves classes 0 to {} (class {} is the null class of label dropout)",
                    opts.data,
                    k - 2,
                    k - 1
                );
            }
            Some(p)
        }
    };
    let sch = SchedulerConfig::from_json(TRAIN_SCHEDULER_CONFIG, Path::new("scheduler"))?;
    let betas = diffusers_betas(
        &sch.beta_schedule,
        sch.beta_start,
        sch.beta_end,
        sch.num_train_timesteps,
    )?;
    let settings = RunSettings {
        config: value.clone(),
        data: opts.data.clone(),
        limit: opts.limit,
        batch: opts.batch,
        seed: opts.seed,
        lr: opts.lr,
        ema: opts.ema,
        weight_decay: opts.weight_decay,
        warmup: opts.warmup,
        label_dropout,
        objective: opts.objective,
    };
    Ok(Prepared {
        config,
        config_value: value,
        settings,
        data,
        alpha_bars: diffusers_alphas_cumprod(&betas),
    })
}

/// Fresh weights: PyTorch's default initialisation (see [`Weights::synthetic`]).
fn init_state(p: &Prepared, seed: u64, device: &Device) -> Result<State> {
    let w = Weights::synthetic(seed, DType::F32, &Device::Cpu);
    UNet2D::new(p.config.clone(), &w)?;
    let made: BTreeMap<String, Tensor> = w.synthetic_tensors().into_iter().collect();
    let mut names = Vec::new();
    let mut params = Vec::new();
    for (name, t) in made {
        params.push(Var::from_tensor(&t.to_device(device)?)?);
        names.push(name);
    }
    let ema = flatten(
        &params
            .iter()
            .map(|p| p.as_tensor().detach())
            .collect::<Vec<_>>(),
    )?;
    Ok(State {
        step: 0,
        names,
        params,
        m: ema.zeros_like()?,
        v: ema.zeros_like()?,
        ema,
    })
}

/// Reads `train_state.safetensors` of a folder and checks it continues this run.
fn load_state(dir: &Path, p: &Prepared, device: &Device) -> Result<State> {
    let file = dir.join(STATE_FILE);
    let resume = (keys::RESUME, dir.display().to_string());
    let bytes = std::fs::read(&file).map_err(|e| {
        option_error!(
            resume.clone(),
            format!(
                ": cannot read {} (is it a qtaylor training folder?)",
                file.display()
            )
        )
        .caused_by(e.into())
    })?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not a valid safetensors file (truncated or corrupt?): {e}",
            file.display()
        )
    })?;
    let meta_json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .with_context(|| format!("{}: no '{META_KEY}' metadata", file.display()))?;
    #[derive(Deserialize)]
    struct Meta {
        step: usize,
        settings: RunSettings,
    }
    let m: Meta = serde_json::from_str(meta_json)
        .with_context(|| format!("{}: malformed '{META_KEY}' metadata", file.display()))?;
    let diff = m.settings.differences(&p.settings);
    if !diff.is_empty() {
        bail_option!(
            resume,
            format!(
                ": the folder holds a run with other settings, so it cannot be continued:\n  {}",
                diff.join("\n  ")
            )
        );
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("{}: cannot read its tensors", file.display()))?;
    let fresh = init_state(p, 0, &Device::Cpu)?;
    let get = |kind: &str, name: &str, like: &Tensor| -> Result<Tensor> {
        let key = format!("{kind}/{name}");
        let t = tensors
            .get(&key)
            .with_context(|| format!("{}: tensor '{key}' is missing", file.display()))?;
        if t.dims() != like.dims() {
            bail!(
                "{}: tensor '{key}' has shape {:?}, expected {:?}",
                file.display(),
                t.dims(),
                like.dims()
            );
        }
        Ok(t.to_dtype(DType::F32)?.to_device(device)?)
    };
    let (mut params, mut ms, mut vs, mut emas) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (name, like) in fresh.names.iter().zip(&fresh.params) {
        let like = like.as_tensor();
        params.push(Var::from_tensor(&get("param", name, like)?)?);
        ms.push(get("adam_m", name, like)?);
        vs.push(get("adam_v", name, like)?);
        emas.push(get("ema", name, like)?);
    }
    Ok(State {
        step: m.step,
        names: fresh.names.clone(),
        params,
        m: flatten(&ms)?,
        v: flatten(&vs)?,
        ema: flatten(&emas)?,
    })
}

fn write_checkpoint(
    out: &Path,
    p: &Prepared,
    s: &State,
    log: &[(usize, f64, f64)],
    save_dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
    let mut state: Vec<(String, Tensor)> = Vec::with_capacity(4 * s.names.len());
    let mut model: Vec<(String, Tensor)> = Vec::with_capacity(s.names.len());
    let (m, v, ema) = (
        s.pieces(&cpu(&s.m)?)?,
        s.pieces(&cpu(&s.v)?)?,
        s.pieces(&cpu(&s.ema)?)?,
    );
    for (i, name) in s.names.iter().enumerate() {
        state.push((format!("param/{name}"), cpu(s.params[i].as_tensor())?));
        state.push((format!("adam_m/{name}"), m[i].contiguous()?));
        state.push((format!("adam_v/{name}"), v[i].contiguous()?));
        state.push((format!("ema/{name}"), ema[i].contiguous()?));
        model.push((name.clone(), ema[i].to_dtype(save_dtype)?.contiguous()?));
    }
    let meta = serde_json::json!({ "step": s.step, "settings": p.settings });
    let meta = HashMap::from([(META_KEY.to_string(), meta.to_string())]);
    let model_file = out.join("diffusion_pytorch_model.safetensors");
    crate::io::write_atomic_with(&model_file, |tmp| {
        safetensors::serialize_to_file(model.iter().map(|(n, t)| (n.as_str(), t)), None, tmp)
            .map_err(|e| anyhow::anyhow!("{e}"))
    })?;
    let mut cfg = p.config_value.clone();
    cfg["_class_name"] = "UNet2DModel".into();
    crate::io::write_atomic(
        &out.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    let scheduler = match p.settings.objective {
        Objective::Eps => TRAIN_SCHEDULER_CONFIG,
        Objective::Flow(_) => FLOW_SCHEDULER_CONFIG,
    };
    crate::io::write_atomic(&out.join("scheduler_config.json"), scheduler.as_bytes())?;
    let mut csv = String::from("step,loss,lr\n");
    for (k, loss, lr) in log {
        csv.push_str(&format!("{k},{loss:.6},{lr:.3e}\n"));
    }
    crate::io::write_atomic(&out.join(LOG_FILE), csv.as_bytes())?;
    crate::io::write_atomic_with(&out.join(STATE_FILE), |tmp| {
        safetensors::serialize_to_file(state.iter().map(|(n, t)| (n.as_str(), t)), Some(meta), tmp)
            .map_err(|e| anyhow::anyhow!("{e}"))
    })
}

/// The loss log of a folder up to `step` (rows `step,loss,lr`); empty when absent.
fn read_log(dir: &Path, step: usize) -> Vec<(usize, f64, f64)> {
    let Ok(text) = std::fs::read_to_string(dir.join(LOG_FILE)) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split(',');
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
            ))
        })
        .filter(|r: &(usize, f64, f64)| r.0 <= step)
        .collect()
}

/// A ChaCha stream for (seed, purpose, index).
fn stream(seed: u64, purpose: u64, index: u64) -> ChaCha12Rng {
    let mut r = ChaCha12Rng::seed_from_u64(seed ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    r.set_stream(index);
    r
}

/// The data order of epoch `e`: a Fisher–Yates shuffle seeded by (seed, e).
fn epoch_order(n: usize, seed: u64, e: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut rng = stream(seed, 1, e as u64);
    for i in (1..n).rev() {
        let j = Uniform::new_inclusive(0, i)
            .expect("valid range")
            .sample(&mut rng);
        order.swap(i, j);
    }
    order
}

/// Step `k`'s images from the data, seeded by (seed, k) only.
struct Batcher<'a> {
    data: &'a ImageSet,
    seed: u64,
    batch: usize,
    cached: Option<(usize, Vec<u32>)>,
}

impl Batcher<'_> {
    /// Step `k`'s images (flattened) and their labels.
    fn images(&mut self, k: usize) -> (Vec<f32>, Vec<u32>) {
        let d = self.data.h * self.data.w;
        let mut out = Vec::with_capacity(self.batch * d);
        let mut labels = Vec::with_capacity(self.batch);
        for j in 0..self.batch {
            let g = k * self.batch + j;
            let (e, pos) = (g / self.data.n, g % self.data.n);
            if self.cached.as_ref().is_none_or(|c| c.0 != e) {
                self.cached = Some((e, epoch_order(self.data.n, self.seed, e)));
            }
            let idx = self.cached.as_ref().expect("cached").1[pos] as usize;
            out.extend(self.data.image_f32(idx));
            labels.push(self.data.labels[idx] as u32);
        }
        (out, labels)
    }
}

/// One step's inputs: noisy images, timesteps, the target (the noise ε, or for a flow run
/// the velocity ε − x0) and, for a class-conditional network of `classes` = (K, dropout), the
/// labels with a fraction `dropout` replaced by the null class K − 1 (from their own stream
/// (seed, 3, k)).
struct StepBatch {
    xt: Tensor,
    ts: Vec<f64>,
    target: Tensor,
    labels: Option<Vec<u32>>,
}

/// Step `k`'s draws for the whole global batch, on the host.
struct Draws {
    /// The images, flattened, in [−1, 1].
    x0: Vec<f32>,
    labels: Option<Vec<u32>>,
    /// The network's timesteps: n, or 1000·σ for a flow run.
    ts: Vec<f64>,
    /// A flow run's noise levels σ (empty for ε-prediction).
    sigmas: Vec<f64>,
    /// ε ~ N(0, I), as `x0`.
    noise: Vec<f32>,
    /// Each row's (a, s) of `x_t = a·x0 + s·ε`.
    coef: Vec<(f32, f32)>,
    flow: bool,
}

/// The draws of step `k` (0-based), seeded by (seed, k) only: the images, then from the
/// stream (seed, 2, k) each image's timestep (ε-prediction) or σ (flow), then the noise.
fn draw(
    b: &mut Batcher,
    objective: Objective,
    alpha_bars: &[f64],
    k: usize,
    classes: Option<(usize, f64)>,
) -> Draws {
    let (x0, labels) = b.images(k);
    let labels = classes.map(|(n, p)| {
        let mut rng = stream(b.seed, 3, k as u64);
        labels
            .into_iter()
            .map(|l| {
                let u: f64 = rand_distr::StandardUniform.sample(&mut rng);
                if u < p { n as u32 - 1 } else { l }
            })
            .collect()
    });
    let mut rng = stream(b.seed, 2, k as u64);
    let (ts, sigmas, coef) = match objective {
        Objective::Eps => {
            let steps = Uniform::new(0, alpha_bars.len()).expect("non-empty schedule");
            let ns: Vec<usize> = (0..b.batch).map(|_| steps.sample(&mut rng)).collect();
            let coef = ns
                .iter()
                .map(|&n| {
                    (
                        alpha_bars[n].sqrt() as f32,
                        (1.0 - alpha_bars[n]).sqrt() as f32,
                    )
                })
                .collect();
            (ns.iter().map(|&n| n as f64).collect(), Vec::new(), coef)
        }
        Objective::Flow(rule) => {
            let sigmas: Vec<f64> = (0..b.batch).map(|_| rule.sample(&mut rng)).collect();
            let coef = sigmas
                .iter()
                .map(|&s| ((1.0 - s) as f32, s as f32))
                .collect();
            (sigmas.iter().map(|&s| 1000.0 * s).collect(), sigmas, coef)
        }
    };
    let noise: Vec<f32> = (0..x0.len())
        .map(|_| {
            let v: f32 = StandardNormal.sample(&mut rng);
            v
        })
        .collect();
    Draws {
        x0,
        labels,
        ts,
        sigmas,
        noise,
        coef,
        flow: objective.is_flow(),
    }
}

/// Step `k`'s batch. Only `rows` of the global batch are kept (a data-parallel replica's
/// slice); the draws are those of the whole batch, so the slices of R replicas together are
/// the one-device batch.
fn make_batch(
    b: &mut Batcher,
    objective: Objective,
    alpha_bars: &[f64],
    k: usize,
    classes: Option<(usize, f64)>,
    rows: std::ops::Range<usize>,
    device: &Device,
) -> Result<StepBatch> {
    let (h, w) = (b.data.h, b.data.w);
    let dr = draw(b, objective, alpha_bars, k, classes);
    let d = h * w;
    let mut xt = Vec::with_capacity(rows.len() * d);
    for j in rows.clone() {
        let (a, s) = dr.coef[j];
        for i in j * d..(j + 1) * d {
            xt.push(a * dr.x0[i] + s * dr.noise[i]);
        }
    }
    let span = rows.start * d..rows.end * d;
    let target = if dr.flow {
        dr.noise[span.clone()]
            .iter()
            .zip(&dr.x0[span])
            .map(|(e, x)| e - x)
            .collect()
    } else {
        dr.noise[span].to_vec()
    };
    let shape = (rows.len(), 1, h, w);
    Ok(StepBatch {
        xt: Tensor::from_vec(xt, shape, device)?,
        ts: dr.ts[rows.clone()].to_vec(),
        target: Tensor::from_vec(target, shape, device)?,
        labels: dr.labels.map(|l| l[rows].to_vec()),
    })
}

/// Step `k`'s (0-based) whole batch of a run as training draws it, on the host: a hook for
/// tests, not a stable interface.
#[doc(hidden)]
#[derive(Clone, Debug)]
pub struct DrawnBatch {
    /// Images (rows of h·w), noise, network input and target, all flattened alike.
    pub x0: Vec<f32>,
    pub noise: Vec<f32>,
    pub input: Vec<f32>,
    pub target: Vec<f32>,
    /// Each image's network timestep, and for a flow run its σ (else empty).
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f64>,
}

/// See [`DrawnBatch`].
#[doc(hidden)]
pub fn drawn_batch(opts: &TrainOptions, k: usize) -> Result<DrawnBatch> {
    let p = prepare(opts)?;
    let batcher = || Batcher {
        data: &p.data,
        seed: opts.seed,
        batch: opts.batch,
        cached: None,
    };
    let dr = draw(&mut batcher(), opts.objective, &p.alpha_bars, k, None);
    let sb = make_batch(
        &mut batcher(),
        opts.objective,
        &p.alpha_bars,
        k,
        None,
        0..opts.batch,
        &Device::Cpu,
    )?;
    Ok(DrawnBatch {
        x0: dr.x0,
        noise: dr.noise,
        input: sb.xt.flatten_all()?.to_vec1()?,
        target: sb.target.flatten_all()?.to_vec1()?,
        timesteps: sb.ts,
        sigmas: dr.sigmas,
    })
}

/// The learning rate of step `k` (1-based): linear warm-up to `lr` over `warmup` steps.
fn lr_at(opts: &TrainOptions, k: usize) -> f64 {
    if opts.warmup == 0 {
        opts.lr
    } else {
        opts.lr * (k as f64 / opts.warmup as f64).min(1.0)
    }
}

/// One AdamW step with global-norm gradient clipping (max norm 1) and the EMA update.
/// Returns the loss. With R replicas ([`crate::tensor::data_parallel`]) this replica computes the
/// loss and gradient of its slice of the batch, and the step uses their mean over replicas.
fn train_step(
    s: &mut State,
    p: &Prepared,
    b: &mut Batcher,
    opts: &TrainOptions,
    reducer: &Reducer,
    device: &Device,
) -> Result<f64> {
    let k = s.step + 1;
    let classes = p.config.num_class_embeds.zip(p.settings.label_dropout);
    let (world, parallel) = (reducer.world(), !matches!(reducer, Reducer::One));
    let part = opts.batch / world;
    let rows = reducer.rank() * part..(reducer.rank() + 1) * part;
    let sb = timed("train: batch (host draws, upload)", device, || {
        make_batch(
            b,
            p.settings.objective,
            &p.alpha_bars,
            s.step,
            classes,
            rows,
            device,
        )
    })?;
    let loss = timed("train: forward and loss", device, || {
        let net = UNet2D::new(p.config.clone(), &s.weights(device))?;
        let pred = net.forward_labels(&sb.xt, &sb.ts, sb.labels.as_deref())?;
        Ok((pred - &sb.target)?.sqr()?.mean_all()?)
    })?;
    let nan = |loss_value: f64| {
        anyhow::Error::new(option_error!(
            format!(
                "the loss became {loss_value} at step {k}; nothing of this run after the last checkpoint was saved (try a smaller "
            ),
            keys::LR,
            ")"
        ))
    };
    let mut loss_value = 0.0;
    if !parallel {
        loss_value = f64::from(loss.to_scalar::<f32>()?);
        if !loss_value.is_finite() {
            return Err(nan(loss_value));
        }
    }
    let grads = timed("train: backward", device, || Ok(loss.backward()?))?;
    crate::gpu::profile::profile_backward_done(device)?;
    let optimizer = crate::gpu::profile::profile_start("train: norm, clip, AdamW, EMA", device)?;
    let g: Vec<Tensor> = s
        .params
        .iter()
        .map(|var| match grads.get(var.as_tensor()) {
            // Detached: a gradient that still carried its graph would chain every step's
            // activations into the moments (a leak of one step's graph per step).
            Some(t) => Ok(t.detach()),
            None => var.as_tensor().zeros_like(),
        })
        .collect::<candle_core::Result<_>>()?;
    let mut g = flatten(&g)?;
    if parallel {
        // The mean over replicas of (gradient, loss): one all-reduce of both.
        let n = g.elem_count();
        let both = Tensor::cat(&[&g, &loss.detach().reshape(1)?], 0)?;
        let sum = timed("train: all-reduce", device, || reducer.sum(&both))?;
        let sum = (sum / world as f64)?;
        loss_value = f64::from(sum.narrow(0, n, 1)?.to_vec1::<f32>()?[0]);
        if !loss_value.is_finite() {
            return Err(nan(loss_value));
        }
        g = sum.narrow(0, 0, n)?;
    }
    // Clipping to a global norm of 1 on the device (no read-back): the factor is
    // 1/(‖g‖ + 1e-6) where ‖g‖ > 1, else 1.
    let norm = g.sqr()?.sum_all()?.sqrt()?;
    let one = Tensor::ones((), DType::F32, device)?;
    let clip = norm.gt(1.0)?.where_cond(&(norm + 1e-6)?.recip()?, &one)?;
    let g = g.broadcast_mul(&clip)?;
    let lr = lr_at(opts, k);
    let (b1, b2, eps_adam) = (0.9f64, 0.999f64, 1e-8f64);
    let (c1, c2) = (1.0 - b1.powi(k as i32), 1.0 - b2.powi(k as i32));
    let decay = opts.ema.min((1.0 + k as f64) / (10.0 + k as f64));
    s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
    s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
    let p_old = flatten(
        &s.params
            .iter()
            .map(|p| p.as_tensor().detach())
            .collect::<Vec<_>>(),
    )?;
    let p_decayed = (&p_old * (1.0 - lr * opts.weight_decay))?;
    let update = ((&s.m / c1)? / ((&s.v / c2)?.sqrt()? + eps_adam)?)?;
    let p_new = (p_decayed - (update * lr)?)?;
    s.ema = ((&s.ema * decay)? + (&p_new * (1.0 - decay))?)?;
    for (var, piece) in s.params.iter().zip(s.pieces(&p_new)?) {
        var.set(&piece)?;
    }
    crate::gpu::profile::profile_end(optimizer, device)?;
    s.step = k;
    Ok(loss_value)
}

/// Trains (or continues training) a UNet on `opts.data` and writes checkpoints to
/// `opts.out`. Everything is checked before the first file is written.
pub fn train(opts: &TrainOptions, device: &Device) -> Result<TrainReport> {
    let p = prepare(opts)?;
    check_out(opts)?;
    run_replica(&p, opts, &Reducer::One, device)
}

/// [`train`] with one replica per device, data parallel ([`crate::tensor::data_parallel`]): the global
/// batch `opts.batch` is split evenly over the devices and the replicas' gradients are
/// averaged (NCCL on GPUs). Replica 0 writes the checkpoints, in the one-device format; a run
/// may be resumed on any number of devices. One device takes the same path (a communicator
/// of one), which is how a one-GPU machine runs the NCCL code.
pub fn train_on(opts: &TrainOptions, devices: &[Device]) -> Result<TrainReport> {
    let world = devices.len();
    if world == 0 {
        bail_option!(keys::DEVICES, ": no device given");
    }
    if world > 1 {
        if !opts.batch.is_multiple_of(world) {
            bail_option!(
                (keys::BATCH, opts.batch),
                format!(": a data-parallel run splits the batch evenly over its {world} "),
                keys::DEVICES,
                format!("; give a multiple of {world}")
            );
        }
        let cpu = devices.iter().filter(|d| d.is_cpu()).count();
        if cpu != 0 && cpu != world {
            bail_option!(
                keys::DEVICES,
                ": the replicas must all be CPUs or all GPUs, not a mix"
            );
        }
    }
    let p = prepare(opts)?;
    check_out(opts)?;
    let id = new_nccl_id(devices)?;
    run_replicas(devices, |rank, device, group| {
        let reducer = Reducer::new(group, rank, device, id)?;
        run_replica(&p, opts, &reducer, device)
    })
}

/// Refuses an `--out` that holds another run (one that `--resume` does not continue).
fn check_out(opts: &TrainOptions) -> Result<()> {
    let out_state = opts.out.join(STATE_FILE);
    let resuming_here = opts.resume.as_ref().is_some_and(|r| same_dir(r, &opts.out));
    if out_state.exists() && !resuming_here {
        bail_option!(
            format!(
                "{} already holds a training run; continue it with ",
                opts.out.display()
            ),
            (keys::RESUME, opts.out.display().to_string()),
            " or choose another ",
            keys::OUT,
            " (nothing was written)"
        );
    }
    Ok(())
}

/// One replica's run (all of it when there is one device): rank 0 reports progress and
/// writes the checkpoints.
fn run_replica(
    p: &Prepared,
    opts: &TrainOptions,
    reducer: &Reducer,
    device: &Device,
) -> Result<TrainReport> {
    let lead = reducer.rank() == 0;
    let mut s = match &opts.resume {
        Some(dir) => load_state(dir, p, device)?,
        None => init_state(p, opts.seed, device)?,
    };
    if s.step >= opts.steps {
        bail_option!(
            (
                keys::RESUME,
                opts.resume
                    .as_ref()
                    .map_or(String::new(), |d| d.display().to_string())
            ),
            format!(": the run is at step {}, ", s.step),
            (keys::STEPS, opts.steps),
            " asks for no more (nothing was written)"
        );
    }
    let mut log = match &opts.resume {
        Some(dir) => read_log(dir, s.step),
        None => Vec::new(),
    };
    let start_step = s.step;
    let parameters = s.params.iter().map(|v| v.as_tensor().elem_count()).sum();
    let mut batcher = Batcher {
        data: &p.data,
        seed: opts.seed,
        batch: opts.batch,
        cached: None,
    };
    let bar = if opts.progress && lead {
        crate::io::progress::Progress::new(
            "train",
            "step",
            (opts.steps - start_step) as u64,
            "train {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
        )
    } else {
        crate::io::progress::Progress::hidden()
    };
    let started = Instant::now();
    let mut steady_start = None;
    let mut losses = Vec::new();
    while s.step < opts.steps {
        if s.step - start_step == WARM_UP_STEPS {
            crate::gpu::profile::profile_reset()?;
            steady_start = Some((s.step, Instant::now()));
        }
        let loss = train_step(&mut s, p, &mut batcher, opts, reducer, device)?;
        losses.push(loss);
        log.push((s.step, loss, lr_at(opts, s.step)));
        let recent = &losses[losses.len().saturating_sub(100)..];
        bar.set_message(format!(
            "step {} loss {:.4} (mean of last {}: {:.4})",
            s.step,
            loss,
            recent.len(),
            recent.iter().sum::<f64>() / recent.len() as f64
        ));
        bar.inc(1);
        // Replica 0's clock decides for all.
        let out_of_time = match opts.max_seconds {
            Some(m) => reducer.any(lead && started.elapsed().as_secs_f64() >= m)?,
            None => false,
        };
        if lead && (s.step % opts.save_every == 0 || s.step == opts.steps || out_of_time) {
            write_checkpoint(&opts.out, p, &s, &log, opts.save_dtype)?;
        }
        if out_of_time {
            break;
        }
    }
    bar.finish();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let n = losses.len().min(100);
    Ok(TrainReport {
        start_step,
        end_step: s.step,
        first_loss: mean(&losses[..n]),
        last_loss: mean(&losses[losses.len() - n..]),
        seconds: started.elapsed().as_secs_f64(),
        parameters,
        steady: steady_start.map(|(k, t)| (s.step - k, t.elapsed().as_secs_f64())),
    })
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// The EMA network of a training folder's state, for tests and evaluation in memory.
pub fn load_ema_unet(dir: &Path, opts: &TrainOptions, device: &Device) -> Result<UNet2D> {
    let p = prepare(opts)?;
    let s = load_state(dir, &p, device)?;
    UNet2D::new(p.config.clone(), &s.ema_weights(device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_visits_each_image_once_in_a_seeded_order() {
        let a = epoch_order(50, 3, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<u32>>());
        assert_eq!(a, epoch_order(50, 3, 0));
        assert_ne!(a, epoch_order(50, 3, 1));
        assert_ne!(a, epoch_order(50, 4, 0));
    }

    #[test]
    fn optimizer_state_carries_no_autograd_graph_between_steps() {
        // Regression: gradients of the 3×3 convolutions carried their graph, and the AdamW
        // moments chained every step's activations (OOM on the GPU after ~30 steps).
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data");
        std::fs::create_dir_all(&d).unwrap();
        let n = 8usize;
        let mut b = vec![0, 0, 8, 3];
        for v in [n as u32, 8, 8] {
            b.extend(v.to_be_bytes());
        }
        b.extend((0..n * 64).map(|i| (i * 37 % 256) as u8));
        std::fs::write(d.join("train-images-idx3-ubyte"), b).unwrap();
        let mut l = vec![0, 0, 8, 1];
        l.extend((n as u32).to_be_bytes());
        l.extend(vec![0u8; n]);
        std::fs::write(d.join("train-labels-idx1-ubyte"), l).unwrap();
        let mut o = TrainOptions::new(d.to_str().unwrap(), &dir.path().join("out"));
        o.config = r#"{"block_out_channels": [8, 16], "layers_per_block": 1,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
            "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4,
            "attention_head_dim": null, "in_channels": 1, "out_channels": 1}"#
            .into();
        o.batch = 4;
        let dev = Device::Cpu;
        let p = prepare(&o).unwrap();
        let mut s = init_state(&p, 0, &dev).unwrap();
        let mut batcher = Batcher {
            data: &p.data,
            seed: 0,
            batch: o.batch,
            cached: None,
        };
        for _ in 0..2 {
            train_step(&mut s, &p, &mut batcher, &o, &Reducer::One, &dev).unwrap();
        }
        for t in [&s.m, &s.v, &s.ema] {
            assert!(
                !t.track_op(),
                "optimizer state of shape {:?} holds a graph",
                t.shape()
            );
        }
    }

    #[test]
    fn the_replicas_slices_of_a_step_make_up_the_one_device_batch() {
        let data = ImageSet {
            n: 40,
            h: 4,
            w: 4,
            images: (0..40 * 16).map(|i| (i * 37 % 256) as u8).collect(),
            labels: (0..40).map(|i| (i % 3) as u8).collect(),
        };
        let betas = diffusers_betas("linear", 1e-4, 0.02, 1000).unwrap();
        let abars = diffusers_alphas_cumprod(&betas);
        let dev = Device::Cpu;
        let batcher = || Batcher {
            data: &data,
            seed: 3,
            batch: 12,
            cached: None,
        };
        let classes = Some((4, 0.3));
        let objectives = [
            Objective::Eps,
            Objective::Flow(SigmaSampling::Uniform),
            Objective::Flow(SigmaSampling::default()),
        ];
        for (o, k) in objectives.into_iter().flat_map(|o| [(o, 0usize), (o, 5)]) {
            let batch = |rows| make_batch(&mut batcher(), o, &abars, k, classes, rows, &dev);
            let whole = batch(0..12).unwrap();
            let parts: Vec<StepBatch> = [0..4, 4..8, 8..12]
                .into_iter()
                .map(|rows| batch(rows).unwrap())
                .collect();
            let cat = |f: &dyn Fn(&StepBatch) -> &Tensor| {
                Tensor::cat(&parts.iter().map(f).collect::<Vec<_>>(), 0).unwrap()
            };
            let same = |a: &Tensor, b: &Tensor| {
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            assert!(same(&whole.xt, &cat(&|b| &b.xt)), "{o}, step {k}: x_t");
            assert!(
                same(&whole.target, &cat(&|b| &b.target)),
                "{o}, step {k}: target"
            );
            let ts: Vec<f64> = parts.iter().flat_map(|b| b.ts.clone()).collect();
            assert_eq!(whole.ts, ts, "step {k}: timesteps");
            let labels: Vec<u32> = parts
                .iter()
                .flat_map(|b| b.labels.clone().unwrap())
                .collect();
            assert_eq!(whole.labels.unwrap(), labels, "step {k}: labels");
            // The slices differ from one another: each replica sees its own images.
            assert!(!same(&parts[0].xt, &parts[1].xt));
        }
    }

    #[test]
    fn an_eps_batch_draws_what_it_drew_before_flow_runs() {
        // The ε-prediction draws are unchanged: timesteps then noise from stream (seed, 2, k).
        let data = ImageSet {
            n: 10,
            h: 4,
            w: 4,
            images: (0..10 * 16).map(|i| (i * 53 % 256) as u8).collect(),
            labels: vec![0; 10],
        };
        let abars = diffusers_alphas_cumprod(&diffusers_betas("linear", 1e-4, 0.02, 1000).unwrap());
        let mut b = Batcher {
            data: &data,
            seed: 7,
            batch: 3,
            cached: None,
        };
        let (x0, _) = b.images(2);
        let sb = make_batch(&mut b, Objective::Eps, &abars, 2, None, 0..3, &Device::Cpu).unwrap();
        let mut rng = stream(7, 2, 2);
        let steps = Uniform::new(0, 1000).unwrap();
        let ns: Vec<usize> = (0..3).map(|_| steps.sample(&mut rng)).collect();
        let eps: Vec<f32> = (0..48).map(|_| StandardNormal.sample(&mut rng)).collect();
        assert_eq!(sb.ts, ns.iter().map(|&n| n as f64).collect::<Vec<_>>());
        assert_eq!(
            sb.target.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            eps
        );
        let xt: Vec<f32> = (0..48)
            .map(|i| {
                let n = ns[i / 16];
                abars[n].sqrt() as f32 * x0[i] + (1.0 - abars[n]).sqrt() as f32 * eps[i]
            })
            .collect();
        assert_eq!(sb.xt.flatten_all().unwrap().to_vec1::<f32>().unwrap(), xt);
    }

    #[test]
    fn the_flow_scheduler_config_loads_as_a_flow_model() {
        let c = SchedulerConfig::from_json(FLOW_SCHEDULER_CONFIG, Path::new("flow")).unwrap();
        assert!(c.is_flow());
        assert_eq!((c.shift, c.num_train_timesteps), (Some(1.0), 1000));
        c.any_schedule(Path::new("flow")).unwrap();
    }

    #[test]
    fn run_settings_without_an_objective_read_as_eps_and_a_change_of_objective_is_named() {
        let settings = |objective| RunSettings {
            config: serde_json::json!({}),
            data: "d".into(),
            limit: None,
            batch: 4,
            seed: 0,
            lr: 1e-3,
            ema: 0.9,
            weight_decay: 0.0,
            warmup: 0,
            label_dropout: None,
            objective,
        };
        let eps = settings(Objective::Eps);
        let text = serde_json::to_string(&eps).unwrap();
        assert!(!text.contains("objective"), "{text}");
        let read: RunSettings = serde_json::from_str(&text).unwrap();
        assert_eq!(read, eps);
        let flow = settings(Objective::Flow(SigmaSampling::default()));
        let back: RunSettings =
            serde_json::from_str(&serde_json::to_string(&flow).unwrap()).unwrap();
        assert_eq!(back, flow);
        assert_eq!(
            flow.differences(&eps),
            ["objective: flow (sigma logit-normal, mean 0, std 1) in the folder, eps asked for"]
        );
        assert_eq!(
            eps.differences(&settings(Objective::Flow(SigmaSampling::Uniform))),
            ["objective: eps in the folder, flow (sigma uniform) asked for"]
        );
        assert!(flow.differences(&back).is_empty());
    }

    #[test]
    fn learning_rate_warms_up_linearly_then_stays() {
        let mut o = TrainOptions::new("mnist", Path::new("x"));
        o.lr = 1e-3;
        o.warmup = 10;
        assert!((lr_at(&o, 5) - 5e-4).abs() < 1e-15);
        assert_eq!(lr_at(&o, 10), 1e-3);
        assert_eq!(lr_at(&o, 1000), 1e-3);
    }
}
