//! Softmax of scaled attention scores, in place, in f32 whatever the dtype.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor, WithDType};

/// `x ← softmax(scale·x)` along the last dimension, in place on a fresh contiguous tensor:
/// maximum, sum of exponentials and the normalized values in f32 whatever the dtype (one
/// warp per row on CUDA). Candle's softmax keeps the exponentials in the tensor's dtype and
/// needs a separate pass for the scale. `x` must not share its storage with another tensor.
pub fn softmax_last_dim_inplace(x: &Tensor, scale: f64) -> Result<()> {
    x.inplace_op1(&SoftmaxOp {
        scale: scale as f32,
    })
}

struct SoftmaxOp {
    scale: f32,
}

fn softmax_cpu<T: WithDType>(x: &mut [T], n: usize, scale: f32) {
    for row in x.chunks_mut(n) {
        let m = row
            .iter()
            .fold(f32::NEG_INFINITY, |m, v| m.max(v.to_f64() as f32));
        let s: f32 = row
            .iter()
            .map(|v| ((v.to_f64() as f32 - m) * scale).exp())
            .sum();
        for v in row.iter_mut() {
            *v = T::from_f64((((v.to_f64() as f32 - m) * scale).exp() / s) as f64);
        }
    }
}

impl candle_core::InplaceOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "softmax-inplace"
    }

    fn cpu_fwd(&self, x: &mut CpuStorage, l: &Layout) -> Result<()> {
        let n = *l.dims().last().unwrap_or(&1);
        let Some((a, z)) = l.contiguous_offsets() else {
            candle_core::bail!("softmax-inplace: non-contiguous input {:?}", l.dims());
        };
        match x {
            CpuStorage::F32(v) => softmax_cpu(&mut v[a..z], n, self.scale),
            CpuStorage::F64(v) => softmax_cpu(&mut v[a..z], n, self.scale),
            CpuStorage::F16(v) => softmax_cpu(&mut v[a..z], n, self.scale),
            CpuStorage::BF16(v) => softmax_cpu(&mut v[a..z], n, self.scale),
            _ => candle_core::bail!("softmax-inplace: dtype {:?} is not supported", x.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, x: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        let n = *l.dims().last().unwrap_or(&1);
        if !l.is_contiguous() || n == 0 {
            candle_core::bail!(
                "softmax-inplace: non-contiguous or empty input {:?}",
                l.dims()
            );
        }
        super::cuda::softmax((x, l), n, self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn in_place_softmax_equals_candles_softmax_of_the_scaled_scores() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (2, 5, 7), &dev).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&(&x * 0.25).unwrap()).unwrap();
        let got = x.copy().unwrap();
        softmax_last_dim_inplace(&got, 0.25).unwrap();
        let d = crate::tensor::ops::max_abs_diff(&want, &got).unwrap() as f32;
        assert!(d < 1e-6, "{d}");
        let rows = got
            .sum(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-5));
    }
}
