//! qtaylor's own kernels for the UNet's hot spots that candle composes from many passes:
//! group norm with SiLU ([`group_norm`], for inference; [`group_norm_train`] with its fused
//! backward for training), the convolution epilogue ([`epilogue`]), attention's in-place
//! softmax ([`softmax`]), channels-last concatenation ([`concat`]) and the CPU's 3×3
//! convolution ([`conv3x3_cpu`]). Each has a CPU form and, with `--features cuda`, a CUDA
//! kernel ([`cuda`]); tests hold the two to the composed candle operations.

pub mod concat;
pub mod conv3x3_cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod epilogue;
pub mod group_norm;
pub mod group_norm_train;
pub mod softmax;

pub use concat::concat_channels_last;
pub use conv3x3_cpu::conv3x3_cpu_f32;
pub use epilogue::{conv_epilogue, conv_epilogue_nhwc};
pub use group_norm::group_norm_nhwc;
pub use group_norm_train::{group_norm_autograd, group_norm_train};
pub use softmax::softmax_last_dim_inplace;

use candle_core::{CpuStorage, DType, Layout, Result, Tensor, WithDType};

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("group_norm: non-contiguous input".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

/// `GroupNorm(groups, eps)` with per-channel affine `weight`, `bias` (shape `(C,)`), for a
/// contiguous input `(B, C, …)` of dtype f32, f64, f16 or bf16; weight/bias in the same dtype.
/// With `silu`, the output is `SiLU(GroupNorm(x))` in the same pass (the UNet's
/// norm → activation pairs).
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    if x.track_op() || weight.track_op() || bias.track_op() {
        let fused = match x.device() {
            candle_core::Device::Cpu => matches!(x.dtype(), DType::F32 | DType::F64),
            _ => x.dtype() == DType::F32,
        };
        if fused && std::env::var_os("QTAYLOR_GN_BACKWARD").is_none_or(|v| v != "composed") {
            return group_norm_train::group_norm_train(x, weight, bias, groups, eps, silu);
        }
        return group_norm_train::group_norm_autograd(x, weight, bias, groups, eps, silu);
    }
    group_norm::group_norm_forward(x, weight, bias, groups, eps, silu)
}

#[cfg(test)]
mod tests {
    use super::group_norm_train::group_norm_autograd;
    use super::*;
    use candle_core::{Device, Module};

    #[test]
    fn composed_group_norm_equals_the_fused_kernel() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 8, 3, 5), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.3, 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 8, &dev).unwrap();
        for silu in [false, true] {
            let a = group_norm(&x, &w, &b, 4, 1e-5, silu).unwrap();
            let c = group_norm_autograd(&x, &w, &b, 4, 1e-5, silu).unwrap();
            assert!(crate::tensor::ops::max_abs_diff(&a, &c).unwrap() < 1e-5);
        }
    }

    #[test]
    fn fused_group_norm_equals_candle_nns() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (3, 8, 5, 4), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.3, 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 8, &dev).unwrap();
        let want = candle_nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-6)
            .unwrap()
            .forward(&x)
            .unwrap();
        let got = group_norm(&x, &w, &b, 4, 1e-6, false).unwrap();
        let fused = group_norm(&x, &w, &b, 4, 1e-6, true).unwrap();
        let silu = candle_nn::ops::silu(&want).unwrap();
        let d = crate::tensor::ops::max_abs_diff(&silu, &fused).unwrap() as f32;
        assert!(d < 1e-5, "fused SiLU: {d}");
        let d = crate::tensor::ops::max_abs_diff(&want, &got).unwrap() as f32;
        assert!(d < 1e-5, "{d}");
    }
}
