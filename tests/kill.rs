//! Kill safety (issue 14): SIGKILL at random points of `sample --out`, of `train`'s
//! checkpoint writes and of `eval`'s report writes. Every file under a final name is, after
//! each kill, either the previous run's whole file or the new run's whole file; `train
//! --resume` after kills reaches bit for bit the weights of an uninterrupted run; two
//! processes writing one path leave one of their two whole files, never a mixture.
//!
//! The kill times are drawn from a fixed-seed generator over [0, 1.2 × the run's measured
//! time], so most kills land inside the run, whatever the machine's speed.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TINY_CONFIG, mnist_unet_folder, p, strokes, tiny_data};

/// A small deterministic generator for the kill times (xorshift64*).
struct Delays(u64);

impl Delays {
    fn next(&mut self, max: Duration) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let u = (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64;
        max.mul_f64(u)
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_qtaylor"))
        .args(args)
        .env("QTAYLOR_PROGRESS", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts")
}

/// Runs to the end; panics with its stderr if it fails. Returns the wall time.
fn run_ok(args: &[&str]) -> Duration {
    let t0 = Instant::now();
    let o = spawn(args).wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t0.elapsed()
}

/// Starts the command, SIGKILLs it after `delay` (if it is still running) and reaps it.
/// True when the kill landed before the run ended.
fn run_killed(args: &[&str], delay: Duration) -> bool {
    let mut c = spawn(args);
    std::thread::sleep(delay);
    let killed = matches!(c.try_wait(), Ok(None));
    let _ = c.kill(); // SIGKILL on unix
    let _ = c.wait();
    killed
}

/// The files of a folder (recursively) with their bytes, skipping the writers' temporary
/// `.qtaylor-*` files (left behind by a kill, never under a final name).
fn files(dir: &Path) -> HashMap<PathBuf, Vec<u8>> {
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            out.extend(files(&path));
        } else if !name.starts_with(".qtaylor-") {
            out.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    out
}

/// Temporary files left by kills (counted, not an error: no final name is partial).
fn temporaries(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with(".qtaylor-"))
            })
            .count()
        })
        .unwrap_or(0)
}

fn sample_args<'a>(model: &'a str, out: &'a str, seed: &'a str) -> Vec<&'a str> {
    vec![
        "sample",
        "--model",
        model,
        "--sampler",
        "ddim",
        "--steps",
        "4",
        "--batch",
        "16",
        "--seed",
        seed,
        "--out",
        out,
    ]
}

#[test]
fn a_sample_killed_at_random_points_leaves_the_previous_file_or_the_whole_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = mnist_unet_folder(dir.path());
    let (new, old, out) = (
        dir.path().join("new.png"),
        dir.path().join("old.png"),
        dir.path().join("out.png"),
    );
    let full = run_ok(&sample_args(p(&model), p(&new), "1"));
    run_ok(&sample_args(p(&model), p(&old), "2"));
    let (new, old) = (std::fs::read(&new).unwrap(), std::fs::read(&old).unwrap());
    assert_ne!(new, old);
    let mut delays = Delays(0x5eed);
    let (mut inside, mut replaced) = (0, 0);
    for _ in 0..12 {
        std::fs::write(&out, &old).unwrap();
        inside += run_killed(
            &sample_args(p(&model), p(&out), "1"),
            delays.next(full.mul_f64(1.2)),
        ) as usize;
        let got = std::fs::read(&out).expect("the previous file is still there");
        assert!(
            got == old || got == new,
            "a partial file under the final name"
        );
        replaced += (got == new) as usize;
    }
    eprintln!(
        "sample: 12 kills, {inside} inside the run, {replaced} after the rename, {} temporaries left",
        temporaries(dir.path())
    );
    assert!(
        inside >= 6,
        "only {inside} of 12 kills landed inside the run"
    );
}

#[test]
fn two_processes_writing_one_path_leave_one_whole_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = mnist_unet_folder(dir.path());
    let (a, b, out) = (
        dir.path().join("a.npy"),
        dir.path().join("b.npy"),
        dir.path().join("out.npy"),
    );
    let args = |out: &Path, seed: &'static str| -> Vec<String> {
        let mut v: Vec<String> = sample_args(p(&model), p(out), seed)
            .into_iter()
            .map(String::from)
            .collect();
        v.push("--save-npy".into());
        v.push(p(&out.with_extension("x.npy")).into());
        v
    };
    run_ok(&strs(&args(&a.with_extension("png"), "1")));
    run_ok(&strs(&args(&b.with_extension("png"), "2")));
    let want_png = [
        std::fs::read(a.with_extension("png")).unwrap(),
        std::fs::read(b.with_extension("png")).unwrap(),
    ];
    for round in 0..6 {
        let (x, y) = (
            args(&out.with_extension("png"), "1"),
            args(&out.with_extension("png"), "2"),
        );
        let (c1, c2) = (spawn(&strs(&x)), spawn(&strs(&y)));
        for c in [c1, c2] {
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        let got = std::fs::read(out.with_extension("png")).unwrap();
        assert!(
            want_png.contains(&got),
            "round {round}: the PNG is a mixture of the two writers"
        );
    }
    assert_eq!(
        temporaries(dir.path()),
        0,
        "a finished writer left a temporary"
    );
}

fn train_args<'a>(data: &'a str, cfg: &'a str, out: &'a str, resume: bool) -> Vec<&'a str> {
    let mut v = vec![
        "train",
        "--data",
        data,
        "--config",
        cfg,
        "--out",
        out,
        "--steps",
        "24",
        "--batch",
        "8",
        "--save-every",
        "1",
        "--warmup",
        "4",
        "--seed",
        "3",
    ];
    if resume {
        v.extend(["--resume", out]);
    }
    v
}

/// Every file a training folder holds parses as what it claims to be.
fn training_folder_is_whole(dir: &Path) {
    for (path, bytes) in files(dir) {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".safetensors") {
            safetensors::SafeTensors::deserialize(&bytes)
                .unwrap_or_else(|e| panic!("{name} is not whole after a kill: {e}"));
        } else if name.ends_with(".json") {
            serde_json::from_slice::<serde_json::Value>(&bytes)
                .unwrap_or_else(|e| panic!("{name} is not whole after a kill: {e}"));
        } else if name.ends_with(".csv") {
            let text = String::from_utf8(bytes).unwrap();
            assert!(
                text.starts_with("step,loss,lr\n") && text.ends_with('\n'),
                "{name}: {text}"
            );
        }
    }
}

#[test]
fn train_killed_at_random_points_resumes_to_the_same_weights_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_data(dir.path());
    let cfg = dir.path().join("tiny.json");
    std::fs::write(&cfg, TINY_CONFIG).unwrap();
    let straight = dir.path().join("straight");
    let full = run_ok(&train_args(p(&data), p(&cfg), p(&straight), false));
    let run = dir.path().join("run");
    let state = run.join("train_state.safetensors");
    // The step a folder's training state is at (None: no state yet).
    let step = || -> Option<usize> {
        let bytes = std::fs::read(&state).ok()?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
        let m: serde_json::Value =
            serde_json::from_str(meta.metadata().as_ref()?.get("qtaylor.train")?).ok()?;
        Some(m["step"].as_u64()? as usize)
    };
    let mut delays = Delays(0xdead_beef);
    let (mut kills, mut attempts) = (0, 0);
    while kills < 10 {
        attempts += 1;
        assert!(attempts < 100, "only {kills} kills landed inside the run");
        if step() == Some(24) {
            // The last start finished before its kill: start the chain again.
            std::fs::remove_dir_all(&run).unwrap();
        }
        let args = train_args(p(&data), p(&cfg), p(&run), step().is_some());
        let killed = run_killed(&args, delays.next(full.mul_f64(1.2)));
        kills += killed as usize;
        training_folder_is_whole(&run);
        if killed && step().is_none() {
            // Killed before the first checkpoint's state: start again from nothing.
            let _ = std::fs::remove_dir_all(&run);
        }
    }
    if step() != Some(24) {
        run_ok(&train_args(p(&data), p(&cfg), p(&run), step().is_some()));
    }
    eprintln!("train: {kills} kills inside the run over {attempts} starts");
    assert!(kills >= 5, "only {kills} kills landed inside the run");
    let (a, b) = (files(&straight), files(&run));
    for name in [
        "diffusion_pytorch_model.safetensors",
        "train_state.safetensors",
        "train_log.csv",
        "config.json",
    ] {
        assert!(
            a[&straight.join(name)] == b[&run.join(name)],
            "{name} differs from the uninterrupted run"
        );
    }
}

#[test]
fn an_eval_killed_at_random_points_leaves_each_report_whole() {
    let dir = tempfile::tempdir().unwrap();
    let model = mnist_unet_folder(dir.path());
    let data = strokes(dir.path());
    let args = |out: &Path, seed: &'static str| -> Vec<String> {
        [
            "eval",
            "--model",
            p(&model),
            "--data",
            p(&data),
            "--out",
            p(out),
            "--samplers",
            "ddim,qt-2",
            "--nfe",
            "2,3",
            "--n",
            "6",
            "--batch",
            "6",
            "--reference-steps",
            "4",
            "--grid-nfe",
            "2",
            "--seed",
            seed,
        ]
        .map(String::from)
        .to_vec()
    };
    let (old_dir, new_dir) = (dir.path().join("old"), dir.path().join("new"));
    run_ok(&strs(&args(&old_dir, "2")));
    let full = run_ok(&strs(&args(&new_dir, "1")));
    let (old, new) = (files(&old_dir), files(&new_dir));
    let out = dir.path().join("out");
    let footer = String::from_utf8(new[&new_dir.join("report.md")].clone()).unwrap();
    let footer = footer.lines().last().unwrap().to_string();
    let mut delays = Delays(0xe7a1);
    let mut inside = 0;
    for _ in 0..8 {
        let _ = std::fs::remove_dir_all(&out);
        std::fs::create_dir_all(&out).unwrap();
        for (path, bytes) in &old {
            std::fs::write(out.join(path.strip_prefix(&old_dir).unwrap()), bytes).unwrap();
        }
        inside += run_killed(&strs(&args(&out, "1")), delays.next(full.mul_f64(1.2))) as usize;
        // eval rewrites its reports after every row, so a file may hold an earlier row count
        // than the finished run's: each must be a whole file of its kind.
        for (path, bytes) in files(&out) {
            let rel = path.strip_prefix(&out).unwrap().display().to_string();
            if Some(&bytes) == old.get(&old_dir.join(&rel))
                || Some(&bytes) == new.get(&new_dir.join(&rel))
            {
                continue;
            }
            if rel.ends_with(".png") {
                image::load_from_memory(&bytes).unwrap_or_else(|e| panic!("{rel} is partial: {e}"));
            } else if rel.ends_with(".json") {
                serde_json::from_slice::<serde_json::Value>(&bytes)
                    .unwrap_or_else(|e| panic!("{rel} is partial: {e}"));
            } else if rel.ends_with(".csv") {
                let text = String::from_utf8(bytes).unwrap();
                let fields = text.lines().next().unwrap().split(',').count();
                assert!(text.ends_with('\n'), "{rel} is partial");
                for l in text.lines() {
                    assert_eq!(l.split(',').count(), fields, "{rel} is partial: {l}");
                }
            } else if rel.ends_with(".md") {
                let text = String::from_utf8(bytes).unwrap();
                assert!(text.ends_with(&format!("{footer}\n")), "{rel} is partial");
            } else {
                panic!("{rel}: an unexpected file after a kill");
            }
        }
    }
    eprintln!("eval: 8 kills, {inside} inside the run");
    assert!(
        inside >= 4,
        "only {inside} of 8 kills landed inside the run"
    );
}
