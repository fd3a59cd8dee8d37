//! Concatenation along the channels of channels-last activations (the UNet's skips).

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};

/// `[a, b]` along the last dimension for channels-last activations (`(…, Ca)` and `(…, Cb)`
/// with the same leading dimensions): on CUDA one kernel moving 16-byte vectors when both
/// channel counts are multiples of the vector width and both inputs start 16-byte aligned
/// (candle's concatenation copies element by element, one pass per input); elsewhere
/// candle's `Tensor::cat`. Keeps no autograd graph.
pub fn concat_channels_last(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let last = a.rank().saturating_sub(1);
    let (ca, cb) = (a.dim(last)?, b.dim(last)?);
    let width = 16 / a.dtype().size_in_bytes().max(1);
    let aligned = |t: &Tensor| {
        (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(16)
            && t.is_contiguous()
    };
    let lead_ok = a.rank() >= 1 && a.dims()[..last] == b.dims()[..last] && a.dtype() == b.dtype();
    if !a.device().is_cuda()
        || !lead_ok
        || !matches!(a.dtype(), DType::F32 | DType::F16 | DType::BF16)
        || !ca.is_multiple_of(width)
        || !cb.is_multiple_of(width)
        || !aligned(a)
        || !aligned(b)
    {
        return Tensor::cat(&[a, b], last);
    }
    a.detach().apply_op2_no_bwd(&b.detach(), &ConcatLast)
}

struct ConcatLast;

impl candle_core::CustomOp2 for ConcatLast {
    fn name(&self) -> &'static str {
        "concat-channels-last"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("concat-channels-last runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (d1, d2) = (l1.dims(), l2.dims());
        let last = d1.len() - 1;
        let (ca, cb) = (d1[last], d2[last]);
        let rows: usize = d1[..last].iter().product();
        let mut dims = d1.to_vec();
        dims[last] = ca + cb;
        let out = super::cuda::concat_last((s1, l1), (s2, l2), (rows, ca, cb))?;
        Ok((out, Shape::from(dims)))
    }
}
