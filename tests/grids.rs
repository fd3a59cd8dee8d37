//! Time grids that win at few NFE: continuous grids on discrete schedules, `qtaylor tune`
//! and grid files (issue 13).

mod common;
use common::{p, qtaylor, stderr};
use std::path::Path;
use std::process::Output;

use qtaylor::sampling::gridfile::GridFile;
use qtaylor::schedule::{Schedule, Tabulated, VpLinear};

#[test]
fn network_time_is_the_trained_step_at_the_knots_and_inverts_between_them() {
    let s = Tabulated::diffusers("linear", 1e-4, 0.02, 1000).unwrap();
    for n in [0usize, 1, 17, 500, 998, 999] {
        let t = (n as f64 + 1.0) / 1000.0;
        assert!((s.network_time(t) - n as f64).abs() < 1e-9, "{n}");
        assert_eq!(s.time_of_network_time(n as f64).unwrap(), t);
    }
    for n in [0.25, 3.5, 412.125, 998.9] {
        let t = s.time_of_network_time(n).unwrap();
        assert!((s.network_time(t) - n).abs() < 1e-9, "{n}");
    }
    // Linear in log σ between two steps (diffusers' _sigma_to_t).
    let (l3, l4) = (s.lambda(4.0 / 1000.0), s.lambda(5.0 / 1000.0));
    let t = s.t_of_lambda(0.3 * l3 + 0.7 * l4).unwrap();
    assert!((s.network_time(t) - 3.7).abs() < 1e-9);
    assert!(s.time_of_network_time(-0.5).is_err());
    assert!(s.time_of_network_time(999.5).is_err());
}

fn tune_gmm(out: &Path, sampler: &str, nfe: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "tune",
        "--problem",
        "gmm-demo",
        "--sampler",
        sampler,
        "--nfe",
        nfe,
        "--dtype",
        "f64",
        "--samples",
        "24",
        "--holdout",
        "24",
        "--objective",
        "l2",
        "--out",
        p(out),
    ];
    args.extend_from_slice(extra);
    qtaylor(&args)
}

/// `held-out end-point RMSE ... default A, tuned B` from tune's report.
fn errors(o: &Output) -> (f64, f64) {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("held-out end-point RMSE"))
        .unwrap_or_else(|| panic!("no error line in:\n{out}"));
    let num = |key: &str| -> f64 {
        let rest = &line[line.find(key).unwrap() + key.len()..];
        rest.trim_start()
            .split([',', ' '])
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (num("default"), num("tuned"))
}

/// `dynamic program A` from tune's held-out line.
fn dp_error(o: &Output) -> f64 {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("held-out end-point RMSE"))
        .unwrap();
    let rest = &line[line.find("dynamic program").unwrap() + "dynamic program".len()..];
    rest.trim_start()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn the_global_refinement_beats_the_dynamic_program_for_multistep_samplers() {
    // The dynamic program's cost is the history-free one-step error; the refinement's is
    // the full run's, so a multistep sampler gains from it (gmm-demo, held-out samples).
    let dir = tempfile::tempdir().unwrap();
    for (sampler, nfe) in [("unipc-3", "5"), ("dpmpp-3m", "5")] {
        let out = dir.path().join(format!("{sampler}.json"));
        let o = tune_gmm(&out, sampler, nfe, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let ((default, tuned), dp) = (errors(&o), dp_error(&o));
        assert!(
            tuned < 0.8 * dp.min(default),
            "{sampler} at {nfe} NFE: tuned {tuned}, dynamic program {dp}, default {default}"
        );
    }
    // Without the refinement the file holds the dynamic program's grid.
    let out = dir.path().join("dp.json");
    let o = tune_gmm(&out, "unipc-3", "5", &["--refine-sweeps", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (_, tuned) = errors(&o);
    assert_eq!(tuned, dp_error(&o));
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(g["times"], g["tuning"]["gits_times"]);
    assert_eq!(g["tuning"]["refine_evals"], 0);
}

#[test]
fn tuning_lowers_the_held_out_error_below_the_default_grid() {
    let dir = tempfile::tempdir().unwrap();
    for (sampler, nfe) in [("qt-3", "6"), ("ddim", "5"), ("unipc-3", "8")] {
        let out = dir.path().join(format!("{sampler}.json"));
        let o = tune_gmm(&out, sampler, nfe, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let (default, tuned) = errors(&o);
        assert!(
            tuned < default,
            "{sampler} at {nfe} NFE: tuned {tuned} vs default {default}"
        );
        let g = GridFile::read(&out, &VpLinear::default()).unwrap();
        assert_eq!(g.sampler, sampler);
        assert_eq!(g.nfe.to_string(), nfe);
        assert_eq!(g.times.len(), g.steps + 1);
        assert_eq!(g.times[0], 1.0);
        assert_eq!(
            *g.times.last().unwrap(),
            1e-3,
            "the default grid's end is kept"
        );
    }
}

#[test]
fn a_tuned_grid_file_round_trips_and_drives_sample() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("g.json");
    let o = tune_gmm(&file, "qt-2", "5", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = VpLinear::default();
    let g = GridFile::read(&file, &s).unwrap();
    let again = dir.path().join("again.json");
    g.write(&again).unwrap();
    let g2 = GridFile::read(&again, &s).unwrap();
    assert_eq!(g.times, g2.times);
    assert_eq!(g.sigmas, g2.sigmas);
    assert_eq!(g.tuning, g2.tuning);
    // The same grid through --grid-file and through --sigmas gives the same samples.
    let a = dir.path().join("a.npy");
    let b = dir.path().join("b.npy");
    let common = [
        "sample",
        "--problem",
        "gmm-demo",
        "--sampler",
        "qt-2",
        "--dtype",
        "f64",
        "--batch",
        "4",
    ];
    let mut args = common.to_vec();
    args.extend(["--grid-file", p(&file), "--out", p(&a)]);
    let o = qtaylor(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    let sig: Vec<String> = g.sigmas.iter().map(|v| format!("{v:e}")).collect();
    let sig = sig.join(",");
    let mut args = common.to_vec();
    args.extend(["--sigmas", &sig, "--out", p(&b)]);
    let o = qtaylor(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let (ra, rb) = (
        qtaylor::io::read_npy(&a, &[None, None]).unwrap(),
        qtaylor::io::read_npy(&b, &[None, None]).unwrap(),
    );
    assert!(qtaylor::tensor::ops::max_abs_diff(&ra, &rb).unwrap() < 1e-9);
    // Another sampler: a warning that names the file and what differs.
    let mut args = common.to_vec();
    args[4] = "ddim";
    args.extend(["--grid-file", p(&file), "--out", p(&b)]);
    let o = qtaylor(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("warning: grid file") && e.contains("tuned for sampler qt-2, not ddim"),
        "{e}"
    );
    // bench runs every sampler on the file's grid; a budget it exceeds is skipped.
    let out = dir.path().join("bench");
    let o = qtaylor(&[
        "bench",
        "--problem",
        "gmm-demo",
        "--grid-file",
        p(&file),
        "--samplers",
        "qt-2,ddim,heun",
        "--nfe",
        "5",
        "--batch",
        "16",
        "--out",
        p(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    let row = |name: &str| -> String {
        table
            .lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("{name} missing:\n{table}"))
            .to_string()
    };
    assert!(!row("qt-2").contains("| — |"), "{}", row("qt-2"));
    assert!(
        row("heun").contains("—"),
        "heun needs 10 NFE on a 5-step grid"
    );
}

#[test]
fn each_bad_grid_file_is_refused_naming_the_file_and_the_fault() {
    let dir = tempfile::tempdir().unwrap();
    let s = VpLinear::default();
    let good = GridFile::new(
        "qt-3",
        3,
        &s,
        "gmm-demo",
        vec![1.0, 0.5, 0.1, 1e-3],
        serde_json::json!({}),
    );
    let text = serde_json::to_value(&good).unwrap();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "increasing",
            {
                let mut v = text.clone();
                v["times"] = serde_json::json!([1.0, 0.1, 0.5, 1e-3]);
                v
            },
            "decrease strictly",
        ),
        (
            "outside",
            {
                let mut v = text.clone();
                v["times"] = serde_json::json!([1.5, 0.5, 0.1, 1e-3]);
                v
            },
            "outside the domain",
        ),
        (
            "count",
            {
                let mut v = text.clone();
                v["steps"] = serde_json::json!(5);
                v
            },
            "'steps' is 5",
        ),
        (
            "format",
            {
                let mut v = text.clone();
                v["format"] = serde_json::json!("something-else");
                v
            },
            "key 'format'",
        ),
        (
            "broken",
            serde_json::json!("not an object"),
            "not a qtaylor grid file",
        ),
    ];
    for (name, value, fault) in cases {
        let file = dir.path().join(format!("{name}.json"));
        std::fs::write(&file, serde_json::to_string(&value).unwrap()).unwrap();
        let e = GridFile::read(&file, &s).unwrap_err().to_string();
        assert!(e.contains(p(&file)) && e.contains(fault), "{name}: {e}");
        // Through the CLI: the same error, and nothing written.
        let out = dir.path().join(format!("{name}.npy"));
        let o = qtaylor(&[
            "sample",
            "--problem",
            "gmm-demo",
            "--sampler",
            "qt-3",
            "--grid-file",
            p(&file),
            "--out",
            p(&out),
        ]);
        assert!(!o.status.success(), "{name}");
        assert!(stderr(&o).contains(fault), "{name}: {}", stderr(&o));
        assert!(!out.exists(), "{name}: an output was written");
    }
    let missing = dir.path().join("missing.json");
    let e = GridFile::read(&missing, &s).unwrap_err().to_string();
    assert!(
        e.contains("missing.json") && e.contains("cannot read"),
        "{e}"
    );
}

#[test]
fn continuous_grids_run_on_discrete_schedules_and_keep_the_flags_honest() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("k.npy");
    let base = [
        "sample",
        "--problem",
        "gmm-demo",
        "--schedule",
        "discrete",
        "--sampler",
        "dpmpp-2m",
        "--steps",
        "8",
    ];
    let mut args = base.to_vec();
    args.extend(["--grid", "karras", "--rho", "5", "--out", p(&out)]);
    let o = qtaylor(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("karras, final zero"), "{}", stderr(&o));
    for (extra, msg) in [
        (vec!["--rho", "5"], "--rho applies to --grid karras only"),
        (
            vec!["--grid", "karras", "--spacing", "trailing"],
            "do nothing with --grid",
        ),
        (
            vec!["--timesteps", "900,500,100"],
            "disagrees with the explicit grid",
        ),
        (
            vec!["--grid", "uniform", "--t-min", "0.01", "--sigma-min", "0.1"],
            "not both",
        ),
    ] {
        let bad = dir.path().join("bad.npy");
        let mut args = base.to_vec();
        args.extend(extra.iter().copied());
        args.extend(["--out", p(&bad)]);
        let o = qtaylor(&args);
        assert!(!o.status.success(), "{extra:?}");
        assert!(stderr(&o).contains(msg), "{extra:?}: {}", stderr(&o));
        assert!(!bad.exists());
    }
    // Fractional timesteps are fractional steps of the table.
    let f = dir.path().join("f.npy");
    let o = qtaylor(&[
        "sample",
        "--problem",
        "gmm-demo",
        "--schedule",
        "discrete",
        "--sampler",
        "ddim",
        "--timesteps",
        "950.5,600.25,99.75",
        "--out",
        p(&f),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("3 steps"), "{}", stderr(&o));
}

#[test]
fn tuning_on_several_devices_gives_the_one_device_grid_bit_for_bit() {
    // Three CPU replicas, each with a third of the tuning and held-out samples (24 of each,
    // so 8 apiece); every error is the mean over all 24, gathered in sample order, so the
    // search takes the same steps and lands on the same grid.
    let dir = tempfile::tempdir().unwrap();
    let (one, three) = (dir.path().join("one.json"), dir.path().join("three.json"));
    for (sampler, nfe) in [("unipc-3", "6"), ("qt-2", "5")] {
        let o = tune_gmm(&one, sampler, nfe, &["--refine-sweeps", "4"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let o3 = tune_gmm(
            &three,
            sampler,
            nfe,
            &["--refine-sweeps", "4", "--devices", "cpu,cpu,cpu"],
        );
        assert!(o3.status.success(), "{}", stderr(&o3));
        let (a, b) = (
            GridFile::read(&one, &VpLinear::default()).unwrap(),
            GridFile::read(&three, &VpLinear::default()).unwrap(),
        );
        assert_eq!(a.times, b.times, "{sampler} at {nfe} NFE");
        assert_eq!(errors(&o), errors(&o3), "{sampler} at {nfe} NFE");
    }
    // More devices than samples is refused before anything is written.
    let none = dir.path().join("none.json");
    let o = qtaylor(&[
        "tune",
        "--problem",
        "gmm-demo",
        "--sampler",
        "ddim",
        "--nfe",
        "5",
        "--samples",
        "2",
        "--devices",
        "cpu,cpu,cpu",
        "--out",
        p(&none),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o)
            .contains("--samples 2: data-parallel tuning needs at least one sample per device (3)"),
        "{}",
        stderr(&o)
    );
    assert!(!none.exists());
}
