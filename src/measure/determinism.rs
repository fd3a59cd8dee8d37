//! `determinism`: whether a network's outputs for one sample depend only on that sample, on
//! this device, with the deterministic mode off and on ([`crate::gpu::determinism`]), and what
//! the mode costs.
//!
//! For each mode it traces one forward pass operation by operation ([`traced`]) for the first
//! rows of a fixed batch in batches of each size asked for, and the largest batch twice. Rows
//! are drawn from per-sample streams, so row 0 has the same input in every batch. An
//! operation *differs* when row 0 of its output is not the same bytes as in the largest batch
//! (or in the repeat); it is a *source* when it differs while the activation traced just before
//! it did not (time projections, whose rows are times, are passed over): its input, as far as
//! the trace sees, was the same. `QTAYLOR_TRACE_LOG=1` prints every operation's verdict. Then
//! it times a forward at each cost batch in both modes in the same process.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::bail_option;
use crate::gpu::profile::{TracePoint, traced};
use crate::keys;
use crate::models::checkpoint::DiffusersModel;
use crate::sampling::spec::model_dtype;
use crate::tensor::rng::NoiseStreams;

/// A `determinism` run as a front end parsed it.
#[derive(Clone, Debug)]
pub struct DeterminismSettings {
    /// A checkpoint folder, or `None` for the model embedded in the binary.
    pub model: Option<PathBuf>,
    pub device: String,
    pub model_dtype: String,
    /// Batch sizes whose row 0 is compared (the largest is also run twice).
    pub batches: Vec<usize>,
    /// Batch sizes timed in both modes.
    pub cost_batches: Vec<usize>,
    pub repeats: usize,
    /// Class labels for a class-conditional model: row i gets label `i mod (classes + 1)`, the
    /// last being the null class, as a guided sample's doubled batch has.
    pub labels: bool,
}

/// What one mode's trace showed.
#[derive(Clone, Debug, Default)]
pub struct ModeReport {
    pub deterministic: bool,
    pub operations: usize,
    /// Operations whose row 0 differs between two runs of the largest batch.
    pub run_to_run: usize,
    /// Per smaller batch: operations whose row 0 differs from the largest batch's.
    pub batch: Vec<(usize, usize)>,
    /// Source operations (see the module doc), by name, with their counts and the largest
    /// relative difference seen.
    pub sources: Vec<(String, usize, f64)>,
    /// Whether the network's output row 0 is the same bytes in every batch and run.
    pub output_identical: bool,
}

/// Row 0 of `t` as bytes (f32 for comparison of the difference).
fn row0(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.get(0)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?)
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let d = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let m = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    if m > 0.0 { d / m } else { d }
}

/// Runs the checks and timings; returns the report's lines and one [`ModeReport`] per mode.
pub fn run(a: &DeterminismSettings) -> Result<(Vec<String>, Vec<ModeReport>)> {
    if a.batches.is_empty() || a.batches.contains(&0) || a.cost_batches.contains(&0) {
        bail_option!(keys::BATCH, " sizes must be positive");
    }
    if a.repeats == 0 {
        bail_option!(keys::REPEATS, " must be positive");
    }
    let device = crate::gpu::device::by_name(&a.device)?;
    let dtype = model_dtype(&a.model_dtype)?;
    let m = match &a.model {
        Some(p) => DiffusersModel::load(p, dtype, &device)?,
        None => DiffusersModel::embedded_mnist(dtype, &device)?,
    };
    let item = m.item_shape(None)?;
    let classes = m.unet.config.num_class_embeds;
    let was = crate::gpu::determinism::deterministic();
    let mut lines = vec![format!(
        "model {}, {:?}, dtype {}, device {}; convolutions: {}",
        a.model
            .as_ref()
            .map_or("<embedded>".to_string(), |p| p.display().to_string()),
        item,
        a.model_dtype,
        a.device,
        crate::gpu::conv::conv_path(&device)
    )];
    let largest = *a.batches.iter().max().expect("non-empty");
    let inputs = |b: usize| -> Result<(Tensor, Option<Vec<u32>>)> {
        let x = NoiseStreams::new(0, 0, b).normal(&item, DType::F32, &device)?;
        let labels = match (a.labels, classes) {
            (true, Some(n)) => Some((0..b).map(|i| (i % n) as u32).collect()),
            (true, None) => bail_option!(
                keys::CLASSES,
                " were asked for, but the model has no class embedding"
            ),
            (false, _) => None,
        };
        Ok((x, labels))
    };
    let forward = |x: &Tensor, labels: &Option<Vec<u32>>| -> Result<Tensor> {
        let t = vec![500.0; x.dim(0)?];
        m.unet.forward_labels(x, &t, labels.as_deref())
    };
    let mut reports = Vec::new();
    for det in [false, true] {
        crate::gpu::determinism::set(det);
        let trace = |b: usize| -> Result<(Vec<TracePoint>, Vec<f32>)> {
            let (x, labels) = inputs(b)?;
            let (y, points) = traced(|| forward(&x, &labels))?;
            Ok((points, row0(&y)?))
        };
        // Warm-up: plans and algorithms for every batch are made before the traces.
        for &b in &a.batches {
            let (x, labels) = inputs(b)?;
            forward(&x, &labels)?;
        }
        let (base, base_out) = trace(largest)?;
        let base_rows: Vec<Vec<f32>> = base.iter().map(|p| row0(&p.1)).collect::<Result<_>>()?;
        let mut report = ModeReport {
            deterministic: det,
            operations: base.len(),
            output_identical: true,
            ..Default::default()
        };
        let mut sources: Vec<(String, usize, f64)> = Vec::new();
        let mut compare = |points: &[TracePoint], out: &[f32]| -> Result<usize> {
            if points.len() != base.len() {
                anyhow::bail!(
                    "the traces have {} and {} operations: the passes differ in structure",
                    points.len(),
                    base.len()
                );
            }
            let mut differing = 0;
            let mut previous_same = true;
            for (i, (name, t)) in points.iter().enumerate() {
                let r = row0(t)?;
                let same = same_bits(&r, &base_rows[i]);
                if std::env::var_os("QTAYLOR_TRACE_LOG").is_some() {
                    eprintln!(
                        "  #{i} {name} {:?}: {}",
                        t.dims(),
                        if same { "same" } else { "differs" }
                    );
                }
                if !same {
                    differing += 1;
                    if previous_same {
                        let rel = rel_diff(&r, &base_rows[i]);
                        match sources.iter_mut().find(|s| s.0 == *name) {
                            Some(s) => {
                                s.1 += 1;
                                s.2 = s.2.max(rel);
                            }
                            None => sources.push((name.to_string(), 1, rel)),
                        }
                    }
                }
                // The time projections' rows are time values, not this sample's
                // activations: they say nothing about the input of the next operation.
                if *name != "time projection" {
                    previous_same = same;
                }
            }
            report.output_identical &= same_bits(out, &base_out);
            Ok(differing)
        };
        let (again, again_out) = trace(largest)?;
        report.run_to_run = compare(&again, &again_out)?;
        for &b in a.batches.iter().filter(|&&b| b != largest) {
            let (points, out) = trace(b)?;
            let n = compare(&points, &out)?;
            report.batch.push((b, n));
        }
        report.sources = sources;
        lines.push(format!(
            "deterministic mode {}: {} operations traced; row 0 differs run to run in {}, {}; network output {}",
            if det { "on" } else { "off" },
            report.operations,
            report.run_to_run,
            report
                .batch
                .iter()
                .map(|(b, n)| format!("batch {b} against {largest} in {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            if report.output_identical {
                "bit-identical"
            } else {
                "DIFFERS"
            }
        ));
        for (name, n, rel) in &report.sources {
            lines.push(format!(
                "  source: {name} ({n}×, largest relative difference {rel:.1e})"
            ));
        }
        reports.push(report);
    }
    // Cost: both modes at each batch in this process, alternating, median of the repeats.
    for &b in &a.cost_batches {
        let (x, labels) = inputs(b)?;
        let mut times = [Vec::new(), Vec::new()];
        for det in [false, true] {
            crate::gpu::determinism::set(det);
            forward(&x, &labels)?; // warm-up: plans for this batch
            device.synchronize()?;
        }
        for _ in 0..a.repeats {
            for (k, det) in [false, true].into_iter().enumerate() {
                crate::gpu::determinism::set(det);
                let t0 = Instant::now();
                forward(&x, &labels)?;
                device.synchronize()?;
                times[k].push(t0.elapsed().as_secs_f64());
            }
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (off, on) = (med(&mut times[0]), med(&mut times[1]));
        lines.push(format!(
            "cost at batch {b}: {:.3} ms per forward default, {:.3} ms deterministic ({:.3}×, median of {})",
            1e3 * off,
            1e3 * on,
            on / off,
            a.repeats
        ));
    }
    crate::gpu::determinism::set(was);
    if device.is_cpu() {
        lines.push("(on the CPU the mode changes no kernel)".into());
    }
    Ok((lines, reports))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU's guarantee, checked operation by operation on the model in the binary with
    /// class labels (a guided sample's batch): row 0 of every operation is the same bytes in
    /// batches of 1, 3 and 8 and in two runs, in both modes.
    #[test]
    fn on_the_cpu_every_operation_is_the_same_bits_in_every_batch_and_run() {
        let (lines, reports) = run(&DeterminismSettings {
            model: None,
            device: "cpu".into(),
            model_dtype: "f32".into(),
            batches: vec![1, 3, 8],
            cost_batches: vec![],
            repeats: 1,
            labels: true,
        })
        .unwrap();
        assert_eq!(reports.len(), 2, "{lines:?}");
        for r in &reports {
            assert!(r.operations > 50, "{lines:?}");
            assert_eq!(r.run_to_run, 0, "{lines:?}");
            assert!(r.batch.iter().all(|(_, n)| *n == 0), "{lines:?}");
            assert!(r.sources.is_empty() && r.output_identical, "{lines:?}");
        }
    }

    #[test]
    fn the_comparison_sees_a_single_flipped_bit() {
        let a = [1.0f32, 2.0, 3.0];
        let mut b = a;
        b[1] = f32::from_bits(b[1].to_bits() ^ 1);
        assert!(same_bits(&a, &a) && !same_bits(&a, &b));
        assert!(rel_diff(&b, &a) > 0.0);
    }
}
