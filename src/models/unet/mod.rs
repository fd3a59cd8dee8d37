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

mod attention;
mod config;
mod conv;
mod layers;
mod resnet;
mod weights;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear};
use serde::Deserialize;

use crate::gpu::profile::timed;

use attention::*;
use conv::*;
use layers::*;
use resnet::*;

pub use config::{
    MAX_BLOCKS, MAX_CLASSES, MAX_IO_CHANNELS, MAX_LAYERS_PER_BLOCK, MAX_SAMPLE_SIZE,
    MAX_SYNTHETIC_PARAMETERS, MAX_WIDTH, UNet2DConfig,
};
pub use weights::Weights;

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
    graphs: crate::gpu::cuda_graph::Graphs,
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
        if frozen && crate::gpu::conv::channels_last(&w.device, w.dtype)? {
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
    /// [`UNet2D::new`] does this by `QTAYLOR_LAYOUT` ([`crate::gpu::conv::channels_last`]).
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
            (None, Some(_)) => qtaylor_core::bail_option!(
                format!(
                    "this UNet is class-conditional ({} classes): give class labels (",
                    cfg.num_class_embeds.unwrap_or(0)
                ),
                qtaylor_core::keys::CLASS,
                ", ",
                qtaylor_core::keys::CLASSES,
                ")"
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
                        crate::gpu::kernels::concat_channels_last(&h, &skip)?
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

    /// The UNet of the test fixture `name` (tests/fixtures/unet2d/NAME/unet/).
    fn fixture(name: &str, dtype: DType) -> UNet2D {
        let dir = Path::new("tests/fixtures/unet2d").join(name).join("unet");
        let cfg = dir.join("config.json");
        let config =
            UNet2DConfig::from_json(&std::fs::read_to_string(&cfg).unwrap(), &cfg).unwrap();
        let w = Weights::load(
            &dir.join("diffusion_pytorch_model.safetensors"),
            dtype,
            &Device::Cpu,
        )
        .unwrap();
        UNet2D::new(config, &w).unwrap()
    }

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
            let d = crate::tensor::ops::max_abs_diff(&got, &want).unwrap();
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
            let d = crate::tensor::ops::max_abs_diff(&got, &want).unwrap();
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
            let d = crate::tensor::ops::max_abs_diff(&want, &got).unwrap() as f32;
            assert!(d < 1e-5, "{heads} heads: max difference {d}");
            // Channels last: the same values in (B, H, W, C).
            let mut att = att;
            att.norm.as_mut().unwrap().channels_last = true;
            att.channels_last = true;
            let got = att
                .forward_channels_last(&to_nhwc(&x).unwrap(), &qkv)
                .unwrap();
            let d =
                crate::tensor::ops::max_abs_diff(&want, &to_nchw(&got).unwrap()).unwrap() as f32;
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
            let load = || fixture(name, DType::F64);
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
            let d = crate::tensor::ops::max_abs_diff(&want, &got).unwrap();
            assert!(d <= 1e-6 * scale.max(1.0), "{name}: max difference {d}");
        }
    }

    #[test]
    fn device_timestep_embedding_equals_the_host_formula() {
        let unet = fixture("multihead", DType::F32);
        for t in [0.0, 37.5, 999.0] {
            let host = unet.timestep_embedding(&[t], &Device::Cpu).unwrap();
            let dev = unet.timestep_embedding_on_device(t, &Device::Cpu).unwrap();
            let d = crate::tensor::ops::max_abs_diff(&host, &dev).unwrap() as f32;
            assert!(d < 1e-6, "t = {t}: {d}");
        }
    }
}
