//! Convolutions on the device's fast path: cuDNN on cached plans on CUDA (with the `cudnn`
//! feature), candle's conv2d or the CPU's im2col elsewhere; channels-last forms, and the 3×3
//! convolution for training with its gradients.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::device::fresh_copy;
#[cfg(feature = "cudnn")]
use super::device::tf32;
use super::kernels::conv3x3_cpu::im2col3x3;
use super::kernels::conv3x3_cpu_f32;

/// The convolution path a device uses, in words (printed by `qtaylor speed`).
pub fn conv_path(device: &candle_core::Device) -> String {
    if !device.is_cuda() {
        return "candle / tiled im2col (CPU)".into();
    }
    #[cfg(feature = "cudnn")]
    if own_cudnn_conv() {
        return format!(
            "cuDNN, cached plans, algorithm {}, f32 {}",
            crate::gpu::conv_cudnn::algo_setting(),
            if tf32() { "TF32" } else { "exact" }
        );
    }
    if cfg!(feature = "cudnn") {
        "candle conv2d (cuDNN implicit precomputed GEMM)".into()
    } else {
        "candle conv2d (im2col + cuBLAS)".into()
    }
}

/// Whether CUDA convolutions take qtaylor's cached-plan cuDNN path ([`crate::gpu::conv_cudnn`]):
/// yes in builds with the `cudnn` feature unless `QTAYLOR_CONV=candle`, which selects
/// candle's conv2d (cuDNN's implicit precomputed GEMM with per-call descriptors), kept for
/// comparison (BENCHMARKS.md §4).
pub fn own_cudnn_conv() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        cfg!(feature = "cudnn") && std::env::var("QTAYLOR_CONV").map_or(true, |v| v != "candle")
    })
}

/// A convolution without bias (dilation 1) on the device's fast path, keeping no autograd
/// graph: [`crate::gpu::conv_cudnn::conv2d`] or candle's conv2d on CUDA (see [`own_cudnn_conv`]),
/// candle's conv2d elsewhere.
pub fn conv2d_fast(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if !x.device().is_cuda() {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    #[cfg(feature = "cudnn")]
    if own_cudnn_conv() {
        return crate::gpu::conv_cudnn::conv2d(&x.detach(), &w.detach(), padding, stride);
    }
    let algo = candle_core::conv::CudnnFwdAlgo::ImplicitPrecompGemm;
    x.detach()
        .conv2d_with_algo(&w.detach(), padding, stride, 1, 1, Some(algo))
}

/// `QTAYLOR_LAYOUT`: whether a UNet with frozen weights of `dtype` on `device` keeps its
/// activations channels last, `(B, H, W, C)`, as cuDNN's tensor-core kernels want them
/// (BENCHMARKS.md §4.5). `auto` (the default): on CUDA's cuDNN path in bf16 and f16 (exact
/// f32 and TF32 stay NCHW, where the measured kernels are NCHW ones); `nhwc`: always (on the
/// CPU too, where the convolutions move to NCHW and back: for tests); `nchw`: never.
pub fn channels_last(device: &candle_core::Device, dtype: DType) -> anyhow::Result<bool> {
    let v = std::env::var("QTAYLOR_LAYOUT").unwrap_or_else(|_| "auto".into());
    Ok(match v.as_str() {
        "auto" => device.is_cuda() && own_cudnn_conv() && matches!(dtype, DType::BF16 | DType::F16),
        "nhwc" => true,
        "nchw" => false,
        other => anyhow::bail!(
            "environment variable QTAYLOR_LAYOUT={other:?}: expected auto, nchw or nhwc"
        ),
    })
}

/// [`conv2d_fast`] for channels-last operands, `x: (N, H, W, C)`, `w: (K, R, S, C)`, output
/// `(N, H', W', K)`: cuDNN with NHWC descriptors ([`crate::gpu::conv_cudnn::conv2d_nhwc`]) on
/// CUDA's cuDNN path; elsewhere the operands move to NCHW and back around [`conv2d_fast`].
pub fn conv2d_nhwc_fast(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    #[cfg(feature = "cudnn")]
    if x.device().is_cuda() && own_cudnn_conv() {
        return crate::gpu::conv_cudnn::conv2d_nhwc(&x.detach(), &w.detach(), padding, stride);
    }
    through_nchw(x, w, |x, w| conv2d_fast(x, w, padding, stride))
}

/// `f` on `x` and `w` moved from channels last to NCHW / KCRS, its result moved back.
fn through_nchw(
    x: &Tensor,
    w: &Tensor,
    f: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let nchw = |t: &Tensor| t.detach().permute((0, 3, 1, 2))?.contiguous();
    f(&nchw(x)?, &nchw(w)?)?.permute((0, 2, 3, 1))?.contiguous()
}

/// [`conv_transpose2d_fast`] for channels-last operands, `x: (N, H', W', Cin)`, `w: (Cin, R,
/// S, Cout)`, output `(N, H, W, Cout)` (cuDNN with NHWC descriptors on CUDA's cuDNN path).
pub fn conv_transpose2d_nhwc_fast(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cudnn")]
    if x.device().is_cuda() && own_cudnn_conv() {
        return crate::gpu::conv_cudnn::conv_transpose2d_nhwc(
            &x.detach(),
            &w.detach(),
            padding,
            stride,
        );
    }
    through_nchw(x, w, |x, w| conv_transpose2d_fast(x, w, padding, stride))
}

/// A transposed convolution without bias (`w: (Cin, Cout, R, S)`, no output padding,
/// dilation 1) keeping no autograd graph: [`crate::gpu::conv_cudnn::conv_transpose2d`] on CUDA's
/// cuDNN path, candle's conv_transpose2d elsewhere.
pub fn conv_transpose2d_fast(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cudnn")]
    if x.device().is_cuda() && own_cudnn_conv() {
        return crate::gpu::conv_cudnn::conv_transpose2d(&x.detach(), &w.detach(), padding, stride);
    }
    x.detach()
        .conv_transpose2d(&w.detach(), padding, 0, stride, 1)
}

/// 3×3 convolution, stride 1, padding 1, no bias, by the fast path of the device (the tiled
/// im2col kernel for CPU f32, [`conv2d_fast`] otherwise); keeps no autograd graph.
fn conv3x3_fast(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (cout, cin, _, _) = w.dims4()?;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let zero = Tensor::zeros(cout, DType::F32, x.device())?;
        conv3x3_cpu_f32(&x.contiguous()?, &w.reshape((cout, cin * 9))?, &zero)
    } else {
        conv2d_fast(x, w, 1, 1)
    }
}

/// 3×3 convolution (stride 1, padding 1, no bias) for training: the forward pass is the fast
/// path of the device, and the gradients are
/// `∂L/∂x = conv(∂L/∂y, W̃)` with `W̃[ci, co, ky, kx] = W[co, ci, 2 − ky, 2 − kx]` (the
/// transposed convolution of a stride-1 "same" convolution is a convolution with the
/// flipped, transposed kernel), and `∂L/∂W = ∂L/∂Y · col(x)ᵀ` with `∂L/∂Y` as a
/// `(Cout, B·H·W)` matrix and `col(x)` the `(Cin·9, B·H·W)` im2col matrix (on CUDA's cuDNN
/// path: `cudnnConvolutionBackwardFilter`, [`crate::gpu::conv_cudnn::conv2d_backward_filter`]).
/// candle's own conv2d backward runs a direct transposed-convolution loop instead.
pub fn conv3x3_train(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let y = conv3x3_fast(&x.detach(), &w.detach())?;
    x.apply_op3(w, &y, Conv3x3Grad)
}

/// Returns its third argument (the convolution computed outside the graph) and supplies the
/// convolution's gradients for the first two.
struct Conv3x3Grad;

impl CustomOp3 for Conv3x3Grad {
    fn name(&self) -> &'static str {
        "conv3x3-train"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fresh_copy(y, ly, "conv3x3-train")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        y: &candle_core::CudaStorage,
        ly: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        fresh_copy(y, ly, "conv3x3-train")
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.detach(), w.detach(), g.detach());
        let (cout, cin, _, _) = w.dims4()?;
        let (b, _, h, wd) = x.dims4()?;
        let w_t = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        let gx = conv3x3_fast(&g, &w_t)?;
        #[cfg(feature = "cudnn")]
        if x.device().is_cuda() && own_cudnn_conv() {
            let gw = crate::gpu::conv_cudnn::conv2d_backward_filter(&x, &g, (3, 3), 1, 1)?;
            return Ok((Some(gx), Some(gw), None));
        }
        // ∂L/∂W in batch tiles of about 8 M im2col entries (bounded memory).
        let tile = (8_000_000 / (cin * 9 * h * wd)).clamp(1, b);
        let mut gw: Option<Tensor> = None;
        for b0 in (0..b).step_by(tile) {
            let nb = tile.min(b - b0);
            let col = im2col3x3(&x.narrow(0, b0, nb)?)?;
            let gm = g
                .narrow(0, b0, nb)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((cout, nb * h * wd))?;
            let part = gm.matmul(&col.t()?)?;
            gw = Some(match gw {
                None => part,
                Some(a) => (a + part)?,
            });
        }
        let gw = gw.expect("a non-empty batch").reshape((cout, cin, 3, 3))?;
        Ok((Some(gx), Some(gw), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn training_conv_equals_candle_conv2d_in_value_and_gradients() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 5, 6, 7), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.3, (4, 5, 3, 3), &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (3, 4, 6, 7), &dev).unwrap();
        let grads = |ours: bool| {
            let (xv, wv) = (
                candle_core::Var::from_tensor(&x).unwrap(),
                candle_core::Var::from_tensor(&w).unwrap(),
            );
            let y = if ours {
                conv3x3_train(xv.as_tensor(), wv.as_tensor()).unwrap()
            } else {
                xv.as_tensor().conv2d(wv.as_tensor(), 1, 1, 1, 1).unwrap()
            };
            let loss = (&y * &probe).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            (
                y,
                g.get(xv.as_tensor()).unwrap().clone(),
                g.get(wv.as_tensor()).unwrap().clone(),
            )
        };
        let (y0, gx0, gw0) = grads(false);
        let (y1, gx1, gw1) = grads(true);
        for (a, b) in [(y0, y1), (gx0, gx1), (gw0, gw1)] {
            let d = (a - &b).unwrap().abs().unwrap().max_all().unwrap();
            let m = b.abs().unwrap().max_all().unwrap();
            let rel = d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap();
            assert!(rel < 1e-5, "relative difference {rel}");
        }
    }
}
