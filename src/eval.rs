//! Sample quality vs NFE of a trained image model (`qtaylor eval`).
//!
//! For every sampler and NFE budget, `n` samples are drawn (sample `i` from noise stream
//! `(seed, i)`, so a sample does not depend on the batch it was drawn in), quantised to 8 bits
//! as a saved PNG would be, and compared with the test split of the data set in the 128-d
//! feature space of the project's own classifier ([`crate::classifier`]):
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

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::DiffusersModel;
use crate::classifier::Classifier;
use crate::data::{ImageSet, Split, load_image_set};
use crate::feature_metrics::precision_recall;
use crate::feature_metrics::{GaussianMoments, fid_from_moments, gaussian_moments, kid};
use crate::grid::{Final, TimeGrid};
use crate::plot::{Line, Panel, loglog_png};
use crate::rng::NoiseStreams;
use crate::samplers::{self, Options, Sampler};

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
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    pub seconds: f64,
    /// Class-conditional sampling: the fraction of samples the classifier assigns to the
    /// class they were asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditional_accuracy: Option<f64>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize, Deserialize)]
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

/// Images in [−1, 1] → the 8-bit grey levels a PNG would store → back to [−1, 1].
fn quantise(x: &Tensor) -> Result<Tensor> {
    let q = ((x.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?.round()?;
    Ok(((q / 127.5)? - 1.0)?)
}

/// Classifier features (rows), top-1 confidences and top-1 classes of a batch of images.
#[allow(clippy::type_complexity)]
fn features_and_confidence(
    c: &Classifier,
    x: &Tensor,
) -> Result<(Vec<Vec<f64>>, Vec<f64>, Vec<u32>)> {
    let (f, logits) = c.features_and_logits_by_image(&quantise(x)?)?;
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

fn metrics(o: &EvalOptions, r: &Reference, fake: &[Vec<f64>]) -> Result<(f64, f64, f64, f64, f64)> {
    let fid = fid_from_moments(&gaussian_moments(fake)?, &r.moments)?;
    let (k, ks) = kid(fake, &r.features, o.kid_subsets, o.kid_subset_size, o.seed)?;
    let (p, rc) = precision_recall(&r.pr_real, fake, 3)?;
    Ok((fid, k, ks, p, rc))
}

/// What one sampler setting produced.
struct Drawn {
    features: Vec<Vec<f64>>,
    confidence: Vec<f64>,
    /// Mean NFE per sample.
    nfe: f64,
    /// The first (up to) 64 samples, for the grid.
    first: Tensor,
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
}

/// Draws `o.n` samples with one sampler setting.
#[allow(clippy::too_many_arguments)]
fn draw(
    o: &EvalOptions,
    m: &DiffusersModel,
    c: &Classifier,
    sampler: Sampler,
    opts: &Options,
    ts: &[f64],
    device: &Device,
) -> Result<Drawn> {
    let item = m.item_shape(None)?;
    let mut feats = Vec::with_capacity(o.n);
    let mut conf = Vec::with_capacity(o.n);
    let mut nfe_total = 0.0;
    let mut first: Option<Tensor> = None;
    let mut hits: Option<usize> = None;
    let pb = crate::progress::Progress::new(
        "eval",
        "sample",
        o.n as u64,
        "{bar:30} {pos}/{len} samples {msg} [{elapsed_precise}]",
    );
    pb.set_message(sampler.to_string());
    for start in (0..o.n).step_by(o.batch) {
        pb.set_position(start as u64);
        let count = o.batch.min(o.n - start);
        let mut noise = NoiseStreams::new(o.seed, start, count);
        let x = noise.normal(&item, DType::F32, device)?;
        let labels = m.unet.num_classes().map(|k| eval_labels(k, start, count));
        let guided = match (&labels, o.guidance) {
            (Some(l), Some(w)) => Some(crate::guidance::Guided::new(
                m,
                l.clone(),
                crate::guidance::Guided::default_null(m).expect("conditional"),
                w,
            )?),
            _ => None,
        };
        let model: &dyn crate::model::Model = match &guided {
            Some(g) => g,
            None => m,
        };
        let run = samplers::sample(
            model,
            m.schedule.as_ref(),
            sampler,
            opts,
            ts,
            x,
            &mut noise,
            None,
        )?;
        nfe_total += run.nfe * count as f64;
        let (f, cf, top) = features_and_confidence(c, &run.x)?;
        feats.extend(f);
        conf.extend(cf);
        if let Some(l) = &labels {
            *hits.get_or_insert(0) += top.iter().zip(l).filter(|(a, b)| a == b).count();
        }
        if first.is_none() {
            first = Some(run.x.narrow(0, 0, count.min(64))?.to_device(&Device::Cpu)?);
        }
    }
    pb.finish();
    Ok(Drawn {
        features: feats,
        confidence: conf,
        nfe: nfe_total / o.n as f64,
        first: first.expect("n ≥ 1"),
        hits,
    })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Runs the evaluation and writes its outputs; returns the report.
pub fn eval(o: &EvalOptions, device: &Device) -> Result<Report> {
    if o.n < 4 || o.batch == 0 {
        bail!(
            "--n {} and --batch {}: n must be at least 4 and batch at least 1",
            o.n,
            o.batch
        );
    }
    let samplers: Vec<Sampler> = o
        .samplers
        .iter()
        .map(|s| {
            s.parse::<Sampler>()
                .with_context(|| format!("--samplers: '{s}'"))
        })
        .collect::<Result<_>>()?;
    if o.nfe.contains(&0) {
        bail!("--nfe: budgets must be at least 1");
    }
    if let Some(t) = o.tolerances.iter().find(|t| !(t.is_finite() && **t > 0.0)) {
        bail!("--tolerances: {t} is not a positive number");
    }
    let m = DiffusersModel::load(&o.model, DType::F32, device)?;
    match (m.unet.num_classes(), o.guidance) {
        (None, Some(_)) => bail!(
            "--guidance: {} is not class-conditional (its config has no num_class_embeds)",
            o.model.display()
        ),
        (Some(k), None) => bail!(
            "{} is class-conditional ({k} classes, the last the null class): give --guidance W (1 = the conditional model)",
            o.model.display()
        ),
        (Some(k), Some(w)) => {
            if k < 2 {
                bail!(
                    "{}: num_class_embeds = {k} leaves no class besides the null class",
                    o.model.display()
                );
            }
            crate::guidance::check_scale(w)?;
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
        bail!(
            "--n {}: the test split of '{}' has {} images",
            o.n,
            o.data,
            test.n
        );
    }
    std::fs::create_dir_all(&o.out)
        .with_context(|| format!("{}: cannot create the folder", o.out.display()))?;
    let features = c.features_of_set(&test, test.n)?;
    let reference = Reference {
        moments: gaussian_moments(&features)?,
        pr_real: features[..o.n].to_vec(),
        features,
    };
    let mut report = Report {
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
    let started = Instant::now();
    let out_of_time = || {
        o.max_seconds
            .is_some_and(|s| started.elapsed().as_secs_f64() > s)
    };

    // The floor: n training images.
    let t0 = Instant::now();
    let train = load_image_set(&o.data, Split::Train)?;
    report.rows.push(data_row(o, &c, &reference, &train, t0)?);
    write_report(&o.out, &report)?;

    let grid = TimeGrid::Discrete {
        spacing: m.scheduler.timestep_spacing.parse()?,
        offset: m.scheduler.steps_offset,
        timesteps: None,
        train_steps: m.scheduler.num_train_timesteps,
        last: Final::Zero,
    };
    // The grids of the fixed-budget rows.
    let train_steps = m.scheduler.num_train_timesteps;
    let tuned: Vec<crate::gridfile::GridFile> =
        match (&o.grid_dir, o.grids.iter().any(|g| g == "tuned")) {
            (Some(dir), true) => {
                let mut files = Vec::new();
                let entries = std::fs::read_dir(dir).with_context(|| {
                    format!("--grid-dir {}: cannot read the folder", dir.display())
                })?;
                let mut paths: Vec<PathBuf> = entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|e| e == "json"))
                    .collect();
                paths.sort();
                for p in paths {
                    files.push(crate::gridfile::GridFile::read(&p, m.schedule.as_ref())?);
                }
                files
            }
            (None, true) => bail!("--grids tuned needs --grid-dir, a folder of grid files"),
            (Some(_), false) => bail!("--grid-dir does nothing without 'tuned' in --grids"),
            (None, false) => Vec::new(),
        };
    for g in &o.grids {
        if !matches!(g.as_str(), "default" | "tuned") {
            g.parse::<crate::grid::Grid>().with_context(|| {
                format!("--grids: '{g}'; expected default, tuned or a grid name")
            })?;
        }
    }
    let times_of = |g: &str, steps: usize| -> Result<Vec<f64>> {
        let tg = match g {
            "default" => grid.clone(),
            name => TimeGrid::Continuous {
                grid: name.parse()?,
                t_max: crate::schedule::Schedule::t_end(m.schedule.as_ref()),
                t_min: crate::grid::time_of_timestep(0.0, train_steps),
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
    for Planned {
        sampler: s,
        opts,
        budget,
        tol,
        steps,
        grid: grid_name,
        times,
    } in runs
    {
        if out_of_time() {
            eprintln!("eval: --max-seconds reached; the remaining rows were not run");
            break;
        }
        let t0 = Instant::now();
        let ts = match times {
            Some(t) => t,
            None => grid.times(m.schedule.as_ref(), steps)?,
        };
        // A sampler that cannot run on this model (e.g. a grid it does not take) loses its
        // row, not the whole table.
        let Drawn {
            features: fake,
            confidence: conf,
            nfe,
            first,
            hits,
        } = match draw(o, &m, &c, s, &opts, &ts, device) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("eval: {s}, {steps} steps: skipped: {e:#}");
                continue;
            }
        };
        let drawn_secs = t0.elapsed().as_secs_f64();
        let (fid, k, ks, p, rc) = metrics(o, &reference, &fake)?;
        let row = Row {
            sampler: s.to_string(),
            grid: grid_name.clone(),
            nfe_budget: budget,
            tolerance: tol,
            steps: if s.is_adaptive() { 0 } else { ts.len() - 1 },
            nfe,
            n: o.n,
            fid,
            kid: k,
            kid_std: ks,
            precision: p,
            recall: rc,
            confidence: mean(&conf),
            confident: Some(confident(&conf)),
            seconds: t0.elapsed().as_secs_f64(),
            conditional_accuracy: hits.map(|h| h as f64 / o.n as f64),
        };
        eprintln!(
            "eval: {:<18} NFE {:>6.1}  FID {:>8.3}  KID {:.2e}  P {:.3} R {:.3}  conf {:.3} (>{CONFIDENT}: {}){}  ({:.1} s: sampling and features {:.1} s, metrics {:.1} s)",
            name_of(&row),
            row.nfe,
            fid,
            k,
            p,
            rc,
            row.confidence,
            row.confident.map_or("–".into(), |f| format!("{f:.3}")),
            row.conditional_accuracy
                .map_or(String::new(), |a| format!("  class acc {a:.3}")),
            row.seconds,
            drawn_secs,
            row.seconds - drawn_secs
        );
        if budget == Some(o.grid_nfe) {
            let suffix = if grid_name == "default" {
                String::new()
            } else {
                format!("-{grid_name}")
            };
            crate::io::write_png_grid(
                &o.out
                    .join(format!("grid-{s}-nfe{}{suffix}.png", o.grid_nfe)),
                &first,
            )?;
        }
        if s == Sampler::Ddpm && budget.is_none() {
            crate::io::write_png_grid(&o.out.join(format!("grid-ddpm-{steps}steps.png")), &first)?;
        }
        report.rows.push(row);
        write_report(&o.out, &report)?;
    }
    Ok(report)
}

fn data_row(
    o: &EvalOptions,
    c: &Classifier,
    r: &Reference,
    train: &ImageSet,
    t0: Instant,
) -> Result<Row> {
    if o.n > train.n {
        bail!(
            "--n {}: the training split of '{}' has {} images",
            o.n,
            o.data,
            train.n
        );
    }
    let mut fake = Vec::with_capacity(o.n);
    let mut conf = Vec::with_capacity(o.n);
    for start in (0..o.n).step_by(500) {
        let idx: Vec<usize> = (start..(start + 500).min(o.n)).collect();
        let x = crate::classifier::image_batch(train, &idx, c.device())?;
        let (f, cf, _) = features_and_confidence(c, &x)?;
        fake.extend(f);
        conf.extend(cf);
    }
    let (fid, k, ks, p, rc) = metrics(o, r, &fake)?;
    Ok(Row {
        sampler: "data:train".into(),
        grid: default_grid_name(),
        nfe_budget: None,
        tolerance: None,
        steps: 0,
        nfe: 0.0,
        n: o.n,
        fid,
        kid: k,
        kid_std: ks,
        precision: p,
        recall: rc,
        confidence: mean(&conf),
        confident: Some(confident(&conf)),
        seconds: t0.elapsed().as_secs_f64(),
        conditional_accuracy: None,
    })
}

fn default_grid_name() -> String {
    "default".into()
}

/// The sampler with its grid when it is not the default.
fn name_of(r: &Row) -> String {
    if r.grid == "default" {
        r.sampler.clone()
    } else {
        format!("{} [{}]", r.sampler, r.grid)
    }
}

fn label(r: &Row) -> String {
    match (r.nfe_budget, r.tolerance) {
        (_, Some(t)) => format!("{} (tol {t:.0e})", r.sampler),
        (None, None) if r.sampler == "ddpm" => format!("ddpm ({} steps, reference)", r.steps),
        (None, None) => format!(
            "{} (n real training images; the classifier was trained on them)",
            r.sampler
        ),
        _ => name_of(r),
    }
}

/// CSV text of the rows.
pub fn csv(report: &Report) -> String {
    let mut s = String::from(
        "sampler,grid,nfe_budget,tolerance,steps,nfe,n,fid_mnist_features,kid,kid_std,precision,recall,confidence,seconds,conditional_accuracy,confident\n",
    );
    for r in &report.rows {
        s += &format!(
            "{},{},{},{},{},{:.2},{},{:.6},{:.6e},{:.3e},{:.4},{:.4},{:.4},{:.2},{},{}\n",
            r.sampler,
            r.grid,
            r.nfe_budget.map_or(String::new(), |b| b.to_string()),
            r.tolerance.map_or(String::new(), |t| format!("{t:e}")),
            r.steps,
            r.nfe,
            r.n,
            r.fid,
            r.kid,
            r.kid_std,
            r.precision,
            r.recall,
            r.confidence,
            r.seconds,
            r.conditional_accuracy
                .map_or(String::new(), |a| format!("{a:.4}")),
            r.confident.map_or(String::new(), |f| format!("{f:.4}"))
        );
    }
    s
}

/// Markdown report: the FID table (samplers × NFE budgets) and the full rows.
pub fn markdown(report: &Report) -> String {
    let mut s = format!(
        "# Sample quality vs NFE\n\n**{}**: Fréchet distance between Gaussians fitted to the \
         128-d penultimate features of the project's MNIST classifier ({}, test accuracy {:.2} %), \
         samples vs the {}. Model `{}`, seed {}, device {}.\n\n",
        report.metric,
        report.classifier,
        100.0 * report.classifier_test_accuracy,
        report.reference,
        report.model,
        report.seed,
        report.device
    );
    // Pivot: rows = samplers with budgets, columns = budgets.
    let mut budgets: Vec<usize> = report.rows.iter().filter_map(|r| r.nfe_budget).collect();
    budgets.sort_unstable();
    budgets.dedup();
    let mut names: Vec<String> = Vec::new();
    for r in report.rows.iter().filter(|r| r.nfe_budget.is_some()) {
        if !names.contains(&name_of(r)) {
            names.push(name_of(r));
        }
    }
    if !names.is_empty() {
        s += &format!("## {} by NFE\n\n| sampler |", report.metric);
        for b in &budgets {
            s += &format!(" {b} |");
        }
        s += "\n|---|";
        s += &"---:|".repeat(budgets.len());
        s += "\n";
        for name in &names {
            s += &format!("| {name} |");
            for b in &budgets {
                match report
                    .rows
                    .iter()
                    .find(|r| &name_of(r) == name && r.nfe_budget == Some(*b))
                {
                    Some(r) => s += &format!(" {:.3} |", r.fid),
                    None => s += " – |",
                }
            }
            s += "\n";
        }
        s += "\n";
    }
    let cond = report.guidance.is_some();
    if let Some(w) = report.guidance {
        s += &format!(
            "Class-conditional model, classifier-free guidance w = {w}: sample i asks for class i mod (classes); \
             conditional accuracy is the fraction of samples the classifier assigns to the class asked for. \
             NFE counts guided calls (2 network rows per sample when w is not 0 or 1).\n\n"
        );
    }
    s += "## All rows\n\n| run | steps | NFE | FID (MNIST features) | KID | precision | recall | confidence | confident | n | seconds |";
    s += if cond {
        " conditional accuracy |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    } else {
        "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    };
    for r in &report.rows {
        s += &format!(
            "| {} | {} | {:.1} | {:.3} | {:.2e} ± {:.1e} | {:.3} | {:.3} | {:.3} | {} | {} | {:.1} |",
            label(r),
            r.steps,
            r.nfe,
            r.fid,
            r.kid,
            r.kid_std,
            r.precision,
            r.recall,
            r.confidence,
            r.confident.map_or("–".into(), |f| format!("{f:.3}")),
            r.n,
            r.seconds
        );
        if cond {
            s += &r
                .conditional_accuracy
                .map_or(" – |".to_string(), |a| format!(" {a:.3} |"));
        }
        s += "\n";
    }
    s += "\nKID: unbiased MMD² with the cubic kernel, mean ± std over random subsets. \
          Precision/recall: k = 3 nearest neighbours (Kynkäänniemi et al. 2019) against the \
          first n test images. Confidence: the classifier's mean top-1 probability; confident: \
          the fraction of samples whose top-1 probability is above 0.9. Samples are quantised \
          to 8 bits before the features are taken.\n";
    s
}

/// Re-renders `results.csv`, `report.md` and `fid_vs_nfe.png` of `dir` from its
/// `results.json` (after merging or editing rows of several runs).
pub fn render(dir: &Path) -> Result<Report> {
    let file = dir.join("results.json");
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("{}: cannot read the file", file.display()))?;
    let report: Report = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a results.json written by qtaylor eval",
            file.display()
        )
    })?;
    write_report(dir, &report)?;
    Ok(report)
}

fn write_report(dir: &Path, report: &Report) -> Result<()> {
    use crate::io::write_atomic;
    write_atomic(&dir.join("results.csv"), csv(report).as_bytes())?;
    write_atomic(
        &dir.join("results.json"),
        serde_json::to_string_pretty(report)?.as_bytes(),
    )?;
    write_atomic(&dir.join("report.md"), markdown(report).as_bytes())?;
    let mut lines: Vec<Line> = Vec::new();
    for r in &report.rows {
        if r.sampler.starts_with("data:") || (r.sampler == "ddpm" && r.nfe_budget.is_none()) {
            continue;
        }
        let name = if r.tolerance.is_some() {
            format!("{} (tolerances)", r.sampler)
        } else {
            name_of(r)
        };
        match lines.iter_mut().find(|l| l.label == name) {
            Some(l) => l.points.push((r.nfe, r.fid)),
            None => lines.push(Line {
                label: name,
                points: vec![(r.nfe, r.fid)],
            }),
        }
    }
    for l in &mut lines {
        l.points.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let floor = report
        .rows
        .iter()
        .find(|r| r.sampler == "data:train")
        .map(|r| (r.fid, format!("train images (n={})", r.n)));
    if !lines.is_empty() {
        loglog_png(
            &dir.join("fid_vs_nfe.png"),
            &[Panel {
                title: FID_LABEL.into(),
                y_label: "FID (MNIST features)".into(),
                lines,
                floor,
            }],
        )?;
    }
    Ok(())
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
