//! A `UNet2DModel`'s `config.json`, with the limits checked before anything is allocated.

use super::*;

pub(super) fn d_in() -> usize {
    3
}
pub(super) fn d_true() -> bool {
    true
}
pub(super) fn d_positional() -> String {
    "positional".into()
}
pub(super) fn d_down() -> Vec<String> {
    [
        "DownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
        "AttnDownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
pub(super) fn d_up() -> Vec<String> {
    [
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "AttnUpBlock2D",
        "UpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
pub(super) fn d_mid() -> Option<String> {
    Some("UNetMidBlock2D".into())
}
pub(super) fn d_channels() -> Vec<usize> {
    vec![224, 448, 672, 896]
}
pub(super) fn d_two() -> usize {
    2
}
pub(super) fn d_one_f() -> f64 {
    1.0
}
pub(super) fn d_one() -> usize {
    1
}
pub(super) fn d_conv() -> String {
    "conv".into()
}
pub(super) fn d_silu() -> String {
    "silu".into()
}
pub(super) fn d_head() -> Option<usize> {
    Some(8)
}
pub(super) fn d_groups() -> Option<usize> {
    Some(32)
}
pub(super) fn d_eps() -> f64 {
    1e-5
}
pub(super) fn d_default() -> String {
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

    pub(super) fn validate(&self) -> Result<()> {
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
