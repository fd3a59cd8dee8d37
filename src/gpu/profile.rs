//! Per-operation timing (`QTAYLOR_PROFILE`): the UNet's forward and backward passes, and
//! training's optimiser step, time their operations through [`timed`] and the span and
//! marker functions here; `speed` and `train` print [`profile_report`].

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::Result;
use candle_core::{Device, Tensor};

/// Per-operation timing of the forward pass, on when the environment variable
/// `QTAYLOR_PROFILE` is set. On CUDA each timed operation is bracketed by two events recorded
/// on the device's stream, so the table holds GPU time and the pass is not slowed by
/// synchronizations; elsewhere the device is synchronized around the operation and its wall
/// time is taken. Nested operations count in both rows (attention includes its group norm).
/// [`profile_report`] reads the table, [`profile_reset`] empties it (after a warm-up).
#[derive(Default)]
struct ProfileTable {
    totals: HashMap<&'static str, (f64, usize)>,
    /// Backward markers in the order they fired; an `(end)` entry closes each pass.
    backward: Vec<(&'static str, BackwardMark)>,
    /// Spans from [`profile_start`] / [`profile_end`].
    spans: Vec<(&'static str, BackwardMark, BackwardMark)>,
    #[cfg(feature = "cuda")]
    pending: Vec<(
        &'static str,
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
    )>,
}

static PROFILE: std::sync::OnceLock<Option<Mutex<ProfileTable>>> = std::sync::OnceLock::new();

/// Whether `QTAYLOR_PROFILE` times every operation (which synchronizes around each).
pub(crate) fn profiling() -> bool {
    profiler().is_some()
}

fn profiler() -> Option<&'static Mutex<ProfileTable>> {
    PROFILE
        .get_or_init(|| std::env::var_os("QTAYLOR_PROFILE").map(|_| Mutex::default()))
        .as_ref()
}

fn add(t: &mut ProfileTable, name: &'static str, secs: f64) {
    let e = t.totals.entry(name).or_insert((0.0, 0));
    e.0 += secs;
    e.1 += 1;
}

/// Runs `f`, timing it under `name` when profiling is on. A tensor result that is part of an
/// autograd graph (training) also gets a backward marker ([`BackwardMarker`]), so the
/// backward pass is timed per forward operation too.
pub(crate) fn timed<T: 'static>(
    name: &'static str,
    device: &Device,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let Some(table) = profiler() else {
        let out = f()?;
        if tracing()
            && let Some(t) = (&out as &dyn std::any::Any).downcast_ref::<Tensor>()
        {
            trace_point(name, t)?;
        }
        return Ok(out);
    };
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
        let stream = d.cuda_stream();
        let event = || stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
        let start = event().map_err(candle_core::Error::wrap)?;
        let out = f()?;
        let end = event().map_err(candle_core::Error::wrap)?;
        table
            .lock()
            .expect("profile lock")
            .pending
            .push((name, start, end));
        return mark_backward(name, out);
    }
    device.synchronize()?;
    let t0 = std::time::Instant::now();
    let out = f()?;
    device.synchronize()?;
    add(
        &mut table.lock().expect("profile lock"),
        name,
        t0.elapsed().as_secs_f64(),
    );
    mark_backward(name, out)
}

/// One operation's output in a trace: its name and a copy of its value (later operations
/// may write into the original in place).
pub type TracePoint = (&'static str, Tensor);

thread_local! {
    static TRACE: std::cell::RefCell<Option<Vec<TracePoint>>> =
        const { std::cell::RefCell::new(None) };
}

fn tracing() -> bool {
    TRACE.with(|t| t.borrow().is_some())
}

/// Records `t` under `name` when [`traced`] runs on this thread (every operation [`timed`]
/// wraps is recorded; other layers call this for operations they want named).
pub fn trace_point(name: &'static str, t: &Tensor) -> candle_core::Result<()> {
    if !tracing() {
        return Ok(());
    }
    let copy = t.copy()?;
    TRACE.with(|tr| {
        if let Some(v) = tr.borrow_mut().as_mut() {
            v.push((name, copy));
        }
    });
    Ok(())
}

/// Runs `f` and returns, with its result, every operation output recorded on the way, in
/// order (`qtaylor determinism` compares them between runs and batches). Not for passes
/// replayed from CUDA graphs, which run no host code per operation.
pub fn traced<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Vec<TracePoint>)> {
    TRACE.with(|t| *t.borrow_mut() = Some(Vec::new()));
    let out = f();
    let points = TRACE.with(|t| t.borrow_mut().take()).unwrap_or_default();
    Ok((out?, points))
}

/// `out` itself, or (a tensor in an autograd graph, profiling on) a copy of it through
/// [`BackwardMarker`].
fn mark_backward<T: 'static>(name: &'static str, mut out: T) -> Result<T> {
    if let Some(t) = (&mut out as &mut dyn std::any::Any).downcast_mut::<Tensor>()
        && t.track_op()
    {
        *t = t.apply_op1(BackwardMarker(name))?;
    }
    Ok(out)
}

/// The identity, whose backward records when the gradient of the marked operation's output
/// arrives (a CUDA event, or the wall clock after a synchronization elsewhere). The time from
/// one marker to the next is the backward of the marked operation (and of any unmarked
/// operations between them); [`profile_report`] lists it as `backward: <name>`.
struct BackwardMarker(&'static str);

impl candle_core::CustomOp1 for BackwardMarker {
    fn name(&self) -> &'static str {
        "profile-backward-marker"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        crate::gpu::device::fresh_copy(s, l, "profile marker")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        crate::gpu::device::fresh_copy(s, l, "profile marker")
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if let Some(table) = profiler() {
            let mark = BackwardMark::now(grad.device())?;
            table
                .lock()
                .expect("profile lock")
                .backward
                .push((self.0, mark));
        }
        Ok(Some(grad.clone()))
    }
}

/// When a backward marker fired: a CUDA event on the device's stream, or a wall-clock instant
/// after synchronizing the device.
enum BackwardMark {
    #[cfg(feature = "cuda")]
    Event(candle_core::cuda_backend::cudarc::driver::CudaEvent),
    Instant(std::time::Instant),
}

impl BackwardMark {
    fn now(device: &Device) -> candle_core::Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = device {
            use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
            let e = d
                .cuda_stream()
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(candle_core::Error::wrap)?;
            return Ok(Self::Event(e));
        }
        device.synchronize()?;
        Ok(Self::Instant(std::time::Instant::now()))
    }

    /// Seconds from `self` to `later`.
    fn until(&self, later: &Self) -> candle_core::Result<f64> {
        match (self, later) {
            #[cfg(feature = "cuda")]
            (Self::Event(a), Self::Event(b)) => {
                b.synchronize().map_err(candle_core::Error::wrap)?;
                Ok(f64::from(a.elapsed_ms(b).map_err(candle_core::Error::wrap)?) / 1e3)
            }
            (Self::Instant(a), Self::Instant(b)) => Ok((*b - *a).as_secs_f64()),
            #[allow(unreachable_patterns)]
            _ => candle_core::bail!("profile: backward marks of two kinds"),
        }
    }
}

/// The start of a timed span that is not one closure (see [`profile_end`]); `None` when
/// profiling is off.
pub(crate) struct ProfileSpan(&'static str, BackwardMark);

pub(crate) fn profile_start(name: &'static str, device: &Device) -> Result<Option<ProfileSpan>> {
    if profiler().is_none() {
        return Ok(None);
    }
    Ok(Some(ProfileSpan(name, BackwardMark::now(device)?)))
}

/// Closes a span from [`profile_start`]; its time is added to the table at the report.
pub(crate) fn profile_end(span: Option<ProfileSpan>, device: &Device) -> Result<()> {
    if let (Some(table), Some(ProfileSpan(name, start))) = (profiler(), span) {
        let end = BackwardMark::now(device)?;
        table
            .lock()
            .expect("profile lock")
            .spans
            .push((name, start, end));
    }
    Ok(())
}

/// Marks the end of a backward pass (call right after `backward()` returns), so that the
/// last marked operation's backward is closed.
pub(crate) fn profile_backward_done(device: &Device) -> Result<()> {
    if let Some(table) = profiler() {
        let mark = BackwardMark::now(device)?;
        table
            .lock()
            .expect("profile lock")
            .backward
            .push(("(end)", mark));
    }
    Ok(())
}

/// `backward: <name>`, made once per name (the table's keys are static).
fn backward_label(name: &'static str) -> &'static str {
    static LABELS: Mutex<Vec<(&'static str, &'static str)>> = Mutex::new(Vec::new());
    let mut labels = LABELS.lock().expect("profile labels");
    if let Some((_, l)) = labels.iter().find(|(n, _)| *n == name) {
        return l;
    }
    let l: &'static str = Box::leak(format!("backward: {name}").into_boxed_str());
    labels.push((name, l));
    l
}

/// Empties the profile table (call after a warm-up pass).
pub fn profile_reset() -> Result<()> {
    if let Some(table) = profiler() {
        let mut t = table.lock().expect("profile lock");
        t.totals.clear();
        t.backward.clear();
        t.spans.clear();
        #[cfg(feature = "cuda")]
        t.pending.clear();
    }
    Ok(())
}

/// The profile table (operation, total seconds, calls), largest first; empty when off.
/// On CUDA it waits for the recorded events.
pub fn profile_report() -> Result<Vec<(&'static str, f64, usize)>> {
    let Some(table) = profiler() else {
        return Ok(Vec::new());
    };
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut t = table.lock().expect("profile lock");
    #[cfg(feature = "cuda")]
    for (name, start, end) in std::mem::take(&mut t.pending) {
        end.synchronize().map_err(candle_core::Error::wrap)?;
        let ms = start.elapsed_ms(&end).map_err(candle_core::Error::wrap)?;
        add(&mut t, name, f64::from(ms) / 1e3);
    }
    for (name, from, to) in std::mem::take(&mut t.spans) {
        let secs = from.until(&to)?;
        add(&mut t, name, secs);
    }
    let marks = std::mem::take(&mut t.backward);
    for pair in marks.windows(2) {
        let ((name, from), (_, to)) = (&pair[0], &pair[1]);
        if *name == "(end)" {
            continue;
        }
        let secs = from.until(to)?;
        add(&mut t, backward_label(name), secs);
    }
    let mut v: Vec<_> = t.totals.iter().map(|(k, (s, n))| (*k, *s, *n)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(v)
}

/// The lines `speed` and `train` end with: CUDA's peak allocation, and the QTAYLOR_PROFILE
/// table of what `span` covers: each operation's total time, or its mean per `unit` over
/// `count` of them (nested operations count in each row; `backward: X` runs from X's backward
/// marker to the next).
pub fn device_report(
    device: &Device,
    span: &str,
    per: Option<(&str, usize)>,
) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    if let Some(b) = crate::gpu::device::cuda_peak_allocated(device)? {
        lines.push(format!(
            "peak device memory allocated (CUDA memory pool high-water mark, as torch.cuda.max_memory_allocated): {:.0} MiB",
            b as f64 / (1u64 << 20) as f64
        ));
    }
    let profile = crate::gpu::profile::profile_report()?;
    if !profile.is_empty() {
        lines.push(format!(
            "profile (QTAYLOR_PROFILE; {}; {span}; nested operations count in each row, `backward: X` is from X's backward marker to the next):",
            if device.is_cuda() {
                "GPU time between CUDA events"
            } else {
                "wall time, device synchronized around each operation"
            }
        ));
        for (name, secs, calls) in profile {
            lines.push(match per {
                Some((unit, count)) => format!(
                    "  {name:<40} {:>9.2} ms per {unit} ({calls} calls)",
                    1e3 * secs / count.max(1) as f64
                ),
                None => format!("  {name:<40} {:>9.1} ms ({calls} calls)", 1e3 * secs),
            });
        }
    }
    Ok(lines)
}
