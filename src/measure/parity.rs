//! `parity`: a fixture model's outputs against the diffusers reference stored next to it.

use std::path::Path;

use anyhow::Result;
use candle_core::DType;

use crate::bail_option;
use crate::keys;
use crate::models::checkpoint::DiffusersModel;
use crate::sampling::spec::model_dtype;

/// Compares the outputs of the fixture model in `dir` (its `unet/` and `scheduler/`) on
/// `device` in `dtype` with the diffusers reference stored next to it
/// (`reference.safetensors`, written by scripts/make-parity-fixtures.py).
pub fn run(dir: &Path, device_name: &str, dtype_name: &str) -> Result<Parity> {
    let mut out = Vec::new();
    let device = crate::gpu::device::by_name(device_name)?;
    let m = DiffusersModel::load(dir, model_dtype(dtype_name)?, &device)?;
    let file = dir.join("reference.safetensors");
    let r = candle_core::safetensors::load(&file, &device)
        .map_err(|e| anyhow::anyhow!("{}: cannot read the reference ({e})", file.display()))?;
    let get = |k: &str| {
        r.get(k)
            .ok_or_else(|| anyhow::anyhow!("{}: tensor '{k}' is missing", file.display()))
    };
    let x = get("x")?;
    // A class-conditional model: the plain outputs are at the null class (the last), and
    // `out_labels` is at t = [3, 999] with the reference's `labels`.
    let null = m.unet.num_classes().map(|k| vec![k as u32 - 1]);
    type Case<'a> = (&'a str, Vec<f64>, Option<Vec<u32>>);
    let mut cases: Vec<Case> = vec![
        ("out", vec![3.0, 999.0], null.clone()),
        ("out_t500", vec![500.0], null.clone()),
        ("out_t37_5", vec![37.5], null.clone()),
    ];
    if null.is_some() {
        let labels = get("labels")?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        cases.push((
            "out_labels",
            vec![3.0, 999.0],
            Some(labels.iter().map(|&l| l as u32).collect()),
        ));
    }
    let mut worst = 0.0f64;
    for (key, t, labels) in cases {
        let want = get(key)?.to_dtype(DType::F64)?;
        let got = m
            .unet
            .forward_labels(x, &t, labels.as_deref())?
            .to_dtype(DType::F64)?;
        let d = (got - &want)?.abs()?.max_all()?.to_scalar::<f64>()?;
        let e = d / want.abs()?.max_all()?.to_scalar::<f64>()?;
        out.push(format!(
            "{} {key} on {device_name} ({dtype_name}): max relative error {e:.2e}",
            dir.display()
        ));
        worst = worst.max(e);
    }
    Ok(Parity { lines: out, worst })
}

/// The outcome of [`run`]: one line per case, and the largest relative error.
pub struct Parity {
    pub lines: Vec<String>,
    pub worst: f64,
}

impl Parity {
    /// An error when the largest relative error exceeds `tol`.
    pub fn check(&self, tol: f64) -> Result<()> {
        if self.worst > tol {
            bail_option!(
                format!("max relative error {:.2e} exceeds ", self.worst),
                (keys::TOL, format!("{tol:.1e}"))
            );
        }
        Ok(())
    }
}
