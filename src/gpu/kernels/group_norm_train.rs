//! Group norm in an autograd graph, for training: composed of candle operations
//! ([`group_norm_autograd`]) or with one fused backward pass ([`group_norm_train`]).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use super::group_norm::group_norm_forward;
use super::slice;
use crate::gpu::device::fresh_copy;

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
    let y = group_norm_forward(
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
        super::cuda::group_norm_backward(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            self.groups,
            self.eps as f32,
            self.silu,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
                let d = crate::tensor::ops::max_abs_diff(a, b).unwrap();
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
}
