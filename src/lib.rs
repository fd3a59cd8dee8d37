//! qtaylor: few-NFE sampling of diffusion models, centred on the quasi-Taylor samplers
//! (arXiv 2112.13339) and the samplers users compare them against.
//!
//! - [`series`], [`schedule`], [`grid`], [`exec`], [`program`]: re-exported from the
//!   `qtaylor-core` crate (power series, schedules, grids, the sampler backend trait);
//! - [`model`]: the `(x, t) → prediction` trait and exact parameterization conversions;
//! - [`samplers`]: the core's samplers on candle tensors ([`samplers::CandleBackend`]);
//! - [`problems`], [`reference`], [`metrics`], [`bench`]: exact-score problems, reference
//!   solutions and the error-vs-NFE bench;
//! - [`feature_metrics`], [`classifier`]: FID, KID and improved precision/recall on feature
//!   vectors, and the small CNN whose features they use on MNIST-like images;
//! - [`ops`], [`rng`], [`io`], [`plot`]: fused tensor updates, per-sample noise, files, plots.

pub mod bench;
pub mod checkpoint;
pub mod classifier;
#[cfg(feature = "cudnn")]
pub mod conv_cudnn;
pub mod cuda_graph;
pub mod data;
pub mod data_parallel;
pub mod eval;
pub mod feature_metrics;
pub mod gridfile;
pub mod guidance;
pub mod io;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod plot;
pub mod problems;
pub mod progress;
pub mod reference;
pub mod rng;
pub mod samplers;
pub mod shard;
pub mod train;
pub mod tune;
pub mod unet;

// The math, from the core crate (no tensors): one implementation for the CLI, this
// library and the Python package.
pub use qtaylor_core::tune as grid_search;
pub use qtaylor_core::{exec, grid, program, schedule, series};
