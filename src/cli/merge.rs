//! `qtaylor merge`: the parts of a sharded `sample`, `eval` or `bench` joined into the output
//! the unsharded run writes.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;

#[derive(Args)]
pub struct MergeArgs {
    /// Folders holding part-I-of-N.json files (with their .npy or .safetensors data)
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// The merged output: sample parts: .npy, or .png for a model's run (a grid of all
    /// samples); eval and bench parts: the results folder (results.json, results.csv,
    /// report.md, ...)
    #[arg(long)]
    pub out: PathBuf,
}

pub fn cmd(a: &MergeArgs) -> Result<()> {
    merge(&a.dirs, &a.out)
}

/// Merges the parts under `dirs` into `out`: the unsharded run's output.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<()> {
    let parts = qtaylor::shard::read_parts(dirs)?;
    let part = parts[0].1.clone();
    let results = [qtaylor::shard::EVAL_KIND, qtaylor::shard::BENCH_KIND];
    if results.contains(&part.kind.as_str()) {
        let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
        if out.is_file() || ["npy", "png"].iter().any(|e| ext.eq_ignore_ascii_case(e)) {
            bail!(
                "--out {}: the parts are of `{}` (configuration {}): --out is the results folder, not a file",
                out.display(),
                part.kind,
                part.config_hash
            );
        }
    }
    if part.kind == qtaylor::shard::BENCH_KIND {
        let report = qtaylor::measure::bench::merge_parts(&parts)?;
        report.write(out)?;
        println!("{}", report.markdown());
        eprintln!(
            "merged {} bench shards ({} samples, configuration {}) -> {}",
            part.shards,
            part.total,
            part.config_hash,
            out.display()
        );
        return Ok(());
    }
    if part.kind == qtaylor::shard::EVAL_KIND {
        let report = qtaylor::measure::eval::merge_parts(&parts, out)?;
        println!("{}", qtaylor::measure::eval::markdown(&report));
        eprintln!(
            "merged {} eval shards ({} samples per row, configuration {}) -> {}",
            part.shards,
            part.total,
            part.config_hash,
            out.display()
        );
        return Ok(());
    }
    qtaylor::io::check_out_dir(qtaylor::keys::OUT, out)?;
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !ext.eq_ignore_ascii_case(&part.kind) {
        bail!(
            "--out {}: the parts are of a run whose output is .{} (configuration {})",
            out.display(),
            part.kind,
            part.config_hash
        );
    }
    let (part, rows) = qtaylor::shard::join_rows(&parts)?;
    if part.kind == "png" {
        qtaylor::io::write_png_grid(out, &rows)?;
    } else {
        qtaylor::io::write_npy(out, &rows)?;
    }
    eprintln!(
        "merged {} shards ({} samples, configuration {}) -> {}",
        part.shards,
        part.total,
        part.config_hash,
        out.display()
    );
    Ok(())
}
