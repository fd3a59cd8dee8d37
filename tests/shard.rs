//! `sample --shard I/N` + `merge`: four shards run as separate processes and merged are
//! byte-identical to the unsharded run (npy of a problem; PNG grid of the embedded
//! class-conditional model with guidance); merge refuses a missing shard, a duplicated one
//! and parts of two configurations, naming the part, and writes nothing.

mod common;
use common::{p, qtaylor, stderr};
use std::path::Path;

fn run(args: &[&str]) {
    let o = qtaylor(args);
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
}

fn shards_then_merge(base: &[&str], dir: &Path, full: &str, merged: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let parts = dir.join("parts");
    run(&[base, &["--out", p(&dir.join(full))]].concat());
    for i in 0..4 {
        let s = format!("{i}/4");
        run(&[base, &["--shard", &s, "--out", p(&parts)]].concat());
    }
    run(&["merge", p(&parts), "--out", p(&dir.join(merged))]);
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
    let problem = [
        "sample",
        "--problem",
        "gmm-demo",
        "--sampler",
        "qit-2",
        "--steps",
        "6",
        "--batch",
        "10",
        "--seed",
        "4",
    ];
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
    ];
    shards_then_merge(&model, &d.join("b"), "full.png", "merged.png");
}

#[test]
fn merge_refuses_a_missing_a_duplicated_or_a_foreign_shard_by_name_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = [
        "sample",
        "--problem",
        "gmm-demo",
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--batch",
        "6",
    ];
    let (one, other) = (d.join("one"), d.join("other"));
    for i in 0..3 {
        let s = format!("{i}/3");
        run(&[&base[..], &["--shard", &s, "--out", p(&one)]].concat());
    }
    run(&[
        &base[..],
        &["--seed", "9", "--shard", "1/3", "--out", p(&other)],
    ]
    .concat());
    let out = d.join("m.npy");
    let fails = |dirs: &[&Path], want: &[&str]| {
        let mut args = vec!["merge"];
        args.extend(dirs.iter().map(|x| p(x)));
        args.extend(["--out", p(&out)]);
        let o = qtaylor(&args);
        let e = stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        for w in want {
            assert!(e.contains(w), "'{w}' not in: {e}");
        }
        assert!(!e.contains("panicked") && !out.exists(), "{e}");
    };
    fails(&[&one, &one], &["shard 0/3 twice", "part-0-of-3.json"]);
    fails(
        &[&one, &other],
        &["is of another run", "other/part-1-of-3.json"],
    );
    std::fs::remove_file(one.join("part-2-of-3.json")).unwrap();
    fails(&[&one], &["shard 2/3", "missing"]);
    // A shard with nothing in it, and flags a shard cannot take.
    let o = qtaylor(&[
        "sample",
        "--problem",
        "gmm-demo",
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--batch",
        "2",
        "--shard",
        "0/3",
        "--out",
        p(&d.join("z")),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("no samples in it"));
    let o = qtaylor(&[
        "sample",
        "--problem",
        "gmm-demo",
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--shard",
        "5/3",
        "--out",
        p(&d.join("z")),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("--shard 5/3"));
    assert!(!d.join("z").exists());
}
