//! `qtaylor bench`: its flags, parsed into [`qtaylor::measure::bench::BenchSettings`].

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;

use qtaylor::bail_option;
use qtaylor::keys;
use qtaylor::measure::bench::{self, BenchDone, BenchSettings};

use super::args::{Common, command_line};
use super::shards;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub common: Common,
    /// Comma-separated sampler names
    #[arg(
        long,
        default_value = "qt-1,qt-2,qt-3,qt-4,ddim,euler,heun,rk4,rk45,qit-1,qit-2,qit-inf,ddpm,em"
    )]
    pub samplers: String,
    /// Comma-separated NFE budgets
    /// A grid file written by `qtaylor tune`: every sampler runs on its times (budgets that
    /// its NFE on that grid exceeds are skipped)
    #[arg(long)]
    pub grid_file: Option<PathBuf>,
    #[arg(long, default_value = "5,10,20,50")]
    pub nfe: String,
    /// Number of samples
    #[arg(long, default_value_t = 1024)]
    pub batch: usize,
    /// f32 | f64 (of the samplers' state; the reference is always f64)
    #[arg(long, default_value = "f64")]
    pub dtype: String,
    /// rtol = atol of the reference solution
    #[arg(long, default_value_t = 1e-9)]
    pub ref_tol: f64,
    /// Output folder (results.csv, results.json, report.md, error_vs_nfe.png); with --shard
    /// the folder of the parts
    #[arg(long)]
    pub out: PathBuf,
    /// Run every cell on shard I of N (0-based) of the --batch samples only, the consecutive
    /// rows ⌊I·B/N⌋..⌊(I+1)·B/N⌋, and write their per-sample end points as a part into the
    /// folder --out; `qtaylor merge` computes the unsharded run's results from the parts. A
    /// complete part of this configuration already in --out is not redone
    #[arg(long)]
    pub shard: Option<String>,
    /// Run one shard per device at once (child processes), e.g. cuda:0,cuda:1, and merge them
    /// into the results folder --out (instead of --device)
    #[arg(long)]
    pub devices: Option<String>,
}

pub fn cmd(a: &BenchArgs) -> Result<()> {
    if a.out.is_file() {
        bail_option!(
            (keys::OUT, a.out.display().to_string()),
            ": bench writes a results folder",
            if a.shard.is_some() {
                " (with --shard: the folder of the parts)"
            } else {
                ""
            },
            ", not a file"
        );
    }
    if let Some(d) = &a.devices {
        return shards::run_on_devices(d, &a.out);
    }
    let shard = shards::parse(a.shard.as_deref())?;
    if let Some(s) = shard {
        s.rows(a.batch, keys::BATCH)?;
        let check = |j: &Path, p: &qtaylor::shard::Part| {
            qtaylor::measure::bench::read_part_data(j, p).map(|_| ())
        };
        if shards::finished(&a.out, s, &check)? {
            return Ok(());
        }
    }
    let mut run = a.common.settings();
    run.grid_file = a.grid_file.clone();
    let settings = BenchSettings {
        run,
        samplers: a.samplers.clone(),
        nfe: a.nfe.clone(),
        batch: a.batch,
        dtype: a.dtype.clone(),
        ref_tol: a.ref_tol,
        out: a.out.clone(),
        shard: shard.map(|s| (s, shards::config_of(&command_line()))),
    };
    match bench::run(&settings, &mut |w| eprintln!("warning: {w}"))? {
        BenchDone::Report { markdown, summary } => {
            println!("{markdown}");
            eprintln!("{summary}");
        }
        BenchDone::Part { summary } => eprintln!("{summary}"),
    }
    Ok(())
}
