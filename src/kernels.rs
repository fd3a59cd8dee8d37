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
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op3_no_bwd(
        &weight.contiguous()?,
        &bias.contiguous()?,
        &GroupNormOp { groups, eps },
    )
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
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

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("group_norm: non-contiguous input".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

fn cpu<T: WithDType>(
    x: &[T],
    w: &[T],
    b: &[T],
    (bs, c, hw): (usize, usize, usize),
    groups: usize,
    eps: f64,
) -> Vec<T> {
    use rayon::prelude::*;
    let per = c / groups * hw;
    let mut y = vec![T::from_f64(0.0); bs * c * hw];
    y.par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .enumerate()
        .for_each(|(bg, (yo, xi))| {
            let g = bg % groups;
            let n = per as f64;
            let mean = xi.iter().map(|v| v.to_f64()).sum::<f64>() / n;
            let var = xi.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
            let rstd = 1.0 / (var + eps).sqrt();
            for (i, (o, v)) in yo.iter_mut().zip(xi).enumerate() {
                let ch = g * (c / groups) + i / hw;
                *o = T::from_f64((v.to_f64() - mean) * rstd * w[ch].to_f64() + b[ch].to_f64());
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
        let d = dims(l1, l2, self.groups)?;
        let (g, e) = (self.groups, self.eps);
        let out = match s1.dtype() {
            DType::F32 => {
                CpuStorage::F32(cpu(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, d, g, e))
            }
            DType::F64 => {
                CpuStorage::F64(cpu(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, d, g, e))
            }
            DType::F16 => {
                CpuStorage::F16(cpu(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, d, g, e))
            }
            DType::BF16 => {
                CpuStorage::BF16(cpu(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, d, g, e))
            }
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
        cuda::group_norm(s1, l1, s2, l2, s3, l3, self.groups, self.eps as f32)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
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

#define GROUP_NORM(NAME, T, LD, ST) \
extern "C" __global__ void NAME(const T* x, const T* w, const T* b, T* y, int n, int cpg, int hw, int groups, float eps) { \
    __shared__ float sh[32]; \
    int bg = blockIdx.x; int g = bg % groups; \
    const T* xp = x + (size_t)bg * n; T* yp = y + (size_t)bg * n; \
    float s = 0.0f; \
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += LD(xp[i]); \
    float mean = block_sum(s, sh) / n; \
    float v = 0.0f; \
    for (int i = threadIdx.x; i < n; i += blockDim.x) { float d = LD(xp[i]) - mean; v += d * d; } \
    float rstd = rsqrtf(block_sum(v, sh) / n + eps); \
    for (int i = threadIdx.x; i < n; i += blockDim.x) { \
        int c = g * cpg + i / hw; \
        yp[i] = ST((LD(xp[i]) - mean) * rstd * LD(w[c]) + LD(b[c])); \
    } \
}
GROUP_NORM(group_norm_f32, float, ld_f32, st_f32)
GROUP_NORM(group_norm_f16, unsigned short, ld_f16, st_f16)
GROUP_NORM(group_norm_bf16, unsigned short, ld_bf16, st_bf16)
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
                .map_err(|e| format!("NVRTC could not compile the group-norm kernel: {e:?}"))
        })
        .as_ref()
        .map(|s| s.as_str())
        .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    fn view<'a, T: CudaDType>(
        (st, l): (&'a CudaStorage, &Layout),
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
        let (a, z) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("group_norm: non-contiguous input".into()))?;
        Ok(st.as_cuda_slice::<T>()?.slice(a..z))
    }

    fn launch<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        name: &str,
        s: [(&CudaStorage, &Layout); 3],
        (b, c, hw): (usize, usize, usize),
        groups: usize,
        eps: f32,
    ) -> Result<CudaStorage> {
        let dev = s[0].0.device().clone();
        let (x, w, bias) = (view::<T>(s[0])?, view::<T>(s[1])?, view::<T>(s[2])?);
        let total = b * c * hw;
        let mut y = unsafe { dev.alloc::<T>(total)? };
        let func = dev.get_or_load_custom_func(name, "qtaylor_group_norm", ptx()?)?;
        let (n, cpg, hw_i, g) = (
            (c / groups * hw) as i32,
            (c / groups) as i32,
            hw as i32,
            groups as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: ((b * groups) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
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
        unsafe { builder.launch(cfg) }.w()?;
        drop(builder);
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn group_norm(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        groups: usize,
        eps: f32,
    ) -> Result<(CudaStorage, Shape)> {
        let d = super::dims(l1, l2, groups)?;
        let s = [(s1, l1), (s2, l2), (s3, l3)];
        let out = match s1.dtype() {
            DType::F32 => launch::<f32>("group_norm_f32", s, d, groups, eps)?,
            DType::F16 => launch::<half::f16>("group_norm_f16", s, d, groups, eps)?,
            DType::BF16 => launch::<half::bf16>("group_norm_bf16", s, d, groups, eps)?,
            dt => candle_core::bail!("group_norm on CUDA: dtype {dt:?} is not supported"),
        };
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

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
        let got = group_norm(&x, &w, &b, 4, 1e-6).unwrap();
        let d = (want - got)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }
}
