//! The outputs of the README's commands, pinned byte for byte against `tests/fixtures/golden/`:
//! the main command (the embedded model's guided digit grid, PNG), `sample` on a problem
//! (.npy), `bench` (results.json, results.csv, report.md, the plot) and `tune` (the grid
//! file), with what they print. Only timings are masked: the `seconds` of JSON and CSV rows,
//! any number followed by `s` in printed text, and the throttled progress lines (`[tune T s]
//! …`), whose number depends on the machine's speed.
//!
//! The fixtures were written by the build before the redesign of issue 30 (main f6d541e),
//! so this test is what shows that a refactoring changed no output. To pin an intended
//! change, regenerate them with `QTAYLOR_WRITE_GOLDEN=1 cargo test --release --test golden`
//! and say why in the commit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden")
}

fn writing() -> bool {
    std::env::var_os("QTAYLOR_WRITE_GOLDEN").is_some()
}

/// Runs qtaylor with `args` (progress lines off), returning (stdout, stderr) with the
/// temporary folder `tmp` written as `OUT` and every timing masked.
fn run(args: &[&str], tmp: &Path) -> (String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_qtaylor"))
        .args(args)
        .env("QTAYLOR_PROGRESS", "off")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let text = |b: &[u8]| mask(&String::from_utf8_lossy(b).replace(&*tmp.to_string_lossy(), "OUT"));
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert!(o.status.success(), "qtaylor {args:?} failed:\n{err}");
    (out, err)
}

/// Every number followed by a word `s` (seconds: `27.35 s`, `[tune 0.0 s]`, `0.6 s;`) as `T`.
fn mask(text: &str) -> String {
    text.lines()
        .map(|line| {
            let words: Vec<&str> = line.split(' ').collect();
            let seconds = |w: &str| matches!(w, "s" | "s," | "s;" | "s]" | "s)");
            (0..words.len())
                .map(|i| {
                    let next_is_s = words.get(i + 1).is_some_and(|w| seconds(w));
                    if next_is_s && words[i].parse::<f64>().is_ok() {
                        "T"
                    } else {
                        words[i]
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `value` without its `seconds` entries, at any depth.
fn without_seconds(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(m) => {
            m.remove("seconds");
            m.values_mut().for_each(without_seconds);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(without_seconds),
        _ => {}
    }
}

/// A CSV without its `seconds` column.
fn csv_without_seconds(csv: &str) -> String {
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "seconds");
    csv.lines()
        .map(|l| {
            let mut cells: Vec<&str> = l.split(',').collect();
            if let Some(c) = col {
                cells.remove(c);
            }
            cells.join(",")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `text` without the throttled progress lines of a long run (`[tune T s] …`): how many of
/// them a run prints depends on how fast the machine is.
fn without_progress(text: &str) -> String {
    text.lines()
        .filter(|l| !(l.starts_with('[') && l.split(' ').nth(1) == Some("T") && l.contains(" s] ")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Compares `got` with the fixture `name` (or writes it, with QTAYLOR_WRITE_GOLDEN set);
/// printed text (`.txt`) without its progress lines.
fn check(name: &str, got: &[u8]) {
    let path = fixtures().join(name);
    if writing() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let mut want = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut got = got.to_vec();
    if name.ends_with(".txt") {
        want = without_progress(&String::from_utf8_lossy(&want)).into_bytes();
        got = without_progress(&String::from_utf8_lossy(&got)).into_bytes();
    }
    let got = got.as_slice();
    if want != got {
        let shown = |b: &[u8]| {
            String::from_utf8(b.to_vec()).unwrap_or_else(|_| format!("{} bytes", b.len()))
        };
        panic!(
            "{name} differs from its golden file {}:\n--- golden\n{}\n--- now\n{}",
            path.display(),
            shown(&want),
            shown(got)
        );
    }
}

fn check_json(name: &str, file: &Path) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    without_seconds(&mut v);
    check(name, serde_json::to_string_pretty(&v).unwrap().as_bytes());
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn the_main_command_draws_the_same_digit_grid() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("digits.png");
    let args = [
        "sample",
        "--sampler",
        "qt-3",
        "--steps",
        "10",
        "--classes",
        "all",
        "--guidance",
        "2",
        "--out",
        p(&png),
    ];
    let (out, err) = run(&args, tmp.path());
    check("main/digits.png", &std::fs::read(&png).unwrap());
    check("main/stdout.txt", out.as_bytes());
    check("main/stderr.txt", err.as_bytes());
}

#[test]
fn sample_on_a_problem_writes_the_same_array() {
    let tmp = tempfile::tempdir().unwrap();
    let npy = tmp.path().join("samples.npy");
    let args = [
        "sample",
        "--problem",
        "gmm-demo",
        "--sampler",
        "qt-3",
        "--steps",
        "10",
        "--grid",
        "logsnr",
        "--batch",
        "16",
        "--out",
        p(&npy),
    ];
    let (out, err) = run(&args, tmp.path());
    check("sample/samples.npy", &std::fs::read(&npy).unwrap());
    check("sample/stdout.txt", out.as_bytes());
    check("sample/stderr.txt", err.as_bytes());
}

#[test]
fn bench_writes_the_same_results() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bench-out");
    let (out, err) = run(
        &["bench", "--problem", "gmm-demo", "--out", p(&dir)],
        tmp.path(),
    );
    check_json("bench/results.json", &dir.join("results.json"));
    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    check("bench/results.csv", csv_without_seconds(&csv).as_bytes());
    check(
        "bench/report.md",
        &std::fs::read(dir.join("report.md")).unwrap(),
    );
    check(
        "bench/error_vs_nfe.png",
        &std::fs::read(dir.join("error_vs_nfe.png")).unwrap(),
    );
    check("bench/stdout.txt", out.as_bytes());
    check("bench/stderr.txt", err.as_bytes());
}

#[test]
fn tune_writes_the_same_grid_file() {
    let tmp = tempfile::tempdir().unwrap();
    let grid = tmp.path().join("grid.json");
    let args = [
        "tune",
        "--problem",
        "gmm-demo",
        "--schedule",
        "discrete",
        "--spacing",
        "trailing",
        "--sampler",
        "unipc-3",
        "--nfe",
        "10",
        "--dtype",
        "f64",
        "--out",
        p(&grid),
    ];
    let (out, err) = run(&args, tmp.path());
    check_json("tune/grid.json", &grid);
    check("tune/stdout.txt", out.as_bytes());
    check("tune/stderr.txt", err.as_bytes());
}

#[test]
fn the_timing_mask_keeps_everything_but_seconds() {
    assert_eq!(
        mask("[tune 0.0 s] teacher 42 candidates; took 11.0 s; 0.6 s, 3 steps"),
        "[tune T s] teacher 42 candidates; took T s; T s, 3 steps"
    );
    assert_eq!(
        csv_without_seconds("a,seconds,b\n1,0.5,2"),
        "a,b\n1,2".to_string()
    );
    assert_eq!(
        without_progress("[tune T s] refinement: 441\nunipc-3 at 10 NFE\n[x] y"),
        "unipc-3 at 10 NFE\n[x] y"
    );
}
