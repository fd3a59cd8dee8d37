//! `tune`: a grid for one sampler, model and NFE ([`run`]), on one device or data parallel
//! on several, written as a grid file with a report of the held-out errors.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;

use crate::bail_option;
use crate::io::progress::Log;
use crate::keys::{self, Message};
use crate::models::checkpoint::DiffusersModel;
use crate::models::classifier::Classifier;
use crate::models::guidance::Guided;
use crate::option_error;
use crate::sampling::gridfile::GridFile;
use crate::sampling::samplers::Sampler;
use crate::sampling::spec::{Loaded, RunSettings, model_id, state_dtype};
use crate::schedule::Schedule;
use crate::tune::objective::{ClassifierFeatures, Features, Objective, StateFeatures};
use crate::tune::{Score, SetModels, Share, TuneConfig, Tuned, check_tunable, tune};

/// A tuning run as a front end parsed it: the run (sampler, model or problem, schedule,
/// grid defaults, options, dtype, seed) and the tuner's own settings.
#[derive(Clone, Debug)]
pub struct TuneSettings {
    pub run: RunSettings,
    /// The NFE budget.
    pub nfe: usize,
    /// The teacher, `SAMPLER:STEPS`.
    pub teacher: String,
    /// Tuning and held-out samples.
    pub samples: usize,
    pub holdout: usize,
    /// Candidate intervals of the fine grid.
    pub candidates: usize,
    /// Sweeps of the global refinement.
    pub refine_sweeps: usize,
    /// The refinement's objective: l2, kid or fd (None: fd where there is a feature space,
    /// else l2, with a note).
    pub objective: Option<String>,
    /// Sweeps without a held-out improvement before the refinement stops.
    pub patience: usize,
    /// The feature classifier of kid and fd on image checkpoints (default
    /// assets/classifier-mnist).
    pub classifier: Option<PathBuf>,
    /// The grid file to write.
    pub out: PathBuf,
    /// Data-parallel tuning on these devices (instead of the run's device).
    pub devices: Option<String>,
}

/// `SAMPLER:STEPS`.
fn parse_teacher(t: &str) -> Result<(Sampler, usize)> {
    match t.split_once(':') {
        Some((s, n)) => Ok((
            s.parse::<Sampler>()?,
            n.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| {
                option_error!(
                    (keys::TEACHER, t),
                    format!(": '{n}' is not a positive step count")
                )
            })?,
        )),
        None => bail_option!(
            (keys::TEACHER, t),
            ": expected SAMPLER:STEPS, e.g. dpmpp-3m:100"
        ),
    }
}

/// Tunes the grid `s` describes and writes the grid file. `note` gets notes for the user
/// and `log` the progress; returns the report's lines.
pub fn run(s: &TuneSettings, log: &mut Log, note: &mut dyn FnMut(&Message)) -> Result<Vec<String>> {
    let r = &s.run;
    let sampler = r.sampler()?;
    let (teacher, teacher_steps) = parse_teacher(&s.teacher)?;
    for (key, v) in [(keys::SAMPLES, s.samples), (keys::HOLDOUT, s.holdout)] {
        if v == 0 {
            bail_option!((key, 0usize), ": at least one sample is needed");
        }
    }
    if s.patience == 0 {
        bail_option!(
            (keys::PATIENCE, 0usize),
            ": at least one sweep without a held-out gain must be allowed (a large value runs every sweep)"
        );
    }
    let ext = s.out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !ext.eq_ignore_ascii_case("json") {
        bail_option!(
            (keys::OUT, s.out.display().to_string()),
            ": a grid file is JSON (.json)"
        );
    }
    crate::io::check_out_dir(keys::OUT, &s.out)?;
    let dtype = state_dtype(keys::DTYPE, r.dtype.as_deref().unwrap_or("f32"))?;
    let devices = match &s.devices {
        Some(list) => crate::gpu::device::by_names(list)?,
        None => vec![crate::gpu::device::by_name(
            r.device.as_deref().unwrap_or("cpu"),
        )?],
    };
    let device = devices[0].clone();
    if r.model.is_some() && r.problem.is_some() {
        bail_option!("give ", keys::MODEL, " or ", keys::PROBLEM, ", not both");
    }
    let sampled = r.load(&device)?;
    let schedule = sampled.schedule.clone();
    let (_, grid, _) = r.time_grid(&sampled)?;
    let t_min = match &sampled.discrete {
        Some(d) => crate::grid::time_of_timestep(0.0, d.train_steps),
        None => r.grid.t_min.unwrap_or(crate::config::DEFAULT_T_MIN),
    };
    let opts = r.options(&[sampler], &sampled)?;
    let item = match &sampled.loaded {
        Loaded::Checkpoint(m) => m.item_shape(None)?,
        Loaded::Problem(p) => p.item_shape(),
    };
    let has_features = sampled.loaded.checkpoint().is_none() || item == [1, 28, 28];
    let objective: Objective = match &s.objective {
        Some(o) => o.parse()?,
        None if has_features => Objective::Fd,
        None => {
            note(&option_error!(
                "note: ",
                (keys::OBJECTIVE, "l2"),
                format!(
                    " by default here: fd and kid compare the features of a classifier of 28x28 grey images, and this model makes images of shape {item:?}"
                )
            ));
            Objective::L2
        }
    };
    let checkpoint = sampled.loaded.checkpoint();
    let classes = r.classes(checkpoint.and_then(|m| m.unet.num_classes()))?;
    let guidance = r.guidance.guidance.unwrap_or(1.0);
    if let Some(m) = checkpoint
        && m.unet.num_classes().is_some()
        && classes.is_none()
    {
        note(&option_error!(format!(
            "note: the model is class-conditional; tuning its unconditional model (null class {}); --classes all --guidance W tunes the guided one",
            Guided::default_null(m).expect("conditional")
        )));
    }
    if let Some(c) = &s.classifier
        && !(objective.uses_features() && checkpoint.is_some())
    {
        bail_option!(
            (keys::CLASSIFIER, c.display().to_string()),
            format!(
                ": only the kid and fd objectives on a checkpoint compare classifier features (this run: {objective} on {})",
                if checkpoint.is_some() {
                    "a checkpoint"
                } else {
                    "a problem"
                }
            )
        );
    }
    // The feature map of a distribution objective.
    let classifier = match (objective.uses_features(), checkpoint) {
        (true, Some(_)) => {
            let path = s
                .classifier
                .clone()
                .unwrap_or_else(|| PathBuf::from("assets/classifier-mnist"));
            if !has_features {
                bail_option!(
                    (keys::OBJECTIVE, objective.to_string()),
                    format!(
                        ": on a checkpoint it compares the features of a classifier of 28x28 grey images, and this model makes images of shape {item:?} (use l2)"
                    )
                );
            }
            Some((Classifier::load(&path, &device)?, path))
        }
        _ => None,
    };
    let classifier_features = classifier.as_ref().map(|(c, path)| ClassifierFeatures {
        classifier: c,
        name: path.display().to_string(),
    });
    let features: Option<&dyn Features> = match (objective.uses_features(), &classifier_features) {
        (false, _) => None,
        (true, Some(c)) => Some(c),
        (true, None) => Some(&StateFeatures),
    };
    // The other replicas' copies of what is tuned (data-parallel tuning), loaded as the
    // first one is.
    let copies = devices[1..]
        .iter()
        .map(|d| r.load(d))
        .collect::<Result<Vec<_>>>()?;
    check_tunable(sampler, &opts)?;
    let zero = grid.ends_at_zero();
    let steps = sampler
        .steps_for_budget(s.nfe, zero, &opts)
        .ok_or_else(|| {
            option_error!(
                (keys::NFE, s.nfe),
                format!(": not even one step of {sampler} fits")
            )
        })?;
    let default_times = grid.times(schedule.as_ref(), steps)?;
    let cfg = TuneConfig {
        sampler,
        objective,
        patience: s.patience,
        opts: opts.clone(),
        default_times: default_times.clone(),
        t_min,
        teacher,
        teacher_steps,
        candidates: s.candidates,
        refine_sweeps: s.refine_sweeps,
        samples: s.samples,
        holdout: s.holdout,
        seed: r.seed.unwrap_or(0),
        dtype,
        device: device.clone(),
    };
    let guided = Guidance {
        classes: &classes,
        w: guidance,
    };
    let t = if devices.len() == 1 {
        let share = Share::whole();
        let pair = guided.pair(checkpoint, share, &cfg)?;
        let models = match &pair {
            Some((a, b)) => SetModels {
                tuning: a,
                holdout: b,
            },
            None => SetModels {
                tuning: sampled.loaded.model(),
                holdout: sampled.loaded.model(),
            },
        };
        tune(
            models,
            schedule.as_ref(),
            &item,
            &cfg,
            features,
            share,
            &mut |m| log.line(m),
        )?
    } else {
        let mut loaded = vec![&sampled.loaded];
        loaded.extend(copies.iter().map(|c| &c.loaded));
        on_devices(
            &loaded,
            &guided,
            &devices,
            schedule.as_ref(),
            &item,
            &cfg,
            features,
            log,
        )?
    };
    let device_name = s
        .devices
        .as_deref()
        .or(r.device.as_deref())
        .unwrap_or("cpu")
        .to_string();
    let nfe = sampler.nfe(steps, zero, &opts).unwrap_or(s.nfe);
    let score = |sc: &Score| serde_json::json!({"objective": sc.objective, "l2": sc.l2});
    let tuning = serde_json::json!({
        "method": "GITS-style dynamic programming over a fine candidate grid (arXiv 2405.11326), then a compass search on the full run's objective, stopped on held-out samples",
        "objective": objective.to_string(),
        "objective_measures": objective.describe(),
        "features": features.map(|f| f.describe()),
        "classes": classes.as_ref().map(|(c, _)| c.clone()),
        "null_class": classes.as_ref().map(|(_, n)| *n),
        "guidance": classes.as_ref().map(|_| guidance),
        "teacher": s.teacher,
        "teacher_steps": t.teacher_steps,
        "candidates": s.candidates,
        "refine_sweeps": s.refine_sweeps,
        "patience": s.patience,
        "refine_from": t.refine_from,
        "refine_evals": t.refine_evals,
        "sweeps": t.sweeps.iter().map(|w| serde_json::json!({
            "sweep": w.sweep, "tuning_objective": w.tuning, "holdout": score(&w.holdout),
        })).collect::<Vec<_>>(),
        "best_sweep": t.best_sweep,
        "gits_times": t.gits_times,
        "samples": s.samples,
        "holdout": s.holdout,
        "seed": r.seed.unwrap_or(0),
        "default_grid": grid.describe(),
        "default_times": default_times,
        "tuning_default": score(&t.tuning_default),
        "tuning_gits": score(&t.tuning_gits),
        "tuning_tuned": score(&t.tuning_tuned),
        "holdout_default": score(&t.holdout_default),
        "holdout_gits": score(&t.holdout_gits),
        "holdout_tuned": score(&t.holdout_tuned),
        "seconds": t.seconds,
        "device": device_name,
    });
    let file = GridFile::new(
        &sampler.to_string(),
        nfe,
        schedule.as_ref(),
        &model_id(&r.source()),
        t.times.clone(),
        tuning,
    );
    file.write(&s.out)?;
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
    Ok(vec![
        format!(
            "{sampler} at {nfe} NFE ({steps} steps), teacher {}",
            s.teacher
        ),
        format!("  default ({}): {}", grid.describe(), show(&default_times)),
        format!("  dynamic program: {}", show(&t.gits_times)),
        format!("  tuned:   {}", show(&t.times)),
        format!(
            "  held-out {} ({} samples): default {:.5}, dynamic program {:.5}, tuned {:.5}{}",
            objective.describe(),
            s.holdout,
            t.holdout_default.objective,
            t.holdout_gits.objective,
            t.holdout_tuned.objective,
            // KID's unbiased estimate can be negative: a ratio only of positive values
            if t.holdout_default.objective > 0.0 && t.holdout_tuned.objective >= 0.0 {
                format!(
                    " ({:.2}x)",
                    t.holdout_tuned.objective / t.holdout_default.objective
                )
            } else {
                String::new()
            }
        ),
        format!(
            "  tuning-sample {} ({} samples): default {:.5}, dynamic program {:.5}, tuned {:.5}",
            objective.describe(),
            s.samples,
            t.tuning_default.objective,
            t.tuning_gits.objective,
            t.tuning_tuned.objective
        ),
        format!(
            "  held-out end-point RMSE vs teacher: default {:.5}, dynamic program {:.5}, tuned {:.5} ({:.2}x)",
            t.holdout_default.l2,
            t.holdout_gits.l2,
            t.holdout_tuned.l2,
            t.holdout_tuned.l2 / t.holdout_default.l2
        ),
        format!(
            "  refinement from the {} grid: {} evaluations, {} sweeps, held-out best after sweep {}",
            t.refine_from,
            t.refine_evals,
            t.sweeps.len(),
            t.best_sweep
        ),
        format!(
            "  tuning time {:.1} s on {} ({} samples, {} candidates) -> {}",
            t.seconds,
            device_name,
            s.samples,
            s.candidates,
            s.out.display()
        ),
    ])
}

/// Classes and guidance of a class-conditional checkpoint's tuning.
struct Guidance<'a> {
    classes: &'a Option<(Vec<u32>, u32)>,
    w: f64,
}

impl Guidance<'_> {
    /// The models of a replica's two sample sets: with classes, sample i of each set asks
    /// for class `classes[i mod len]` (as eval's sample i asks for class i mod 10) under
    /// guidance w; a class-conditional model without classes: its unconditional model; any
    /// other model: None (the model itself).
    fn pair<'m>(
        &self,
        m: Option<&'m DiffusersModel>,
        share: Share,
        cfg: &TuneConfig,
    ) -> Result<Option<(Guided<'m>, Guided<'m>)>> {
        let Some(m) = m.filter(|m| m.unet.num_classes().is_some()) else {
            return Ok(None);
        };
        let Some((list, null)) = self.classes else {
            return Ok(Some((Guided::unconditional(m)?, Guided::unconditional(m)?)));
        };
        let labels = |n: usize| -> Vec<u32> {
            let (lo, hi) = share.range(n);
            (lo..hi).map(|i| list[i % list.len()]).collect()
        };
        Ok(Some((
            Guided::new(m, labels(cfg.samples), *null, self.w)?,
            Guided::new(m, labels(cfg.holdout), *null, self.w)?,
        )))
    }
}

/// Data-parallel tuning: one replica per device, replica `r` on `loaded[r]` (a copy of the
/// model on `devices[r]`), in threads that gather their per-sample errors and features
/// through a [`crate::tensor::data_parallel::Group`]; replica 0 logs and its result is
/// returned.
#[allow(clippy::too_many_arguments)]
fn on_devices(
    loaded: &[&Loaded],
    guidance: &Guidance,
    devices: &[Device],
    schedule: &dyn Schedule,
    item: &[usize],
    cfg: &TuneConfig,
    features: Option<&dyn Features>,
    log: &mut Log,
) -> Result<Tuned> {
    let log = std::sync::Mutex::new(log);
    crate::tensor::data_parallel::run_replicas(devices, |rank, device, group| {
        let mut cfg = cfg.clone();
        cfg.device = device.clone();
        let share = Share {
            rank,
            group: Some(group),
        };
        let mut progress = |m: &str| {
            if rank == 0 {
                log.lock().unwrap_or_else(|p| p.into_inner()).line(m)
            }
        };
        let pair = guidance.pair(loaded[rank].checkpoint(), share, &cfg)?;
        let models = match &pair {
            Some((a, b)) => SetModels {
                tuning: a,
                holdout: b,
            },
            None => SetModels {
                tuning: loaded[rank].model(),
                holdout: loaded[rank].model(),
            },
        };
        tune(models, schedule, item, &cfg, features, share, &mut progress)
    })
}
