//! Fused tensor updates. Every sampler step ends in one linear combination
//! `Σ_k c_k · x_k` of same-shaped tensors with f64 coefficients; per-sample coefficients
//! (one per row of the batch) are allowed for adaptive solvers with per-sample times.
//!
//! On the CPU the combination is a single pass over memory, accumulated in f64 and
//! rounded once to the tensors' dtype. Other devices use candle's element-wise ops.

use anyhow::{Result, bail};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor, WithDType};

/// A coefficient: one value for the whole batch, or one per row (sample).
#[derive(Clone, Debug)]
pub enum Coef {
    All(f64),
    Rows(Vec<f64>),
}

impl Coef {
    fn at(&self, row: usize) -> f64 {
        match self {
            Coef::All(c) => *c,
            Coef::Rows(v) => v[row],
        }
    }
}

impl From<f64> for Coef {
    fn from(c: f64) -> Self {
        Coef::All(c)
    }
}

/// `Σ_k c_k x_k` for scalar coefficients.
pub fn lincomb(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let terms: Vec<(Coef, &Tensor)> = terms.iter().map(|&(c, t)| (Coef::All(c), t)).collect();
    lincomb_rows(&terms)
}

/// `Σ_k c_k x_k`, where a coefficient may differ per row (first dimension).
pub fn lincomb_rows(terms: &[(Coef, &Tensor)]) -> Result<Tensor> {
    let Some(&(_, first)) = terms.first() else {
        bail!("lincomb of zero terms");
    };
    let rows = first.dims().first().copied().unwrap_or(1);
    for (c, t) in terms {
        if t.shape() != first.shape() || t.dtype() != first.dtype() {
            bail!(
                "lincomb: shape/dtype mismatch {:?} {:?} vs {:?} {:?}",
                t.shape(),
                t.dtype(),
                first.shape(),
                first.dtype()
            );
        }
        if let Coef::Rows(v) = c
            && v.len() != rows
        {
            bail!("lincomb: {} row coefficients for {rows} rows", v.len());
        }
    }
    if matches!(first.device(), Device::Cpu) {
        match first.dtype() {
            DType::F32 => return cpu_lincomb::<f32>(terms, rows),
            DType::F64 => return cpu_lincomb::<f64>(terms, rows),
            _ => {}
        }
    }
    // Generic path: per-row coefficient tensors broadcast along the row.
    let mut acc: Option<Tensor> = None;
    for (c, t) in terms {
        let term = match c {
            Coef::All(c) => t.affine(*c, 0.0)?,
            Coef::Rows(v) => t.broadcast_mul(&row_tensor(v, t)?)?,
        };
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    Ok(acc.expect("at least one term"))
}

/// A tensor of shape `(B, 1, …, 1)` holding one value per row, in `like`'s dtype and device.
pub fn row_tensor(values: &[f64], like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![values.len()];
    shape.extend(std::iter::repeat_n(1, like.rank().saturating_sub(1)));
    Ok(Tensor::from_slice(values, shape, like.device())?.to_dtype(like.dtype())?)
}

fn cpu_lincomb<T: WithDType>(terms: &[(Coef, &Tensor)], rows: usize) -> Result<Tensor> {
    let first = terms[0].1;
    let n = first.elem_count();
    let per_row = n / rows.max(1);
    let guards: Vec<_> = terms.iter().map(|(_, t)| t.storage_and_layout()).collect();
    let mut slices: Vec<&[T]> = Vec::with_capacity(terms.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            bail!("cpu_lincomb on a non-CPU tensor")
        };
        let data = cpu_slice::<T>(cpu)?;
        match layout.contiguous_offsets() {
            Some((a, b)) => slices.push(&data[a..b]),
            None => {
                drop(slices);
                drop(guards);
                return lincomb_rows_contiguous(terms);
            }
        }
    }
    let mut out = vec![T::from_f64(0.0); n];
    for r in 0..rows.max(1) {
        let coefs: Vec<f64> = terms.iter().map(|(c, _)| c.at(r)).collect();
        let range = r * per_row..(r + 1) * per_row;
        for j in range {
            let mut acc = 0.0f64;
            for (c, s) in coefs.iter().zip(&slices) {
                acc += c * s[j].to_f64();
            }
            out[j] = T::from_f64(acc);
        }
    }
    Ok(Tensor::from_vec(out, first.shape(), &Device::Cpu)?)
}

/// Falls back for strided inputs: make them contiguous, then combine.
fn lincomb_rows_contiguous(terms: &[(Coef, &Tensor)]) -> Result<Tensor> {
    let owned: Vec<Tensor> = terms
        .iter()
        .map(|(_, t)| t.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let terms: Vec<(Coef, &Tensor)> = terms
        .iter()
        .zip(&owned)
        .map(|((c, _), t)| (c.clone(), t))
        .collect();
    lincomb_rows(&terms)
}

fn cpu_slice<T: WithDType>(cpu: &CpuStorage) -> Result<&[T]> {
    Ok(cpu.as_slice::<T>()?)
}

/// True when every element is finite. One pass on the CPU; elsewhere a sum in f64
/// (NaN or ±Inf anywhere makes the sum non-finite).
pub fn all_finite(t: &Tensor) -> Result<bool> {
    if matches!(t.device(), Device::Cpu) {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            match t.dtype() {
                DType::F32 => {
                    return Ok(cpu_slice::<f32>(cpu)?[a..b].iter().all(|v| v.is_finite()));
                }
                DType::F64 => {
                    return Ok(cpu_slice::<f64>(cpu)?[a..b].iter().all(|v| v.is_finite()));
                }
                _ => {}
            }
        }
    }
    let s = t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    Ok(s.is_finite())
}

/// Row-wise values of a `(B, …)` tensor as f64 vectors (for metrics and tests).
pub fn rows_f64(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    let b = t.dims().first().copied().unwrap_or(1);
    Ok(t.to_dtype(DType::F64)?.reshape((b, ()))?.to_vec2::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_lincomb_equals_candle_arithmetic() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 12f32, &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let y = (x.sqr().unwrap() * 0.1).unwrap();
        let z = lincomb(&[(2.0, &x), (-0.5, &y)]).unwrap();
        let want = ((&x * 2.0).unwrap() - (&y * 0.5).unwrap()).unwrap();
        let d = (z - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5);
        let r = lincomb_rows(&[(Coef::Rows(vec![1.0, 2.0, 3.0]), &x)]).unwrap();
        let rows = rows_f64(&r).unwrap();
        assert_eq!(rows[2][1], 27.0);
        // strided input takes the contiguous fallback
        let xt = x.t().unwrap();
        let s = lincomb(&[(1.0, &xt), (1.0, &xt)]).unwrap();
        assert_eq!(rows_f64(&s).unwrap()[1][0], 2.0);
    }

    #[test]
    fn non_finite_values_are_detected() {
        let t = Tensor::new(&[1.0f32, f32::NAN], &Device::Cpu).unwrap();
        assert!(!all_finite(&t).unwrap());
        let t = Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
        assert!(all_finite(&t).unwrap());
    }
}
