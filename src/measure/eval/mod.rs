//! Sample quality vs NFE of a trained image model (`qtaylor eval`).
//!
//! For every sampler and NFE budget, `n` samples are drawn (sample `i` from noise stream
//! `(seed, i)`, so a sample does not depend on the batch it was drawn in), quantised to 8 bits
//! as a saved PNG would be, and compared with the test split of the data set in the 128-d
//! feature space of the project's own classifier ([`crate::models::classifier`]):
//!
//! - **FID** (Heusel et al. 2017) against the features of the whole test split: this is an
//!   *MNIST-feature FID, not comparable to Inception FID*;
//! - **KID** (Bińkowski et al. 2018), unbiased MMD² with the cubic kernel, on random subsets;
//! - **precision / recall** (Kynkäänniemi et al. 2019, k = 3) against the first `n` test
//!   images;
//! - the classifier's mean top-1 confidence on the samples (a recognisability proxy).
//!
//! Two reference rows frame the table: `ddpm` with 1000 ancestral steps (the sampler the
//! model was trained for, at full NFE), and `n` real images of the *training* split. The
//! latter is a scale, not a floor: the classifier was trained on those images, so their
//! features sit closer to its class centres than those of unseen images (MNIST test images,
//! or samples), and good samplers can score below it.
//!
//! NFE budgets map to steps with [`Sampler::steps_for_budget`] on the checkpoint's discrete
//! time grid (diffusers' `timestep_spacing`, ending at ᾱ = 1); a budget a sampler cannot fit
//! (e.g. RK4 under 4) is skipped. Adaptive samplers (`rk45`, `dpm-solver-12/23`) take
//! tolerances instead and report the NFE they used.
//!
//! Outputs, each written atomically and rewritten after every row (so a stopped run keeps
//! what it measured): `results.csv`, `results.json`, `report.md`, `fid_vs_nfe.png`, and
//! `grid-<sampler>-nfe<N>.png` (the first 64 samples at the grid budget).
//!
//! Sharded ([`eval_shard`], `eval --shard I/N`): a shard draws samples ⌊I·n/N⌋..⌊(I+1)·n/N⌋
//! of every row (the same numbers the unsharded run draws for them: noise stream (seed, i),
//! class i mod classes, batch-independent network and classifier on the CPU), takes its
//! share of the training and test images' features, and writes the per-sample results as a
//! part; [`merge`] computes every row from the merged per-sample results. Its results equal
//! the unsharded run's but for the `seconds` column, which is then the shards' compute time
//! added up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::grid::TimeGrid;
use crate::io::idx::{ImageSet, Split, load_image_set};
use crate::keys;
use crate::measure::feature_metrics::precision_recall;
use crate::measure::feature_metrics::{GaussianMoments, fid_from_moments, gaussian_moments, kid};
use crate::measure::plot::{Line, Panel, loglog_png};
use crate::models::checkpoint::DiffusersModel;
use crate::models::classifier::Classifier;
use crate::sampling::samplers::{self, Options, Sampler};
use crate::shard::{EVAL_KIND, Part, Shard};
use crate::tensor::rng::NoiseStreams;
use crate::{bail_option, option_error};

mod parts;
mod report;

pub use parts::{PartData, eval_shard, merge, merge_parts, read_part_data};
use report::*;
pub use report::{csv, markdown, render};

/// The label every report carries.
pub const FID_LABEL: &str = "MNIST-feature FID (not comparable to Inception FID)";

/// What `qtaylor eval` measures.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// The checkpoint folder.
    pub model: PathBuf,
    /// Sampler names (see `qtaylor samplers`).
    pub samplers: Vec<String>,
    /// NFE budgets of the non-adaptive samplers.
    pub nfe: Vec<usize>,
    /// Tolerances (rtol = atol) of the adaptive samplers.
    pub tolerances: Vec<f64>,
    /// Samples per row.
    pub n: usize,
    /// Samples per network batch.
    pub batch: usize,
    /// Sample `i` draws its noise from stream `(seed, i)`.
    pub seed: u64,
    /// Output folder.
    pub out: PathBuf,
    /// Classifier folder (features).
    pub classifier: PathBuf,
    /// The data set whose test split is the reference (`mnist`, `fashion-mnist`, a folder).
    pub data: String,
    /// Steps of the DDPM reference row (0: no reference row).
    pub reference_steps: usize,
    /// Budget whose samples are saved as a grid per sampler.
    pub grid_nfe: usize,
    /// KID: number of subsets and their size.
    pub kid_subsets: usize,
    pub kid_subset_size: usize,
    /// Stop starting new rows after this many seconds (rows done are kept).
    pub max_seconds: Option<f64>,
    /// The time grids of the fixed-budget rows: `default` (the checkpoint's spacing),
    /// `uniform`, `quadratic`, `logsnr`, `karras` (continuous grids on the discrete schedule,
    /// ending at x̂0) and `tuned` (the grid file of [`EvalOptions::grid_dir`] tuned for the
    /// sampler and budget).
    pub grids: Vec<String>,
    /// Folder of grid files (`qtaylor tune --out`) for the `tuned` grid.
    pub grid_dir: Option<PathBuf>,
    /// A class-conditional model: the classifier-free guidance scale. Sample i asks for
    /// class `i mod (K − 1)` (K = num_class_embeds, the last the null class), so n = 10 000
    /// gives 1 000 per class of MNIST.
    pub guidance: Option<f64>,
}

impl EvalOptions {
    /// Defaults of the CLI: NFE 5, 10, 20, 50, 100; n = 10000; batch 500; seed 0; the MNIST
    /// classifier and test split; a 1000-step DDPM reference row; grids at NFE 10.
    pub fn new(model: &Path, samplers: &[&str], out: &Path) -> Self {
        EvalOptions {
            model: model.to_path_buf(),
            samplers: samplers.iter().map(|s| s.to_string()).collect(),
            nfe: vec![5, 10, 20, 50, 100],
            tolerances: vec![1e-1, 1e-2, 1e-3],
            n: 10000,
            batch: 500,
            seed: 0,
            out: out.to_path_buf(),
            classifier: PathBuf::from("assets/classifier-mnist"),
            data: "mnist".into(),
            reference_steps: 1000,
            grid_nfe: 10,
            kid_subsets: 20,
            kid_subset_size: 1000,
            max_seconds: None,
            grids: vec!["default".into()],
            grid_dir: None,
            guidance: None,
        }
    }
}

/// One row of the table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    /// Sampler name (`data:train` for the training-image floor).
    pub sampler: String,
    /// The time grid: `default` (the checkpoint's spacing), a continuous grid name, or
    /// `tuned` (a grid file).
    #[serde(default = "default_grid_name")]
    pub grid: String,
    /// The NFE budget asked for (adaptive: none).
    pub nfe_budget: Option<usize>,
    /// Tolerance of an adaptive sampler.
    pub tolerance: Option<f64>,
    /// Steps on the time grid (0 for an adaptive sampler, which chooses its own).
    pub steps: usize,
    /// Network evaluations per sample actually used (mean over the samples for adaptive).
    pub nfe: f64,
    pub n: usize,
    pub fid: f64,
    pub kid: f64,
    pub kid_std: f64,
    pub precision: f64,
    pub recall: f64,
    /// Mean top-1 softmax probability of the classifier on the samples.
    pub confidence: f64,
    /// The fraction of samples the classifier is confident about: top-1 probability above
    /// [`CONFIDENT`] (None in reports written before it was measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confident: Option<f64>,
    /// Sampling, features and metrics of the row. A merged sharded run: the shards'
    /// sampling-and-feature seconds added up plus merge's metric seconds (compute spent, not
    /// the wall clock of any one process).
    pub seconds: f64,
    /// Class-conditional sampling: the fraction of samples the classifier assigns to the
    /// class they were asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditional_accuracy: Option<f64>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub metric: String,
    pub model: String,
    pub classifier: String,
    pub classifier_test_accuracy: f64,
    pub reference: String,
    pub seed: u64,
    pub device: String,
    /// The guidance scale of a class-conditional model's rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    pub rows: Vec<Row>,
}

/// The top-1 probability above which a sample counts as confidently classified.
pub const CONFIDENT: f64 = 0.9;

/// The fraction of `conf` above [`CONFIDENT`].
fn confident(conf: &[f64]) -> f64 {
    conf.iter().filter(|&&c| c > CONFIDENT).count() as f64 / conf.len().max(1) as f64
}

/// Reference statistics of the test split.
struct Reference {
    moments: GaussianMoments,
    features: Vec<Vec<f64>>,
    /// The first `n` test features (precision/recall wants sets of equal size).
    pr_real: Vec<Vec<f64>>,
}

impl Reference {
    /// The reference of the test-split features `features` (all of them, in index order)
    /// for rows of `n` samples.
    fn new(features: Vec<Vec<f64>>, n: usize) -> Result<Self> {
        if n > features.len() {
            bail_option!(
                (keys::N, n),
                format!(": the test split has {} images", features.len())
            );
        }
        Ok(Reference {
            moments: gaussian_moments(&features)?,
            pr_real: features[..n].to_vec(),
            features,
        })
    }
}

/// Classifier features (rows), top-1 confidences and top-1 classes of a batch of images.
#[allow(clippy::type_complexity)]
fn features_and_confidence(
    c: &Classifier,
    x: &Tensor,
) -> Result<(Vec<Vec<f64>>, Vec<f64>, Vec<u32>)> {
    let (f, logits) = c.features_and_logits_by_image(&crate::models::classifier::quantise(x)?)?;
    let probs = candle_nn::ops::softmax_last_dim(&logits)?;
    let conf = probs.max(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let top = probs.argmax(1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    Ok((f.to_dtype(DType::F64)?.to_vec2::<f64>()?, conf, top))
}

/// The classes eval asks for: sample i gets class `i mod (K − 1)` of a model with K class
/// rows (the last the null class).
fn eval_labels(k: usize, start: usize, count: usize) -> Vec<u32> {
    (start..start + count)
        .map(|i| (i % (k - 1)) as u32)
        .collect()
}

/// What a row's metrics depend on besides the per-sample results: recorded in every eval
/// part, so that `merge` needs nothing but the parts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricSettings {
    /// Samples per row.
    pub n: usize,
    /// The run's seed: noise streams and KID's subsets.
    pub seed: u64,
    pub kid_subsets: usize,
    pub kid_subset_size: usize,
    /// The grid PNGs show samples `0..grid_images` (the first batch's first 64).
    pub grid_images: usize,
}

impl MetricSettings {
    /// The settings of a run with options `o`.
    fn of(o: &EvalOptions) -> Self {
        MetricSettings {
            n: o.n,
            seed: o.seed,
            kid_subsets: o.kid_subsets,
            kid_subset_size: o.kid_subset_size,
            grid_images: 64.min(o.batch).min(o.n),
        }
    }
}

/// FID, KID (mean, std), precision and recall of the sample features `fake`.
fn metrics(
    o: &MetricSettings,
    r: &Reference,
    fake: &[Vec<f64>],
) -> Result<(f64, f64, f64, f64, f64)> {
    let fid = fid_from_moments(&gaussian_moments(fake)?, &r.moments)?;
    let (k, ks) = kid(fake, &r.features, o.kid_subsets, o.kid_subset_size, o.seed)?;
    let (p, rc) = precision_recall(&r.pr_real, fake, 3)?;
    Ok((fid, k, ks, p, rc))
}

/// What one sampler setting produced for the samples of one index range.
struct Drawn {
    features: Vec<Vec<f64>>,
    confidence: Vec<f64>,
    /// Top-1 classes of the classifier.
    top: Vec<u32>,
    /// Network evaluations summed over the samples (NFE per sample × samples; an integer,
    /// so that the sum does not depend on how the samples were batched).
    row_evals: u64,
    /// The samples of the range among `0..grid_images`, for the grid (None: none of them).
    first: Option<Tensor>,
    /// Class-conditional: samples the classifier put in their requested class.
    hits: Option<usize>,
}

/// One planned row: sampler, its options, NFE budget or tolerance, grid steps.
struct Planned {
    sampler: Sampler,
    opts: Options,
    budget: Option<usize>,
    tol: Option<f64>,
    steps: usize,
    /// Grid name, and its times when they do not come from the default grid.
    grid: String,
    times: Option<Vec<f64>>,
    /// The resolved time grid.
    ts: Vec<f64>,
}

impl Planned {
    /// The grid PNG this row writes: `grid-<sampler>-nfe<N>[-<grid>].png` at the grid
    /// budget, `grid-ddpm-<steps>steps.png` for the DDPM reference row.
    fn png(&self, grid_nfe: usize) -> Option<String> {
        if self.budget == Some(grid_nfe) {
            let suffix = if self.grid == "default" {
                String::new()
            } else {
                format!("-{}", self.grid)
            };
            Some(format!("grid-{}-nfe{grid_nfe}{suffix}.png", self.sampler))
        } else if self.sampler == Sampler::Ddpm && self.budget.is_none() {
            Some(format!("grid-ddpm-{}steps.png", self.steps))
        } else {
            None
        }
    }

    /// The row's description as a part records it.
    fn cell_plan(&self, grid_nfe: usize) -> CellPlan {
        let bits: Vec<String> = self
            .ts
            .iter()
            .map(|t| format!("{:x}", t.to_bits()))
            .collect();
        CellPlan {
            sampler: self.sampler.to_string(),
            grid: self.grid.clone(),
            nfe_budget: self.budget,
            tolerance: self.tol,
            steps: if self.sampler.is_adaptive() {
                0
            } else {
                self.ts.len() - 1
            },
            times_hash: crate::shard::config_hash(&bits),
            png: self.png(grid_nfe),
        }
    }
}

/// One row of the run as an eval part describes it (the same in every part of a run).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CellPlan {
    pub sampler: String,
    pub grid: String,
    pub nfe_budget: Option<usize>,
    pub tolerance: Option<f64>,
    /// The row's `steps` column (0 for an adaptive sampler).
    pub steps: usize,
    /// FNV-1a of the time grid's f64 bits: parts whose grids differ (a changed grid file)
    /// are of different runs.
    pub times_hash: String,
    /// The grid PNG the row writes, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub png: Option<String>,
}

/// What one shard's samples of a row came to (their per-sample results are in the part's
/// safetensors file as `cell<K>.features`, `cell<K>.confidence`, `cell<K>.top` and, for a
/// row with a grid PNG, `cell<K>.first`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CellDrawn {
    /// Network evaluations summed over the shard's samples.
    pub row_evals: u64,
    /// Class-conditional: samples put in their requested class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hits: Option<usize>,
    /// Seconds the shard spent sampling and taking features (not comparable to an
    /// unsharded run's wall clock: merge adds them up).
    pub seconds: f64,
}

/// One row in one eval part: its plan, and the shard's outcome.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CellPart {
    pub plan: CellPlan,
    /// None: the sampler could not run (see `skipped`); merge drops the row, as the
    /// unsharded run does.
    pub drawn: Option<CellDrawn>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// The eval section of a part manifest ([`crate::shard::Part::eval`]): everything `merge`
/// needs besides the per-sample arrays of `part-I-of-N.safetensors` (`test.features`: the
/// shard's share of the test split; `data.features`, `data.confidence`: its training
/// images of the `data:train` row; and the rows' `cell<K>.*`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalPart {
    /// The report's header (no rows).
    pub header: Report,
    pub settings: MetricSettings,
    /// This shard's test images [test_start, test_end) of test_total.
    pub test_start: usize,
    pub test_end: usize,
    pub test_total: usize,
    /// Seconds spent on the `data:train` row's training images.
    pub data_seconds: f64,
    pub cells: Vec<CellPart>,
}

/// Draws samples `start..end` (of the run's `o.n`) with one planned row, in batches of
/// `o.batch` from `start`: sample i from noise stream (seed, i), with class i mod classes.
#[allow(clippy::too_many_arguments)]
fn draw(
    o: &EvalOptions,
    m: &DiffusersModel,
    c: &Classifier,
    p: &Planned,
    start: usize,
    end: usize,
    grid_images: usize,
    device: &Device,
) -> Result<Drawn> {
    let item = m.item_shape(None)?;
    let count_all = end - start;
    let mut feats = Vec::with_capacity(count_all);
    let mut conf = Vec::with_capacity(count_all);
    let mut tops = Vec::with_capacity(count_all);
    let mut row_evals = 0u64;
    let mut first: Vec<Tensor> = Vec::new();
    let mut hits: Option<usize> = None;
    let pb = crate::io::progress::Progress::new(
        "eval",
        "sample",
        count_all as u64,
        "{bar:30} {pos}/{len} samples {msg} [{elapsed_precise}]",
    );
    pb.set_message(p.sampler.to_string());
    for b0 in (start..end).step_by(o.batch) {
        pb.set_position((b0 - start) as u64);
        let count = o.batch.min(end - b0);
        let mut noise = NoiseStreams::new(o.seed, b0, count);
        let x = noise.normal(&item, DType::F32, device)?;
        let labels = m.unet.num_classes().map(|k| eval_labels(k, b0, count));
        let guided = match (&labels, o.guidance) {
            (Some(l), Some(w)) => Some(crate::models::guidance::Guided::new(
                m,
                l.clone(),
                crate::models::guidance::Guided::default_null(m).expect("conditional"),
                w,
            )?),
            _ => None,
        };
        let model: &dyn crate::models::model::Model = match &guided {
            Some(g) => g,
            None => m,
        };
        let run = samplers::sample(
            model,
            m.schedule.as_ref(),
            p.sampler,
            &p.opts,
            &p.ts,
            x,
            &mut noise,
            None,
        )?;
        // run.nfe is per sample, averaged over the batch: × count it is the (integer)
        // number of network evaluations of the batch's samples.
        row_evals += (run.nfe * count as f64).round() as u64;
        let (f, cf, top) = features_and_confidence(c, &run.x)?;
        feats.extend(f);
        conf.extend(cf);
        if let Some(l) = &labels {
            *hits.get_or_insert(0) += top.iter().zip(l).filter(|(a, b)| a == b).count();
        }
        tops.extend(top);
        if b0 < grid_images {
            let k = count.min(grid_images - b0);
            first.push(run.x.narrow(0, 0, k)?.to_device(&Device::Cpu)?);
        }
    }
    pb.finish();
    Ok(Drawn {
        features: feats,
        confidence: conf,
        top: tops,
        row_evals,
        first: if first.is_empty() {
            None
        } else {
            Some(Tensor::cat(&first, 0)?)
        },
        hits,
    })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The `data:train` row's description.
fn data_plan() -> CellPlan {
    CellPlan {
        sampler: "data:train".into(),
        grid: default_grid_name(),
        nfe_budget: None,
        tolerance: None,
        steps: 0,
        times_hash: String::new(),
        png: None,
    }
}

/// The `data:train` row: the training images' features `fake` and confidences `conf`
/// against the reference, as a sampler's row ([`row_of`]).
fn data_row(
    set: &MetricSettings,
    r: &Reference,
    fake: &[Vec<f64>],
    conf: &[f64],
    secs: f64,
) -> Result<Row> {
    row_of(set, r, &data_plan(), fake, conf, 0, None, secs)
}

/// A table row from the per-sample results of all `n` samples of a row, in index order:
/// the feature metrics against `r`, the mean and the confident share of the top-1
/// probabilities `conf`, the class accuracy from `hits`, and the mean NFE from `row_evals`.
/// Its seconds are `drawn_seconds` plus the time the metrics take.
#[allow(clippy::too_many_arguments)]
fn row_of(
    set: &MetricSettings,
    r: &Reference,
    plan: &CellPlan,
    fake: &[Vec<f64>],
    conf: &[f64],
    row_evals: u64,
    hits: Option<usize>,
    drawn_seconds: f64,
) -> Result<Row> {
    let t0 = Instant::now();
    let n = fake.len();
    let (fid, k, ks, p, rc) = metrics(set, r, fake)?;
    Ok(Row {
        sampler: plan.sampler.clone(),
        grid: plan.grid.clone(),
        nfe_budget: plan.nfe_budget,
        tolerance: plan.tolerance,
        steps: plan.steps,
        nfe: row_evals as f64 / n as f64,
        n,
        fid,
        kid: k,
        kid_std: ks,
        precision: p,
        recall: rc,
        confidence: mean(conf),
        confident: Some(confident(conf)),
        seconds: drawn_seconds + t0.elapsed().as_secs_f64(),
        conditional_accuracy: hits.map(|h| h as f64 / n as f64),
    })
}

/// The progress line of a finished row (`drawn_secs`: its sampling and feature time).
fn print_row(row: &Row, drawn_secs: f64) {
    eprintln!(
        "eval: {:<18} NFE {:>6.1}  FID {:>8.3}  KID {:.2e}  P {:.3} R {:.3}  conf {:.3} (>{CONFIDENT}: {}){}  ({:.1} s: sampling and features {:.1} s, metrics {:.1} s)",
        name_of(row),
        row.nfe,
        row.fid,
        row.kid,
        row.precision,
        row.recall,
        row.confidence,
        row.confident.map_or("–".into(), |f| format!("{f:.3}")),
        row.conditional_accuracy
            .map_or(String::new(), |a| format!("  class acc {a:.3}")),
        row.seconds,
        drawn_secs,
        row.seconds - drawn_secs
    );
}

/// Images `start..end` of a set as a set of their own.
fn subset(set: &ImageSet, start: usize, end: usize) -> ImageSet {
    let d = set.h * set.w;
    ImageSet {
        n: end - start,
        h: set.h,
        w: set.w,
        images: set.images[start * d..end * d].to_vec(),
        labels: set.labels[start..end].to_vec(),
    }
}

/// Classifier features, top-1 confidences and classes of images `start..end` of a set (in
/// batches of 500 from `start`; each image on its own, so the batching does not matter).
#[allow(clippy::type_complexity)]
fn set_features(
    c: &Classifier,
    set: &ImageSet,
    start: usize,
    end: usize,
) -> Result<(Vec<Vec<f64>>, Vec<f64>, Vec<u32>)> {
    let mut fake = Vec::with_capacity(end - start);
    let mut conf = Vec::with_capacity(end - start);
    let mut tops = Vec::with_capacity(end - start);
    for b0 in (start..end).step_by(500) {
        let idx: Vec<usize> = (b0..(b0 + 500).min(end)).collect();
        let x = crate::models::classifier::image_batch(set, &idx, c.device())?;
        let (f, cf, top) = features_and_confidence(c, &x)?;
        fake.extend(f);
        conf.extend(cf);
        tops.extend(top);
    }
    Ok((fake, conf, tops))
}

/// The training split (its first n images make the `data:train` row).
fn load_train(o: &EvalOptions) -> Result<ImageSet> {
    let train = load_image_set(&o.data, Split::Train)?;
    if o.n > train.n {
        bail_option!(
            (keys::N, o.n),
            format!(
                ": the training split of '{}' has {} images",
                o.data, train.n
            )
        );
    }
    Ok(train)
}

/// Everything a run needs before it draws: the checked inputs, and its rows.
struct Setup {
    m: DiffusersModel,
    c: Classifier,
    test: ImageSet,
    runs: Vec<Planned>,
    /// The report without rows.
    header: Report,
}

/// Checks the options, loads the model, the classifier and the test split, and plans the
/// rows (their samplers, budgets and time grids). Writes nothing.
fn setup(o: &EvalOptions, device: &Device) -> Result<Setup> {
    if o.n < 4 || o.batch == 0 {
        bail_option!(
            (keys::N, o.n),
            " and ",
            (keys::BATCH, o.batch),
            ": n must be at least 4 and batch at least 1"
        );
    }
    let samplers: Vec<Sampler> = o
        .samplers
        .iter()
        .map(|s| {
            s.parse::<Sampler>()
                .map_err(|e| option_error!(keys::SAMPLERS, format!(": '{s}'")).caused_by(e))
        })
        .collect::<Result<_>>()?;
    if o.nfe.contains(&0) {
        bail_option!(keys::NFE, ": budgets must be at least 1");
    }
    if let Some(t) = o.tolerances.iter().find(|t| !(t.is_finite() && **t > 0.0)) {
        bail_option!(keys::TOLERANCES, format!(": {t} is not a positive number"));
    }
    let m = DiffusersModel::load(&o.model, DType::F32, device)?;
    match (m.unet.num_classes(), o.guidance) {
        (None, Some(_)) => bail_option!(
            keys::GUIDANCE,
            format!(
                ": {} is not class-conditional (its config has no num_class_embeds)",
                o.model.display()
            )
        ),
        (Some(k), None) => bail_option!(
            format!(
                "{} is class-conditional ({k} classes, the last the null class): give ",
                o.model.display()
            ),
            (keys::GUIDANCE, "W"),
            " (1 = the conditional model)"
        ),
        (Some(k), Some(w)) => {
            if k < 2 {
                bail!(
                    "{}: num_class_embeds = {k} leaves no class besides the null class",
                    o.model.display()
                );
            }
            crate::models::guidance::check_scale(w)?;
        }
        (None, None) => {}
    }
    let item = m.item_shape(None)?;
    if item != [1, 28, 28] {
        bail!(
            "{}: the model makes images of shape {item:?}; the classifier takes (1, 28, 28)",
            o.model.display()
        );
    }
    let c = Classifier::load(&o.classifier, device)?;
    let test = load_image_set(&o.data, Split::Test)?;
    if o.n > test.n {
        bail_option!(
            (keys::N, o.n),
            format!(": the test split of '{}' has {} images", o.data, test.n)
        );
    }
    let header = Report {
        metric: FID_LABEL.into(),
        model: o.model.display().to_string(),
        classifier: o.classifier.display().to_string(),
        classifier_test_accuracy: c.info.test_accuracy,
        reference: format!("test split of '{}' ({} images)", o.data, test.n),
        seed: o.seed,
        device: format!("{device:?}"),
        guidance: o.guidance,
        rows: Vec::new(),
    };
    let grid = m.default_grid()?;
    // The grids of the fixed-budget rows.
    let tuned: Vec<crate::sampling::gridfile::GridFile> =
        match (&o.grid_dir, o.grids.iter().any(|g| g == "tuned")) {
            (Some(dir), true) => {
                let mut files = Vec::new();
                let entries = std::fs::read_dir(dir).map_err(|e| {
                    option_error!(
                        (keys::GRID_DIR, dir.display().to_string()),
                        ": cannot read the folder"
                    )
                    .caused_by(e.into())
                })?;
                let mut paths: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "json"))
                    .collect();
                paths.sort();
                for p in paths {
                    files.push(crate::sampling::gridfile::GridFile::read(
                        &p,
                        m.schedule.as_ref(),
                    )?);
                }
                files
            }
            (None, true) => bail_option!(
                (keys::GRIDS, "tuned"),
                " needs ",
                keys::GRID_DIR,
                ", a folder of grid files"
            ),
            (Some(_), false) => bail_option!(
                keys::GRID_DIR,
                " does nothing without 'tuned' in ",
                keys::GRIDS
            ),
            (None, false) => Vec::new(),
        };
    for g in &o.grids {
        if !matches!(g.as_str(), "default" | "tuned") {
            g.parse::<crate::grid::Grid>().map_err(|e| {
                option_error!(
                    keys::GRIDS,
                    format!(": '{g}'; expected default, tuned or a grid name")
                )
                .caused_by(e)
            })?;
        }
    }
    let times_of = |g: &str, steps: usize| -> Result<Vec<f64>> {
        let tg = match g {
            "default" => grid.clone(),
            name => TimeGrid::Continuous {
                grid: name.parse()?,
                t_max: crate::schedule::Schedule::t_end(m.schedule.as_ref()),
                t_min: m.last_positive_time(),
                to_zero: true,
            },
        };
        tg.times(m.schedule.as_ref(), steps)
    };
    // Cheap rows first (budget-major, then tolerances loose to tight, the 1000-step
    // reference last), so that --max-seconds drops the most expensive rows.
    let mut runs: Vec<Planned> = Vec::new();
    let plan = |sampler, opts, budget, tol, steps| Planned {
        sampler,
        opts,
        budget,
        tol,
        steps,
        grid: "default".into(),
        times: None,
        ts: Vec::new(),
    };
    let mut budgets = o.nfe.clone();
    budgets.sort_unstable();
    budgets.dedup();
    for &b in &budgets {
        for &s in samplers.iter().filter(|s| !s.is_adaptive()) {
            let Some(steps) = s.steps_for_budget(b, true, &Options::default()) else {
                eprintln!("eval: {s} cannot fit NFE {b}; skipped");
                continue;
            };
            for g in &o.grids {
                let mut p = plan(s, Options::default(), Some(b), None, steps);
                p.grid = g.clone();
                if g == "tuned" {
                    match tuned
                        .iter()
                        .find(|f| f.sampler == s.to_string() && f.nfe == b)
                    {
                        Some(f) => p.times = Some(f.times.clone()),
                        None => {
                            eprintln!("eval: no grid file tuned for {s} at NFE {b}; row skipped");
                            continue;
                        }
                    }
                } else if g != "default" {
                    p.times = Some(times_of(g, steps)?);
                }
                runs.push(p);
            }
        }
    }
    let mut tolerances = o.tolerances.clone();
    tolerances.sort_by(|a, b| b.total_cmp(a));
    for &tol in &tolerances {
        for &s in samplers.iter().filter(|s| s.is_adaptive()) {
            let opts = Options {
                rtol: Some(tol),
                atol: Some(tol),
                ..Options::default()
            };
            // The whole trained grid: the adaptive solvers integrate from its first time to
            // its last trained step by themselves, then take one NFE for x̂0 at ᾱ = 1.
            runs.push(plan(
                s,
                opts,
                None,
                Some(tol),
                m.scheduler.num_train_timesteps,
            ));
        }
    }
    if o.reference_steps > 0 {
        runs.push(plan(
            Sampler::Ddpm,
            Options::default(),
            None,
            None,
            o.reference_steps,
        ));
    }
    for p in &mut runs {
        p.ts = match p.times.take() {
            Some(t) => t,
            None => grid.times(m.schedule.as_ref(), p.steps)?,
        };
    }
    Ok(Setup {
        m,
        c,
        test,
        runs,
        header,
    })
}

/// Runs the evaluation and writes its outputs; returns the report.
pub fn eval(o: &EvalOptions, device: &Device) -> Result<Report> {
    let Setup {
        m,
        c,
        test,
        runs,
        header,
    } = setup(o, device)?;
    std::fs::create_dir_all(&o.out)
        .with_context(|| format!("{}: cannot create the folder", o.out.display()))?;
    let set = MetricSettings::of(o);
    let reference = Reference::new(c.features_of_set(&test, test.n)?, o.n)?;
    let mut report = header;
    let started = Instant::now();
    let out_of_time = || {
        o.max_seconds
            .is_some_and(|s| started.elapsed().as_secs_f64() > s)
    };

    // The floor: n training images.
    let t0 = Instant::now();
    let train = load_train(o)?;
    let (fake, conf, _) = set_features(&c, &train, 0, o.n)?;
    let secs = t0.elapsed().as_secs_f64();
    report
        .rows
        .push(data_row(&set, &reference, &fake, &conf, secs)?);
    write_report(&o.out, &report)?;

    for p in &runs {
        if out_of_time() {
            eprintln!(
                "eval: the time limit (max_seconds) was reached; the remaining rows were not run"
            );
            break;
        }
        let t0 = Instant::now();
        // A sampler that cannot run on this model (e.g. a grid it does not take) loses its
        // row, not the whole table.
        let d = match draw(o, &m, &c, p, 0, o.n, set.grid_images, device) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("eval: {}, {} steps: skipped: {e:#}", p.sampler, p.steps);
                continue;
            }
        };
        let drawn_secs = t0.elapsed().as_secs_f64();
        let plan = p.cell_plan(o.grid_nfe);
        let row = row_of(
            &set,
            &reference,
            &plan,
            &d.features,
            &d.confidence,
            d.row_evals,
            d.hits,
            drawn_secs,
        )?;
        print_row(&row, drawn_secs);
        if let (Some(name), Some(first)) = (&plan.png, &d.first) {
            crate::io::write_png_grid(&o.out.join(name), first)?;
        }
        report.rows.push(row);
        write_report(&o.out, &report)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_confident_fraction_counts_top_1_probabilities_strictly_above_the_bound() {
        assert_eq!(confident(&[0.95, 0.5, 0.91, CONFIDENT]), 0.5);
        assert_eq!(confident(&[1.0; 3]), 1.0);
        assert_eq!(confident(&[]), 0.0);
    }
}
