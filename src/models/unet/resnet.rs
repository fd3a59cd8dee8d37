//! diffusers' `ResnetBlock2D`: two normalised convolutions, the time embedding added
//! between them (or as scale and shift), and a shortcut.

use super::*;

pub(super) struct Resnet {
    pub(super) norm1: GroupNorm,
    pub(super) conv1: Conv,
    pub(super) time_proj: Linear,
    pub(super) norm2: GroupNorm,
    pub(super) conv2: Conv,
    pub(super) shortcut: Option<Conv>,
    pub(super) scale_shift: bool,
    pub(super) out_scale: f64,
    pub(super) act: Act,
    /// Columns `(offset, len)` of this block's time projection in the stacked one
    /// ([`UNet2D::stack_time_projections`]).
    pub(super) time_span: Option<(usize, usize)>,
}

impl Resnet {
    pub(super) fn new(
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

    pub(super) fn forward(&self, x: &Tensor, temb: &Temb) -> Result<Tensor> {
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

    pub(super) fn into_channels_last(mut self) -> Result<Resnet> {
        self.norm1.channels_last = true;
        self.norm2.channels_last = true;
        self.conv1 = self.conv1.into_channels_last()?;
        self.conv2 = self.conv2.into_channels_last()?;
        self.shortcut = self.shortcut.map(|s| s.into_channels_last()).transpose()?;
        Ok(self)
    }
}
