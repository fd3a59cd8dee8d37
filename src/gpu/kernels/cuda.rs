//! The CUDA kernels of this folder, compiled at run time with NVRTC (no headers needed:
//! f16/bf16 conversions use PTX `cvt`), and their launchers.

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
    // for small batches and for unit counts per group that are not powers of two. The
    // block's sums run over its threads in an order set by gb, so in deterministic mode gb is
    // the one the reference batch gets, at every batch (src/gpu/determinism.rs).
    let b_choice = if crate::gpu::determinism::deterministic() {
        crate::gpu::determinism::REFERENCE_BATCH
    } else {
        b
    };
    let upg = cpg / v;
    let run_bytes = super::group_norm::gn_run_bytes()?;
    let mut gb = 1;
    if upg.is_power_of_two() {
        while groups.is_multiple_of(2 * gb)
            && 2 * gb * upg <= 32
            && 2 * gb * cpg * size <= run_bytes
            && b_choice * groups / (2 * gb) >= 512
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
        let d = super::group_norm::dims_channels_last(l1, l2, groups)?;
        let out = match s1.dtype() {
            DType::F32 => launch_nhwc::<f32>("f32", s, d, groups, eps, silu)?,
            DType::F16 => launch_nhwc::<half::f16>("f16", s, d, groups, eps, silu)?,
            DType::BF16 => launch_nhwc::<half::bf16>("bf16", s, d, groups, eps, silu)?,
            dt => candle_core::bail!("group_norm on CUDA: dtype {dt:?} is not supported"),
        };
        return Ok((out, l1.shape().clone()));
    }
    let d = super::group_norm::dims(l1, l2, groups)?;
    let out = match s1.dtype() {
        DType::F32 => launch::<f32>("group_norm_f32", s, d, groups, eps, silu)?,
        DType::F16 => launch::<half::f16>("group_norm_f16", s, d, groups, eps, silu)?,
        DType::BF16 => launch::<half::bf16>("group_norm_bf16", s, d, groups, eps, silu)?,
        dt => candle_core::bail!("group_norm on CUDA: dtype {dt:?} is not supported"),
    };
    Ok((out, l1.shape().clone()))
}

/// [`super::group_norm_train::GroupNormBackward`] on CUDA (f32): `[∂L/∂x, P_γ, P_β]` in one allocation.
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
        let func =
            dev.get_or_load_custom_func("group_norm_backward_f32", "qtaylor_group_norm", ptx()?)?;
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
    let (a, z) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("conv epilogue: non-contiguous output".into()))?;
    Ok(st.as_cuda_slice_mut::<T>()?.slice_mut(a..z))
}

fn launch_epilogue<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    name: &str,
    y: (&mut CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    r: Option<(&CudaStorage, &Layout)>,
    d: super::epilogue::EpilogueDims,
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
    d: super::epilogue::EpilogueDims,
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
