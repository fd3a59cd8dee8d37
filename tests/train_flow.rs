//! `qtaylor train --objective flow`: the batch is rectified flow's interpolation and velocity,
//! a short run learns and writes a `FlowMatchEulerDiscreteScheduler` checkpoint that samples,
//! resume is exact and refuses another objective, and the flags are checked.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use qtaylor::models::checkpoint::DiffusersModel;
use qtaylor::train::{
    FLOW_SCHEDULER_CONFIG, Objective, SigmaSampling, TrainOptions, drawn_batch, train,
};

mod common;
use common::{TINY_CONFIG, p, qtaylor, stderr, tiny_data};

const LOGIT_NORMAL: Objective = Objective::Flow(SigmaSampling::LogitNormal {
    mean: 0.0,
    std: 1.0,
});

fn opts(data: &Path, out: &Path, steps: usize, objective: Objective) -> TrainOptions {
    let mut o = common::tiny_train_options(data, out, steps);
    o.objective = objective;
    o
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    (
        m,
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt(),
    )
}

#[test]
fn a_flow_batch_is_the_interpolation_at_timestep_1000_sigma_with_the_velocity_as_target() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    // The images of the data set, as training scales them to [−1, 1].
    let raw = std::fs::read(data.join("train-images-idx3-ubyte")).unwrap();
    let images: Vec<Vec<f32>> = raw[16..]
        .chunks(64)
        .map(|c| c.iter().map(|&b| b as f32 / 127.5 - 1.0).collect())
        .collect();
    for objective in [Objective::Flow(SigmaSampling::Uniform), LOGIT_NORMAL] {
        let o = opts(&data, &dir.path().join("unused"), 1, objective);
        for k in [0usize, 3, 7] {
            let b = drawn_batch(&o, k).unwrap();
            assert_eq!(b.sigmas.len(), 16);
            assert_eq!(b.timesteps.len(), 16);
            for d in [&b.x0, &b.noise, &b.input, &b.target] {
                assert_eq!(d.len(), 16 * 64);
            }
            for (j, &s) in b.sigmas.iter().enumerate() {
                assert!(s > 0.0 && s < 1.0, "{objective}: sigma {s}");
                assert_eq!(
                    b.timesteps[j],
                    1000.0 * s,
                    "{objective}: timestep of row {j}"
                );
                let x0 = &b.x0[j * 64..(j + 1) * 64];
                assert!(images.iter().any(|im| im == x0), "row {j} is not an image");
                for i in j * 64..(j + 1) * 64 {
                    let (x, e) = (b.x0[i] as f64, b.noise[i] as f64);
                    let want_x = (1.0 - s) * x + s * e;
                    let want_v = e - x;
                    assert!(
                        (b.input[i] as f64 - want_x).abs() <= 1e-6 * (1.0 + want_x.abs()),
                        "{objective}, step {k}, element {i}: input {} vs (1 − σ)x0 + σε = {want_x}",
                        b.input[i]
                    );
                    assert!(
                        (b.target[i] as f64 - want_v).abs() <= 1e-6 * (1.0 + want_v.abs()),
                        "{objective}, step {k}, element {i}: target {} vs ε − x0 = {want_v}",
                        b.target[i]
                    );
                }
            }
            // A function of (seed, step) only.
            let again = drawn_batch(&o, k).unwrap();
            assert_eq!((again.sigmas, again.noise), (b.sigmas, b.noise));
        }
        assert_ne!(
            drawn_batch(&o, 0).unwrap().sigmas,
            drawn_batch(&o, 1).unwrap().sigmas
        );
    }
    // The σ rules, on one large batch: uniform has mean 1/2 and std 1/√12; logit-normal's
    // logit(σ) is N(0, 1), and N(0.5, 0.5) with mean 0.5, std 0.5.
    let many = |objective| {
        let mut o = opts(&data, &dir.path().join("unused"), 1, objective);
        o.batch = 4096;
        drawn_batch(&o, 2).unwrap()
    };
    let u = many(Objective::Flow(SigmaSampling::Uniform));
    let (m, s) = mean_std(&u.sigmas);
    assert!(
        (m - 0.5).abs() < 0.02 && (s - 12f64.sqrt().recip()).abs() < 0.02,
        "{m} {s}"
    );
    let noise: Vec<f64> = u.noise.iter().map(|&v| v as f64).collect();
    let (m, s) = mean_std(&noise);
    assert!(m.abs() < 0.01 && (s - 1.0).abs() < 0.01, "noise {m} {s}");
    for (mean, std) in [(0.0, 1.0), (0.5, 0.5)] {
        let l = many(Objective::Flow(SigmaSampling::LogitNormal { mean, std }));
        let logits: Vec<f64> = l.sigmas.iter().map(|&s| (s / (1.0 - s)).ln()).collect();
        let (m, s) = mean_std(&logits);
        assert!(
            (m - mean).abs() < 0.05 && (s - std).abs() < 0.05,
            "logit-normal({mean}, {std}): logit mean {m}, std {s}"
        );
    }
    // The ε-prediction batch still has the noise as its target and no σ.
    let e = drawn_batch(
        &opts(&data, &dir.path().join("unused"), 1, Objective::Eps),
        0,
    )
    .unwrap();
    assert!(e.sigmas.is_empty());
    assert_eq!(e.target, e.noise);
    assert!(e.timesteps.iter().all(|&n| n.fract() == 0.0 && n < 1000.0));
    // A logit-normal without a positive std is refused, naming the option.
    let mut o = opts(&data, &dir.path().join("unused"), 1, LOGIT_NORMAL);
    o.objective = Objective::Flow(SigmaSampling::LogitNormal {
        mean: 0.0,
        std: 0.0,
    });
    let err = format!("{:#}", drawn_batch(&o, 0).unwrap_err());
    assert!(
        err.contains("sigma_sampling=logit-normal") && err.contains("std 0"),
        "{err}"
    );
}

/// The flow-matching loss of a saved model on a fixed batch (fixed σ and noise).
fn fixed_flow_loss(m: &DiffusersModel) -> f64 {
    let dev = Device::Cpu;
    let x0: Vec<f32> = (0..16 * 64)
        .map(|i| {
            let (img, y) = (i / 64, (i % 64) / 8);
            if (y < 4) == (img % 2 == 0) { 0.8 } else { -0.9 }
        })
        .collect();
    let eps: Vec<f32> = (0..16 * 64)
        .map(|i| ((i * 2654435761usize % 1000) as f32 / 500.0 - 1.0) * 1.7)
        .collect();
    let t = |v: Vec<f32>| Tensor::from_vec(v, (16, 1, 8, 8), &dev).unwrap();
    let target = t(eps.iter().zip(&x0).map(|(e, x)| e - x).collect());
    let mut total = 0.0;
    for s in [0.1f32, 0.4, 0.7, 0.95] {
        let xs = t(x0
            .iter()
            .zip(&eps)
            .map(|(x, e)| (1.0 - s) * x + s * e)
            .collect());
        let pred = m.unet.forward(&xs, &[1000.0 * s as f64]).unwrap();
        total += (pred - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
    }
    total / 4.0
}

/// Steps of the short run (about 0.1 to 0.4 s each on a CPU).
const STEPS: usize = 30;

#[test]
fn a_short_flow_run_learns_and_writes_a_flow_checkpoint_that_samples() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let (early, late) = (dir.path().join("early"), dir.path().join("late"));
    train(&opts(&data, &early, 2, LOGIT_NORMAL), &Device::Cpu).unwrap();
    let r = train(&opts(&data, &late, STEPS, LOGIT_NORMAL), &Device::Cpu).unwrap();
    assert_eq!(r.end_step, STEPS);
    // The logged losses: finite, and lower at the end than at the start.
    let losses: Vec<f64> = std::fs::read_to_string(late.join("train_log.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses.len(), STEPS);
    assert!(
        losses.iter().all(|l| l.is_finite() && *l < 10.0),
        "{losses:?}"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (first, last) = (mean(&losses[..5]), mean(&losses[STEPS - 5..]));
    assert!(
        last < first,
        "loss {first:.4} over the first 5 steps, {last:.4} over the last 5"
    );
    let text = std::fs::read_to_string(late.join("scheduler_config.json")).unwrap();
    assert_eq!(text, FLOW_SCHEDULER_CONFIG);
    let cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(cfg["_class_name"], "FlowMatchEulerDiscreteScheduler");
    assert_eq!(
        (cfg["shift"].as_f64(), cfg["num_train_timesteps"].as_u64()),
        (Some(1.0), Some(1000))
    );
    let (m0, m1) = (
        DiffusersModel::load(&early, DType::F32, &Device::Cpu).unwrap(),
        DiffusersModel::load(&late, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(m1.scheduler.is_flow());
    let (before, after) = (fixed_flow_loss(&m0), fixed_flow_loss(&m1));
    eprintln!("fixed-batch flow loss: {before:.4} after 2 steps, {after:.4} after {STEPS}");
    assert!(
        after.is_finite() && after < 0.8 * before,
        "fixed-batch flow loss {before:.4} after 2 steps, {after:.4} after {STEPS}"
    );
    let png = dir.path().join("s.png");
    let o = qtaylor(&[
        "sample",
        "--model",
        p(&late),
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--out",
        p(&png),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(png.exists());
}

#[test]
fn a_resumed_flow_run_is_the_uninterrupted_one_and_another_objective_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    train(&opts(&data, &straight, 8, LOGIT_NORMAL), &Device::Cpu).unwrap();
    train(&opts(&data, &split, 3, LOGIT_NORMAL), &Device::Cpu).unwrap();
    let mut o = opts(&data, &split, 8, LOGIT_NORMAL);
    o.resume = Some(split.clone());
    let r = train(&o, &Device::Cpu).unwrap();
    assert_eq!((r.start_step, r.end_step), (3, 8));
    common::assert_same_training(&straight, &split);
    let before = common::folder_bytes(&split);
    // Through the library: another σ rule is another objective.
    let mut o = opts(&data, &split, 10, Objective::Flow(SigmaSampling::Uniform));
    o.resume = Some(split.clone());
    let e = format!("{:#}", train(&o, &Device::Cpu).unwrap_err());
    assert!(
        e.contains("objective: flow (sigma logit-normal, mean 0, std 1) in the folder, flow (sigma uniform) asked for"),
        "{e}"
    );
    // Through the command line: the default --objective eps.
    let cfg = dir.path().join("tiny.json");
    std::fs::write(&cfg, TINY_CONFIG).unwrap();
    let args = [
        "train",
        "--data",
        p(&data),
        "--out",
        p(&split),
        "--config",
        p(&cfg),
        "--steps",
        "10",
        "--batch",
        "16",
        "--lr",
        "3e-3",
        "--warmup",
        "5",
        "--ema",
        "0.9",
        "--resume",
        p(&split),
    ];
    let out = qtaylor(&args);
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(
        e.contains("--resume")
            && e.contains(
                "objective: flow (sigma logit-normal, mean 0, std 1) in the folder, eps asked for"
            ),
        "{e}"
    );
    // With --objective flow (logit-normal by default) the same command continues the run.
    common::assert_unchanged(&before);
    let flow: Vec<&str> = args
        .iter()
        .copied()
        .chain(["--objective", "flow"])
        .collect();
    let out = qtaylor(&flow);
    assert!(out.status.success(), "{}", stderr(&out));
    let log = std::fs::read_to_string(split.join("train_log.csv")).unwrap();
    assert_eq!(log.lines().count(), 11);
}

#[test]
fn sigma_sampling_without_the_flow_objective_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let cfg = dir.path().join("tiny.json");
    std::fs::write(&cfg, TINY_CONFIG).unwrap();
    let run = dir.path().join("run");
    let base = [
        "train",
        "--data",
        p(&data),
        "--out",
        p(&run),
        "--config",
        p(&cfg),
        "--steps",
        "2",
        "--batch",
        "8",
    ];
    let with = |extra: &[&str]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        qtaylor(&args)
    };
    for extra in [
        &["--sigma-sampling", "uniform"][..],
        &["--objective", "eps", "--sigma-sampling", "logit-normal"][..],
    ] {
        let o = with(extra);
        let e = stderr(&o);
        assert!(!o.status.success(), "{extra:?} succeeded");
        assert!(
            e.contains(&format!("--sigma-sampling {}", extra[extra.len() - 1]))
                && e.contains("--objective flow"),
            "{extra:?}: {e}"
        );
        assert!(!run.exists(), "{extra:?} wrote {}", run.display());
    }
    for (extra, want) in [
        (&["--objective", "velocity"][..], "--objective"),
        (
            &["--objective", "flow", "--sigma-sampling", "normal"][..],
            "--sigma-sampling",
        ),
    ] {
        let o = with(extra);
        let e = stderr(&o);
        assert!(!o.status.success() && e.contains(want), "{extra:?}: {e}");
        assert!(!run.exists());
    }
    // The flags as they should be: a uniform flow run writes a flow checkpoint.
    let o = with(&["--objective", "flow", "--sigma-sampling", "uniform"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(run.join("scheduler_config.json")).unwrap(),
        FLOW_SCHEDULER_CONFIG
    );
}
