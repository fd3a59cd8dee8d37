//! Sharded runs end to end, each shard a separate process: `sample --shard I/N` + `merge` is
//! byte-identical to the unsharded run; `eval --shard I/N` + `merge` writes the unsharded
//! eval's results (every column but the seconds, the grids and the plot), and `bench --shard
//! I/N` + `merge` the unsharded bench's (report.md and the plot byte for byte, the CSV and
//! JSON but for the seconds); merge refuses a
//! missing, a duplicated or a foreign shard by name and writes nothing; a re-run shard whose
//! part is complete is not redone, a killed one leaves no part, and another run's part in its
//! folder is refused; flags that cannot shard are refused; and README.md's "Running at scale"
//! commands run as written.

mod common;
use common::{
    SmallEval, assert_same_eval_results, gmm_bench, gmm_sample, p, qtaylor, run_ok, stderr,
    strokes, strs, stub_sbatch, stub_sbatch_logs,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// Runs `qtaylor args` and checks that it fails, without a panic, with every one of `want`
/// in its error.
fn assert_refused(args: &[String], want: &[&str]) {
    let o = qtaylor(&strs(args));
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded");
    for w in want {
        assert!(err.contains(w), "{w}: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

/// `base` with `more` appended.
fn with(base: &[String], more: &[&str]) -> Vec<String> {
    let mut a = base.to_vec();
    a.extend(more.iter().map(|s| s.to_string()));
    a
}

fn shards_then_merge(base: &[String], dir: &Path, full: &str, merged: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let parts = dir.join("parts");
    run_ok(&with(base, &["--out", p(&dir.join(full))]));
    for i in 0..4 {
        let s = format!("{i}/4");
        run_ok(&with(base, &["--shard", &s, "--out", p(&parts)]));
    }
    run_ok(&["merge", p(&parts), "--out", p(&dir.join(merged))]);
    assert_eq!(
        std::fs::read(dir.join(full)).unwrap(),
        std::fs::read(dir.join(merged)).unwrap(),
        "{base:?}"
    );
}

#[test]
fn four_shards_merged_are_byte_identical_to_the_unsharded_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A stochastic sampler: its noise, too, is drawn per sample index.
    let problem = with(&gmm_sample("qit-2", 6, 10), &["--seed", "4"]);
    shards_then_merge(&problem, &d.join("a"), "full.npy", "merged.npy");
    // The embedded model, classes in blocks across shard boundaries, guidance 2.
    let model = [
        "sample",
        "--sampler",
        "dpmpp-2m",
        "--steps",
        "3",
        "--classes",
        "0,1,2",
        "--guidance",
        "2",
        "--batch",
        "9",
    ]
    .map(String::from);
    shards_then_merge(&model, &d.join("b"), "full.png", "merged.png");
}

/// Runs `merge DIRS --out OUT` and checks that it fails with every one of `want` in its
/// error, without a panic, and writes nothing at `out`.
fn merge_fails(dirs: &[&Path], out: &Path, want: &[&str]) {
    let mut args = vec!["merge".to_string()];
    args.extend(dirs.iter().map(|x| p(x).to_string()));
    args.extend(["--out".to_string(), p(out).to_string()]);
    assert_refused(&args, want);
    assert!(!out.exists(), "{args:?} wrote {}", out.display());
}

/// Runs the 3 shards of `base` into `d/one` and shard 1/3 of the same run with another seed
/// into `d/other`; returns the two folders.
fn three_shards_and_a_foreign_one(base: &[String], d: &Path) -> (PathBuf, PathBuf) {
    let (one, other) = (d.join("one"), d.join("other"));
    for i in 0..3 {
        let s = format!("{i}/3");
        run_ok(&with(base, &["--shard", &s, "--out", p(&one)]));
    }
    run_ok(&with(
        base,
        &["--seed", "9", "--shard", "1/3", "--out", p(&other)],
    ));
    (one, other)
}

/// `merge` of the parts folder `one` (shards 0..3 of 3) given twice, and with `other` (shard
/// 1/3 of another configuration), fails naming the part, and writes nothing at `out`.
fn merge_refuses_a_duplicated_and_a_foreign_shard(one: &Path, other: &Path, out: &Path) {
    merge_fails(&[one, one], out, &["shard 0/3 twice", "part-0-of-3.json"]);
    merge_fails(
        &[one, other],
        out,
        &["is of another run", "other/part-1-of-3.json"],
    );
}

#[test]
fn merge_refuses_a_missing_a_duplicated_or_a_foreign_shard_by_name_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = gmm_sample("ddim", 3, 6);
    let (one, other) = three_shards_and_a_foreign_one(&base, d);
    let out = d.join("m.npy");
    merge_refuses_a_duplicated_and_a_foreign_shard(&one, &other, &out);
    std::fs::remove_file(one.join("part-2-of-3.json")).unwrap();
    merge_fails(&[&one], &out, &["shard 2/3", "missing"]);
    // A shard with nothing in it, and a shard that does not exist.
    let o = qtaylor(&strs(&with(
        &gmm_sample("ddim", 3, 2),
        &["--shard", "0/3", "--out", p(&d.join("z"))],
    )));
    assert!(!o.status.success() && stderr(&o).contains("no samples in it"));
    let o = qtaylor(&strs(&with(
        &gmm_sample("ddim", 3, 6),
        &["--shard", "5/3", "--out", p(&d.join("z"))],
    )));
    assert!(!o.status.success() && stderr(&o).contains("--shard 5/3"));
    assert!(!d.join("z").exists());
}

/// Runs the `shards` commands `args(i)` as separate processes all at once (like the tasks of
/// a job array) and checks that each succeeds.
fn run_shards_at_once(shards: usize, args: impl Fn(usize) -> Vec<String>) {
    let children: Vec<_> = (0..shards)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_qtaylor"))
                .args(args(i))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "shard {i}/{shards}: {}", stderr(&o));
    }
}

/// Runs `e` unsharded into `dir/full`, as `shards` shards (separate processes, all at once,
/// like the tasks of a job array) into `dir/parts`, merges them into `dir/merged` and checks
/// that both results folders say the same but for the seconds. Returns the two folders.
fn eval_shards_then_merge(e: &SmallEval, dir: &Path, shards: usize) -> (PathBuf, PathBuf) {
    let (full, parts, merged) = (dir.join("full"), dir.join("parts"), dir.join("merged"));
    run_ok(&with(&e.args(), &["--out", p(&full)]));
    run_shards_at_once(shards, |i| e.shard_args(i, shards, &parts));
    let o = run_ok(&["merge", p(&parts), "--out", p(&merged)]);
    assert!(stderr(&o).contains(&format!("merged {shards} eval shards")));
    assert_same_eval_results(&full, &merged);
    (full, merged)
}

/// The rows of a results folder's results.json.
fn rows(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("results.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["rows"].as_array().unwrap().clone()
}

#[test]
fn four_eval_shards_merged_give_the_unsharded_results_but_for_the_seconds() {
    // ddim and the stochastic qit-2 at NFE 2 with their grids, and a stochastic DDPM
    // reference row; n = 7 in batches of 3, so the shards (1, 2, 2, 2 samples) cut batches
    // and the grid's 3 samples.
    let dir = tempfile::tempdir().unwrap();
    let e = SmallEval::new(dir.path());
    let (_, merged) = eval_shards_then_merge(&e, dir.path(), 4);
    let names: Vec<String> = rows(&merged)
        .iter()
        .map(|r| r["sampler"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["data:train", "ddim", "qit-2", "ddpm"]);
    for png in [
        "grid-ddim-nfe2.png",
        "grid-qit-2-nfe2.png",
        "grid-ddpm-3steps.png",
    ] {
        assert!(merged.join(png).is_file(), "{png}");
    }
}

#[test]
fn eval_shards_of_a_class_conditional_model_with_guidance_merge_to_the_unsharded_results() {
    // Sample i asks for class i mod 10 by its index in the whole run.
    let dir = tempfile::tempdir().unwrap();
    let mut e = SmallEval::new(dir.path());
    e.model = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/mnist-cond-unet");
    e.guidance = Some("2".into());
    e.samplers = "ddim".into();
    e.reference_steps = 0;
    let (_, merged) = eval_shards_then_merge(&e, dir.path(), 4);
    assert!(rows(&merged)[1]["conditional_accuracy"].is_number());
}

#[test]
fn eval_shards_of_an_adaptive_sampler_merge_to_the_unsharded_results() {
    // Per-sample step control: a sample's steps do not depend on its batch, and the mean
    // NFE is the integer count of network evaluations over n, whatever the shards.
    let dir = tempfile::tempdir().unwrap();
    let mut e = SmallEval::new(dir.path());
    e.samplers = "dpm-solver-12".into();
    e.extra = ["--tolerances", "5"].map(String::from).to_vec();
    e.n = 4;
    e.reference_steps = 0;
    let (_, merged) = eval_shards_then_merge(&e, dir.path(), 2);
    assert_eq!(rows(&merged)[1]["sampler"], "dpm-solver-12");
}

/// A cheap eval for the refusal and resume tests: ddim at NFE 2 only, n = 4.
fn cheap_eval(dir: &Path) -> SmallEval {
    let mut e = SmallEval::new(dir);
    e.samplers = "ddim".into();
    e.n = 4;
    e.batch = 4;
    e.reference_steps = 0;
    e
}

#[test]
fn merge_refuses_a_missing_a_duplicated_a_foreign_or_a_damaged_eval_shard_by_name_and_writes_nothing()
 {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = cheap_eval(d);
    let (one, other, samples) = (d.join("one"), d.join("other"), d.join("samples"));
    for i in 0..3 {
        run_ok(&e.shard_args(i, 3, &one));
    }
    run_ok(&with(
        &e.args(),
        &["--seed", "9", "--shard", "1/3", "--out", p(&other)],
    ));
    run_ok(&with(
        &gmm_sample("ddim", 3, 6),
        &["--shard", "1/3", "--out", p(&samples)],
    ));
    let out = d.join("results");
    merge_refuses_a_duplicated_and_a_foreign_shard(&one, &other, &out);
    merge_fails(
        &[&one, &samples],
        &out,
        &["is of another run", "samples/part-1-of-3.json"],
    );
    // Eval parts merge into a folder, not into a sample's output file.
    merge_fails(&[&one], &d.join("m.npy"), &["results folder"]);
    // Per-sample results that do not match their manifest.
    let data = one.join("part-1-of-3.safetensors");
    let good = std::fs::read(&data).unwrap();
    std::fs::write(&data, &good[..good.len() / 2]).unwrap();
    merge_fails(&[&one], &out, &["part-1-of-3.safetensors"]);
    std::fs::write(&data, good).unwrap();
    std::fs::remove_file(one.join("part-2-of-3.json")).unwrap();
    merge_fails(&[&one], &out, &["shard 2/3", "missing"]);
}

/// The modification time and the bytes of a file.
fn stamp(f: &Path) -> (SystemTime, Vec<u8>) {
    (
        std::fs::metadata(f).unwrap().modified().unwrap(),
        std::fs::read(f).unwrap(),
    )
}

#[test]
fn a_rerun_shard_with_its_complete_part_is_not_redone_and_another_runs_part_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = cheap_eval(d);
    let parts = d.join("parts");
    let o = run_ok(&e.shard_args(1, 3, &parts));
    assert!(stderr(&o).contains("drawn"), "{}", stderr(&o));
    let files = [
        parts.join("part-1-of-3.json"),
        parts.join("part-1-of-3.safetensors"),
    ];
    let before: Vec<_> = files.iter().map(|f| stamp(f)).collect();
    // The same shard again: a note, no sampling, the part untouched.
    let o = run_ok(&e.shard_args(1, 3, &parts));
    let err = stderr(&o);
    assert!(
        err.contains("shard 1/3 is already done") && err.contains("part-1-of-3.json"),
        "{err}"
    );
    assert!(!err.contains("drawn"), "{err}");
    let after: Vec<_> = files.iter().map(|f| stamp(f)).collect();
    assert!(before == after, "the part was rewritten");
    // Another shard of the same run goes into the same folder.
    run_ok(&e.shard_args(0, 3, &parts));
    // Another configuration (seed 9), or another shard count: refused, naming the part,
    // which stays as it was.
    for (shard, extra) in [
        ("1/3", &["--seed", "9"][..]),
        ("2/3", &["--seed", "9"]),
        ("1/4", &[]),
    ] {
        let args = with(
            &with(&e.args(), extra),
            &["--shard", shard, "--out", p(&parts)],
        );
        assert_refused(&args, &["is a part of another run", "part-0-of-3.json"]);
    }
    assert!(before == files.iter().map(|f| stamp(f)).collect::<Vec<_>>());
    // A damaged part of this run is redone.
    std::fs::write(&files[1], b"not a safetensors file").unwrap();
    let o = run_ok(&e.shard_args(1, 3, &parts));
    let err = stderr(&o);
    assert!(err.contains("damaged") && err.contains("drawn"), "{err}");
    assert_eq!(std::fs::read(&files[1]).unwrap(), before[1].1);
    // And sample's shards resume the same way.
    let s = with(&gmm_sample("ddim", 3, 6), &["--shard", "0/2", "--out"]);
    let sp = d.join("sample-parts");
    run_ok(&with(&s, &[p(&sp)]));
    let npy = stamp(&sp.join("part-0-of-2.npy"));
    let o = run_ok(&with(&s, &[p(&sp)]));
    assert!(stderr(&o).contains("already done"), "{}", stderr(&o));
    assert!(npy == stamp(&sp.join("part-0-of-2.npy")));
}

#[test]
fn a_shard_killed_midway_leaves_no_part_and_its_rerun_completes_it() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let e = SmallEval::new(dir.path());
    let parts = dir.path().join("parts");
    let mut child = Command::new(env!("CARGO_BIN_EXE_qtaylor"))
        .args(e.shard_args(1, 2, &parts))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once its first row is drawn, two rows before it would write its part.
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    assert!(
        lines.any(|l| l.unwrap().contains("drawn")),
        "the shard never drew a row"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let left: Vec<_> = std::fs::read_dir(&parts)
        .map(|d| d.map(|f| f.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.iter()
            .all(|f| !f.to_string_lossy().starts_with("part-")),
        "{left:?}"
    );
    let o = run_ok(&e.shard_args(1, 2, &parts));
    assert!(!stderr(&o).contains("already done"), "{}", stderr(&o));
    assert!(parts.join("part-1-of-2.json").is_file());
}

#[test]
fn eval_shard_refuses_flags_that_cannot_shard_and_an_empty_shard_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = cheap_eval(d);
    let out = d.join("parts");
    let file = d.join("file.txt");
    std::fs::write(&file, "x").unwrap();
    for (extra, shard, out, want) in [
        (
            &["--max-seconds", "5"][..],
            "0/2",
            &out,
            "--shard takes no --max-seconds",
        ),
        (
            &["--render-only"],
            "0/2",
            &out,
            "--shard takes no --render-only",
        ),
        (&[], "0/2", &file, "the folder of the parts, not a file"),
        (&[], "0/5", &out, "--shard 0/5: no samples in it"),
        (&[], "2/2", &out, "--shard 2/2"),
    ] {
        let args = with(
            &with(&e.args(), extra),
            &["--shard", shard, "--out", p(out)],
        );
        assert_refused(&args, &[want]);
    }
    assert!(!out.exists());
}

/// The lines of the ```text blocks of README.md's "Running at scale" section.
fn running_at_scale_blocks() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("## Running at scale")
        .expect("README has a 'Running at scale' section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut script = String::new();
    let mut inside = false;
    for line in section.lines() {
        match (inside, line.trim()) {
            (false, "```text") => inside = true,
            (true, "```") => inside = false,
            (true, l) => {
                script += l;
                script.push('\n');
            }
            _ => {}
        }
    }
    script
}

#[test]
fn the_running_at_scale_commands_of_the_readme_run_as_written() {
    // The section's command blocks run as one bash script, verbatim, in a folder with the
    // repository's assets and scripts, `qtaylor` on PATH, data/mnist a small synthetic IDX
    // set (CI has no MNIST) and a stand-in for Slurm's sbatch that runs the jobs at once.
    let script = running_at_scale_blocks();
    for needle in [
        "--shard $i/4",
        "--devices cpu,cpu",
        "qtaylor merge",
        "qtaylor eval",
        "scripts/slurm/submit-eval.sh",
        "qtaylor train",
    ] {
        assert!(script.contains(needle), "README lost '{needle}':\n{script}");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = d.join("bin");
    stub_sbatch(&bin);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_qtaylor"), bin.join("qtaylor")).unwrap();
    let work = d.join("work");
    std::fs::create_dir_all(work.join("data")).unwrap();
    std::fs::rename(strokes(d), work.join("data/mnist")).unwrap();
    for f in ["assets", "scripts"] {
        std::os::unix::fs::symlink(repo.join(f), work.join(f)).unwrap();
    }
    let path = format!("{}:{}", p(&bin), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", &script])
        .current_dir(&work)
        .env("PATH", path);
    for (k, _) in std::env::vars() {
        if k.starts_with("QTAYLOR_") || k.starts_with("SLURM_") {
            cmd.env_remove(k);
        }
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{script}\n{}\n{}",
        stderr(&o),
        stub_sbatch_logs(&bin)
    );
    // What the comments in the blocks claim.
    assert_eq!(
        std::fs::read(work.join("digits.png")).unwrap(),
        std::fs::read(work.join("merged.png")).unwrap(),
        "merged.png is not digits.png"
    );
    assert_eq!(
        std::fs::read(work.join("digits.png")).unwrap(),
        std::fs::read(work.join("devices.png")).unwrap(),
        "devices.png is not digits.png"
    );
    assert!(!work.join("devices.png.parts").exists());
    assert_same_eval_results(&work.join("full"), &work.join("merged"));
    assert_same_eval_results(&work.join("full"), &work.join("qtaylor-results"));
    let log = std::fs::read_to_string(bin.join("sbatch.log")).unwrap();
    assert!(log.contains("--array=0-3"), "{log}");
    let losses = |run: &str| -> Vec<f64> {
        std::fs::read_to_string(work.join(run).join("train_log.csv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
            .collect()
    };
    let (one, two) = (losses("one-device"), losses("two-replicas"));
    assert_eq!(one.len(), 2);
    assert_eq!(one.len(), two.len());
    for (a, b) in one.iter().zip(&two) {
        assert!((a - b).abs() <= 2e-6, "{one:?} vs {two:?}");
    }
}

#[test]
fn a_devices_run_merges_one_shard_per_device_into_the_unsharded_output() {
    // `--devices` with CPU devices standing in for GPUs: one child shard per device, merged
    // into --out, the parts folder removed afterwards.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = with(&gmm_sample("qit-2", 6, 10), &["--seed", "4"]);
    run_ok(&with(&base, &["--out", p(&d.join("full.npy"))]));
    let o = run_ok(&with(
        &base,
        &[
            "--devices",
            "cpu,cpu,cpu",
            "--out",
            p(&d.join("devices.npy")),
        ],
    ));
    assert!(stderr(&o).contains("merged 3 shards"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(d.join("full.npy")).unwrap(),
        std::fs::read(d.join("devices.npy")).unwrap()
    );
    assert!(!d.join("devices.npy.parts").exists());
    // eval: the results of the unsharded run but for the seconds.
    let e = SmallEval::new(d);
    run_ok(&with(&e.args(), &["--out", p(&d.join("eval-full"))]));
    run_ok(&with(
        &e.args(),
        &["--devices", "cpu,cpu", "--out", p(&d.join("eval-devices"))],
    ));
    assert_same_eval_results(&d.join("eval-full"), &d.join("eval-devices"));
    // --device or --shard next to --devices: a clear error, nothing written.
    for extra in [["--device", "cpu"], ["--shard", "0/2"]] {
        let mut a = with(
            &base,
            &["--devices", "cpu,cpu", "--out", p(&d.join("bad.npy"))],
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        assert_refused(&a, &["--devices runs one shard per device"]);
        assert!(!d.join("bad.npy").exists());
    }
}

/// A bench for the shard tests: a deterministic, a stochastic, a two-stage and two adaptive
/// samplers (whose tolerance sweeps stop on the mean NFE) at NFE 3 and 30 on 10 samples.
fn small_bench() -> Vec<String> {
    gmm_bench("ddim,qit-2,heun,rk45,dpm-solver-12", "3,30", 10)
}

/// Asserts that two bench results folders say the same: report.md and error_vs_nfe.png byte
/// for byte, results.csv and results.json but for the seconds (the shards' compute time).
fn assert_same_bench_results(a: &Path, b: &Path) {
    assert_same_eval_results(a, b);
    for f in ["report.md", "error_vs_nfe.png"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} of {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn four_bench_shards_merged_give_the_unsharded_bench_but_for_the_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = small_bench();
    let (full, parts, merged) = (d.join("full"), d.join("parts"), d.join("merged"));
    run_ok(&with(&base, &["--out", p(&full)]));
    // The shards at once, like the tasks of a job array (rows 0..2, 2..5, 5..7, 7..10).
    run_shards_at_once(4, |i| {
        with(&base, &["--shard", &format!("{i}/4"), "--out", p(&parts)])
    });
    let o = run_ok(&["merge", p(&parts), "--out", p(&merged)]);
    assert!(
        stderr(&o).contains("merged 4 bench shards"),
        "{}",
        stderr(&o)
    );
    assert_same_bench_results(&full, &merged);
    // The adaptive samplers' sweeps picked a tolerance at NFE 30, and the stochastic one ran.
    let rows = rows(&merged);
    for s in ["rk45", "dpm-solver-12"] {
        assert!(
            rows.iter()
                .any(|r| r["sampler"] == s && r["rtol"].is_number() && r["nfe_budget"] == 30),
            "{s}: {rows:?}"
        );
    }
    assert!(
        rows.iter()
            .any(|r| r["sampler"] == "qit-2" && r["sw2"].is_number())
    );
}

#[test]
fn a_devices_bench_merges_one_shard_per_device_into_the_unsharded_bench() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = small_bench();
    run_ok(&with(&base, &["--out", p(&d.join("full"))]));
    let o = run_ok(&with(
        &base,
        &["--devices", "cpu,cpu", "--out", p(&d.join("devices"))],
    ));
    assert!(
        stderr(&o).contains("merged 2 bench shards"),
        "{}",
        stderr(&o)
    );
    assert_same_bench_results(&d.join("full"), &d.join("devices"));
    assert!(!d.join("devices.parts").exists());
}

#[test]
fn merge_refuses_a_missing_a_duplicated_a_foreign_or_a_damaged_bench_shard_by_name_and_writes_nothing()
 {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = gmm_bench("ddim,rk45", "3,10", 6);
    let (one, other) = three_shards_and_a_foreign_one(&base, d);
    let out = d.join("results");
    merge_refuses_a_duplicated_and_a_foreign_shard(&one, &other, &out);
    // Bench parts merge into a folder, not into a sample's output file.
    merge_fails(&[&one], &d.join("m.npy"), &["results folder", "`bench`"]);
    // Per-sample results that do not match their manifest.
    let data = one.join("part-1-of-3.safetensors");
    let good = std::fs::read(&data).unwrap();
    std::fs::write(&data, &good[..good.len() / 2]).unwrap();
    merge_fails(&[&one], &out, &["part-1-of-3.safetensors"]);
    std::fs::write(&data, good).unwrap();
    std::fs::remove_file(one.join("part-2-of-3.json")).unwrap();
    merge_fails(&[&one], &out, &["shard 2/3", "missing"]);
}

#[test]
fn a_rerun_bench_shard_is_not_redone_and_a_bench_shard_refuses_what_cannot_shard() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = gmm_bench("ddim,rk45", "3,10", 6);
    let parts = d.join("parts");
    let shard = with(&base, &["--shard", "1/3", "--out", p(&parts)]);
    let o = run_ok(&shard);
    assert!(stderr(&o).contains("samples 2..4 of 6"), "{}", stderr(&o));
    let files = [
        parts.join("part-1-of-3.json"),
        parts.join("part-1-of-3.safetensors"),
    ];
    let before: Vec<_> = files.iter().map(|f| stamp(f)).collect();
    let o = run_ok(&shard);
    let err = stderr(&o);
    assert!(
        err.contains("shard 1/3 is already done") && err.contains("part-1-of-3.json"),
        "{err}"
    );
    assert!(before == files.iter().map(|f| stamp(f)).collect::<Vec<_>>());
    // A damaged part of this run is redone (its numbers the same, its seconds its own), and
    // is then complete.
    std::fs::write(&files[1], b"not a safetensors file").unwrap();
    let err = stderr(&run_ok(&shard));
    assert!(
        err.contains("damaged") && err.contains("samples 2..4"),
        "{err}"
    );
    assert!(stderr(&run_ok(&shard)).contains("already done"));
    // Another run's part in the folder, a file as --out, an empty shard, no such shard.
    let file = d.join("file.txt");
    std::fs::write(&file, "x").unwrap();
    let empty = d.join("empty");
    for (args, want) in [
        (
            with(
                &base,
                &["--seed", "9", "--shard", "0/3", "--out", p(&parts)],
            ),
            "is a part of another run",
        ),
        (
            with(&base, &["--shard", "0/3", "--out", p(&file)]),
            "not a file",
        ),
        (
            with(&base, &["--shard", "0/7", "--out", p(&empty)]),
            "--shard 0/7: no samples in it",
        ),
        (
            with(&base, &["--shard", "3/3", "--out", p(&empty)]),
            "--shard 3/3",
        ),
    ] {
        assert_refused(&args, &[want]);
    }
    assert!(!empty.exists());
}
