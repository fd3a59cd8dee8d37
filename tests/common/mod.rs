//! Shared pieces of the integration tests: problems with known solutions, IDX files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use qtaylor::grid::Grid;
use qtaylor::model::{Model, Parameterization};
use qtaylor::ops::{Coef, lincomb_rows, rows_f64};
use qtaylor::problems::gmm::{Gmm, GmmModel};
use qtaylor::rng::NoiseStreams;
use qtaylor::samplers::{Options, Sampler, sample};
use qtaylor::schedule::{Schedule, VpLinear};

/// Data concentrated on one point `x0`: ε̂ = (x − α x0)/σ exactly.
pub struct SinglePoint {
    pub x0: Vec<f64>,
    pub schedule: Arc<dyn Schedule>,
}

impl Model for SinglePoint {
    fn parameterization(&self) -> Parameterization {
        Parameterization::Eps
    }
    fn predict(&self, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        let x0 = Tensor::from_slice(&self.x0, (1, self.x0.len()), x.device())?
            .to_dtype(x.dtype())?
            .broadcast_as(x.shape())?
            .contiguous()?;
        let rows = |f: &dyn Fn(f64) -> f64| {
            let v: Vec<f64> = t.iter().map(|&t| f(t)).collect();
            if v.len() == 1 {
                Coef::All(v[0])
            } else {
                Coef::Rows(v)
            }
        };
        let s = &self.schedule;
        lincomb_rows(&[
            (rows(&|t| 1.0 / s.sigma(t)), x),
            (rows(&|t| -s.alpha(t) / s.sigma(t)), &x0),
        ])
    }
}

/// Exact PF-ODE end point for single-point data: x(s) = α_s x0 + σ_s ε, ε = (x_T − α_T x0)/σ_T.
pub fn single_point_solution(
    s: &dyn Schedule,
    x0: &[f64],
    x_t: &[Vec<f64>],
    t: f64,
    t_end: f64,
) -> Vec<Vec<f64>> {
    x_t.iter()
        .map(|row| {
            row.iter()
                .zip(x0)
                .map(|(&x, &m)| {
                    let eps = (x - s.alpha(t) * m) / s.sigma(t);
                    s.alpha(t_end) * m + s.sigma(t_end) * eps
                })
                .collect()
        })
        .collect()
}

/// A one-component diagonal Gaussian `N(μ, diag v)` as a mixture.
pub fn gaussian(dim: usize) -> Gmm {
    let means = vec![
        (0..dim)
            .map(|j| 0.3 * (j as f64 - 1.5))
            .collect::<Vec<f64>>(),
    ];
    let variances = vec![
        (0..dim)
            .map(|j| 0.05 + 0.1 * j as f64)
            .collect::<Vec<f64>>(),
    ];
    Gmm {
        dim,
        weights: vec![1.0],
        means,
        variances,
    }
}

/// Exact PF-ODE solution for Gaussian data: per dimension,
/// x(s) = α_s μ + sqrt(α_s² v + σ_s²)/sqrt(α_t² v + σ_t²) · (x_t − α_t μ).
pub fn gaussian_solution(
    s: &dyn Schedule,
    g: &Gmm,
    x_t: &[Vec<f64>],
    t: f64,
    t_end: f64,
) -> Vec<Vec<f64>> {
    let (mu, v) = (&g.means[0], &g.variances[0]);
    x_t.iter()
        .map(|row| {
            (0..row.len())
                .map(|j| {
                    let sd = |u: f64| (s.alpha(u).powi(2) * v[j] + s.sigma(u).powi(2)).sqrt();
                    s.alpha(t_end) * mu[j] + sd(t_end) / sd(t) * (row[j] - s.alpha(t) * mu[j])
                })
                .collect()
        })
        .collect()
}

pub fn linear() -> Arc<dyn Schedule> {
    Arc::new(VpLinear::default())
}

pub fn gaussian_model(dim: usize) -> (Gmm, GmmModel) {
    let g = gaussian(dim);
    let m = GmmModel::new(Arc::new(g.clone()), linear(), &Device::Cpu).unwrap();
    (g, m)
}

/// Start noise for `b` samples of dimension `d` (f64), and the matching streams.
pub fn start(seed: u64, b: usize, d: usize) -> (Tensor, NoiseStreams) {
    let mut n = NoiseStreams::new(seed, 0, b);
    let x = n.normal(&[d], DType::F64, &Device::Cpu).unwrap();
    (x, n)
}

/// Runs a sampler on `steps` steps of `grid` from `t_max` to `t_min`; returns rows and NFE.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &dyn Model,
    sampler: &str,
    opts: &Options,
    grid: Grid,
    steps: usize,
    t_max: f64,
    t_min: f64,
    x: &Tensor,
    seed: u64,
) -> (Vec<Vec<f64>>, f64) {
    let s = VpLinear::default();
    let ts = grid.times(&s, steps, t_max, t_min).unwrap();
    let mut noise = NoiseStreams::new(seed, 0, x.dims()[0]);
    // The start state is given: skip the draws that made it so the streams line up with
    // `start` (same as the CLI).
    let _ = noise
        .normal(&x.dims()[1..], DType::F64, &Device::Cpu)
        .unwrap();
    let sampler: Sampler = sampler.parse().unwrap();
    let out = sample(model, &s, sampler, opts, &ts, x.clone(), &mut noise, None).unwrap();
    (rows_f64(&out.x).unwrap(), out.nfe)
}

/// Mean per-sample RMSE.
pub fn err(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    qtaylor::metrics::mean(&qtaylor::metrics::rmse_per_sample(a, b))
}

/// The bytes of an IDX file of unsigned bytes (magic 0x0000_08_NDIMS, big-endian dimensions).
pub fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend(data);
    b
}

/// Runs the `qtaylor` binary with `args`.
pub fn qtaylor(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_qtaylor"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// A run's standard error as text.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A path as a command-line argument.
pub fn p(path: &std::path::Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// 24 strokes per split: vertical bars ("1"-like) and rings ("0"-like) at varying offsets.
pub fn strokes(dir: &Path) -> PathBuf {
    let d = dir.join("strokes");
    std::fs::create_dir_all(&d).unwrap();
    for (prefix, shift) in [("train", 0usize), ("t10k", 1)] {
        let n = 24usize;
        let mut img = vec![0u8; n * 784];
        let mut lab = Vec::with_capacity(n);
        for i in 0..n {
            let o = (i + shift) % 5;
            let ring = i % 2 == 1;
            lab.push(if ring { 0 } else { 1 });
            for y in 0..28 {
                for x in 0..28 {
                    let (dx, dy) = (x as f64 - 12.0 - o as f64, y as f64 - 14.0);
                    let on = if ring {
                        ((dx * dx + dy * dy).sqrt() - 7.0).abs() < 1.6
                    } else {
                        dx.abs() < 1.6 && dy.abs() < 9.0
                    };
                    if on {
                        img[i * 784 + y * 28 + x] = 255;
                    }
                }
            }
        }
        std::fs::write(
            d.join(format!("{prefix}-images-idx3-ubyte")),
            idx(&[n as u32, 28, 28], &img),
        )
        .unwrap();
        std::fs::write(
            d.join(format!("{prefix}-labels-idx1-ubyte")),
            idx(&[n as u32], &lab),
        )
        .unwrap();
    }
    d
}

pub fn mnist_unet_folder(dir: &Path) -> PathBuf {
    // The shipped unconditional MNIST model, as a checkpoint folder (eval takes a folder).
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in [
        "config.json",
        "scheduler_config.json",
        "diffusion_pytorch_model.safetensors",
    ] {
        std::fs::copy(Path::new("assets/mnist-unet").join(f), m.join(f)).unwrap();
    }
    m
}

/// A tiny UNet2DModel config for training tests (8×8 grey images).
pub const TINY_CONFIG: &str = r#"{
  "block_out_channels": [8, 16],
  "layers_per_block": 1,
  "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
  "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
  "norm_num_groups": 4,
  "attention_head_dim": null,
  "in_channels": 1,
  "out_channels": 1
}"#;

/// 64 images 8×8 of two kinds (bright top half / bright bottom half) with a little texture.
pub fn tiny_data(dir: &Path) -> PathBuf {
    let d = dir.join("tiny");
    std::fs::create_dir_all(&d).unwrap();
    let (n, s) = (64usize, 8usize);
    let mut img = Vec::with_capacity(n * s * s);
    let mut lab = Vec::with_capacity(n);
    for i in 0..n {
        let top = i % 2 == 0;
        lab.push(top as u8);
        for y in 0..s {
            for x in 0..s {
                let bright = (y < s / 2) == top;
                let tex = ((i * 7 + y * 3 + x * 5) % 11) as u8 * 4;
                img.push(if bright { 215 + tex } else { tex });
            }
        }
    }
    std::fs::write(
        d.join("train-images-idx3-ubyte"),
        idx(&[n as u32, 8, 8], &img),
    )
    .unwrap();
    std::fs::write(d.join("train-labels-idx1-ubyte"), idx(&[n as u32], &lab)).unwrap();
    d
}

/// The embedded MNIST model made class-conditional (11 classes, a random embedding table
/// of scale 0.3): a 28×28 network, whose CPU forward is bit-for-bit batch-independent.
pub fn conditional_mnist(dir: &Path) -> qtaylor::checkpoint::DiffusersModel {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/mnist-unet");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["num_class_embeds"] = 11.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        src.join("scheduler_config.json"),
        dir.join("scheduler_config.json"),
    )
    .unwrap();
    let mut w = candle_core::safetensors::load(
        src.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let temb = w["time_embedding.linear_2.weight"].dim(0).unwrap();
    let table = (Tensor::randn(0f32, 1.0, (11, temb), &Device::Cpu).unwrap() * 0.3).unwrap();
    let table = table
        .to_dtype(w["time_embedding.linear_2.weight"].dtype())
        .unwrap();
    w.insert("class_embedding.weight".into(), table);
    candle_core::safetensors::save(&w, dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    qtaylor::checkpoint::DiffusersModel::load(dir, DType::F32, &Device::Cpu).unwrap()
}
