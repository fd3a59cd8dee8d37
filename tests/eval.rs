//! `qtaylor eval` on the shipped unconditional MNIST model (and the embedded conditional one)
//! and the committed MNIST classifier, against a small synthetic 28×28 IDX data set (CI has no MNIST download): outputs are written and
//! labelled, metrics are finite, and results do not depend on the batch size.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use qtaylor::measure::eval::{EvalOptions, FID_LABEL, eval};
use qtaylor::models::checkpoint::DiffusersModel;
use qtaylor::tensor::ops::max_abs_diff;

mod common;
use common::{conditional_mnist, mnist_unet_folder, strokes};

fn options(dir: &Path, out: &str, batch: usize) -> EvalOptions {
    let data = strokes(dir);
    let mut o = EvalOptions::new(&mnist_unet_folder(dir), &["ddim", "qt-2"], &dir.join(out));
    o.nfe = vec![2, 3];
    o.n = 6;
    o.batch = batch;
    o.data = data.to_str().unwrap().to_string();
    o.reference_steps = 4;
    o.grid_nfe = 2;
    o.kid_subsets = 3;
    o.kid_subset_size = 4;
    o
}

#[test]
fn eval_writes_labelled_reports_with_finite_metrics_and_a_reference_row() {
    let dir = tempfile::tempdir().unwrap();
    let o = options(dir.path(), "out", 6);
    let r = eval(&o, &Device::Cpu).unwrap();
    // data floor + ddpm reference + 2 samplers × 2 budgets
    assert_eq!(r.rows.len(), 6, "{:?}", r.rows);
    assert_eq!(r.rows[0].sampler, "data:train");
    // Real training digits: the classifier is confident about (nearly) all of them.
    assert!(r.rows[0].confident.unwrap() >= 5.0 / 6.0, "{:?}", r.rows[0]);
    let last = r.rows.last().unwrap();
    assert_eq!((last.sampler.as_str(), last.steps), ("ddpm", 4));
    for row in &r.rows {
        assert!(row.fid.is_finite() && row.fid >= 0.0, "{row:?}");
        assert!((0.0..=1.0).contains(&row.precision) && (0.0..=1.0).contains(&row.recall));
        assert!(row.confidence > 0.1 && row.confidence <= 1.0);
        assert!((0.0..=1.0).contains(&row.confident.unwrap()));
    }
    // budget-major order: ddim 2, qt-2 2, ddim 3, qt-2 3
    let nfe: Vec<f64> = r.rows[1..5].iter().map(|r| r.nfe).collect();
    assert_eq!(nfe, vec![2.0, 2.0, 3.0, 3.0]);
    for f in [
        "results.csv",
        "results.json",
        "report.md",
        "fid_vs_nfe.png",
        "grid-ddim-nfe2.png",
        "grid-qt-2-nfe2.png",
        "grid-ddpm-4steps.png",
    ] {
        assert!(o.out.join(f).is_file(), "{f} missing");
    }
    let md = std::fs::read_to_string(o.out.join("report.md")).unwrap();
    assert!(md.contains(FID_LABEL));
    let json = std::fs::read_to_string(o.out.join("results.json")).unwrap();
    assert!(json.contains(FID_LABEL));
}

#[test]
fn eval_results_do_not_depend_on_the_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = options(dir.path(), "a", 6);
    a.reference_steps = 0;
    let mut b = options(dir.path(), "b", 4);
    b.reference_steps = 0;
    let (ra, rb) = (
        eval(&a, &Device::Cpu).unwrap(),
        eval(&b, &Device::Cpu).unwrap(),
    );
    // Each sample has its own noise stream and the network and the classifier compute each
    // image independently of its batch: the metrics agree bit for bit.
    for (x, y) in ra.rows.iter().zip(&rb.rows) {
        assert_eq!(x.sampler, y.sampler);
        assert_eq!(
            (x.fid, x.kid, x.precision, x.recall, x.confidence),
            (y.fid, y.kid, y.precision, y.recall, y.confidence)
        );
    }
}

#[test]
fn an_unknown_sampler_or_a_model_of_the_wrong_size_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = options(dir.path(), "out", 6);
    o.samplers = vec!["ddim".into(), "nope".into()];
    let e = format!("{:#}", eval(&o, &Device::Cpu).unwrap_err());
    assert!(e.contains("nope"), "{e}");
    assert!(
        !o.out.exists(),
        "nothing is written before the inputs are checked"
    );
    let mut o = options(dir.path(), "out", 6);
    o.model = PathBuf::from("tests/fixtures/unet2d/ddpm_legacy");
    if o.model.is_dir() {
        let e = format!("{:#}", eval(&o, &Device::Cpu).unwrap_err());
        assert!(e.contains("classifier takes (1, 28, 28)"), "{e}");
    }
}

#[test]
fn the_embedded_model_equals_its_checkpoint_folder() {
    let dev = Device::Cpu;
    let a = DiffusersModel::embedded_mnist(DType::F32, &dev).unwrap();
    let b = DiffusersModel::load(Path::new("assets/mnist-cond-unet"), DType::F32, &dev).unwrap();
    assert_eq!(a.unet.num_classes(), Some(11));
    let x = candle_core::Tensor::randn(0f32, 1.0, (2, 1, 28, 28), &dev).unwrap();
    let labels = Some(&[3u32, 10][..]);
    let ya = a.unet.forward_labels(&x, &[10.0, 700.0], labels).unwrap();
    let yb = b.unet.forward_labels(&x, &[10.0, 700.0], labels).unwrap();
    let d = max_abs_diff(&ya, &yb).unwrap();
    assert_eq!(d, 0.0);
    assert!(a.parameters > 1_000_000);
}

#[test]
fn a_sample_network_output_does_not_depend_on_the_batch_it_is_in() {
    // Bit for bit on the CPU: the 3×3 convolutions run in fixed-size image tiles and the
    // time-embedding products one timestep at a time, whatever the batch.
    let dev = Device::Cpu;
    let m = DiffusersModel::embedded_mnist(DType::F32, &dev).unwrap();
    let x = candle_core::Tensor::randn(0f32, 1.0, (9, 1, 28, 28), &dev).unwrap();
    let ts = [999.0, 500.0, 500.0, 3.0, 250.5, 999.0, 10.0, 10.0, 700.0];
    let labels = [0u32, 10, 7, 7, 3, 9, 10, 1, 2];
    let full = m.unet.forward_labels(&x, &ts, Some(&labels)).unwrap();
    for (start, len) in [(0, 1), (0, 2), (3, 4), (8, 1), (1, 8)] {
        let rows = start..start + len;
        let part = m
            .unet
            .forward_labels(
                &x.narrow(0, start, len).unwrap(),
                &ts[rows.clone()],
                Some(&labels[rows]),
            )
            .unwrap();
        let same = full.narrow(0, start, len).unwrap();
        let d = max_abs_diff(&part, &same).unwrap();
        assert_eq!(d, 0.0, "rows {start}..{}", start + len);
    }
}

#[test]
fn eval_with_guidance_reports_conditional_accuracy_and_refuses_a_mismatched_model() {
    let dir = tempfile::tempdir().unwrap();
    let cond = dir.path().join("cond");
    std::fs::create_dir_all(&cond).unwrap();
    conditional_mnist(&cond);
    let mut o = options(dir.path(), "out", 3);
    o.model = cond.clone();
    o.guidance = Some(2.0);
    let r = eval(&o, &Device::Cpu).unwrap();
    for row in &r.rows[1..] {
        let a = row.conditional_accuracy.expect("a conditional row");
        assert!((0.0..=1.0).contains(&a), "{row:?}");
    }
    assert!(
        r.rows[0].conditional_accuracy.is_none(),
        "the data row asks for no class"
    );
    let csv = std::fs::read_to_string(o.out.join("results.csv")).unwrap();
    assert!(
        csv.lines()
            .next()
            .unwrap()
            .ends_with(",conditional_accuracy,confident")
    );
    let md = std::fs::read_to_string(o.out.join("report.md")).unwrap();
    assert!(
        md.contains("conditional accuracy |") && md.contains("guidance w = 2"),
        "{md}"
    );
    // The results do not depend on the batch size with guidance either.
    let mut o2 = options(dir.path(), "out2", 6);
    o2.model = cond.clone();
    o2.guidance = Some(2.0);
    let r2 = eval(&o2, &Device::Cpu).unwrap();
    for (a, b) in r.rows.iter().zip(&r2.rows) {
        assert_eq!(
            (a.fid, a.conditional_accuracy),
            (b.fid, b.conditional_accuracy),
            "{}",
            a.sampler
        );
    }
    let mut bad = options(dir.path(), "bad", 6);
    bad.model = cond;
    let e = format!("{:#}", eval(&bad, &Device::Cpu).err().unwrap());
    assert!(
        e.contains("class-conditional") && e.contains("guidance=W"),
        "{e}"
    );
    let mut bad = options(dir.path(), "bad2", 6);
    bad.guidance = Some(2.0);
    let e = format!("{:#}", eval(&bad, &Device::Cpu).err().unwrap());
    assert!(e.contains("is not class-conditional"), "{e}");
}
