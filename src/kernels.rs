//! Fused kernels for the UNet's hot spots that candle composes from many passes.
//!
//! [`group_norm`]: GroupNorm over `(B, C, …)` in one operation: per (sample, group) the mean
//! and variance (two passes, accumulated in f32 on the GPU and f64 on the CPU), then
//! `(x − μ)/√(σ² + ε)·w_c + b_c` written once. candle-nn's GroupNorm runs about ten
//! element-wise and reduction passes over the activation (measured at 25 % of the UNet's GPU
//! time, BENCHMARKS.md). The CUDA kernel is compiled at run time with NVRTC (no headers
//! needed: f16/bf16 conversions use PTX `cvt`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

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
            return group_norm_train(x, weight, bias, groups, eps, silu);
        }
        return group_norm_autograd(x, weight, bias, groups, eps, silu);
    }
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
        let y = group_norm(
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
        let out = cuda::concat_last((s1, l1), (s2, l2), (rows, ca, cb))?;
        Ok((out, Shape::from(dims)))
    }
}

/// The same GroupNorm composed of candle operations, so that gradients flow (training):
/// [`group_norm`] takes this path whenever an argument is part of an autograd graph.
/// Population variance over each (sample, group), as PyTorch's `group_norm`.
pub fn group_norm_autograd(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group norm: {groups} groups for an input of shape {dims:?}");
    }
    let (b, c) = (dims[0], dims[1]);
    let xg = x.reshape((b, groups, ()))?;
    let mean = xg.mean_keepdim(2)?;
    let xc = xg.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(2)?;
    let xn = xc
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(dims.as_slice())?;
    let mut affine = vec![1usize; dims.len()];
    affine[1] = c;
    let y = xn
        .broadcast_mul(&weight.reshape(affine.as_slice())?)?
        .broadcast_add(&bias.reshape(affine.as_slice())?)?;
    if silu { y.silu() } else { Ok(y) }
}

/// GroupNorm (and SiLU) in an autograd graph with a fused backward: the forward is the fast
/// kernel of [`group_norm`] on detached inputs, and the gradients come from one pass per
/// (sample, group) chunk ([`GroupNormBackward`]). With `x̂ = (x − μ)·r` (population variance,
/// `r = 1/√(σ² + ε)`), `z = x̂·γ_c + β_c`, `y = z` or `SiLU(z)`, and the incoming `∂L/∂y`:
///
/// - `δ = ∂L/∂y` or `∂L/∂y · s(1 + z(1 − s))` with `s = sigmoid(z)` (SiLU′),
/// - `∂L/∂β_c = Σ δ`, `∂L/∂γ_c = Σ δ·x̂` over the batch and the channel's pixels,
/// - `∂L/∂x = r·(d − mean(d) − x̂·mean(d·x̂))` with `d = δ·γ_c`, means over the chunk
///   (the standard normalisation backward, e.g. Ioffe & Szegedy 2015, §3).
///
/// [`group_norm_autograd`] composes the same function from candle operations; a test holds
/// the two gradients equal. `QTAYLOR_GN_BACKWARD=composed` selects that path instead.
pub fn group_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let y = group_norm(
        &x.detach(),
        &weight.detach(),
        &bias.detach(),
        groups,
        eps,
        silu,
    )?;
    // γ and β travel as one tensor (a custom operation has three arguments); the
    // concatenation's own backward hands each its half of the gradient.
    let wb = Tensor::cat(&[weight, bias], 0)?;
    x.apply_op3(&wb, &y, GroupNormGrad { groups, eps, silu })
}

/// Returns its third argument (the group norm computed outside the graph) and supplies the
/// gradients for `x` and `[γ, β]` through [`GroupNormBackward`].
struct GroupNormGrad {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for GroupNormGrad {
    fn name(&self) -> &'static str {
        "qtaylor-group-norm-train"
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
        fresh_copy(y, ly, "group-norm-train")
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
        fresh_copy(y, ly, "group-norm-train")
    }

    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, wb, g) = (
            x.detach(),
            wb.detach().contiguous()?,
            g.detach().contiguous()?,
        );
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let total = x.elem_count();
        let packed = x.apply_op3_no_bwd(
            &wb,
            &g,
            &GroupNormBackward {
                groups: self.groups,
                eps: self.eps,
                silu: self.silu,
            },
        )?;
        let gx = packed.narrow(0, 0, total)?.reshape(dims.as_slice())?;
        let gw = packed.narrow(0, total, b * c)?.reshape((b, c))?.sum(0)?;
        let gb = packed
            .narrow(0, total + b * c, b * c)?
            .reshape((b, c))?
            .sum(0)?;
        Ok((Some(gx), Some(Tensor::cat(&[gw, gb], 0)?), None))
    }
}

/// The fused group-norm backward of [`group_norm_train`]: inputs `x` `(B, C, …)`, `[γ, β]`
/// `(2C,)` and `∂L/∂y` (the shape of x); output one flat vector `[∂L/∂x, P_γ, P_β]`, where
/// `P_γ`, `P_β` `(B, C)` are the per-sample sums whose totals over the batch are `∂L/∂γ`,
/// `∂L/∂β`.
struct GroupNormBackward {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// The CPU form of [`GroupNormBackward`] on one contiguous slice each, f64 totals.
#[allow(clippy::too_many_arguments)]
fn group_norm_backward_cpu<T: WithDType>(
    x: &[T],
    wb: &[T],
    gy: &[T],
    (bs, c, hw): (usize, usize, usize),
    groups: usize,
    eps: f64,
    silu: bool,
) -> Vec<T> {
    use rayon::prelude::*;
    let cpg = c / groups;
    let per = cpg * hw;
    let total = bs * c * hw;
    let (w, b) = (&wb[..c], &wb[c..]);
    // Per chunk: its ∂L/∂x and the (Σδ, Σδ·x̂) of its channels.
    type Chunk<T> = (Vec<T>, Vec<(f64, f64)>);
    let chunks: Vec<Chunk<T>> = x
        .par_chunks(per)
        .zip(gy.par_chunks(per))
        .enumerate()
        .map(|(bg, (xi, gi))| {
            let g = bg % groups;
            let n = per as f64;
            let mean = xi.iter().map(|v| v.to_f64()).sum::<f64>() / n;
            let var = xi.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
            let r = 1.0 / (var + eps).sqrt();
            let delta = |k: usize, i: usize| -> (f64, f64) {
                let ch = g * cpg + k;
                let xn = (xi[k * hw + i].to_f64() - mean) * r;
                let mut d = gi[k * hw + i].to_f64();
                if silu {
                    let z = xn * w[ch].to_f64() + b[ch].to_f64();
                    let s = 1.0 / (1.0 + (-z).exp());
                    d *= s * (1.0 + z * (1.0 - s));
                }
                (d, xn)
            };
            let mut sums = Vec::with_capacity(cpg);
            let (mut a1, mut a2) = (0.0, 0.0);
            for k in 0..cpg {
                let (mut sb, mut sw) = (0.0, 0.0);
                for i in 0..hw {
                    let (d, xn) = delta(k, i);
                    sb += d;
                    sw += d * xn;
                }
                let wc = w[g * cpg + k].to_f64();
                a1 += wc * sb;
                a2 += wc * sw;
                sums.push((sb, sw));
            }
            let (m1, m2) = (a1 / n, a2 / n);
            let mut gx = Vec::with_capacity(per);
            for k in 0..cpg {
                let wc = w[g * cpg + k].to_f64();
                for i in 0..hw {
                    let (d, xn) = delta(k, i);
                    gx.push(T::from_f64(r * (d * wc - m1 - xn * m2)));
                }
            }
            (gx, sums)
        })
        .collect();
    let mut out = Vec::with_capacity(total + 2 * bs * c);
    for (gx, _) in &chunks {
        out.extend_from_slice(gx);
    }
    for pick in [0, 1] {
        for (_, sums) in &chunks {
            // P_γ first (Σδ·x̂), then P_β (Σδ).
            out.extend(
                sums.iter()
                    .map(|&(sb, sw)| T::from_f64(if pick == 0 { sw } else { sb })),
            );
        }
    }
    out
}

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "qtaylor-group-norm-backward"
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
        let d = l1.dims();
        if d.len() < 2
            || !d[1].is_multiple_of(self.groups)
            || l2.dims() != [2 * d[1]]
            || l3.dims() != d
        {
            candle_core::bail!(
                "group norm backward: input {d:?}, affine {:?}, gradient {:?}",
                l2.dims(),
                l3.dims()
            );
        }
        let dims = (d[0], d[1], d[2..].iter().product::<usize>());
        let len = d.iter().product::<usize>() + 2 * d[0] * d[1];
        let (g, e, a) = (self.groups, self.eps, self.silu);
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(group_norm_backward_cpu::<f32>(
                slice(s1, l1)?,
                slice(s2, l2)?,
                slice(s3, l3)?,
                dims,
                g,
                e,
                a,
            )),
            DType::F64 => CpuStorage::F64(group_norm_backward_cpu::<f64>(
                slice(s1, l1)?,
                slice(s2, l2)?,
                slice(s3, l3)?,
                dims,
                g,
                e,
                a,
            )),
            dt => candle_core::bail!("group norm backward: dtype {dt:?} is not supported"),
        };
        Ok((out, Shape::from(len)))
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
        cuda::group_norm_backward(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            self.groups,
            self.eps as f32,
            self.silu,
        )
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
    /// `(B, …, C)` input (CUDA only; [`group_norm_nhwc`] moves CPU inputs to NCHW).
    channels_last: bool,
}

/// (batch, channels, spatial size) of a group-norm input, checked against the affine.
fn dims(l: &Layout, lw: &Layout, groups: usize) -> Result<(usize, usize, usize)> {
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
fn gn_run_bytes() -> Result<usize> {
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
fn dims_channels_last(l: &Layout, lw: &Layout, groups: usize) -> Result<(usize, usize, usize)> {
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

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("group_norm: non-contiguous input".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
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
        cuda::group_norm(
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

#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use std::sync::OnceLock;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result, Shape};

    const SRC: &str = r#"
__device__ __forceinline__ float ld_f32(float v) { return v; }
__device__ __forceinline__ float st_f32(float v) { return v; }
__device__ __forceinline__ float ld_f16(unsigned short h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ unsigned short st_f16(float f) { unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float ld_bf16(unsigned short h) { return __uint_as_float(((unsigned int)h) << 16); }
__device__ __forceinline__ unsigned short st_bf16(float f) { unsigned short h; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

__device__ float block_sum(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? sh[lane] : 0.0f;
    if (warp == 0) for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
    if (threadIdx.x == 0) sh[0] = v;
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

// One block per (sample, group) chunk of n elements. With `cached`, the chunk is read from
// global memory once and kept in (dynamic) shared memory for the variance and output passes.
#define GROUP_NORM(NAME, T, LD, ST) \
extern "C" __global__ void NAME(const T* x, const T* w, const T* b, T* y, int n, int cpg, int hw, int groups, float eps, int silu, int cached) { \
    __shared__ float sh[32]; \
    extern __shared__ __align__(16) unsigned char qt_cache[]; \
    T* cache = (T*)qt_cache; \
    int bg = blockIdx.x; int g = bg % groups; \
    const T* xp = x + (size_t)bg * n; T* yp = y + (size_t)bg * n; \
    float s = 0.0f; \
    for (int i = threadIdx.x; i < n; i += blockDim.x) { T v = xp[i]; if (cached) cache[i] = v; s += LD(v); } \
    float mean = block_sum(s, sh) / n; \
    const T* src = cached ? (const T*)cache : xp; \
    float v = 0.0f; \
    for (int i = threadIdx.x; i < n; i += blockDim.x) { float d = LD(src[i]) - mean; v += d * d; } \
    float rstd = rsqrtf(block_sum(v, sh) / n + eps); \
    for (int i = threadIdx.x; i < n; i += blockDim.x) { \
        int c = g * cpg + i / hw; \
        float z = (LD(src[i]) - mean) * rstd * LD(w[c]) + LD(b[c]); \
        yp[i] = ST(silu ? z / (1.0f + __expf(-z)) : z); \
    } \
}
GROUP_NORM(group_norm_f32, float, ld_f32, st_f32)
GROUP_NORM(group_norm_f16, unsigned short, ld_f16, st_f16)
GROUP_NORM(group_norm_bf16, unsigned short, ld_bf16, st_bf16)

// Vector form of the same: 16-byte loads and stores (4 f32 or 8 f16/bf16 values), for hw a
// multiple of the vector width and a 16-byte aligned x (every chunk then starts aligned).
#define GROUP_NORM_VEC(NAME, T, LD, ST) \
extern "C" __global__ void NAME(const T* x, const T* w, const T* b, T* y, int n, int cpg, int hw, int groups, float eps, int silu, int cached) { \
    const int V = 16 / sizeof(T); \
    __shared__ float sh[32]; \
    extern __shared__ __align__(16) unsigned char qt_cache[]; \
    uint4* cache = (uint4*)qt_cache; \
    int bg = blockIdx.x; int g = bg % groups; \
    int nv = n / V, hwv = hw / V; \
    const uint4* xp = (const uint4*)(x + (size_t)bg * n); uint4* yp = (uint4*)(y + (size_t)bg * n); \
    float s = 0.0f; \
    for (int i = threadIdx.x; i < nv; i += blockDim.x) { \
        uint4 v = xp[i]; if (cached) cache[i] = v; \
        const T* e = (const T*)&v; \
        _Pragma("unroll") for (int j = 0; j < V; j++) s += LD(e[j]); \
    } \
    float mean = block_sum(s, sh) / n; \
    const uint4* src = cached ? (const uint4*)cache : xp; \
    float q = 0.0f; \
    for (int i = threadIdx.x; i < nv; i += blockDim.x) { \
        uint4 v = src[i]; const T* e = (const T*)&v; \
        _Pragma("unroll") for (int j = 0; j < V; j++) { float d = LD(e[j]) - mean; q += d * d; } \
    } \
    float rstd = rsqrtf(block_sum(q, sh) / n + eps); \
    for (int i = threadIdx.x; i < nv; i += blockDim.x) { \
        int c = g * cpg + i / hwv; \
        float wc = LD(w[c]), bc = LD(b[c]); \
        uint4 v = src[i]; T* e = (T*)&v; \
        _Pragma("unroll") for (int j = 0; j < V; j++) { \
            float z = (LD(e[j]) - mean) * rstd * wc + bc; \
            e[j] = ST(silu ? z / (1.0f + __expf(-z)) : z); \
        } \
        yp[i] = v; \
    } \
}
GROUP_NORM_VEC(group_norm_vec_f32, float, ld_f32, st_f32)
GROUP_NORM_VEC(group_norm_vec_f16, unsigned short, ld_f16, st_f16)
GROUP_NORM_VEC(group_norm_vec_bf16, unsigned short, ld_bf16, st_bf16)

// Sums of v over the threads of each group, for blocks that cover `gb` groups of a pixel's
// channels: in each aligned run of `upp` = gb * upg lanes (a power of two dividing 32), lanes
// [gl * upg, (gl + 1) * upg) hold group gl. A butterfly over the lane bits that do not select
// the group gives each lane its warp's total, then every thread adds the warps' totals in
// warp order: the same fixed order on every run. gb == 1 is block_sum.
__device__ float group_sum(float v, float* sh, int gl, int gb, int upg, int upp) {
    if (gb == 1) return block_sum(v, sh);
    for (int o = 1; o < 32; o <<= 1) {
        if (o >= upg && o < upp) continue;
        v += __shfl_xor_sync(0xffffffff, v, o);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane < upp && lane % upg == 0) sh[warp * gb + gl] = v;
    __syncthreads();
    float r = 0.0f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) r += sh[w * gb + gl];
    __syncthreads();
    return r;
}

// Channels-last form: x (B, HW, C) with C = groups * cpg. One block per (sample, run of gb
// groups): hw pixels x gb * cpg channels, read in units of V consecutive channels (VT: a type
// of V elements; V divides cpg, so every unit is aligned and lies in one group). With gb > 1 a
// warp reads whole runs of gb * cpg channels of consecutive pixels instead of cpg-channel
// slivers 1/groups of a pixel apart. blockDim is a multiple of upp = gb * cpg / V, so each
// thread keeps one unit position j, hence one group (and blockDim is a multiple of 32 for
// the reductions). With `cached` the block's data is kept
// in shared memory as in GROUP_NORM.
// Each pass takes four units per thread at a time (GN_UNROLL loads in flight before the first
// is used).
#define GN_UNROLL 4
#define GROUP_NORM_NHWC(NAME, T, LD, ST, VT, V) \
extern "C" __global__ void NAME(const T* x, const T* w, const T* b, T* y, int hw, int c, int cpg, int gb, int groups, float eps, int silu, int cached) { \
    __shared__ float sh[256]; \
    extern __shared__ __align__(16) unsigned char qt_cache[]; \
    VT* cache = (VT*)qt_cache; \
    int runs = groups / gb; \
    int g0 = (blockIdx.x % runs) * gb; size_t nb = blockIdx.x / runs; \
    int upg = cpg / V, upp = gb * upg; int nu = hw * upp; float n = (float)hw * cpg; \
    int j = threadIdx.x % upp, gl = j / upg; \
    const T* xb = x + nb * hw * c + g0 * cpg + j * V; T* yb = y + nb * hw * c + g0 * cpg + j * V; \
    int step = blockDim.x; \
    float s = 0.0f; \
    for (int u0 = threadIdx.x; u0 < nu; u0 += GN_UNROLL * step) { \
        VT v[GN_UNROLL]; \
        _Pragma("unroll") for (int r = 0; r < GN_UNROLL; r++) { int u = u0 + r * step; if (u < nu) v[r] = *(const VT*)(xb + (size_t)(u / upp) * c); } \
        _Pragma("unroll") for (int r = 0; r < GN_UNROLL; r++) { \
            int u = u0 + r * step; if (u >= nu) break; \
            if (cached) cache[u] = v[r]; \
            const T* e = (const T*)&v[r]; \
            _Pragma("unroll") for (int k = 0; k < V; k++) s += LD(e[k]); \
        } \
    } \
    float mean = group_sum(s, sh, gl, gb, upg, upp) / n; \
    float q = 0.0f; \
    for (int u0 = threadIdx.x; u0 < nu; u0 += GN_UNROLL * step) { \
        VT v[GN_UNROLL]; \
        _Pragma("unroll") for (int r = 0; r < GN_UNROLL; r++) { int u = u0 + r * step; if (u < nu) v[r] = cached ? cache[u] : *(const VT*)(xb + (size_t)(u / upp) * c); } \
        _Pragma("unroll") for (int r = 0; r < GN_UNROLL; r++) { \
            int u = u0 + r * step; if (u >= nu) break; \
            const T* e = (const T*)&v[r]; \
            _Pragma("unroll") for (int k = 0; k < V; k++) { float d = LD(e[k]) - mean; q += d * d; } \
        } \
    } \
    float rstd = rsqrtf(group_sum(q, sh, gl, gb, upg, upp) / n + eps); \
    float wc[V], bc[V]; \
    _Pragma("unroll") for (int k = 0; k < V; k++) { int ch = g0 * cpg + j * V + k; wc[k] = LD(w[ch]) * rstd; bc[k] = LD(b[ch]); } \
    for (int u0 = threadIdx.x; u0 < nu; u0 += GN_UNROLL * step) { \
        VT v[GN_UNROLL]; \
        _Pragma("unroll") for (int r = 0; r < GN_UNROLL; r++) { int u = u0 + r * step; if (u < nu) v[r] = cached ? cache[u] : *(const VT*)(xb + (size_t)(u / upp) * c); } \
        _Pragma("unroll") for (int r = 0; r < GN_UNROLL; r++) { \
            int u = u0 + r * step; if (u >= nu) break; \
            T* e = (T*)&v[r]; \
            _Pragma("unroll") for (int k = 0; k < V; k++) { \
                float z = (LD(e[k]) - mean) * wc[k] + bc[k]; \
                e[k] = ST(silu ? z / (1.0f + __expf(-z)) : z); \
            } \
            *(VT*)(yb + (size_t)(u / upp) * c) = v[r]; \
        } \
    } \
}
GROUP_NORM_NHWC(group_norm_nhwc4_f32, float, ld_f32, st_f32, uint4, 4)
GROUP_NORM_NHWC(group_norm_nhwc2_f32, float, ld_f32, st_f32, uint2, 2)
GROUP_NORM_NHWC(group_norm_nhwc1_f32, float, ld_f32, st_f32, float, 1)
GROUP_NORM_NHWC(group_norm_nhwc8_f16, unsigned short, ld_f16, st_f16, uint4, 8)
GROUP_NORM_NHWC(group_norm_nhwc4_f16, unsigned short, ld_f16, st_f16, uint2, 4)
GROUP_NORM_NHWC(group_norm_nhwc2_f16, unsigned short, ld_f16, st_f16, unsigned int, 2)
GROUP_NORM_NHWC(group_norm_nhwc1_f16, unsigned short, ld_f16, st_f16, unsigned short, 1)
GROUP_NORM_NHWC(group_norm_nhwc8_bf16, unsigned short, ld_bf16, st_bf16, uint4, 8)
GROUP_NORM_NHWC(group_norm_nhwc4_bf16, unsigned short, ld_bf16, st_bf16, uint2, 4)
GROUP_NORM_NHWC(group_norm_nhwc2_bf16, unsigned short, ld_bf16, st_bf16, unsigned int, 2)
GROUP_NORM_NHWC(group_norm_nhwc1_bf16, unsigned short, ld_bf16, st_bf16, unsigned short, 1)

// The fused backward of group_norm_train (f32): one block per (sample, group) chunk. Writes
// dx for the chunk and, per channel of the chunk, the sample's sums of delta * xhat (pw) and
// delta (pb); see GroupNormBackward in kernels.rs for the formulas.
__device__ __forceinline__ float gn_delta(float g, float xn, float wc, float bc, int silu) {
    if (!silu) return g;
    float z = xn * wc + bc;
    float s = 1.0f / (1.0f + __expf(-z));
    return g * s * (1.0f + z * (1.0f - s));
}
extern "C" __global__ void group_norm_backward_f32(const float* x, const float* wb, const float* gy, float* gx, float* pw, float* pb, int n, int cpg, int hw, int groups, float eps, int silu) {
    __shared__ float sh[32];
    int bg = blockIdx.x; int g = bg % groups; int c_all = groups * cpg;
    const float* w = wb; const float* b = wb + c_all;
    const float* xp = x + (size_t)bg * n; const float* gp = gy + (size_t)bg * n; float* gxp = gx + (size_t)bg * n;
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += xp[i];
    float mean = block_sum(s, sh) / n;
    float q = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { float d = xp[i] - mean; q += d * d; }
    float r = rsqrtf(block_sum(q, sh) / n + eps);
    float a1 = 0.0f, a2 = 0.0f;
    size_t row = (size_t)(bg / groups) * c_all;
    for (int k = 0; k < cpg; k++) {
        int c = g * cpg + k;
        float wc = w[c], bc = b[c];
        float sb = 0.0f, sw = 0.0f;
        for (int i = threadIdx.x; i < hw; i += blockDim.x) {
            int j = k * hw + i;
            float xn = (xp[j] - mean) * r;
            float d = gn_delta(gp[j], xn, wc, bc, silu);
            sb += d; sw += d * xn;
        }
        sb = block_sum(sb, sh); sw = block_sum(sw, sh);
        if (threadIdx.x == 0) { pb[row + c] = sb; pw[row + c] = sw; }
        a1 += wc * sb; a2 += wc * sw;
    }
    float m1 = a1 / n, m2 = a2 / n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        int c = g * cpg + i / hw;
        float wc = w[c];
        float xn = (xp[i] - mean) * r;
        float d = gn_delta(gp[i], xn, wc, b[c], silu);
        gxp[i] = r * (d * wc - m1 - xn * m2);
    }
}

// Scalar form: any alignment, up to 2^31 elements (32-bit indices; the launcher checks).
#define EPILOGUE(NAME, T, LD, ST) \
extern "C" __global__ void NAME(T* y, const T* b, const T* r, unsigned int total, unsigned int k, unsigned int hw, int per_sample, int has_r, float scale) { \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) { \
        unsigned int nk = i / hw; \
        float v = LD(y[i]) + LD(b[per_sample ? nk : nk % k]); \
        if (has_r) v += LD(r[i]); \
        y[i] = ST(v * scale); \
    } \
}
EPILOGUE(epilogue_f32, float, ld_f32, st_f32)
EPILOGUE(epilogue_f16, unsigned short, ld_f16, st_f16)
EPILOGUE(epilogue_bf16, unsigned short, ld_bf16, st_bf16)

// Vector form: each thread moves 16 bytes (4 f32 or 8 f16/bf16 values) of one image plane;
// needs hw a multiple of the vector width and 16-byte aligned y and r. `hwv` = hw / width.
#define EPILOGUE_VEC(NAME, T, LD, ST) \
extern "C" __global__ void NAME(T* y, const T* b, const T* r, unsigned int nvec, unsigned int k, unsigned int hwv, int per_sample, int has_r, float scale) { \
    const int V = 16 / sizeof(T); \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < nvec; i += gridDim.x * blockDim.x) { \
        unsigned int nk = i / hwv; \
        float bias = LD(b[per_sample ? nk : nk % k]); \
        uint4 yv = ((const uint4*)y)[i]; \
        uint4 rv = has_r ? ((const uint4*)r)[i] : make_uint4(0u, 0u, 0u, 0u); \
        T* ye = (T*)&yv; \
        const T* re = (const T*)&rv; \
        _Pragma("unroll") for (int j = 0; j < V; j++) { \
            float v = LD(ye[j]) + bias; \
            if (has_r) v += LD(re[j]); \
            ye[j] = ST(v * scale); \
        } \
        ((uint4*)y)[i] = yv; \
    } \
}
EPILOGUE_VEC(epilogue_vec_f32, float, ld_f32, st_f32)
EPILOGUE_VEC(epilogue_vec_f16, unsigned short, ld_f16, st_f16)
EPILOGUE_VEC(epilogue_vec_bf16, unsigned short, ld_bf16, st_bf16)

// Channels-last forms, y (N, HW, K): element i has channel i % k and sample i / hwk
// (hwk = HW * K). The vector form needs k a multiple of the vector width, so that a vector's
// channels are consecutive and its bias values too.
#define EPILOGUE_NHWC(NAME, T, LD, ST) \
extern "C" __global__ void NAME(T* y, const T* b, const T* r, unsigned int total, unsigned int k, unsigned int hwk, int per_sample, int has_r, float scale) { \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) { \
        unsigned int kk = i % k; \
        float v = LD(y[i]) + LD(b[per_sample ? (i / hwk) * k + kk : kk]); \
        if (has_r) v += LD(r[i]); \
        y[i] = ST(v * scale); \
    } \
}
EPILOGUE_NHWC(epilogue_nhwc_f32, float, ld_f32, st_f32)
EPILOGUE_NHWC(epilogue_nhwc_f16, unsigned short, ld_f16, st_f16)
EPILOGUE_NHWC(epilogue_nhwc_bf16, unsigned short, ld_bf16, st_bf16)

#define EPILOGUE_NHWC_VEC(NAME, T, LD, ST) \
extern "C" __global__ void NAME(T* y, const T* b, const T* r, unsigned int nvec, unsigned int k, unsigned int hwk, int per_sample, int has_r, float scale) { \
    const int V = 16 / sizeof(T); \
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < nvec; i += gridDim.x * blockDim.x) { \
        unsigned int e0 = i * V; \
        unsigned int kk = e0 % k; \
        const T* bp = b + (per_sample ? (e0 / hwk) * k : 0u) + kk; \
        uint4 yv = ((const uint4*)y)[i]; \
        uint4 rv = has_r ? ((const uint4*)r)[i] : make_uint4(0u, 0u, 0u, 0u); \
        T* ye = (T*)&yv; \
        const T* re = (const T*)&rv; \
        _Pragma("unroll") for (int j = 0; j < V; j++) { \
            float v = LD(ye[j]) + LD(bp[j]); \
            if (has_r) v += LD(re[j]); \
            ye[j] = ST(v * scale); \
        } \
        ((uint4*)y)[i] = yv; \
    } \
}
EPILOGUE_NHWC_VEC(epilogue_nhwc_vec_f32, float, ld_f32, st_f32)
EPILOGUE_NHWC_VEC(epilogue_nhwc_vec_f16, unsigned short, ld_f16, st_f16)
EPILOGUE_NHWC_VEC(epilogue_nhwc_vec_bf16, unsigned short, ld_bf16, st_bf16)

// Channels-last concatenation: out (rows, ca + cb) from a (rows, ca) and b (rows, cb), in
// 16-byte vectors (ca and cb multiples of the vector width, so no vector straddles the two).
extern "C" __global__ void concat_last_vec(const uint4* a, const uint4* b, uint4* out, unsigned int nvec, unsigned int ca, unsigned int cb) {
    unsigned int ct = ca + cb;
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < nvec; i += gridDim.x * blockDim.x) {
        unsigned int row = i / ct, col = i - row * ct;
        out[i] = col < ca ? a[(size_t)row * ca + col] : b[(size_t)row * cb + (col - ca)];
    }
}

#define SOFTMAX(NAME, T, LD, ST) \
extern "C" __global__ void NAME(T* x, int n, long long rows, float scale) { \
    long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; \
    int lane = threadIdx.x & 31; \
    if (row >= rows) return; \
    T* r = x + row * n; \
    float m = -__int_as_float(0x7f800000); \
    for (int i = lane; i < n; i += 32) m = fmaxf(m, LD(r[i])); \
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o)); \
    float s = 0.0f; \
    for (int i = lane; i < n; i += 32) s += expf((LD(r[i]) - m) * scale); \
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o); \
    float inv = 1.0f / s; \
    for (int i = lane; i < n; i += 32) r[i] = ST(expf((LD(r[i]) - m) * scale) * inv); \
}
SOFTMAX(softmax_f32, float, ld_f32, st_f32)
SOFTMAX(softmax_f16, unsigned short, ld_f16, st_f16)
SOFTMAX(softmax_bf16, unsigned short, ld_bf16, st_bf16)
"#;

    fn ptx() -> Result<&'static str> {
        static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
        PTX.get_or_init(|| {
            let opts = CompileOptions {
                arch: Some("compute_80"),
                ..Default::default()
            };
            compile_ptx_with_opts(SRC, opts)
                .map(|p| p.to_src())
                .map_err(|e| format!("NVRTC could not compile the fused kernels: {e:?}"))
        })
        .as_ref()
        .map(|s| s.as_str())
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    /// The elements of a contiguous CUDA tensor as a typed view.
    pub(crate) fn view<'a, T: CudaDType>(
        (st, l): (&'a CudaStorage, &Layout),
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
        let (a, z) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "a fused kernel got a non-contiguous input {:?}",
                l.dims()
            ))
        })?;
        Ok(st.as_cuda_slice::<T>()?.slice(a..z))
    }

    fn launch<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        name: &str,
        s: [(&CudaStorage, &Layout); 3],
        (b, c, hw): (usize, usize, usize),
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> Result<CudaStorage> {
        let dev = s[0].0.device().clone();
        let (x, w, bias) = (view::<T>(s[0])?, view::<T>(s[1])?, view::<T>(s[2])?);
        let total = b * c * hw;
        let mut y = unsafe { dev.alloc::<T>(total)? };
        let chunk = c / groups * hw;
        let size = std::mem::size_of::<T>();
        // 16-byte vectors when the planes split into whole vectors and x starts aligned (the
        // allocations themselves are 256-byte aligned).
        let vec = hw.is_multiple_of(16 / size) && (s[0].1.start_offset() * size).is_multiple_of(16);
        let name = if vec {
            name.replace("group_norm_", "group_norm_vec_")
        } else {
            name.to_string()
        };
        let func = dev.get_or_load_custom_func(&name, "qtaylor_group_norm", ptx()?)?;
        let smem = chunk * size;
        // Up to 48 KiB of shared memory per block without opting in (less the kernel's own
        // 128 B); up to 64 KiB with the function's opt-in (sm_70 and later), e.g. the
        // 12-channel chunks of 384 channels at 32×32 in f32. Larger chunks are read from
        // global memory three times instead.
        let opt_in = 64 * 1024;
        let cached = smem <= 48 * 1024 - 256
            || (smem <= opt_in - 256
                && func
                    .set_attribute(
                        candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem as i32,
                    )
                    .is_ok());
        let smem = if cached { smem as u32 } else { 0 };
        let (n, cpg, hw_i, g) = (
            (c / groups * hw) as i32,
            (c / groups) as i32,
            hw as i32,
            groups as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: ((b * groups) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem,
        };
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&w);
        builder.arg(&bias);
        builder.arg(&mut y);
        builder.arg(&n);
        builder.arg(&cpg);
        builder.arg(&hw_i);
        builder.arg(&g);
        builder.arg(&eps);
        let silu = i32::from(silu);
        builder.arg(&silu);
        let cached = i32::from(cached);
        builder.arg(&cached);
        unsafe { builder.launch(cfg) }.w()?;
        drop(builder);
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }

    /// The channels-last group norm (`GROUP_NORM_NHWC`): `d` = (batch, channels, pixels).
    fn launch_nhwc<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        dtype: &str,
        s: [(&CudaStorage, &Layout); 3],
        (b, c, hw): (usize, usize, usize),
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> Result<CudaStorage> {
        let dev = s[0].0.device().clone();
        let (x, w, bias) = (view::<T>(s[0])?, view::<T>(s[1])?, view::<T>(s[2])?);
        let total = b * c * hw;
        if total > i32::MAX as usize {
            candle_core::bail!("group norm: {total} elements exceed 2^31");
        }
        let mut y = unsafe { dev.alloc::<T>(total)? };
        let size = std::mem::size_of::<T>();
        let cpg = c / groups;
        // The widest unit of consecutive channels that divides a group and keeps every unit
        // aligned to its size (the allocations themselves are 256-byte aligned).
        let offset = s[0].1.start_offset() * size;
        let v = [16 / size, 8 / size, 4 / size, 1]
            .into_iter()
            .find(|&v| cpg.is_multiple_of(v) && offset.is_multiple_of(v * size))
            .unwrap_or(1);
        // Groups per block: a power of two, as many as keep a warp's lanes on whole runs of
        // at most `run_bytes` of a pixel (64 by default, so that a warp reads whole 32-byte
        // sectors; QTAYLOR_GN_NHWC_BYTES), while the
        // grid keeps at least 512 blocks (about four per SM of an H200); one group per block
        // for small batches and for unit counts per group that are not powers of two.
        let upg = cpg / v;
        let run_bytes = super::gn_run_bytes()?;
        let mut gb = 1;
        if upg.is_power_of_two() {
            while groups.is_multiple_of(2 * gb)
                && 2 * gb * upg <= 32
                && 2 * gb * cpg * size <= run_bytes
                && b * groups / (2 * gb) >= 512
            {
                gb *= 2;
            }
        }
        let func = dev.get_or_load_custom_func(
            &format!("group_norm_nhwc{v}_{dtype}"),
            "qtaylor_group_norm",
            ptx()?,
        )?;
        let smem = gb * cpg * hw * size;
        let opt_in = 100 * 1024;
        let cached = smem <= 48 * 1024 - 256
            || (smem <= opt_in - 256
                && func
                    .set_attribute(
                        candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        smem as i32,
                    )
                    .is_ok());
        // About 256 threads, a multiple of both the warp size (for the reductions) and upp =
        // gb·upg (so that each thread keeps one unit position): lcm(32, upp) times as many as
        // fit in 256, at least once.
        let upp = gb * upg;
        let gcd = |mut a: usize, mut b: usize| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let lcm = 32 * upp / gcd(32, upp);
        let threads = lcm * (256 / lcm).max(1);
        let cfg = LaunchConfig {
            grid_dim: ((b * groups / gb) as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: if cached { smem as u32 } else { 0 },
        };
        let (hw_i, c_i, cpg_i, g) = (hw as i32, c as i32, cpg as i32, groups as i32);
        let gb_i = gb as i32;
        let (silu, cached) = (i32::from(silu), i32::from(cached));
        let mut builder = func.builder();
        builder.arg(&x);
        builder.arg(&w);
        builder.arg(&bias);
        builder.arg(&mut y);
        builder.arg(&hw_i);
        builder.arg(&c_i);
        builder.arg(&cpg_i);
        builder.arg(&gb_i);
        builder.arg(&g);
        builder.arg(&eps);
        builder.arg(&silu);
        builder.arg(&cached);
        unsafe { builder.launch(cfg) }.w()?;
        drop(builder);
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn group_norm(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        groups: usize,
        eps: f32,
        silu: bool,
        channels_last: bool,
    ) -> Result<(CudaStorage, Shape)> {
        let s = [(s1, l1), (s2, l2), (s3, l3)];
        if channels_last {
            let d = super::dims_channels_last(l1, l2, groups)?;
            let out = match s1.dtype() {
                DType::F32 => launch_nhwc::<f32>("f32", s, d, groups, eps, silu)?,
                DType::F16 => launch_nhwc::<half::f16>("f16", s, d, groups, eps, silu)?,
                DType::BF16 => launch_nhwc::<half::bf16>("bf16", s, d, groups, eps, silu)?,
                dt => candle_core::bail!("group_norm on CUDA: dtype {dt:?} is not supported"),
            };
            return Ok((out, l1.shape().clone()));
        }
        let d = super::dims(l1, l2, groups)?;
        let out = match s1.dtype() {
            DType::F32 => launch::<f32>("group_norm_f32", s, d, groups, eps, silu)?,
            DType::F16 => launch::<half::f16>("group_norm_f16", s, d, groups, eps, silu)?,
            DType::BF16 => launch::<half::bf16>("group_norm_bf16", s, d, groups, eps, silu)?,
            dt => candle_core::bail!("group_norm on CUDA: dtype {dt:?} is not supported"),
        };
        Ok((out, l1.shape().clone()))
    }

    /// [`super::GroupNormBackward`] on CUDA (f32): `[∂L/∂x, P_γ, P_β]` in one allocation.
    pub(crate) fn group_norm_backward(
        x: (&CudaStorage, &Layout),
        wb: (&CudaStorage, &Layout),
        gy: (&CudaStorage, &Layout),
        groups: usize,
        eps: f32,
        silu: bool,
    ) -> Result<(CudaStorage, Shape)> {
        let d = x.1.dims();
        if x.0.dtype() != DType::F32
            || d.len() < 2
            || !d[1].is_multiple_of(groups)
            || wb.1.dims() != [2 * d[1]]
            || gy.1.dims() != d
        {
            candle_core::bail!(
                "group norm backward on CUDA: input {d:?} {:?}, affine {:?}, gradient {:?}",
                x.0.dtype(),
                wb.1.dims(),
                gy.1.dims()
            );
        }
        let (b, c) = (d[0], d[1]);
        let hw: usize = d[2..].iter().product();
        let total = b * c * hw;
        if total > i32::MAX as usize {
            candle_core::bail!("group norm backward: {total} elements exceed 2^31");
        }
        let dev = x.0.device().clone();
        let (xv, wv, gv) = (view::<f32>(x)?, view::<f32>(wb)?, view::<f32>(gy)?);
        let mut out = unsafe { dev.alloc::<f32>(total + 2 * b * c)? };
        {
            let (mut gx, mut rest) = out.split_at_mut(total);
            let (mut pw, mut pb) = rest.split_at_mut(b * c);
            let func = dev.get_or_load_custom_func(
                "group_norm_backward_f32",
                "qtaylor_group_norm",
                ptx()?,
            )?;
            let cfg = LaunchConfig {
                grid_dim: ((b * groups) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (n, cpg, hw_i, g) = (
                (c / groups * hw) as i32,
                (c / groups) as i32,
                hw as i32,
                groups as i32,
            );
            let silu = i32::from(silu);
            let mut builder = func.builder();
            builder.arg(&xv);
            builder.arg(&wv);
            builder.arg(&gv);
            builder.arg(&mut gx);
            builder.arg(&mut pw);
            builder.arg(&mut pb);
            builder.arg(&n);
            builder.arg(&cpg);
            builder.arg(&hw_i);
            builder.arg(&g);
            builder.arg(&eps);
            builder.arg(&silu);
            unsafe { builder.launch(cfg) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(total + 2 * b * c),
        ))
    }

    /// [`super::concat_channels_last`] on CUDA: `(rows, ca)` and `(rows, cb)` elements of
    /// `size` bytes, both counts multiples of 16 / size (checked by the caller).
    pub(crate) fn concat_last(
        a: (&CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        (rows, ca, cb): (usize, usize, usize),
    ) -> Result<CudaStorage> {
        fn go<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
            a: (&CudaStorage, &Layout),
            b: (&CudaStorage, &Layout),
            (rows, ca, cb): (usize, usize, usize),
        ) -> Result<CudaStorage> {
            let dev = a.0.device().clone();
            let width = 16 / std::mem::size_of::<T>();
            let (av, bv) = (view::<T>(a)?, view::<T>(b)?);
            let total = rows * (ca + cb);
            let mut out = unsafe { dev.alloc::<T>(total)? };
            let nvec = total / width;
            if nvec > u32::MAX as usize / 2 {
                candle_core::bail!("concatenation: {total} elements exceed the kernel's index");
            }
            let f = dev.get_or_load_custom_func("concat_last_vec", "qtaylor_group_norm", ptx()?)?;
            let cfg = LaunchConfig {
                grid_dim: (nvec.div_ceil(256).clamp(1, 65_535 * 8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (n, va, vb) = (nvec as u32, (ca / width) as u32, (cb / width) as u32);
            let mut builder = f.builder();
            builder.arg(&av);
            builder.arg(&bv);
            builder.arg(&mut out);
            builder.arg(&n);
            builder.arg(&va);
            builder.arg(&vb);
            unsafe { builder.launch(cfg) }.w()?;
            drop(builder);
            Ok(CudaStorage::wrap_cuda_slice(out, dev))
        }
        match a.0.dtype() {
            DType::F32 => go::<f32>(a, b, (rows, ca, cb)),
            DType::F16 => go::<half::f16>(a, b, (rows, ca, cb)),
            DType::BF16 => go::<half::bf16>(a, b, (rows, ca, cb)),
            dt => candle_core::bail!("concatenation on CUDA: dtype {dt:?} is not supported"),
        }
    }

    fn view_mut<'a, T: CudaDType>(
        st: &'a mut CudaStorage,
        l: &Layout,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaViewMut<'a, T>> {
        let (a, z) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("conv epilogue: non-contiguous output".into())
        })?;
        Ok(st.as_cuda_slice_mut::<T>()?.slice_mut(a..z))
    }

    fn launch_epilogue<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        name: &str,
        y: (&mut CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        r: Option<(&CudaStorage, &Layout)>,
        d: super::EpilogueDims,
        scale: f32,
    ) -> Result<()> {
        let dev = b.0.device().clone();
        let total = d.n * d.k * d.hw;
        // 32-bit indices: up to 2³¹ elements, so that the grid-stride loop's last step
        // (i + grid size < 2³¹ + 2²⁷) cannot wrap around.
        if total > i32::MAX as usize {
            candle_core::bail!(
                "conv epilogue: {total} elements exceed the kernel's 32-bit index (2^31)"
            );
        }
        // 16-byte vectors where every vector lies in one plane and starts aligned (the
        // allocations themselves are 256-byte aligned).
        let width = 16 / std::mem::size_of::<T>();
        let aligned = |l: &Layout| (l.start_offset() * std::mem::size_of::<T>()).is_multiple_of(16);
        // Channels last: every vector lies in one pixel's channels (and the bias's).
        let whole = if d.channels_last {
            d.k.is_multiple_of(width)
        } else {
            d.hw.is_multiple_of(width)
        };
        let vec = whole && aligned(y.1) && r.is_none_or(|r| aligned(r.1));
        let bv = view::<T>(b)?;
        let rv = r.map(view::<T>).transpose()?;
        let mut yv = view_mut::<T>(y.0, y.1)?;
        let name = format!(
            "epilogue{}{}_{}",
            if d.channels_last { "_nhwc" } else { "" },
            if vec { "_vec" } else { "" },
            name.trim_start_matches("epilogue_")
        );
        let func = dev.get_or_load_custom_func(&name, "qtaylor_group_norm", ptx()?)?;
        // The kernels' third size: the plane (in vectors if `vec`) or, channels last, the
        // sample's H·W·K elements.
        let (items, hw) = match (d.channels_last, vec) {
            (true, true) => (total / width, d.hw * d.k),
            (true, false) => (total, d.hw * d.k),
            (false, true) => (total / width, d.hw / width),
            (false, false) => (total, d.hw),
        };
        let cfg = LaunchConfig {
            grid_dim: (items.div_ceil(256).clamp(1, 65_535 * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (items, k, hw) = (items as u32, d.k as u32, hw as u32);
        let (per_sample, has_r) = (i32::from(d.per_sample), i32::from(rv.is_some()));
        let mut builder = func.builder();
        builder.arg(&mut yv);
        builder.arg(&bv);
        match &rv {
            Some(r) => builder.arg(r),
            None => builder.arg(&bv),
        };
        builder.arg(&items);
        builder.arg(&k);
        builder.arg(&hw);
        builder.arg(&per_sample);
        builder.arg(&has_r);
        builder.arg(&scale);
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }

    pub(crate) fn epilogue(
        y: (&mut CudaStorage, &Layout),
        b: (&CudaStorage, &Layout),
        r: Option<(&CudaStorage, &Layout)>,
        d: super::EpilogueDims,
        scale: f32,
    ) -> Result<()> {
        match b.0.dtype() {
            DType::F32 => launch_epilogue::<f32>("epilogue_f32", y, b, r, d, scale),
            DType::F16 => launch_epilogue::<half::f16>("epilogue_f16", y, b, r, d, scale),
            DType::BF16 => launch_epilogue::<half::bf16>("epilogue_bf16", y, b, r, d, scale),
            dt => candle_core::bail!("conv epilogue on CUDA: dtype {dt:?} is not supported"),
        }
    }

    fn launch_softmax<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        name: &str,
        x: (&mut CudaStorage, &Layout),
        n: usize,
        scale: f32,
    ) -> Result<()> {
        let dev = x.0.device().clone();
        let rows = (x.1.shape().elem_count() / n) as i64;
        let mut xv = view_mut::<T>(x.0, x.1)?;
        let func = dev.get_or_load_custom_func(name, "qtaylor_group_norm", ptx()?)?;
        let cfg = LaunchConfig {
            grid_dim: (((rows + 7) / 8) as u32, 1, 1), // 8 rows (warps) per block
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = n as i32;
        let mut builder = func.builder();
        builder.arg(&mut xv);
        builder.arg(&n);
        builder.arg(&rows);
        builder.arg(&scale);
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }

    pub(crate) fn softmax(x: (&mut CudaStorage, &Layout), n: usize, scale: f32) -> Result<()> {
        match x.0.dtype() {
            DType::F32 => launch_softmax::<f32>("softmax_f32", x, n, scale),
            DType::F16 => launch_softmax::<half::f16>("softmax_f16", x, n, scale),
            DType::BF16 => launch_softmax::<half::bf16>("softmax_bf16", x, n, scale),
            dt => candle_core::bail!("softmax on CUDA: dtype {dt:?} is not supported"),
        }
    }
}

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
        cuda::softmax((x, l), n, self.scale)
    }
}

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
    n: usize,
    k: usize,
    hw: usize,
    per_sample: bool,
    /// `(N, HW, K)` instead of `(N, K, HW)`.
    channels_last: bool,
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
        cuda::epilogue((y, ly), (b, lb), None, d, self.scale)
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
        cuda::epilogue((y, ly), (b, lb), Some((r, lr)), d, self.scale)
    }
}

/// A 3×3, stride 1, padding 1 convolution of a contiguous f32 CPU input `(B, C, H, W)` with
/// weights `w2 = (Cout, C·9)` (the PyTorch weight reshaped) and bias `(Cout,)`. Images are
/// taken in tiles of about 2 M im2col entries (so the buffer stays in cache-friendly sizes and
/// is reused): per tile an im2col matrix `(C·9, tile·H·W)` built row by row from shifted,
/// zero-padded copies, one matrix product (N = tile·H·W stays large at the 4×4 level), and
/// the `(Cout, tile, H·W)` result written back as `(B, Cout, H, W)` with the bias added.
pub fn conv3x3_cpu_f32(x: &Tensor, w2: &Tensor, bias: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    let (b, c, h, w) = x.dims4()?;
    let cout = w2.dim(0)?;
    let hw = h * w;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("conv3x3_cpu_f32 on a non-CPU tensor");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("conv3x3_cpu_f32: non-contiguous input".into()))?;
    let xs = &cpu.as_slice::<f32>()?[start..end];
    let bias: Vec<f32> = bias.to_vec1()?;
    // Tiles of a fixed number of images (from the layer's shape, not the batch); a last,
    // partial tile is padded (its spare columns hold stale values and are discarded). Every
    // image thus goes through a product of the same shape at the same column offset whatever
    // the batch, so its result does not depend on the batch (a matrix product's rounding can
    // depend on its column count).
    let tile = (2_000_000 / (c * 9 * hw)).max(1);
    let n = tile * hw;
    let mut col = vec![0f32; c * 9 * n];
    let mut out = vec![0f32; b * cout * hw];
    for b0 in (0..b).step_by(tile) {
        let nb = tile.min(b - b0);
        fill_im2col(xs, (c, h, w), b0, nb, n, &mut col);
        let colt = Tensor::from_slice(&col, (c * 9, n), &candle_core::Device::Cpu)?;
        let prod = w2.matmul(&colt)?; // (Cout, tile·HW)
        let (ps, pl) = prod.storage_and_layout();
        let candle_core::Storage::Cpu(pc) = &*ps else {
            candle_core::bail!("conv3x3_cpu_f32: product not on the CPU");
        };
        let (pa, pz) = pl
            .contiguous_offsets()
            .expect("a fresh product is contiguous");
        let prod = &pc.as_slice::<f32>()?[pa..pz];
        out[b0 * cout * hw..(b0 + nb) * cout * hw]
            .par_chunks_mut(hw)
            .enumerate()
            .for_each(|(i, dst)| {
                let (bi, co) = (i / cout, i % cout);
                let src = &prod[co * n + bi * hw..co * n + (bi + 1) * hw];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = s + bias[co];
                }
            });
    }
    drop(storage);
    Tensor::from_vec(out, (b, cout, h, w), &candle_core::Device::Cpu)
}

/// Fills `dst` (`C·9` rows of `stride ≥ nb·H·W` entries) with the im2col matrix of images
/// `b0 .. b0 + nb` of a contiguous f32 batch `xs` of shape `(·, C, H, W)`: row
/// `c·9 + ky·3 + kx`, column `bi·H·W + y·W + x` holds `x[b0 + bi, c, y + ky − 1, x + kx − 1]`
/// (zero outside); columns from `nb·H·W` on are left as they are.
fn fill_im2col(
    xs: &[f32],
    (c, h, w): (usize, usize, usize),
    b0: usize,
    nb: usize,
    stride: usize,
    dst: &mut [f32],
) {
    use rayon::prelude::*;
    let hw = h * w;
    debug_assert!(stride >= nb * hw);
    dst[..c * 9 * stride]
        .par_chunks_mut(stride)
        .enumerate()
        .for_each(|(row, dst)| {
            let (ci, k) = (row / 9, row % 9);
            let (dy, dx) = (k as isize / 3 - 1, k as isize % 3 - 1);
            let (x0, x1) = (
                (-dx).max(0) as usize,
                (w as isize - dx).min(w as isize) as usize,
            );
            for bi in 0..nb {
                let src = &xs[((b0 + bi) * c + ci) * hw..((b0 + bi) * c + ci + 1) * hw];
                let o = &mut dst[bi * hw..(bi + 1) * hw];
                for y in 0..h {
                    let sy = y as isize + dy;
                    let row_out = &mut o[y * w..(y + 1) * w];
                    if sy < 0 || sy >= h as isize {
                        row_out.fill(0.0);
                        continue;
                    }
                    let s0 = sy as usize * w;
                    row_out[..x0].fill(0.0);
                    row_out[x1..].fill(0.0);
                    let (a, z) = ((x0 as isize + dx) as usize, (x1 as isize + dx) as usize);
                    row_out[x0..x1].copy_from_slice(&src[s0 + a..s0 + z]);
                }
            }
        });
}

/// The im2col matrix `(C·9, B·H·W)` of a batch `(B, C, H, W)` (3×3 window, padding 1; the
/// row and column order of [`fill_im2col`]).
fn im2col3x3(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("im2col3x3: CPU tensor expected");
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("im2col3x3: non-contiguous".into()))?;
        let mut col = vec![0f32; c * 9 * b * h * w];
        fill_im2col(
            &cpu.as_slice::<f32>()?[start..end],
            (c, h, w),
            0,
            b,
            b * h * w,
            &mut col,
        );
        drop(storage);
        return Tensor::from_vec(col, (c * 9, b * h * w), x.device());
    }
    let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let mut views = Vec::with_capacity(9);
    for ky in 0..3 {
        for kx in 0..3 {
            views.push(xp.narrow(2, ky, h)?.narrow(3, kx, w)?);
        }
    }
    // (B, C, 9, H, W) → (C, 9, B, H, W)
    Tensor::stack(&views, 2)?
        .permute((1, 2, 0, 3, 4))?
        .contiguous()?
        .reshape((c * 9, b * h * w))
}

/// Opens CUDA device `ordinal` with memory freed back to the stream-ordered pool kept there
/// (release threshold ∞), as PyTorch's caching allocator keeps it: by default the driver
/// returns it at every synchronization and the next pass maps it again (measured 4–8 % of a
/// batch-256 forward on the H200, BENCHMARKS.md §4.2). `QTAYLOR_CUDA_POOL=release` keeps the
/// driver's default.
#[cfg(feature = "cuda")]
pub fn open_cuda(ordinal: usize) -> Result<candle_core::Device> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let dev = candle_core::Device::new_cuda(ordinal)?;
    let candle_core::Device::Cuda(d) = &dev else {
        unreachable!("new_cuda returns a CUDA device")
    };
    if std::env::var("QTAYLOR_CUDA_POOL").map_or(true, |v| v != "release") {
        pool_set(
            default_pool(d)?,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            u64::MAX,
        )?;
    }
    Ok(dev)
}

/// The default CUDA memory pool of the device, which every allocation of this process
/// (cudarc's stream-ordered `cuMemAllocAsync`) comes from.
#[cfg(feature = "cuda")]
fn default_pool(
    d: &candle_core::CudaDevice,
) -> Result<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ctx = d.cuda_stream().context().clone();
    let mut pool = std::ptr::null_mut();
    // SAFETY: the out-pointer names one pool handle; the device comes from a live context.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(candle_core::Error::wrap)?;
    }
    Ok(pool)
}

/// The most device memory that tensors and workspaces held at once since the device was
/// opened, in bytes: the high-water mark of the CUDA memory pool that every allocation of
/// this process comes from (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`), the analogue of PyTorch's
/// `torch.cuda.max_memory_allocated` (memory kept by the pool but not in use, the CUDA
/// context and the libraries' own workspaces are not counted), plus the high-water mark of
/// the graph memory pool that CUDA-graph replays allocate from (counted from the first
/// capture on, [`before_graph_capture`]). `None` off CUDA.
pub fn cuda_peak_allocated(device: &candle_core::Device) -> Result<Option<u64>> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let high = pool_high(default_pool(d)?)?;
        // Passes replayed from CUDA graphs (src/cuda_graph.rs) allocate from the device's
        // graph memory pool instead: counted too.
        let mut graph_high = 0u64;
        // SAFETY: a live device; the attribute is a u64.
        unsafe {
            sys::cuDeviceGetGraphMemAttribute(
                d.cuda_stream().context().cu_device(),
                sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH,
                &mut graph_high as *mut u64 as *mut std::ffi::c_void,
            )
            .result()
            .map_err(candle_core::Error::wrap)?;
        }
        // Before the first capture the sum is the default pool's mark; after it, the larger
        // of the mark the plain passes reached before the capture (whose intermediates were
        // freed and their memory returned, [`before_graph_capture`]) and what both pools
        // reached since.
        let before = CAPTURE_MARKS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(|m| m.get(&d.id()).copied())
            .unwrap_or(0);
        return Ok(Some(before.max(high + graph_high)));
    }
    let _ = device;
    Ok(None)
}

/// A memory pool's high-water mark of memory in use (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`).
#[cfg(feature = "cuda")]
fn pool_high(pool: candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let mut high = 0u64;
    // SAFETY: a valid pool; the attribute is a u64.
    unsafe {
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            &mut high as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .map_err(candle_core::Error::wrap)?;
    }
    Ok(high)
}

/// Sets a u64 attribute of a memory pool.
#[cfg(feature = "cuda")]
fn pool_set(
    pool: candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool,
    attr: candle_core::cuda_backend::cudarc::driver::sys::CUmemPool_attribute,
    mut value: u64,
) -> Result<()> {
    // SAFETY: a valid pool; the attributes set here take a u64.
    unsafe {
        candle_core::cuda_backend::cudarc::driver::sys::cuMemPoolSetAttribute(
            pool,
            attr,
            &mut value as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .map_err(candle_core::Error::wrap)
    }
}

/// Per device, the default pool's high-water mark as it was before the last CUDA graph
/// capture (the largest of them), for [`cuda_peak_allocated`].
#[cfg(feature = "cuda")]
static CAPTURE_MARKS: std::sync::Mutex<
    Option<std::collections::HashMap<candle_core::cuda_backend::DeviceId, u64>>,
> = std::sync::Mutex::new(None);

/// Called by [`crate::cuda_graph`] before it captures a pass, with the stream idle: the
/// plain warm-up pass's intermediates are freed by now, so the default pool gives its unused
/// memory back to the driver (it otherwise keeps everything, [`open_cuda`]) and its high-water
/// mark restarts from what is in use; the mark so far is kept for [`cuda_peak_allocated`].
/// From here on the graph's intermediates live in the graph memory pool instead, so the
/// process does not hold the warm-up's memory and the replayed pass's at once.
#[cfg(feature = "cuda")]
pub fn before_graph_capture(device: &candle_core::Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let candle_core::Device::Cuda(d) = device else {
        return Ok(());
    };
    let pool = default_pool(d)?;
    let high = pool_high(pool)?;
    pool_set(
        pool,
        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
        0,
    )?;
    // SAFETY: a valid pool; trimming keeps memory in use.
    unsafe {
        sys::cuMemPoolTrimTo(pool, 0)
            .result()
            .map_err(candle_core::Error::wrap)?;
    }
    let mut marks = CAPTURE_MARKS.lock().unwrap_or_else(|p| p.into_inner());
    let m = marks
        .get_or_insert_with(Default::default)
        .entry(d.id())
        .or_insert(0);
    *m = (*m).max(high);
    Ok(())
}

/// Without CUDA support: `Device::new_cuda`'s error.
#[cfg(not(feature = "cuda"))]
pub fn open_cuda(ordinal: usize) -> Result<candle_core::Device> {
    candle_core::Device::new_cuda(ordinal)
}

static TF32: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Lets f32 convolutions on CUDA's cuDNN path use TF32 tensor cores (10-bit mantissa
/// products, f32 accumulation), as PyTorch does by default (`torch.backends.cudnn.allow_tf32`).
/// Off by default: f32 convolutions are then exact f32 and match diffusers to about 1e-6.
pub fn set_tf32(on: bool) {
    TF32.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether f32 convolutions may use TF32 ([`set_tf32`]).
pub fn tf32() -> bool {
    TF32.load(std::sync::atomic::Ordering::Relaxed)
}

/// The convolution path a device uses, in words (printed by `qtaylor speed`).
pub fn conv_path(device: &candle_core::Device) -> String {
    if !device.is_cuda() {
        return "candle / tiled im2col (CPU)".into();
    }
    #[cfg(feature = "cudnn")]
    if own_cudnn_conv() {
        return format!(
            "cuDNN, cached plans, algorithm {}, f32 {}",
            crate::conv_cudnn::algo_setting(),
            if tf32() { "TF32" } else { "exact" }
        );
    }
    if cfg!(feature = "cudnn") {
        "candle conv2d (cuDNN implicit precomputed GEMM)".into()
    } else {
        "candle conv2d (im2col + cuBLAS)".into()
    }
}

/// Whether CUDA convolutions take qtaylor's cached-plan cuDNN path ([`crate::conv_cudnn`]):
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
/// graph: [`crate::conv_cudnn::conv2d`] or candle's conv2d on CUDA (see [`own_cudnn_conv`]),
/// candle's conv2d elsewhere.
pub fn conv2d_fast(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if !x.device().is_cuda() {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    #[cfg(feature = "cudnn")]
    if own_cudnn_conv() {
        return crate::conv_cudnn::conv2d(&x.detach(), &w.detach(), padding, stride);
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
/// `(N, H', W', K)`: cuDNN with NHWC descriptors ([`crate::conv_cudnn::conv2d_nhwc`]) on
/// CUDA's cuDNN path; elsewhere the operands move to NCHW and back around [`conv2d_fast`].
pub fn conv2d_nhwc_fast(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    #[cfg(feature = "cudnn")]
    if x.device().is_cuda() && own_cudnn_conv() {
        return crate::conv_cudnn::conv2d_nhwc(&x.detach(), &w.detach(), padding, stride);
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
        return crate::conv_cudnn::conv_transpose2d_nhwc(&x.detach(), &w.detach(), padding, stride);
    }
    through_nchw(x, w, |x, w| conv_transpose2d_fast(x, w, padding, stride))
}

/// A transposed convolution without bias (`w: (Cin, Cout, R, S)`, no output padding,
/// dilation 1) keeping no autograd graph: [`crate::conv_cudnn::conv_transpose2d`] on CUDA's
/// cuDNN path, candle's conv_transpose2d elsewhere.
pub fn conv_transpose2d_fast(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cudnn")]
    if x.device().is_cuda() && own_cudnn_conv() {
        return crate::conv_cudnn::conv_transpose2d(&x.detach(), &w.detach(), padding, stride);
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
/// path: `cudnnConvolutionBackwardFilter`, [`crate::conv_cudnn::conv2d_backward_filter`]).
/// candle's own conv2d backward runs a direct transposed-convolution loop instead.
pub fn conv3x3_train(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let y = conv3x3_fast(&x.detach(), &w.detach())?;
    x.apply_op3(w, &y, Conv3x3Grad)
}

/// Returns its third argument (the convolution computed outside the graph) and supplies the
/// convolution's gradients for the first two.
struct Conv3x3Grad;

/// A copy of a fresh contiguous tensor's storage: the forward of the custom operations that
/// return a result computed outside the autograd graph (`op` names the operation in the error).
pub(crate) fn fresh_copy<S: BackendStorage>(s: &S, l: &Layout, op: &str) -> Result<(S, Shape)> {
    match l.contiguous_offsets() {
        Some((0, end)) if end == l.shape().elem_count() => Ok((s.try_clone(l)?, l.shape().clone())),
        _ => candle_core::bail!("{op}: the forward result must be a fresh contiguous tensor"),
    }
}

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
            let gw = crate::conv_cudnn::conv2d_backward_filter(&x, &g, (3, 3), 1, 1)?;
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
    use candle_core::{Device, Module};

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

    #[test]
    fn fused_group_norm_backward_equals_the_composed_gradients() {
        // f64, so that the two orders of summation agree to rounding; with and without the
        // fused SiLU, 1 and several channels per group, images and flat inputs.
        let dev = Device::Cpu;
        for (shape, groups, silu) in [
            (vec![3, 8, 5, 4], 4, true),
            (vec![3, 8, 5, 4], 4, false),
            (vec![2, 6, 7], 6, true),
            (vec![2, 12, 3, 3], 3, false),
        ] {
            let c = shape[1];
            let x = Tensor::randn(0.5f64, 2.0, shape.as_slice(), &dev).unwrap();
            let w = Tensor::randn(1f64, 0.5, c, &dev).unwrap();
            let b = Tensor::randn(0f64, 0.5, c, &dev).unwrap();
            let probe = Tensor::randn(0f64, 1.0, shape.as_slice(), &dev).unwrap();
            let run = |fused: bool| {
                let vs: Vec<candle_core::Var> = [&x, &w, &b]
                    .iter()
                    .map(|t| candle_core::Var::from_tensor(t).unwrap())
                    .collect();
                let (xv, wv, bv) = (vs[0].as_tensor(), vs[1].as_tensor(), vs[2].as_tensor());
                let y = if fused {
                    group_norm_train(xv, wv, bv, groups, 1e-5, silu).unwrap()
                } else {
                    group_norm_autograd(xv, wv, bv, groups, 1e-5, silu).unwrap()
                };
                let g = (&y * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let mut out = vec![y];
                out.extend(vs.iter().map(|v| g.get(v.as_tensor()).unwrap().clone()));
                out
            };
            let (want, got) = (run(false), run(true));
            for (what, (a, b)) in ["y", "dx", "dw", "db"].iter().zip(want.iter().zip(&got)) {
                let d = crate::ops::max_abs_diff(a, b).unwrap();
                let m = a
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(
                    d <= 1e-10 * m.max(1.0),
                    "{shape:?} silu {silu}: {what} differs by {d}"
                );
            }
        }
    }

    #[test]
    fn conv_epilogue_equals_bias_time_embedding_residual_and_scale_composed() {
        let dev = Device::Cpu;
        let y = Tensor::randn(0f32, 1.0, (3, 4, 5, 2), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 4, &dev).unwrap();
        let tb = Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (3, 4, 5, 2), &dev).unwrap();
        let close = |a: &Tensor, b: &Tensor| crate::ops::max_abs_diff(a, b).unwrap() < 1e-6;
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

    #[test]
    fn in_place_softmax_equals_candles_softmax_of_the_scaled_scores() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 3.0, (2, 5, 7), &dev).unwrap();
        let want = candle_nn::ops::softmax_last_dim(&(&x * 0.25).unwrap()).unwrap();
        let got = x.copy().unwrap();
        softmax_last_dim_inplace(&got, 0.25).unwrap();
        let d = crate::ops::max_abs_diff(&want, &got).unwrap() as f32;
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

    #[test]
    fn composed_group_norm_equals_the_fused_kernel() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 8, 3, 5), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.3, 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 8, &dev).unwrap();
        for silu in [false, true] {
            let a = group_norm(&x, &w, &b, 4, 1e-5, silu).unwrap();
            let c = group_norm_autograd(&x, &w, &b, 4, 1e-5, silu).unwrap();
            assert!(crate::ops::max_abs_diff(&a, &c).unwrap() < 1e-5);
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
        let d = crate::ops::max_abs_diff(&silu, &fused).unwrap() as f32;
        assert!(d < 1e-5, "fused SiLU: {d}");
        let d = crate::ops::max_abs_diff(&want, &got).unwrap() as f32;
        assert!(d < 1e-5, "{d}");
    }
}
