//! diffusers' attention block: group norm, single- or multi-head self-attention over the
//! pixels, an output projection and a residual.

use super::*;
use crate::gpu::matmul::{matmul, matmul_shared};

pub(super) struct Attention {
    pub(super) norm: Option<GroupNorm>,
    pub(super) q: Linear,
    pub(super) k: Linear,
    pub(super) v: Linear,
    pub(super) out: Linear,
    pub(super) heads: usize,
    pub(super) rescale: f64,
    /// The projections stacked for the channels-first inference path (frozen weights only).
    pub(super) qkv: Option<(Tensor, Tensor)>,
    /// Input `(B, H, W, C)` ([`Attention::forward_channels_last`]).
    pub(super) channels_last: bool,
}

/// The q, k, v weights `(C, C)` and biases `(C,)` stacked into one `(3C, C)` matrix and
/// `(3C,)` bias whose rows run head by head as `[q_h; k_h; v_h]` (`d = C/heads` rows each),
/// so that one product gives every head's q, k and v as consecutive row blocks.
pub(super) fn stack_qkv(
    q: &Linear,
    k: &Linear,
    v: &Linear,
    heads: usize,
) -> Result<(Tensor, Tensor)> {
    let d = q.weight().dim(0)? / heads;
    let (mut w, mut b) = (Vec::new(), Vec::new());
    for h in 0..heads {
        for l in [q, k, v] {
            w.push(l.weight().narrow(0, h * d, d)?);
            b.push(
                l.bias()
                    .expect("attention projections have a bias")
                    .narrow(0, h * d, d)?,
            );
        }
    }
    Ok((Tensor::cat(&w, 0)?, Tensor::cat(&b, 0)?))
}

impl Attention {
    pub(super) fn new(
        w: &Weights,
        p: &str,
        c: usize,
        head_dim: Option<usize>,
        groups: Option<usize>,
        eps: f64,
        rescale: f64,
    ) -> Result<Self> {
        let hd = head_dim.unwrap_or(c);
        // Current key names, or the legacy AttentionBlock ones (diffusers renames on load).
        let name = |new: &str, old: &str| {
            if w.has(&format!("{p}.{new}.weight")) || !w.has(&format!("{p}.{old}.weight")) {
                format!("{p}.{new}")
            } else {
                format!("{p}.{old}")
            }
        };
        let (q, k, v) = (
            w.linear(&name("to_q", "query"), c, c)?,
            w.linear(&name("to_k", "key"), c, c)?,
            w.linear(&name("to_v", "value"), c, c)?,
        );
        let heads = c / hd;
        let qkv = if q.weight().track_op() {
            None // trainable: the stacked copy would go stale
        } else {
            Some(stack_qkv(&q, &k, &v, heads)?)
        };
        Ok(Attention {
            norm: match groups {
                Some(g) => Some(w.group_norm(&format!("{p}.group_norm"), g, c, eps)?),
                None => None,
            },
            q,
            k,
            v,
            out: w.linear(&name("to_out.0", "proj_attn"), c, c)?,
            heads,
            rescale,
            qkv,
            channels_last: false,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        timed("attention", x.device(), || match &self.qkv {
            Some(qkv) if self.channels_last => self.forward_channels_last(x, qkv),
            _ if self.channels_last => {
                bail!("internal: channels-last attention needs frozen weights")
            }
            Some(qkv) if x.device().is_cuda() && !x.track_op() => {
                self.forward_channels_first(x, qkv)
            }
            _ => self.forward_inner(x),
        })
    }

    pub(super) fn into_channels_last(mut self) -> Result<Attention> {
        if self.qkv.is_none() {
            bail!("internal: trainable attention has no channels-last form");
        }
        if let Some(n) = &mut self.norm {
            n.channels_last = true;
        }
        self.channels_last = true;
        Ok(self)
    }

    /// From the stacked projections `[q; k; v]` `(B, 3C, H·W)` without their bias
    /// ([`stack_qkv`]'s row order): the values `v` `(B·heads, d, H·W)` and the attention
    /// probabilities `P = softmax(qᵀk/√d)` `(B·heads, HW_q, HW_k)` (bias added in place, softmax
    /// in place in f32 arithmetic).
    pub(super) fn values_and_probabilities(
        &self,
        qkv: Tensor,
        b_qkv: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b, c3, hw) = qkv.dims3()?;
        let (heads, d) = (self.heads, c3 / 3 / self.heads);
        crate::gpu::kernels::conv_epilogue(&qkv, b_qkv, None, 1.0)?;
        let qkv = qkv.reshape((b * heads, 3 * d, hw))?;
        let (q, k) = (qkv.narrow(1, 0, d)?, qkv.narrow(1, d, d)?);
        let scores = matmul(&q.transpose(1, 2)?, &k)?; // (B·heads, HW_q, HW_k)
        crate::gpu::kernels::softmax_last_dim_inplace(&scores, 1.0 / (d as f64).sqrt())?;
        Ok((qkv.narrow(1, 2 * d, d)?, scores))
    }

    /// Attention on channels-last input `x: (B, H, W, C)`, which is already token-major
    /// `(B, H·W, C)`: `[q; k; v] = W_qkv·xᵀ + b` as `(B, 3C, H·W)` (a cuBLAS operand flag
    /// transposes x), then scores and softmax as in [`Attention::forward_channels_first`],
    /// `o = P·vᵀ` per head `(H·W_q, d)` (with one head already `(B, H·W, C)`; several heads
    /// are interleaved back by one copy), and `y = (o·W_oᵀ + b_o + x)/rescale`, the bias,
    /// residual and scale in one fused pass.
    pub(super) fn forward_channels_last(
        &self,
        x: &Tensor,
        (w_qkv, b_qkv): &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let (heads, d, hw) = (self.heads, c / self.heads, h * w);
        let hn = match &self.norm {
            Some(n) => norm(n, x)?,
            None => x.clone(),
        };
        let tokens = hn.reshape((b, hw, c))?;
        let qkv = matmul(&w_qkv.broadcast_left(b)?, &tokens.transpose(1, 2)?)?; // (B, 3C, HW)
        drop((hn, tokens));
        let (v, probs) = self.values_and_probabilities(qkv, b_qkv)?;
        let o = matmul(&probs, &v.transpose(1, 2)?)?; // (B·heads, HW_q, d)
        drop((probs, v));
        let o = if heads == 1 {
            o
        } else {
            o.reshape((b, heads, hw, d))?
                .transpose(1, 2)?
                .contiguous()?
        };
        let y = matmul_shared(&o.reshape((b, hw, c))?, &self.out.weight().t()?)?
            .reshape((b, h, w, c))?;
        let bias = self.out.bias().expect("attention projections have a bias");
        crate::gpu::kernels::conv_epilogue_nhwc(&y, bias, Some(x), 1.0 / self.rescale)?;
        Ok(y)
    }

    /// Attention without moving the activations out of `(B, C, H·W)` (inference on CUDA):
    /// `[q; k; v] = W_qkv·x + b` as one batched product `(3C, C)·(C, H·W)` (head by head,
    /// [`stack_qkv`]), `S = qᵀk` per head `(H·W, H·W)`, `P = softmax(S/√d)` in place (f32
    /// arithmetic), `o = v·Pᵀ` `(d, H·W)`, `y = (W_o·o + b_o + x)/rescale` with the bias,
    /// residual and scale in one fused pass. Every transpose is a cuBLAS operand flag, so no
    /// activation is copied; the token-major path ([`Attention::forward_inner`], diffusers'
    /// order) copies the activations to `(B, H·W, C)` and back and splits heads with copies.
    pub(super) fn forward_channels_first(
        &self,
        x: &Tensor,
        (w_qkv, b_qkv): &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hw = h * w;
        let hn = match &self.norm {
            Some(n) => norm(n, x)?,
            None => x.clone(),
        };
        let qkv = matmul(&w_qkv.broadcast_left(b)?, &hn.reshape((b, c, hw))?)?; // (B, 3C, HW)
        drop(hn);
        let (v, probs) = self.values_and_probabilities(qkv, b_qkv)?;
        let o = matmul(&v, &probs.transpose(1, 2)?)?; // (B·heads, d, HW_q)
        drop((probs, v));
        let y = matmul(
            &self.out.weight().broadcast_left(b)?,
            &o.reshape((b, c, hw))?,
        )?
        .reshape((b, c, h, w))?;
        let bias = self.out.bias().expect("attention projections have a bias");
        crate::gpu::kernels::conv_epilogue(&y, bias, Some(x), 1.0 / self.rescale)?;
        Ok(y)
    }

    pub(super) fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let d = c / self.heads;
        let hn = match &self.norm {
            Some(n) => norm(n, x)?,
            None => x.clone(),
        };
        let tokens = hn.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?; // (B, HW, C)
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, h * w, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(&tokens)?)?;
        let k = split(self.k.forward(&tokens)?)?;
        let v = split(self.v.forward(&tokens)?)?;
        let dtype = q.dtype();
        // Scores from the model-dtype product (f32 accumulation in cuBLAS/gemm), softmax in
        // f32 whatever the model dtype.
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? / (d as f64).sqrt())?;
        // softmax_last_dim is one fused pass without a backward; training composes it.
        let probs = if scores.track_op() {
            candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        }
        .to_dtype(dtype)?;
        let o = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, h * w, c))?;
        let o = self
            .out
            .forward(&o)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        let out = (o + x)?;
        Ok(if self.rescale != 1.0 {
            (out / self.rescale)?
        } else {
            out
        })
    }
}
