//! `qtaylor train`: the loss falls, checkpoints reload and resume exactly, bad input fails
//! cleanly without touching existing checkpoints.

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use qtaylor::models::checkpoint::DiffusersModel;
use qtaylor::tensor::ops::max_abs_diff;
use qtaylor::train::{TrainOptions, train, train_on};

mod common;
use common::{TINY_CONFIG, tiny_data};

fn opts(data: &Path, out: &Path, steps: usize) -> TrainOptions {
    common::tiny_train_options(data, out, steps)
}

use common::tensors;

/// The ε-prediction loss of a saved model on a fixed batch (fixed timesteps and noise).
fn fixed_loss(model_dir: &Path) -> f64 {
    let m = DiffusersModel::load(model_dir, DType::F32, &Device::Cpu).unwrap();
    let dev = Device::Cpu;
    let x0 = Tensor::from_vec(
        (0..16 * 64)
            .map(|i| {
                let (img, y) = (i / 64, (i % 64) / 8);
                if (y < 4) == (img % 2 == 0) {
                    0.8f32
                } else {
                    -0.9
                }
            })
            .collect::<Vec<_>>(),
        (16, 1, 8, 8),
        &dev,
    )
    .unwrap();
    // The same pseudo-noise for every model.
    let eps = Tensor::from_vec(
        (0..16 * 64)
            .map(|i| ((i * 2654435761usize % 1000) as f32 / 500.0 - 1.0) * 1.7)
            .collect::<Vec<_>>(),
        (16, 1, 8, 8),
        &dev,
    )
    .unwrap();
    let betas = qtaylor::schedule::diffusers_betas("linear", 1e-4, 0.02, 1000).unwrap();
    let abars = qtaylor::schedule::diffusers_alphas_cumprod(&betas);
    let (mut total, mut count) = (0.0, 0.0);
    for n in [50usize, 200, 400, 700] {
        let abar = abars[n];
        let xt = ((&x0 * abar.sqrt()).unwrap() + (&eps * (1.0 - abar).sqrt()).unwrap()).unwrap();
        let pred = m.unet.forward(&xt, &[n as f64]).unwrap();
        let l = (pred - &eps)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        total += l;
        count += 1.0;
    }
    total / count
}

#[test]
fn training_on_a_tiny_data_set_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let early = dir.path().join("early");
    let late = dir.path().join("late");
    train(&opts(&data, &early, 2), &Device::Cpu).unwrap();
    let r = train(&opts(&data, &late, 120), &Device::Cpu).unwrap();
    let (before, after) = (fixed_loss(&early), fixed_loss(&late));
    eprintln!("fixed-batch loss: {before:.4} after 2 steps, {after:.4} after 120");
    assert!(
        after < 0.6 * before,
        "fixed-batch loss {before:.4} after 2 steps, {after:.4} after 120"
    );
    assert!(r.last_loss < r.first_loss, "{r:?}");
}

#[test]
fn a_saved_checkpoint_reloads_to_identical_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let out = dir.path().join("run");
    let o = opts(&data, &out, 6);
    train(&o, &Device::Cpu).unwrap();
    // The diffusers files hold the EMA weights, bit for bit those of the training state.
    let model = tensors(&out.join("diffusion_pytorch_model.safetensors"));
    let state = tensors(&out.join("train_state.safetensors"));
    for (name, t) in &model {
        let e = &state[&format!("ema/{name}")];
        assert_eq!(max_abs_diff(t, e).unwrap(), 0.0, "{name}");
    }
    let in_memory = qtaylor::train::load_ema_unet(&out, &o, &Device::Cpu).unwrap();
    let loaded = DiffusersModel::load(&out, DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 1, 8, 8), &Device::Cpu).unwrap();
    let a = in_memory.forward(&x, &[10.0, 500.0, 990.0]).unwrap();
    let b = loaded.unet.forward(&x, &[10.0, 500.0, 990.0]).unwrap();
    assert_eq!(max_abs_diff(&a, &b).unwrap(), 0.0);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["_class_name"], "UNet2DModel");
    assert_eq!(cfg["sample_size"], 8);
    let log = std::fs::read_to_string(out.join("train_log.csv")).unwrap();
    assert_eq!(log.lines().count(), 7, "{log}");
}

#[test]
fn resume_continues_the_same_optimizer_state() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let straight = dir.path().join("straight");
    let split = dir.path().join("split");
    train(&opts(&data, &straight, 8), &Device::Cpu).unwrap();
    train(&opts(&data, &split, 3), &Device::Cpu).unwrap();
    let mut o = opts(&data, &split, 8);
    o.resume = Some(split.clone());
    let r = train(&o, &Device::Cpu).unwrap();
    assert_eq!((r.start_step, r.end_step), (3, 8));
    common::assert_same_training(&straight, &split);
}

fn qtaylor(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qtaylor"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_data_or_a_foreign_resume_folder_is_a_clear_error_and_overwrites_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let cfg = dir.path().join("tiny.json");
    std::fs::write(&cfg, TINY_CONFIG).unwrap();
    let run = dir.path().join("run");
    let base = |out: &Path, data: &Path| {
        vec![
            "train".to_string(),
            "--data".into(),
            data.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--config".into(),
            cfg.display().to_string(),
        ]
    };
    let run_with = |mut a: Vec<String>, extra: &[&str]| {
        a.extend(extra.iter().map(|s| s.to_string()));
        qtaylor(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // A folder without IDX files.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, err) = run_with(base(&run, &empty), &["--steps", "2", "--batch", "8"]);
    assert!(
        !ok && err.contains("train-images-idx3-ubyte") && err.contains("empty"),
        "{err}"
    );
    assert!(!run.exists());
    // A corrupt IDX header.
    let bad = dir.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("train-images-idx3-ubyte"), [1u8, 2, 3, 4, 5, 6]).unwrap();
    std::fs::copy(
        data.join("train-labels-idx1-ubyte"),
        bad.join("train-labels-idx1-ubyte"),
    )
    .unwrap();
    let (ok, err) = run_with(base(&run, &bad), &["--steps", "2", "--batch", "8"]);
    assert!(
        !ok && err.contains("train-images-idx3-ubyte") && err.contains("magic number"),
        "{err}"
    );
    assert!(!run.exists());
    // A good run, then a resume with another config: refused, nothing rewritten.
    let (ok, err) = run_with(base(&run, &data), &["--steps", "2", "--batch", "8"]);
    assert!(ok, "{err}");
    let before = common::folder_bytes(&run);
    let other = dir.path().join("other.json");
    std::fs::write(&other, TINY_CONFIG.replace("[8, 16]", "[8, 8]")).unwrap();
    let mut a = base(&run, &data);
    a[6] = other.display().to_string();
    let (ok, err) = run_with(
        a,
        &[
            "--steps",
            "4",
            "--batch",
            "8",
            "--resume",
            run.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && err.contains("block_out_channels") && err.contains("[8,16]"),
        "{err}"
    );
    // Another batch size, and training into a folder that holds a run without --resume.
    let (ok, err) = run_with(
        base(&run, &data),
        &[
            "--steps",
            "4",
            "--batch",
            "4",
            "--resume",
            run.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && err.contains("batch: 8 in the folder, 4 asked for"),
        "{err}"
    );
    let (ok, err) = run_with(base(&run, &data), &["--steps", "4", "--batch", "8"]);
    assert!(!ok && err.contains("already holds a training run"), "{err}");
    common::assert_unchanged(&before);
}

#[test]
fn a_class_conditional_run_drops_labels_to_the_null_class_resumes_exactly_and_samples_guided() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let mut cfg: serde_json::Value = serde_json::from_str(TINY_CONFIG).unwrap();
    cfg["num_class_embeds"] = 3.into(); // classes 0 and 1, null class 2
    let conditional = |o: &mut TrainOptions| {
        o.config = cfg.to_string();
        o.label_dropout = Some(0.25);
    };
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    let mut o = opts(&data, &straight, 6);
    conditional(&mut o);
    train(&o, &Device::Cpu).unwrap();
    let mut o = opts(&data, &split, 3);
    conditional(&mut o);
    train(&o, &Device::Cpu).unwrap();
    let mut o = opts(&data, &split, 6);
    conditional(&mut o);
    o.resume = Some(split.clone());
    train(&o, &Device::Cpu).unwrap();
    let (a, b) = (
        tensors(&straight.join("train_state.safetensors")),
        tensors(&split.join("train_state.safetensors")),
    );
    assert!(a.contains_key("param/class_embedding.weight"));
    for (k, t) in &a {
        assert_eq!(
            max_abs_diff(t, &b[k]).unwrap(),
            0.0,
            "{k} differs after resume"
        );
    }
    // The checkpoint says num_class_embeds in diffusers' key, and samples with guidance.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["num_class_embeds"], 3);
    let out = dir.path().join("g.png");
    let (ok, err) = qtaylor(&[
        "sample",
        "--model",
        straight.to_str().unwrap(),
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--classes",
        "all",
        "--guidance",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        ok && err.contains("4 samples") && err.contains("2 network rows"),
        "{err}"
    );
    // The dropout fraction is a setting of the run; on an unconditional config it is an error.
    let mut o = opts(&data, &split, 8);
    o.config = cfg.to_string();
    o.label_dropout = Some(0.5);
    o.resume = Some(split.clone());
    let e = format!("{:#}", train(&o, &Device::Cpu).err().unwrap());
    assert!(e.contains("label_dropout"), "{e}");
    let mut o = opts(&data, &dir.path().join("plain"), 2);
    o.label_dropout = Some(0.1);
    let e = format!("{:#}", train(&o, &Device::Cpu).err().unwrap());
    assert!(e.contains("label_dropout does nothing"), "{e}");
    // Labels must leave the last class free for the null class.
    let mut o = opts(&data, &dir.path().join("two"), 2);
    cfg["num_class_embeds"] = 2.into();
    o.config = cfg.to_string();
    let e = format!("{:#}", train(&o, &Device::Cpu).err().unwrap());
    assert!(e.contains("has label 1") && e.contains("null class"), "{e}");
}

/// The relative gap between two training states for one kind of tensor (`param`, `adam_m`,
/// `adam_v`, `ema`): max|a − b| over the kind's tensors divided by max|a| over them.
fn state_gap(a: &Path, b: &Path, kind: &str) -> f64 {
    let (a, b) = (
        tensors(&a.join("train_state.safetensors")),
        tensors(&b.join("train_state.safetensors")),
    );
    assert_eq!(a.len(), b.len());
    let (mut gap, mut scale) = (0.0f64, 0.0f64);
    for (k, t) in a.iter().filter(|(k, _)| k.starts_with(&format!("{kind}/"))) {
        let s = t
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        scale = scale.max(s as f64);
        gap = gap.max(max_abs_diff(t, &b[k]).unwrap() as f64);
    }
    gap / scale
}

/// Two runs that should agree to rounding: the Adam moments (the second one would be R²
/// times larger if the replicas' gradients were summed instead of averaged) and the saved
/// model's loss on a fixed batch. The weights themselves are not compared element by element:
/// a gradient that is zero up to rounding (attention's key bias: softmax ignores it) gets
/// Adam steps of size ~lr from rounding noise alone, in both runs alike but not the same.
fn assert_same_training(a: &Path, b: &Path) {
    for kind in ["adam_m", "adam_v"] {
        let gap = state_gap(a, b, kind);
        eprintln!("{}: {kind} relative gap {gap:.1e}", b.display());
        assert!(gap < 1e-5, "{}: {kind} differs by {gap:e}", b.display());
    }
    let (la, lb) = (fixed_loss(a), fixed_loss(b));
    eprintln!("{}: fixed-batch loss {la:.7} vs {lb:.7}", b.display());
    assert!(
        (la - lb).abs() <= 1e-5 * la,
        "fixed-batch loss {la} vs {lb}"
    );
}

/// The logged losses of a run.
fn logged_losses(dir: &Path) -> Vec<f64> {
    std::fs::read_to_string(dir.join("train_log.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn data_parallel_training_follows_the_one_device_run_at_the_same_global_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let (one, two, four) = (
        dir.path().join("one"),
        dir.path().join("two"),
        dir.path().join("four"),
    );
    train(&opts(&data, &one, 6), &Device::Cpu).unwrap();
    let r = train_on(&opts(&data, &two, 6), &[Device::Cpu, Device::Cpu]).unwrap();
    assert_eq!((r.start_step, r.end_step), (0, 6));
    train_on(&opts(&data, &four, 6), &vec![Device::Cpu; 4]).unwrap();
    let reference = logged_losses(&one);
    for run in [&two, &four] {
        // Only the order of the floating-point sums differs: the losses agree to rounding
        // (the log keeps 6 decimals), and so does the training.
        let losses = logged_losses(run);
        assert_eq!(losses.len(), 6);
        for (a, b) in reference.iter().zip(&losses) {
            assert!((a - b).abs() <= 2e-6, "{reference:?} vs {losses:?}");
        }
        assert_same_training(&one, run);
    }
}

#[test]
fn a_data_parallel_run_resumes_on_another_number_of_devices() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    train(&opts(&data, &straight, 8), &Device::Cpu).unwrap();
    train_on(&opts(&data, &split, 3), &vec![Device::Cpu; 4]).unwrap();
    let mut o = opts(&data, &split, 6);
    o.resume = Some(split.clone());
    train_on(&o, &vec![Device::Cpu; 2]).unwrap();
    let mut o = opts(&data, &split, 8);
    o.resume = Some(split.clone());
    let r = train(&o, &Device::Cpu).unwrap();
    assert_eq!((r.start_step, r.end_step), (6, 8));
    assert_same_training(&straight, &split);
    assert_eq!(logged_losses(&split).len(), 8);
}

#[test]
fn a_batch_that_does_not_split_over_the_devices_is_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let out = dir.path().join("run");
    let mut o = opts(&data, &out, 2);
    o.batch = 15;
    let e = train_on(&o, &[Device::Cpu, Device::Cpu])
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch=15") && e.contains("multiple of 2"), "{e}");
    assert!(!out.exists());
    let cfg = dir.path().join("tiny.json");
    std::fs::write(&cfg, TINY_CONFIG).unwrap();
    let base = [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        "2",
        "--batch",
        "8",
    ];
    for (extra, want) in [
        (
            &["--devices", "cpu,cpu", "--device", "cpu"][..],
            "cannot be used with",
        ),
        (&["--devices", "cpu,,cpu"][..], "comma-separated"),
        (&["--devices", "cuda:0,cuda"][..], "GPU 0 appears twice"),
        (
            &["--devices", "cpu,tpu"][..],
            "--device tpu: expected cpu, cuda or cuda:N",
        ),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let (ok, err) = qtaylor(&args);
        assert!(!ok && err.contains(want), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?} wrote {}", out.display());
    }
    // The same run through the command line trains.
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain(["--devices", "cpu,cpu"])
        .collect();
    let (ok, err) = qtaylor(&args);
    assert!(ok, "{err}");
    assert_eq!(logged_losses(&out).len(), 2);
}
