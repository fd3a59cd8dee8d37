//! CUDA graphs for fixed-shape network passes (`QTAYLOR_CUDA_GRAPH=on`).
//!
//! A sampler calls the network with the same shapes at every step; only the values change
//! (the image and the time embedding). Queuing one UNet pass costs the host about 560 kernel
//! launches (4–13 ms on the H200, BENCHMARKS.md §4.2), which at small batches is longer than
//! the GPU's work. [`Graphs::run`] runs a pass normally the first time it sees a set of input
//! shapes (so cuDNN plans, workspaces and kernels exist), captures it into a CUDA graph the
//! second time, and from then on copies the new inputs into the captured input buffers and
//! replays the graph: one launch instead of hundreds. This is what PyTorch's
//! `torch.compile(mode="max-autotune")` does with its CUDA-graph trees, and what
//! `torch.cuda.graphs.make_graphed_callables` does by hand.
//!
//! The graph is captured with `CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH`: the pass's
//! intermediates are allocated and freed inside the graph (from the driver's graph memory
//! pool, counted by [`crate::gpu::device::cuda_peak_allocated`]; before the capture the default
//! pool returns the warm-up pass's freed memory, [`crate::gpu::device::before_graph_capture`]),
//! and its output buffer keeps one
//! address across replays, so each replay's output is copied out before it returns. Event
//! tracking of the CUDA context is switched off when graphs are on (one stream: every kernel,
//! cuDNN and cuBLAS call runs on candle's stream, in order), because waiting inside a capture
//! on an event recorded outside it is not allowed. Candle uploads the shapes and strides of
//! non-contiguous operands from host memory at each launch; both passes before the first
//! replay run under candle's upload cache (`enable_cuda_graph_htod_cache`), so the graph only
//! refers to device buffers that stay alive (see [`Graphs::run`]).
//!
//! Measured on the H200 (BENCHMARKS.md §4.3): replays are bit for bit the plain passes'
//! results; a bf16 forward of the CIFAR-10 UNet takes 1.7 ms instead of 5.9 ms at batch 1 and
//! 13.0 instead of 13.8 ms at batch 256, for the graph memory pool on top of the usual one.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use anyhow::{Result, bail};
use candle_core::Tensor;

/// Whether network passes on CUDA are captured and replayed as graphs:
/// `QTAYLOR_CUDA_GRAPH=on` (or `1`); `off`, `0` or unset: no. Another value is an error.
pub fn enabled() -> Result<bool> {
    static ON: OnceLock<std::result::Result<bool, String>> = OnceLock::new();
    ON.get_or_init(|| match std::env::var("QTAYLOR_CUDA_GRAPH").as_deref() {
        Err(_) | Ok("") | Ok("off") | Ok("0") => Ok(false),
        Ok("on") | Ok("1") => Ok(true),
        Ok(v) => Err(format!(
            "QTAYLOR_CUDA_GRAPH={v}: expected on or off (1 or 0)"
        )),
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Captured network passes, one per set of input shapes and dtypes.
#[derive(Default)]
pub struct Graphs {
    slots: Mutex<HashMap<String, Slot>>,
}

enum Slot {
    /// Run once without a graph (the warm-up that builds plans and loads kernels).
    Seen,
    Ready(Captured),
}

/// One captured pass (only CUDA builds make one). Field order is drop order: the output (a graph allocation, freed with
/// `cuMemFreeAsync` outside the graph, which the driver allows) goes before the graph.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Captured {
    inputs: Vec<Tensor>,
    output: Tensor,
    graph: Graph,
}

#[cfg(feature = "cuda")]
struct Graph(candle_core::cuda_backend::cudarc::driver::CudaGraph);
#[cfg(not(feature = "cuda"))]
#[allow(dead_code)]
struct Graph;

// SAFETY: a CUDA graph is not internally synchronized; every use of it (launch, drop) happens
// with the `Graphs` mutex held, and cudarc's `launch` binds the graph's context to the calling
// thread first, so it may move between threads.
#[cfg(feature = "cuda")]
unsafe impl Send for Graph {}

impl Graphs {
    /// `body(inputs)`, through a CUDA graph when graphs are [`enabled`] and the inputs live on
    /// a CUDA device (see the module doc); the result is a fresh tensor either way. `body` must
    /// depend on nothing but its inputs' values (shapes aside), and queue only stream work:
    /// no host reads, no host-to-device copies from pageable memory.
    pub fn run(
        &self,
        inputs: &[&Tensor],
        body: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
        let on_cuda = inputs.first().is_some_and(|t| t.device().is_cuda());
        let on = enabled()?;
        if !on_cuda || !on || crate::gpu::profile::profiling() {
            if on {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    eprintln!(
                        "warning: QTAYLOR_CUDA_GRAPH=on has no effect here ({}): network passes run without CUDA graphs",
                        if on_cuda {
                            "QTAYLOR_PROFILE times every operation"
                        } else {
                            "not on a CUDA device"
                        }
                    )
                });
            }
            return body(&owned);
        }
        // The pass's math is fixed by its input shapes and dtypes and the TF32 switch (the
        // other kernel choices are read once per process).
        let mut key = inputs
            .iter()
            .map(|t| format!("{:?}{:?};", t.dims(), t.dtype()))
            .collect::<String>();
        key.push_str(if crate::gpu::device::tf32() {
            "tf32"
        } else {
            ""
        });
        // Deterministic mode runs other kernels (src/gpu/determinism.rs).
        if crate::gpu::determinism::deterministic() {
            key.push_str("det");
        }
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // candle uploads the shapes and strides of non-contiguous operands from host memory
        // at every kernel launch; a captured upload would re-read that (freed) host memory at
        // each replay. Under this guard candle keeps each distinct upload in a device buffer
        // of its own and reuses it, so the warm-up pass fills that cache, the captured pass
        // refers only to cached buffers (a miss while capturing is an error), and they live
        // as long as the cache (the thread's; the process-wide one for kernel parameters).
        let _cache = htod_cache(inputs[0]);
        match slots.get(&key) {
            None => {
                let out = body(&owned)?;
                slots.insert(key, Slot::Seen);
                Ok(out)
            }
            Some(Slot::Seen) => {
                let captured = capture(&owned, &body)?;
                let out = replay(&captured, &owned)?;
                slots.insert(key, Slot::Ready(captured));
                Ok(out)
            }
            Some(Slot::Ready(c)) => replay(c, &owned),
        }
    }
}

/// Candle's upload cache guard for the inputs' CUDA device (the guard type is not exported,
/// hence the box); dropping it ends the cached mode.
#[cfg(feature = "cuda")]
fn htod_cache(t: &Tensor) -> Option<Box<dyn std::any::Any>> {
    match t.device() {
        candle_core::Device::Cuda(d) => Some(Box::new(d.enable_cuda_graph_htod_cache())),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn htod_cache(_: &Tensor) -> Option<Box<dyn std::any::Any>> {
    None
}

/// Copies `inputs` into the captured input buffers, replays the graph and copies its output.
fn replay(c: &Captured, inputs: &[Tensor]) -> Result<Tensor> {
    for (dst, src) in c.inputs.iter().zip(inputs) {
        dst.slice_set(&src.contiguous()?, 0, 0)?;
    }
    launch(&c.graph)?;
    Ok(c.output.copy()?)
}

#[cfg(feature = "cuda")]
fn launch(g: &Graph) -> Result<()> {
    g.0.launch()
        .map_err(|e| anyhow::anyhow!("replaying a captured CUDA graph: {e:?}"))
}

#[cfg(not(feature = "cuda"))]
fn launch(_: &Graph) -> Result<()> {
    bail!("CUDA graphs need a build with --features cuda")
}

/// Captures `body` on the inputs' stream into fresh input buffers (copies of `inputs`, made
/// before the capture so that they live outside the graph).
#[cfg(feature = "cuda")]
fn capture(inputs: &[Tensor], body: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Result<Captured> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let statics: Vec<Tensor> = inputs.iter().map(|t| t.copy()).collect::<Result<_, _>>()?;
    let candle_core::Device::Cuda(d) = statics[0].device() else {
        bail!("CUDA graph capture needs CUDA tensors");
    };
    let stream = d.cuda_stream();
    let cuda = |what: &str, e: &dyn std::fmt::Debug| {
        anyhow::anyhow!(
            "CUDA graph capture ({what}): {e:?}; run without QTAYLOR_CUDA_GRAPH to sample without graphs"
        )
    };
    stream.synchronize().map_err(|e| cuda("synchronize", &e))?;
    crate::gpu::device::before_graph_capture(statics[0].device())?;
    // SAFETY: one stream does all of this process's GPU work (see the module doc).
    unsafe { stream.context().disable_event_tracking() };
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(|e| cuda("begin", &e))?;
    let out = body(&statics);
    let graph = stream.end_capture(
        sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
    );
    match (out, graph) {
        (Ok(output), Ok(Some(graph))) => Ok(Captured {
            inputs: statics,
            output,
            graph: Graph(graph),
        }),
        (Err(e), _) => Err(e.context(
            "a network pass failed while being captured as a CUDA graph (QTAYLOR_CUDA_GRAPH=on); run without it",
        )),
        (_, Err(e)) => Err(cuda("end", &e)),
        (_, Ok(None)) => bail!("CUDA graph capture produced no graph; run without QTAYLOR_CUDA_GRAPH"),
    }
}

#[cfg(not(feature = "cuda"))]
fn capture(_: &[Tensor], _: &dyn Fn(&[Tensor]) -> Result<Tensor>) -> Result<Captured> {
    bail!("CUDA graphs need a build with --features cuda")
}
