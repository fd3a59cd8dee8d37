//! The UNet's convolutions: 1×1, 3×3 and the stride-2 downsampling one, each on the
//! device's fast path, channels first or last.

use super::*;

/// A convolution. 3×3 / stride 1 / padding 1 convolutions on the CPU (most of the UNet)
/// run as one batched matrix product over an im2col matrix built from nine shifted views
/// of the padded input: the weight `(out, in, 3, 3)` is already the `(out, in·9)` matrix, so
/// nothing is reordered per call. candle's own CPU conv2d reorders the weight and converts
/// the input to NHWC on every call and scatters its im2col tile; this path was measured
/// faster (BENCHMARKS.md). Other shapes and devices use candle's conv2d.
pub(super) enum Conv {
    Candle(Conv2d),
    /// 1×1 convolution on CUDA as a batched cuBLAS product `(Cout, Cin) @ (Cin, H·W)`:
    /// cuDNN's per-call cost dominated these small convolutions (BENCHMARKS.md).
    Pointwise {
        w: Tensor,
        bias: Tensor,
    },
    Im2col {
        w2: Tensor,
        bias: Tensor,
        out_c: usize,
    },
    /// 3×3 / stride 1 / padding 1 with trainable weights: [`crate::gpu::conv::conv3x3_train`]
    /// (the device's fast forward, gradients as matrix products) plus the bias.
    Train3x3 {
        w: Tensor,
        bias: Tensor,
    },
    /// Channels last ([`UNet2D::into_channels_last`]), frozen weights: `x: (B, H, W, C)`,
    /// `w: (K, R, S, C)`. 1×1 convolutions are one product `(B·H·W, C)·Wᵀ` (no transpose of
    /// the activations is needed in this layout); the others go through
    /// [`crate::gpu::conv::conv2d_nhwc_fast`] (cuDNN with NHWC descriptors on CUDA).
    Nhwc {
        w: Tensor,
        bias: Tensor,
        padding: usize,
        stride: usize,
    },
}

impl Conv {
    /// The bias `(Cout,)`.
    pub(super) fn bias(&self) -> Result<&Tensor> {
        Ok(match self {
            Conv::Candle(c) => c.bias().context("convolutions here have a bias")?,
            Conv::Pointwise { bias, .. }
            | Conv::Im2col { bias, .. }
            | Conv::Train3x3 { bias, .. }
            | Conv::Nhwc { bias, .. } => bias,
        })
    }

    /// Whether this convolution takes channels-last input.
    pub(super) fn is_channels_last(&self) -> bool {
        matches!(self, Conv::Nhwc { .. })
    }

    /// The same convolution for channels-last activations ([`Conv::Nhwc`]), with the weight
    /// reordered to `(K, R, S, C)` once (any channel count: cuDNN plans the UNet's RGB input
    /// and output convolutions in NHWC too). Trainable weights have no such form (an error).
    pub(super) fn into_channels_last(self) -> Result<Conv> {
        let (w, bias, padding, stride) = match &self {
            Conv::Candle(c) => {
                let cfg = c.config();
                (
                    c.weight().clone(),
                    self.bias()?.clone(),
                    cfg.padding,
                    cfg.stride,
                )
            }
            Conv::Pointwise { w, bias } => {
                let (k, c) = w.dims2()?;
                (w.reshape((k, c, 1, 1))?, bias.clone(), 0, 1)
            }
            Conv::Im2col { w2, bias, out_c } => {
                let c = w2.dim(1)? / 9;
                (w2.reshape((*out_c, c, 3, 3))?, bias.clone(), 1, 1)
            }
            Conv::Train3x3 { .. } => {
                bail!("internal: trainable convolutions have no channels-last form")
            }
            Conv::Nhwc { .. } => return Ok(self),
        };
        if w.track_op() {
            bail!("internal: trainable convolutions have no channels-last form");
        }
        Ok(Conv::Nhwc {
            w: w.permute((0, 2, 3, 1))?.contiguous()?,
            bias,
            padding,
            stride,
        })
    }

    /// Whether `x` takes the fused CUDA path: the convolution without bias into a fresh
    /// tensor ([`Conv::unbiased`]), then bias and the rest in one in-place pass
    /// ([`crate::gpu::kernels::conv_epilogue`]). Frozen weights on CUDA only.
    pub(super) fn fused_on(&self, x: &Tensor) -> bool {
        !x.track_op()
            && match self {
                Conv::Candle(c) => x.device().is_cuda() && !c.weight().track_op(),
                Conv::Pointwise { w, .. } => x.device().is_cuda() && !w.track_op(),
                Conv::Im2col { .. } | Conv::Train3x3 { .. } => false,
                // Frozen by construction, on every device.
                Conv::Nhwc { .. } => true,
            }
    }

    /// The convolution without its bias, as a fresh contiguous tensor (fused path only).
    pub(super) fn unbiased(&self, x: &Tensor) -> Result<Tensor> {
        timed(self.label()?, x.device(), || match self {
            Conv::Candle(c) => {
                let cfg = c.config();
                Ok(crate::gpu::conv::conv2d_fast(
                    x,
                    c.weight(),
                    cfg.padding,
                    cfg.stride,
                )?)
            }
            Conv::Pointwise { w, .. } => {
                let (b, c, h, wd) = x.dims4()?;
                let y =
                    crate::gpu::matmul::matmul(&w.broadcast_left(b)?, &x.reshape((b, c, h * wd))?)?;
                Ok(y.reshape((b, w.dim(0)?, h, wd))?)
            }
            Conv::Nhwc {
                w, padding, stride, ..
            } => {
                let (k, r, s, c) = w.dims4()?;
                if (r, s, *padding, *stride) == (1, 1, 0, 1) {
                    let (b, h, wd, _) = x.dims4()?;
                    let y = crate::gpu::matmul::matmul_shared(
                        &x.reshape((b, h * wd, c))?,
                        &w.reshape((k, c))?.t()?,
                    )?;
                    return Ok(y.reshape((b, h, wd, k))?);
                }
                Ok(crate::gpu::conv::conv2d_nhwc_fast(x, w, *padding, *stride)?)
            }
            Conv::Im2col { .. } | Conv::Train3x3 { .. } => {
                bail!("internal: no unbiased convolution on this path")
            }
        })
    }

    /// `(conv(x) + bias + per_sample + residual + residual_bias) / out_scale` with
    /// `per_sample: (B, Cout)` broadcast over the image, `residual` shaped like the output and
    /// `residual_bias: (Cout,)` the bias the residual still lacks (a shortcut convolution
    /// computed by [`Conv::unbiased`]). On the fused CUDA path ([`Conv::fused_on`]) the
    /// biases, the per-sample term, the residual and the scale are one in-place pass
    /// ([`crate::gpu::kernels::conv_epilogue`]); elsewhere candle operations in the order diffusers
    /// uses.
    pub(super) fn forward_fused(
        &self,
        x: &Tensor,
        per_sample: Option<&Tensor>,
        residual: Option<&Tensor>,
        residual_bias: Option<&Tensor>,
        out_scale: f64,
    ) -> Result<Tensor> {
        let dev = x.device();
        if self.fused_on(x) {
            let y = self.unbiased(x)?;
            let b = self.bias()?;
            let mut bias = match per_sample {
                Some(t) => t.broadcast_add(&b.unsqueeze(0)?)?,
                None => b.clone(),
            };
            if let Some(rb) = residual_bias {
                bias = bias.broadcast_add(rb)?;
            }
            timed("conv epilogue", dev, || {
                epilogue(
                    self.is_channels_last(),
                    &y,
                    &bias,
                    residual,
                    1.0 / out_scale,
                )
            })?;
            return Ok(y);
        }
        if self.is_channels_last() {
            bail!(
                "a channels-last UNet keeps no autograd graph: set QTAYLOR_LAYOUT=nchw for gradients through its input"
            );
        }
        let y = timed(self.label()?, dev, || self.forward_inner(x))?;
        let y = match per_sample {
            Some(t) => timed("elementwise", dev, || {
                Ok(y.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?)
            })?,
            None => y,
        };
        let residual = match (residual, residual_bias) {
            (Some(r), Some(rb)) => Some(r.broadcast_add(&rb.reshape((1, rb.dim(0)?, 1, 1))?)?),
            (r, _) => r.cloned(),
        };
        match residual {
            Some(r) => timed("elementwise", dev, || {
                let out = (r + y)?;
                Ok(if out_scale != 1.0 {
                    (out / out_scale)?
                } else {
                    out
                })
            }),
            None if out_scale != 1.0 => Ok((y / out_scale)?),
            None => Ok(y),
        }
    }

    /// `conv(x) + bias` with `bias: (Cout,)` or `(B, Cout)` in place of the convolution's own
    /// (a ResNet block's stacked time projection, which holds conv1's bias): the fused path
    /// ([`Conv::fused_on`]) only.
    pub(super) fn forward_biased(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        if !self.fused_on(x) {
            bail!("internal: a replaced bias needs the fused convolution path");
        }
        let y = self.unbiased(x)?;
        timed("conv epilogue", x.device(), || {
            epilogue(self.is_channels_last(), &y, bias, None, 1.0)
        })?;
        Ok(y)
    }

    /// The profile row this convolution counts in.
    pub(super) fn label(&self) -> Result<&'static str> {
        Ok(match self {
            Conv::Candle(c) if c.weight().dim(2)? == 1 => "conv 1x1",
            Conv::Candle(c) if c.weight().dim(2)? == 4 => "conv 4x4",
            Conv::Pointwise { .. } => "conv 1x1",
            Conv::Nhwc { w, .. } if w.dim(1)? == 1 => "conv 1x1",
            Conv::Nhwc { w, .. } if w.dim(1)? == 4 => "conv 4x4",
            _ => "conv 3x3",
        })
    }

    /// `conv(x) + bias`.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, None, None, None, 1.0)
    }

    pub(super) fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Conv::Nhwc { .. } => bail!("internal: channels-last convolutions are fused"),
            Conv::Candle(c) => Ok(c.forward(x)?),
            Conv::Train3x3 { w, bias } => {
                let y = crate::gpu::conv::conv3x3_train(x, w)?;
                Ok(y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)?)
            }
            Conv::Pointwise { w, bias } => {
                let (b, c, h, wd) = x.dims4()?;
                let co = w.dim(0)?;
                let y = w
                    .broadcast_left(b)?
                    .matmul(&x.reshape((b, c, h * wd))?)?
                    .broadcast_add(&bias.reshape((1, co, 1))?)?;
                Ok(y.reshape((b, co, h, wd))?)
            }
            // The fused kernel keeps no autograd graph: training takes the tensor path.
            Conv::Im2col { w2, bias, .. }
                if x.dtype() == DType::F32 && !x.track_op() && !w2.track_op() =>
            {
                Ok(crate::gpu::kernels::conv3x3_cpu_f32(
                    &x.contiguous()?,
                    w2,
                    bias,
                )?)
            }
            Conv::Im2col { w2, bias, out_c } => {
                let (b, c, h, w) = x.dims4()?;
                let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
                let mut views = Vec::with_capacity(9);
                for ky in 0..3 {
                    for kx in 0..3 {
                        views.push(xp.narrow(2, ky, h)?.narrow(3, kx, w)?);
                    }
                }
                // (B, C, 9, H, W): row c·9 + ky·3 + kx matches the weight's (c, ky, kx) order.
                let col = Tensor::stack(&views, 2)?.reshape((b, c * 9, h * w))?;
                let out = w2.broadcast_left(b)?.matmul(&col)?;
                Ok(out
                    .reshape((b, *out_c, h, w))?
                    .broadcast_add(&bias.reshape((1, *out_c, 1, 1))?)?)
            }
        }
    }
}
