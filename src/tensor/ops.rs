//! Fused tensor updates. Every sampler step ends in one linear combination
//! `Σ_k c_k · x_k` of same-shaped tensors with f64 coefficients; per-sample coefficients
//! (one per row of the batch) are allowed for adaptive solvers with per-sample times.
//!
//! On the CPU the combination is one pass over memory (blocked, vectorised); other devices
//! use candle's element-wise ops. Coefficients are f64 scalars, rounded to the tensors'
//! dtype when applied.

use anyhow::{Result, bail};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor, WithDType};

pub use qtaylor_core::exec::Coef;

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
    let coefs: Vec<&Coef> = terms.iter().map(|(c, _)| c).collect();
    // With only batch-wide coefficients the whole tensor is one "row".
    let rows = if coefs.iter().all(|c| matches!(c, Coef::All(_))) {
        1
    } else {
        rows.max(1)
    };
    if terms.len() > 8 {
        // Rare: fold longer combinations eight terms at a time.
        drop(slices);
        drop(guards);
        let (head, tail) = terms.split_at(8);
        let partial = lincomb_rows(head)?;
        let mut rest = vec![(Coef::All(1.0), &partial)];
        rest.extend(tail.iter().map(|(c, t)| (c.clone(), *t)));
        return lincomb_rows(&rest);
    }
    let out = kernel::<T>(&coefs, &slices, rows, n / rows);
    Ok(Tensor::from_vec(out, first.shape(), &Device::Cpu)?)
}

/// `out = Σ_k c_k(row) · x_k` in blocks that stay in cache: the first pass combines two
/// terms while writing the block, further terms accumulate into it; every inner loop is a
/// plain zip the compiler vectorises. The f64 coefficients are rounded to the tensors'
/// dtype (as a PyTorch `a * x + b * y` with Python floats would do).
fn kernel<T: WithDType>(coefs: &[&Coef], slices: &[&[T]], rows: usize, per_row: usize) -> Vec<T> {
    const BLOCK: usize = 4096;
    let mut out: Vec<T> = Vec::with_capacity(rows * per_row);
    let mut c: Vec<T> = Vec::with_capacity(coefs.len());
    for r in 0..rows {
        c.clear();
        c.extend(coefs.iter().map(|k| T::from_f64(k.at(r))));
        let row_start = r * per_row;
        let mut lo = 0;
        while lo < per_row {
            let (a, b) = (row_start + lo, row_start + (lo + BLOCK).min(per_row));
            let start = out.len();
            let c0 = c[0];
            match slices.get(1) {
                None => out.extend(slices[0][a..b].iter().map(|&x| c0 * x)),
                Some(s1) => {
                    let c1 = c[1];
                    out.extend(
                        slices[0][a..b]
                            .iter()
                            .zip(&s1[a..b])
                            .map(|(&x, &y)| c0 * x + c1 * y),
                    )
                }
            }
            for (s, &ck) in slices.iter().zip(&c).skip(2) {
                for (o, &x) in out[start..].iter_mut().zip(&s[a..b]) {
                    *o += ck * x;
                }
            }
            lo += BLOCK;
        }
    }
    out
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
    let s = sum_f64(t)?.to_scalar::<f64>()?;
    Ok(s.is_finite())
}

/// The sum of all elements in f64, as a scalar tensor on `t`'s device: finite exactly when
/// every element is (a NaN or ±Inf anywhere makes it non-finite; finite f32/f16/bf16 values
/// cannot overflow an f64 sum). Reduced in two stages, per row of the first dimension and
/// then over the row sums, because candle reduces a whole tensor on CUDA with a single
/// thread block (BENCHMARKS.md §4.2: the sampler's finiteness checks).
pub fn sum_f64(t: &Tensor) -> Result<Tensor> {
    let t = t.to_dtype(DType::F64)?;
    Ok(if t.rank() >= 2 {
        t.flatten_from(1)?.sum(1)?.sum_all()?
    } else {
        t.sum_all()?
    })
}

/// `max |a − b|` over all elements, computed in f64 (exact for f32/f16/bf16 inputs; for
/// tests and parity checks).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?)
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
        let d = max_abs_diff(&z, &want).unwrap();
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
    fn the_generic_path_used_off_the_cpu_agrees_with_the_fused_one() {
        // f16 tensors take the candle-ops path (the one CUDA tensors take).
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 12f32, &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let y = (x.sqr().unwrap() * 0.1).unwrap();
        let terms = |a: &Tensor, b: &Tensor| {
            lincomb_rows(&[(Coef::Rows(vec![1.0, -2.0, 0.5]), a), (Coef::All(0.25), b)]).unwrap()
        };
        let fused = rows_f64(&terms(&x, &y)).unwrap();
        let generic = rows_f64(&terms(
            &x.to_dtype(DType::F16).unwrap(),
            &y.to_dtype(DType::F16).unwrap(),
        ))
        .unwrap();
        for (a, b) in fused.iter().flatten().zip(generic.iter().flatten()) {
            assert!((a - b).abs() <= 1e-2 * (1.0 + a.abs()), "{a} vs {b}");
        }
        let h = Tensor::new(&[1.0f32, f32::INFINITY], &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        assert!(!all_finite(&h).unwrap());
    }

    #[test]
    fn non_finite_values_are_detected() {
        let t = Tensor::new(&[1.0f32, f32::NAN], &Device::Cpu).unwrap();
        assert!(!all_finite(&t).unwrap());
        let t = Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
        assert!(all_finite(&t).unwrap());
    }

    #[test]
    fn two_stage_f64_sum_equals_the_sum_and_flags_any_nan_or_inf() {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..2 * 3 * 4 * 5)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let want: f64 = v.iter().map(|&x| x as f64).sum();
        let t = Tensor::from_vec(v.clone(), (2, 3, 4, 5), &dev).unwrap();
        let got = sum_f64(&t).unwrap().to_scalar::<f64>().unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // f32::MAX everywhere overflows an f32 sum, not the f64 one.
        let big = Tensor::full(f32::MAX, (4, 8), &dev).unwrap();
        assert!(
            sum_f64(&big)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                .is_finite()
        );
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut w = v.clone();
            w[77] = bad;
            let t = Tensor::from_vec(w, (2, 3, 4, 5), &dev).unwrap();
            assert!(!sum_f64(&t).unwrap().to_scalar::<f64>().unwrap().is_finite());
            let t = t.to_dtype(DType::BF16).unwrap();
            assert!(!sum_f64(&t).unwrap().to_scalar::<f64>().unwrap().is_finite());
        }
    }
}
