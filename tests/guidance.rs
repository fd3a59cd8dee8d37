//! Class-conditional UNets and classifier-free guidance (issue 15): parity with diffusers'
//! `class_labels`, the guided prediction at its limits w = 0 and w = 1, and batch
//! independence of guided samples. The fixture tests/fixtures/unet2d/class_cond was written
//! by scripts/make-parity-fixtures.py (diffusers 0.42.1, num_class_embeds = 4).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qtaylor::grid::Grid;
use qtaylor::models::checkpoint::DiffusersModel;
use qtaylor::models::guidance::Guided;
use qtaylor::models::model::Model;
use qtaylor::sampling::samplers::{Options, sample};
use qtaylor::tensor::ops::max_abs_diff;
use qtaylor::tensor::rng::NoiseStreams;

mod common;
use common::conditional_mnist;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet2d/class_cond")
}

fn load() -> DiffusersModel {
    DiffusersModel::load(&fixture(), DType::F32, &Device::Cpu).unwrap()
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu).unwrap()
}

/// max |a − b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let m = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    max_abs_diff(a, b).unwrap() / m
}

#[test]
fn a_class_conditional_unet_matches_diffusers_class_labels_to_1e_5() {
    let m = load();
    let r = reference();
    let x = &r["x"];
    let got = m
        .unet
        .forward_labels(x, &[3.0, 999.0], Some(&[1, 3]))
        .unwrap();
    let e = rel(&got, &r["out_labels"]);
    eprintln!("class labels [1, 3]: max relative error {e:.2e}");
    assert!(e <= 1e-5, "{e:e}");
    for (key, t) in [
        ("out", vec![3.0, 999.0]),
        ("out_t500", vec![500.0]),
        ("out_t37_5", vec![37.5]),
    ] {
        let got = m.unet.forward_labels(x, &t, Some(&[3])).unwrap();
        let e = rel(&got, &r[key]);
        assert!(e <= 1e-5, "{key}: {e:e}");
    }
}

#[test]
fn labels_are_required_on_a_conditional_unet_and_refused_out_of_range() {
    let m = load();
    let x = &reference()["x"];
    let e = m.unet.forward(x, &[3.0]).unwrap_err().to_string();
    assert!(e.contains("class-conditional (4 classes)"), "{e}");
    let e = m
        .unet
        .forward_labels(x, &[3.0], Some(&[4]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("label 4 is outside the model's 4 classes"),
        "{e}"
    );
    let plain = DiffusersModel::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet2d/ddpm_legacy"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let e = Guided::new(&plain, vec![0], 0, 2.0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not class-conditional"), "{e}");
    let e = Guided::new(&m, vec![0], 3, -1.0).err().unwrap().to_string();
    assert!(e.contains("guidance=-1"), "{e}");
}

#[test]
fn guidance_one_is_the_conditional_model_and_zero_the_null_class_model() {
    let m = load();
    let x = &reference()["x"];
    let t = [0.3];
    let labels = vec![1, 2];
    let cond = m.network(x, &t, Some(&labels)).unwrap();
    let null = m.network(x, &t, Some(&[3])).unwrap();
    // The fixture's scheduler has clip_sample: the guided output is clipped after the
    // combination (`finish`), as in diffusers' pipelines.
    let fin = |out: &Tensor| m.finish(out.clone(), x, &t).unwrap();
    let g = |w: f64| {
        Guided::new(&m, labels.clone(), 3, w)
            .unwrap()
            .predict(x, &t)
            .unwrap()
    };
    assert_eq!(max_abs_diff(&g(1.0), &fin(&cond)).unwrap(), 0.0);
    assert_eq!(max_abs_diff(&g(0.0), &fin(&null)).unwrap(), 0.0);
    // Near the limits the batched 2B-row call gives the same as the separate calls.
    assert!(rel(&g(1.0 + 1e-9), &fin(&cond)) <= 1e-5);
    assert!(rel(&g(1e-9), &fin(&null)) <= 1e-5);
    // And in between it is u + w (c − u).
    let w = 3.5;
    let want = fin(&(&null + ((&cond - &null).unwrap() * w).unwrap()).unwrap());
    assert!(rel(&g(w), &want) <= 1e-5, "{}", rel(&g(w), &want));
    assert_eq!(
        Guided::new(&m, labels.clone(), 3, w)
            .unwrap()
            .rows_per_call(),
        2
    );
    assert_eq!(Guided::new(&m, labels, 3, 1.0).unwrap().rows_per_call(), 1);
}

#[test]
fn a_guided_sample_does_not_depend_on_the_other_rows_or_classes_in_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let m = conditional_mnist(dir.path());
    let s = m.schedule.clone();
    let ts = Grid::LogSnr.times(s.as_ref(), 3, 1.0, 1e-3).unwrap();
    let run = |labels: Vec<u32>, first: usize| {
        let mut noise = NoiseStreams::new(7, first, labels.len());
        let x = noise
            .normal(&[1, 28, 28], DType::F32, &Device::Cpu)
            .unwrap();
        let g = Guided::new(&m, labels, 10, 2.5).unwrap();
        sample(
            &g,
            s.as_ref(),
            "dpmpp-2m".parse().unwrap(),
            &Options::default(),
            &ts,
            x,
            &mut noise,
            None,
        )
        .unwrap()
        .x
    };
    let classes = [0u32, 7, 3, 7];
    let batch = run(classes.to_vec(), 0);
    for (i, c) in classes.into_iter().enumerate() {
        let alone = run(vec![c], i);
        let row = batch.narrow(0, i, 1).unwrap();
        assert_eq!(
            max_abs_diff(&row, &alone).unwrap(),
            0.0,
            "row {i} (class {c})"
        );
    }
    // Another class in the other rows changes nothing either.
    let other = run(vec![0, 7, 9, 1], 0);
    assert_eq!(
        max_abs_diff(
            &other.narrow(0, 0, 2).unwrap(),
            &batch.narrow(0, 0, 2).unwrap()
        )
        .unwrap(),
        0.0
    );
}

fn qtaylor(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_qtaylor"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn sample_takes_classes_and_guidance_on_a_conditional_checkpoint_samples_its_null_class_without_one_and_refuses_them_elsewhere()
 {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid.png");
    let npy = dir.path().join("x.npy");
    let (f, o, n) = (
        fixture().display().to_string(),
        out.display().to_string(),
        npy.display().to_string(),
    );
    let base = [
        "sample",
        "--model",
        &f,
        "--sampler",
        "dpmpp-2m",
        "--steps",
        "4",
        "--out",
        &o,
    ];
    let run = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        qtaylor(&a)
    };
    // Every class but the null one, one per grid row: 3 classes -> 9 samples.
    let r = run(&["--classes", "all", "--guidance", "3", "--save-npy", &n]);
    let e = String::from_utf8_lossy(&r.stderr).to_string();
    assert!(r.status.success(), "{e}");
    assert!(
        e.contains("9 samples") && e.contains("guidance 3 (2 network rows per sample and call)"),
        "{e}"
    );
    let x = qtaylor::io::read_npy(&npy, &[Some(9), Some(3), Some(8), Some(8)]).unwrap();
    assert!(
        x.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    );
    // Without a class: the unconditional (null-class) model, the same samples as w = 0.
    let (u, z) = (dir.path().join("u.npy"), dir.path().join("z.npy"));
    let r = run(&["--batch", "5", "--save-npy", &u.display().to_string()]);
    let e = String::from_utf8_lossy(&r.stderr).to_string();
    assert!(
        r.status.success() && e.contains("samples the unconditional model (null class 3)"),
        "{e}"
    );
    let args = [
        "--batch",
        "5",
        "--class",
        "1",
        "--guidance",
        "0",
        "--save-npy",
    ];
    let r = run(&[&args[..], &[&z.display().to_string()]].concat());
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(std::fs::read(&u).unwrap(), std::fs::read(&z).unwrap());
    let refused: &[(&[&str], &str)] = &[
        (&["--class", "4"], "--class 4: the model has 4 classes"),
        (
            &["--class", "1", "--classes", "all"],
            "one of --class and --classes",
        ),
        (
            &["--guidance", "2"],
            "--guidance does nothing without --class",
        ),
        (&["--classes", "0,x"], "'x' is not a class number"),
        (&["--class", "0", "--guidance=-2"], "--guidance -2"),
    ];
    std::fs::remove_file(&out).unwrap();
    for (extra, want) in refused {
        let r = run(extra);
        let e = String::from_utf8_lossy(&r.stderr).to_string();
        assert!(!r.status.success() && e.contains(want), "{extra:?}: {e}");
        assert!(!out.exists() && !e.contains("panicked"));
    }
    // An unconditional model refuses class flags.
    let plain = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet2d/ddpm_legacy");
    let p = plain.display().to_string();
    let r = qtaylor(&[
        "sample",
        "--model",
        &p,
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--out",
        &o,
        "--class",
        "1",
    ]);
    let e = String::from_utf8_lossy(&r.stderr).to_string();
    assert!(
        !r.status.success() && e.contains("this model is not class-conditional"),
        "{e}"
    );
}
