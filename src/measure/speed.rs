//! `speed`: the throughput of a checkpoint on a device: one network forward, a full sample
//! with a sampler, and the sampler's time outside the network per step.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device};

use crate::bail_option;
use crate::gpu::profile::device_report;
use crate::keys;
use crate::models::checkpoint::DiffusersModel;
use crate::sampling::samplers::{self, Options, Sampler};
use crate::sampling::spec::model_dtype;
use crate::tensor::rng::NoiseStreams;

/// Median of timings in seconds.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The time outside the network as a share of the network's. A negative measured share
/// means the sampler ran faster than the chained forwards alone: the difference is timing
/// noise, reported as such rather than as a negative share.
fn outside_share(share: f64, of: &str) -> String {
    if share >= 0.0 {
        format!("time outside the network {:.1} % of {of}", 100.0 * share)
    } else {
        format!(
            "time outside the network below the timing noise ({:.1} % faster than {of} alone)",
            -100.0 * share
        )
    }
}

/// Throughput of a checkpoint as a front end parsed it.
#[derive(Clone, Debug)]
pub struct SpeedSettings {
    pub model: PathBuf,
    pub batch: usize,
    pub repeats: usize,
    /// cpu, cuda or cuda:N.
    pub device: String,
    /// The network's dtype.
    pub model_dtype: String,
    /// The sampler of the timed sample, or `none`.
    pub sampler: String,
    pub steps: usize,
}

/// Times one network forward and a full sample of the checkpoint `a` names; returns the
/// report's lines.
pub fn run(a: &SpeedSettings) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if a.batch == 0 || a.repeats == 0 {
        bail_option!(keys::BATCH, " and ", keys::REPEATS, " must be positive");
    }
    let device = crate::gpu::device::by_name(&a.device)?;
    let m = DiffusersModel::load(&a.model, model_dtype(&a.model_dtype)?, &device)?;
    let item = m.item_shape(None)?;
    let mut noise = NoiseStreams::new(0, 0, a.batch);
    let x = noise.normal(&item, DType::F32, &device)?;
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?; // warm-up (plans, kernels and allocations are made here)
        device.synchronize()?;
        crate::gpu::profile::profile_reset()?;
        let mut v = Vec::with_capacity(a.repeats);
        for _ in 0..a.repeats {
            let t0 = Instant::now();
            f()?;
            device.synchronize()?;
            v.push(t0.elapsed().as_secs_f64());
        }
        Ok(median(v))
    };
    let mut enqueue = Vec::with_capacity(a.repeats + 1);
    let fwd = time(&mut || {
        let t0 = Instant::now();
        m.unet.forward(&x, &[500.0])?;
        enqueue.push(t0.elapsed().as_secs_f64());
        Ok(())
    })?;
    // On CUDA the host returns once every kernel is queued: if that takes about as long as
    // the pass, the pass is bound by the host's launch overhead, not by the GPU.
    let enqueue = median(enqueue.split_off(1));
    out.push(format!(
        "model {} ({:.2} M parameters), {:?}, dtype {}, batch {}; convolutions: {}{}",
        a.model.display(),
        m.parameters as f64 / 1e6,
        item,
        a.model_dtype,
        a.batch,
        crate::gpu::conv::conv_path(&device),
        if device.is_cuda() && crate::gpu::cuda_graph::enabled()? {
            "; passes replayed from CUDA graphs (QTAYLOR_CUDA_GRAPH=on)"
        } else {
            ""
        }
    ));
    out.push(format!(
        "forward: {:.4} s per batch, {:.1} images/s (median of {})",
        fwd,
        a.batch as f64 / fwd,
        a.repeats
    ));
    if device.is_cuda() {
        out.push(format!("  host time to queue one forward: {enqueue:.4} s"));
    }
    if a.sampler != "none" {
        let sampler: Sampler = a.sampler.parse()?;
        let opts = Options::default();
        let grid = m.default_grid()?;
        // The start noise is drawn before the clock starts (on the host: about 15 ms for
        // batch 256, as much as 6 % of a 10-step bf16 sample on an H200); the sampler gets
        // fresh streams for any noise it draws on the way. Returns the median time, the NFE
        // and the median time of copying the result to the host (after the device is done).
        let sample_time = |steps: usize| -> Result<(f64, f64, f64)> {
            let ts = grid.times(m.schedule.as_ref(), steps)?;
            let mut nfe = 0.0;
            let mut copies = Vec::with_capacity(a.repeats + 1);
            let t = time(&mut || {
                let mut noise = NoiseStreams::new(0, 0, a.batch);
                let run = samplers::sample(
                    &m,
                    m.schedule.as_ref(),
                    sampler,
                    &opts,
                    &ts,
                    x.clone(),
                    &mut noise,
                    None,
                )?;
                nfe = run.nfe;
                device.synchronize()?;
                let t0 = Instant::now();
                run.x.to_device(&Device::Cpu)?;
                copies.push(t0.elapsed().as_secs_f64());
                Ok(())
            })?;
            Ok((t, nfe, median(copies.split_off(1))))
        };
        let (full, nfe, copy) = sample_time(a.steps)?;
        // The sampler's share: the sample against the same number of forward passes queued
        // back to back (as the sampler queues them, without a synchronization in between).
        let n = (nfe.round() as usize).max(1);
        let chained = time(&mut || {
            for _ in 0..n {
                m.unet.forward(&x, &[500.0])?;
            }
            Ok(())
        })? / n as f64;
        let overhead = (full - nfe * chained) / (nfe * chained);
        out.push(format!(
            "sample {sampler}, {} steps ({nfe:.0} NFE): {:.4} s per batch, {:.1} images/s; {} ({n} forwards queued back to back: {:.4} s each; copying the result to the host: {:.4} s)",
            a.steps,
            full,
            a.batch as f64 / full,
            outside_share(overhead, "the network's"),
            chained,
            copy
        ));
        // Per step: the slope between this sample and one of twice the steps, so that what
        // a sample pays once (setup, the final read-back and copy) drops out.
        let (full2, nfe2, _) = sample_time(2 * a.steps)?;
        if nfe2 > nfe {
            let per_nfe = (full2 - full) / (nfe2 - nfe);
            out.push(format!(
                "  per step ({} vs {} steps): {:.4} s per NFE, {}; once per sample: {:.4} s",
                2 * a.steps,
                a.steps,
                per_nfe,
                outside_share((per_nfe - chained) / chained, "a forward's"),
                full - nfe * per_nfe
            ));
        }
    }
    if let Some(p) = peak_rss_mib() {
        out.push(format!("peak resident memory: {p:.0} MiB"));
    }
    let span = format!("after the warm-up, {} timed passes", a.repeats);
    out.extend(device_report(&device, &span, None)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::outside_share;

    #[test]
    fn the_time_outside_the_network_is_never_a_negative_share() {
        assert!(outside_share(0.123, "x").contains("12.3 %"));
        let s = outside_share(-0.05, "the network's");
        assert!(
            s.contains("below the timing noise") && s.contains("5.0 %"),
            "{s}"
        );
        assert!(!s.contains('-') || !s.contains("-5"), "{s}");
    }
}
