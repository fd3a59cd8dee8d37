//! The bodies of the fuzz targets, one function per loader of user input (issue 14). The
//! cargo-fuzz binaries in `fuzz_targets/` call them under libFuzzer (nightly), and the main
//! crate's `tests/fuzz_corpus.rs` replays the committed corpus through them on stable, so
//! every finding stays a regression test. A body must never panic, abort or hang on any
//! input: errors are the loaders' `Result`s.

#![allow(dead_code)]

use qtaylor::config::parse_numbers;
use qtaylor::grid::{Final, times_of_network_timesteps, times_of_sigmas, validate_timesteps};
use qtaylor::keys;
use qtaylor::models::checkpoint::SchedulerConfig;
use qtaylor::models::checkpoint::{CheckpointFiles, DiffusersModel};
use qtaylor::models::model::Parameterization;
use qtaylor::models::problems::gmm::Gmm;
use qtaylor::program::Program;
use qtaylor::sampling::samplers::{Options, Sampler};
use qtaylor::schedule::Schedule;
use qtaylor::schedule::{Tabulated, diffusers_alphas_cumprod, diffusers_betas};
use std::path::Path;
use std::path::PathBuf;
use std::sync::OnceLock;

fn split(data: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let take = |d: &[u8]| -> Option<(usize, usize)> {
        let n = u32::from_le_bytes(d.get(..4)?.try_into().ok()?) as usize;
        (d.len() >= 4 + n).then_some((4, 4 + n))
    };
    let (a0, a1) = take(data)?;
    let (cfg, rest) = (&data[a0..a1], &data[a1..]);
    let (b0, b1) = take(rest)?;
    Some((cfg, &rest[b0..b1], &rest[b1..]))
}

/// The checkpoint folder loader: config.json + scheduler_config.json + safetensors bytes,
/// framed as three length-prefixed parts (u32 little-endian lengths for the first two).
pub fn checkpoint(data: &[u8]) {
    let Some((cfg, sch, weights)) = split(data) else {
        return;
    };
    let (Ok(cfg), Ok(sch)) = (std::str::from_utf8(cfg), std::str::from_utf8(sch)) else {
        return;
    };
    let files = CheckpointFiles {
        config: PathBuf::from("config.json"),
        weights: PathBuf::from("diffusion_pytorch_model.safetensors"),
        scheduler: PathBuf::from("scheduler_config.json"),
    };
    let dev = candle_core::Device::Cpu;
    if let Ok(m) =
        DiffusersModel::from_parts(&files, cfg, sch, weights, candle_core::DType::F32, &dev)
    {
        let _ = m.item_shape(None);
    }
}

/// A diffusers scheduler_config.json: parse, check, build the discrete schedule and query it.
pub fn scheduler_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("scheduler_config.json");
    let Ok(c) = SchedulerConfig::from_json(text, file) else {
        return;
    };
    let Ok(s) = c.schedule(file) else {
        return;
    };
    for n in [0.0, 0.5, c.num_train_timesteps as f64 - 1.0, 1e9, -1.0] {
        let _ = s.time_of_network_time(n);
    }
    for l in [-20.0, 0.0, 20.0] {
        let _ = s.t_of_lambda(l);
    }
}

/// IDX files (MNIST's format), plain or gzipped: the first byte's low bit selects gzip.
pub fn idx(data: &[u8]) {
    if let Some((&flag, rest)) = data.split_first() {
        let _ = qtaylor::io::idx::idx_from_bytes(rest, flag & 1 == 1);
    }
}

/// numpy `.npy` arrays, with the shape checks the CLI asks for.
pub fn npy(data: &[u8]) {
    let _ = qtaylor::io::parse_npy(data, &[None, None]);
    let _ = qtaylor::io::parse_npy(data, &[None, Some(2)]);
}

/// The Gaussian-mixture JSON of `--problem mixture:FILE`: parse, check, evaluate the density.
pub fn mixture(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(g) = Gmm::from_json_str(text)
        && g.dim <= 4096
    {
        let x = vec![0.5; g.dim];
        let _ = g.log_density(&x, 0.9, 0.4);
        let _ = g.log_density(&x, 1.0, 0.0);
    }
}

fn schedule() -> &'static Tabulated {
    static S: OnceLock<Tabulated> = OnceLock::new();
    S.get_or_init(|| {
        let betas = diffusers_betas("linear", 1e-4, 0.02, 1000).unwrap();
        Tabulated::from_alpha_bars("discrete", &diffusers_alphas_cumprod(&betas)).unwrap()
    })
}

fn record(sampler: Sampler, ts: &[f64]) {
    if ts.len() > 64 || sampler.is_adaptive() {
        return;
    }
    let _ = Program::record(
        schedule(),
        sampler,
        &Options::default(),
        ts,
        Parameterization::Eps,
        None,
    );
}

/// Timestep and sigma lists and grid files, then every fixed-step sampler recorded over the
/// grid they give. Lines: sampler name, `--timesteps` list, `--sigmas` list, grid-file JSON.
pub fn grid_lists(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.splitn(4, '\n');
    let (name, steps, sigmas, file) = (
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
        lines.next().unwrap_or(""),
    );
    let s = schedule();
    let sampler = name.parse::<Sampler>().ok();
    if let Ok(v) = parse_numbers(keys::TIMESTEPS, steps) {
        if v.iter().all(|x| x.fract() == 0.0) {
            let ints: Vec<i64> = v.iter().map(|&x| x as i64).collect();
            let _ = validate_timesteps(&ints, 1000);
        }
        for last in [Final::Zero, Final::Last] {
            if let (Ok(ts), Some(sm)) = (times_of_network_timesteps(s, &v, last), sampler) {
                record(sm, &ts);
            }
        }
    }
    if let Ok(v) = parse_numbers(keys::SIGMAS, sigmas)
        && let (Ok(ts), Some(sm)) = (times_of_sigmas(s, &v), sampler)
    {
        record(sm, &ts);
    }
    if let Ok(g) = qtaylor::sampling::gridfile::GridFile::parse(file, s)
        && let Some(sm) = sampler
    {
        record(sm, &g.times);
    }
}
