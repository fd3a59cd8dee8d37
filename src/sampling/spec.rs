//! One sampling run's configuration: what a front end parsed ([`RunSettings`], every field
//! `None` unless the user set it) and the one builder that validates it and loads what it
//! names ([`RunSettings::load`], [`RunSettings::time_grid`], [`RunSettings::options`], and
//! [`RunSettings::build`] for a whole run, [`RunSpec`]).
//!
//! The schedule, grid and sampler settings are the core's ([`crate::config`]); this adds
//! what needs tensors: the model (a diffusers checkpoint, the embedded MNIST model or an
//! exact-score problem), classes and guidance, the state's dtype, the device, the seed and
//! the start state. The command line and the Python package are two parsers into these
//! types, and every error names a [`keys`] key, which each front end spells its own way.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::config::{
    DiscreteDefaults, GivenTimes, GridSettings, SamplerSettings, ScheduleSettings,
};
use crate::grid::TimeGrid;
use crate::keys::{self, Key};
use crate::models::checkpoint::DiffusersModel;
use crate::models::guidance::Guided;
use crate::models::model::Model;
use crate::models::problems::{Problem, load_problem};
use crate::sampling::gridfile::GridFile;
use crate::sampling::samplers::{Options, Sampler};
use crate::schedule::Schedule;
use crate::tensor::rng::NoiseStreams;
use crate::{bail_option, option_error};

/// The classes and guidance of a class-conditional model, as parsed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuidanceSettings {
    /// Every sample's class.
    pub class: Option<u32>,
    /// Comma-separated classes, or `all` (every class but the null one).
    pub classes: Option<String>,
    /// The classifier-free guidance scale w (default 1, the conditional model).
    pub guidance: Option<f64>,
    /// The unconditional class (default: the last).
    pub null_class: Option<u32>,
}

/// A sampling run as a front end parsed it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunSettings {
    /// A diffusers checkpoint folder.
    pub model: Option<PathBuf>,
    /// An exact-score problem (gmm-demo, a mixture file, empirical:PATH[:N]).
    pub problem: Option<String>,
    /// The network's dtype: f32 (default), f16 or bf16.
    pub model_dtype: Option<String>,
    /// A checkpoint's image size (default: its config's sample_size).
    pub image_size: Option<usize>,
    /// Do not clip x̂0 even if the scheduler config says clip_sample.
    pub no_clip: bool,
    pub schedule: ScheduleSettings,
    pub grid: GridSettings,
    /// A grid file written by `tune` (its times replace the steps and the grid).
    pub grid_file: Option<PathBuf>,
    pub sampler: Option<String>,
    pub options: SamplerSettings,
    pub guidance: GuidanceSettings,
    /// The sampler's state: f32 (default) or f64.
    pub dtype: Option<String>,
    /// cpu (default), cuda or cuda:N.
    pub device: Option<String>,
    /// Sample i draws its noise from stream (seed, i).
    pub seed: Option<u64>,
    /// Samples (default 16, or the rows of x_init, or classes²).
    pub batch: Option<usize>,
    /// The start state, used as given.
    pub x_init: Option<PathBuf>,
    /// Image-to-image: the image to start from, and how much of the grid runs.
    pub init_image: Option<PathBuf>,
    pub strength: Option<f64>,
}

/// What is sampled.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// The class-conditional MNIST model embedded in the binary.
    Embedded,
    Checkpoint(PathBuf),
    Problem(String),
}

/// A loaded model: a diffusers checkpoint, or an exact-score problem.
pub enum Loaded {
    Checkpoint(Box<DiffusersModel>),
    Problem(Box<dyn Problem>),
}

impl Loaded {
    /// The model the sampler calls (a class-conditional checkpoint's: see [`RunSpec::model`]).
    pub fn model(&self) -> &dyn Model {
        match self {
            Loaded::Checkpoint(m) => m.as_ref(),
            Loaded::Problem(p) => p.model(),
        }
    }

    /// The checkpoint, if this is one.
    pub fn checkpoint(&self) -> Option<&DiffusersModel> {
        match self {
            Loaded::Checkpoint(m) => Some(m),
            Loaded::Problem(_) => None,
        }
    }
}

/// What is sampled, loaded, with its schedule.
pub struct Sampled {
    pub loaded: Loaded,
    pub schedule: Arc<dyn Schedule>,
    /// A discrete schedule's grid defaults (a checkpoint's scheduler config).
    pub discrete: Option<DiscreteDefaults>,
    /// A checkpoint's `variance_type` (the DDPM variance's default).
    pub variance_type: Option<String>,
}

/// Parses a state dtype: f32 or f64.
pub fn state_dtype(key: Key, s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f64" => DType::F64,
        other => bail_option!((key, other), ": expected f32 or f64"),
    })
}

/// Parses a network dtype: f32, f16 or bf16.
pub fn model_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail_option!((keys::MODEL_DTYPE, other), ": expected f32, f16 or bf16"),
    })
}

/// How a grid file names the model it was tuned for.
pub fn model_id(source: &Source) -> String {
    match source {
        Source::Checkpoint(d) => d.display().to_string(),
        Source::Problem(p) => p.clone(),
        Source::Embedded => "embedded:mnist-cond-unet".into(),
    }
}

impl RunSettings {
    /// What is sampled: a checkpoint, a problem, or (neither given) the embedded model.
    pub fn source(&self) -> Source {
        match (&self.model, &self.problem) {
            (Some(d), _) => Source::Checkpoint(d.clone()),
            (None, Some(p)) => Source::Problem(p.clone()),
            (None, None) => Source::Embedded,
        }
    }

    /// The sampler named by `sampler`.
    pub fn sampler(&self) -> Result<Sampler> {
        match &self.sampler {
            Some(s) => s.parse(),
            None => bail_option!("name a sampler with ", keys::SAMPLER),
        }
    }

    /// The network dtype.
    pub fn network_dtype(&self) -> Result<DType> {
        model_dtype(self.model_dtype.as_deref().unwrap_or("f32"))
    }

    /// Loads what is sampled on `device`, with its schedule. A checkpoint (or the embedded
    /// model) brings its own schedule: schedule settings are refused then, and so is a
    /// problem given with it.
    pub fn load(&self, device: &Device) -> Result<Sampled> {
        match self.source() {
            Source::Problem(p) => {
                let (schedule, discrete) = self.schedule.build()?;
                let problem = load_problem(&p, schedule.clone(), device)?;
                Ok(Sampled {
                    loaded: Loaded::Problem(problem),
                    schedule,
                    discrete,
                    variance_type: None,
                })
            }
            source => {
                if self.problem.is_some() || self.schedule.names_one() {
                    bail_option!(
                        keys::MODEL,
                        " brings its own model and schedule: drop ",
                        keys::PROBLEM,
                        "/",
                        keys::SCHEDULE
                    );
                }
                self.schedule.check_used(true)?;
                let dtype = self.network_dtype()?;
                let mut m = match &source {
                    Source::Checkpoint(dir) => DiffusersModel::load(dir, dtype, device)?,
                    _ => DiffusersModel::embedded_mnist(dtype, device)?,
                };
                if self.no_clip {
                    m.clip = None;
                }
                // A flow model's grid is continuous (uniform in its unshifted time to ς = 0).
                let discrete = (!m.scheduler.is_flow()).then(|| DiscreteDefaults {
                    spacing: m.scheduler.timestep_spacing.clone(),
                    offset: m.scheduler.steps_offset,
                    train_steps: m.scheduler.num_train_timesteps,
                });
                Ok(Sampled {
                    schedule: m.schedule.clone(),
                    discrete,
                    variance_type: Some(m.scheduler.variance_type.clone()),
                    loaded: Loaded::Checkpoint(Box::new(m)),
                })
            }
        }
    }

    /// The grid settings with the grid file's times read in (the file read once and checked
    /// against `schedule`), and the file itself, for [`RunSettings::grid_file_warnings`].
    pub fn grid_settings(
        &self,
        schedule: &dyn Schedule,
    ) -> Result<(GridSettings, Option<GridFile>)> {
        let mut g = self.grid.clone();
        let Some(path) = &self.grid_file else {
            return Ok((g, None));
        };
        let file = GridFile::read(path, schedule)?;
        g.times = Some(GivenTimes {
            key: keys::GRID_FILE,
            what: format!("grid file {}", path.display()),
            times: file.times.clone(),
        });
        Ok((g, Some(file)))
    }

    /// The time grid on the loaded model's schedule, with the grid settings it came from
    /// and the grid file they read.
    pub fn time_grid(&self, m: &Sampled) -> Result<(GridSettings, TimeGrid, Option<GridFile>)> {
        let (g, file) = self.grid_settings(m.schedule.as_ref())?;
        let grid = g.time_grid(m.schedule.as_ref(), m.discrete.as_ref())?;
        Ok((g, grid, file))
    }

    /// The options of `samplers`, with a checkpoint's DDPM variance as the default.
    pub fn options(&self, samplers: &[Sampler], m: &Sampled) -> Result<Options> {
        self.options
            .build(samplers, m.variance_type.as_deref(), &[])
    }

    /// The warnings of the grid file `file` (read by [`RunSettings::grid_settings`]) used
    /// with another sampler, NFE, schedule or model.
    pub fn grid_file_warnings(
        &self,
        file: Option<&GridFile>,
        samplers: &[Sampler],
        nfe: Option<usize>,
        schedule: &dyn Schedule,
    ) -> Vec<String> {
        let (Some(g), Some(path)) = (file, &self.grid_file) else {
            return Vec::new();
        };
        let model = model_id(&self.source());
        let mut warnings: Vec<String> = Vec::new();
        for s in samplers {
            for w in g.mismatches(&s.to_string(), nfe, schedule, &model) {
                let w = format!("grid file {}: {w}", path.display());
                if !warnings.contains(&w) {
                    warnings.push(w);
                }
            }
        }
        warnings
    }

    /// The classes of `class`/`classes` for a model of `k` classes (`all`: every class but
    /// the null one) and the null class (`null_class`, or the last); None without either
    /// (a class-conditional model then samples its null class).
    pub fn classes(&self, k: Option<usize>) -> Result<Option<(Vec<u32>, u32)>> {
        let g = &self.guidance;
        if g.class.is_none() && g.classes.is_none() {
            for (key, set) in [
                (keys::GUIDANCE, g.guidance.is_some()),
                (keys::NULL_CLASS, g.null_class.is_some()),
            ] {
                if set {
                    bail_option!(
                        key,
                        " does nothing without ",
                        keys::CLASS,
                        " or ",
                        keys::CLASSES
                    );
                }
            }
            return Ok(None);
        }
        let Some(k) = k else {
            bail_option!(
                keys::CLASS,
                "/",
                keys::CLASSES,
                ": this model is not class-conditional (its config.json has no num_class_embeds)"
            );
        };
        let null = g.null_class.unwrap_or(k as u32 - 1);
        let list = match (g.class, g.classes.as_deref()) {
            (Some(_), Some(_)) => bail_option!("give one of ", keys::CLASS, " and ", keys::CLASSES),
            (Some(c), None) => vec![c],
            (None, Some("all")) => (0..k as u32).filter(|&c| c != null).collect(),
            (None, Some(list)) => list
                .split(',')
                .map(|v| {
                    v.trim().parse::<u32>().map_err(|_| {
                        option_error!(
                            (keys::CLASSES, list),
                            format!(": '{}' is not a class number", v.trim())
                        )
                        .into()
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            (None, None) => unreachable!("checked above"),
        };
        if list.is_empty() {
            bail_option!(
                (keys::CLASSES, "all"),
                format!(": the model's only class is the null class {null}")
            );
        }
        Ok(Some((list, null)))
    }
}

/// How a run starts.
pub enum Start {
    /// Fresh noise for `batch` samples (rows `first..first + rows` of them with a shard).
    Noise { batch: usize },
    /// A given start state (x_init), with its rows' noise streams already past their start draws.
    State(Tensor),
    /// Image-to-image: the image(s) noised to the grid's first time.
    Image { image: Tensor, batch: usize },
}

/// A whole run, validated and loaded: what the `sample` command (`sample::run`) draws.
pub struct RunSpec {
    pub settings: RunSettings,
    pub sampler: Sampler,
    pub opts: Options,
    pub model: Sampled,
    pub grid: TimeGrid,
    /// The grid's times, after an image-to-image run's start was cut off.
    pub times: Vec<f64>,
    /// The shape of one sample.
    pub item: Vec<usize>,
    /// Classes and their null class (a class-conditional checkpoint with class/classes).
    pub classes: Option<(Vec<u32>, u32)>,
    pub start: Start,
    pub dtype: DType,
    pub device: Device,
    pub seed: u64,
    /// Warnings to show (a grid file used with another sampler, NFE, schedule or model).
    pub warnings: Vec<String>,
}

/// The default number of samples without classes.
pub const DEFAULT_BATCH: usize = 16;

impl RunSettings {
    /// Validates the whole run and loads its model on `device`: the sampler and its
    /// options, the schedule and grid, classes and guidance, the start (noise, x_init or an
    /// image), with every error naming its key.
    pub fn build(&self, device: &Device) -> Result<RunSpec> {
        let sampler = self.sampler()?;
        let dtype = state_dtype(keys::DTYPE, self.dtype.as_deref().unwrap_or("f32"))?;
        if matches!(self.source(), Source::Problem(_))
            && (self.image_size.is_some() || self.no_clip)
        {
            bail_option!(
                keys::IMAGE_SIZE,
                " and ",
                keys::NO_CLIP,
                " apply to ",
                keys::MODEL
            );
        }
        let model = self.load(device)?;
        let (grid_settings, grid, grid_file) = self.time_grid(&model)?;
        let item = match &model.loaded {
            Loaded::Checkpoint(m) => m.item_shape(self.image_size)?,
            Loaded::Problem(p) => p.item_shape(),
        };
        let opts = self.options(&[sampler], &model)?;
        let classes = match model.loaded.checkpoint() {
            Some(m) => self.classes(m.unet.num_classes())?,
            None => {
                let g = &self.guidance;
                if g.class.is_some()
                    || g.classes.is_some()
                    || g.guidance.is_some()
                    || g.null_class.is_some()
                {
                    bail_option!(
                        keys::CLASS,
                        ", ",
                        keys::CLASSES,
                        ", ",
                        keys::GUIDANCE,
                        " and ",
                        keys::NULL_CLASS,
                        " apply to a class-conditional ",
                        keys::MODEL
                    );
                }
                None
            }
        };
        let mut times = grid_settings.times(model.schedule.as_ref(), &grid)?;
        let steps = times.len() - 1;
        // Image-to-image: the last ⌊steps·strength⌋ steps of the grid.
        let image = match (&self.init_image, self.strength) {
            (None, Some(_)) => {
                bail_option!(keys::STRENGTH, " does nothing without ", keys::INIT_IMAGE)
            }
            (None, None) => None,
            (Some(path), s) => {
                if model.loaded.checkpoint().is_none() {
                    bail_option!(
                        keys::INIT_IMAGE,
                        " applies to ",
                        keys::MODEL,
                        " (an image model)"
                    );
                }
                if self.x_init.is_some() {
                    bail_option!("give one of ", keys::INIT_IMAGE, " and ", keys::X_INIT);
                }
                let first = crate::grid::img2img_start(steps, s.unwrap_or(DEFAULT_STRENGTH))?;
                let img = crate::io::read_image(path, item[0], item[1], item[2])?;
                times.drain(..first);
                Some(img)
            }
        };
        let steps = times.len() - 1;
        let warnings = {
            let nfe = sampler.nfe(steps, grid.ends_at_zero(), &opts);
            self.grid_file_warnings(grid_file.as_ref(), &[sampler], nfe, model.schedule.as_ref())
        };
        let per_class = |c: &Option<(Vec<u32>, u32)>| match c {
            Some((c, _)) if self.guidance.classes.is_some() => Some(c.len() * c.len()),
            _ => None,
        };
        let start = match (&self.x_init, image) {
            (Some(path), _) => {
                let mut want = vec![None];
                want.extend(item.iter().map(|&d| Some(d)));
                let x = crate::io::read_npy(path, &want)?;
                let b = x.dims()[0];
                if let Some(batch) = self.batch
                    && batch != b
                {
                    bail_option!(
                        (keys::BATCH, batch),
                        " disagrees with ",
                        (keys::X_INIT, path.display().to_string()),
                        format!(", which has {b} rows")
                    );
                }
                Start::State(x.to_dtype(dtype)?.to_device(device)?)
            }
            (None, Some(img)) => {
                let b = self
                    .batch
                    .unwrap_or(img.dims()[0].max(per_class(&classes).unwrap_or(1)));
                check_batch(b)?;
                let n = img.dims()[0];
                if n != 1 && n != b {
                    bail_option!(
                        (
                            keys::INIT_IMAGE,
                            self.init_image
                                .as_ref()
                                .expect("given")
                                .display()
                                .to_string()
                        ),
                        format!(": {n} images for "),
                        (keys::BATCH, b),
                        "; give one image or one per sample"
                    );
                }
                let img = img
                    .broadcast_as((b, item[0], item[1], item[2]))?
                    .contiguous()?;
                Start::Image {
                    image: img,
                    batch: b,
                }
            }
            (None, None) => {
                let b = self
                    .batch
                    .unwrap_or(per_class(&classes).unwrap_or(DEFAULT_BATCH));
                check_batch(b)?;
                Start::Noise { batch: b }
            }
        };
        Ok(RunSpec {
            settings: self.clone(),
            sampler,
            opts,
            model,
            grid,
            times,
            item,
            classes,
            start,
            dtype,
            device: device.clone(),
            seed: self.seed.unwrap_or(0),
            warnings,
        })
    }
}

/// Image-to-image's default strength (diffusers' img2img default).
pub const DEFAULT_STRENGTH: f64 = 0.8;

fn check_batch(b: usize) -> Result<()> {
    if b == 0 {
        bail_option!((keys::BATCH, 0usize), ": at least one sample is needed");
    }
    Ok(())
}

impl RunSpec {
    /// Steps of the run's grid.
    pub fn steps(&self) -> usize {
        self.times.len() - 1
    }

    /// The guidance scale (1: the conditional model).
    pub fn guidance(&self) -> f64 {
        self.settings.guidance.guidance.unwrap_or(1.0)
    }

    /// The start state of rows `first..first + rows` and their noise streams (the start's
    /// draws taken, so the sampler's own noise follows them as in any run of this seed).
    pub fn start_state(&self, first: usize, rows: usize) -> Result<(Tensor, NoiseStreams)> {
        let mut noise = NoiseStreams::new(self.seed, first, rows);
        let x = match &self.start {
            Start::Noise { .. } => noise.normal(&self.item, self.dtype, &self.device)?,
            Start::State(x) => {
                // Consume the start draws, so that the sampler's own noise is the same as in
                // a run without x_init: an x_init equal to the default start noise reproduces it.
                noise.normal(&self.item, DType::F64, &Device::Cpu)?;
                x.clone()
            }
            Start::Image { image, .. } => {
                // SDEdit (Meng et al. 2021): x = α(t_s) x0 + σ(t_s) ε, with ε the draws a
                // pure-noise start takes; strength 1 is that pure-noise start itself.
                let eps = noise.normal(&self.item, DType::F64, &Device::Cpu)?;
                let x = if self.settings.strength.unwrap_or(DEFAULT_STRENGTH) >= 1.0 {
                    eps
                } else {
                    let t0 = self.times[0];
                    let s = self.model.schedule.as_ref();
                    let img = image.to_dtype(DType::F64)?;
                    ((img * s.alpha(t0))? + (eps * s.sigma(t0))?)?
                };
                x.to_dtype(self.dtype)?.to_device(&self.device)?
            }
        };
        Ok((x, noise))
    }

    /// Samples in the run.
    pub fn batch(&self) -> usize {
        match &self.start {
            Start::Noise { batch } | Start::Image { batch, .. } => *batch,
            Start::State(x) => x.dims()[0],
        }
    }

    /// The model the sampler calls for rows `first..first + rows` of `total`: a
    /// class-conditional checkpoint with its classes and guidance (sample i's class from its
    /// index in the whole run), its null class without them, or the model itself.
    pub fn guided(&self, first: usize, rows: usize, total: usize) -> Result<Option<Guided<'_>>> {
        let Some(m) = self.model.loaded.checkpoint() else {
            return Ok(None);
        };
        match &self.classes {
            Some((list, null)) => {
                let labels: Vec<u32> = (first..first + rows)
                    .map(|i| list[i * list.len() / total])
                    .collect();
                Ok(Some(Guided::new(m, labels, *null, self.guidance())?))
            }
            None if m.unet.num_classes().is_some() => Ok(Some(Guided::unconditional(m)?)),
            None => Ok(None),
        }
    }

    /// A one-line name of what is sampled.
    pub fn name(&self) -> String {
        match &self.model.loaded {
            Loaded::Checkpoint(m) => format!(
                "{} ({:.1} M parameters)",
                match &self.settings.model {
                    Some(d) => d.display().to_string(),
                    None => "the embedded MNIST model".into(),
                },
                m.parameters as f64 / 1e6
            ),
            Loaded::Problem(p) => p.name(),
        }
    }
}
