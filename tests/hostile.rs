//! Hostile sizes (issue 14): a checkpoint or array whose header claims more than the file
//! holds, or more than a stated limit, is refused with a clear error before any large
//! allocation. Each run is capped at 2 GiB of address space, so an attempt to allocate what
//! the header claims would abort the process instead of passing quietly.

mod common;

use common::{idx, p, stderr};
use std::path::Path;
use std::process::{Command, Output};

/// Runs the binary with its address space capped at 2 GiB.
fn qtaylor_capped(args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qtaylor"));
    c.args(args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe and touches only this child.
        unsafe {
            c.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 2 << 30,
                    rlim_max: 2 << 30,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    c.output().expect("the binary runs")
}

/// The run failed cleanly (no panic, no allocation abort) with an error containing `want`.
fn refused_cleanly(o: &Output, want: &[&str]) {
    let e = stderr(o);
    assert_eq!(o.status.code(), Some(1), "not a clean error exit:\n{e}");
    assert!(
        !e.contains("panicked") && !e.contains("memory allocation"),
        "{e}"
    );
    for w in want {
        assert!(e.contains(w), "missing '{w}' in:\n{e}");
    }
}

/// A copy of the small random-weight fixture checkpoint.
fn fixture_copy(dir: &Path) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet2d/ddpm_legacy");
    let dst = dir.join("model");
    for sub in ["unet", "scheduler"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
        for f in std::fs::read_dir(src.join(sub)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, dst.join(sub).join(f.file_name().unwrap())).unwrap();
        }
    }
    dst
}

fn edit_config(model: &Path, key: &str, value: serde_json::Value) {
    let f = model.join("unet/config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    c[key] = value;
    std::fs::write(&f, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

fn sample_model(model: &Path, out: &Path) -> Output {
    qtaylor_capped(&[
        "sample",
        "--model",
        p(model),
        "--sampler",
        "ddim",
        "--out",
        p(out),
        "--steps",
        "2",
        "--batch",
        "1",
    ])
}

#[test]
fn the_fixture_samples_under_the_address_space_cap() {
    // The cap itself does not break a normal run: the refusals below are the loader's.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = sample_model(&fixture_copy(dir.path()), &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.exists());
}

#[test]
fn a_config_asking_for_a_million_channels_is_refused_before_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_copy(dir.path());
    let out = dir.path().join("x.png");
    edit_config(
        &model,
        "block_out_channels",
        serde_json::json!([1000000, 1000000, 1000000]),
    );
    refused_cleanly(
        &sample_model(&model, &out),
        &[
            "config.json",
            "block_out_channels",
            "1000000 exceeds the limit of 8192",
        ],
    );
    // The same config given to `train --config` (made-up initial weights) is refused too.
    std::fs::write(
        dir.path().join("train-images-idx3-ubyte"),
        idx(&[2, 8, 8], &[0; 128]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("train-labels-idx1-ubyte"),
        idx(&[2], &[0; 2]),
    )
    .unwrap();
    let o = qtaylor_capped(&[
        "train",
        "--data",
        p(dir.path()),
        "--config",
        p(&model.join("unet/config.json")),
        "--out",
        p(&dir.path().join("trained")),
        "--steps",
        "1",
    ]);
    refused_cleanly(&o, &["block_out_channels", "exceeds the limit"]);
    assert!(!out.exists() && !dir.path().join("trained").exists());
}

#[test]
fn a_config_asking_for_a_billion_pixel_sample_is_refused_before_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_copy(dir.path());
    edit_config(&model, "sample_size", serde_json::json!(1_000_000_000u64));
    refused_cleanly(
        &sample_model(&model, &dir.path().join("x.png")),
        &["config.json", "sample_size", "1000000000 exceeds the limit"],
    );
}

#[test]
fn a_scheduler_config_asking_for_a_billion_timesteps_is_refused_before_allocation() {
    // Found by the scheduler_config fuzz target (the JSON array [288844446] set
    // num_train_timesteps and built 2.3 GB of tables).
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_copy(dir.path());
    let f = model.join("scheduler/scheduler_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
    c["num_train_timesteps"] = 1_000_000_000u64.into();
    std::fs::write(&f, c.to_string()).unwrap();
    refused_cleanly(
        &sample_model(&model, &dir.path().join("x.png")),
        &[
            "scheduler_config.json",
            "num_train_timesteps",
            "1000000000 is outside [2, 65536]",
        ],
    );
    // The same limit on a discrete problem schedule.
    let o = qtaylor_capped(&[
        "sample",
        "--problem",
        "gmm-demo",
        "--schedule",
        "discrete",
        "--train-steps",
        "1000000000",
        "--sampler",
        "ddim",
        "--steps",
        "2",
        "--out",
        p(&dir.path().join("x.npy")),
    ]);
    refused_cleanly(&o, &["1000000000 exceeds the limit of 65536"]);
}

#[test]
fn a_safetensors_header_claiming_2_pow_40_elements_is_refused_before_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_copy(dir.path());
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    let header = |json: &str, data: usize| {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend(json.as_bytes());
        b.extend(vec![0u8; data]);
        b
    };
    // A header length of 2^40 bytes in a small file.
    let mut huge_header = (1u64 << 40).to_le_bytes().to_vec();
    huge_header.extend(b"{}");
    for bytes in [
        // 2^20 x 2^20 = 2^40 float32 elements (4 TiB) said to be in a 64-byte file.
        header(
            r#"{"conv_in.weight":{"dtype":"F32","shape":[1048576,1048576],"data_offsets":[0,4398046511104]}}"#,
            64,
        ),
        // Offsets that fit the file but a shape that claims 2^40 elements.
        header(
            r#"{"conv_in.weight":{"dtype":"F32","shape":[1048576,1048576],"data_offsets":[0,64]}}"#,
            64,
        ),
        huge_header,
    ] {
        std::fs::write(&weights, bytes).unwrap();
        let o = sample_model(&model, &dir.path().join("x.png"));
        refused_cleanly(
            &o,
            &[
                "diffusion_pytorch_model.safetensors",
                "not a valid safetensors file",
            ],
        );
    }
}

#[test]
fn a_npy_header_claiming_a_billion_rows_is_refused_before_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.npy");
    let b = npy_with_header(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 2), }",
        &[0u8; 32],
    );
    std::fs::write(&x, b).unwrap();
    let out = dir.path().join("out.npy");
    let o = qtaylor_capped(&[
        "sample",
        "--problem",
        "gmm-demo",
        "--sampler",
        "ddim",
        "--x-init",
        p(&x),
        "--out",
        p(&out),
        "--steps",
        "2",
    ]);
    refused_cleanly(
        &o,
        &[
            "x.npy",
            "[1000000000, 2]",
            "needs 8000000000 data bytes",
            "has 32",
        ],
    );
    assert!(!out.exists());
}

fn npy_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    b.extend(data);
    b
}

#[test]
fn a_npy_header_claiming_more_bytes_than_the_file_or_the_address_space_is_refused() {
    let b = npy_with_header(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 784), }",
        &[0u8; 64],
    );
    let e = format!(
        "{:#}",
        qtaylor::io::parse_npy(&b, &[None, None]).unwrap_err()
    );
    assert!(
        e.contains("[1000000000, 784]")
            && e.contains("3136000000000 data bytes")
            && e.contains("has 64"),
        "{e}"
    );
    let b = npy_with_header(
        "{'descr': '<f8', 'fortran_order': False, 'shape': (18446744073709551615, 3), }",
        &[],
    );
    let e = format!(
        "{:#}",
        qtaylor::io::parse_npy(&b, &[None, None]).unwrap_err()
    );
    assert!(e.contains("overflows"), "{e}");
}

#[test]
fn npy_in_fortran_order_or_big_endian_or_truncated_is_refused_by_name() {
    let data = [0u8; 24];
    for (header, want) in [
        (
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
            "fortran_order is True",
        ),
        (
            "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }",
            "dtype '>f4' is not supported",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 4), }",
            "needs 32 data bytes, the file has 24",
        ),
        ("{'descr': '<f4', 'fortran_order': False, }", "no 'shape'"),
    ] {
        let e = format!(
            "{:#}",
            qtaylor::io::parse_npy(&npy_with_header(header, &data), &[None, None]).unwrap_err()
        );
        assert!(e.contains(want), "{header}: {e}");
    }
    let ok = npy_with_header(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
        &data,
    );
    assert_eq!(
        qtaylor::io::parse_npy(&ok, &[None, Some(3)])
            .unwrap()
            .dims(),
        &[2, 3]
    );
    for cut in 0..ok.len() - 1 {
        assert!(
            qtaylor::io::parse_npy(&ok[..cut], &[None, Some(3)]).is_err(),
            "cut at {cut}"
        );
    }
}
