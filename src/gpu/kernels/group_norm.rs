//! Group norm (and SiLU) in one operation, for inference: per (sample, group) the mean and
//! variance (two passes, accumulated in f32 on the GPU and f64 on the CPU), then
//! `(x − μ)/√(σ² + ε)·w_c + b_c` written once, channels first ([`group_norm`]) or channels
//! last ([`group_norm_nhwc`]). candle-nn's GroupNorm runs about ten element-wise and
//! reduction passes over the activation (measured at 25 % of the UNet's GPU time,
//! BENCHMARKS.md).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use super::slice;

/// [`super::group_norm`] outside an autograd graph: the fused operation itself.
pub(super) fn group_norm_forward(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &GroupNormOp {
            groups,
            eps,
            silu,
            channels_last: false,
        },
    )
}

/// [`group_norm`] (and SiLU) of a channels-last input `(B, H, W, C)`: the same statistics per
/// (sample, group), each group's `C/groups` channels read from every pixel. Inference only
/// (no autograd graph). On CUDA one kernel reads and writes the activation in place of the
/// NCHW kernel; elsewhere the channels are moved to dimension 1 and back around [`group_norm`]
/// (`(B, C, W, H)` for an image: the statistics do not depend on the pixels' order).
pub fn group_norm_nhwc(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    if x.rank() < 2 {
        candle_core::bail!("group norm: a channels-last input {:?}", x.dims());
    }
    if !x.device().is_cuda() {
        let last = x.rank() - 1;
        let y = group_norm_forward(
            &x.detach().transpose(1, last)?.contiguous()?,
            &weight.detach(),
            &bias.detach(),
            groups,
            eps,
            silu,
        )?;
        return y.transpose(1, last)?.contiguous();
    }
    x.contiguous()?.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &GroupNormOp {
            groups,
            eps,
            silu,
            channels_last: true,
        },
    )
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
    /// `(B, …, C)` input (CUDA only; [`group_norm_nhwc`] moves CPU inputs to NCHW).
    channels_last: bool,
}

/// (batch, channels, spatial size) of a group-norm input, checked against the affine.
pub(super) fn dims(l: &Layout, lw: &Layout, groups: usize) -> Result<(usize, usize, usize)> {
    let d = l.dims();
    if d.len() < 2 || !d[1].is_multiple_of(groups) || lw.dims() != [d[1]] {
        candle_core::bail!(
            "group_norm: input {d:?}, affine {:?}, {groups} groups",
            lw.dims()
        );
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

/// `QTAYLOR_GN_NHWC_BYTES`: the most bytes of a pixel's channels one block of the
/// channels-last group norm covers (default 64: on the H200 at batch 256 a bf16 forward took
/// 9.6 ms with 64 and 10.1 ms with 32, BENCHMARKS.md §4.5; 0 or less than one group: one group
/// per block).
#[cfg(feature = "cuda")]
pub(super) fn gn_run_bytes() -> Result<usize> {
    // Read once: every group norm of every pass asks.
    static BYTES: std::sync::OnceLock<std::result::Result<usize, String>> =
        std::sync::OnceLock::new();
    BYTES
        .get_or_init(|| match std::env::var("QTAYLOR_GN_NHWC_BYTES") {
            Err(_) => Ok(64),
            Ok(v) => v.parse::<usize>().map_err(|_| {
                format!(
                    "environment variable QTAYLOR_GN_NHWC_BYTES={v:?}: expected a byte count such as 64"
                )
            }),
        })
        .clone()
        .map_err(candle_core::Error::Msg)
}

/// (batch, channels, spatial size) of a channels-last group-norm input `(B, …, C)`.
#[cfg(feature = "cuda")]
pub(super) fn dims_channels_last(
    l: &Layout,
    lw: &Layout,
    groups: usize,
) -> Result<(usize, usize, usize)> {
    let d = l.dims();
    let c = *d.last().unwrap_or(&0);
    if d.len() < 2 || groups == 0 || !c.is_multiple_of(groups) || lw.dims() != [c] {
        candle_core::bail!(
            "group_norm: channels-last input {d:?}, affine {:?}, {groups} groups",
            lw.dims()
        );
    }
    Ok((d[0], c, d[1..d.len() - 1].iter().product()))
}

/// One (sample, group) chunk: mean and variance (two passes, f64 totals of 256-element
/// blocks), then `y = x·scale_c + shift_c` per channel (and SiLU).
#[allow(clippy::too_many_arguments)]
fn cpu<T: WithDType>(
    x: &[T],
    w: &[T],
    b: &[T],
    (bs, c, hw): (usize, usize, usize),
    groups: usize,
    eps: f64,
    silu: bool,
) -> Vec<T> {
    use rayon::prelude::*;
    let cpg = c / groups;
    let per = cpg * hw;
    let mut y = vec![T::from_f64(0.0); bs * c * hw];
    y.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .enumerate()
        .for_each(|(bg, (yo, xi))| {
            let g = bg % groups;
            let n = per as f64;
            let block_sum = |f: &dyn Fn(f64) -> f64| -> f64 {
                xi.chunks(256)
                    .map(|blk| blk.iter().map(|v| f(v.to_f64())).sum::<f64>())
                    .sum()
            };
            let mean = block_sum(&|v| v) / n;
            let var = block_sum(&|v| (v - mean) * (v - mean)) / n;
            let rstd = 1.0 / (var + eps).sqrt();
            for (k, (yc, xc)) in yo.chunks_mut(hw).zip(xi.chunks(hw)).enumerate() {
                let ch = g * cpg + k;
                let scale = rstd * w[ch].to_f64();
                let shift = b[ch].to_f64() - mean * scale;
                for (o, v) in yc.iter_mut().zip(xc) {
                    let z = v.to_f64() * scale + shift;
                    *o = T::from_f64(if silu { z / (1.0 + (-z).exp()) } else { z });
                }
            }
        });
    y
}

/// The f32 case of [`cpu`], in f32 arithmetic the compiler vectorises (block totals in f64).
#[allow(clippy::too_many_arguments)]
fn cpu_f32(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    (bs, c, hw): (usize, usize, usize),
    groups: usize,
    eps: f64,
    silu: bool,
) -> Vec<f32> {
    use rayon::prelude::*;
    let cpg = c / groups;
    let per = cpg * hw;
    let mut y = vec![0f32; bs * c * hw];
    y.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .enumerate()
        .for_each(|(bg, (yo, xi))| {
            let g = bg % groups;
            let n = per as f64;
            let mean = xi
                .chunks(256)
                .map(|blk| blk.iter().sum::<f32>() as f64)
                .sum::<f64>()
                / n;
            let m = mean as f32;
            let var = xi
                .chunks(256)
                .map(|blk| blk.iter().map(|v| (v - m) * (v - m)).sum::<f32>() as f64)
                .sum::<f64>()
                / n;
            let rstd = 1.0 / (var + eps).sqrt();
            for (k, (yc, xc)) in yo.chunks_mut(hw).zip(xi.chunks(hw)).enumerate() {
                let ch = g * cpg + k;
                let scale = (rstd * w[ch] as f64) as f32;
                let shift = (b[ch] as f64 - mean * rstd * w[ch] as f64) as f32;
                for (o, v) in yc.iter_mut().zip(xc) {
                    *o = v * scale + shift;
                }
                if silu {
                    for o in yc.iter_mut() {
                        *o /= 1.0 + (-*o).exp();
                    }
                }
            }
        });
    y
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "qtaylor-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.channels_last {
            candle_core::bail!("group_norm: channels-last input on the CPU");
        }
        let d = dims(l1, l2, self.groups)?;
        let (g, e, a) = (self.groups, self.eps, self.silu);
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(cpu_f32(
                slice(s1, l1)?,
                slice(s2, l2)?,
                slice(s3, l3)?,
                d,
                g,
                e,
                a,
            )),
            DType::F64 => CpuStorage::F64(cpu(
                slice(s1, l1)?,
                slice(s2, l2)?,
                slice(s3, l3)?,
                d,
                g,
                e,
                a,
            )),
            DType::F16 => CpuStorage::F16(cpu(
                slice(s1, l1)?,
                slice(s2, l2)?,
                slice(s3, l3)?,
                d,
                g,
                e,
                a,
            )),
            DType::BF16 => CpuStorage::BF16(cpu(
                slice(s1, l1)?,
                slice(s2, l2)?,
                slice(s3, l3)?,
                d,
                g,
                e,
                a,
            )),
            dt => candle_core::bail!("group_norm: dtype {dt:?} is not supported"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::group_norm(
            s1,
            l1,
            s2,
            l2,
            s3,
            l3,
            self.groups,
            self.eps as f32,
            self.silu,
            self.channels_last,
        )
    }
}
