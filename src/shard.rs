//! Sharded sampling: `sample --shard I/N` draws only its share of the sample indices and
//! writes a self-describing part; `merge` joins the parts into the output one unsharded run
//! writes, byte for byte.
//!
//! Sample i's start noise and its sampler noise come from stream (seed, i) and its class from
//! its global index, and the CPU network is batch-independent bit for bit, so rows
//! [⌊I·B/N⌋, ⌊(I+1)·B/N⌋) of the run are the same numbers whichever process draws them. A
//! part is `part-I-of-N.npy` (its rows) with `part-I-of-N.json` (a [`Part`]): the shard, its
//! rows, the output kind, and the run's configuration (the command line without `--shard`
//! and `--out`) with a hash of it. [`merge`] refuses parts of two configurations, a missing
//! shard and a duplicated one, naming the part, and writes nothing then.

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

    /// The file stem of this shard's part: `part-I-of-N`.
    pub fn stem(&self) -> String {
        format!("part-{}-of-{}", self.index, self.count)
    }
}

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
    /// `png` (a grid of the whole run) or `npy`.
    pub kind: String,
    /// The shape of one sample (e.g. [1, 28, 28], or [64] for a problem).
    pub item: Vec<usize>,
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

/// The command line without `--shard X` / `--shard=X` and `--out X` / `--out=X`.
pub fn config_of(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if a == "--shard" || a == "--out" {
            skip = true;
            continue;
        }
        if a.starts_with("--shard=") || a.starts_with("--out=") {
            continue;
        }
        out.push(a.clone());
    }
    out
}

/// Writes one shard's part into the folder `dir` (created if needed): its rows as
/// `part-I-of-N.npy`, then the manifest (both atomically; the manifest last, so a part with
/// a manifest is complete).
pub fn write_part(dir: &Path, part: &Part, rows: &Tensor) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--out {}: cannot create the folder", dir.display()))?;
    let stem = Shard {
        index: part.shard,
        count: part.shards,
    }
    .stem();
    crate::io::write_npy(&dir.join(format!("{stem}.npy")), rows)?;
    let json = dir.join(format!("{stem}.json"));
    crate::io::write_atomic(&json, serde_json::to_string_pretty(part)?.as_bytes())?;
    Ok(json)
}

/// Reads every `part-*.json` under the folders `dirs`, checks that they share one
/// configuration and cover shards 0..N exactly once, and joins their rows in index order.
pub fn merge(dirs: &[PathBuf]) -> Result<(Part, Tensor)> {
    let mut parts: Vec<(PathBuf, Part)> = Vec::new();
    for d in dirs {
        let entries =
            std::fs::read_dir(d).with_context(|| format!("merge: cannot read {}", d.display()))?;
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
        for p in names {
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("merge: cannot read {}", p.display()))?;
            let part: Part = serde_json::from_str(&text)
                .with_context(|| format!("merge: {} is not a shard manifest", p.display()))?;
            parts.push((p, part));
        }
    }
    let Some((first_path, first)) = parts.first().cloned() else {
        bail!("merge: no part-*.json in {dirs:?}");
    };
    let mut seen: Vec<Option<PathBuf>> = vec![None; first.shards];
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
        let want = Shard {
            index: part.shard,
            count: part.shards,
        };
        if part.shard >= part.shards || (part.start, part.end) != want.range(part.total) {
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
        if let Some(other) = &seen[part.shard] {
            bail!(
                "merge: shard {}/{} twice: {} and {}",
                part.shard,
                part.shards,
                other.display(),
                p.display()
            );
        }
        seen[part.shard] = Some(p.clone());
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
    let mut rows = Vec::with_capacity(first.shards);
    for json in seen.into_iter().flatten() {
        let npy = json.with_extension("npy");
        let mut want = vec![None];
        want.extend(first.item.iter().map(|&d| Some(d)));
        let t = crate::io::read_npy(&npy, &want)
            .with_context(|| format!("merge: the rows of {}", json.display()))?;
        rows.push(t);
    }
    let all = Tensor::cat(&rows, 0)?;
    if all.dim(0)? != first.total {
        bail!(
            "merge: the parts hold {} rows, their manifests say {}",
            all.dim(0)?,
            first.total
        );
    }
    Ok((first, all))
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
}
