//! The command line, end to end: outputs, reproducibility, and bad input (clear error,
//! nothing written).

mod common;
use common::{p, qtaylor, stderr};
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use qtaylor::io::{read_npy, write_npy};
use qtaylor::tensor::rng::NoiseStreams;

fn rows(path: &Path) -> Vec<Vec<f64>> {
    qtaylor::tensor::ops::rows_f64(&read_npy(path, &[None, None]).unwrap()).unwrap()
}

#[test]
fn samplers_lists_every_sampler_with_its_nfe_per_step() {
    let o = qtaylor(&["samplers"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for name in [
        "qt-K", "qit-1", "qit-2", "qit-inf", "ddim", "ddpm", "euler", "heun", "rk4", "rk45", "em",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{out}"
        );
    }
}

#[test]
fn sample_writes_the_requested_batch_in_the_requested_dtype() {
    let dir = tempfile::tempdir().unwrap();
    for dtype in ["f32", "f64"] {
        let out = dir.path().join(format!("s-{dtype}.npy"));
        let o = qtaylor(&[
            "sample",
            "--problem",
            "gmm-demo",
            "--sampler",
            "qt-3",
            "--steps",
            "8",
            "--batch",
            "5",
            "--dtype",
            dtype,
            "--grid",
            "logsnr",
            "--out",
            p(&out),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let t = read_npy(&out, &[Some(5), Some(64)]).unwrap();
        assert_eq!(
            t.dtype(),
            if dtype == "f32" {
                DType::F32
            } else {
                DType::F64
            }
        );
    }
}

#[test]
fn x_init_equal_to_the_default_start_noise_reproduces_the_default_run() {
    let dir = tempfile::tempdir().unwrap();
    let x0 = NoiseStreams::new(9, 0, 4)
        .normal(&[64], DType::F64, &Device::Cpu)
        .unwrap();
    let init = dir.path().join("init.npy");
    write_npy(&init, &x0).unwrap();
    for sampler in ["qt-2", "qit-2"] {
        let (a, b) = (dir.path().join("a.npy"), dir.path().join("b.npy"));
        let common = [
            "sample",
            "--problem",
            "gmm-demo",
            "--sampler",
            sampler,
            "--steps",
            "6",
            "--seed",
            "9",
            "--dtype",
            "f64",
        ];
        let o = qtaylor(&[&common[..], &["--batch", "4", "--out", p(&a)]].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let o = qtaylor(&[&common[..], &["--x-init", p(&init), "--out", p(&b)]].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(rows(&a), rows(&b), "{sampler}");
    }
}

#[test]
fn output_bits_do_not_depend_on_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for threads in ["1", "2"] {
        let out = dir.path().join(format!("t{threads}.npy"));
        let o = Command::new(env!("CARGO_BIN_EXE_qtaylor"))
            .env("RAYON_NUM_THREADS", threads)
            .args([
                "sample",
                "--problem",
                "gmm-demo",
                "--sampler",
                "qit-2",
                "--steps",
                "10",
                "--batch",
                "64",
                "--out",
                p(&out),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        outs.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(outs[0], outs[1]);
}

#[test]
fn bench_writes_csv_json_markdown_and_png() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let o = qtaylor(&[
        "bench",
        "--samplers",
        "qt-2,ddim,heun,qit-2,rk45",
        "--nfe",
        "5,10",
        "--batch",
        "32",
        "--out",
        p(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("| qt-2 |") && stdout.contains("Sliced W2"),
        "{stdout}"
    );
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert!(csv.starts_with("sampler,nfe_budget,steps,nfe_used,rmse,sw2,sw2_floor"));
    assert_eq!(csv.lines().count(), 1 + 5 * 2);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 10);
    assert!(json["reference_check"].as_f64().unwrap() < 1e-6);
    let png = std::fs::read(out.join("error_vs_nfe.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(
        std::fs::read_to_string(out.join("report.md"))
            .unwrap()
            .contains("| ddim |")
    );
}

/// Runs a `sample` command that must fail: non-zero exit, `needles` in the message, and
/// the output file not created.
fn fails(extra: &[&str], needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out: PathBuf = dir.path().join("out.npy");
    let mut args = vec!["sample", "--out", p(&out)];
    if !extra.contains(&"--problem") && !extra.contains(&"--model") {
        args.extend(["--problem", "gmm-demo"]);
    }
    if !extra.contains(&"--sampler") {
        args.extend(["--sampler", "qt-2"]);
    }
    if !extra.contains(&"--steps") {
        args.extend(["--steps", "5"]);
    }
    args.extend(extra);
    let o = qtaylor(&args);
    let e = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded");
    for n in needles {
        assert!(e.contains(n), "{args:?}: '{n}' not in: {e}");
    }
    assert!(!e.contains("panicked"), "{e}");
    assert!(!out.exists(), "{args:?} wrote its output");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "{args:?} left files: {leftovers:?}");
}

#[test]
fn unknown_sampler_lists_the_valid_ones() {
    fails(
        &["--sampler", "dpm-fast"],
        &["unknown sampler 'dpm-fast'", "qt-K", "ddim", "rk45"],
    );
}

#[test]
fn zero_steps_is_rejected() {
    fails(&["--steps", "0"], &["--steps 0"]);
}

#[test]
fn t_min_not_below_t_max_is_rejected() {
    fails(
        &["--t-min", "0.5", "--t-max", "0.5"],
        &["--t-min 0.5", "--t-max 0.5"],
    );
    fails(&["--t-max", "1.5"], &["--t-max 1.5", "beyond the end"]);
}

#[test]
fn negative_eta_is_rejected() {
    fails(
        &["--sampler", "ddim", "--eta", "-0.1"],
        &["--eta -0.1", ">= 0"],
    );
}

#[test]
fn order_zero_is_rejected() {
    fails(&["--sampler", "qt-0"], &["order 0"]);
}

#[test]
fn malformed_mixture_json_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("mix.json");
    std::fs::write(&f, r#"{"dim": 2, "weights": [0.5, 0.5], "means": [[0, 0], [1]], "variances": [[1, 1], [1, 1]]}"#).unwrap();
    fails(
        &["--problem", p(&f)],
        &["mix.json", "means[1] has 1 entries, expected dim = 2"],
    );
    std::fs::write(&f, r#"{"dim": 2, "weights": [1.0], "means": [[0, 0]]}"#).unwrap();
    fails(&["--problem", p(&f)], &["mix.json", "variances"]);
    fails(&["--problem", "nothere.json"], &["nothere.json"]);
}

#[test]
fn x_init_of_wrong_shape_or_dtype_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.npy");
    write_npy(
        &f,
        &Tensor::zeros((3, 10), DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    fails(&["--x-init", p(&f)], &["x.npy", "[3, 10]", "(*, 64)"]);
    write_npy(
        &f,
        &Tensor::zeros((3, 64), DType::U8, &Device::Cpu).unwrap(),
    )
    .unwrap();
    fails(&["--x-init", p(&f)], &["x.npy", "float32 or float64"]);
    write_npy(
        &f,
        &Tensor::zeros((3, 64), DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    fails(
        &["--x-init", p(&f), "--batch", "4"],
        &["--batch 4", "3 rows"],
    );
}

#[test]
fn a_nan_start_state_is_named_in_its_file_and_writes_nothing() {
    // Checked when the file is read, before the model runs (a NaN the model produces is
    // named with its step and t: tests/properties.rs).
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("nan.npy");
    write_npy(&f, &Tensor::new(&[[f32::NAN; 64]], &Device::Cpu).unwrap()).unwrap();
    fails(
        &["--x-init", p(&f), "--sampler", "qt-3"],
        &["nan.npy", "row 0", "NaN", "finite"],
    );
}

#[test]
fn cuda_without_a_cuda_build_is_a_clear_error() {
    fails(&["--device", "cuda"], &["--device cuda"]);
}

#[test]
fn every_readme_command_runs() {
    // Every `cargo run --release -- …` line of README.md, run with this build's binary and
    // its --out redirected into a temporary folder. The main command must print the table.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let prefix = "cargo run --release -- ";
    // (also the indented ones inside list items)
    let lines: Vec<&str> = readme
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with(prefix))
        .collect();
    assert!(lines.len() >= 2, "README lost its commands");
    assert!(
        lines[0].starts_with("cargo run --release -- sample --sampler qt-"),
        "the first command is the main job: digits from the embedded model, quasi-Taylor"
    );
    for (i, line) in lines.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let mut args: Vec<String> = line[prefix.len()..]
            .split_whitespace()
            .map(String::from)
            .collect();
        let out = args
            .iter()
            .position(|a| a == "--out")
            .expect("--out in every README command");
        let target = dir.path().join(&args[out + 1]);
        args[out + 1] = p(&target).to_string();
        let o = Command::new(env!("CARGO_BIN_EXE_qtaylor"))
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{line}: {}", stderr(&o));
        assert!(target.exists(), "{line} wrote nothing");
        if i == 0 {
            let png = std::fs::read(&target).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        }
        if line.contains(" bench ") && line.contains("gmm-demo") {
            let stdout = String::from_utf8_lossy(&o.stdout);
            assert!(
                stdout.contains("| qt-3 |") && stdout.contains("| ddim |"),
                "{stdout}"
            );
            assert!(target.join("error_vs_nfe.png").exists());
        }
    }
}

#[test]
fn speed_reports_forward_sample_and_the_per_step_share_outside_the_network() {
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/unet2d/multihead"
    );
    let o = qtaylor(&[
        "speed",
        "--model",
        model,
        "--batch",
        "2",
        "--repeats",
        "1",
        "--steps",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "forward: ",
        "sample qt-3, 2 steps (2 NFE): ",
        "copying the result to the host",
        "per step (4 vs 2 steps): ",
        "peak resident memory",
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }
    // The CUDA pool's high-water mark exists only on a GPU.
    assert!(!out.contains("peak device memory allocated"), "{out}");
}

#[test]
fn the_deterministic_switch_is_honoured_or_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let run = |env: Option<&str>, flag: Option<&str>, out: &Path| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qtaylor"));
        if let Some(v) = env {
            c.env("QTAYLOR_DETERMINISTIC", v);
        }
        let mut args = vec!["sample", "--problem", "gmm-demo", "--sampler", "qt-2"];
        args.extend(["--steps", "4", "--batch", "8", "--out", p(out)]);
        if let Some(f) = flag {
            args.push(f);
        }
        c.args(&args).output().unwrap()
    };
    // An unknown word, from the environment or the flag, is an error naming it; nothing is
    // written.
    let bad = dir.path().join("bad.npy");
    let o = run(Some("sometimes"), None, &bad);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("QTAYLOR_DETERMINISTIC=\"sometimes\""),
        "{}",
        stderr(&o)
    );
    let o = run(None, Some("--deterministic=sometimes"), &bad);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--deterministic"), "{}", stderr(&o));
    assert!(!bad.exists());
    // On the CPU the mode keeps the bits: off, on by the environment, on by the flag, and the
    // flag's off over the environment's on.
    let mut outs = Vec::new();
    for (i, (env, flag)) in [
        (None, None),
        (Some("1"), None),
        (None, Some("--deterministic")),
        (Some("on"), Some("--deterministic=off")),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.path().join(format!("{i}.npy"));
        let o = run(env, flag, &out);
        assert!(o.status.success(), "{}", stderr(&o));
        outs.push(std::fs::read(&out).unwrap());
    }
    assert!(outs.iter().all(|o| *o == outs[0]));
}
