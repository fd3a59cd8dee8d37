//! Class-conditional sampling with classifier-free guidance (Ho & Salimans 2022,
//! arXiv 2207.12598): the guided prediction
//!
//! ```text
//! ε̂_w(x, t, c) = ε̂(x, t, ∅) + w · (ε̂(x, t, c) − ε̂(x, t, ∅))
//! ```
//!
//! from one network trained with its labels dropped to a null class ∅ part of the time. The
//! conditional and the unconditional rows go through one batched network call of 2B rows
//! (w = 1 is the conditional model alone and w = 0 the unconditional one: B rows). The
//! combination is taken on the network's raw output, before `clip_sample`, as diffusers'
//! pipelines do; it is linear, so guiding ε̂, x̂0 or v̂ gives the same sample. Every sampler
//! runs on it unchanged, and one guided call counts as one NFE.
//!
//! The null class: diffusers' `UNet2DModel` has no field for it, so qtaylor's convention is
//! the last row of `class_embedding` (`num_class_embeds − 1`), the class `qtaylor train`
//! drops labels to.

use anyhow::{Result, bail};
use candle_core::Tensor;
use qtaylor_core::bail_option;
use qtaylor_core::keys;

use crate::models::checkpoint::DiffusersModel;
use crate::models::model::{Model, Parameterization};

/// Checks a guidance scale: finite and ≥ 0.
pub fn check_scale(w: f64) -> Result<()> {
    if !(w.is_finite() && w >= 0.0) {
        bail_option!(
            (keys::GUIDANCE, w),
            ": expected a finite scale >= 0 (1 = the conditional model)"
        );
    }
    Ok(())
}

/// A class-conditional checkpoint sampled with labels and a guidance scale.
pub struct Guided<'a> {
    model: &'a DiffusersModel,
    labels: Vec<u32>,
    null: u32,
    w: f64,
}

impl<'a> Guided<'a> {
    /// `labels` holds one class per sample row (the rows of every call); `null` is the
    /// unconditional class; `w` the guidance scale (finite, ≥ 0).
    pub fn new(model: &'a DiffusersModel, labels: Vec<u32>, null: u32, w: f64) -> Result<Self> {
        let Some(k) = model.unet.num_classes() else {
            bail_option!(
                keys::CLASS,
                "/",
                keys::CLASSES,
                ": this model is not class-conditional (its config.json has no num_class_embeds)"
            );
        };
        check_scale(w)?;
        if null as usize >= k {
            bail_option!(
                (keys::NULL_CLASS, null),
                format!(
                    ": the model has {k} classes (0 to {}); the null class is one of them",
                    k - 1
                )
            );
        }
        if let Some(c) = labels.iter().find(|&&c| c as usize >= k) {
            bail_option!(
                (keys::CLASS, *c),
                format!(
                    ": the model has {k} classes (0 to {}, {null} the null class)",
                    k - 1
                )
            );
        }
        Ok(Guided {
            model,
            labels,
            null,
            w,
        })
    }

    /// The unconditional (null-class) model of a class-conditional checkpoint, for a batch of
    /// any size: what `sample` runs without --class/--classes, and what `tune` tunes.
    pub fn unconditional(model: &'a DiffusersModel) -> Result<Self> {
        let Some(null) = Self::default_null(model) else {
            bail!("this model is not class-conditional (its config.json has no num_class_embeds)");
        };
        Guided::new(model, Vec::new(), null, 0.0)
    }

    /// The null class it samples with (`--null-class`, or the model's last class).
    pub fn null(&self) -> u32 {
        self.null
    }

    /// The default null class of a model: its last class.
    pub fn default_null(model: &DiffusersModel) -> Option<u32> {
        model.unet.num_classes().map(|k| k as u32 - 1)
    }

    /// Network rows per sample and call: 2 with guidance, 1 for w = 0 or 1.
    pub fn rows_per_call(&self) -> usize {
        if self.w == 0.0 || self.w == 1.0 { 1 } else { 2 }
    }
}

impl Model for Guided<'_> {
    fn parameterization(&self) -> Parameterization {
        self.model.parameterization()
    }

    fn predict(&self, x: &Tensor, t: &[f64]) -> Result<Tensor> {
        let b = x.dim(0)?;
        // w = 0 takes no labels but the null class: any batch.
        if self.w != 0.0 && self.labels.len() != b {
            bail!("{} class labels for a batch of {b} rows", self.labels.len());
        }
        let out = if self.w == 1.0 {
            self.model.network(x, t, Some(&self.labels))?
        } else if self.w == 0.0 {
            self.model.network(x, t, Some(&[self.null]))?
        } else {
            // One call of 2B rows: the conditional rows, then the unconditional ones.
            let xx = Tensor::cat(&[x, x], 0)?;
            let tt: Vec<f64> = if t.len() == 1 {
                t.to_vec()
            } else {
                t.iter().chain(t).copied().collect()
            };
            let mut ll = self.labels.clone();
            ll.extend(std::iter::repeat_n(self.null, b));
            let both = self.model.network(&xx, &tt, Some(&ll))?;
            let (c, u) = (both.narrow(0, 0, b)?, both.narrow(0, b, b)?);
            // u + w (c − u), in f32 or wider.
            let dt = c.dtype();
            let (c32, u32) = if matches!(dt, candle_core::DType::F64) {
                (c, u)
            } else {
                (
                    c.to_dtype(candle_core::DType::F32)?,
                    u.to_dtype(candle_core::DType::F32)?,
                )
            };
            ((&u32 + ((c32 - &u32)? * self.w)?)?).to_dtype(dt)?
        };
        self.model.finish(out, x, t)
    }
}
