//! Sharded runs: `sample --shard I/N`, `eval --shard I/N` and `bench --shard I/N` compute
//! only their share of the sample indices and write a self-describing part; `merge` joins the
//! parts into the output one unsharded run writes (sample: the same bytes; eval and bench:
//! the same results, computed from the merged per-sample features or end points).
//!
//! Sample i's start noise and its sampler noise come from stream (seed, i) and its class from
//! its global index, and the CPU network is batch-independent bit for bit, so rows
//! [⌊I·B/N⌋, ⌊(I+1)·B/N⌋) of the run are the same numbers whichever process draws them. A
//! part is `part-I-of-N.json` (a [`Part`]: the shard, its rows, the output kind, and the
//! run's configuration — the command line without `--shard` and `--out` — with a hash of it)
//! next to its data: `part-I-of-N.npy` (sample's rows) or `part-I-of-N.safetensors` (eval's
//! per-sample features, [`crate::eval`]; bench's per-sample end points, [`crate::bench`]). Both are written atomically, the manifest last, so
//! a part with a manifest is complete and a killed shard leaves none.
//!
//! [`read_parts`] refuses parts of two configurations, a missing shard and a duplicated one,
//! naming the part; [`existing_part`] lets a re-run shard find its finished part and skip
//! the work (and refuses a folder holding another run's parts).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Shard `index` of `count` (0-based): `--shard I/N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Parses `I/N` with 0 ≤ I < N.
    pub fn parse(s: &str) -> Result<Self> {
        let parsed = s
            .split_once('/')
            .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
        match parsed {
            Some((index, count)) if count > 0 && index < count => Ok(Shard { index, count }),
            _ => bail!("--shard {s}: expected I/N with 0 <= I < N, e.g. 0/4"),
        }
    }

    /// The sample indices [start, end) of this shard of `total` samples.
    pub fn range(&self, total: usize) -> (usize, usize) {
        (
            self.index * total / self.count,
            (self.index + 1) * total / self.count,
        )
    }

    /// [`Shard::range`] of `total` samples (the value of the flag `flag`, e.g. `--batch`),
    /// refused when it is empty.
    pub fn rows(&self, total: usize, flag: &str) -> Result<(usize, usize)> {
        let (start, end) = self.range(total);
        if start == end {
            bail!(
                "--shard {}/{}: no samples in it ({flag} {total} is split into more shards than samples)",
                self.index,
                self.count
            );
        }
        Ok((start, end))
    }

    /// The file stem of this shard's part: `part-I-of-N`.
    pub fn stem(&self) -> String {
        format!("part-{}-of-{}", self.index, self.count)
    }
}

/// The part kind of `eval --shard` ([`Part::kind`]).
pub const EVAL_KIND: &str = "eval";

/// The part kind of `bench --shard` ([`Part::kind`]).
pub const BENCH_KIND: &str = "bench";

/// What a part records about itself (`part-I-of-N.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Part {
    /// The run's command line without `--shard` and `--out`.
    pub config: Vec<String>,
    /// FNV-1a 64 of `config` (hex), to compare parts at a glance.
    pub config_hash: String,
    pub shard: usize,
    pub shards: usize,
    /// Sample indices [start, end) of this part, of `total`.
    pub start: usize,
    pub end: usize,
    pub total: usize,
    /// `png` (sample: a grid of the whole run), `npy` (sample: the rows), `eval` (the
    /// per-sample results of `eval`, in `part-I-of-N.safetensors`; see [`Part::eval`]) or
    /// `bench` (the per-sample end points of `bench`, in `part-I-of-N.safetensors`, which
    /// also describes them: [`crate::bench::BenchPart`]).
    pub kind: String,
    /// The shape of one sample (e.g. [1, 28, 28], or [64] for a problem).
    pub item: Vec<usize>,
    /// `eval` parts: the rows of the run and this shard's outcome of each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<crate::eval::EvalPart>,
}

impl Part {
    /// The shard this part says it is.
    pub fn shard(&self) -> Shard {
        Shard {
            index: self.shard,
            count: self.shards,
        }
    }

    /// The file next to the manifest `json` that holds this part's data.
    pub fn data_path(&self, json: &Path) -> PathBuf {
        json.with_extension(if self.kind == EVAL_KIND || self.kind == BENCH_KIND {
            "safetensors"
        } else {
            "npy"
        })
    }
}

/// FNV-1a, 64 bit, over the arguments joined by NUL: a stable configuration hash (no new
/// dependency; it tells configurations apart, it is not a security measure).
pub fn config_hash(config: &[String]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for a in config {
        for b in a.bytes().chain(std::iter::once(0)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
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
pub fn run_on_devices(exe: &Path, args: &[String], devices: &str, out: &Path) -> Result<PathBuf> {
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

/// Writes one shard's part into the folder `dir` (created if needed): its rows as
/// `part-I-of-N.npy`, then the manifest (both atomically; the manifest last, so a part with
/// a manifest is complete).
pub fn write_part(dir: &Path, part: &Part, rows: &Tensor) -> Result<PathBuf> {
    create_parts_dir(dir)?;
    crate::io::write_npy(&dir.join(format!("{}.npy", part.shard().stem())), rows)?;
    write_manifest(dir, part)
}

/// Creates the folder of the parts (`--out` of a shard).
pub fn create_parts_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--out {}: cannot create the folder", dir.display()))
}

/// Writes the manifest `part-I-of-N.json` into `dir` atomically (after the part's data) and
/// returns its path.
pub fn write_manifest(dir: &Path, part: &Part) -> Result<PathBuf> {
    let json = dir.join(format!("{}.json", part.shard().stem()));
    crate::io::write_atomic(&json, serde_json::to_string_pretty(part)?.as_bytes())?;
    Ok(json)
}

/// The `part-*.json` files of the folder `dir`, sorted by name.
fn manifests_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the folder {}", dir.display()))?;
    let mut names: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("part-"))
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Reads the manifest `p`.
fn read_manifest(p: &Path) -> Result<Part> {
    let text =
        std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a shard manifest", p.display()))
}

/// Reads every `part-*.json` under the folders `dirs`, checks that they share one
/// configuration and cover shards 0..N exactly once (naming the offending part otherwise),
/// and returns them in shard order with their manifest paths. Reads no part's data.
pub fn read_parts(dirs: &[PathBuf]) -> Result<Vec<(PathBuf, Part)>> {
    let mut parts: Vec<(PathBuf, Part)> = Vec::new();
    for d in dirs {
        for p in manifests_in(d).context("merge")? {
            let part = read_manifest(&p).map_err(|e| anyhow::anyhow!("merge: {e:#}"))?;
            parts.push((p, part));
        }
    }
    let Some((first_path, first)) = parts.first().cloned() else {
        bail!("merge: no part-*.json in {dirs:?}");
    };
    let mut seen: Vec<Option<(PathBuf, Part)>> = vec![None; first.shards];
    for (p, part) in &parts {
        if part.config_hash != first.config_hash
            || part.config != first.config
            || part.shards != first.shards
            || part.total != first.total
            || part.kind != first.kind
            || part.item != first.item
        {
            bail!(
                "merge: {} is of another run than {} (configuration {} with {} shards, against {} with {}): merge the parts of one run",
                p.display(),
                first_path.display(),
                part.config_hash,
                part.shards,
                first.config_hash,
                first.shards
            );
        }
        if part.shard >= part.shards || (part.start, part.end) != part.shard().range(part.total) {
            bail!(
                "merge: {}: shard {}/{} does not cover its rows {}..{} of {}",
                p.display(),
                part.shard,
                part.shards,
                part.start,
                part.end,
                part.total
            );
        }
        if let Some((other, _)) = &seen[part.shard] {
            bail!(
                "merge: shard {}/{} twice: {} and {}",
                part.shard,
                part.shards,
                other.display(),
                p.display()
            );
        }
        seen[part.shard] = Some((p.clone(), part.clone()));
    }
    let missing: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_none())
        .map(|(i, _)| format!("{i}/{}", first.shards))
        .collect();
    if !missing.is_empty() {
        bail!(
            "merge: shard {} of configuration {} missing (found {} of {} parts)",
            missing.join(", "),
            first.config_hash,
            parts.len(),
            first.shards
        );
    }
    Ok(seen.into_iter().flatten().collect())
}

/// Reads the rows of a `sample` part (`part-I-of-N.npy` next to its manifest `json`),
/// checking their shape against the manifest.
fn read_rows(json: &Path, part: &Part) -> Result<Tensor> {
    let mut want = vec![Some(part.end - part.start)];
    want.extend(part.item.iter().map(|&d| Some(d)));
    crate::io::read_npy(&part.data_path(json), &want)
        .with_context(|| format!("the rows of {}", json.display()))
}

/// Checks that the data of the part `json` is there and matches its manifest.
pub fn check_part_data(json: &Path, part: &Part) -> Result<()> {
    if part.kind == EVAL_KIND {
        crate::eval::read_part_data(json, part).map(|_| ())
    } else if part.kind == BENCH_KIND {
        crate::bench::read_part_data(json, part).map(|_| ())
    } else {
        read_rows(json, part).map(|_| ())
    }
}

/// Joins the rows of `sample` parts ([`read_parts`]'s result) in index order.
pub fn join_rows(parts: &[(PathBuf, Part)]) -> Result<(Part, Tensor)> {
    let Some((_, first)) = parts.first() else {
        bail!("merge: no parts");
    };
    if first.kind == EVAL_KIND {
        bail!(
            "merge: these are parts of `eval` (configuration {}): they merge into a results folder",
            first.config_hash
        );
    }
    if first.kind == BENCH_KIND {
        bail!(
            "merge: these are parts of `bench` (configuration {}): they merge into a results folder",
            first.config_hash
        );
    }
    let rows = parts
        .iter()
        .map(|(json, part)| read_rows(json, part).context("merge"))
        .collect::<Result<Vec<_>>>()?;
    let all = Tensor::cat(&rows, 0)?;
    if all.dim(0)? != first.total {
        bail!(
            "merge: the parts hold {} rows, their manifests say {}",
            all.dim(0)?,
            first.total
        );
    }
    Ok((first.clone(), all))
}

/// Reads the `sample` parts under `dirs` ([`read_parts`]) and joins their rows in index
/// order.
pub fn merge(dirs: &[PathBuf]) -> Result<(Part, Tensor)> {
    join_rows(&read_parts(dirs)?)
}

/// What a shard about to run finds in its `--out` folder `dir`: `Some(manifest)` when its own
/// part (shard `shard`, configuration `config`) is already there and complete — its data
/// present and matching the manifest — so the run can be skipped; `None` when it has to run
/// (no part yet, or its own part is damaged: a note says it is redone).
///
/// Any manifest in `dir` of another configuration or another shard count is an error naming
/// it: one folder holds the parts of one run, and a part is never silently overwritten.
pub fn existing_part(dir: &Path, shard: Shard, config: &[String]) -> Result<Option<PathBuf>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let hash = config_hash(config);
    let mut own = None;
    for p in manifests_in(dir).with_context(|| format!("--out {}", dir.display()))? {
        let part = read_manifest(&p).with_context(|| {
            format!(
                "--out {} holds {} (move it away, or use another --out folder)",
                dir.display(),
                p.display()
            )
        })?;
        if part.config != config || part.config_hash != hash || part.shards != shard.count {
            bail!(
                "--out {}: {} is a part of another run (configuration {} with {} shards; this run is {} with {}): use another --out folder for this run, or delete that run's parts",
                dir.display(),
                p.display(),
                part.config_hash,
                part.shards,
                hash,
                shard.count
            );
        }
        if part.shard == shard.index {
            own = Some((p, part));
        }
    }
    let Some((json, part)) = own else {
        return Ok(None);
    };
    let expected = format!("{}.json", shard.stem());
    if json.file_name().and_then(|n| n.to_str()) != Some(expected.as_str()) {
        bail!(
            "--out {}: {} claims shard {}/{} (expected it in {expected})",
            dir.display(),
            json.display(),
            shard.index,
            shard.count
        );
    }
    let covers = (part.start, part.end) == shard.range(part.total);
    match check_part_data(&json, &part) {
        Ok(()) if covers => Ok(Some(json)),
        Ok(()) => {
            eprintln!(
                "note: {} records rows {}..{} of {}, not shard {}/{}'s: redoing it",
                json.display(),
                part.start,
                part.end,
                part.total,
                shard.index,
                shard.count
            );
            Ok(None)
        }
        Err(e) => {
            eprintln!(
                "note: {} is incomplete or damaged ({e:#}): redoing it",
                json.display()
            );
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_the_indices_into_consecutive_blocks_that_cover_them_once() {
        for total in [1usize, 7, 64, 100] {
            for n in 1..=5 {
                let mut next = 0;
                for i in 0..n {
                    let (s, e) = Shard { index: i, count: n }.range(total);
                    assert_eq!(s, next);
                    next = e;
                }
                assert_eq!(next, total);
            }
        }
        assert_eq!(Shard::parse("2/4").unwrap(), Shard { index: 2, count: 4 });
        for bad in ["4/4", "1", "a/2", "0/0", "-1/3"] {
            let e = Shard::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("--shard {bad}")), "{e}");
        }
    }

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

    fn sample_part(config: &[String], shard: Shard) -> Part {
        let (start, end) = shard.range(6);
        Part {
            config: config.to_vec(),
            config_hash: config_hash(config),
            shard: shard.index,
            shards: shard.count,
            start,
            end,
            total: 6,
            kind: "npy".into(),
            item: vec![2],
            eval: None,
        }
    }

    #[test]
    fn a_shard_finds_its_complete_part_redoes_a_damaged_one_and_refuses_another_runs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let config = vec!["sample".to_string(), "--seed".into(), "1".into()];
        let s = Shard { index: 1, count: 3 };
        assert_eq!(existing_part(&d.join("none"), s, &config).unwrap(), None);
        let rows =
            Tensor::zeros((2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let json = write_part(d, &sample_part(&config, s), &rows).unwrap();
        assert_eq!(existing_part(d, s, &config).unwrap(), Some(json.clone()));
        // Another shard of the same run in the folder: not ours, not an obstacle.
        let other = Shard { index: 0, count: 3 };
        assert_eq!(existing_part(d, other, &config).unwrap(), None);
        // Rows that do not match the manifest: redone, not trusted.
        std::fs::write(json.with_extension("npy"), b"broken").unwrap();
        assert_eq!(existing_part(d, s, &config).unwrap(), None);
        // Another configuration, or another shard count: an error naming the part.
        let foreign = vec!["sample".to_string(), "--seed".into(), "2".into()];
        let e = format!("{:#}", existing_part(d, s, &foreign).unwrap_err());
        assert!(
            e.contains("part-1-of-3.json") && e.contains("another run"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            existing_part(d, Shard { index: 1, count: 4 }, &config).unwrap_err()
        );
        assert!(
            e.contains("part-1-of-3.json") && e.contains("3 shards"),
            "{e}"
        );
    }
}
