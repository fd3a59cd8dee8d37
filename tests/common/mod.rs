//! Shared pieces of the integration tests: problems with known solutions, IDX files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use qtaylor::grid::Grid;
use qtaylor::models::model::{Model, Parameterization};
use qtaylor::models::problems::gmm::{Gmm, GmmModel};
use qtaylor::sampling::samplers::{Options, Sampler, sample};
use qtaylor::schedule::{Schedule, VpLinear};
use qtaylor::tensor::ops::{Coef, lincomb_rows, rows_f64};
use qtaylor::tensor::rng::NoiseStreams;

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
    qtaylor::measure::metrics::mean(&qtaylor::measure::metrics::rmse_per_sample(a, b))
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
pub fn conditional_mnist(dir: &Path) -> qtaylor::models::checkpoint::DiffusersModel {
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
    qtaylor::models::checkpoint::DiffusersModel::load(dir, DType::F32, &Device::Cpu).unwrap()
}

/// Runs the `qtaylor` binary with `args` and asserts that it succeeds; returns its output.
pub fn run_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> std::process::Output {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_qtaylor"))
        .args(args)
        .output()
        .expect("the binary runs");
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    o
}

/// `&[String]` as `Vec<&str>`, for [`qtaylor`].
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// `qtaylor sample` of the exact-score `gmm-demo` problem: `batch` samples with `sampler`
/// on `steps` steps (the command line the CLI and shard tests share).
pub fn gmm_sample(sampler: &str, steps: usize, batch: usize) -> Vec<String> {
    [
        "sample",
        "--problem",
        "gmm-demo",
        "--sampler",
        sampler,
        "--steps",
        &steps.to_string(),
        "--batch",
        &batch.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// `qtaylor bench` of the exact-score `gmm-demo` problem: `samplers` (comma-separated) at
/// the NFE budgets `nfe` on `batch` samples, without `--out` (the command line the shard
/// tests share). Its results folder compares with [`assert_same_eval_results`].
pub fn gmm_bench(samplers: &str, nfe: &str, batch: usize) -> Vec<String> {
    [
        "bench",
        "--problem",
        "gmm-demo",
        "--samplers",
        samplers,
        "--nfe",
        nfe,
        "--batch",
        &batch.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// A small `qtaylor eval` for CPU tests: one command line, given as eval flags
/// ([`SmallEval::args`]) or as the environment of `scripts/slurm/*.sbatch`
/// ([`SmallEval::env`]).
#[derive(Clone, Debug)]
pub struct SmallEval {
    pub model: PathBuf,
    pub data: PathBuf,
    pub samplers: String,
    pub nfe: String,
    pub n: usize,
    pub batch: usize,
    pub reference_steps: usize,
    pub guidance: Option<String>,
    /// Further flags (QTAYLOR_EVAL_ARGS for the Slurm scripts).
    pub extra: Vec<String>,
}

impl SmallEval {
    /// The shipped unconditional MNIST model (a folder copy in `dir`) on the synthetic strokes
    /// data (24 images per split): ddim and the stochastic qit-2 at NFE 2 with their grid
    /// PNGs and a 3-step (stochastic) DDPM reference row; n = 7 in batches of 3, so that 4
    /// shards cut batches and the grid's 3 samples.
    pub fn new(dir: &Path) -> Self {
        SmallEval {
            model: mnist_unet_folder(dir),
            data: strokes(dir),
            samplers: "ddim,qit-2".into(),
            nfe: "2".into(),
            n: 7,
            batch: 3,
            reference_steps: 3,
            guidance: None,
            extra: ["--grid-nfe", "2"].map(String::from).to_vec(),
        }
    }

    /// `qtaylor eval …` without `--shard` and `--out`.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "eval".into(),
            "--model".into(),
            p(&self.model).into(),
            "--data".into(),
            p(&self.data).into(),
            "--samplers".into(),
            self.samplers.clone(),
            "--nfe".into(),
            self.nfe.clone(),
            "--n".into(),
            self.n.to_string(),
            "--batch".into(),
            self.batch.to_string(),
            "--reference-steps".into(),
            self.reference_steps.to_string(),
        ];
        if let Some(g) = &self.guidance {
            a.extend(["--guidance".into(), g.clone()]);
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    /// [`SmallEval::args`] plus `--shard I/N --out DIR`.
    pub fn shard_args(&self, i: usize, n: usize, out: &Path) -> Vec<String> {
        let mut a = self.args();
        a.extend([
            "--shard".into(),
            format!("{i}/{n}"),
            "--out".into(),
            p(out).into(),
        ]);
        a
    }

    /// The same run as the environment `scripts/slurm/eval-array.sbatch` reads.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut e = vec![
            ("QTAYLOR_BIN", env!("CARGO_BIN_EXE_qtaylor").to_string()),
            ("QTAYLOR_MODEL", p(&self.model).to_string()),
            ("QTAYLOR_DATA", p(&self.data).to_string()),
            ("QTAYLOR_SAMPLERS", self.samplers.clone()),
            ("QTAYLOR_NFE", self.nfe.clone()),
            ("QTAYLOR_N", self.n.to_string()),
            ("QTAYLOR_BATCH", self.batch.to_string()),
            ("QTAYLOR_REFERENCE_STEPS", self.reference_steps.to_string()),
            ("QTAYLOR_EVAL_ARGS", self.extra.join(" ")),
        ];
        if let Some(g) = &self.guidance {
            e.push(("QTAYLOR_GUIDANCE", g.clone()));
        }
        e.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

/// The cells of a table (`sep`-separated lines) without the column headed `column`: CSV
/// (`,`) or a Markdown table (`|`; each table's header line names its columns).
pub fn without_column(text: &str, sep: char, column: &str) -> String {
    let mut drop: Option<usize> = None;
    let mut out = String::new();
    for line in text.lines() {
        let cells: Vec<&str> = line.split(sep).collect();
        if let Some(i) = cells.iter().position(|c| c.trim() == column) {
            drop = Some(i);
        } else if cells.len() < 2 {
            drop = None;
        }
        let kept: Vec<&str> = cells
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != drop)
            .map(|(_, c)| *c)
            .collect();
        out += &kept.join(&sep.to_string());
        out.push('\n');
    }
    out
}

/// What an eval results folder says, but for its timing: `results.csv` and `report.md`
/// without their `seconds` columns, `results.json` with every row's seconds set to 0, and
/// every PNG's bytes (grids and the FID plot), by name.
pub fn eval_results_but_seconds(
    dir: &Path,
) -> (String, serde_json::Value, String, Vec<(String, Vec<u8>)>) {
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(f).display()))
    };
    let csv = without_column(&read("results.csv"), ',', "seconds");
    let mut json: serde_json::Value = serde_json::from_str(&read("results.json")).unwrap();
    for row in json["rows"].as_array_mut().expect("rows") {
        row["seconds"] = 0.into();
    }
    let md = without_column(&read("report.md"), '|', "seconds");
    let mut pngs: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| f.extension().is_some_and(|e| e == "png"))
        .map(|f| {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&f).unwrap())
        })
        .collect();
    pngs.sort();
    (csv, json, md, pngs)
}

/// Asserts that two eval results folders hold the same results but for the seconds.
pub fn assert_same_eval_results(a: &Path, b: &Path) {
    let (ca, ja, ma, pa) = eval_results_but_seconds(a);
    let (cb, jb, mb, pb) = eval_results_but_seconds(b);
    assert_eq!(ca, cb, "results.csv of {} and {}", a.display(), b.display());
    assert_eq!(
        ja,
        jb,
        "results.json of {} and {}",
        a.display(),
        b.display()
    );
    assert_eq!(ma, mb, "report.md of {} and {}", a.display(), b.display());
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&pa),
        names(&pb),
        "PNGs of {} and {}",
        a.display(),
        b.display()
    );
    for ((n, x), (_, y)) in pa.iter().zip(&pb) {
        assert!(
            x == y,
            "{n} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// A stand-in for Slurm's `sbatch` in the folder `bin` (put it first on PATH): it runs the
/// job at once with the variables Slurm sets (a job array's tasks one after another, each
/// with SLURM_ARRAY_TASK_ID/COUNT/MIN/MAX, SLURM_ARRAY_JOB_ID, SLURM_JOB_ID), honours
/// `--dependency=afterok:ID` (the job runs only if job ID succeeded), prints the job id as
/// `--parsable` does, and appends each command line to `bin/sbatch.log` and each job's
/// output to `bin/job-<id>[_<task>].out`.
pub fn stub_sbatch(bin: &Path) -> PathBuf {
    std::fs::create_dir_all(bin).unwrap();
    let f = bin.join("sbatch");
    std::fs::write(
        &f,
        r#"#!/usr/bin/env bash
set -euo pipefail
state=$(dirname "$0")
echo "$*" >>"$state/sbatch.log"
array="" dep=""
while [[ $# -gt 1 ]]; do
    case $1 in
    --array=*) array=${1#--array=} ;;
    --dependency=*) dep=${1#--dependency=} ;;
    -*) ;;
    *) break ;;
    esac
    shift
done
script=$1
job=$(($(cat "$state/next-id" 2>/dev/null || echo 1000) + 1))
echo "$job" >"$state/next-id"
echo "$job"
if [[ -n $dep && ! -f $state/ok-${dep#afterok:} ]]; then
    echo "dependency $dep never satisfied" >"$state/job-$job.out"
    exit 0
fi
ok=1
if [[ -n $array ]]; then
    lo=${array%-*} hi=${array#*-}
    for ((t = lo; t <= hi; t++)); do
        SLURM_JOB_ID=$((job * 100 + t)) SLURM_ARRAY_JOB_ID=$job SLURM_ARRAY_TASK_ID=$t \
            SLURM_ARRAY_TASK_COUNT=$((hi - lo + 1)) SLURM_ARRAY_TASK_MIN=$lo SLURM_ARRAY_TASK_MAX=$hi \
            SLURM_SUBMIT_DIR=$PWD bash "$script" >"$state/job-${job}_$t.out" 2>&1 || ok=0
    done
else
    SLURM_JOB_ID=$job SLURM_SUBMIT_DIR=$PWD bash "$script" >"$state/job-$job.out" 2>&1 || ok=0
fi
if ((ok)); then touch "$state/ok-$job"; fi
"#,
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    f
}

/// Everything the stub `sbatch` in `bin` logged and its jobs printed, for failure messages.
pub fn stub_sbatch_logs(bin: &Path) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(bin)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "out" || e == "log"))
        .map(|f| {
            format!(
                "== {}\n{}",
                f.display(),
                std::fs::read_to_string(f).unwrap_or_default()
            )
        })
        .collect()
}

/// The tensors of a safetensors file, on the CPU.
pub fn tensors(file: &Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(file, &Device::Cpu).unwrap()
}

/// Two training folders hold the same optimiser state, bit for bit, and the same log (a
/// resumed run against the uninterrupted one).
pub fn assert_same_training(a: &Path, b: &Path) {
    let (ta, tb) = (
        tensors(&a.join("train_state.safetensors")),
        tensors(&b.join("train_state.safetensors")),
    );
    assert_eq!(ta.len(), tb.len());
    for (k, t) in &ta {
        assert_eq!(
            qtaylor::tensor::ops::max_abs_diff(t, &tb[k]).unwrap(),
            0.0,
            "{k} differs after resume"
        );
    }
    assert_eq!(
        std::fs::read_to_string(a.join("train_log.csv")).unwrap(),
        std::fs::read_to_string(b.join("train_log.csv")).unwrap()
    );
}

/// The training options of the tiny CPU runs: TINY_CONFIG, batch 16, lr 3e-3, 5 warm-up
/// steps, EMA 0.9.
pub fn tiny_train_options(data: &Path, out: &Path, steps: usize) -> qtaylor::train::TrainOptions {
    let mut o = qtaylor::train::TrainOptions::new(data.to_str().unwrap(), out);
    o.config = TINY_CONFIG.to_string();
    o.steps = steps;
    o.batch = 16;
    o.lr = 3e-3;
    o.warmup = 5;
    o.ema = 0.9;
    o.save_every = 1000;
    o
}

/// The files of a folder with their bytes (to check that a refused run rewrote nothing).
pub fn folder_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect()
}

/// Every file of a [`folder_bytes`] snapshot still holds its bytes.
pub fn assert_unchanged(before: &[(PathBuf, Vec<u8>)]) {
    for (p, b) in before {
        assert_eq!(&std::fs::read(p).unwrap(), b, "{} changed", p.display());
    }
}
