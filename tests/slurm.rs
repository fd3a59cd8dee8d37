//! The Slurm scripts of scripts/slurm/: the array task script, driven with the variables
//! Slurm sets as separate processes, and the merge job script give the unsharded eval's
//! results; submit-eval.sh submits the array and a merge that waits for it (against a
//! stand-in sbatch); and, where a Slurm controller answers and QTAYLOR_TEST_SLURM=1, a real
//! submission. CI has no Slurm (no root daemons), so that last part is opt-in.

mod common;
use common::{
    SmallEval, assert_same_eval_results, p, run_ok, stderr, stub_sbatch, stub_sbatch_logs,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts/slurm")
        .join(name)
}

/// `bash SCRIPT` with the environment `env` (and no QTAYLOR_* / SLURM_* variables of the
/// test's own environment), from the crate root.
fn bash(script: &Path, env: &[(String, String)]) -> Command {
    let mut c = Command::new("bash");
    c.arg(script).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, _) in std::env::vars() {
        if k.starts_with("QTAYLOR_") || k.starts_with("SLURM_") {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    c
}

/// Whether `cmd ARGS` runs and succeeds (e.g. `sinfo` reaching a controller).
fn runs(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o.status.success().then_some(text)
}

/// The environment of one run: the eval of `e`, its parts and results folders.
fn env_of(e: &SmallEval, parts: &Path, results: &Path) -> Vec<(String, String)> {
    let mut env = e.env();
    env.push(("QTAYLOR_PARTS".into(), p(parts).into()));
    env.push(("QTAYLOR_RESULTS".into(), p(results).into()));
    env
}

#[test]
fn the_array_tasks_and_the_merge_job_run_as_slurm_runs_them_give_the_unsharded_results() {
    // Is Slurm here? (Reported, not required: the scripts are driven as Slurm drives them.)
    for (cmd, args) in [
        ("sbatch", &["--version"][..]),
        ("slurmctld", &["-V"]),
        ("sinfo", &["-h"]),
    ] {
        match runs(cmd, args) {
            Some(v) => eprintln!("{cmd} {}: {}", args.join(" "), v.trim()),
            None => eprintln!("{cmd}: not installed, or not runnable here"),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = SmallEval::new(d);
    let (full, parts, results) = (d.join("full"), d.join("parts"), d.join("results"));
    run_ok(&[e.args(), vec!["--out".into(), p(&full).into()]].concat());
    let env = env_of(&e, &parts, &results);
    // Array job 4242 of 4 tasks: what Slurm sets in each task's environment.
    let tasks: Vec<_> = (0..4)
        .map(|id| {
            let slurm = [
                ("SLURM_ARRAY_JOB_ID", "4242".to_string()),
                ("SLURM_JOB_ID", (4243 + id).to_string()),
                ("SLURM_ARRAY_TASK_ID", id.to_string()),
                ("SLURM_ARRAY_TASK_COUNT", "4".into()),
                ("SLURM_ARRAY_TASK_MIN", "0".into()),
                ("SLURM_ARRAY_TASK_MAX", "3".into()),
                ("SLURM_SUBMIT_DIR", env!("CARGO_MANIFEST_DIR").into()),
            ];
            bash(&script("eval-array.sbatch"), &env)
                .envs(slurm)
                .output()
                .unwrap()
        })
        .collect();
    for (id, o) in tasks.iter().enumerate() {
        assert!(o.status.success(), "task {id}: {}", stderr(o));
        assert!(
            stderr(o).contains(&format!("shard {id}/4")),
            "{}",
            stderr(o)
        );
    }
    let o = bash(&script("merge.sbatch"), &env)
        .env("SLURM_JOB_ID", "4247")
        .output()
        .unwrap();
    assert!(o.status.success(), "merge: {}", stderr(&o));
    assert_same_eval_results(&full, &results);
    // Resubmitted, a finished task does no work again.
    let o = bash(&script("eval-array.sbatch"), &env)
        .envs([
            ("SLURM_ARRAY_TASK_ID", "2"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success() && stderr(&o).contains("already done"),
        "{}",
        stderr(&o)
    );
    // Not a job array task, or an array whose ids are not 0..N-1 without gaps: refused.
    let fails = |vars: &[(&str, &str)], want: &str| {
        let o: Output = bash(&script("eval-array.sbatch"), &env)
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        assert!(!o.status.success(), "{vars:?} succeeded");
        assert!(stderr(&o).contains(want), "{want}: {}", stderr(&o));
    };
    fails(
        &[],
        "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT are not set",
    );
    fails(
        &[
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "4"),
        ],
        "not 2 consecutive ids",
    );
    fails(
        &[
            ("SLURM_ARRAY_TASK_ID", "x"),
            ("SLURM_ARRAY_TASK_COUNT", "2"),
        ],
        "SLURM_ARRAY_TASK_ID=x: expected a non-negative integer",
    );
}

#[test]
fn submit_eval_submits_the_array_and_a_merge_that_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = SmallEval::new(d);
    let (full, parts, results) = (d.join("full"), d.join("parts"), d.join("results"));
    run_ok(&[e.args(), vec!["--out".into(), p(&full).into()]].concat());
    let bin = d.join("bin");
    stub_sbatch(&bin);
    let path = format!("{}:{}", p(&bin), std::env::var("PATH").unwrap_or_default());
    let mut env = env_of(&e, &parts, &results);
    env.push(("PATH".into(), path.clone()));
    env.push(("QTAYLOR_SHARDS".into(), "3".into()));
    env.push(("QTAYLOR_SBATCH_ARGS".into(), "--time=10".into()));
    let o = bash(&script("submit-eval.sh"), &env).output().unwrap();
    let logs = stub_sbatch_logs(&bin);
    assert!(o.status.success(), "{}\n{logs}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("submitted eval array job 1001 (3 shards") && out.contains("merge job 1002"),
        "{out}"
    );
    let calls = std::fs::read_to_string(bin.join("sbatch.log")).unwrap();
    let calls: Vec<&str> = calls.lines().collect();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(
        calls[0].contains("--array=0-2")
            && calls[0].contains("--time=10")
            && calls[0].ends_with("eval-array.sbatch"),
        "{calls:?}"
    );
    assert!(
        calls[1].contains("--dependency=afterok:1001")
            && calls[1].contains("--kill-on-invalid-dep=yes")
            && calls[1].ends_with("merge.sbatch"),
        "{calls:?}"
    );
    assert_same_eval_results(&full, &results);
    // A failed array task: the merge never runs (afterok), and nothing is merged.
    let broken = d.join("broken");
    let mut env = env_of(&e, &d.join("parts2"), &broken);
    env.push(("PATH".into(), path));
    env.push(("QTAYLOR_SAMPLERS".into(), "nope".into()));
    let o = bash(&script("submit-eval.sh"), &env).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!broken.exists(), "{}", stub_sbatch_logs(&bin));
    // No sbatch at all: a clear error.
    let mut env = env_of(&e, &parts, &results);
    env.push(("PATH".into(), "/nonexistent".into()));
    let o = Command::new("/bin/bash")
        .arg(script("submit-eval.sh"))
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    assert!(
        !o.status.success() && stderr(&o).contains("sbatch not found"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_real_slurm_runs_the_array_and_the_merge_when_asked_to() {
    // Opt-in (QTAYLOR_TEST_SLURM=1) and only where a controller answers: a real cluster's
    // queue may hold jobs for hours, and CI has none.
    if std::env::var("QTAYLOR_TEST_SLURM").as_deref() != Ok("1") {
        eprintln!("skipped: set QTAYLOR_TEST_SLURM=1 to submit to the Slurm cluster sinfo reaches");
        return;
    }
    let Some(info) = runs("sinfo", &["-h"]) else {
        panic!("QTAYLOR_TEST_SLURM=1 but sinfo reaches no Slurm controller");
    };
    eprintln!("sinfo: {}", info.trim());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = SmallEval::new(d);
    let (full, parts, results) = (d.join("full"), d.join("parts"), d.join("results"));
    run_ok(&[e.args(), vec!["--out".into(), p(&full).into()]].concat());
    let mut env = env_of(&e, &parts, &results);
    env.push(("QTAYLOR_WAIT".into(), "1".into()));
    env.push((
        "QTAYLOR_SBATCH_ARGS".into(),
        format!("--output={}/slurm-%j.out", p(d)),
    ));
    // The variables the Slurm client reads (SLURM_CONF and the like) are kept.
    let mut c = bash(&script("submit-eval.sh"), &env);
    for (k, v) in std::env::vars() {
        if k == "SLURM_CONF" {
            c.env(k, v);
        }
    }
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    assert_same_eval_results(&full, &results);
}
