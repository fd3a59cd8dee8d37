//! Models: everything that maps `(x, t)` to a prediction ([`model::Model`]). diffusers
//! `UNet2DModel` networks ([`unet`]) loaded from checkpoints ([`checkpoint`]), classifier-free
//! guidance on class-conditional ones ([`guidance`]), exact-score problems with a closed-form
//! score ([`problems`]), and the small CNN whose features the sample-quality metrics use
//! ([`classifier`]). Models run on [`crate::gpu`] and [`crate::tensor`]; the samplers above
//! them see only the [`model::Model`] trait.

pub mod checkpoint;
pub mod classifier;
pub mod guidance;
pub mod model;
pub mod problems;
pub mod unet;
