//! `sample`: one run ([`RunSettings`]) into its output: a PNG grid for an image model (and
//! optionally the `.npy` array), a `.npy` array for a problem, or with a shard its part of
//! the run (rows `⌊I·B/N⌋..⌊(I+1)·B/N⌋`, their own noise streams and global class indices)
//! for `merge`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use crate::bail_option;
use crate::io::progress::Progress;
use crate::keys::{self, Message};
use crate::models::model::Model;
use crate::option_error;
use crate::sampling::samplers;
use crate::sampling::spec::{RunSettings, Source};
use crate::shard::{Part, Shard};

/// Where a run's samples go.
#[derive(Clone, Debug)]
pub struct Output {
    /// A PNG grid (image models) or a `.npy` array (problems); with a shard, the folder of
    /// the parts.
    pub out: PathBuf,
    /// An image model's samples as `.npy` too.
    pub save_npy: Option<PathBuf>,
    /// Only this shard of the run, recorded with the run's configuration (the command line
    /// without its shard and output) in the part's manifest.
    pub shard: Option<(Shard, Vec<String>)>,
}

/// Checks `output` for a run of `source` before anything is loaded.
fn check_output(settings: &RunSettings, output: &Output) -> Result<()> {
    let ext = output
        .out
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match &output.shard {
        None => crate::io::check_out_dir(keys::OUT, &output.out)?,
        Some(_) => {
            if output.out.is_file() {
                bail_option!(
                    (keys::OUT, output.out.display().to_string()),
                    ": with ",
                    keys::SHARD,
                    ", ",
                    keys::OUT,
                    " is the folder of the parts, not a file"
                );
            }
            for (key, set) in [
                (keys::X_INIT, settings.x_init.is_some()),
                (keys::INIT_IMAGE, settings.init_image.is_some()),
                (keys::SAVE_NPY, output.save_npy.is_some()),
            ] {
                if set {
                    bail_option!(
                        keys::SHARD,
                        " takes no ",
                        key,
                        " (merge writes the joined output)"
                    );
                }
            }
        }
    }
    if let Some(p) = &output.save_npy {
        crate::io::check_out_dir(keys::SAVE_NPY, p)?;
    }
    match settings.source() {
        Source::Problem(_) => {
            if settings.image_size.is_some() || output.save_npy.is_some() || settings.no_clip {
                bail_option!(
                    keys::IMAGE_SIZE,
                    ", ",
                    keys::SAVE_NPY,
                    " and ",
                    keys::NO_CLIP,
                    " apply to ",
                    keys::MODEL
                );
            }
            if output.shard.is_none() && ext != "npy" {
                bail_option!(
                    (keys::OUT, output.out.display().to_string()),
                    ": a problem's samples are written as a NumPy array; name the file .npy (PNG grids are for image models: ",
                    keys::MODEL,
                    ", or neither flag for the embedded one)"
                );
            }
        }
        _ => {
            if output.shard.is_none() && ext != "png" {
                bail_option!(
                    (keys::OUT, output.out.display().to_string()),
                    ": with ",
                    keys::MODEL,
                    " the output is a PNG grid (use ",
                    keys::SAVE_NPY,
                    " for the array)"
                );
            }
        }
    }
    Ok(())
}

/// Draws the run `settings` describes on `device` and writes it to `output`. `note` gets
/// the notes and warnings for the user before sampling starts; returns the closing line
/// (samples, sampler, grid, NFE, time, output).
pub fn run(
    settings: &RunSettings,
    output: &Output,
    device: &candle_core::Device,
    note: &mut dyn FnMut(&Message),
) -> Result<String> {
    check_output(settings, output)?;
    let spec = settings.build(device)?;
    for w in &spec.warnings {
        note(&option_error!(format!("warning: {w}")));
    }
    let batch = spec.batch();
    let (first, end) = match &output.shard {
        Some((s, _)) => s.rows(batch, keys::BATCH)?,
        None => (0, batch),
    };
    let rows = end - first;
    let (x, mut noise) = spec.start_state(first, rows)?;
    let guided = spec.guided(first, rows, batch)?;
    let model: &dyn Model = match &guided {
        Some(g) => g,
        None => spec.model.loaded.model(),
    };
    if let Some(g) = &guided
        && spec.classes.is_none()
    {
        note(&option_error!(
            format!("note: {} is class-conditional; without ", spec.name()),
            keys::CLASS,
            "/",
            keys::CLASSES,
            format!(
                " it samples the unconditional model (null class {}); ",
                g.null()
            ),
            (keys::CLASSES, "all"),
            " ",
            (keys::GUIDANCE, 2usize),
            " gives one row per class"
        ));
    }
    let steps = spec.steps();
    let pb = Progress::new(
        "sample",
        "step",
        steps as u64,
        "{bar:30} step {pos}/{len} {msg} [{elapsed_precise}]",
    );
    let start = Instant::now();
    let run = samplers::sample(
        model,
        spec.model.schedule.as_ref(),
        spec.sampler,
        &spec.opts,
        &spec.times,
        x,
        &mut noise,
        Some(&pb),
    )?;
    pb.finish();
    let image = !matches!(settings.source(), Source::Problem(_));
    if let Some((s, config)) = &output.shard {
        let b = run.x.dims()[0];
        let part: Part = Part {
            config_hash: crate::shard::config_hash(config),
            config: config.clone(),
            shard: s.index,
            shards: s.count,
            start: first,
            end: first + b,
            total: batch,
            kind: if image { "png" } else { "npy" }.into(),
            item: run.x.dims()[1..].to_vec(),
            eval: None,
        };
        let json = crate::shard::write_part(&output.out, &part, &run.x)?;
        return Ok(format!(
            "shard {}/{}: samples {}..{} of {} -> {} (qtaylor merge joins the parts)",
            s.index,
            s.count,
            part.start,
            part.end,
            part.total,
            json.display()
        ));
    }
    if image {
        crate::io::write_png_grid(&output.out, &run.x)?;
        if let Some(npy) = &output.save_npy {
            crate::io::write_npy(npy, &run.x)?;
        }
    } else {
        crate::io::write_npy(&output.out, &run.x)?;
    }
    let g = &settings.guidance;
    let guidance = match (&g.class, &g.classes) {
        (None, None) => String::new(),
        _ => {
            let per_call = guided.as_ref().map_or(1, |g| g.rows_per_call());
            format!(
                ", guidance {} ({per_call} network row{} per sample and call)",
                spec.guidance(),
                if per_call == 1 { "" } else { "s" }
            )
        }
    };
    Ok(format!(
        "{} samples of {} with {}, {steps} steps ({}), {:.0} NFE{guidance}, {:.2} s -> {}",
        run.x.dims()[0],
        spec.name(),
        spec.sampler,
        spec.grid.describe(),
        run.nfe,
        start.elapsed().as_secs_f64(),
        output.out.display()
    ))
}
