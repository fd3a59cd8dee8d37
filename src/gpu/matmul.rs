//! Matrix products of the models' inference paths: candle's (cuBLAS) by default; in
//! deterministic mode on CUDA ([`crate::gpu::determinism`]) cuBLASLt with one algorithm per
//! shape that does not change with the batch.
//!
//! cuBLAS picks a kernel for the whole problem `(M, N, K, batch count)`. For a small batch
//! count it may split the `K` sum over several blocks and add the parts (split-K), for a large
//! one not, so the same row rounds differently in batches of 1 and 256. Here the product is
//! always a strided batched one whose batch count is the only size that follows the caller's
//! batch: 3-D operands `(B, M, K)·(B, K, N)` keep their batch, and a 2-D product `(M, K)·(K, N)`
//! is run as `M` one-row products against the same `B` (its rows are the callers' samples).
//! The algorithm is cuBLASLt's first heuristic proposal for the problem with batch count
//! [`REFERENCE_BATCH`](crate::gpu::determinism::REFERENCE_BATCH) that uses no split-K and no
//! reduction scheme, on a fixed 32 MiB workspace; the same algorithm then runs at every batch
//! count (a cuBLASLt algorithm is a kernel and its configuration, not tied to the sizes), so
//! each output element is summed by the same kernel in the same order.
//!
//! Row-major `C = A·B` is column-major `Cᵀ = Bᵀ·Aᵀ`: [`column_major`] reads each operand as
//! the column-major matrix (or its transpose) that BLAS wants, without copying.

use candle_core::{DType, Result, Tensor};

/// `a · b` over the last two dimensions (equal leading dimensions; broadcast a weight with
/// `broadcast_left`). Keeps an autograd graph only off the deterministic CUDA path (which is
/// for inference).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if pinned_path(a, b) {
        let out = pinned::matmul(a, b)?;
        crate::gpu::profile::trace_point("matmul", &out)?;
        return Ok(out);
    }
    let out = a.matmul(b)?;
    crate::gpu::profile::trace_point("matmul", &out)?;
    Ok(out)
}

/// Per-sample rows times one shared matrix: `x (B, R, K) · w (K, N)` → `(B, R, N)`. By
/// default one product of `B·R` rows; on the deterministic path a batched product over the
/// `B` samples against the broadcast `w`, so that only the batch count follows the batch.
pub fn matmul_shared(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, r, k) = x.dims3()?;
    if pinned_path(x, w) {
        return matmul(x, &w.broadcast_left(b)?);
    }
    x.reshape((b * r, k))?.matmul(w)?.reshape((b, r, w.dim(1)?))
}

/// Whether products of `a` and `b` take the deterministic mode's pinned cuBLASLt path.
fn pinned_path(a: &Tensor, b: &Tensor) -> bool {
    a.device().is_cuda()
        && crate::gpu::determinism::deterministic()
        && matches!(a.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && !a.track_op()
        && !b.track_op()
}

/// How a column-major BLAS reads one operand: the stored matrix (`rows × cols`, leading
/// dimension `ld`) and whether the product takes its transpose.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ColumnMajor {
    pub trans: bool,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

/// The column-major reading of `Xᵀ` for a row-major view `X` of `r × c` elements with element
/// strides `(sr, sc)`: with `sc = 1` the memory is `Xᵀ` stored column-major (`c × r`, `ld =
/// sr`); with `sr = 1` it is `X` stored column-major (`r × c`, `ld = sc`) and the product takes
/// its transpose. `None` for other strides (the caller copies the operand).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn column_major(r: usize, c: usize, sr: usize, sc: usize) -> Option<ColumnMajor> {
    if sc == 1 || c == 1 {
        let ld = if r == 1 { c } else { sr };
        if ld >= c.max(1) {
            return Some(ColumnMajor {
                trans: false,
                rows: c,
                cols: r,
                ld,
            });
        }
    }
    if sr == 1 || r == 1 {
        let ld = if c == 1 { r } else { sc };
        if ld >= r.max(1) {
            return Some(ColumnMajor {
                trans: true,
                rows: r,
                cols: c,
                ld,
            });
        }
    }
    None
}

/// The leading dimensions of a view collapsed to one batch dimension: `(count, stride)`, or
/// `None` when they do not collapse (strides that are not nested). A broadcast (stride 0)
/// batch collapses to stride 0.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn batch_of(dims: &[usize], strides: &[usize]) -> Option<(usize, usize)> {
    let count = dims.iter().product::<usize>();
    let live: Vec<(usize, usize)> = dims
        .iter()
        .zip(strides)
        .filter(|(d, _)| **d > 1)
        .map(|(d, s)| (*d, *s))
        .collect();
    match live.as_slice() {
        [] => Some((count, 0)),
        [(_, s)] => Some((count, *s)),
        _ => {
            let inner = live.last().map(|p| p.1)?;
            if live.iter().all(|p| p.1 == 0) {
                return Some((count, 0));
            }
            let nested = live.windows(2).all(|w| w[0].1 == w[1].1 * w[1].0);
            nested.then_some((count, inner))
        }
    }
}

#[cfg(feature = "cuda")]
mod pinned {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
    use candle_core::cuda_backend::{CudaDType, DeviceId};
    use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

    use super::{ColumnMajor, batch_of, column_major};
    use crate::gpu::determinism::REFERENCE_BATCH;

    /// The fixed workspace every pinned product runs with.
    const WORKSPACE: usize = 32 << 20;

    pub(super) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let two_d = a.rank() == 2 && b.rank() == 2;
        let (a, b) = if two_d {
            // Rows as the batch: (M, 1, K)·(M, K, N).
            let m = a.dim(0)?;
            (a.unsqueeze(1)?, b.broadcast_left(m)?)
        } else {
            (a.clone(), b.clone())
        };
        let (ra, rb) = (a.rank(), b.rank());
        if ra < 3 || ra != rb || a.dims()[..ra - 2] != b.dims()[..rb - 2] {
            candle_core::bail!(
                "deterministic matmul: operands {:?} and {:?} need equal leading dimensions",
                a.dims(),
                b.dims()
            );
        }
        let out = a.apply_op2_no_bwd(&b, &PinnedMatmul)?;
        if two_d {
            let (m, _, n) = out.dims3()?;
            return out.reshape((m, n));
        }
        Ok(out)
    }

    struct PinnedMatmul;

    /// A product in cuBLAS's column-major terms: `D (m × n) = op(A) (m × k) · op(B) (k × n)`
    /// for `batch` items, operand batch strides in elements.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    struct Problem {
        dtype: DType,
        a: ColumnMajor,
        b: ColumnMajor,
        m: usize,
        n: usize,
        k: usize,
        stride_a: usize,
        stride_b: usize,
        batch: usize,
        /// The largest power of two (≤ 256) dividing every operand's byte offset, leading
        /// dimension and batch stride.
        align: u32,
    }

    impl CustomOp2 for PinnedMatmul {
        fn name(&self) -> &'static str {
            "pinned-matmul"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            candle_core::bail!("pinned-matmul runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let r = l1.dims().len();
            let (lead, (m, k)) = (&l1.dims()[..r - 2], (l1.dims()[r - 2], l1.dims()[r - 1]));
            let n = l2.dims()[r - 1];
            if l2.dims()[r - 2] != k {
                candle_core::bail!(
                    "pinned-matmul: operands {:?} and {:?} do not fit",
                    l1.dims(),
                    l2.dims()
                );
            }
            let st1 = l1.stride();
            let st2 = l2.stride();
            let (ca, cb) = (
                column_major(m, k, st1[r - 2], st1[r - 1]),
                column_major(k, n, st2[r - 2], st2[r - 1]),
            );
            let (ba, bb) = (
                batch_of(lead, &st1[..r - 2]),
                batch_of(&l2.dims()[..r - 2], &st2[..r - 2]),
            );
            let (Some(ca), Some(cb), Some((count, sa)), Some((_, sb))) = (ca, cb, ba, bb) else {
                candle_core::bail!(
                    "pinned-matmul: operand strides {:?} and {:?} are not a strided batch (make them contiguous)",
                    st1,
                    st2
                );
            };
            let size = s1.dtype().size_in_bytes();
            // cuBLAS's A is the caller's B (read as Bᵀ), its B the caller's A (read as Aᵀ).
            let mut align = 256usize;
            for v in [
                l1.start_offset(),
                l2.start_offset(),
                ca.ld,
                cb.ld,
                sa,
                sb,
                n,
                m * n,
            ] {
                if v != 0 {
                    align = align.min(1 << (v * size).trailing_zeros().min(8));
                }
            }
            let p = Problem {
                dtype: s1.dtype(),
                a: cb,
                b: ca,
                m: n,
                n: m,
                k,
                stride_a: sb,
                stride_b: sa,
                batch: count,
                align: align as u32,
            };
            let mut shape = lead.to_vec();
            shape.extend([m, n]);
            let out = match s1.dtype() {
                DType::F32 => run::<f32>(&p, (s2, l2), (s1, l1))?,
                DType::F16 => run::<half::f16>(&p, (s2, l2), (s1, l1))?,
                DType::BF16 => run::<half::bf16>(&p, (s2, l2), (s1, l1))?,
                dt => candle_core::bail!("pinned-matmul: dtype {dt:?} is not supported"),
            };
            Ok((out, Shape::from(shape)))
        }
    }

    /// Layouts and descriptor of one problem (batch count included).
    struct Descs {
        desc: sys::cublasLtMatmulDesc_t,
        a: sys::cublasLtMatrixLayout_t,
        b: sys::cublasLtMatrixLayout_t,
        d: sys::cublasLtMatrixLayout_t,
        algo: sys::cublasLtMatmulAlgo_t,
    }

    impl Drop for Descs {
        fn drop(&mut self) {
            // SAFETY: created by Descs::new and owned here alone.
            unsafe {
                let _ = lt::destroy_matrix_layout(self.a);
                let _ = lt::destroy_matrix_layout(self.b);
                let _ = lt::destroy_matrix_layout(self.d);
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }

    struct State {
        handle: sys::cublasLtHandle_t,
        /// The pinned algorithm per problem without its batch count.
        algos: HashMap<Problem, sys::cublasLtMatmulAlgo_t>,
        descs: HashMap<Problem, Descs>,
        workspace: CudaSlice<u8>,
    }

    impl Drop for State {
        fn drop(&mut self) {
            self.descs.clear();
            // SAFETY: the handle belongs to this state.
            let _ = unsafe { lt::destroy_handle(self.handle) };
        }
    }

    thread_local! {
        static STATES: RefCell<HashMap<DeviceId, State>> = RefCell::new(HashMap::new());
    }

    fn err(what: &str, p: &Problem, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "deterministic matmul (cuBLASLt): {what} failed for {:?} (m {}, n {}, k {}, batch {}, \
             {:?}, {:?}, alignment {} B): {e:?}; without --deterministic the product runs on \
             cuBLAS's own choice",
            p.dtype, p.m, p.n, p.k, p.batch, p.a, p.b, p.align
        ))
    }

    fn data_type(d: DType) -> sys::cudaDataType {
        match d {
            DType::F16 => sys::cudaDataType::CUDA_R_16F,
            DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
            _ => sys::cudaDataType::CUDA_R_32F,
        }
    }

    impl Descs {
        /// Descriptors for `p`; the algorithm is filled in by the caller.
        fn new(p: &Problem) -> Result<Descs> {
            let e = |w: &'static str| move |x| err(w, p, x);
            let dt = data_type(p.dtype);
            let desc = lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )
            .map_err(e("descriptor creation"))?;
            let layout = |rows: usize, cols: usize, ld: usize, stride: usize| {
                let l = lt::create_matrix_layout(dt, rows as u64, cols as u64, ld as i64)
                    .map_err(e("layout creation"))?;
                let (count, stride) = (p.batch as i32, stride as i64);
                // SAFETY: a fresh layout; the values are an i32 and an i64.
                unsafe {
                    lt::set_matrix_layout_attribute(
                        l,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                        &count as *const i32 as *const _,
                        4,
                    )
                    .map_err(e("layout batch count"))?;
                    lt::set_matrix_layout_attribute(
                        l,
                        sys::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                        &stride as *const i64 as *const _,
                        8,
                    )
                    .map_err(e("layout batch stride"))?;
                }
                Ok::<_, candle_core::Error>(l)
            };
            let d = Descs {
                desc,
                a: layout(p.a.rows, p.a.cols, p.a.ld, p.stride_a)?,
                b: layout(p.b.rows, p.b.cols, p.b.ld, p.stride_b)?,
                d: layout(p.m, p.n, p.m, p.m * p.n)?,
                algo: sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            };
            let (ta, tb) = (i32::from(p.a.trans), i32::from(p.b.trans));
            // SAFETY: cublasOperation_t is an i32 enum (N = 0, T = 1).
            unsafe {
                lt::set_matmul_desc_attribute(
                    d.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    &ta as *const i32 as *const _,
                    4,
                )
                .map_err(e("transpose flag"))?;
                lt::set_matmul_desc_attribute(
                    d.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                    &tb as *const i32 as *const _,
                    4,
                )
                .map_err(e("transpose flag"))?;
            }
            Ok(d)
        }
    }

    /// The algorithm for `p` at batch count [`REFERENCE_BATCH`]: cuBLASLt's first proposal
    /// without split-K or a reduction scheme within [`WORKSPACE`].
    fn choose(handle: sys::cublasLtHandle_t, p: &Problem) -> Result<sys::cublasLtMatmulAlgo_t> {
        let reference = Problem {
            batch: REFERENCE_BATCH,
            ..*p
        };
        let d = Descs::new(&reference)?;
        let e = |w: &'static str| move |x| err(w, &reference, x);
        let pref = lt::create_matmul_pref().map_err(e("preference creation"))?;
        let found = (|| {
            let ws = WORKSPACE as u64;
            // SAFETY: a fresh preference; u64 and u32 values as the attributes want.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const _,
                    8,
                )
                .map_err(e("workspace preference"))?;
                use sys::cublasLtMatmulPreferenceAttributes_t as P;
                for attr in [
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                ] {
                    lt::set_matmul_pref_attribute(
                        pref,
                        attr,
                        &reference.align as *const u32 as *const _,
                        4,
                    )
                    .map_err(e("alignment preference"))?;
                }
            }
            const WANT: usize = 16;
            // SAFETY: plain-data results; cuBLASLt writes at most WANT of them.
            let mut results: [sys::cublasLtMatmulHeuristicResult_t; WANT] =
                unsafe { std::mem::zeroed() };
            let mut count = 0i32;
            // SAFETY: descriptors made above for the reference problem.
            unsafe {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    handle,
                    d.desc,
                    d.a,
                    d.b,
                    d.d,
                    d.d,
                    pref,
                    WANT as i32,
                    results.as_mut_ptr(),
                    &mut count,
                )
                .result()
                .map_err(e("heuristic"))?;
            }
            let read = |algo: &sys::cublasLtMatmulAlgo_t,
                        attr: sys::cublasLtMatmulAlgoConfigAttributes_t|
             -> u32 {
                let (mut v, mut got) = (0u32, 0usize);
                // SAFETY: the attributes read are 32-bit values.
                let ok = unsafe {
                    sys::cublasLtMatmulAlgoConfigGetAttribute(
                        algo,
                        attr,
                        &mut v as *mut u32 as *mut _,
                        4,
                        &mut got,
                    )
                };
                if ok == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                    v
                } else {
                    u32::MAX
                }
            };
            use sys::cublasLtMatmulAlgoConfigAttributes_t as C;
            results[..(count.max(0) as usize).min(WANT)]
                .iter()
                .find(|r| {
                    r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
                        && r.workspaceSize <= WORKSPACE
                        && read(&r.algo, C::CUBLASLT_ALGO_CONFIG_SPLITK_NUM) <= 1
                        && read(&r.algo, C::CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME) == 0
                })
                .map(|r| r.algo)
                .ok_or_else(|| {
                    err(
                        "algorithm choice",
                        &reference,
                        format!("none of {count} proposals runs without split-K"),
                    )
                })
        })();
        // SAFETY: created above.
        let _ = unsafe { lt::destroy_matmul_pref(pref) };
        found
    }

    fn run<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        p: &Problem,
        (sa, la): (&CudaStorage, &Layout),
        (sb, lb): (&CudaStorage, &Layout),
    ) -> Result<CudaStorage> {
        let dev = sa.device().clone();
        let stream = dev.cuda_stream();
        let a = sa.as_cuda_slice::<T>()?.slice(la.start_offset()..);
        let b = sb.as_cuda_slice::<T>()?.slice(lb.start_offset()..);
        // SAFETY: every element is written by the product (beta = 0).
        let mut out = unsafe { dev.alloc::<T>(p.batch * p.m * p.n)? };
        STATES.with(|states| -> Result<()> {
            let mut states = states.borrow_mut();
            let state = match states.entry(dev.id()) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    stream
                        .context()
                        .bind_to_thread()
                        .map_err(|e| err("context binding", p, e))?;
                    let handle = lt::create_handle().map_err(|e| err("handle creation", p, e))?;
                    // SAFETY: workspace contents are never read before cuBLASLt writes them.
                    let workspace = unsafe { stream.alloc::<u8>(WORKSPACE) }?;
                    v.insert(State {
                        handle,
                        algos: HashMap::new(),
                        descs: HashMap::new(),
                        workspace,
                    })
                }
            };
            let key = Problem { batch: 0, ..*p };
            let algo = match state.algos.get(&key) {
                Some(a) => *a,
                None => {
                    let a = choose(state.handle, p)?;
                    if std::env::var_os("QTAYLOR_CONV_LOG").is_some() {
                        eprintln!(
                            "pinned matmul: {:?} m {} n {} k {} {:?} {:?}: algorithm {:?}",
                            p.dtype,
                            p.m,
                            p.n,
                            p.k,
                            p.a,
                            p.b,
                            &a.data[..2]
                        );
                    }
                    state.algos.insert(key, a);
                    a
                }
            };
            if !state.descs.contains_key(p) {
                let mut d = Descs::new(p)?;
                d.algo = algo;
                // SAFETY: plain-data result written by the check.
                let mut check: sys::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
                // SAFETY: descriptors of this problem; the algorithm is a plain value.
                unsafe {
                    sys::cublasLtMatmulAlgoCheck(
                        state.handle,
                        d.desc,
                        d.a,
                        d.b,
                        d.d,
                        d.d,
                        &d.algo,
                        &mut check,
                    )
                    .result()
                    .map_err(|e| err("the pinned algorithm's check", p, e))?;
                }
                if check.workspaceSize > WORKSPACE {
                    return Err(err(
                        "the pinned algorithm's check",
                        p,
                        format!("workspace {} B over {WORKSPACE}", check.workspaceSize),
                    ));
                }
                state.descs.insert(*p, d);
            }
            let d = &state.descs[p];
            let (one, zero) = (1f32, 0f32);
            let (ap, _ga) = a.device_ptr(&stream);
            let (bp, _gb) = b.device_ptr(&stream);
            let (op, _go) = out.device_ptr_mut(&stream);
            let (wp, _gw) = state.workspace.device_ptr_mut(&stream);
            // SAFETY: the layouts describe these buffers (shapes and strides from their
            // layouts); alpha and beta are f32 (f32 scale type); D doubles as C (beta = 0).
            unsafe {
                lt::matmul(
                    state.handle,
                    d.desc,
                    &one as *const f32 as *const _,
                    &zero as *const f32 as *const _,
                    ap as *const _,
                    d.a,
                    bp as *const _,
                    d.b,
                    op as *const _,
                    d.d,
                    op as *mut _,
                    d.d,
                    &d.algo,
                    wp as *mut _,
                    WORKSPACE,
                    stream.cu_stream() as *mut _,
                )
            }
            .map_err(|e| err("the product", p, e))
        })?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Column-major `D = op(A)·op(B)` as BLAS defines it, on flat buffers (the reference the
    /// operand readings are checked against).
    #[allow(clippy::too_many_arguments)]
    fn blas(
        a: &ColumnMajor,
        b: &ColumnMajor,
        m: usize,
        n: usize,
        k: usize,
        da: &[f64],
        db: &[f64],
    ) -> Vec<f64> {
        let at = |i: usize, j: usize| {
            // op(A)[i, j], i < m, j < k
            if a.trans {
                da[j + i * a.ld]
            } else {
                da[i + j * a.ld]
            }
        };
        let bt = |i: usize, j: usize| {
            if b.trans {
                db[j + i * b.ld]
            } else {
                db[i + j * b.ld]
            }
        };
        let mut d = vec![0.0; m * n];
        for j in 0..n {
            for i in 0..m {
                d[i + j * m] = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
            }
        }
        d
    }

    #[test]
    fn every_operand_reading_gives_the_row_major_product() {
        let dev = Device::Cpu;
        let (m, k, n) = (5, 3, 4);
        let a = Tensor::arange(0f64, (m * k) as f64, &dev)
            .unwrap()
            .reshape((m, k))
            .unwrap();
        let b = (Tensor::arange(0f64, (k * n) as f64, &dev).unwrap() * 0.5)
            .unwrap()
            .reshape((k, n))
            .unwrap();
        let want = a.matmul(&b).unwrap();
        // Each operand plain and as a transposed view of its transpose.
        let forms = |t: &Tensor| vec![t.clone(), t.t().unwrap().contiguous().unwrap().t().unwrap()];
        for a in forms(&a) {
            for b in forms(&b) {
                let (sa, sb) = (a.stride(), b.stride());
                let ca = column_major(m, k, sa[0], sa[1]).unwrap();
                let cb = column_major(k, n, sb[0], sb[1]).unwrap();
                let flat = |t: &Tensor| {
                    // The view's storage in memory order.
                    let c = if t.is_contiguous() {
                        t.clone()
                    } else {
                        t.t().unwrap()
                    };
                    c.flatten_all().unwrap().to_vec1::<f64>().unwrap()
                };
                // cuBLAS's A is our B, its B our A: D (n × m) column-major = C row-major.
                let d = blas(&cb, &ca, n, m, k, &flat(&b), &flat(&a));
                let got = Tensor::from_vec(d, (m, n), &dev).unwrap();
                let diff = crate::tensor::ops::max_abs_diff(&want, &got).unwrap();
                assert_eq!(diff, 0.0, "{sa:?} {sb:?}");
            }
        }
        // A row or column vector reads either way; other strides do not.
        assert!(column_major(1, 4, 99, 1).is_some());
        assert_eq!(column_major(3, 4, 8, 2), None);
    }

    #[test]
    fn leading_dimensions_collapse_to_one_strided_batch() {
        assert_eq!(batch_of(&[], &[]), Some((1, 0)));
        assert_eq!(batch_of(&[4, 3], &[30, 10]), Some((12, 10)));
        assert_eq!(batch_of(&[4, 3], &[0, 0]), Some((12, 0)));
        assert_eq!(batch_of(&[4, 1], &[7, 123]), Some((4, 7)));
        assert_eq!(batch_of(&[4, 3], &[10, 30]), None);
    }

    #[test]
    fn off_the_deterministic_cuda_path_it_is_candles_product() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (2, 4, 5), &dev).unwrap();
        let d = crate::tensor::ops::max_abs_diff(&matmul(&a, &b).unwrap(), &a.matmul(&b).unwrap());
        assert_eq!(d.unwrap(), 0.0);
        // Shared rows: each sample's rows times w.
        let w = Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap();
        let got = matmul_shared(&a, &w).unwrap();
        for i in 0..2 {
            let want = a.get(i).unwrap().matmul(&w).unwrap();
            let d = crate::tensor::ops::max_abs_diff(&got.get(i).unwrap(), &want).unwrap();
            assert!(d < 1e-6, "{d}");
        }
    }
}
