//! 2-D convolutions on CUDA through cuDNN, with every per-shape decision made once.
//!
//! `y = conv(x, w)` (cross-correlation, NCHW, no bias: the caller adds the bias in a fused
//! epilogue, [`crate::gpu::kernels::conv_epilogue`]). candle's cuDNN path rebuilds the tensor,
//! filter and convolution descriptors, asks for an algorithm and allocates (and zeroes) a
//! fresh workspace on every call, and leaves the math type at cuDNN's default, under which
//! bf16/f16 convolutions may run without tensor cores. Here, per (input shape, filter shape,
//! padding, stride, dtype, precision) a plan is built once and cached:
//!
//! - descriptors for x, w, y and the convolution, f32 compute for f32, f16 and bf16 data
//!   (cuDNN's "pseudo half/bfloat16" configurations, as PyTorch uses);
//! - the math type: tensor-core math for f16/bf16; for f32, FMA math (exact f32, the
//!   default) or, with [`crate::gpu::device::set_tf32`] (`--tf32`), cuDNN's default math, which
//!   lets the convolution run in TF32 on Ampere and later (what PyTorch's default
//!   `torch.backends.cudnn.allow_tf32 = True` does);
//! - the algorithm, by `QTAYLOR_CUDNN_ALGO`. `auto` (the default) is `graph` for bf16, f16
//!   and TF32 forward convolutions and `find` for exact f32 (BENCHMARKS.md §4.2).
//!   `graph` builds the convolution as a one-node graph of cuDNN's backend API, the API
//!   PyTorch uses, and takes the first engine configuration of heuristic mode A that plans
//!   ([`graph_plan`]; tensor-core math only, falling back to `heuristic`). At batch 256 on
//!   the H200 its kernels run as fast as the legacy heuristic's, and the host queues a
//!   forward pass in 8 ms instead of 13 ms (the legacy `cudnnConvolutionForward` costs more
//!   host time per call), which makes small batches up to 1.8× faster. `graph-find` times
//!   every configuration of heuristic modes A and B and the fallback list on the first call
//!   of a shape and keeps the fastest. `heuristic` takes the legacy API's ranking for the
//!   math type (`cudnnGetConvolutionForwardAlgorithm_v7`; 1.7× slower than `find` for exact
//!   f32, where it passes over FP32 Winograd). `find` runs every legacy candidate once on the
//!   first call of a shape and keeps the fastest (`cudnnFindConvolutionForwardAlgorithm`,
//!   like `torch.backends.cudnn.benchmark = True`). Or a fixed legacy algorithm
//!   (`implicit-gemm`, `implicit-precomp-gemm`, `gemm`, `direct`, `fft`, `fft-tiling`,
//!   `winograd`, `winograd-nonfused`). Candidates needing more than 1 GiB of workspace are
//!   skipped;
//! - the workspace size. One workspace buffer per thread grows to the largest plan's need
//!   and is reused (stream order makes the reuse safe).
//!
//! In deterministic mode ([`crate::gpu::determinism`]) the algorithm is never timed and never
//! follows the batch: per shape without its batch, [`choose_pin`] picks at batch 256 a graph
//! engine without the `NONDETERMINISTIC` numerical note (for exact f32 also without tensor-core
//! notes) and records its global index and knob values ([`Pin`]); every batch then plans that
//! same engine with those knobs. Gradients, and shapes without such an engine, pin the legacy
//! heuristic's first deterministic algorithm. `find` and `graph-find` are refused there.
//!
//! Training's filter gradient `∂L/∂W = Σ_n x_n ⋆ ∂L/∂y_n` runs the same way
//! ([`conv2d_backward_filter`], `cudnnConvolutionBackwardFilter`), restricted to cuDNN's
//! deterministic algorithms so that a seed fixes a training run; so does the transposed
//! convolution ([`conv_transpose2d`], the data gradient `cudnnConvolutionBackwardData`, chosen
//! by measurement among the deterministic algorithms), which the UNet's upsamplers use.
//!
//! `QTAYLOR_CONV_LOG=1` prints each plan as it is made (and, for `find`, every candidate's
//! measured time) to stderr.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cudnn::{result as cr, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::{CudaDType, DeviceId};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// How the algorithm of a new plan is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Choice {
    /// `graph` for tensor-core math, `find` for exact f32.
    Auto,
    Graph,
    /// Every graph-API engine configuration that plans, timed on the call's buffers.
    GraphFind,
    Heuristic,
    Find,
    Fixed(sys::cudnnConvolutionFwdAlgo_t),
    /// The deterministic mode's choice ([`Pin`]): made once per shape at the reference batch,
    /// by heuristics only, deterministic kernels only.
    Pinned,
}

/// The algorithm choice named by `QTAYLOR_CUDNN_ALGO` (default `auto`), as text.
pub fn algo_setting() -> String {
    std::env::var("QTAYLOR_CUDNN_ALGO").unwrap_or_else(|_| "auto".into())
}

/// The parsed `QTAYLOR_CUDNN_ALGO`, read once (this runs on every convolution call).
fn choice() -> Result<Choice> {
    static CHOICE: std::sync::OnceLock<std::result::Result<Choice, String>> =
        std::sync::OnceLock::new();
    CHOICE
        .get_or_init(|| parse_choice(&algo_setting()))
        .clone()
        .map_err(candle_core::Error::Msg)
}

fn parse_choice(setting: &str) -> std::result::Result<Choice, String> {
    use sys::cudnnConvolutionFwdAlgo_t as A;
    Ok(match setting {
        "auto" => Choice::Auto,
        "graph" => Choice::Graph,
        "graph-find" => Choice::GraphFind,
        "heuristic" => Choice::Heuristic,
        "find" => Choice::Find,
        "implicit-gemm" => Choice::Fixed(A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM),
        "implicit-precomp-gemm" => {
            Choice::Fixed(A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM)
        }
        "gemm" => Choice::Fixed(A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM),
        "direct" => Choice::Fixed(A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT),
        "fft" => Choice::Fixed(A::CUDNN_CONVOLUTION_FWD_ALGO_FFT),
        "fft-tiling" => Choice::Fixed(A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING),
        "winograd" => Choice::Fixed(A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD),
        "winograd-nonfused" => Choice::Fixed(A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED),
        other => {
            return Err(format!(
                "QTAYLOR_CUDNN_ALGO={other:?}: expected auto, graph, graph-find, heuristic, find, implicit-gemm, \
                 implicit-precomp-gemm, gemm, direct, fft, fft-tiling, winograd or winograd-nonfused"
            ));
        }
    })
}

fn log_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("QTAYLOR_CONV_LOG").is_some())
}

/// `conv(x, w)` with `x: (N, C, H, W)`, `w: (K, C, R, S)`, symmetric `padding`, `stride`,
/// dilation 1, for f32, f16 and bf16 on CUDA (other dtypes and devices: candle's conv2d).
/// Keeps no autograd graph.
pub fn conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) || !x.device().is_cuda() {
        return x.conv2d(w, padding, stride, 1, 1);
    }
    run_op(x, w, padding, stride, Op::Forward, false)
}

/// [`conv2d`] for channels-last operands: `x: (N, H, W, C)`, `w: (K, R, S, C)` (the filter in
/// cuDNN's NHWC filter order), output `(N, H', W', K)`. cuDNN's tensor-core kernels work in
/// this layout, so no NCHW↔NHWC transforms run around them (BENCHMARKS.md §4.5). f32, f16
/// and bf16 on CUDA. Keeps no autograd graph.
pub fn conv2d_nhwc(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    run_op(x, w, padding, stride, Op::Forward, true)
}

/// [`conv_transpose2d`] for channels-last operands: `x: (N, H', W', K)`, `w: (K, R, S, C)`
/// (the forward convolution's filter in NHWC filter order), output `(N, H, W, C)`.
pub fn conv_transpose2d_nhwc(
    x: &Tensor,
    w: &Tensor,
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    run_op(x, w, padding, stride, Op::DataGrad, true)
}

/// The transposed convolution of `x: (N, K, H', W')` with `w: (K, C, R, S)` (PyTorch's
/// `conv_transpose2d` weight layout: input channels first), symmetric `padding`, `stride`,
/// no output padding: the output `(N, C, (H'−1)·stride − 2·padding + R, …)` is the data
/// gradient of the forward convolution with the same filter (`cudnnConvolutionBackwardData`,
/// deterministic algorithms only). f32, f16, bf16 on CUDA (elsewhere candle's
/// conv_transpose2d). Keeps no autograd graph.
pub fn conv_transpose2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    if !matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16) || !x.device().is_cuda() {
        return x.conv_transpose2d(w, padding, 0, stride, 1);
    }
    run_op(x, w, padding, stride, Op::DataGrad, false)
}

/// The filter gradient of [`conv2d`]: `∂L/∂W` of shape `(K, C, R, S)` from the input `x:
/// (N, C, H, W)` and the output gradient `dy: (N, K, H', W')`, summed over the batch (f32,
/// f16, bf16 on CUDA). Keeps no autograd graph.
pub fn conv2d_backward_filter(
    x: &Tensor,
    dy: &Tensor,
    (r, s): (usize, usize),
    padding: usize,
    stride: usize,
) -> Result<Tensor> {
    run_op(x, dy, padding, stride, Op::FilterGrad(r, s), false)
}

/// A [`ConvOp`] on its two operands, made contiguous (no copy for contiguous ones).
fn run_op(
    a: &Tensor,
    b: &Tensor,
    padding: usize,
    stride: usize,
    op: Op,
    nhwc: bool,
) -> Result<Tensor> {
    let op = ConvOp {
        padding,
        stride,
        op,
        nhwc,
    };
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &op)
}

/// Which of the convolution's three products a [`ConvOp`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    /// `y = conv(x, w)`; operands x, w.
    Forward,
    /// `∂L/∂W` of an `R×S` filter; operands x, dy.
    FilterGrad(usize, usize),
    /// `∂L/∂x` (the transposed convolution); operands dy, w.
    DataGrad,
}

struct ConvOp {
    padding: usize,
    stride: usize,
    op: Op,
    /// Channels-last operands (`(N, H, W, C)` tensors, `(K, R, S, C)` filters).
    nhwc: bool,
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("cudnn-conv2d runs on CUDA only")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (p, st) = (self.padding, self.stride);
        if st == 0 {
            candle_core::bail!("cudnn-conv2d: stride 0");
        }
        let misfit = || {
            candle_core::Error::Msg(format!(
                "cudnn-conv2d ({:?}, padding {p}, stride {st}): operands {:?} and {:?} do not fit",
                self.op,
                l1.dims(),
                l2.dims()
            ))
        };
        // The forward convolution's shapes: input (n, c, h, wd), filter (k, c, r, s), output
        // (n, k, oh, ow), whatever the layout (`logical` reads a channels-last shape in this
        // order).
        let nhwc = self.nhwc;
        let logical = |l: &Layout| -> Result<(usize, usize, usize, usize)> {
            let (a, b, c, d) = l.shape().dims4()?;
            Ok(if nhwc { (a, d, b, c) } else { (a, b, c, d) })
        };
        let (n, c, h, wd, k, r, s) = match self.op {
            Op::Forward => {
                let (n, c, h, wd) = logical(l1)?;
                let (k, c2, r, s) = logical(l2)?;
                if c2 != c {
                    return Err(misfit());
                }
                (n, c, h, wd, k, r, s)
            }
            Op::FilterGrad(..) if nhwc => {
                candle_core::bail!("cudnn-conv2d: no channels-last filter gradient")
            }
            Op::FilterGrad(r, s) => {
                let (n, c, h, wd) = l1.shape().dims4()?;
                (n, c, h, wd, l2.dim(1)?, r, s)
            }
            Op::DataGrad => {
                let (n, k, oh, ow) = logical(l1)?;
                let (k2, c, r, s) = logical(l2)?;
                let (h, wd) = ((oh.max(1) - 1) * st + r, (ow.max(1) - 1) * st + s);
                if k2 != k || oh == 0 || ow == 0 || h <= 2 * p || wd <= 2 * p {
                    return Err(misfit());
                }
                (n, c, h - 2 * p, wd - 2 * p, k, r, s)
            }
        };
        if h + 2 * p < r || wd + 2 * p < s {
            return Err(misfit());
        }
        let (oh, ow) = ((h + 2 * p - r) / st + 1, (wd + 2 * p - s) / st + 1);
        let dy_dims = match self.op {
            Op::FilterGrad(..) => Some(l2.shape().dims4()?),
            Op::DataGrad => Some(logical(l1)?),
            Op::Forward => None,
        };
        if dy_dims.is_some_and(|d| d != (n, k, oh, ow)) {
            return Err(misfit());
        }
        let i = |v: usize| v as i32;
        let key = Key {
            x: [i(n), i(c), i(h), i(wd)],
            w: [i(k), i(c), i(r), i(s)],
            pad: i(p),
            stride: i(st),
            dtype: s1.dtype(),
            tf32: crate::gpu::device::tf32(),
            // `auto`: the graph API for forward convolutions with tensor-core math (bf16, f16,
            // TF32), the legacy heuristic for their filter gradients, the measured legacy
            // choice for exact f32 and for every data gradient. The graph API plans only
            // forward convolutions with tensor-core math; elsewhere `graph` and `graph-find`
            // mean `find`.
            choice: {
                let tensor_cores = s1.dtype() != DType::F32 || crate::gpu::device::tf32();
                let forward = self.op == Op::Forward;
                let det = crate::gpu::determinism::deterministic();
                match choice()? {
                    Choice::Find | Choice::GraphFind if det => {
                        candle_core::bail!(
                            "QTAYLOR_CUDNN_ALGO={} picks convolution algorithms by timing them, \
                             and timings differ from run to run: deterministic mode \
                             (--deterministic, QTAYLOR_DETERMINISTIC=1) takes auto, graph, \
                             heuristic or a fixed algorithm",
                            algo_setting()
                        )
                    }
                    Choice::Fixed(a) if det && forward => Choice::Fixed(a),
                    _ if det => Choice::Pinned,
                    Choice::Auto if tensor_cores && forward => Choice::Graph,
                    c @ (Choice::Graph | Choice::GraphFind) if tensor_cores && forward => c,
                    Choice::Auto if tensor_cores && self.op != Op::DataGrad => Choice::Heuristic,
                    Choice::Auto | Choice::Graph | Choice::GraphFind => Choice::Find,
                    c => c,
                }
            },
            op: self.op,
            nhwc,
        };
        let (len, shape) = match self.op {
            Op::Forward if nhwc => (n * k * oh * ow, Shape::from((n, oh, ow, k))),
            Op::Forward => (n * k * oh * ow, Shape::from((n, k, oh, ow))),
            Op::FilterGrad(..) => (k * c * r * s, Shape::from((k, c, r, s))),
            Op::DataGrad if nhwc => (n * c * h * wd, Shape::from((n, h, wd, c))),
            Op::DataGrad => (n * c * h * wd, Shape::from((n, c, h, wd))),
        };
        let out = match s1.dtype() {
            DType::F32 => run::<f32>(&key, s1, l1, s2, l2, len)?,
            DType::F16 => run::<half::f16>(&key, s1, l1, s2, l2, len)?,
            DType::BF16 => run::<half::bf16>(&key, s1, l1, s2, l2, len)?,
            dt => candle_core::bail!("cudnn-conv2d: dtype {dt:?} is not supported"),
        };
        Ok((out, shape))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    x: [i32; 4],
    w: [i32; 4],
    pad: i32,
    stride: i32,
    dtype: DType,
    tf32: bool,
    choice: Choice,
    op: Op,
    /// Channels-last tensors and filter (the shapes above stay in NCHW / KCRS order).
    nhwc: bool,
}

#[derive(Clone, Copy, Debug)]
enum Algo {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    Filter(sys::cudnnConvolutionBwdFilterAlgo_t),
    Data(sys::cudnnConvolutionBwdDataAlgo_t),
    /// A finalized execution plan of cuDNN's graph API (owned through `Plan::backend`).
    Graph(sys::cudnnBackendDescriptor_t),
}

/// Descriptors, algorithm and workspace size of one convolution shape.
struct Plan {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    algo: Algo,
    /// The math type a legacy algorithm runs in.
    math: sys::cudnnMathType_t,
    workspace: usize,
    /// Graph-API descriptors the execution plan depends on (destroyed with the plan).
    backend: Vec<sys::cudnnBackendDescriptor_t>,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by Plan::new and owned by this plan alone.
        unsafe {
            for d in self.backend.drain(..).rev() {
                let _ = sys::cudnnBackendDestroyDescriptor(d);
            }
            let _ = cr::destroy_tensor_descriptor(self.x);
            let _ = cr::destroy_tensor_descriptor(self.y);
            let _ = cr::destroy_filter_descriptor(self.w);
            let _ = cr::destroy_convolution_descriptor(self.conv);
        }
    }
}

/// A cuDNN handle bound to one device's stream, its plans and its workspace.
struct State {
    handle: sys::cudnnHandle_t,
    plans: HashMap<Key, Plan>,
    /// The deterministic mode's choices, per key with the batch set to 0.
    pins: HashMap<Key, Pin>,
    workspace: Option<CudaSlice<u8>>,
}

impl Drop for State {
    fn drop(&mut self) {
        self.plans.clear();
        // SAFETY: the handle was created for this state and is used by no one else.
        let _ = unsafe { cr::destroy_handle(self.handle) };
    }
}

thread_local! {
    // cuDNN handles are not thread-safe: one per thread and device.
    static STATES: RefCell<HashMap<DeviceId, State>> = RefCell::new(HashMap::new());
}

fn err(what: &str, key: &Key, e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "cuDNN {what} failed for a convolution{} of input {:?} with filter {:?} (padding {}, \
         stride {}, {:?}): {e:?}",
        match key.op {
            Op::Forward => "",
            Op::FilterGrad(..) => " filter gradient",
            Op::DataGrad => " data gradient",
        },
        key.x,
        key.w,
        key.pad,
        key.stride,
        key.dtype
    ))
}

fn data_type(d: DType) -> sys::cudnnDataType_t {
    match d {
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        _ => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
    }
}

fn algo_name(a: Algo) -> String {
    use sys::cudnnConvolutionFwdAlgo_t as A;
    match a {
        Algo::Forward(a) => match a {
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM => "implicit-gemm",
            A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM => "implicit-precomp-gemm",
            A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM => "gemm",
            A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT => "direct",
            A::CUDNN_CONVOLUTION_FWD_ALGO_FFT => "fft",
            A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING => "fft-tiling",
            A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD => "winograd",
            A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED => "winograd-nonfused",
            _ => "?",
        }
        .into(),
        Algo::Filter(a) => format!("{a:?}"),
        Algo::Data(a) => format!("{a:?}"),
        Algo::Graph(_) => "graph-api engine".into(),
    }
}

/// Workspace limit for a plan's algorithm: candidates needing more are skipped.
const MAX_WORKSPACE: usize = 1 << 30;

/// The fields of cuDNN's forward and filter-gradient perf structs that the choice reads.
struct Candidate {
    algo: Algo,
    ok: bool,
    time: f32,
    memory: usize,
    deterministic: bool,
    math: sys::cudnnMathType_t,
}

macro_rules! candidates {
    ($perf:expr, $count:expr, $variant:ident) => {
        $perf[..($count.max(0) as usize).min($perf.len())]
            .iter()
            .map(|p| Candidate {
                algo: Algo::$variant(p.algo),
                ok: p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS,
                time: p.time,
                memory: p.memory,
                deterministic: p.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC,
                math: p.mathType,
            })
            .collect::<Vec<_>>()
    };
}

impl Plan {
    /// The plan for `key`: from `pinned` when given (the deterministic mode), else by the
    /// key's choice (a `Pinned` key without a pin: the legacy heuristic's ranking,
    /// deterministic algorithms only, which is how [`choose_pin`] makes a legacy pin).
    fn new(
        handle: sys::cudnnHandle_t,
        key: &Key,
        timer: Option<&mut Timer>,
        pinned: Option<&Pin>,
    ) -> Result<Plan> {
        use sys::cudnnMathType_t as M;
        let format = if key.nhwc {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
        } else {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
        };
        let e = |what: &'static str| move |x| err(what, key, x);
        let dt = data_type(key.dtype);
        let [n, _, h, w] = key.x;
        let [k, _, r, s] = key.w;
        let oh = (h + 2 * key.pad - r) / key.stride + 1;
        let ow = (w + 2 * key.pad - s) / key.stride + 1;
        let mut plan = Plan {
            x: cr::create_tensor_descriptor().map_err(e("descriptor creation"))?,
            y: cr::create_tensor_descriptor().map_err(e("descriptor creation"))?,
            w: cr::create_filter_descriptor().map_err(e("descriptor creation"))?,
            conv: cr::create_convolution_descriptor().map_err(e("descriptor creation"))?,
            algo: Algo::Forward(
                sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            ),
            math: M::CUDNN_DEFAULT_MATH,
            workspace: 0,
            backend: Vec::new(),
        };
        if let Some(Pin::Engine { index, knobs }) = pinned {
            let (exec, workspace) =
                pinned_graph_plan(handle, key, *index, knobs, &mut plan.backend)
                    .map_err(|e| err("planning the deterministic mode's engine", key, e))?;
            plan.algo = Algo::Graph(exec);
            plan.workspace = workspace;
            log_graph_plan(key, &format!("pinned engine {index} {knobs:?}"), workspace);
            return Ok(plan);
        }
        if matches!(key.choice, Choice::Graph | Choice::GraphFind) {
            let timer = timer.filter(|_| key.choice == Choice::GraphFind);
            match graph_plan(handle, key, &mut plan.backend, timer) {
                Ok((exec, workspace)) => {
                    plan.algo = Algo::Graph(exec);
                    plan.workspace = workspace;
                    log_graph_plan(key, "graph-api engine", workspace);
                    return Ok(plan);
                }
                Err(e) => {
                    // Fall back to the legacy API's heuristic below.
                    if log_on() {
                        eprintln!(
                            "conv plan: graph API unavailable ({e}); using the legacy heuristic"
                        );
                    }
                }
            }
        }
        let strict = key.dtype == DType::F32 && !key.tf32;
        let math = if strict {
            M::CUDNN_FMA_MATH
        } else if key.dtype == DType::F32 {
            M::CUDNN_DEFAULT_MATH
        } else {
            M::CUDNN_TENSOR_OP_MATH
        };
        // SAFETY: the descriptors were just created and belong to this plan.
        unsafe {
            cr::set_tensor4d_descriptor(plan.x, format, dt, key.x)
                .map_err(e("input descriptor"))?;
            cr::set_tensor4d_descriptor(plan.y, format, dt, [n, k, oh, ow])
                .map_err(e("output descriptor"))?;
            cr::set_filter4d_descriptor(plan.w, dt, format, key.w)
                .map_err(e("filter descriptor"))?;
            cr::set_convolution2d_descriptor(
                plan.conv,
                key.pad,
                key.pad,
                key.stride,
                key.stride,
                1,
                1,
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(e("convolution descriptor"))?;
            cr::set_convolution_math_type(plan.conv, math).map_err(e("math type"))?;
        }
        // `auto` was resolved by the caller; a graph that could not be planned falls back to
        // the legacy heuristic.
        let legacy = match key.choice {
            Choice::Graph | Choice::GraphFind | Choice::Auto | Choice::Pinned => Choice::Heuristic,
            c => c,
        };
        let deterministic_only = key.choice == Choice::Pinned;
        let (algo, algo_math) = match (pinned, legacy, key.op) {
            (Some(Pin::Legacy(a, m)), _, _) => (*a, *m),
            (_, Choice::Fixed(a), Op::Forward) => (Algo::Forward(a), math),
            (_, choice, op) => {
                let find = choice == Choice::Find;
                let mut count = 0;
                // The legacy search (Find measures, Get…_v7 ranks): same signature for both.
                macro_rules! search {
                    ($perf:ty, $find:path, $rank:path, $a:expr, $b:expr, $d:expr, $variant:ident) => {{
                        let mut perf: [$perf; 8] = std::mem::zeroed();
                        let f = if find { $find } else { $rank };
                        f(
                            handle,
                            $a,
                            $b,
                            plan.conv,
                            $d,
                            8,
                            &mut count,
                            perf.as_mut_ptr(),
                        )
                        .result()
                        .map_err(e("algorithm search"))?;
                        candidates!(perf, count, $variant)
                    }};
                }
                // SAFETY: the perf structs are plain data; cuDNN writes at most 8 of them.
                let found = unsafe {
                    match op {
                        Op::Forward => search!(
                            sys::cudnnConvolutionFwdAlgoPerf_t,
                            sys::cudnnFindConvolutionForwardAlgorithm,
                            sys::cudnnGetConvolutionForwardAlgorithm_v7,
                            plan.x,
                            plan.w,
                            plan.y,
                            Forward
                        ),
                        Op::FilterGrad(..) => search!(
                            sys::cudnnConvolutionBwdFilterAlgoPerf_t,
                            sys::cudnnFindConvolutionBackwardFilterAlgorithm,
                            sys::cudnnGetConvolutionBackwardFilterAlgorithm_v7,
                            plan.x,
                            plan.y,
                            plan.w,
                            Filter
                        ),
                        Op::DataGrad => search!(
                            sys::cudnnConvolutionBwdDataAlgoPerf_t,
                            sys::cudnnFindConvolutionBackwardDataAlgorithm,
                            sys::cudnnGetConvolutionBackwardDataAlgorithm_v7,
                            plan.w,
                            plan.y,
                            plan.x,
                            Data
                        ),
                    }
                };
                if log_on() && find {
                    for p in &found {
                        eprintln!(
                            "  conv {:?}*{:?} {:?}: {} {:?} {:.3} ms, {} B{}",
                            key.x,
                            key.w,
                            key.dtype,
                            algo_name(p.algo),
                            p.math,
                            p.time,
                            p.memory,
                            if p.ok { "" } else { " (failed)" }
                        );
                    }
                }
                let best = found
                    .iter()
                    .find(|p| {
                        p.ok && p.memory <= MAX_WORKSPACE
                            && (!strict || p.math == M::CUDNN_FMA_MATH)
                            && ((op == Op::Forward && !deterministic_only) || p.deterministic)
                    })
                    .ok_or_else(|| {
                        err("algorithm choice", key, "no usable algorithm within 1 GiB")
                    })?;
                (best.algo, best.math)
            }
        };
        // Run the chosen algorithm in the math type it was ranked with (as PyTorch does).
        // SAFETY: descriptors owned by this plan.
        plan.workspace = unsafe {
            cr::set_convolution_math_type(plan.conv, algo_math).map_err(e("math type"))?;
            match algo {
                Algo::Graph(_) => unreachable!("graph plans return early"),
                Algo::Forward(a) => cr::get_convolution_forward_workspace_size(
                    handle, plan.x, plan.w, plan.conv, plan.y, a,
                ),
                Algo::Filter(a) => cr::get_convolution_backward_filter_workspace_size(
                    handle, plan.x, plan.y, plan.conv, plan.w, a,
                ),
                Algo::Data(a) => cr::get_convolution_backward_data_workspace_size(
                    handle, plan.w, plan.y, plan.conv, plan.x, a,
                ),
            }
            .map_err(e("workspace size"))?
        };
        plan.algo = algo;
        plan.math = algo_math;
        if log_on() {
            eprintln!(
                "conv plan{}: input {:?} filter {:?} pad {} stride {} {:?}{}: {} ({:?}), workspace {} B",
                match key.op {
                    Op::Forward => "",
                    Op::FilterGrad(..) => " (filter gradient)",
                    Op::DataGrad => " (data gradient)",
                },
                key.x,
                key.w,
                key.pad,
                key.stride,
                key.dtype,
                flags(key),
                algo_name(algo),
                algo_math,
                plan.workspace
            );
        }
        Ok(plan)
    }
}

/// The deterministic mode's kernel for `key`'s shape, chosen at the reference batch: a graph
/// engine for a forward convolution ([`pin_engine`]), else (no such engine, or a gradient) the
/// legacy heuristic's first deterministic algorithm.
fn choose_pin(handle: sys::cudnnHandle_t, key: &Key) -> Result<Pin> {
    let batch = crate::gpu::determinism::REFERENCE_BATCH as i32;
    let reference = Key {
        x: [batch, key.x[1], key.x[2], key.x[3]],
        ..*key
    };
    if key.op == Op::Forward {
        let mut keep = Vec::new();
        let found = pin_engine(handle, &reference, &mut keep);
        for d in keep.into_iter().rev() {
            // SAFETY: made by pin_engine for this search alone.
            let _ = unsafe { sys::cudnnBackendDestroyDescriptor(d) };
        }
        match found {
            Ok(pin) => {
                if log_on() {
                    eprintln!(
                        "conv pin: filter {:?} {:?}{}: {pin:?}",
                        key.w,
                        key.dtype,
                        flags(key)
                    );
                }
                return Ok(pin);
            }
            Err(e) => {
                if log_on() {
                    eprintln!(
                        "conv pin: filter {:?} {:?}{}: no deterministic graph engine ({e}); the legacy heuristic's",
                        key.w,
                        key.dtype,
                        flags(key)
                    );
                }
            }
        }
    }
    let plan = Plan::new(handle, &reference, None, None)?;
    Ok(Pin::Legacy(plan.algo, plan.math))
}

/// Runs `key`'s plan on `(x, second)` (second: the filter for the forward convolution, the
/// output gradient for the filter gradient) into a fresh buffer of `out_len` elements.
fn run<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
    key: &Key,
    xs: &CudaStorage,
    xl: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    out_len: usize,
) -> Result<CudaStorage> {
    let dev = xs.device().clone();
    let stream = dev.cuda_stream();
    use crate::gpu::kernels::cuda::view;
    let (x, second) = (view::<T>((xs, xl))?, view::<T>((s2, l2))?);
    // SAFETY: every element is written by the convolution (beta = 0).
    let mut out = unsafe { dev.alloc::<T>(out_len)? };
    STATES.with(|states| -> Result<()> {
        let mut states = states.borrow_mut();
        let state = match states.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                stream
                    .context()
                    .bind_to_thread()
                    .map_err(|e| err("context binding", key, e))?;
                let handle = cr::create_handle().map_err(|e| err("handle creation", key, e))?;
                // SAFETY: the stream outlives the handle (the device keeps it).
                unsafe { cr::set_stream(handle, stream.cu_stream() as *mut _) }
                    .map_err(|e| err("stream binding", key, e))?;
                v.insert(State {
                    handle,
                    plans: HashMap::new(),
                    pins: HashMap::new(),
                    workspace: None,
                })
            }
        };
        let (xp, _gx) = x.device_ptr(&stream);
        let (sp, _gs) = second.device_ptr(&stream);
        let (op, _go) = out.device_ptr_mut(&stream);
        if !state.plans.contains_key(key) {
            let handle = state.handle;
            // graph-find: one warm-up and three timed runs of a candidate on this call's
            // buffers (the output is overwritten by the real run below).
            let mut timer = |exec, ws: usize| -> std::result::Result<f32, String> {
                use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
                let m = |e: &dyn std::fmt::Debug| format!("timing an engine: {e:?}");
                // SAFETY: scratch workspace, written by cuDNN before it reads it.
                let mut scratch = unsafe { stream.alloc::<u8>(ws.max(1)) }.map_err(|e| m(&e))?;
                let (wp, _gw) = scratch.device_ptr_mut(&stream);
                // SAFETY: the plan was made for these buffers' shapes and dtype.
                let go = || {
                    unsafe {
                        graph_execute(
                            handle,
                            exec,
                            [xp as *mut _, sp as *mut _, op as *mut _],
                            wp as *mut _,
                        )
                    }
                    .map_err(|e| m(&e))
                };
                go()?;
                let ev = || {
                    stream
                        .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(|e| m(&e))
                };
                let start = ev()?;
                for _ in 0..3 {
                    go()?;
                }
                let end = ev()?;
                end.synchronize().map_err(|e| m(&e))?;
                Ok(start.elapsed_ms(&end).map_err(|e| m(&e))? / 3.0)
            };
            let plan = if key.choice == Choice::Pinned {
                let sig = Key {
                    x: [0, key.x[1], key.x[2], key.x[3]],
                    ..*key
                };
                if !state.pins.contains_key(&sig) {
                    let pin = choose_pin(handle, key)?;
                    state.pins.insert(sig, pin);
                }
                Plan::new(handle, key, None, Some(&state.pins[&sig]))?
            } else {
                Plan::new(handle, key, Some(&mut timer), None)?
            };
            state.plans.insert(*key, plan);
        }
        let plan = &state.plans[key];
        let need = plan.workspace.max(1);
        if state.workspace.as_ref().is_none_or(|b| b.len() < need) {
            // SAFETY: workspace contents are never read before cuDNN writes them.
            state.workspace = Some(unsafe { stream.alloc::<u8>(need) }?);
        }
        let buf = state.workspace.as_mut().expect("allocated above");
        let (one, zero) = (1f32, 0f32);
        let (alpha, beta) = (
            (&one) as *const f32 as *const _,
            (&zero) as *const f32 as *const _,
        );
        let (bp, _gb) = buf.device_ptr_mut(&stream);
        // SAFETY: the descriptors describe these contiguous buffers (shapes and dtype checked
        // by the caller); alpha/beta are f32 for f32, f16 and bf16 data.
        unsafe {
            match plan.algo {
                Algo::Forward(a) => cr::convolution_forward(
                    state.handle,
                    alpha,
                    plan.x,
                    xp as *const _,
                    plan.w,
                    sp as *const _,
                    plan.conv,
                    a,
                    bp as *mut _,
                    plan.workspace,
                    beta,
                    plan.y,
                    op as *mut _,
                ),
                Algo::Graph(exec) => graph_execute(
                    state.handle,
                    exec,
                    [xp as *mut _, sp as *mut _, op as *mut _],
                    bp as *mut _,
                ),
                Algo::Filter(a) => cr::convolution_backward_filter(
                    state.handle,
                    alpha,
                    plan.x,
                    xp as *const _,
                    plan.y,
                    sp as *const _,
                    plan.conv,
                    a,
                    bp as *mut _,
                    plan.workspace,
                    beta,
                    plan.w,
                    op as *mut _,
                ),
                // Operands (dy, w): the first is the output gradient, the result is dx.
                Algo::Data(a) => cr::convolution_backward_data(
                    state.handle,
                    alpha,
                    plan.w,
                    sp as *const _,
                    plan.y,
                    xp as *const _,
                    plan.conv,
                    a,
                    bp as *mut _,
                    plan.workspace,
                    beta,
                    plan.x,
                    op as *mut _,
                ),
            }
        }
        .map_err(|e| err("convolution", key, e))
    })?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}

/// Sets one attribute of a graph-API descriptor.
///
/// # Safety
/// `values` must point to `n` elements of the type `ty` names.
unsafe fn set_attr<T>(
    d: sys::cudnnBackendDescriptor_t,
    name: sys::cudnnBackendAttributeName_t,
    ty: sys::cudnnBackendAttributeType_t,
    n: i64,
    values: *const T,
) -> std::result::Result<(), String> {
    unsafe { sys::cudnnBackendSetAttribute(d, name, ty, n, values as *const _) }
        .result()
        .map_err(|e| format!("setting {name:?}: {e:?}"))
}

fn create(
    t: sys::cudnnBackendDescriptorType_t,
    keep: &mut Vec<sys::cudnnBackendDescriptor_t>,
) -> std::result::Result<sys::cudnnBackendDescriptor_t, String> {
    let mut d = std::ptr::null_mut();
    // SAFETY: cuDNN writes one descriptor handle.
    unsafe { sys::cudnnBackendCreateDescriptor(t, &mut d) }
        .result()
        .map_err(|e| format!("creating {t:?}: {e:?}"))?;
    keep.push(d);
    Ok(d)
}

fn finalize(d: sys::cudnnBackendDescriptor_t, what: &str) -> std::result::Result<(), String> {
    // SAFETY: a descriptor made by `create` with its attributes set.
    unsafe { sys::cudnnBackendFinalize(d) }
        .result()
        .map_err(|e| format!("finalizing {what}: {e:?}"))
}

/// With `QTAYLOR_CONV_LOG`, one line for a graph-API plan.
fn log_graph_plan(key: &Key, what: &str, workspace: usize) {
    if log_on() {
        eprintln!(
            "conv plan: input {:?} filter {:?} pad {} stride {} {:?}{}: {what}, workspace {workspace} B",
            key.x,
            key.w,
            key.pad,
            key.stride,
            key.dtype,
            flags(key)
        );
    }
}

/// The precision and layout notes of a plan's log line.
fn flags(key: &Key) -> String {
    format!(
        "{}{}",
        if key.tf32 { " tf32" } else { "" },
        if key.nhwc { " nhwc" } else { "" }
    )
}

/// The forward convolution of `key` as a cuDNN graph (one convolution node, NCHW or NHWC
/// strides),
/// planned with cuDNN's heuristic mode A: the first engine configuration that finalizes.
/// This is the API PyTorch's cuDNN v8+ path uses; it reaches the Hopper (sm90) kernels that
/// the legacy `cudnnConvolutionForward` does not. Returns the execution plan and its
/// workspace size; every descriptor made is pushed to `keep`.
fn graph_plan(
    handle: sys::cudnnHandle_t,
    key: &Key,
    keep: &mut Vec<sys::cudnnBackendDescriptor_t>,
    mut timer: Option<&mut Timer>,
) -> std::result::Result<(sys::cudnnBackendDescriptor_t, usize), String> {
    let graph = conv_graph(handle, key, keep)?;
    // graph-find times the configurations of heuristic modes A and B and the fallback list;
    // graph takes mode A's first that plans.
    let modes: &[sys::cudnnBackendHeurMode_t] = if timer.is_some() {
        &[
            sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A,
            sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_B,
            sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK,
        ]
    } else {
        &[sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A]
    };
    let mut cfgs = Vec::new();
    for &mode in modes {
        match engine_configs(graph, mode, keep) {
            Ok(c) => cfgs.extend(c),
            Err(e) if cfgs.is_empty() && mode == modes[modes.len() - 1] => return Err(e),
            Err(_) => {}
        }
    }
    let mut last = String::from("no engine configuration");
    let mut best: Option<(f32, sys::cudnnBackendDescriptor_t, usize)> = None;
    for (i, cfg) in cfgs.iter().enumerate() {
        match exec_plan(handle, *cfg, keep) {
            Ok((exec, ws)) => {
                if ws > MAX_WORKSPACE {
                    last = format!("workspace {ws} B over the limit");
                    continue;
                }
                let Some(time) = timer.as_mut() else {
                    return Ok((exec, ws));
                };
                match time(exec, ws) {
                    Ok(ms) => {
                        if log_on() {
                            eprintln!(
                                "  conv {:?}*{:?} {:?}: engine configuration {i}: {ms:.3} ms, {ws} B",
                                key.x, key.w, key.dtype
                            );
                        }
                        if best.is_none_or(|b| ms < b.0) {
                            best = Some((ms, exec, ws));
                        }
                    }
                    Err(e) => last = e,
                }
            }
            Err(e) => last = e,
        }
    }
    best.map(|(_, exec, ws)| (exec, ws)).ok_or(last)
}

/// The execution plan of an engine configuration and its workspace size in bytes.
fn exec_plan(
    handle: sys::cudnnHandle_t,
    cfg: sys::cudnnBackendDescriptor_t,
    keep: &mut Vec<sys::cudnnBackendDescriptor_t>,
) -> std::result::Result<(sys::cudnnBackendDescriptor_t, usize), String> {
    use sys::cudnnBackendAttributeName_t as N;
    use sys::cudnnBackendAttributeType_t as T;
    use sys::cudnnBackendDescriptorType_t as D;
    let exec = create(D::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, keep)?;
    // SAFETY: each pointer names one element of the type given.
    unsafe {
        set_attr(
            exec,
            N::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
            T::CUDNN_TYPE_HANDLE,
            1,
            &handle,
        )?;
        set_attr(
            exec,
            N::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG,
            T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            1,
            &cfg,
        )?;
    }
    finalize(exec, "an execution plan")?;
    let (mut ws, mut got) = (0i64, 0i64);
    // SAFETY: one INT64 is written.
    unsafe {
        sys::cudnnBackendGetAttribute(
            exec,
            N::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
            T::CUDNN_TYPE_INT64,
            1,
            &mut got,
            &mut ws as *mut i64 as *mut _,
        )
    }
    .result()
    .map_err(|e| format!("reading the workspace size: {e:?}"))?;
    Ok((exec, ws.max(0) as usize))
}

/// A kernel choice of the deterministic mode, made once per convolution shape at the batch
/// [`REFERENCE_BATCH`](crate::gpu::determinism::REFERENCE_BATCH) and used at every batch.
#[derive(Clone, Debug)]
enum Pin {
    /// A graph-API engine (its global index) and the values of its knobs: the same kernel
    /// with the same tiling and the same split of the reduction at every batch.
    Engine { index: i64, knobs: Vec<(u32, i64)> },
    /// A legacy algorithm and the math type it was ranked with (exact f32 without a graph
    /// engine, gradients).
    Legacy(Algo, sys::cudnnMathType_t),
}

/// Numerical notes (`cudnnBackendNumericalNote_t` values).
const NOTE_TENSOR_CORE: u32 = 0;
const NOTE_DOWN_CONVERT_INPUTS: u32 = 1;
const NOTE_REDUCED_PRECISION_REDUCTION: u32 = 2;
const NOTE_NONDETERMINISTIC: u32 = 4;

/// Reads a descriptor-valued attribute into `n` descriptors of type `t` made for it.
fn get_descs(
    d: sys::cudnnBackendDescriptor_t,
    name: sys::cudnnBackendAttributeName_t,
    t: sys::cudnnBackendDescriptorType_t,
    n: usize,
    keep: &mut Vec<sys::cudnnBackendDescriptor_t>,
) -> std::result::Result<Vec<sys::cudnnBackendDescriptor_t>, String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(create(t, keep)?);
    }
    let mut got = 0i64;
    // SAFETY: cuDNN fills at most n of the descriptors made above.
    unsafe {
        sys::cudnnBackendGetAttribute(
            d,
            name,
            sys::cudnnBackendAttributeType_t::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            n as i64,
            &mut got,
            out.as_mut_ptr() as *mut _,
        )
    }
    .result()
    .map_err(|e| format!("reading {name:?}: {e:?}"))?;
    out.truncate(got.clamp(0, n as i64) as usize);
    Ok(out)
}

/// Reads up to 64 four- or eight-byte values of an attribute.
fn get_values<V: Copy + Default>(
    d: sys::cudnnBackendDescriptor_t,
    name: sys::cudnnBackendAttributeName_t,
    ty: sys::cudnnBackendAttributeType_t,
) -> std::result::Result<Vec<V>, String> {
    let mut out = vec![V::default(); 64];
    let mut got = 0i64;
    // SAFETY: room for 64 values of the attribute's element type V.
    unsafe { sys::cudnnBackendGetAttribute(d, name, ty, 64, &mut got, out.as_mut_ptr() as *mut _) }
        .result()
        .map_err(|e| format!("reading {name:?}: {e:?}"))?;
    out.truncate(got.clamp(0, 64) as usize);
    Ok(out)
}

/// The deterministic mode's engine for the forward convolution `key` (its batch already the
/// reference batch): heuristic mode A's proposals, then the fallback list, in order; the first
/// whose engine carries no `NONDETERMINISTIC` note (for exact f32 also no tensor-core,
/// down-converting or reduced-precision note), that plans within the workspace limit.
fn pin_engine(
    handle: sys::cudnnHandle_t,
    key: &Key,
    keep: &mut Vec<sys::cudnnBackendDescriptor_t>,
) -> std::result::Result<Pin, String> {
    use sys::cudnnBackendAttributeName_t as N;
    use sys::cudnnBackendAttributeType_t as T;
    use sys::cudnnBackendDescriptorType_t as D;
    let graph = conv_graph(handle, key, keep)?;
    let mut cfgs = engine_configs(graph, sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A, keep)?;
    if let Ok(more) = engine_configs(
        graph,
        sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_FALLBACK,
        keep,
    ) {
        cfgs.extend(more);
    }
    let strict = key.dtype == DType::F32 && !key.tf32;
    let mut last = String::from("no engine configuration");
    for cfg in cfgs {
        let engine = get_descs(
            cfg,
            N::CUDNN_ATTR_ENGINECFG_ENGINE,
            D::CUDNN_BACKEND_ENGINE_DESCRIPTOR,
            1,
            keep,
        )?;
        let Some(&engine) = engine.first() else {
            continue;
        };
        let notes: Vec<u32> = get_values(
            engine,
            N::CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
            T::CUDNN_TYPE_NUMERICAL_NOTE,
        )?;
        let refused = notes.iter().any(|&n| {
            n == NOTE_NONDETERMINISTIC
                || (strict
                    && matches!(
                        n,
                        NOTE_TENSOR_CORE
                            | NOTE_DOWN_CONVERT_INPUTS
                            | NOTE_REDUCED_PRECISION_REDUCTION
                    ))
        });
        let index = get_values::<i64>(
            engine,
            N::CUDNN_ATTR_ENGINE_GLOBAL_INDEX,
            T::CUDNN_TYPE_INT64,
        )?
        .first()
        .copied()
        .ok_or("an engine without a global index")?;
        if refused {
            last = format!("engine {index} has numerical notes {notes:?}");
            continue;
        }
        match exec_plan(handle, cfg, keep) {
            Ok((_, ws)) if ws <= MAX_WORKSPACE => {
                let choices = get_descs(
                    cfg,
                    N::CUDNN_ATTR_ENGINECFG_KNOB_CHOICES,
                    D::CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR,
                    64,
                    keep,
                )?;
                let mut knobs = Vec::with_capacity(choices.len());
                for c in choices {
                    let t: Vec<u32> = get_values(
                        c,
                        N::CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE,
                        T::CUDNN_TYPE_KNOB_TYPE,
                    )?;
                    let v: Vec<i64> =
                        get_values(c, N::CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE, T::CUDNN_TYPE_INT64)?;
                    if let (Some(t), Some(v)) = (t.first(), v.first()) {
                        knobs.push((*t, *v));
                    }
                }
                return Ok(Pin::Engine { index, knobs });
            }
            Ok((_, ws)) => last = format!("engine {index}: workspace {ws} B over the limit"),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// The execution plan of a pinned engine for the forward convolution `key` (its own batch):
/// the engine of that global index with the same knob values.
fn pinned_graph_plan(
    handle: sys::cudnnHandle_t,
    key: &Key,
    index: i64,
    knobs: &[(u32, i64)],
    keep: &mut Vec<sys::cudnnBackendDescriptor_t>,
) -> std::result::Result<(sys::cudnnBackendDescriptor_t, usize), String> {
    use sys::cudnnBackendAttributeName_t as N;
    use sys::cudnnBackendAttributeType_t as T;
    use sys::cudnnBackendDescriptorType_t as D;
    let graph = conv_graph(handle, key, keep)?;
    let engine = create(D::CUDNN_BACKEND_ENGINE_DESCRIPTOR, keep)?;
    // SAFETY: each pointer names the number of elements given, of the type named.
    unsafe {
        set_attr(
            engine,
            N::CUDNN_ATTR_ENGINE_OPERATION_GRAPH,
            T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            1,
            &graph,
        )?;
        set_attr(
            engine,
            N::CUDNN_ATTR_ENGINE_GLOBAL_INDEX,
            T::CUDNN_TYPE_INT64,
            1,
            &index,
        )?;
    }
    finalize(engine, "the pinned engine")?;
    let mut choices = Vec::with_capacity(knobs.len());
    for &(t, v) in knobs {
        let c = create(D::CUDNN_BACKEND_KNOB_CHOICE_DESCRIPTOR, keep)?;
        // SAFETY: as above (the knob type is a 32-bit enum).
        unsafe {
            set_attr(
                c,
                N::CUDNN_ATTR_KNOB_CHOICE_KNOB_TYPE,
                T::CUDNN_TYPE_KNOB_TYPE,
                1,
                &t,
            )?;
            set_attr(
                c,
                N::CUDNN_ATTR_KNOB_CHOICE_KNOB_VALUE,
                T::CUDNN_TYPE_INT64,
                1,
                &v,
            )?;
        }
        finalize(c, "a knob choice")?;
        choices.push(c);
    }
    let cfg = create(D::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, keep)?;
    // SAFETY: as above.
    unsafe {
        set_attr(
            cfg,
            N::CUDNN_ATTR_ENGINECFG_ENGINE,
            T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            1,
            &engine,
        )?;
        if !choices.is_empty() {
            set_attr(
                cfg,
                N::CUDNN_ATTR_ENGINECFG_KNOB_CHOICES,
                T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                choices.len() as i64,
                choices.as_ptr(),
            )?;
        }
    }
    finalize(cfg, "the pinned engine configuration")?;
    exec_plan(handle, cfg, keep)
}

/// The forward convolution of `key` as a one-node operation graph of cuDNN's backend API
/// (NCHW or NHWC strides); every descriptor made is pushed to `keep`.
fn conv_graph(
    handle: sys::cudnnHandle_t,
    key: &Key,
    keep: &mut Vec<sys::cudnnBackendDescriptor_t>,
) -> std::result::Result<sys::cudnnBackendDescriptor_t, String> {
    use sys::cudnnBackendAttributeName_t as N;
    use sys::cudnnBackendAttributeType_t as T;
    use sys::cudnnBackendDescriptorType_t as D;
    let dt = data_type(key.dtype);
    let [n, c, h, w] = key.x.map(i64::from);
    let [k, _, r, s] = key.w.map(i64::from);
    let (p, st) = (i64::from(key.pad), i64::from(key.stride));
    let (oh, ow) = ((h + 2 * p - r) / st + 1, (w + 2 * p - s) / st + 1);
    // Dimensions in (N, C, H, W) order; the strides say where they lie in memory.
    let tensor = |uid: i64, dims: [i64; 4], keep: &mut Vec<_>| {
        let strides = if key.nhwc {
            [dims[1] * dims[2] * dims[3], 1, dims[3] * dims[1], dims[1]]
        } else {
            [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1]
        };
        let t = create(D::CUDNN_BACKEND_TENSOR_DESCRIPTOR, keep)?;
        let align = 16i64;
        // SAFETY: each pointer names the number of elements given.
        unsafe {
            set_attr(
                t,
                N::CUDNN_ATTR_TENSOR_DATA_TYPE,
                T::CUDNN_TYPE_DATA_TYPE,
                1,
                &dt,
            )?;
            set_attr(
                t,
                N::CUDNN_ATTR_TENSOR_DIMENSIONS,
                T::CUDNN_TYPE_INT64,
                4,
                dims.as_ptr(),
            )?;
            set_attr(
                t,
                N::CUDNN_ATTR_TENSOR_STRIDES,
                T::CUDNN_TYPE_INT64,
                4,
                strides.as_ptr(),
            )?;
            set_attr(
                t,
                N::CUDNN_ATTR_TENSOR_UNIQUE_ID,
                T::CUDNN_TYPE_INT64,
                1,
                &uid,
            )?;
            set_attr(
                t,
                N::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,
                T::CUDNN_TYPE_INT64,
                1,
                &align,
            )?;
        }
        finalize(t, "a tensor").map(|_| t)
    };
    let x = tensor(UID_X, [n, c, h, w], keep)?;
    let wt = tensor(UID_W, [k, c, r, s], keep)?;
    let y = tensor(UID_Y, [n, k, oh, ow], keep)?;
    let conv = create(D::CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR, keep)?;
    let (dims, comp) = (2i64, sys::cudnnDataType_t::CUDNN_DATA_FLOAT);
    let mode = sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION;
    let (pad, stride, one) = ([p, p], [st, st], [1i64, 1]);
    // SAFETY: as above.
    unsafe {
        set_attr(
            conv,
            N::CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS,
            T::CUDNN_TYPE_INT64,
            1,
            &dims,
        )?;
        set_attr(
            conv,
            N::CUDNN_ATTR_CONVOLUTION_COMP_TYPE,
            T::CUDNN_TYPE_DATA_TYPE,
            1,
            &comp,
        )?;
        set_attr(
            conv,
            N::CUDNN_ATTR_CONVOLUTION_CONV_MODE,
            T::CUDNN_TYPE_CONVOLUTION_MODE,
            1,
            &mode,
        )?;
        set_attr(
            conv,
            N::CUDNN_ATTR_CONVOLUTION_DILATIONS,
            T::CUDNN_TYPE_INT64,
            2,
            one.as_ptr(),
        )?;
        set_attr(
            conv,
            N::CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,
            T::CUDNN_TYPE_INT64,
            2,
            stride.as_ptr(),
        )?;
        set_attr(
            conv,
            N::CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS,
            T::CUDNN_TYPE_INT64,
            2,
            pad.as_ptr(),
        )?;
        set_attr(
            conv,
            N::CUDNN_ATTR_CONVOLUTION_POST_PADDINGS,
            T::CUDNN_TYPE_INT64,
            2,
            pad.as_ptr(),
        )?;
    }
    finalize(conv, "the convolution")?;
    let op = create(
        D::CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR,
        keep,
    )?;
    let (alpha, beta) = (1f32, 0f32);
    // SAFETY: as above.
    unsafe {
        set_attr(
            op,
            N::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X,
            T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            1,
            &x,
        )?;
        set_attr(
            op,
            N::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,
            T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            1,
            &wt,
        )?;
        set_attr(
            op,
            N::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
            T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            1,
            &y,
        )?;
        set_attr(
            op,
            N::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
            T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            1,
            &conv,
        )?;
        set_attr(
            op,
            N::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
            T::CUDNN_TYPE_FLOAT,
            1,
            &alpha,
        )?;
        set_attr(
            op,
            N::CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
            T::CUDNN_TYPE_FLOAT,
            1,
            &beta,
        )?;
    }
    finalize(op, "the convolution node")?;
    let graph = create(D::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, keep)?;
    // SAFETY: as above.
    unsafe {
        set_attr(
            graph,
            N::CUDNN_ATTR_OPERATIONGRAPH_OPS,
            T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            1,
            &op,
        )?;
        set_attr(
            graph,
            N::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
            T::CUDNN_TYPE_HANDLE,
            1,
            &handle,
        )?;
    }
    finalize(graph, "the operation graph")?;
    Ok(graph)
}

/// Times one graph-API execution plan with the given workspace size (milliseconds per run).
type Timer<'a> =
    dyn FnMut(sys::cudnnBackendDescriptor_t, usize) -> std::result::Result<f32, String> + 'a;

/// The engine configurations cuDNN's heuristic `mode` proposes for an operation graph, best
/// first (at most 16).
fn engine_configs(
    graph: sys::cudnnBackendDescriptor_t,
    mode: sys::cudnnBackendHeurMode_t,
    keep: &mut Vec<sys::cudnnBackendDescriptor_t>,
) -> std::result::Result<Vec<sys::cudnnBackendDescriptor_t>, String> {
    use sys::cudnnBackendAttributeName_t as N;
    use sys::cudnnBackendAttributeType_t as T;
    use sys::cudnnBackendDescriptorType_t as D;
    let heur = create(D::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, keep)?;
    // SAFETY: each pointer names one element of the type given.
    unsafe {
        set_attr(
            heur,
            N::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH,
            T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            1,
            &graph,
        )?;
        set_attr(
            heur,
            N::CUDNN_ATTR_ENGINEHEUR_MODE,
            T::CUDNN_TYPE_HEUR_MODE,
            1,
            &mode,
        )?;
    }
    finalize(heur, "the engine heuristic")?;
    const MAX_CFGS: usize = 16;
    let mut cfgs = Vec::with_capacity(MAX_CFGS);
    for _ in 0..MAX_CFGS {
        cfgs.push(create(D::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, keep)?);
    }
    let mut count = 0i64;
    // SAFETY: cuDNN fills at most MAX_CFGS of the created configuration descriptors.
    unsafe {
        sys::cudnnBackendGetAttribute(
            heur,
            N::CUDNN_ATTR_ENGINEHEUR_RESULTS,
            T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
            MAX_CFGS as i64,
            &mut count,
            cfgs.as_mut_ptr() as *mut _,
        )
    }
    .result()
    .map_err(|e| format!("reading the {mode:?} engine configurations: {e:?}"))?;
    cfgs.truncate(count.clamp(0, MAX_CFGS as i64) as usize);
    Ok(cfgs)
}

const UID_X: i64 = 1;
const UID_W: i64 = 2;
const UID_Y: i64 = 3;

/// Runs a graph-API execution plan on `[x, w, y]` with the given workspace.
///
/// # Safety
/// The pointers must be the buffers the plan's tensors describe.
unsafe fn graph_execute(
    handle: sys::cudnnHandle_t,
    exec: sys::cudnnBackendDescriptor_t,
    ptrs: [*mut std::ffi::c_void; 3],
    workspace: *mut std::ffi::c_void,
) -> std::result::Result<(), cr::CudnnError> {
    use sys::cudnnBackendAttributeName_t as N;
    use sys::cudnnBackendAttributeType_t as T;
    let mut pack = std::ptr::null_mut();
    let uids = [UID_X, UID_W, UID_Y];
    unsafe {
        sys::cudnnBackendCreateDescriptor(
            sys::cudnnBackendDescriptorType_t::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR,
            &mut pack,
        )
        .result()?;
        let run = (|| {
            sys::cudnnBackendSetAttribute(
                pack,
                N::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS,
                T::CUDNN_TYPE_INT64,
                3,
                uids.as_ptr() as *const _,
            )
            .result()?;
            sys::cudnnBackendSetAttribute(
                pack,
                N::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
                T::CUDNN_TYPE_VOID_PTR,
                3,
                ptrs.as_ptr() as *const _,
            )
            .result()?;
            sys::cudnnBackendSetAttribute(
                pack,
                N::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
                T::CUDNN_TYPE_VOID_PTR,
                1,
                &workspace as *const *mut std::ffi::c_void as *const _,
            )
            .result()?;
            sys::cudnnBackendFinalize(pack).result()?;
            sys::cudnnBackendExecute(handle, exec, pack).result()
        })();
        let _ = sys::cudnnBackendDestroyDescriptor(pack);
        run
    }
}
