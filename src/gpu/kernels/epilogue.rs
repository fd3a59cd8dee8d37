//! The convolution epilogue: bias, time embedding, residual and output scale added to a
//! convolution's raw output in one in-place pass.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor, WithDType};

use super::slice;

/// The epilogue of a convolution, in place on its fresh contiguous output `y: (N, K, …)`:
/// `y ← (y + b + r)·scale`, with `b` the bias `(K,)` or a per-sample bias `(N, K)` (a ResNet
/// block's conv bias plus its time embedding) and `r` an optional residual shaped like `y`
/// (the block's shortcut). One pass where composing candle operations takes two to four,
/// each allocating a new tensor. `y` must not share its storage with another tensor.
pub fn conv_epilogue(
    y: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    scale: f64,
) -> Result<()> {
    epilogue(y, bias, residual, scale, false)
}

/// [`conv_epilogue`] for a channels-last output `y: (N, …, K)`: the bias `(K,)` or `(N, K)`
/// indexed by each element's channel `i mod K` (and sample).
pub fn conv_epilogue_nhwc(
    y: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    scale: f64,
) -> Result<()> {
    epilogue(y, bias, residual, scale, true)
}

fn epilogue(
    y: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    scale: f64,
    channels_last: bool,
) -> Result<()> {
    let op = Epilogue {
        scale: scale as f32,
        channels_last,
    };
    let bias = bias.contiguous()?;
    match residual {
        Some(r) => y.inplace_op3(&bias, &r.contiguous()?, &op),
        None => y.inplace_op2(&bias, &op),
    }
}

struct Epilogue {
    scale: f32,
    channels_last: bool,
}

#[derive(Clone, Copy)]
pub(crate) struct EpilogueDims {
    pub(crate) n: usize,
    pub(crate) k: usize,
    pub(crate) hw: usize,
    pub(crate) per_sample: bool,
    /// `(N, HW, K)` instead of `(N, K, HW)`.
    pub(crate) channels_last: bool,
}

fn epilogue_dims(
    ly: &Layout,
    lb: &Layout,
    lr: Option<&Layout>,
    channels_last: bool,
) -> Result<EpilogueDims> {
    let d = ly.dims();
    let k = if channels_last {
        *d.last().unwrap_or(&0)
    } else {
        d.get(1).copied().unwrap_or(0)
    };
    let ok_b = |b: &[usize]| d.len() >= 2 && (b == [k] || b == [d[0], k]);
    if !ok_b(lb.dims()) || lr.is_some_and(|l| l.dims() != d) || !ly.is_contiguous() {
        candle_core::bail!(
            "conv epilogue: output {d:?} (contiguous {}), bias {:?}, residual {:?}",
            ly.is_contiguous(),
            lb.dims(),
            lr.map(|l| l.dims())
        );
    }
    Ok(EpilogueDims {
        n: d[0],
        k,
        hw: d.iter().product::<usize>() / (d[0] * k).max(1),
        per_sample: lb.dims().len() == 2,
        channels_last,
    })
}

fn epilogue_cpu<T: WithDType>(y: &mut [T], b: &[T], r: Option<&[T]>, d: EpilogueDims, scale: f32) {
    for (i, v) in y.iter_mut().enumerate().take(d.n * d.k * d.hw) {
        // (sample, channel) of element i, as the row of a per-sample bias.
        let nk = if d.channels_last {
            i / (d.hw * d.k) * d.k + i % d.k
        } else {
            i / d.hw
        };
        let mut s = v.to_f64() as f32 + b[if d.per_sample { nk } else { nk % d.k }].to_f64() as f32;
        if let Some(r) = r {
            s += r[i].to_f64() as f32;
        }
        *v = T::from_f64((s * scale) as f64);
    }
}

fn epilogue_cpu_storage(
    y: &mut CpuStorage,
    ly: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    r: Option<(&CpuStorage, &Layout)>,
    scale: f32,
    channels_last: bool,
) -> Result<()> {
    let d = epilogue_dims(ly, lb, r.map(|r| r.1), channels_last)?;
    let (a, z) = ly.contiguous_offsets().expect("checked contiguous");
    macro_rules! go {
        ($v:ident, $t:ty) => {{
            let r = match r {
                Some(r) => Some(slice::<$t>(r.0, r.1)?),
                None => None,
            };
            epilogue_cpu(&mut $v[a..z], slice::<$t>(b, lb)?, r, d, scale)
        }};
    }
    match y {
        CpuStorage::F32(v) => go!(v, f32),
        CpuStorage::F64(v) => go!(v, f64),
        CpuStorage::F16(v) => go!(v, half::f16),
        CpuStorage::BF16(v) => go!(v, half::bf16),
        _ => candle_core::bail!("conv epilogue: dtype {:?} is not supported", y.dtype()),
    }
    Ok(())
}

impl candle_core::InplaceOp2 for Epilogue {
    fn name(&self) -> &'static str {
        "conv-epilogue"
    }

    fn cpu_fwd(&self, y: &mut CpuStorage, ly: &Layout, b: &CpuStorage, lb: &Layout) -> Result<()> {
        epilogue_cpu_storage(y, ly, b, lb, None, self.scale, self.channels_last)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &mut candle_core::CudaStorage,
        ly: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<()> {
        let d = epilogue_dims(ly, lb, None, self.channels_last)?;
        super::cuda::epilogue((y, ly), (b, lb), None, d, self.scale)
    }
}

impl candle_core::InplaceOp3 for Epilogue {
    fn name(&self) -> &'static str {
        "conv-epilogue"
    }

    fn cpu_fwd(
        &self,
        y: &mut CpuStorage,
        ly: &Layout,
        b: &CpuStorage,
        lb: &Layout,
        r: &CpuStorage,
        lr: &Layout,
    ) -> Result<()> {
        epilogue_cpu_storage(y, ly, b, lb, Some((r, lr)), self.scale, self.channels_last)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &mut candle_core::CudaStorage,
        ly: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
        r: &candle_core::CudaStorage,
        lr: &Layout,
    ) -> Result<()> {
        let d = epilogue_dims(ly, lb, Some(lr), self.channels_last)?;
        super::cuda::epilogue((y, ly), (b, lb), Some((r, lr)), d, self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn conv_epilogue_equals_bias_time_embedding_residual_and_scale_composed() {
        let dev = Device::Cpu;
        let y = Tensor::randn(0f32, 1.0, (3, 4, 5, 2), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
        let tb = Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (3, 4, 5, 2), &dev).unwrap();
        let close = |a: &Tensor, b: &Tensor| crate::tensor::ops::max_abs_diff(a, b).unwrap() < 1e-6;
        // bias only
        let got = y.copy().unwrap();
        conv_epilogue(&got, &b, None, 1.0).unwrap();
        let want = y.broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap()).unwrap();
        assert!(close(&got, &want));
        // per-sample bias (bias + time embedding), no residual
        let per = tb.broadcast_add(&b.unsqueeze(0).unwrap()).unwrap();
        let got = y.copy().unwrap();
        conv_epilogue(&got, &per, None, 1.0).unwrap();
        let want = want
            .broadcast_add(&tb.reshape((3, 4, 1, 1)).unwrap())
            .unwrap();
        assert!(close(&got, &want));
        // bias, residual and output scale
        let got = y.copy().unwrap();
        conv_epilogue(&got, &b, Some(&r), 0.5).unwrap();
        let want = ((y.broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap()).unwrap() + &r).unwrap()
            / 2.0)
            .unwrap();
        assert!(close(&got, &want));
        // a bias of the wrong length is an error naming the shapes, nothing written
        let before = y.copy().unwrap();
        let e = conv_epilogue(&y, &Tensor::zeros(5, DType::F32, &dev).unwrap(), None, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bias [5]"), "{e}");
        assert!(close(&y, &before));
    }
}
