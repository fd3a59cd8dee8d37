//! Sharded runs from the command line: `--shard I/N` parsed, a finished shard skipped,
//! `--devices` run as one child process per device and merged, and the configuration a
//! part records (the command line without its shard and output).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use qtaylor::shard::{CheckData, Shard};

use super::merge;

/// `--shard I/N`, if given.
pub fn parse(s: Option<&str>) -> Result<Option<Shard>> {
    s.map(Shard::parse).transpose()
}

/// A shard about to run (`--shard`, parts folder `out`): true when its complete part of this
/// configuration is already in `out` (a note says so and the run is skipped); an error when
/// `out` holds a part of another run. `check` checks a part's data.
pub fn finished(out: &Path, s: Shard, check: CheckData) -> Result<bool> {
    let config = config_of(&super::args::command_line());
    match qtaylor::shard::existing_part(out, s, &config, check)? {
        Some(json) => {
            eprintln!(
                "note: shard {}/{} is already done: {} is complete for configuration {}; not redone (delete it to redo the shard)",
                s.index,
                s.count,
                json.display(),
                qtaylor::shard::config_hash(&config)
            );
            Ok(true)
        }
        None => Ok(false),
    }
}

/// `--devices D1,D2,...`: shard I of this command on device I, all at once in child
/// processes ([`run_children`]), then their merge into `out`; the parts are removed once
/// merged.
pub fn run_on_devices(devices: &str, out: &Path) -> Result<()> {
    let args = super::args::command_line();
    let exe = std::env::current_exe().context("--devices: locating this program")?;
    let parts = run_children(&exe, &args, devices, out)?;
    merge::merge(std::slice::from_ref(&parts), out)?;
    std::fs::remove_dir_all(&parts)
        .with_context(|| format!("removing the merged parts {}", parts.display()))
}

/// The command line without `--shard X` / `--shard=X` and `--out X` / `--out=X`, with a
/// `--device cuda:N` recorded as `--device cuda`: which card of a kind ran a shard does not
/// change its numbers, so shards on several GPUs (`--devices`) are one configuration.
pub fn config_of(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    let mut device_next = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if device_next {
            device_next = false;
            out.push(device_kind(a).to_string());
            continue;
        }
        if a == "--shard" || a == "--out" {
            skip = true;
            continue;
        }
        if a.starts_with("--shard=") || a.starts_with("--out=") {
            continue;
        }
        if a == "--device" {
            device_next = true;
        }
        match a.strip_prefix("--device=") {
            Some(d) => out.push(format!("--device={}", device_kind(d))),
            None => out.push(a.clone()),
        }
    }
    out
}

/// `cuda:1` → `cuda`; any other device name as it is.
fn device_kind(d: &str) -> &str {
    d.split_once(':').map_or(d, |(kind, _)| kind)
}

/// The folder a `--devices` run keeps its parts in until they are merged: `OUT.parts` next
/// to `--out`.
pub fn devices_parts_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".parts");
    out.with_file_name(name)
}

/// The command line (without the program name) of shard `shard` of a `--devices` run:
/// `args` without `--devices` and `--out`, with `--device DEVICE --shard I/N --out PARTS`.
/// Refuses `--device` and `--shard` in `args`, which `--devices` replaces.
pub fn devices_child_args(
    args: &[String],
    device: &str,
    shard: Shard,
    parts: &Path,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        let flag = a.split_once('=').map_or(a.as_str(), |(f, _)| f);
        match flag {
            "--device" | "--shard" => bail!(
                "--devices runs one shard per device: give no {flag} with it (--devices cuda:0,cuda:1 sets both)"
            ),
            "--devices" | "--out" => skip = !a.contains('='),
            _ => out.push(a.clone()),
        }
    }
    out.extend([
        "--device".to_string(),
        device.to_string(),
        "--shard".to_string(),
        format!("{}/{}", shard.index, shard.count),
        "--out".to_string(),
        parts.display().to_string(),
    ]);
    Ok(out)
}

/// Runs shard I of N of this command on device I of `devices` (comma-separated, N of them),
/// all at once, each as a child process of the program `exe` with [`devices_child_args`],
/// writing into [`devices_parts_dir`] of `out`; returns that folder once every shard
/// succeeded. A failed shard is an error naming it and its device; the parts of the others
/// stay, so running the same command again redoes only the missing shards (a shard skips its
/// complete part). Children get `QTAYLOR_PROGRESS=off` unless it is set.
pub fn run_children(exe: &Path, args: &[String], devices: &str, out: &Path) -> Result<PathBuf> {
    let list: Vec<&str> = devices.split(',').map(str::trim).collect();
    if list.iter().any(|d| d.is_empty()) {
        bail!(
            "--devices {devices}: expected a comma-separated list of devices, e.g. cuda:0,cuda:1"
        );
    }
    let parts = devices_parts_dir(out);
    let mut children = Vec::new();
    for (i, d) in list.iter().enumerate() {
        let shard = Shard {
            index: i,
            count: list.len(),
        };
        let child_args = devices_child_args(args, d, shard, &parts)?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(&child_args);
        if std::env::var_os("QTAYLOR_PROGRESS").is_none() {
            cmd.env("QTAYLOR_PROGRESS", "off");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("--devices: starting shard {i}/{} on {d}", list.len()))?;
        children.push((i, d, child));
    }
    let mut failed = Vec::new();
    for (i, d, mut child) in children {
        let status = child
            .wait()
            .with_context(|| format!("--devices: waiting for shard {i}/{} on {d}", list.len()))?;
        if !status.success() {
            failed.push(format!("shard {i}/{} on {d} ({status})", list.len()));
        }
    }
    if !failed.is_empty() {
        bail!(
            "--devices: {} failed (its error is above); the other shards' parts are in {}: run the same command again to redo only the missing shards",
            failed.join(", "),
            parts.display()
        );
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qtaylor::shard::config_hash;

    #[test]
    fn the_configuration_drops_shard_and_out_and_its_hash_tells_runs_apart() {
        let args: Vec<String> = [
            "sample", "--shard", "1/4", "--seed", "3", "--out=d", "--out", "x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let c = config_of(&args);
        assert_eq!(c, vec!["sample", "--seed", "3"]);
        let mut d = c.clone();
        d[2] = "4".into();
        assert_ne!(config_hash(&c), config_hash(&d));
        assert_eq!(config_hash(&c), config_hash(&c.clone()));
    }

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_configuration_records_the_device_kind_not_which_card() {
        let on = |d: &str| config_of(&strings(&["eval", "--device", d, "--n", "8"]));
        assert_eq!(on("cuda:0"), on("cuda:3"));
        assert_eq!(on("cuda:1"), on("cuda"));
        assert_ne!(on("cuda"), on("cpu"));
        assert_eq!(
            config_of(&strings(&["eval", "--device=cuda:2"])),
            strings(&["eval", "--device=cuda"])
        );
    }

    #[test]
    fn a_devices_child_gets_its_device_shard_and_the_parts_folder_instead_of_devices_and_out() {
        let args = strings(&[
            "--tf32",
            "sample",
            "--devices",
            "cuda:0,cuda:1",
            "--seed",
            "2",
            "--out=x.png",
        ]);
        let parts = devices_parts_dir(Path::new("run/x.png"));
        assert_eq!(parts, Path::new("run/x.png.parts"));
        let got =
            devices_child_args(&args, "cuda:1", Shard { index: 1, count: 2 }, &parts).unwrap();
        let want = [
            "--tf32",
            "sample",
            "--seed",
            "2",
            "--device",
            "cuda:1",
            "--shard",
            "1/2",
            "--out",
            "run/x.png.parts",
        ];
        assert_eq!(got, strings(&want));
        // Shards on two cards of one kind are one configuration.
        let c0 = devices_child_args(&args, "cuda:0", Shard { index: 0, count: 2 }, &parts).unwrap();
        assert_eq!(config_of(&got), config_of(&c0));
        for bad in [["--device", "cpu"], ["--shard", "0/2"]] {
            let mut a = args.clone();
            a.extend(strings(&bad));
            let e =
                devices_child_args(&a, "cpu", Shard { index: 0, count: 2 }, &parts).unwrap_err();
            assert!(
                e.to_string().contains(&format!("give no {}", bad[0])),
                "{e}"
            );
        }
    }
}
