//! `tune`: a grid for one sampler, model and NFE ([`run`]), on one device or data parallel
//! on several, written as a grid file with a report of the held-out errors.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;

use crate::bail_option;
use crate::io::progress::Log;
use crate::keys::{self, Message};
use crate::models::guidance::Guided;
use crate::models::model::Model;
use crate::option_error;
use crate::sampling::gridfile::GridFile;
use crate::sampling::samplers::Sampler;
use crate::sampling::spec::{Loaded, RunSettings, model_id, state_dtype};
use crate::schedule::Schedule;
use crate::tune::{Share, TuneConfig, Tuned, check_tunable, tune};

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
    let (item, guided) = match &sampled.loaded {
        Loaded::Checkpoint(m) => {
            let guided = if m.unet.num_classes().is_some() {
                let g = Guided::unconditional(m)?;
                note(&option_error!(format!(
                    "note: the model is class-conditional; tuning its unconditional model (null class {})",
                    g.null()
                )));
                Some(g)
            } else {
                None
            };
            (m.item_shape(None)?, guided)
        }
        Loaded::Problem(p) => (p.item_shape(), None),
    };
    let model: &dyn Model = match &guided {
        Some(g) => g,
        None => sampled.loaded.model(),
    };
    // The other replicas' copies of what is tuned (data-parallel tuning), loaded as the
    // first one is, each a class-conditional model's unconditional one too.
    let copies = devices[1..]
        .iter()
        .map(|d| r.load(d))
        .collect::<Result<Vec<_>>>()?;
    let guided_copies = copies
        .iter()
        .map(|c| match c.loaded.checkpoint() {
            Some(m) if m.unet.num_classes().is_some() => Guided::unconditional(m).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut models: Vec<&dyn Model> = vec![model];
    for (c, g) in copies.iter().zip(&guided_copies) {
        models.push(match g {
            Some(g) => g,
            None => c.loaded.model(),
        });
    }
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
    let t = if devices.len() == 1 {
        tune(
            model,
            schedule.as_ref(),
            &item,
            &cfg,
            Share::whole(),
            &mut |m| log.line(m),
        )?
    } else {
        on_devices(&models, &devices, schedule.as_ref(), &item, &cfg, log)?
    };
    let device_name = s
        .devices
        .as_deref()
        .or(r.device.as_deref())
        .unwrap_or("cpu")
        .to_string();
    let nfe = sampler.nfe(steps, zero, &opts).unwrap_or(s.nfe);
    let tuning = serde_json::json!({
        "method": "GITS-style dynamic programming over a fine candidate grid (arXiv 2405.11326), then a compass search on the full run's end-point error",
        "teacher": s.teacher,
        "teacher_steps": t.teacher_steps,
        "candidates": s.candidates,
        "refine_sweeps": s.refine_sweeps,
        "refine_evals": t.refine_evals,
        "tuning_error_start": t.refine_start,
        "tuning_error_end": t.refine_end,
        "gits_times": t.gits_times,
        "error_gits": t.error_gits,
        "samples": s.samples,
        "holdout": s.holdout,
        "seed": r.seed.unwrap_or(0),
        "default_grid": grid.describe(),
        "default_times": default_times,
        "error_default": t.error_default,
        "error_tuned": t.error_tuned,
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
            "  held-out end-point RMSE vs teacher ({} samples): default {:.5}, dynamic program {:.5}, tuned {:.5} ({:.2}x)",
            s.holdout,
            t.error_default,
            t.error_gits,
            t.error_tuned,
            t.error_tuned / t.error_default
        ),
        format!(
            "  refinement: {} evaluations, tuning-sample error {:.5} -> {:.5}",
            t.refine_evals, t.refine_start, t.refine_end
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

/// Data-parallel tuning: one replica per device, replica `r` on `models[r]` (a copy of the
/// model on `devices[r]`), in threads that gather their per-sample errors through a
/// [`crate::tensor::data_parallel::Group`]; replica 0 logs and its result is returned.
fn on_devices(
    models: &[&dyn Model],
    devices: &[Device],
    schedule: &dyn Schedule,
    item: &[usize],
    cfg: &TuneConfig,
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
        tune(models[rank], schedule, item, &cfg, share, &mut progress)
    })
}
