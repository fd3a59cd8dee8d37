//! Grid files: a tuned time grid with what it was tuned for (`qtaylor tune --out
//! grid.json`; read by `sample`, `bench`, `eval --grid-file` and by the Python
//! scheduler's `set_timesteps(timesteps=...)` / `sigmas=`).
//!
//! ```json
//! {"format": "qtaylor-grid", "version": 1, "sampler": "qt-3", "nfe": 10, "steps": 10,
//!  "schedule": "discrete", "model": "assets/mnist-unet",
//!  "times": [1.0, …, 0.0],          // schedule times t_0 > … > t_N (0: x̂0)
//!  "timesteps": [999.0, …],          // the network's time of every t > 0 (diffusers timesteps)
//!  "sigmas": [157.4, …, 0.0],        // σ/α of every time (diffusers' sigmas; flow: ς)
//!  "tuning": {…}}                    // how it was found (teacher, samples, errors, seconds)
//! ```
//!
//! `times` is what qtaylor reads; `timesteps` and `sigmas` are derived from it for other
//! tools. A file is refused, naming the file and the fault, when it is not this format,
//! when the times do not decrease strictly, leave the schedule's domain or do not match
//! `steps`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::sampling::samplers::check_grid;
use crate::schedule::Schedule;

pub const FORMAT: &str = "qtaylor-grid";

/// A grid file's contents.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GridFile {
    pub format: String,
    pub version: u32,
    pub sampler: String,
    pub nfe: usize,
    pub steps: usize,
    pub schedule: String,
    pub model: String,
    pub times: Vec<f64>,
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f64>,
    #[serde(default)]
    pub tuning: serde_json::Value,
}

impl GridFile {
    /// A grid file for `times` on `schedule`.
    pub fn new(
        sampler: &str,
        nfe: usize,
        schedule: &dyn Schedule,
        model: &str,
        times: Vec<f64>,
        tuning: serde_json::Value,
    ) -> GridFile {
        let timesteps = times
            .iter()
            .filter(|&&t| t > 0.0)
            .map(|&t| schedule.network_time(t))
            .collect();
        let sigmas = times
            .iter()
            .map(|&t| if t > 0.0 { schedule.level(t) } else { 0.0 })
            .collect();
        GridFile {
            format: FORMAT.into(),
            version: 1,
            sampler: sampler.into(),
            nfe,
            steps: times.len() - 1,
            schedule: schedule.name(),
            model: model.into(),
            times,
            timesteps,
            sigmas,
            tuning,
        }
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::io::write_atomic(path, format!("{text}\n").as_bytes())
    }

    /// Reads and validates a grid file against `schedule`.
    pub fn read(path: &Path, schedule: &dyn Schedule) -> Result<GridFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("grid file {}: cannot read it", path.display()))?;
        Self::parse(&text, schedule)
            .map_err(|e| anyhow::anyhow!("grid file {}: {e:#}", path.display()))
    }

    /// Parses and validates a grid file's text (see [`GridFile::read`]).
    pub fn parse(text: &str, schedule: &dyn Schedule) -> Result<GridFile> {
        let g: GridFile = serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "not a qtaylor grid file ({e}); expected the JSON that `qtaylor tune --out` writes"
            )
        })?;
        if g.format != FORMAT || g.version != 1 {
            bail!(
                "key 'format' is '{}' version {}; expected '{FORMAT}' version 1",
                g.format,
                g.version
            );
        }
        if g.times.len() != g.steps.saturating_add(1) {
            bail!(
                "key 'times' has {} entries but 'steps' is {}; expected steps + 1 times",
                g.times.len(),
                g.steps
            );
        }
        check_grid(schedule, &g.times).map_err(|e| anyhow::anyhow!("key 'times': {e}"))?;
        Ok(g)
    }

    /// Warnings for using the grid with another sampler, NFE, schedule or model.
    pub fn mismatches(
        &self,
        sampler: &str,
        nfe: Option<usize>,
        schedule: &dyn Schedule,
        model: &str,
    ) -> Vec<String> {
        let mut w = Vec::new();
        if self.sampler != sampler {
            w.push(format!(
                "it was tuned for sampler {}, not {sampler}",
                self.sampler
            ));
        }
        if let Some(n) = nfe
            && n != self.nfe
        {
            w.push(format!(
                "it was tuned for {} NFE, this run uses {n}",
                self.nfe
            ));
        }
        if self.schedule != schedule.name() {
            w.push(format!(
                "it was tuned on schedule {}, not {}",
                self.schedule,
                schedule.name()
            ));
        }
        if self.model != model {
            w.push(format!(
                "it was tuned for model {}, not {model}",
                self.model
            ));
        }
        w
    }
}
