//! A checkpoint's tensors (safetensors), checked one by one as the network asks for them,
//! or synthetic ones (PyTorch's default initialisation) for architecture tests and benchmarks.

use super::*;

/// The tensors of a safetensors file, checked one by one as the model asks for them.
pub struct Weights {
    pub(super) file: PathBuf,
    pub(super) tensors: HashMap<String, Tensor>,
    pub(super) used: Mutex<HashSet<String>>,
    /// Synthetic weights: any tensor asked for is made up like PyTorch's default init
    /// (weights uniform in ±1/√fan_in, biases 0, norm scales 1) from a seed and its name, and
    /// kept (for counting and saving). For architecture tests and benchmark models.
    pub(super) synthetic: Option<(u64, Mutex<HashMap<String, Tensor>>)>,
    pub(super) dtype: DType,
    pub(super) device: Device,
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

    pub(super) fn has(&self, name: &str) -> bool {
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

    pub(super) fn conv(
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
        let cudnn_1x1 = crate::gpu::conv::own_cudnn_conv()
            && (crate::gpu::device::tf32()
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
    pub(super) fn downsample_conv(
        &self,
        p: &str,
        c: usize,
        padding: usize,
    ) -> Result<(Conv, bool)> {
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
    pub(super) fn upsample(&self, p: &str, c: usize) -> Result<Upsample> {
        let conv = self.conv(p, c, c, 3, 1, 1)?;
        let mode = std::env::var("QTAYLOR_UPSAMPLE").unwrap_or_else(|_| "auto".into());
        let mode = match mode.as_str() {
            "auto" | "transposed" | "nearest" => mode,
            other => bail!("QTAYLOR_UPSAMPLE={other}: expected auto, transposed or nearest"),
        };
        let folded = match &conv {
            Conv::Candle(cv)
                if self.device.is_cuda()
                    && crate::gpu::conv::own_cudnn_conv()
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

    pub(super) fn linear(&self, p: &str, cin: usize, cout: usize) -> Result<Linear> {
        Ok(Linear::new(
            self.get(&format!("{p}.weight"), &[cout, cin])?,
            Some(self.get(&format!("{p}.bias"), &[cout])?),
        ))
    }

    pub(super) fn group_norm(
        &self,
        p: &str,
        groups: usize,
        c: usize,
        eps: f64,
    ) -> Result<GroupNorm> {
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
