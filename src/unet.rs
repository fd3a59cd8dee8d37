//! diffusers' `UNet2DModel` in candle: the DDPM-style UNet with `DownBlock2D`,
//! `AttnDownBlock2D`, `UpBlock2D`, `AttnUpBlock2D` and the `UNetMidBlock2D`, configured from
//! diffusers' `config.json` and loaded from its safetensors weights (current attention key
//! names `to_q/to_k/to_v/to_out.0` or the legacy `query/key/value/proj_attn`).
//!
//! The forward pass follows diffusers 0.42 (`models/unets/unet_2d.py`): positional timestep
//! embedding (computed with PyTorch's float32 steps), `TimestepEmbedding` (linear, SiLU,
//! linear), ResNet blocks `(x + conv2(act(norm2(conv1(act(norm1(x))) + proj(act(temb))))))/s`
//! (or scale-shift), single- or multi-head self-attention with a residual, stride-2 conv
//! downsampling (asymmetric right/bottom padding when `downsample_padding = 0`), nearest ×2
//! upsampling followed by a conv, skip connections concatenated as `[h, skip]`.
//!
//! On CUDA (frozen weights) the same sums are arranged for speed: every convolution writes
//! its raw output and one in-place epilogue adds bias, time embedding, shortcut (whose own
//! bias joins it) and the output scale; the asymmetric downsampling pad is folded into a 4×4
//! stride-2 kernel (`fold_bottom_right_padding`); upsampling with its convolution is one
//! transposed convolution (`fold_upsample_conv`). The CPU keeps the composed forms.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear};
use serde::Deserialize;

fn d_in() -> usize {
    3
}
fn d_true() -> bool {
    true
}
fn d_positional() -> String {
    "positional".into()
}
fn d_down() -> Vec<String> {
    [
        "DownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up() -> Vec<String> {
    [
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "UpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2D".into())
}
fn d_channels() -> Vec<usize> {
    vec![224, 448, 672, 896]
}
fn d_two() -> usize {
    2
}
fn d_one_f() -> f64 {
    1.0
}
fn d_one() -> usize {
    1
}
fn d_conv() -> String {
    "conv".into()
}
fn d_silu() -> String {
    "silu".into()
}
fn d_head() -> Option<usize> {
    Some(8)
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_default() -> String {
    "default".into()
}

/// `config.json` of a diffusers `UNet2DModel`. A missing key takes diffusers' `__init__`
/// default; an explicit `null` for `attention_head_dim` means one head of full width.
#[derive(Clone, Debug, Deserialize)]
pub struct UNet2DConfig {
    #[serde(default = "d_in")]
    pub in_channels: usize,
    #[serde(default = "d_in")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_two")]
    pub layers_per_block: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_conv")]
    pub downsample_type: String,
    #[serde(default = "d_conv")]
    pub upsample_type: String,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_head")]
    pub attention_head_dim: Option<usize>,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default)]
    pub attn_norm_num_groups: Option<usize>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_true")]
    pub add_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
}

/// Limits on a UNet2DModel config (checked by [`UNet2DConfig::from_json`]).
pub const MAX_BLOCKS: usize = 8;
/// The widest block accepted (`block_out_channels`).
pub const MAX_WIDTH: usize = 8192;
/// Image (or latent) channels in and out.
pub const MAX_IO_CHANNELS: usize = 256;
/// ResNet layers per block.
pub const MAX_LAYERS_PER_BLOCK: usize = 32;
/// Height and width (`sample_size`, `--image-size`).
pub const MAX_SAMPLE_SIZE: usize = 8192;
/// Rows of a class embedding table (`num_class_embeds`).
pub const MAX_CLASSES: usize = 1 << 20;
/// Parameters that synthetic weights hand out before refusing (1 G: 4 GB of f32).
pub const MAX_SYNTHETIC_PARAMETERS: usize = 1 << 30;

impl UNet2DConfig {
    /// Parses and checks that every option is one this port implements.
    pub fn from_json(text: &str, file: &Path) -> Result<Self> {
        let c: UNet2DConfig = serde_json::from_str(text)
            .with_context(|| format!("{}: malformed UNet2DModel config", file.display()))?;
        c.validate()
            .with_context(|| format!("{}: unsupported UNet2DModel config", file.display()))?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("key 'block_out_channels' is empty");
        }
        // Stated limits, checked before anything is allocated (the largest diffusers UNets use
        // widths of 1280 and 4 blocks): a hostile config fails here, not in the allocator.
        let limit = |key: &str, v: usize, max: usize| -> Result<()> {
            if v > max {
                bail!("key '{key}': {v} exceeds the limit of {max}");
            }
            Ok(())
        };
        limit("block_out_channels (count)", n, MAX_BLOCKS)?;
        for &c in &self.block_out_channels {
            limit("block_out_channels", c, MAX_WIDTH)?;
        }
        limit("in_channels", self.in_channels, MAX_IO_CHANNELS)?;
        limit("out_channels", self.out_channels, MAX_IO_CHANNELS)?;
        limit(
            "layers_per_block",
            self.layers_per_block,
            MAX_LAYERS_PER_BLOCK,
        )?;
        if let Some(d) = self.time_embedding_dim {
            limit("time_embedding_dim", d, 4 * MAX_WIDTH)?;
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.layers_per_block == 0 {
            bail!(
                "keys 'in_channels', 'out_channels' and 'layers_per_block' must be at least 1 (got {}, {}, {})",
                self.in_channels,
                self.out_channels,
                self.layers_per_block
            );
        }
        if let Some(v) = &self.sample_size {
            let sizes: Vec<u64> = match v {
                serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64()).collect(),
                x => x.as_u64().into_iter().collect(),
            };
            for s in sizes {
                limit("sample_size", s as usize, MAX_SAMPLE_SIZE)?;
            }
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "keys 'down_block_types' ({}) and 'up_block_types' ({}) must have one entry per block_out_channels ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        for t in &self.down_block_types {
            if t != "DownBlock2D" && t != "AttnDownBlock2D" {
                bail!(
                    "key 'down_block_types': block type '{t}' is not supported; expected DownBlock2D or AttnDownBlock2D"
                );
            }
        }
        for t in &self.up_block_types {
            if t != "UpBlock2D" && t != "AttnUpBlock2D" {
                bail!(
                    "key 'up_block_types': block type '{t}' is not supported; expected UpBlock2D or AttnUpBlock2D"
                );
            }
        }
        if let Some(m) = &self.mid_block_type
            && m != "UNetMidBlock2D"
        {
            bail!("key 'mid_block_type': '{m}' is not supported; expected UNetMidBlock2D or null");
        }
        if self.time_embedding_type != "positional" {
            bail!(
                "key 'time_embedding_type': '{}' is not supported; expected positional",
                self.time_embedding_type
            );
        }
        if self.downsample_type != "conv" || self.upsample_type != "conv" {
            bail!(
                "keys 'downsample_type'/'upsample_type': '{}'/'{}' are not supported; expected conv",
                self.downsample_type,
                self.upsample_type
            );
        }
        if self.downsample_padding > 1 {
            bail!(
                "key 'downsample_padding': {} is not supported; expected 0 or 1",
                self.downsample_padding
            );
        }
        if self.resnet_time_scale_shift != "default"
            && self.resnet_time_scale_shift != "scale_shift"
        {
            bail!(
                "key 'resnet_time_scale_shift': '{}' is not supported; expected default or scale_shift",
                self.resnet_time_scale_shift
            );
        }
        if let Some(t) = &self.class_embed_type {
            bail!(
                "key 'class_embed_type': '{t}' is not supported; expected null (a class embedding table of num_class_embeds rows added to the time embedding)"
            );
        }
        if let Some(n) = self.num_class_embeds {
            if n == 0 {
                bail!("key 'num_class_embeds': 0 classes; expected at least 1, or null");
            }
            limit("num_class_embeds", n, MAX_CLASSES)?;
        }
        act(&self.act_fn)?;
        let g = self
            .norm_num_groups
            .ok_or_else(|| anyhow::anyhow!("key 'norm_num_groups': null is not supported"))?;
        if g == 0 {
            bail!("key 'norm_num_groups': 0 groups");
        }
        for &c in &self.block_out_channels {
            if c % g != 0 {
                bail!("key 'norm_num_groups': {g} groups do not divide {c} channels");
            }
            if let Some(h) = self.attention_head_dim
                && (h == 0 || c % h != 0)
            {
                bail!("key 'attention_head_dim': {h} does not divide {c} channels");
            }
        }
        if !self.block_out_channels[0].is_multiple_of(2) {
            bail!(
                "key 'block_out_channels': the first width must be even for the timestep embedding"
            );
        }
        Ok(())
    }

    /// The factor H and W must be divisible by: 2^(blocks − 1).
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

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
        return f();
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
        crate::kernels::fresh_copy(s, l, "profile marker")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        crate::kernels::fresh_copy(s, l, "profile marker")
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

#[derive(Clone, Copy, Debug)]
enum Act {
    Silu,
    Mish,
    Gelu,
    Relu,
}

fn act(name: &str) -> Result<Act> {
    Ok(match name {
        "silu" | "swish" => Act::Silu,
        "mish" => Act::Mish,
        "gelu" => Act::Gelu,
        "relu" => Act::Relu,
        other => {
            bail!("key 'act_fn': '{other}' is not supported; expected silu, mish, gelu or relu")
        }
    })
}

fn apply(a: Act, x: &Tensor) -> candle_core::Result<Tensor> {
    match a {
        Act::Silu => candle_nn::ops::silu(x),
        Act::Mish => x * ((x.exp()? + 1.0)?.log()?.tanh()?),
        Act::Gelu => x.gelu_erf(),
        Act::Relu => x.relu(),
    }
}

/// The tensors of a safetensors file, checked one by one as the model asks for them.
pub struct Weights {
    file: PathBuf,
    tensors: HashMap<String, Tensor>,
    used: Mutex<HashSet<String>>,
    /// Synthetic weights: any tensor asked for is made up like PyTorch's default init
    /// (weights uniform in ±1/√fan_in, biases 0, norm scales 1) from a seed and its name, and
    /// kept (for counting and saving). For architecture tests and benchmark models.
    synthetic: Option<(u64, Mutex<HashMap<String, Tensor>>)>,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// Reads and validates a safetensors file (a truncated or corrupt file is an error that
    /// names it).
    pub fn load(file: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(file)
            .with_context(|| format!("cannot read weights file {}", file.display()))?;
        Self::from_bytes(file, &bytes, dtype, device)
    }

    /// Reads safetensors bytes (e.g. embedded in the binary); `file` names them in errors.
    pub fn from_bytes(file: &Path, bytes: &[u8], dtype: DType, device: &Device) -> Result<Self> {
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid safetensors file (truncated or corrupt?): {e}",
                file.display()
            )
        })?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
                .with_context(|| format!("{}: cannot read tensor '{name}'", file.display()))?;
            tensors.insert(name, t);
        }
        Ok(Weights {
            file: file.to_path_buf(),
            tensors,
            used: Mutex::new(HashSet::new()),
            synthetic: None,
            dtype,
            device: device.clone(),
        })
    }

    /// Weights held in memory (for example candle `Var`s being trained); `label` names
    /// them in errors.
    pub fn from_tensors(
        label: &str,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Weights {
            file: PathBuf::from(label),
            tensors,
            used: Mutex::new(HashSet::new()),
            synthetic: None,
            dtype,
            device: device.clone(),
        }
    }

    /// Made-up weights of whatever shape the model asks for (see the `synthetic` field).
    pub fn synthetic(seed: u64, dtype: DType, device: &Device) -> Self {
        Weights {
            file: PathBuf::from("<synthetic>"),
            tensors: HashMap::new(),
            used: Mutex::new(HashSet::new()),
            synthetic: Some((seed, Mutex::new(HashMap::new()))),
            dtype,
            device: device.clone(),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name` of shape `shape`, in the model dtype on the model device.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if let Some((seed, made)) = &self.synthetic {
            use rand::SeedableRng;
            use rand_distr::Distribution;
            let n: usize = shape.iter().product();
            let so_far: usize = made
                .lock()
                .expect("weights lock")
                .values()
                .map(|t| t.elem_count())
                .sum();
            if so_far + n > MAX_SYNTHETIC_PARAMETERS {
                bail!(
                    "tensor '{name}' of shape {shape:?} would take the model past {MAX_SYNTHETIC_PARAMETERS} parameters, the limit for made-up weights"
                );
            }
            let h = name.bytes().fold(*seed, |h, b| {
                h.wrapping_mul(0x100000001b3).wrapping_add(b as u64)
            });
            let mut rng = rand_chacha::ChaCha12Rng::seed_from_u64(h);
            let data: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; n]
            } else if name.contains("norm") {
                vec![1.0; n]
            } else if name.starts_with("class_embedding") {
                // nn.Embedding's default init: N(0, 1).
                let d = rand_distr::StandardNormal;
                (0..n).map(|_| d.sample(&mut rng)).collect()
            } else {
                let bound = 1.0 / (shape[1..].iter().product::<usize>() as f32).sqrt();
                let u = rand_distr::Uniform::new(-bound, bound).expect("valid bound");
                (0..n).map(|_| u.sample(&mut rng)).collect()
            };
            let t = Tensor::from_vec(data, shape, &Device::Cpu)?;
            made.lock()
                .expect("weights lock")
                .insert(name.to_string(), t.clone());
            return Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?);
        }
        let t = self.tensors.get(name).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: tensor '{name}' is missing (expected shape {shape:?})",
                self.file.display()
            )
        })?;
        if t.dims() != shape {
            bail!(
                "{}: tensor '{name}' has shape {:?}, expected {shape:?}",
                self.file.display(),
                t.dims()
            );
        }
        self.used
            .lock()
            .expect("weights lock")
            .insert(name.to_string());
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    /// Names in the file that no module asked for.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().expect("weights lock");
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Total number of parameters in the file (synthetic: handed out so far).
    pub fn parameter_count(&self) -> usize {
        match &self.synthetic {
            Some((_, made)) => made
                .lock()
                .expect("weights lock")
                .values()
                .map(|t| t.elem_count())
                .sum(),
            None => self.tensors.values().map(|t| t.elem_count()).sum(),
        }
    }

    /// The tensors a synthetic set has made so far (f32, CPU).
    pub fn synthetic_tensors(&self) -> HashMap<String, Tensor> {
        match &self.synthetic {
            Some((_, made)) => made.lock().expect("weights lock").clone(),
            None => HashMap::new(),
        }
    }

    fn conv(
        &self,
        p: &str,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Conv> {
        let w = self.get(&format!("{p}.weight"), &[cout, cin, k, k])?;
        let b = self.get(&format!("{p}.bias"), &[cout])?;
        // Trainable weights (candle `Var`s) take the matrix-product paths on every device:
        // their backward is matrix products too, where candle's conv2d backward runs a
        // direct transposed convolution.
        let trainable = w.track_op();
        // 1×1 convolutions on CUDA: cuBLAS products, or the cached cuDNN plans with --tf32 (so
        // that they use TF32 too) or QTAYLOR_CONV1X1=cudnn (BENCHMARKS.md §4.2).
        let cudnn_1x1 = crate::kernels::own_cudnn_conv()
            && (crate::kernels::tf32()
                || std::env::var("QTAYLOR_CONV1X1").is_ok_and(|v| v == "cudnn"));
        let cuda_1x1 = self.device.is_cuda() && !cudnn_1x1;
        if (cuda_1x1 || trainable) && k == 1 && stride == 1 && padding == 0 {
            return Ok(Conv::Pointwise {
                w: w.reshape((cout, cin))?,
                bias: b,
            });
        }
        if trainable && k == 3 && stride == 1 && padding == 1 {
            return Ok(Conv::Train3x3 { w, bias: b });
        }
        if self.device.is_cpu() && k == 3 && stride == 1 && padding == 1 {
            return Ok(Conv::Im2col {
                w2: w.reshape((cout, cin * 9))?,
                bias: b,
                out_c: cout,
            });
        }
        Ok(Conv::Candle(Conv2d::new(
            w,
            Some(b),
            Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            },
        )))
    }

    /// The downsampler's 3×3 stride-2 convolution and whether its input still needs
    /// diffusers' asymmetric zero padding (right and bottom by one, `downsample_padding = 0`).
    /// With frozen weights on CUDA that padding is folded into the weights instead
    /// ([`fold_bottom_right_padding`]), which saves copying the activations twice per
    /// downsampling (`QTAYLOR_DOWNSAMPLE=pad` keeps the padded input).
    fn downsample_conv(&self, p: &str, c: usize, padding: usize) -> Result<(Conv, bool)> {
        let conv = self.conv(p, c, c, 3, 2, padding)?;
        let fold = padding == 0
            && self.device.is_cuda()
            && std::env::var("QTAYLOR_DOWNSAMPLE").map_or(true, |v| v != "pad");
        match conv {
            Conv::Candle(cv) if fold && !cv.weight().track_op() => {
                let w4 = fold_bottom_right_padding(cv.weight())?;
                let cfg = Conv2dConfig {
                    padding: 1,
                    stride: 2,
                    ..Default::default()
                };
                Ok((
                    Conv::Candle(Conv2d::new(w4, cv.bias().cloned(), cfg)),
                    false,
                ))
            }
            conv => Ok((conv, padding == 0)),
        }
    }

    /// An up-block's nearest ×2 upsampling and 3×3 convolution, with the pair folded into
    /// one transposed convolution ([`fold_upsample_conv`]) for frozen weights on CUDA's
    /// cuDNN path. `QTAYLOR_UPSAMPLE`: `auto` (the default: folded, except for f32 with
    /// TF32, where cuDNN's transposed-convolution kernels were no faster on the H200,
    /// BENCHMARKS.md §4.2), `transposed` (always folded) or `nearest` (never).
    fn upsample(&self, p: &str, c: usize) -> Result<Upsample> {
        let conv = self.conv(p, c, c, 3, 1, 1)?;
        let mode = std::env::var("QTAYLOR_UPSAMPLE").unwrap_or_else(|_| "auto".into());
        let mode = match mode.as_str() {
            "auto" | "transposed" | "nearest" => mode,
            other => bail!("QTAYLOR_UPSAMPLE={other}: expected auto, transposed or nearest"),
        };
        let folded = match &conv {
            Conv::Candle(cv)
                if self.device.is_cuda()
                    && crate::kernels::own_cudnn_conv()
                    && !cv.weight().track_op()
                    && mode != "nearest" =>
            {
                Some(fold_upsample_conv(cv.weight())?)
            }
            _ => None,
        };
        Ok(Upsample {
            conv,
            folded,
            always: mode == "transposed",
            channels_last: false,
        })
    }

    fn linear(&self, p: &str, cin: usize, cout: usize) -> Result<Linear> {
        Ok(Linear::new(
            self.get(&format!("{p}.weight"), &[cout, cin])?,
            Some(self.get(&format!("{p}.bias"), &[cout])?),
        ))
    }

    fn group_norm(&self, p: &str, groups: usize, c: usize, eps: f64) -> Result<GroupNorm> {
        if !c.is_multiple_of(groups) {
            bail!("{p}: {groups} groups do not divide {c} channels");
        }
        Ok(GroupNorm {
            weight: self.get(&format!("{p}.weight"), &[c])?,
            bias: self.get(&format!("{p}.bias"), &[c])?,
            groups,
            eps,
            channels_last: false,
        })
    }
}

/// A stride-2 3×3 kernel `W` on an input zero-padded by one at the bottom and right only, as
/// a 4×4 kernel for symmetric padding 1: `W'[.., 1+i, 1+j] = W[.., i, j]`, zeros in row and
/// column 0. Output `(p, q)` of the padded convolution is `Σ_ij W[i,j] x[2p+i, 2q+j]`; with
/// `W'` and padding 1 it is `Σ_ij W'[i,j] x[2p+i−1, 2q+j−1]`, the same sum (the extra taps
/// read the left/top padding or are multiplied by zero), and the output size
/// `(H + 2 − 4)/2 + 1 = H/2` matches `(H + 1 − 3)/2 + 1` for even H.
fn fold_bottom_right_padding(w: &Tensor) -> Result<Tensor> {
    Ok(w.pad_with_zeros(2, 1, 0)?.pad_with_zeros(3, 1, 0)?)
}

/// Nearest ×2 upsampling followed by a 3×3 / padding-1 convolution with `W: (Cout, Cin, 3, 3)`
/// as one transposed convolution (stride 2, padding 1) with the kernel `(Cin, Cout, 4, 4)`
/// returned here. In one dimension, output `2i` of the pair is `W₀ x[i−1] + (W₁ + W₂) x[i]`
/// and output `2i+1` is `(W₀ + W₁) x[i] + W₂ x[i+1]` (taps `W₀, W₁, W₂` at offsets −1, 0, +1;
/// the zero padding of the upsampled image is the zero padding of `x`); the transposed
/// convolution's taps 0…3 are therefore `W₂, W₁ + W₂, W₀ + W₁, W₀`, i.e. `K = F W Fᵀ` per
/// channel pair with `F = [[0,0,1], [0,1,1], [1,1,0], [1,0,0]]`. Each output then takes 4
/// products per input channel instead of 9, and the 4× larger upsampled image is never
/// written. The sums are formed in f64 and rounded once to the weight's dtype.
fn fold_upsample_conv(w: &Tensor) -> Result<Tensor> {
    let cpu = Device::Cpu;
    let f = Tensor::new(
        &[
            [0f64, 0.0, 1.0],
            [0.0, 1.0, 1.0],
            [1.0, 1.0, 0.0],
            [1.0, 0.0, 0.0],
        ],
        &cpu,
    )?;
    let w64 = w.to_device(&cpu)?.to_dtype(DType::F64)?;
    let k = f.broadcast_matmul(&w64.broadcast_matmul(&f.t()?)?)?; // (Cout, Cin, 4, 4)
    Ok(k.transpose(0, 1)?
        .contiguous()?
        .to_dtype(w.dtype())?
        .to_device(w.device())?)
}

/// An up-block's upsampler: nearest ×2, then a 3×3 convolution.
struct Upsample {
    conv: Conv,
    /// The pair as one transposed convolution ([`fold_upsample_conv`]), on CUDA; `(Cin, Cout,
    /// 4, 4)`, or `(Cin, 4, 4, Cout)` channels last.
    folded: Option<Tensor>,
    /// Use `folded` with TF32 too.
    always: bool,
    /// Activations `(B, H, W, C)` ([`UNet2D::into_channels_last`]).
    channels_last: bool,
}

impl Upsample {
    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let dev = h.device();
        let tf32 = h.dtype() == DType::F32 && crate::kernels::tf32();
        let cl = self.channels_last;
        if let Some(k) = &self.folded
            && dev.is_cuda()
            && !h.track_op()
            && (self.always || !tf32)
        {
            let y = timed("conv up (transposed 4x4)", dev, || {
                Ok(if cl {
                    crate::kernels::conv_transpose2d_nhwc_fast(h, k, 1, 2)?
                } else {
                    crate::kernels::conv_transpose2d_fast(h, k, 1, 2)?
                })
            })?;
            timed("conv epilogue", dev, || {
                epilogue(cl, &y, self.conv.bias()?, None, 1.0)
            })?;
            return Ok(y);
        }
        let up = timed("pad, cat, upsample", dev, || upsample_nearest_2x(h, cl))?;
        self.conv.forward(&up)
    }

    fn into_channels_last(self) -> Result<Upsample> {
        Ok(Upsample {
            conv: self.conv.into_channels_last()?,
            folded: match self.folded {
                Some(k) => Some(k.permute((0, 2, 3, 1))?.contiguous()?),
                None => None,
            },
            always: self.always,
            channels_last: true,
        })
    }
}

/// Nearest-neighbour 2× upsampling of `(B, C, H, W)`, or of `(B, H, W, C)` with
/// `channels_last`. In an autograd graph (training) it is a broadcast of each pixel over a
/// 2 × 2 block, whose gradient is a sum over the 4 copies (candle's own `upsample_nearest2d`
/// backward is a grouped convolution, run as one convolution per channel); otherwise
/// candle's `upsample_nearest2d`. Both give the same values.
fn upsample_nearest_2x(h: &Tensor, channels_last: bool) -> Result<Tensor> {
    if channels_last {
        let (b, hh, ww, c) = h.dims4()?;
        return Ok(h
            .reshape((b, hh, 1, ww, 1, c))?
            .broadcast_as((b, hh, 2, ww, 2, c))?
            .reshape((b, 2 * hh, 2 * ww, c))?);
    }
    let (b, c, hh, ww) = h.dims4()?;
    if !h.track_op() {
        return Ok(h.upsample_nearest2d(2 * hh, 2 * ww)?);
    }
    Ok(h.reshape((b, c, hh, 1, ww, 1))?
        .broadcast_as((b, c, hh, 2, ww, 2))?
        .reshape((b, c, 2 * hh, 2 * ww))?)
}

/// [`crate::kernels::conv_epilogue`] in place on `y`, or its channels-last form.
fn epilogue(
    channels_last: bool,
    y: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    scale: f64,
) -> Result<()> {
    if channels_last {
        crate::kernels::conv_epilogue_nhwc(y, bias, residual, scale)?;
    } else {
        crate::kernels::conv_epilogue(y, bias, residual, scale)?;
    }
    Ok(())
}

/// `(B, C, H, W)` → `(B, H, W, C)`, contiguous.
fn to_nhwc(t: &Tensor) -> Result<Tensor> {
    timed("layout (NCHW <-> NHWC)", t.device(), || {
        Ok(t.permute((0, 2, 3, 1))?.contiguous()?)
    })
}

/// `(B, H, W, C)` → `(B, C, H, W)`, contiguous.
fn to_nchw(t: &Tensor) -> Result<Tensor> {
    timed("layout (NCHW <-> NHWC)", t.device(), || {
        Ok(t.permute((0, 3, 1, 2))?.contiguous()?)
    })
}

/// A convolution. 3×3 / stride 1 / padding 1 convolutions on the CPU (most of the UNet)
/// run as one batched matrix product over an im2col matrix built from nine shifted views
/// of the padded input: the weight `(out, in, 3, 3)` is already the `(out, in·9)` matrix, so
/// nothing is reordered per call. candle's own CPU conv2d reorders the weight and converts
/// the input to NHWC on every call and scatters its im2col tile; this path was measured
/// faster (BENCHMARKS.md). Other shapes and devices use candle's conv2d.
enum Conv {
    Candle(Conv2d),
    /// 1×1 convolution on CUDA as a batched cuBLAS product `(Cout, Cin) @ (Cin, H·W)`:
    /// cuDNN's per-call cost dominated these small convolutions (BENCHMARKS.md).
    Pointwise {
        w: Tensor,
        bias: Tensor,
    },
    Im2col {
        w2: Tensor,
        bias: Tensor,
        out_c: usize,
    },
    /// 3×3 / stride 1 / padding 1 with trainable weights: [`crate::kernels::conv3x3_train`]
    /// (the device's fast forward, gradients as matrix products) plus the bias.
    Train3x3 {
        w: Tensor,
        bias: Tensor,
    },
    /// Channels last ([`UNet2D::into_channels_last`]), frozen weights: `x: (B, H, W, C)`,
    /// `w: (K, R, S, C)`. 1×1 convolutions are one product `(B·H·W, C)·Wᵀ` (no transpose of
    /// the activations is needed in this layout); the others go through
    /// [`crate::kernels::conv2d_nhwc_fast`] (cuDNN with NHWC descriptors on CUDA).
    Nhwc {
        w: Tensor,
        bias: Tensor,
        padding: usize,
        stride: usize,
    },
}

impl Conv {
    /// The bias `(Cout,)`.
    fn bias(&self) -> Result<&Tensor> {
        Ok(match self {
            Conv::Candle(c) => c.bias().context("convolutions here have a bias")?,
            Conv::Pointwise { bias, .. }
            | Conv::Im2col { bias, .. }
            | Conv::Train3x3 { bias, .. }
            | Conv::Nhwc { bias, .. } => bias,
        })
    }

    /// Whether this convolution takes channels-last input.
    fn is_channels_last(&self) -> bool {
        matches!(self, Conv::Nhwc { .. })
    }

    /// The same convolution for channels-last activations ([`Conv::Nhwc`]), with the weight
    /// reordered to `(K, R, S, C)` once (any channel count: cuDNN plans the UNet's RGB input
    /// and output convolutions in NHWC too). Trainable weights have no such form (an error).
    fn into_channels_last(self) -> Result<Conv> {
        let (w, bias, padding, stride) = match &self {
            Conv::Candle(c) => {
                let cfg = c.config();
                (
                    c.weight().clone(),
                    self.bias()?.clone(),
                    cfg.padding,
                    cfg.stride,
                )
            }
            Conv::Pointwise { w, bias } => {
                let (k, c) = w.dims2()?;
                (w.reshape((k, c, 1, 1))?, bias.clone(), 0, 1)
            }
            Conv::Im2col { w2, bias, out_c } => {
                let c = w2.dim(1)? / 9;
                (w2.reshape((*out_c, c, 3, 3))?, bias.clone(), 1, 1)
            }
            Conv::Train3x3 { .. } => {
                bail!("internal: trainable convolutions have no channels-last form")
            }
            Conv::Nhwc { .. } => return Ok(self),
        };
        if w.track_op() {
            bail!("internal: trainable convolutions have no channels-last form");
        }
        Ok(Conv::Nhwc {
            w: w.permute((0, 2, 3, 1))?.contiguous()?,
            bias,
            padding,
            stride,
        })
    }

    /// Whether `x` takes the fused CUDA path: the convolution without bias into a fresh
    /// tensor ([`Conv::unbiased`]), then bias and the rest in one in-place pass
    /// ([`crate::kernels::conv_epilogue`]). Frozen weights on CUDA only.
    fn fused_on(&self, x: &Tensor) -> bool {
        !x.track_op()
            && match self {
                Conv::Candle(c) => x.device().is_cuda() && !c.weight().track_op(),
                Conv::Pointwise { w, .. } => x.device().is_cuda() && !w.track_op(),
                Conv::Im2col { .. } | Conv::Train3x3 { .. } => false,
                // Frozen by construction, on every device.
                Conv::Nhwc { .. } => true,
            }
    }

    /// The convolution without its bias, as a fresh contiguous tensor (fused path only).
    fn unbiased(&self, x: &Tensor) -> Result<Tensor> {
        timed(self.label()?, x.device(), || match self {
            Conv::Candle(c) => {
                let cfg = c.config();
                Ok(crate::kernels::conv2d_fast(
                    x,
                    c.weight(),
                    cfg.padding,
                    cfg.stride,
                )?)
            }
            Conv::Pointwise { w, .. } => {
                let (b, c, h, wd) = x.dims4()?;
                let y = w.broadcast_left(b)?.matmul(&x.reshape((b, c, h * wd))?)?;
                Ok(y.reshape((b, w.dim(0)?, h, wd))?)
            }
            Conv::Nhwc {
                w, padding, stride, ..
            } => {
                let (k, r, s, c) = w.dims4()?;
                if (r, s, *padding, *stride) == (1, 1, 0, 1) {
                    let (b, h, wd, _) = x.dims4()?;
                    let y = x
                        .reshape((b * h * wd, c))?
                        .matmul(&w.reshape((k, c))?.t()?)?;
                    return Ok(y.reshape((b, h, wd, k))?);
                }
                Ok(crate::kernels::conv2d_nhwc_fast(x, w, *padding, *stride)?)
            }
            Conv::Im2col { .. } | Conv::Train3x3 { .. } => {
                bail!("internal: no unbiased convolution on this path")
            }
        })
    }

    /// `(conv(x) + bias + per_sample + residual + residual_bias) / out_scale` with
    /// `per_sample: (B, Cout)` broadcast over the image, `residual` shaped like the output and
    /// `residual_bias: (Cout,)` the bias the residual still lacks (a shortcut convolution
    /// computed by [`Conv::unbiased`]). On the fused CUDA path ([`Conv::fused_on`]) the
    /// biases, the per-sample term, the residual and the scale are one in-place pass
    /// ([`crate::kernels::conv_epilogue`]); elsewhere candle operations in the order diffusers
    /// uses.
    fn forward_fused(
        &self,
        x: &Tensor,
        per_sample: Option<&Tensor>,
        residual: Option<&Tensor>,
        residual_bias: Option<&Tensor>,
        out_scale: f64,
    ) -> Result<Tensor> {
        let dev = x.device();
        if self.fused_on(x) {
            let y = self.unbiased(x)?;
            let b = self.bias()?;
            let mut bias = match per_sample {
                Some(t) => t.broadcast_add(&b.unsqueeze(0)?)?,
                None => b.clone(),
            };
            if let Some(rb) = residual_bias {
                bias = bias.broadcast_add(rb)?;
            }
            timed("conv epilogue", dev, || {
                epilogue(
                    self.is_channels_last(),
                    &y,
                    &bias,
                    residual,
                    1.0 / out_scale,
                )
            })?;
            return Ok(y);
        }
        if self.is_channels_last() {
            bail!(
                "a channels-last UNet keeps no autograd graph: set QTAYLOR_LAYOUT=nchw for gradients through its input"
            );
        }
        let y = timed(self.label()?, dev, || self.forward_inner(x))?;
        let y = match per_sample {
            Some(t) => timed("elementwise", dev, || {
                Ok(y.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?)
            })?,
            None => y,
        };
        let residual = match (residual, residual_bias) {
            (Some(r), Some(rb)) => Some(r.broadcast_add(&rb.reshape((1, rb.dim(0)?, 1, 1))?)?),
            (r, _) => r.cloned(),
        };
        match residual {
            Some(r) => timed("elementwise", dev, || {
                let out = (r + y)?;
                Ok(if out_scale != 1.0 {
                    (out / out_scale)?
                } else {
                    out
                })
            }),
            None if out_scale != 1.0 => Ok((y / out_scale)?),
            None => Ok(y),
        }
    }

    /// `conv(x) + bias` with `bias: (Cout,)` or `(B, Cout)` in place of the convolution's own
    /// (a ResNet block's stacked time projection, which holds conv1's bias): the fused path
    /// ([`Conv::fused_on`]) only.
    fn forward_biased(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        if !self.fused_on(x) {
            bail!("internal: a replaced bias needs the fused convolution path");
        }
        let y = self.unbiased(x)?;
        timed("conv epilogue", x.device(), || {
            epilogue(self.is_channels_last(), &y, bias, None, 1.0)
        })?;
        Ok(y)
    }

    /// The profile row this convolution counts in.
    fn label(&self) -> Result<&'static str> {
        Ok(match self {
            Conv::Candle(c) if c.weight().dim(2)? == 1 => "conv 1x1",
            Conv::Candle(c) if c.weight().dim(2)? == 4 => "conv 4x4",
            Conv::Pointwise { .. } => "conv 1x1",
            Conv::Nhwc { w, .. } if w.dim(1)? == 1 => "conv 1x1",
            Conv::Nhwc { w, .. } if w.dim(1)? == 4 => "conv 4x4",
            _ => "conv 3x3",
        })
    }

    /// `conv(x) + bias`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, None, None, None, 1.0)
    }

    fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Conv::Nhwc { .. } => bail!("internal: channels-last convolutions are fused"),
            Conv::Candle(c) => Ok(c.forward(x)?),
            Conv::Train3x3 { w, bias } => {
                let y = crate::kernels::conv3x3_train(x, w)?;
                Ok(y.broadcast_add(&bias.reshape((1, bias.dim(0)?, 1, 1))?)?)
            }
            Conv::Pointwise { w, bias } => {
                let (b, c, h, wd) = x.dims4()?;
                let co = w.dim(0)?;
                let y = w
                    .broadcast_left(b)?
                    .matmul(&x.reshape((b, c, h * wd))?)?
                    .broadcast_add(&bias.reshape((1, co, 1))?)?;
                Ok(y.reshape((b, co, h, wd))?)
            }
            // The fused kernel keeps no autograd graph: training takes the tensor path.
            Conv::Im2col { w2, bias, .. }
                if x.dtype() == DType::F32 && !x.track_op() && !w2.track_op() =>
            {
                Ok(crate::kernels::conv3x3_cpu_f32(&x.contiguous()?, w2, bias)?)
            }
            Conv::Im2col { w2, bias, out_c } => {
                let (b, c, h, w) = x.dims4()?;
                let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
                let mut views = Vec::with_capacity(9);
                for ky in 0..3 {
                    for kx in 0..3 {
                        views.push(xp.narrow(2, ky, h)?.narrow(3, kx, w)?);
                    }
                }
                // (B, C, 9, H, W): row c·9 + ky·3 + kx matches the weight's (c, ky, kx) order.
                let col = Tensor::stack(&views, 2)?.reshape((b, c * 9, h * w))?;
                let out = w2.broadcast_left(b)?.matmul(&col)?;
                Ok(out
                    .reshape((b, *out_c, h, w))?
                    .broadcast_add(&bias.reshape((1, *out_c, 1, 1))?)?)
            }
        }
    }
}

/// The time embedding: one row per sample (training), or one row per distinct timestep
/// and the row each sample uses (inference).
struct Temb {
    rows: Tensor,
    index: Option<Tensor>,
    /// Inference on the fused paths: every ResNet block's time projection of each row of
    /// `rows` at once, `(rows, Σ Cout)` ([`UNet2D::stack_time_projections`]).
    proj: Option<Tensor>,
}

impl Temb {
    /// `lin(act(temb))` for every sample, `(B, out)`.
    fn apply(&self, lin: &Linear, act: Act) -> Result<Tensor> {
        let a = apply(act, &self.rows)?;
        match &self.index {
            None => Ok(lin.forward(&a)?),
            Some(idx) => Ok(by_row(lin, &a)?.index_select(idx, 0)?),
        }
    }
}

/// `lin(x_i)` for each row `x_i` of `x` separately (a product with one row), stacked.
fn by_row(lin: &Linear, x: &Tensor) -> Result<Tensor> {
    let rows = (0..x.dim(0)?)
        .map(|i| lin.forward(&x.narrow(0, i, 1)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 0)?)
}

/// GroupNorm with a per-channel affine, run by the fused kernel of [`crate::kernels`].
struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    /// Input `(B, H, W, C)` ([`crate::kernels::group_norm_nhwc`]).
    channels_last: bool,
}

/// `norm(x)`, and its SiLU in the same pass with `silu`.
fn group_norm(n: &GroupNorm, x: &Tensor, silu: bool) -> Result<Tensor> {
    timed("group_norm", x.device(), || {
        let f = if n.channels_last {
            crate::kernels::group_norm_nhwc
        } else {
            crate::kernels::group_norm
        };
        Ok(f(x, &n.weight, &n.bias, n.groups, n.eps, silu)?)
    })
}

fn norm(n: &GroupNorm, x: &Tensor) -> Result<Tensor> {
    group_norm(n, x, false)
}

/// `act(norm(x))`, fused into the group-norm pass for SiLU.
fn norm_act(n: &GroupNorm, a: Act, x: &Tensor) -> Result<Tensor> {
    match a {
        Act::Silu => group_norm(n, x, true),
        _ => act_t(a, &norm(n, x)?),
    }
}

fn act_t(a: Act, x: &Tensor) -> Result<Tensor> {
    timed("activation", x.device(), || Ok(apply(a, x)?))
}

struct Resnet {
    norm1: GroupNorm,
    conv1: Conv,
    time_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv,
    shortcut: Option<Conv>,
    scale_shift: bool,
    out_scale: f64,
    act: Act,
    /// Columns `(offset, len)` of this block's time projection in the stacked one
    /// ([`UNet2D::stack_time_projections`]).
    time_span: Option<(usize, usize)>,
}

impl Resnet {
    fn new(
        w: &Weights,
        p: &str,
        cin: usize,
        cout: usize,
        temb: usize,
        c: &UNet2DConfig,
        out_scale: f64,
    ) -> Result<Self> {
        let g = c.norm_num_groups.expect("validated");
        let scale_shift = c.resnet_time_scale_shift == "scale_shift";
        Ok(Resnet {
            norm1: w.group_norm(&format!("{p}.norm1"), g, cin, c.norm_eps)?,
            conv1: w.conv(&format!("{p}.conv1"), cin, cout, 3, 1, 1)?,
            time_proj: w.linear(
                &format!("{p}.time_emb_proj"),
                temb,
                if scale_shift { 2 * cout } else { cout },
            )?,
            norm2: w.group_norm(&format!("{p}.norm2"), g, cout, c.norm_eps)?,
            conv2: w.conv(&format!("{p}.conv2"), cout, cout, 3, 1, 1)?,
            shortcut: if cin != cout {
                Some(w.conv(&format!("{p}.conv_shortcut"), cin, cout, 1, 1, 0)?)
            } else {
                None
            },
            scale_shift,
            out_scale,
            act: act(&c.act_fn)?,
            time_span: None,
        })
    }

    fn forward(&self, x: &Tensor, temb: &Temb) -> Result<Tensor> {
        let dev = x.device();
        // This block's columns of the stacked projection (inference on the fused paths): one
        // row shared by the batch, or each sample's row. Without a scale-shift they already
        // hold conv1's bias.
        let stacked = match (&temb.proj, self.time_span) {
            (Some(p), Some((off, len))) => Some(timed("time projection", dev, || {
                let t = p.narrow(1, off, len)?;
                Ok(match &temb.index {
                    Some(idx) if p.dim(0)? > 1 => t.contiguous()?.index_select(idx, 0)?,
                    _ => t,
                })
            })?),
            _ => None,
        };
        let tp = match &stacked {
            Some(t) => t.clone(),
            None => timed("time projection", dev, || {
                temb.apply(&self.time_proj, self.act)
            })?,
        }; // (B, Cout), or (B, 2·Cout) for scale-shift; (1, …) when shared
        // Each intermediate is dropped as soon as the next one exists (as PyTorch frees them),
        // which keeps the peak device memory of a pass down.
        let xn = norm_act(&self.norm1, self.act, x)?;
        let h = if self.scale_shift {
            let h = self.conv1.forward(&xn)?;
            drop(xn);
            let c = tp.dim(1)? / 2;
            let cl = self.norm2.channels_last;
            let image = |t: Tensor| {
                if cl {
                    t.unsqueeze(1)?.unsqueeze(1)
                } else {
                    t.unsqueeze(2)?.unsqueeze(3)
                }
            };
            let (scale, shift) = (image(tp.narrow(1, 0, c)?)?, image(tp.narrow(1, c, c)?)?);
            let n = norm(&self.norm2, &h)?;
            drop(h);
            let h = timed("elementwise", dev, || {
                Ok(n.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)?)
            })?;
            drop(n);
            act_t(self.act, &h)?
        } else {
            // h = conv1(x) + temb, then norm2 and the activation (diffusers' order).
            let h = match stacked {
                Some(t) if t.dim(0)? == 1 => self.conv1.forward_biased(&xn, &t.squeeze(0)?)?,
                Some(t) => self.conv1.forward_biased(&xn, &t)?,
                None => self.conv1.forward_fused(&xn, Some(&tp), None, None, 1.0)?,
            };
            drop(xn);
            norm_act(&self.norm2, self.act, &h)?
        };
        // On the fused path the shortcut's bias joins conv2's epilogue instead of taking a
        // pass of its own over the shortcut's output.
        let (x, x_bias) = match &self.shortcut {
            Some(s) if s.fused_on(x) && self.conv2.fused_on(&h) => {
                (s.unbiased(x)?, Some(s.bias()?))
            }
            Some(s) => (s.forward(x)?, None),
            None => (x.clone(), None),
        };
        // (shortcut + conv2(h)) / output_scale_factor
        self.conv2
            .forward_fused(&h, None, Some(&x), x_bias, self.out_scale)
    }

    fn into_channels_last(mut self) -> Result<Resnet> {
        self.norm1.channels_last = true;
        self.norm2.channels_last = true;
        self.conv1 = self.conv1.into_channels_last()?;
        self.conv2 = self.conv2.into_channels_last()?;
        self.shortcut = self.shortcut.map(|s| s.into_channels_last()).transpose()?;
        Ok(self)
    }
}

struct Attention {
    norm: Option<GroupNorm>,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    rescale: f64,
    /// The projections stacked for the channels-first inference path (frozen weights only).
    qkv: Option<(Tensor, Tensor)>,
    /// Input `(B, H, W, C)` ([`Attention::forward_channels_last`]).
    channels_last: bool,
}

/// The q, k, v weights `(C, C)` and biases `(C,)` stacked into one `(3C, C)` matrix and
/// `(3C,)` bias whose rows run head by head as `[q_h; k_h; v_h]` (`d = C/heads` rows each),
/// so that one product gives every head's q, k and v as consecutive row blocks.
fn stack_qkv(q: &Linear, k: &Linear, v: &Linear, heads: usize) -> Result<(Tensor, Tensor)> {
    let d = q.weight().dim(0)? / heads;
    let (mut w, mut b) = (Vec::new(), Vec::new());
    for h in 0..heads {
        for l in [q, k, v] {
            w.push(l.weight().narrow(0, h * d, d)?);
            b.push(
                l.bias()
                    .expect("attention projections have a bias")
                    .narrow(0, h * d, d)?,
            );
        }
    }
    Ok((Tensor::cat(&w, 0)?, Tensor::cat(&b, 0)?))
}

impl Attention {
    fn new(
        w: &Weights,
        p: &str,
        c: usize,
        head_dim: Option<usize>,
        groups: Option<usize>,
        eps: f64,
        rescale: f64,
    ) -> Result<Self> {
        let hd = head_dim.unwrap_or(c);
        // Current key names, or the legacy AttentionBlock ones (diffusers renames on load).
        let name = |new: &str, old: &str| {
            if w.has(&format!("{p}.{new}.weight")) || !w.has(&format!("{p}.{old}.weight")) {
                format!("{p}.{new}")
            } else {
                format!("{p}.{old}")
            }
        };
        let (q, k, v) = (
            w.linear(&name("to_q", "query"), c, c)?,
            w.linear(&name("to_k", "key"), c, c)?,
            w.linear(&name("to_v", "value"), c, c)?,
        );
        let heads = c / hd;
        let qkv = if q.weight().track_op() {
            None // trainable: the stacked copy would go stale
        } else {
            Some(stack_qkv(&q, &k, &v, heads)?)
        };
        Ok(Attention {
            norm: match groups {
                Some(g) => Some(w.group_norm(&format!("{p}.group_norm"), g, c, eps)?),
                None => None,
            },
            q,
            k,
            v,
            out: w.linear(&name("to_out.0", "proj_attn"), c, c)?,
            heads,
            rescale,
            qkv,
            channels_last: false,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        timed("attention", x.device(), || match &self.qkv {
            Some(qkv) if self.channels_last => self.forward_channels_last(x, qkv),
            _ if self.channels_last => {
                bail!("internal: channels-last attention needs frozen weights")
            }
            Some(qkv) if x.device().is_cuda() && !x.track_op() => {
                self.forward_channels_first(x, qkv)
            }
            _ => self.forward_inner(x),
        })
    }

    fn into_channels_last(mut self) -> Result<Attention> {
        if self.qkv.is_none() {
            bail!("internal: trainable attention has no channels-last form");
        }
        if let Some(n) = &mut self.norm {
            n.channels_last = true;
        }
        self.channels_last = true;
        Ok(self)
    }

    /// From the stacked projections `[q; k; v]` `(B, 3C, H·W)` without their bias
    /// ([`stack_qkv`]'s row order): the values `v` `(B·heads, d, H·W)` and the attention
    /// probabilities `P = softmax(qᵀk/√d)` `(B·heads, HW_q, HW_k)` (bias added in place, softmax
    /// in place in f32 arithmetic).
    fn values_and_probabilities(&self, qkv: Tensor, b_qkv: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, c3, hw) = qkv.dims3()?;
        let (heads, d) = (self.heads, c3 / 3 / self.heads);
        crate::kernels::conv_epilogue(&qkv, b_qkv, None, 1.0)?;
        let qkv = qkv.reshape((b * heads, 3 * d, hw))?;
        let (q, k) = (qkv.narrow(1, 0, d)?, qkv.narrow(1, d, d)?);
        let scores = q.transpose(1, 2)?.matmul(&k)?; // (B·heads, HW_q, HW_k)
        crate::kernels::softmax_last_dim_inplace(&scores, 1.0 / (d as f64).sqrt())?;
        Ok((qkv.narrow(1, 2 * d, d)?, scores))
    }

    /// Attention on channels-last input `x: (B, H, W, C)`, which is already token-major
    /// `(B, H·W, C)`: `[q; k; v] = W_qkv·xᵀ + b` as `(B, 3C, H·W)` (a cuBLAS operand flag
    /// transposes x), then scores and softmax as in [`Attention::forward_channels_first`],
    /// `o = P·vᵀ` per head `(H·W_q, d)` (with one head already `(B, H·W, C)`; several heads
    /// are interleaved back by one copy), and `y = (o·W_oᵀ + b_o + x)/rescale`, the bias,
    /// residual and scale in one fused pass.
    fn forward_channels_last(
        &self,
        x: &Tensor,
        (w_qkv, b_qkv): &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let (heads, d, hw) = (self.heads, c / self.heads, h * w);
        let hn = match &self.norm {
            Some(n) => norm(n, x)?,
            None => x.clone(),
        };
        let tokens = hn.reshape((b, hw, c))?;
        let qkv = w_qkv.broadcast_left(b)?.matmul(&tokens.transpose(1, 2)?)?; // (B, 3C, HW)
        drop((hn, tokens));
        let (v, probs) = self.values_and_probabilities(qkv, b_qkv)?;
        let o = probs.matmul(&v.transpose(1, 2)?)?; // (B·heads, HW_q, d)
        drop((probs, v));
        let o = if heads == 1 {
            o
        } else {
            o.reshape((b, heads, hw, d))?
                .transpose(1, 2)?
                .contiguous()?
        };
        let y = o
            .reshape((b * hw, c))?
            .matmul(&self.out.weight().t()?)?
            .reshape((b, h, w, c))?;
        let bias = self.out.bias().expect("attention projections have a bias");
        crate::kernels::conv_epilogue_nhwc(&y, bias, Some(x), 1.0 / self.rescale)?;
        Ok(y)
    }

    /// Attention without moving the activations out of `(B, C, H·W)` (inference on CUDA):
    /// `[q; k; v] = W_qkv·x + b` as one batched product `(3C, C)·(C, H·W)` (head by head,
    /// [`stack_qkv`]), `S = qᵀk` per head `(H·W, H·W)`, `P = softmax(S/√d)` in place (f32
    /// arithmetic), `o = v·Pᵀ` `(d, H·W)`, `y = (W_o·o + b_o + x)/rescale` with the bias,
    /// residual and scale in one fused pass. Every transpose is a cuBLAS operand flag, so no
    /// activation is copied; the token-major path ([`Attention::forward_inner`], diffusers'
    /// order) copies the activations to `(B, H·W, C)` and back and splits heads with copies.
    fn forward_channels_first(
        &self,
        x: &Tensor,
        (w_qkv, b_qkv): &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let hw = h * w;
        let hn = match &self.norm {
            Some(n) => norm(n, x)?,
            None => x.clone(),
        };
        let qkv = w_qkv.broadcast_left(b)?.matmul(&hn.reshape((b, c, hw))?)?; // (B, 3C, HW)
        drop(hn);
        let (v, probs) = self.values_and_probabilities(qkv, b_qkv)?;
        let o = v.matmul(&probs.transpose(1, 2)?)?; // (B·heads, d, HW_q)
        drop((probs, v));
        let y = self
            .out
            .weight()
            .broadcast_left(b)?
            .matmul(&o.reshape((b, c, hw))?)?
            .reshape((b, c, h, w))?;
        let bias = self.out.bias().expect("attention projections have a bias");
        crate::kernels::conv_epilogue(&y, bias, Some(x), 1.0 / self.rescale)?;
        Ok(y)
    }

    fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let d = c / self.heads;
        let hn = match &self.norm {
            Some(n) => norm(n, x)?,
            None => x.clone(),
        };
        let tokens = hn.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()?; // (B, HW, C)
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, h * w, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(&tokens)?)?;
        let k = split(self.k.forward(&tokens)?)?;
        let v = split(self.v.forward(&tokens)?)?;
        let dtype = q.dtype();
        // Scores from the model-dtype product (f32 accumulation in cuBLAS/gemm), softmax in
        // f32 whatever the model dtype.
        let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? / (d as f64).sqrt())?;
        // softmax_last_dim is one fused pass without a backward; training composes it.
        let probs = if scores.track_op() {
            candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        }
        .to_dtype(dtype)?;
        let o = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, h * w, c))?;
        let o = self
            .out
            .forward(&o)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        let out = (o + x)?;
        Ok(if self.rescale != 1.0 {
            (out / self.rescale)?
        } else {
            out
        })
    }
}

struct DownBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<Attention>,
    down: Option<(Conv, bool)>, // (conv, asymmetric padding)
}

struct UpBlock {
    resnets: Vec<Resnet>,
    attentions: Vec<Attention>,
    up: Option<Upsample>,
}

struct Mid {
    r0: Resnet,
    attn: Option<Attention>,
    r1: Resnet,
}

/// diffusers' `UNet2DModel`.
pub struct UNet2D {
    pub config: UNet2DConfig,
    conv_in: Conv,
    lin1: Linear,
    lin2: Linear,
    /// diffusers' `class_embedding` (`nn.Embedding(num_class_embeds, time_embed_dim)`), whose
    /// row for a sample's label is added to its time embedding.
    class_emb: Option<Tensor>,
    down: Vec<DownBlock>,
    mid: Option<Mid>,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
    dtype: DType,
    /// The embedding's frequencies `(1, half)` on a GPU, uploaded once (see
    /// [`UNet2D::timestep_embedding_on_device`]).
    freq: std::sync::OnceLock<Tensor>,
    /// Inference passes captured as CUDA graphs, per input shape (`QTAYLOR_CUDA_GRAPH`).
    graphs: crate::cuda_graph::Graphs,
    /// Activations `(B, H, W, C)` between the input and output convolutions
    /// ([`UNet2D::into_channels_last`]).
    channels_last: bool,
    /// Every ResNet block's time projection as one linear layer, and the activation before
    /// it ([`UNet2D::stack_time_projections`]).
    time_stack: Option<(Linear, Act)>,
}

impl UNet2D {
    /// Builds the network from its config and weights.
    pub fn new(config: UNet2DConfig, w: &Weights) -> Result<Self> {
        let c = &config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let l = c.layers_per_block;
        let g = c.norm_num_groups.expect("validated");
        let temb = c.time_embedding_dim.unwrap_or(4 * ch[0]);
        let head = |cc: usize| Some(c.attention_head_dim.unwrap_or(cc));
        let mut down = Vec::with_capacity(n);
        for i in 0..n {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let p = format!("down_blocks.{i}");
            let attn = c.down_block_types[i] == "AttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..l {
                resnets.push(Resnet::new(
                    w,
                    &format!("{p}.resnets.{j}"),
                    if j == 0 { cin } else { ch[i] },
                    ch[i],
                    temb,
                    c,
                    1.0,
                )?);
                if attn {
                    attentions.push(Attention::new(
                        w,
                        &format!("{p}.attentions.{j}"),
                        ch[i],
                        head(ch[i]),
                        Some(g),
                        c.norm_eps,
                        1.0,
                    )?);
                }
            }
            let down_conv = if i + 1 < n {
                Some(w.downsample_conv(
                    &format!("{p}.downsamplers.0.conv"),
                    ch[i],
                    c.downsample_padding,
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                down: down_conv,
            });
        }
        let cm = ch[n - 1];
        let s = c.mid_block_scale_factor;
        let mid = match &c.mid_block_type {
            None => None,
            Some(_) => {
                let attn_groups =
                    c.attn_norm_num_groups
                        .or(if c.resnet_time_scale_shift == "default" {
                            Some(g)
                        } else {
                            None
                        });
                Some(Mid {
                    r0: Resnet::new(w, "mid_block.resnets.0", cm, cm, temb, c, s)?,
                    attn: if c.add_attention {
                        Some(Attention::new(
                            w,
                            "mid_block.attentions.0",
                            cm,
                            head(cm),
                            attn_groups,
                            c.norm_eps,
                            s,
                        )?)
                    } else {
                        None
                    },
                    r1: Resnet::new(w, "mid_block.resnets.1", cm, cm, temb, c, s)?,
                })
            }
        };
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        for i in 0..n {
            let out = rev[i];
            let prev = if i == 0 { rev[0] } else { rev[i - 1] };
            let skip_in = rev[(i + 1).min(n - 1)];
            let p = format!("up_blocks.{i}");
            let attn = c.up_block_types[i] == "AttnUpBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..=l {
                let cin = (if j == 0 { prev } else { out }) + (if j == l { skip_in } else { out });
                resnets.push(Resnet::new(
                    w,
                    &format!("{p}.resnets.{j}"),
                    cin,
                    out,
                    temb,
                    c,
                    1.0,
                )?);
                if attn {
                    attentions.push(Attention::new(
                        w,
                        &format!("{p}.attentions.{j}"),
                        out,
                        head(out),
                        Some(g),
                        c.norm_eps,
                        1.0,
                    )?);
                }
            }
            let up_conv = if i + 1 < n {
                Some(w.upsample(&format!("{p}.upsamplers.0.conv"), out)?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                up: up_conv,
            });
        }
        let unet = UNet2D {
            conv_in: w.conv("conv_in", c.in_channels, ch[0], 3, 1, 1)?,
            lin1: w.linear("time_embedding.linear_1", ch[0], temb)?,
            lin2: w.linear("time_embedding.linear_2", temb, temb)?,
            class_emb: match c.num_class_embeds {
                Some(k) => Some(w.get("class_embedding.weight", &[k, temb])?),
                None => None,
            },
            down,
            mid,
            up,
            norm_out: w.group_norm("conv_norm_out", g, ch[0], c.norm_eps)?,
            conv_out: w.conv("conv_out", ch[0], c.out_channels, 3, 1, 1)?,
            dtype: w.dtype,
            freq: std::sync::OnceLock::new(),
            graphs: Default::default(),
            channels_last: false,
            time_stack: None,
            config,
        };
        let mut unet = unet;
        let frozen = !unet.lin1.weight().track_op();
        if frozen && crate::kernels::channels_last(&w.device, w.dtype)? {
            return unet.into_channels_last();
        }
        // The stacked projections serve the fused CUDA path (into_channels_last stacks them
        // for the channels-last one); the CPU's NCHW path adds conv1's bias inside its own
        // convolution, so it would only carry a second copy of the weights.
        if frozen && w.device.is_cuda() {
            unet.stack_time_projections()?;
        }
        Ok(unet)
    }

    /// Every ResNet block, in the order of the pass.
    fn resnets_mut(&mut self) -> Vec<&mut Resnet> {
        let mut all: Vec<&mut Resnet> = Vec::new();
        for b in &mut self.down {
            all.extend(b.resnets.iter_mut());
        }
        if let Some(m) = &mut self.mid {
            all.push(&mut m.r0);
            all.push(&mut m.r1);
        }
        for b in &mut self.up {
            all.extend(b.resnets.iter_mut());
        }
        all
    }

    /// Stacks every ResNet block's time projection `W_i·act(temb) + b_i` into one linear
    /// layer, so that an inference pass computes them in one product per distinct time
    /// embedding instead of about five small kernels per block (a few hundred µs per pass at
    /// batch 1, BENCHMARKS.md §4.5). Blocks without a scale-shift add the projection to
    /// conv1's output, so conv1's bias joins theirs (summed in f64, rounded once): their
    /// columns are the whole per-sample bias of conv1's epilogue. Frozen weights only; used
    /// on the fused paths (CUDA, or channels last), where conv1's bias is an epilogue input;
    /// [`UNet2D::new`] and [`UNet2D::into_channels_last`] stack them only there.
    fn stack_time_projections(&mut self) -> Result<()> {
        let act = act(&self.config.act_fn)?;
        let (mut ws, mut bs, mut off) = (Vec::new(), Vec::new(), 0);
        for r in self.resnets_mut() {
            let w = r.time_proj.weight().clone();
            let b = r
                .time_proj
                .bias()
                .context("time projections have a bias")?
                .clone();
            let b = if r.scale_shift {
                b
            } else {
                let sum = (b.to_dtype(DType::F64)? + r.conv1.bias()?.to_dtype(DType::F64)?)?;
                sum.to_dtype(b.dtype())?
            };
            let len = w.dim(0)?;
            r.time_span = Some((off, len));
            off += len;
            ws.push(w);
            bs.push(b);
        }
        if !ws.is_empty() {
            let lin = Linear::new(Tensor::cat(&ws, 0)?, Some(Tensor::cat(&bs, 0)?));
            self.time_stack = Some((lin, act));
        }
        Ok(())
    }

    /// The same network with its activations channels last, `(B, H, W, C)`, from the input
    /// convolution to the output one: every convolution weight reordered to `(K, R, S, C)`
    /// once, NHWC group norm, epilogues and attention. The input and output stay `(B, C, H,
    /// W)`; they are transposed once each, before the input convolution and after the output
    /// one (copies of the few image channels). cuDNN's tensor-core convolutions then need no
    /// layout transforms of their own (BENCHMARKS.md §4.5). Stacks the time projections
    /// ([`UNet2D::stack_time_projections`]) if they are not yet.
    /// [`UNet2D::new`] does this by `QTAYLOR_LAYOUT` ([`crate::kernels::channels_last`]).
    /// Frozen weights only (inference).
    pub fn into_channels_last(mut self) -> Result<Self> {
        if self.channels_last {
            return Ok(self);
        }
        if self.lin1.weight().track_op() {
            bail!("a UNet with trainable weights cannot be made channels-last");
        }
        if self.time_stack.is_none() {
            self.stack_time_projections()?;
        }
        self.conv_in = self.conv_in.into_channels_last()?;
        self.conv_out = self.conv_out.into_channels_last()?;
        self.norm_out.channels_last = true;
        let attn = |v: Vec<Attention>| -> Result<Vec<Attention>> {
            v.into_iter().map(Attention::into_channels_last).collect()
        };
        let res = |v: Vec<Resnet>| -> Result<Vec<Resnet>> {
            v.into_iter().map(Resnet::into_channels_last).collect()
        };
        self.down = std::mem::take(&mut self.down)
            .into_iter()
            .map(|b| -> Result<DownBlock> {
                Ok(DownBlock {
                    resnets: res(b.resnets)?,
                    attentions: attn(b.attentions)?,
                    down: match b.down {
                        Some((conv, asym)) => Some((conv.into_channels_last()?, asym)),
                        None => None,
                    },
                })
            })
            .collect::<Result<_>>()?;
        self.mid = match self.mid.take() {
            Some(m) => Some(Mid {
                r0: m.r0.into_channels_last()?,
                attn: m.attn.map(Attention::into_channels_last).transpose()?,
                r1: m.r1.into_channels_last()?,
            }),
            None => None,
        };
        self.up = std::mem::take(&mut self.up)
            .into_iter()
            .map(|b| -> Result<UpBlock> {
                Ok(UpBlock {
                    resnets: res(b.resnets)?,
                    attentions: attn(b.attentions)?,
                    up: b.up.map(Upsample::into_channels_last).transpose()?,
                })
            })
            .collect::<Result<_>>()?;
        self.channels_last = true;
        Ok(self)
    }

    /// Whether the activations run channels last ([`UNet2D::into_channels_last`]).
    pub fn is_channels_last(&self) -> bool {
        self.channels_last
    }

    fn frequencies(&self) -> Vec<f32> {
        let half = self.config.block_out_channels[0] / 2;
        let shift = self.config.freq_shift as f32;
        let ln = -(10000f64.ln() as f32);
        (0..half)
            .map(|i| ((ln * i as f32) / (half as f32 - shift)) as f64)
            .map(|e| e.exp() as f32)
            .collect()
    }

    /// [`UNet2D::timestep_embedding`] of one timestep computed on a GPU from the cached
    /// frequencies, with `t` passed as a kernel argument: no host-to-device copy, which from
    /// pageable memory would synchronize the stream at the start of every network pass.
    /// `t·freq` is the same f32 product; sin and cos are f32 (the host path rounds f64 ones).
    fn timestep_embedding_on_device(&self, t: f64, device: &Device) -> Result<Tensor> {
        let freq = match self.freq.get() {
            Some(f) => f,
            None => {
                let f = self.frequencies();
                let n = f.len();
                let f = Tensor::from_vec(f, (1, n), device)?;
                self.freq.get_or_init(|| f)
            }
        };
        let args = freq.affine(t as f32 as f64, 0.0)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        Ok(if self.config.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], 1)?
        } else {
            Tensor::cat(&[sin, cos], 1)?
        })
    }

    /// The positional timestep embedding `(B, C0)`, computed with PyTorch's float32 steps:
    /// `freq_i = exp(−ln(10000)·i/(half − shift))`, `arg = t·freq` (f32), `[sin, cos]`
    /// (swapped when `flip_sin_to_cos`).
    pub fn timestep_embedding(&self, timesteps: &[f64], device: &Device) -> Result<Tensor> {
        let dim = self.config.block_out_channels[0];
        let freq = self.frequencies();
        let mut data = Vec::with_capacity(timesteps.len() * dim);
        for &t in timesteps {
            let args: Vec<f32> = freq.iter().map(|&f| t as f32 * f).collect();
            let sin = args.iter().map(|&a| (a as f64).sin() as f32);
            let cos = args.iter().map(|&a| (a as f64).cos() as f32);
            if self.config.flip_sin_to_cos {
                data.extend(cos.chain(sin));
            } else {
                data.extend(sin.chain(cos));
            }
        }
        Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?)
    }

    /// The number of classes of a class-conditional network (`num_class_embeds`).
    pub fn num_classes(&self) -> Option<usize> {
        self.config.num_class_embeds
    }

    /// The network output for images `x` (B, C, H, W) at float timesteps (one per row, or
    /// one shared); computed in the weights' dtype, returned in x's dtype. An unconditional
    /// network only (see [`UNet2D::forward_labels`]).
    pub fn forward(&self, x: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        self.forward_labels(x, timesteps, None)
    }

    /// [`UNet2D::forward`] with class labels (one per row, or one shared) for a
    /// class-conditional network: as diffusers' `UNet2DModel.forward(..., class_labels)`, the
    /// label's row of `class_embedding` is added to the time embedding after its MLP.
    pub fn forward_labels(
        &self,
        x: &Tensor,
        timesteps: &[f64],
        labels: Option<&[u32]>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x
            .dims4()
            .context("the UNet expects images of shape (B, C, H, W)")?;
        let cfg = &self.config;
        if c != cfg.in_channels {
            bail!("the UNet takes {} input channels, got {c}", cfg.in_channels);
        }
        let f = cfg.downsample_factor();
        if h % f != 0 || w % f != 0 {
            bail!(
                "image size {h}x{w} cannot go through {} downsamplings: height and width must be multiples of {f}",
                cfg.block_out_channels.len() - 1
            );
        }
        let ts: Vec<f64> = if timesteps.len() == 1 {
            vec![timesteps[0]; b]
        } else {
            timesteps.to_vec()
        };
        if ts.len() != b {
            bail!("{} timesteps for a batch of {b}", ts.len());
        }
        let labels: Option<Vec<u32>> = match (labels, &self.class_emb) {
            (None, None) => None,
            (Some(_), None) => bail!(
                "class labels given, but this UNet is not class-conditional (its config has no num_class_embeds)"
            ),
            (None, Some(_)) => bail!(
                "this UNet is class-conditional ({} classes): give class labels (--class, --classes)",
                cfg.num_class_embeds.unwrap_or(0)
            ),
            (Some(l), Some(_)) => {
                let k = cfg.num_class_embeds.unwrap_or(0);
                if let Some(bad) = l.iter().find(|&&c| c as usize >= k) {
                    bail!(
                        "class label {bad} is outside the model's {k} classes (0 to {})",
                        k - 1
                    );
                }
                Some(match l.len() {
                    1 => vec![l[0]; b],
                    n if n == b => l.to_vec(),
                    n => bail!("{n} class labels for a batch of {b}"),
                })
            }
        };
        if self.channels_last && x.track_op() {
            bail!(
                "this UNet runs channels last and keeps no autograd graph: set QTAYLOR_LAYOUT=nchw for gradients through its input"
            );
        }
        let in_dtype = x.dtype();
        let mut x = x.to_dtype(self.dtype)?;
        if cfg.center_input_sample {
            x = x.affine(2.0, -1.0)?;
        }
        let temb = if x.track_op() || self.lin1.weight().track_op() {
            // Training: one batched product per layer (each row has its own timestep).
            let emb = self
                .timestep_embedding(&ts, x.device())?
                .to_dtype(self.dtype)?;
            let mut rows = self
                .lin2
                .forward(&candle_nn::ops::silu(&self.lin1.forward(&emb)?)?)?;
            if let (Some(table), Some(l)) = (&self.class_emb, &labels) {
                let idx = Tensor::from_vec(l.clone(), b, x.device())?;
                rows = (rows + table.index_select(&idx, 0)?)?;
            }
            Temb {
                rows,
                index: None,
                proj: None,
            }
        } else {
            // Inference: the embedding MLP and every projection of it run once per distinct
            // timestep, one row at a time, so a sample's result does not depend on the batch
            // (a matrix product's rounding can depend on its row count).
            // (With class labels: once per distinct (timestep, label).)
            let mut uniq: Vec<f64> = Vec::new();
            let mut uniq_labels: Vec<u32> = Vec::new();
            let idx: Vec<u32> = ts
                .iter()
                .enumerate()
                .map(|(r, t)| {
                    let c = labels.as_ref().map_or(0, |l| l[r]);
                    let i = (0..uniq.len())
                        .position(|u| uniq[u].to_bits() == t.to_bits() && uniq_labels[u] == c);
                    i.unwrap_or_else(|| {
                        uniq.push(*t);
                        uniq_labels.push(c);
                        uniq.len() - 1
                    }) as u32
                })
                .collect();
            // One timestep on a GPU (every fixed-grid sampler's call): nothing is copied from
            // the host, so queuing this pass does not wait for the previous one.
            let on_device = x.device().is_cuda() && uniq.len() == 1 && labels.is_none();
            let emb = if on_device {
                self.timestep_embedding_on_device(uniq[0], x.device())?
            } else {
                self.timestep_embedding(&uniq, x.device())?
            }
            .to_dtype(self.dtype)?;
            let mut rows = by_row(
                &self.lin2,
                &candle_nn::ops::silu(&by_row(&self.lin1, &emb)?)?,
            )?;
            if let Some(table) = &self.class_emb {
                let n = uniq_labels.len();
                let pick = Tensor::from_vec(uniq_labels, n, x.device())?;
                rows = (rows + table.index_select(&pick, 0)?)?;
            }
            let index = if on_device {
                Tensor::zeros(b, DType::U32, x.device())?
            } else {
                Tensor::from_vec(idx, b, x.device())?
            };
            Temb {
                rows,
                index: Some(index),
                proj: None,
            }
        };
        // Inference on a GPU with QTAYLOR_CUDA_GRAPH=on: the pass after the time embedding
        // is replayed from a CUDA graph (src/cuda_graph.rs); training passes never are.
        match &temb.index {
            Some(index) if !x.track_op() => self.graphs.run(&[&x, &temb.rows, index], |i| {
                let temb = Temb {
                    rows: i[1].clone(),
                    index: Some(i[2].clone()),
                    proj: None,
                };
                self.body(&i[0], &temb, in_dtype)
            }),
            _ => self.body(&x, &temb, in_dtype),
        }
    }

    /// The network from its input convolution to its output, for images `x` in the weights'
    /// dtype and their time embedding; the output in `out_dtype`.
    fn body(&self, x: &Tensor, temb: &Temb, out_dtype: DType) -> Result<Tensor> {
        let cl = self.channels_last;
        // Inference on the fused paths (the only models that stack their projections): all
        // time projections in one product per row.
        let proj = match &self.time_stack {
            Some((lin, a)) if temb.index.is_some() => {
                Some(timed("time projection", x.device(), || {
                    by_row(lin, &apply(*a, &temb.rows)?)
                })?)
            }
            _ => None,
        };
        let temb = &Temb {
            rows: temb.rows.clone(),
            index: temb.index.clone(),
            proj,
        };
        // Channels last: the input goes to (B, H, W, C) before conv_in.
        let mut h = if cl {
            self.conv_in.forward(&to_nhwc(x)?)?
        } else {
            self.conv_in.forward(x)?
        };
        // Channel, height and width dimensions of the activations.
        let (dc, dh, dw) = if cl { (3, 1, 2) } else { (1, 2, 3) };
        let mut skips = vec![h.clone()];
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                h = r.forward(&h, temb)?;
                if let Some(a) = blk.attentions.get(j) {
                    h = a.forward(&h)?;
                }
                skips.push(h.clone());
            }
            if let Some((conv, asym)) = &blk.down {
                if *asym {
                    h = timed("pad, cat, upsample", h.device(), || {
                        Ok(h.pad_with_zeros(dw, 0, 1)?.pad_with_zeros(dh, 0, 1)?)
                    })?;
                }
                h = conv.forward(&h)?;
                skips.push(h.clone());
            }
        }
        if let Some(m) = &self.mid {
            h = m.r0.forward(&h, temb)?;
            if let Some(a) = &m.attn {
                h = a.forward(&h)?;
            }
            h = m.r1.forward(&h, temb)?;
        }
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips.pop().context("UNet skip stack underflow")?;
                let joined = timed("pad, cat, upsample", h.device(), || {
                    Ok(if cl {
                        crate::kernels::concat_channels_last(&h, &skip)?
                    } else {
                        Tensor::cat(&[&h, &skip], dc)?
                    })
                })?;
                // Only the concatenation is needed from here on.
                drop((h, skip));
                h = r.forward(&joined, temb)?;
                if let Some(a) = blk.attentions.get(j) {
                    h = a.forward(&h)?;
                }
            }
            if let Some(up) = &blk.up {
                h = up.forward(&h)?;
            }
        }
        let h = norm_act(&self.norm_out, Act::Silu, &h)?;
        let out = self.conv_out.forward(&h)?;
        let out = if cl { to_nchw(&out)? } else { out };
        Ok(out.to_dtype(out_dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lin(c: usize, seed: f64) -> Linear {
        let dev = Device::Cpu;
        Linear::new(
            Tensor::randn(0f32, 0.2, (c, c), &dev).unwrap(),
            Some(Tensor::randn(seed as f32, 0.2, c, &dev).unwrap()),
        )
    }

    #[test]
    fn training_upsampling_equals_nearest_upsampling_and_its_gradient_sums_each_block() {
        let dev = Device::Cpu;
        let x =
            candle_core::Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 3, 4, 5), &dev).unwrap())
                .unwrap();
        let want = x.as_tensor().detach().upsample_nearest2d(8, 10).unwrap();
        let got = upsample_nearest_2x(x.as_tensor(), false).unwrap();
        assert_eq!(
            (got.clone() - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            0.0
        );
        // d/dx of sum(u * y): each input pixel collects its 2 × 2 block of u.
        let u = Tensor::randn(0f64, 1.0, (2, 3, 8, 10), &dev).unwrap();
        let g = (got * &u).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap();
        let blocks = u
            .reshape((2, 3, 4, 2, 5, 2))
            .unwrap()
            .sum(5)
            .unwrap()
            .sum(3)
            .unwrap();
        let d = (gx - blocks).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f64>().unwrap() < 1e-12);
    }

    #[test]
    fn folded_transposed_convolution_equals_nearest_upsampling_then_3x3() {
        let dev = Device::Cpu;
        for (h, w) in [(5, 4), (1, 1), (3, 6)] {
            let x = Tensor::randn(0f64, 1.0, (2, 3, h, w), &dev).unwrap();
            let k = Tensor::randn(0f64, 1.0, (4, 3, 3, 3), &dev).unwrap();
            let want = x
                .upsample_nearest2d(2 * h, 2 * w)
                .unwrap()
                .conv2d(&k, 1, 1, 1, 1)
                .unwrap();
            let folded = fold_upsample_conv(&k).unwrap();
            assert_eq!(folded.dims(), [3, 4, 4, 4]);
            let got = x.conv_transpose2d(&folded, 1, 0, 2, 1).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = crate::ops::max_abs_diff(&got, &want).unwrap();
            assert!(d < 1e-12, "{h}x{w}: {d}");
        }
    }

    #[test]
    fn folded_4x4_downsampling_equals_the_asymmetrically_padded_3x3() {
        let dev = Device::Cpu;
        for (h, w) in [(8, 8), (6, 10), (2, 2)] {
            let x = Tensor::randn(0f64, 1.0, (2, 3, h, w), &dev).unwrap();
            let k = Tensor::randn(0f64, 1.0, (4, 3, 3, 3), &dev).unwrap();
            let want = x
                .pad_with_zeros(3, 0, 1)
                .unwrap()
                .pad_with_zeros(2, 0, 1)
                .unwrap()
                .conv2d(&k, 0, 2, 1, 1)
                .unwrap();
            let k4 = fold_bottom_right_padding(&k).unwrap();
            assert_eq!(k4.dims(), [4, 3, 4, 4]);
            let got = x.conv2d(&k4, 1, 2, 1, 1).unwrap();
            assert_eq!(got.dims(), [2, 4, h / 2, w / 2]);
            let d = crate::ops::max_abs_diff(&got, &want).unwrap();
            assert!(d < 1e-12, "{h}x{w}: {d}");
        }
    }

    #[test]
    fn channels_first_attention_equals_the_token_major_path() {
        let dev = Device::Cpu;
        let c = 8;
        for heads in [1, 2, 4] {
            let (q, k, v) = (lin(c, 0.1), lin(c, -0.2), lin(c, 0.3));
            let qkv = stack_qkv(&q, &k, &v, heads).unwrap();
            let att = Attention {
                norm: Some(GroupNorm {
                    weight: Tensor::randn(1f32, 0.1, c, &dev).unwrap(),
                    bias: Tensor::randn(0f32, 0.1, c, &dev).unwrap(),
                    groups: 4,
                    eps: 1e-6,
                    channels_last: false,
                }),
                q,
                k,
                v,
                out: lin(c, 0.05),
                heads,
                rescale: 2.0,
                qkv: None,
                channels_last: false,
            };
            let x = Tensor::randn(0f32, 1.0, (3, c, 3, 5), &dev).unwrap();
            let want = att.forward_inner(&x).unwrap();
            let got = att.forward_channels_first(&x, &qkv).unwrap();
            let d = crate::ops::max_abs_diff(&want, &got).unwrap() as f32;
            assert!(d < 1e-5, "{heads} heads: max difference {d}");
            // Channels last: the same values in (B, H, W, C).
            let mut att = att;
            att.norm.as_mut().unwrap().channels_last = true;
            att.channels_last = true;
            let got = att
                .forward_channels_last(&to_nhwc(&x).unwrap(), &qkv)
                .unwrap();
            let d = crate::ops::max_abs_diff(&want, &to_nchw(&got).unwrap()).unwrap() as f32;
            assert!(d < 1e-5, "{heads} heads, channels last: max difference {d}");
        }
    }

    /// Every fixture architecture (legacy attention, several heads, scale-shift time
    /// embedding, class labels) gives the same output with its activations channels last as
    /// in NCHW: the layout changes where values lie, not what is computed. In f64, so that the
    /// only difference left is the attention softmax, which the inference kernel computes in
    /// f32 arithmetic (the CPU's NCHW path uses candle's f64 softmax): about 1e-7.
    #[test]
    fn the_channels_last_network_equals_the_nchw_network() {
        let dev = Device::Cpu;
        for name in ["multihead", "ddpm_legacy", "scale_shift", "class_cond"] {
            let dir = std::path::PathBuf::from("tests/fixtures/unet2d").join(name);
            let load = || {
                crate::checkpoint::DiffusersModel::load(&dir, DType::F64, &dev)
                    .unwrap()
                    .unet
            };
            let (nchw, nhwc) = (load(), load().into_channels_last().unwrap());
            assert!(!nchw.is_channels_last() && nhwc.is_channels_last());
            let c = &nchw.config;
            let side = 2 * c.downsample_factor();
            let x = Tensor::randn(0f64, 1.0, (3, c.in_channels, side, side), &dev).unwrap();
            let labels: Option<Vec<u32>> = c.num_class_embeds.map(|k| vec![0, 1 % k as u32, 0]);
            let ts = [3.0, 500.0, 999.0];
            let want = nchw.forward_labels(&x, &ts, labels.as_deref()).unwrap();
            let got = nhwc.forward_labels(&x, &ts, labels.as_deref()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let d = crate::ops::max_abs_diff(&want, &got).unwrap();
            assert!(d <= 1e-6 * scale.max(1.0), "{name}: max difference {d}");
        }
    }

    #[test]
    fn device_timestep_embedding_equals_the_host_formula() {
        let m = crate::checkpoint::DiffusersModel::load(
            std::path::Path::new("tests/fixtures/unet2d/multihead"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        for t in [0.0, 37.5, 999.0] {
            let host = m.unet.timestep_embedding(&[t], &Device::Cpu).unwrap();
            let dev = m
                .unet
                .timestep_embedding_on_device(t, &Device::Cpu)
                .unwrap();
            let d = crate::ops::max_abs_diff(&host, &dev).unwrap() as f32;
            assert!(d < 1e-6, "t = {t}: {d}");
        }
    }
}
