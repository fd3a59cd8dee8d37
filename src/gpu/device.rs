//! The CUDA device: opening it with a kept memory pool, its peak allocation, the memory
//! handling around a CUDA-graph capture, TF32 for f32 convolutions, and the storage copy the
//! custom operations' forwards share. Below every other GPU module.

use candle_core::backend::BackendStorage;
use candle_core::{Layout, Result, Shape};

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

/// Called by the CUDA-graph capture (the `cuda_graph` module) before it captures a pass, with the stream idle: the
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

/// A copy of a fresh contiguous tensor's storage: the forward of the custom operations that
/// return a result computed outside the autograd graph (`op` names the operation in the error).
pub(crate) fn fresh_copy<S: BackendStorage>(s: &S, l: &Layout, op: &str) -> Result<(S, Shape)> {
    match l.contiguous_offsets() {
        Some((0, end)) if end == l.shape().elem_count() => Ok((s.try_clone(l)?, l.shape().clone())),
        _ => candle_core::bail!("{op}: the forward result must be a fresh contiguous tensor"),
    }
}

/// The device named `name` (the `device` option): `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn by_name(name: &str) -> anyhow::Result<candle_core::Device> {
    use qtaylor_core::{bail_option, keys, option_error};
    let given = (keys::DEVICE, name);
    let no_cuda = || {
        option_error!(
            given,
            ": this binary was built without CUDA support; build it with scripts/build-cuda.sh"
        )
    };
    // candle's error text carries a backtrace after its first line.
    let first =
        |e: candle_core::Error| e.to_string().lines().next().unwrap_or_default().to_string();
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" if cfg!(feature = "cuda") => open_cuda(0).map_err(|e| {
            option_error!(
                given,
                format!(
                    ": no usable CUDA device ({}); run on a machine with an NVIDIA GPU and driver, or use ",
                    first(e)
                ),
                (keys::DEVICE, "cpu")
            )
            .into()
        }),
        "cuda" => Err(no_cuda().into()),
        other if other.starts_with("cuda:") => {
            let n: usize = other[5..].parse().map_err(|_| {
                option_error!(given, ": expected cuda:N with a GPU number N, e.g. cuda:1")
            })?;
            if !cfg!(feature = "cuda") {
                return Err(no_cuda().into());
            }
            open_cuda(n).map_err(|e| {
                option_error!(given, format!(": no usable CUDA device {n} ({})", first(e))).into()
            })
        }
        other => bail_option!((keys::DEVICE, other), ": expected cpu, cuda or cuda:N"),
    }
}

/// The devices of a comma-separated list (the `devices` option), each GPU at most once.
pub fn by_names(list: &str) -> anyhow::Result<Vec<candle_core::Device>> {
    use qtaylor_core::{bail_option, keys, option_error};
    let names: Vec<&str> = list.split(',').map(str::trim).collect();
    if names.iter().any(|d| d.is_empty()) {
        bail_option!(
            (keys::DEVICES, list),
            ": expected a comma-separated list of devices, e.g. cuda:0,cuda:1"
        );
    }
    let gpu = |d: &str| match d {
        "cuda" => Some(0),
        _ => d
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok()),
    };
    for (i, a) in names.iter().enumerate() {
        if let Some(n) = gpu(a)
            && names[..i].iter().any(|b| gpu(b) == Some(n))
        {
            bail_option!(
                (keys::DEVICES, list),
                format!(": GPU {n} appears twice; give each GPU once")
            );
        }
    }
    names
        .iter()
        .map(|d| by_name(d).map_err(|e| option_error!((keys::DEVICES, list)).caused_by(e)))
        .collect()
}
