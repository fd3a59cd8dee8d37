//! Image-to-image (SDEdit, issue 15): `sample --init-image FILE --strength S` noises the
//! image to the time S selects by diffusers' img2img rule and samples from there.

mod common;

use common::{p, qtaylor, stderr};
use qtaylor::grid::img2img_start;

fn digit_png(path: &std::path::Path, size: u32) {
    // A ring, like a zero.
    let img = image::GrayImage::from_fn(size, size, |x, y| {
        let (dx, dy) = (x as f64 - 13.5, y as f64 - 13.5);
        let on = ((dx * dx + dy * dy).sqrt() - 8.0).abs() < 2.0;
        image::Luma([if on { 255 } else { 0 }])
    });
    img.save(path).unwrap();
}

#[test]
fn strength_runs_the_last_floor_of_steps_times_strength_steps() {
    assert_eq!(img2img_start(10, 0.8).unwrap(), 2);
    assert_eq!(img2img_start(10, 0.35).unwrap(), 7);
    assert_eq!(img2img_start(10, 1.0).unwrap(), 0);
    assert_eq!(img2img_start(50, 0.75).unwrap(), 13);
    for bad in [0.0, -0.5, 1.5, f64::NAN] {
        assert!(
            img2img_start(10, bad)
                .unwrap_err()
                .to_string()
                .contains("(0, 1]")
        );
    }
    assert!(
        img2img_start(4, 0.2)
            .unwrap_err()
            .to_string()
            .contains("runs no step")
    );
}

fn sample(dir: &std::path::Path, name: &str, extra: &[&str]) -> (std::process::Output, Vec<u8>) {
    let npy = dir.join(format!("{name}.npy"));
    let mut args = vec![
        "sample",
        "--sampler",
        "ddim",
        "--steps",
        "10",
        "--batch",
        "4",
        "--seed",
        "5",
        "--out",
    ];
    let png = dir.join(format!("{name}.png"));
    args.push(p(&png));
    args.extend(["--save-npy", p(&npy)]);
    args.extend_from_slice(extra);
    let o = qtaylor(&args);
    let bytes = std::fs::read(&npy).unwrap_or_default();
    (o, bytes)
}

#[test]
fn strength_one_equals_sampling_from_pure_noise_at_the_same_seed() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("zero.png");
    digit_png(&img, 28);
    let (o, plain) = sample(dir.path(), "plain", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (o, full) = sample(
        dir.path(),
        "full",
        &["--init-image", p(&img), "--strength", "1"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !plain.is_empty() && plain == full,
        "strength 1 differs from the pure-noise run"
    );
}

#[test]
fn a_low_strength_keeps_the_input_image_and_runs_fewer_steps() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("zero.png");
    digit_png(&img, 28);
    let input = qtaylor::io::read_image(&img, 1, 28, 28).unwrap();
    let rms = |bytes: &[u8], name: &str| {
        let path = dir.path().join(format!("{name}.check.npy"));
        std::fs::write(&path, bytes).unwrap();
        let x = qtaylor::io::read_npy(&path, &[Some(4), Some(1), Some(28), Some(28)]).unwrap();
        let d = x
            .broadcast_sub(&input)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        d.to_scalar::<f32>().unwrap().sqrt()
    };
    let (o, low) = sample(
        dir.path(),
        "low",
        &["--init-image", p(&img), "--strength", "0.3"],
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(e.contains("3 steps"), "{e}");
    let (_, high) = sample(
        dir.path(),
        "high",
        &["--init-image", p(&img), "--strength", "1"],
    );
    let (near, far) = (rms(&low, "low"), rms(&high, "high"));
    eprintln!("rms distance to the input: strength 0.3 {near:.3}, strength 1 {far:.3}");
    assert!(near < 0.5 * far, "strength 0.3: {near}, strength 1: {far}");
}

#[test]
fn bad_init_images_and_strengths_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.png");
    digit_png(&small, 20);
    let out = dir.path().join("x.png");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--init-image", p(&small)],
            "small.png: 20x20 pixels, the model takes 28x28",
        ),
        (
            &["--strength", "0.5"],
            "--strength does nothing without --init-image",
        ),
        (
            &["--init-image", p(&small), "--strength", "2"],
            "--strength 2: expected a value in (0, 1]",
        ),
        (
            &["--init-image", "missing.txt"],
            "expected a .png or .npy image",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec![
            "sample",
            "--sampler",
            "ddim",
            "--steps",
            "4",
            "--out",
            p(&out),
        ];
        args.extend_from_slice(extra);
        let o = qtaylor(&args);
        let e = stderr(&o);
        assert!(!o.status.success() && e.contains(want), "{extra:?}: {e}");
        assert!(!out.exists());
    }
}
