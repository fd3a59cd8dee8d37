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
//! per-sample features, bench's per-sample end points: those commands read and write their
//! own data, and an eval part's manifest carries eval's own section, [`Part::eval`]). Both are
//! written atomically, the manifest last, so a part with a manifest is complete and a killed
//! shard leaves none. This module knows no command: `sample`, `eval` and `bench` use it.
//!
//! [`read_parts`] refuses parts of two configurations, a missing shard and a duplicated one,
//! naming the part; [`existing_part`] lets a re-run shard find its finished part and skip
//! the work (and refuses a folder holding another run's parts).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Tensor;
use qtaylor_core::keys::{self, Key};
use qtaylor_core::{bail_option, option_error};
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
            _ => bail_option!((keys::SHARD, s), ": expected I/N with 0 <= I < N, e.g. 0/4"),
        }
    }

    /// The sample indices [start, end) of this shard of `total` samples.
    pub fn range(&self, total: usize) -> (usize, usize) {
        (
            self.index * total / self.count,
            (self.index + 1) * total / self.count,
        )
    }

    /// [`Shard::range`] of `total` samples (the value of the option `key`, e.g. `batch`),
    /// refused when it is empty.
    pub fn rows(&self, total: usize, key: Key) -> Result<(usize, usize)> {
        let (start, end) = self.range(total);
        if start == end {
            bail_option!(
                (keys::SHARD, format!("{}/{}", self.index, self.count)),
                ": no samples in it (",
                (key, total),
                " is split into more shards than samples)"
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

/// What a part records about itself (`part-I-of-N.json`). `E` is the type of an eval part's
/// own section ([`Part::eval`]): eval writes its own type, and readers that do not look into
/// it (merge, a shard checking its folder) read it as JSON.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Part<E = serde_json::Value> {
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
    /// also describes them).
    pub kind: String,
    /// The shape of one sample (e.g. [1, 28, 28], or [64] for a problem).
    pub item: Vec<usize>,
    /// `eval` parts: the rows of the run and this shard's outcome of each (eval's own
    /// section, in eval's own type `E`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<E>,
}

impl<E> Part<E> {
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
    std::fs::create_dir_all(dir).map_err(|e| {
        option_error!(
            (keys::OUT, dir.display().to_string()),
            ": cannot create the folder"
        )
        .caused_by(e.into())
    })
}

/// Writes the manifest `part-I-of-N.json` into `dir` atomically (after the part's data) and
/// returns its path.
pub fn write_manifest<E: Serialize>(dir: &Path, part: &Part<E>) -> Result<PathBuf> {
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

/// How a command checks that the data of its part `json` is there and matches the manifest
/// (`sample`: [`check_rows`]; eval and bench read their own part data).
pub type CheckData<'a> = &'a dyn Fn(&Path, &Part) -> Result<()>;

/// Checks that the rows of the `sample` part `json` are there and match its manifest.
pub fn check_rows(json: &Path, part: &Part) -> Result<()> {
    read_rows(json, part).map(|_| ())
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
/// present and matching the manifest (`check`) — so the run can be skipped; `None` when it has to run
/// (no part yet, or its own part is damaged: a note says it is redone).
///
/// Any manifest in `dir` of another configuration or another shard count is an error naming
/// it: one folder holds the parts of one run, and a part is never silently overwritten.
pub fn existing_part(
    dir: &Path,
    shard: Shard,
    config: &[String],
    check: CheckData,
) -> Result<Option<PathBuf>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    let hash = config_hash(config);
    let mut own = None;
    let out = (keys::OUT, dir.display().to_string());
    let manifests = manifests_in(dir).map_err(|e| option_error!(out.clone()).caused_by(e))?;
    for p in manifests {
        let part = read_manifest(&p).map_err(|e| {
            option_error!(
                out.clone(),
                format!(" holds {} (move it away, or use another ", p.display()),
                keys::OUT,
                " folder)"
            )
            .caused_by(e)
        })?;
        if part.config != config || part.config_hash != hash || part.shards != shard.count {
            bail_option!(
                out.clone(),
                format!(
                    ": {} is a part of another run (configuration {} with {} shards; this run is {} with {}): use another ",
                    p.display(),
                    part.config_hash,
                    part.shards,
                    hash,
                    shard.count
                ),
                keys::OUT,
                " folder for this run, or delete that run's parts"
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
        bail_option!(
            out,
            format!(
                ": {} claims shard {}/{} (expected it in {expected})",
                json.display(),
                shard.index,
                shard.count
            )
        );
    }
    let covers = (part.start, part.end) == shard.range(part.total);
    match check(&json, &part) {
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
            assert!(e.contains(&format!("shard={bad}")), "{e}");
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
        assert_eq!(
            existing_part(&d.join("none"), s, &config, &check_rows).unwrap(),
            None
        );
        let rows =
            Tensor::zeros((2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let json = write_part(d, &sample_part(&config, s), &rows).unwrap();
        assert_eq!(
            existing_part(d, s, &config, &check_rows).unwrap(),
            Some(json.clone())
        );
        // Another shard of the same run in the folder: not ours, not an obstacle.
        let other = Shard { index: 0, count: 3 };
        assert_eq!(existing_part(d, other, &config, &check_rows).unwrap(), None);
        // Rows that do not match the manifest: redone, not trusted.
        std::fs::write(json.with_extension("npy"), b"broken").unwrap();
        assert_eq!(existing_part(d, s, &config, &check_rows).unwrap(), None);
        // Another configuration, or another shard count: an error naming the part.
        let foreign = vec!["sample".to_string(), "--seed".into(), "2".into()];
        let e = format!(
            "{:#}",
            existing_part(d, s, &foreign, &check_rows).unwrap_err()
        );
        assert!(
            e.contains("part-1-of-3.json") && e.contains("another run"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            existing_part(d, Shard { index: 1, count: 4 }, &config, &check_rows).unwrap_err()
        );
        assert!(
            e.contains("part-1-of-3.json") && e.contains("3 shards"),
            "{e}"
        );
    }
}
