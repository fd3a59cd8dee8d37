//! diffusers checkpoints on disk: a folder with `unet/config.json`,
//! `unet/diffusion_pytorch_model.safetensors` and `scheduler/scheduler_config.json` (a saved
//! pipeline), or the same files flat in one folder. Loads the UNet, maps the scheduler
//! config onto a discrete schedule and a parameterization, and exposes the network as a
//! [`Model`] on continuous time (the network gets the float timestep `n = t·T − 1`).
//!
//! A `FlowMatchEulerDiscreteScheduler` config is a rectified-flow model ([`Flow`] with its
//! `shift`, the flow-velocity prediction): the network gets the flow state
//! `(1 − ς) x0 + ς ε` (the VP state times [`Schedule::state_scale`]) at timestep `1000 ς`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::models::model::{Model, Parameterization, to_eps_x0};
use crate::models::unet::{UNet2D, UNet2DConfig, Weights};
use crate::schedule::{Flow, Schedule, Tabulated, diffusers_alphas_cumprod, diffusers_betas};

fn d_steps() -> usize {
    1000
}
fn d_start() -> f64 {
    1e-4
}
fn d_end() -> f64 {
    0.02
}
fn d_linear() -> String {
    "linear".into()
}
fn d_eps() -> String {
    "epsilon".into()
}
fn d_range() -> f64 {
    1.0
}
fn d_fixed_small() -> String {
    "fixed_small".into()
}
fn d_leading() -> String {
    "leading".into()
}

/// The fields of a diffusers `scheduler_config.json` that define the model's diffusion.
#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    /// The scheduler class (`DDPMScheduler`, …, `FlowMatchEulerDiscreteScheduler`).
    #[serde(default, rename = "_class_name")]
    pub class_name: Option<String>,
    /// Flow: the static time shift (`FlowMatchEulerDiscreteScheduler`'s `shift`).
    #[serde(default)]
    pub shift: Option<f64>,
    /// Flow keys qtaylor's checkpoint loader does not take (refused when set).
    #[serde(default)]
    pub use_dynamic_shifting: bool,
    #[serde(default)]
    pub invert_sigmas: bool,
    #[serde(default)]
    pub stochastic_sampling: bool,
    #[serde(default)]
    pub shift_terminal: Option<f64>,
    #[serde(default)]
    pub use_flow_sigmas: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    #[serde(default)]
    pub use_beta_sigmas: bool,
    #[serde(default = "d_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_start")]
    pub beta_start: f64,
    #[serde(default = "d_end")]
    pub beta_end: f64,
    #[serde(default = "d_linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "d_eps")]
    pub prediction_type: String,
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default = "d_range")]
    pub clip_sample_range: f64,
    #[serde(default = "d_fixed_small")]
    pub variance_type: String,
    #[serde(default = "d_leading")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

impl SchedulerConfig {
    /// Parses and checks a `scheduler_config.json`; `file` names it in errors.
    pub fn from_json(text: &str, file: &Path) -> Result<Self> {
        let mut c: SchedulerConfig = serde_json::from_str(text)
            .with_context(|| format!("{}: malformed scheduler config", file.display()))?;
        if c.is_flow() {
            // FlowMatchEulerDiscreteScheduler has no prediction_type: its network predicts
            // the velocity
            c.prediction_type = "flow_prediction".into();
            for (key, on) in [
                ("use_dynamic_shifting", c.use_dynamic_shifting),
                ("invert_sigmas", c.invert_sigmas),
                ("stochastic_sampling", c.stochastic_sampling),
                ("shift_terminal", c.shift_terminal.is_some_and(|v| v != 0.0)),
                ("use_karras_sigmas", c.use_karras_sigmas),
                ("use_exponential_sigmas", c.use_exponential_sigmas),
                ("use_beta_sigmas", c.use_beta_sigmas),
            ] {
                if on {
                    bail!(
                        "{}: key '{key}' is set; qtaylor's command line samples flow checkpoints with a static shift and its own grids (--grid, --sigmas, a grid file) only (use the Python QTaylorScheduler, which takes diffusers' flow keys, or set it off)",
                        file.display()
                    );
                }
            }
            let shift = c.shift.unwrap_or(1.0);
            Flow::new(shift).with_context(|| format!("{}: key 'shift'", file.display()))?;
        } else if c.use_flow_sigmas
            || c.prediction_type.parse::<Parameterization>().ok() == Some(Parameterization::Flow)
        {
            bail!(
                "{}: a flow config of {} (use_flow_sigmas / flow_prediction) is not loaded by the command line; save the model with a FlowMatchEulerDiscreteScheduler config",
                file.display(),
                c.class_name.as_deref().unwrap_or("an unnamed scheduler")
            );
        } else if let Some(name) = c
            .class_name
            .as_deref()
            .filter(|n| n.starts_with("FlowMatch"))
        {
            bail!(
                "{}: '_class_name' {name} is not loaded; qtaylor loads FlowMatchEulerDiscreteScheduler configs",
                file.display()
            );
        }
        let bad = |key: &str, v: &str, want: &str| {
            anyhow::anyhow!(
                "{}: key '{key}': '{v}' is not supported; expected {want}",
                file.display()
            )
        };
        c.prediction_type.parse::<Parameterization>().map_err(|_| {
            bad(
                "prediction_type",
                &c.prediction_type,
                "epsilon, sample, v_prediction or flow_prediction",
            )
        })?;
        if !matches!(
            c.variance_type.as_str(),
            "fixed_small"
                | "fixed_small_log"
                | "fixed_large"
                | "fixed_large_log"
                | "learned"
                | "learned_range"
        ) {
            return Err(bad(
                "variance_type",
                &c.variance_type,
                "fixed_small, fixed_large, learned or learned_range",
            ));
        }
        let max = crate::schedule::MAX_TRAIN_TIMESTEPS;
        if c.num_train_timesteps < 2 || c.num_train_timesteps > max {
            bail!(
                "{}: key 'num_train_timesteps': {} is outside [2, {max}] (the stated limit)",
                file.display(),
                c.num_train_timesteps
            );
        }
        if c.clip_sample_range.is_nan() || c.clip_sample_range <= 0.0 {
            bail!(
                "{}: key 'clip_sample_range': {} must be positive",
                file.display(),
                c.clip_sample_range
            );
        }
        Ok(c)
    }

    /// True for a rectified-flow model (`FlowMatchEulerDiscreteScheduler`).
    pub fn is_flow(&self) -> bool {
        self.class_name.as_deref() == Some("FlowMatchEulerDiscreteScheduler")
    }

    /// The model's schedule: [`Flow`] with the config's shift for a flow model, else the
    /// discrete schedule ([`SchedulerConfig::schedule`]).
    pub fn any_schedule(&self, file: &Path) -> Result<Arc<dyn Schedule>> {
        if self.is_flow() {
            if self.num_train_timesteps != 1000 {
                bail!(
                    "{}: key 'num_train_timesteps': {} (a flow model's network time is 1000 ς here; 1000 expected)",
                    file.display(),
                    self.num_train_timesteps
                );
            }
            return Ok(Arc::new(Flow::new(self.shift.unwrap_or(1.0))?));
        }
        Ok(Arc::new(self.schedule(file)?))
    }

    /// The discrete schedule: `trained_betas` if given, else the named beta schedule, in
    /// diffusers' float32 (see [`diffusers_betas`]); with `rescale_betas_zero_snr` rescaled
    /// to zero terminal SNR, ᾱ_T held at 2⁻²⁴ (see [`Tabulated::diffusers_zero_snr`]).
    pub fn schedule(&self, file: &Path) -> Result<Tabulated> {
        let betas: Vec<f32> = match &self.trained_betas {
            Some(b) => {
                if b.len() != self.num_train_timesteps {
                    bail!(
                        "{}: key 'trained_betas' has {} entries, expected num_train_timesteps = {}",
                        file.display(),
                        b.len(),
                        self.num_train_timesteps
                    );
                }
                b.iter().map(|&v| v as f32).collect()
            }
            None => diffusers_betas(
                &self.beta_schedule,
                self.beta_start,
                self.beta_end,
                self.num_train_timesteps,
            )
            .with_context(|| format!("{}: key 'beta_schedule'", file.display()))?,
        };
        if self.rescale_betas_zero_snr {
            return Tabulated::diffusers_zero_snr(&betas)
                .map(|(t, _)| t)
                .with_context(|| format!("{}: betas", file.display()));
        }
        Tabulated::from_alpha_bars("discrete", &diffusers_alphas_cumprod(&betas))
            .with_context(|| format!("{}: betas", file.display()))
    }
}

/// Where the files of a checkpoint folder are.
pub struct CheckpointFiles {
    pub config: PathBuf,
    pub weights: PathBuf,
    pub scheduler: PathBuf,
}

/// Finds `config.json`, the safetensors weights and `scheduler_config.json` in a pipeline
/// folder (`unet/`, `scheduler/`) or a flat one.
pub fn find_files(dir: &Path) -> Result<CheckpointFiles> {
    if !dir.is_dir() {
        let s = dir.to_string_lossy();
        // `google/ddpm-cifar10-32` looks like a Hub id: qtaylor never downloads.
        let hub = !dir.exists() && !s.starts_with(['/', '.', '~']) && s.matches('/').count() == 1;
        let hint = if hub {
            format!(
                "; models are local folders and qtaylor downloads nothing. If '{s}' is a Hugging Face Hub id, fetch it once, e.g. `huggingface-cli download {s} --local-dir models/{}` or `DDPMPipeline.from_pretrained(\"{s}\").save_pretrained(\"models/{}\")` in Python, and pass that folder",
                s.rsplit('/').next().unwrap_or(&s),
                s.rsplit('/').next().unwrap_or(&s)
            )
        } else {
            String::new()
        };
        bail!(
            "{}: not a folder (expected a diffusers checkpoint folder){hint}",
            dir.display()
        );
    }
    let unet = if dir.join("unet").is_dir() {
        dir.join("unet")
    } else {
        dir.to_path_buf()
    };
    let config = unet.join("config.json");
    if !config.is_file() {
        bail!(
            "{}: missing (expected the UNet2DModel config of the checkpoint)",
            config.display()
        );
    }
    let weights = unet.join("diffusion_pytorch_model.safetensors");
    if !weights.is_file() {
        let bin = unet.join("diffusion_pytorch_model.bin");
        if bin.is_file() {
            bail!(
                "{}: missing; only the PyTorch pickle {} is there: convert it to safetensors (e.g. load it with diffusers and save_pretrained(..., safe_serialization=True))",
                weights.display(),
                bin.display()
            );
        }
        bail!("{}: missing (expected the UNet weights)", weights.display());
    }
    let scheduler = [dir.join("scheduler").join("scheduler_config.json"), dir.join("scheduler_config.json")]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no scheduler/scheduler_config.json or scheduler_config.json (expected the diffusers scheduler config)",
                dir.display()
            )
        })?;
    Ok(CheckpointFiles {
        config,
        weights,
        scheduler,
    })
}

/// A loaded checkpoint: the network, its schedule and how to read its output.
pub struct DiffusersModel {
    pub unet: UNet2D,
    pub scheduler: SchedulerConfig,
    pub schedule: Arc<dyn Schedule>,
    pub parameterization: Parameterization,
    /// Clip x̂0 to ±range (the scheduler config's `clip_sample`).
    pub clip: Option<f64>,
    pub parameters: usize,
}

impl DiffusersModel {
    /// Loads a checkpoint folder with weights in `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let files = find_files(dir)?;
        let cfg_text = std::fs::read_to_string(&files.config)
            .with_context(|| format!("cannot read {}", files.config.display()))?;
        let sch_text = std::fs::read_to_string(&files.scheduler)
            .with_context(|| format!("cannot read {}", files.scheduler.display()))?;
        let bytes = std::fs::read(&files.weights)
            .with_context(|| format!("cannot read weights file {}", files.weights.display()))?;
        Self::from_parts(&files, &cfg_text, &sch_text, &bytes, dtype, device)
    }

    /// The model shipped inside the binary, in the given dtype: the class-conditional MNIST
    /// UNet of `assets/mnist-cond-unet/` (ten digit classes and the null class 10, trained by
    /// `qtaylor train` with label dropout; see its `TRAINING.md`). The unconditional
    /// `assets/mnist-unet/` stays a checkpoint folder.
    pub fn embedded_mnist(dtype: DType, device: &Device) -> Result<Self> {
        let files = CheckpointFiles {
            config: PathBuf::from("<embedded>/assets/mnist-cond-unet/config.json"),
            scheduler: PathBuf::from("<embedded>/assets/mnist-cond-unet/scheduler_config.json"),
            weights: PathBuf::from(
                "<embedded>/assets/mnist-cond-unet/diffusion_pytorch_model.safetensors",
            ),
        };
        Self::from_parts(
            &files,
            include_str!("../../assets/mnist-cond-unet/config.json"),
            include_str!("../../assets/mnist-cond-unet/scheduler_config.json"),
            include_bytes!("../../assets/mnist-cond-unet/diffusion_pytorch_model.safetensors"),
            dtype,
            device,
        )
    }

    /// Builds the model from the three files' contents (`files` names them in errors): the
    /// loader behind [`DiffusersModel::load`] and the embedded model, and a fuzz target.
    pub fn from_parts(
        files: &CheckpointFiles,
        cfg_text: &str,
        sch_text: &str,
        weight_bytes: &[u8],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if dtype == DType::BF16 && device.is_cpu() {
            qtaylor_core::bail_option!(
                (qtaylor_core::keys::MODEL_DTYPE, "bf16"),
                " needs ",
                (qtaylor_core::keys::DEVICE, "cuda"),
                ": candle's CPU matrix products have no bf16 (use f16 or f32 on the CPU)"
            );
        }
        let config = UNet2DConfig::from_json(cfg_text, &files.config)?;
        let scheduler = SchedulerConfig::from_json(sch_text, &files.scheduler)?;
        let learned = scheduler.variance_type.starts_with("learned");
        let want_out = if learned {
            2 * config.in_channels
        } else {
            config.in_channels
        };
        if config.out_channels != want_out {
            bail!(
                "{}: out_channels = {} but variance_type '{}' with {} input channels needs {want_out}",
                files.config.display(),
                config.out_channels,
                scheduler.variance_type,
                config.in_channels
            );
        }
        let weights = Weights::from_bytes(&files.weights, weight_bytes, dtype, device)?;
        let unet = UNet2D::new(config, &weights)?;
        let unused = weights.unused();
        if !unused.is_empty() {
            eprintln!(
                "warning: {} tensors of {} are not used by the model: {}",
                unused.len(),
                files.weights.display(),
                unused
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(DiffusersModel {
            parameterization: scheduler.prediction_type.parse()?,
            clip: scheduler.clip_sample.then_some(scheduler.clip_sample_range),
            schedule: scheduler.any_schedule(&files.scheduler)?,
            parameters: weights.parameter_count(),
            scheduler,
            unet,
        })
    }

    /// Shape of one image `(C, H, W)` at the configured sample size (or `size`).
    pub fn item_shape(&self, size: Option<usize>) -> Result<Vec<usize>> {
        let s = match (size, &self.unet.config.sample_size) {
            (Some(s), _) => s,
            (None, Some(v)) => v
                .as_u64()
                .or_else(|| v.get(0).and_then(|x| x.as_u64()))
                .map(|v| v as usize)
                .context("config.json: key 'sample_size' is neither an integer nor a list")?,
            (None, None) => {
                qtaylor_core::bail_option!(
                    "config.json has no sample_size; give the image size with ",
                    qtaylor_core::keys::IMAGE_SIZE
                )
            }
        };
        if s > crate::models::unet::MAX_SAMPLE_SIZE {
            bail!(
                "image size {s} exceeds the limit of {}",
                crate::models::unet::MAX_SAMPLE_SIZE
            );
        }
        let f = self.unet.config.downsample_factor();
        if s == 0 || s % f != 0 {
            bail!(
                "image size {s} cannot go through the model's {} downsamplings: it must be a positive multiple of {f}",
                self.unet.config.block_out_channels.len() - 1
            );
        }
        Ok(vec![self.unet.config.in_channels, s, s])
    }
}

impl Model for DiffusersModel {
    fn parameterization(&self) -> Parameterization {
        if self.clip.is_some() {
            Parameterization::X0
        } else {
            self.parameterization
        }
    }

    /// The network at float timesteps `n = t·T − 1`. With `clip_sample`, the prediction is
    /// turned into x̂0, clipped, and returned as x̂0 (so ε̂ stays consistent with it).
    fn predict(&self, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        let out = self.network(x, t, None)?;
        self.finish(out, x, t)
    }
}

impl DiffusersModel {
    /// The network's raw output at times `t` (float timesteps `n = t·T − 1`), its mean
    /// channels only for a learned-variance model; `labels` for a class-conditional network.
    pub fn network(&self, x: &Tensor, t: &[f64], labels: Option<&[u32]>) -> Result<Tensor> {
        let steps: Vec<f64> = t.iter().map(|&t| self.schedule.network_time(t)).collect();
        // The model's own state (flow: the VP state times state_scale = 1/(α + σ)).
        let scale: Vec<f64> = t.iter().map(|&t| self.schedule.state_scale(t)).collect();
        let scaled;
        let x = if scale.iter().all(|&c| c == 1.0) {
            x
        } else {
            scaled =
                crate::tensor::ops::lincomb_rows(&[(crate::tensor::ops::Coef::from(scale), x)])?;
            &scaled
        };
        let mut out = self.unet.forward_labels(x, &steps, labels)?;
        let c = self.unet.config.in_channels;
        if out.dim(1)? != c {
            out = out.narrow(1, 0, c)?; // learned variance: the first C channels are the mean
        }
        Ok(out)
    }

    /// A raw network output (or a guided combination of two) as the model's prediction:
    /// with `clip_sample`, x̂0 clipped to ±range.
    pub fn finish(&self, out: Tensor, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        match self.clip {
            None => Ok(out),
            Some(r) => {
                let d = to_eps_x0(self.parameterization, &out, x, t, self.schedule.as_ref())?;
                Ok(d.x0.clamp(-r, r)?)
            }
        }
    }
}

impl DiffusersModel {
    /// The model's default grid, ending at σ = 0: its scheduler config's discrete spacing, or
    /// for a flow model N steps uniform in its unshifted time from pure noise to 0 (Flux's
    /// `linspace(1, 1/N, N)`, shifted, then 0).
    pub fn default_grid(&self) -> Result<crate::grid::TimeGrid> {
        if self.scheduler.is_flow() {
            return Ok(crate::grid::TimeGrid::Continuous {
                grid: crate::grid::Grid::Uniform,
                t_max: self.schedule.t_end(),
                t_min: 0.0,
                to_zero: true,
            });
        }
        Ok(crate::grid::TimeGrid::Discrete {
            spacing: self.scheduler.timestep_spacing.parse()?,
            offset: self.scheduler.steps_offset,
            timesteps: None,
            train_steps: self.scheduler.num_train_timesteps,
            last: crate::grid::Final::Zero,
        })
    }

    /// The last positive time of the model's grids: its first trained step (discrete), or
    /// the flow default's `t_min`.
    pub fn last_positive_time(&self) -> f64 {
        if self.scheduler.is_flow() {
            crate::config::DEFAULT_T_MIN
        } else {
            crate::grid::time_of_timestep(0.0, self.scheduler.num_train_timesteps)
        }
    }
}

/// The schedule of a loaded model as a trait object.
pub fn schedule_of(m: &DiffusersModel) -> Arc<dyn Schedule> {
    m.schedule.clone()
}

/// google/ddpm-cifar10-32's UNet2DModel config (as diffusers 0.42 saves it).
pub const CIFAR10_DDPM_CONFIG: &str = r#"{
  "_class_name": "UNet2DModel",
  "act_fn": "silu",
  "add_attention": true,
  "attention_head_dim": null,
  "block_out_channels": [128, 256, 256, 256],
  "center_input_sample": false,
  "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
  "downsample_padding": 0,
  "flip_sin_to_cos": false,
  "freq_shift": 1,
  "in_channels": 3,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-06,
  "norm_num_groups": 32,
  "out_channels": 3,
  "resnet_time_scale_shift": "default",
  "sample_size": 32,
  "time_embedding_type": "positional",
  "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]
}
"#;

/// diffusers' DDPMScheduler defaults (linear β 1e-4 … 0.02 over 1000 steps).
pub const DDPM_SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "DDPMScheduler",
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "beta_start": 0.0001,
  "clip_sample": true,
  "clip_sample_range": 1.0,
  "num_train_timesteps": 1000,
  "prediction_type": "epsilon",
  "steps_offset": 0,
  "timestep_spacing": "leading",
  "trained_betas": null,
  "variance_type": "fixed_small"
}
"#;

/// Writes a checkpoint folder (`unet/config.json`, `unet/diffusion_pytorch_model.safetensors`,
/// `scheduler/scheduler_config.json`) with random weights drawn like PyTorch's default init
/// (conv and linear weights uniform in ±1/√fan_in, biases 0, norms 1/0). Returns the number
/// of parameters. Files are written atomically.
pub fn write_random_checkpoint(
    dir: &Path,
    config: &str,
    scheduler: &str,
    seed: u64,
) -> Result<usize> {
    let cfg = UNet2DConfig::from_json(config, Path::new("config.json"))?;
    let w = Weights::synthetic(seed, DType::F32, &Device::Cpu);
    UNet2D::new(cfg, &w)?;
    let tensors = w.synthetic_tensors();
    std::fs::create_dir_all(dir.join("unet"))
        .and_then(|_| std::fs::create_dir_all(dir.join("scheduler")))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let weights = dir.join("unet/diffusion_pytorch_model.safetensors");
    crate::io::write_atomic_with(&weights, |tmp| {
        Ok(candle_core::safetensors::save(&tensors, tmp)?)
    })?;
    crate::io::write_atomic(&dir.join("unet/config.json"), config.as_bytes())?;
    crate::io::write_atomic(
        &dir.join("scheduler/scheduler_config.json"),
        scheduler.as_bytes(),
    )?;
    Ok(tensors.values().map(|t| t.elem_count()).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_snr_checkpoint_config_is_rescaled_as_diffusers_does() {
        let file = Path::new("scheduler_config.json");
        let json = r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                       "prediction_type": "v_prediction", "rescale_betas_zero_snr": true}"#;
        let table = SchedulerConfig::from_json(json, file)
            .unwrap()
            .schedule(file)
            .unwrap();
        let last = crate::schedule::ZERO_SNR_LAST_ALPHA_BAR;
        assert!((table.alpha_bar(1.0) / last - 1.0).abs() < 1e-12);
        // the linear default falls below 2⁻²⁴ before the last step: an error naming the key
        let json = r#"{"rescale_betas_zero_snr": true}"#;
        let err = SchedulerConfig::from_json(json, file)
            .unwrap()
            .schedule(file)
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("'rescale_betas_zero_snr'"),
            "{err:#}"
        );
    }
}
