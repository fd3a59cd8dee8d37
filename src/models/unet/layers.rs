//! The UNet's small pieces: activations, group norm, the time embedding, layout changes,
//! the convolution epilogue and the up-block's upsampler (nearest ×2 and a convolution, folded
//! into one transposed convolution on CUDA), with the weight folds they use.

use super::*;

#[derive(Clone, Copy, Debug)]
pub(super) enum Act {
    Silu,
    Mish,
    Gelu,
    Relu,
}

pub(super) fn act(name: &str) -> Result<Act> {
    Ok(match name {
        "silu" | "swish" => Act::Silu,
        "mish" => Act::Mish,
        "gelu" => Act::Gelu,
        "relu" => Act::Relu,
        other => {
            bail!("key 'act_fn': '{other}' is not supported; expected silu, mish, gelu or relu")
        }
    })
}

pub(super) fn apply(a: Act, x: &Tensor) -> candle_core::Result<Tensor> {
    match a {
        Act::Silu => candle_nn::ops::silu(x),
        Act::Mish => x * ((x.exp()? + 1.0)?.log()?.tanh()?),
        Act::Gelu => x.gelu_erf(),
        Act::Relu => x.relu(),
    }
}

/// A stride-2 3×3 kernel `W` on an input zero-padded by one at the bottom and right only, as
/// a 4×4 kernel for symmetric padding 1: `W'[.., 1+i, 1+j] = W[.., i, j]`, zeros in row and
/// column 0. Output `(p, q)` of the padded convolution is `Σ_ij W[i,j] x[2p+i, 2q+j]`; with
/// `W'` and padding 1 it is `Σ_ij W'[i,j] x[2p+i−1, 2q+j−1]`, the same sum (the extra taps
/// read the left/top padding or are multiplied by zero), and the output size
/// `(H + 2 − 4)/2 + 1 = H/2` matches `(H + 1 − 3)/2 + 1` for even H.
pub(super) fn fold_bottom_right_padding(w: &Tensor) -> Result<Tensor> {
    Ok(w.pad_with_zeros(2, 1, 0)?.pad_with_zeros(3, 1, 0)?)
}

/// Nearest ×2 upsampling followed by a 3×3 / padding-1 convolution with `W: (Cout, Cin, 3, 3)`
/// as one transposed convolution (stride 2, padding 1) with the kernel `(Cin, Cout, 4, 4)`
/// returned here. In one dimension, output `2i` of the pair is `W₀ x[i−1] + (W₁ + W₂) x[i]`
/// and output `2i+1` is `(W₀ + W₁) x[i] + W₂ x[i+1]` (taps `W₀, W₁, W₂` at offsets −1, 0, +1;
/// the zero padding of the upsampled image is the zero padding of `x`); the transposed
/// convolution's taps 0…3 are therefore `W₂, W₁ + W₂, W₀ + W₁, W₀`, i.e. `K = F W Fᵀ` per
/// channel pair with `F = [[0,0,1], [0,1,1], [1,1,0], [1,0,0]]`. Each output then takes 4
/// products per input channel instead of 9, and the 4× larger upsampled image is never
/// written. The sums are formed in f64 and rounded once to the weight's dtype.
pub(super) fn fold_upsample_conv(w: &Tensor) -> Result<Tensor> {
    let cpu = Device::Cpu;
    let f = Tensor::new(
        &[
            [0f64, 0.0, 1.0],
            [0.0, 1.0, 1.0],
            [1.0, 1.0, 0.0],
            [1.0, 0.0, 0.0],
        ],
        &cpu,
    )?;
    let w64 = w.to_device(&cpu)?.to_dtype(DType::F64)?;
    let k = f.broadcast_matmul(&w64.broadcast_matmul(&f.t()?)?)?; // (Cout, Cin, 4, 4)
    Ok(k.transpose(0, 1)?
        .contiguous()?
        .to_dtype(w.dtype())?
        .to_device(w.device())?)
}

/// An up-block's upsampler: nearest ×2, then a 3×3 convolution.
pub(super) struct Upsample {
    pub(super) conv: Conv,
    /// The pair as one transposed convolution ([`fold_upsample_conv`]), on CUDA; `(Cin, Cout,
    /// 4, 4)`, or `(Cin, 4, 4, Cout)` channels last.
    pub(super) folded: Option<Tensor>,
    /// Use `folded` with TF32 too.
    pub(super) always: bool,
    /// Activations `(B, H, W, C)` ([`UNet2D::into_channels_last`]).
    pub(super) channels_last: bool,
}

impl Upsample {
    pub(super) fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let dev = h.device();
        let tf32 = h.dtype() == DType::F32 && crate::gpu::device::tf32();
        let cl = self.channels_last;
        if let Some(k) = &self.folded
            && dev.is_cuda()
            && !h.track_op()
            && (self.always || !tf32)
        {
            let y = timed("conv up (transposed 4x4)", dev, || {
                Ok(if cl {
                    crate::gpu::conv::conv_transpose2d_nhwc_fast(h, k, 1, 2)?
                } else {
                    crate::gpu::conv::conv_transpose2d_fast(h, k, 1, 2)?
                })
            })?;
            timed("conv epilogue", dev, || {
                epilogue(cl, &y, self.conv.bias()?, None, 1.0)
            })?;
            return Ok(y);
        }
        let up = timed("pad, cat, upsample", dev, || upsample_nearest_2x(h, cl))?;
        self.conv.forward(&up)
    }

    pub(super) fn into_channels_last(self) -> Result<Upsample> {
        Ok(Upsample {
            conv: self.conv.into_channels_last()?,
            folded: match self.folded {
                Some(k) => Some(k.permute((0, 2, 3, 1))?.contiguous()?),
                None => None,
            },
            always: self.always,
            channels_last: true,
        })
    }
}

/// Nearest-neighbour 2× upsampling of `(B, C, H, W)`, or of `(B, H, W, C)` with
/// `channels_last`. In an autograd graph (training) it is a broadcast of each pixel over a
/// 2 × 2 block, whose gradient is a sum over the 4 copies (candle's own `upsample_nearest2d`
/// backward is a grouped convolution, run as one convolution per channel); otherwise
/// candle's `upsample_nearest2d`. Both give the same values.
pub(super) fn upsample_nearest_2x(h: &Tensor, channels_last: bool) -> Result<Tensor> {
    if channels_last {
        let (b, hh, ww, c) = h.dims4()?;
        return Ok(h
            .reshape((b, hh, 1, ww, 1, c))?
            .broadcast_as((b, hh, 2, ww, 2, c))?
            .reshape((b, 2 * hh, 2 * ww, c))?);
    }
    let (b, c, hh, ww) = h.dims4()?;
    if !h.track_op() {
        return Ok(h.upsample_nearest2d(2 * hh, 2 * ww)?);
    }
    Ok(h.reshape((b, c, hh, 1, ww, 1))?
        .broadcast_as((b, c, hh, 2, ww, 2))?
        .reshape((b, c, 2 * hh, 2 * ww))?)
}

/// [`crate::gpu::kernels::conv_epilogue`] in place on `y`, or its channels-last form.
pub(super) fn epilogue(
    channels_last: bool,
    y: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    scale: f64,
) -> Result<()> {
    if channels_last {
        crate::gpu::kernels::conv_epilogue_nhwc(y, bias, residual, scale)?;
    } else {
        crate::gpu::kernels::conv_epilogue(y, bias, residual, scale)?;
    }
    Ok(())
}

/// `(B, C, H, W)` → `(B, H, W, C)`, contiguous.
pub(super) fn to_nhwc(t: &Tensor) -> Result<Tensor> {
    timed("layout (NCHW <-> NHWC)", t.device(), || {
        Ok(t.permute((0, 2, 3, 1))?.contiguous()?)
    })
}

/// `(B, H, W, C)` → `(B, C, H, W)`, contiguous.
pub(super) fn to_nchw(t: &Tensor) -> Result<Tensor> {
    timed("layout (NCHW <-> NHWC)", t.device(), || {
        Ok(t.permute((0, 3, 1, 2))?.contiguous()?)
    })
}

/// The time embedding: one row per sample (training), or one row per distinct timestep
/// and the row each sample uses (inference).
pub(super) struct Temb {
    pub(super) rows: Tensor,
    pub(super) index: Option<Tensor>,
    /// Inference on the fused paths: every ResNet block's time projection of each row of
    /// `rows` at once, `(rows, Σ Cout)` ([`UNet2D::stack_time_projections`]).
    pub(super) proj: Option<Tensor>,
}

impl Temb {
    /// `lin(act(temb))` for every sample, `(B, out)`.
    pub(super) fn apply(&self, lin: &Linear, act: Act) -> Result<Tensor> {
        let a = apply(act, &self.rows)?;
        match &self.index {
            None => Ok(lin.forward(&a)?),
            Some(idx) => Ok(by_row(lin, &a)?.index_select(idx, 0)?),
        }
    }
}

/// `lin(x_i)` for each row `x_i` of `x` separately (a product with one row), stacked.
pub(super) fn by_row(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    let rows = (0..x.dim(0)?)
        .map(|i| lin.forward(&x.narrow(0, i, 1)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// GroupNorm with a per-channel affine, run by the fused kernel of [`crate::gpu::kernels`].
pub(super) struct GroupNorm {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    pub(super) groups: usize,
    pub(super) eps: f64,
    /// Input `(B, H, W, C)` ([`crate::gpu::kernels::group_norm_nhwc`]).
    pub(super) channels_last: bool,
}

/// `norm(x)`, and its SiLU in the same pass with `silu`.
pub(super) fn group_norm(n: &GroupNorm, x: &Tensor, silu: bool) -> Result<Tensor> {
    timed("group_norm", x.device(), || {
        let f = if n.channels_last {
            crate::gpu::kernels::group_norm_nhwc
        } else {
            crate::gpu::kernels::group_norm
        };
        Ok(f(x, &n.weight, &n.bias, n.groups, n.eps, silu)?)
    })
}

pub(super) fn norm(n: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    group_norm(n, x, false)
}

/// `act(norm(x))`, fused into the group-norm pass for SiLU.
pub(super) fn norm_act(n: &GroupNorm, a: Act, x: &Tensor) -> Result<Tensor> {
    match a {
        Act::Silu => group_norm(n, x, true),
        _ => act_t(a, &norm(n, x)?),
    }
}

pub(super) fn act_t(a: Act, x: &Tensor) -> Result<Tensor> {
    timed("activation", x.device(), || Ok(apply(a, x)?))
}
