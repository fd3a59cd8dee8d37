//! qtaylor: few-NFE sampling of diffusion models, centred on the quasi-Taylor samplers
//! (arXiv 2112.13339) and the samplers users compare them against.
//!
//! The modules are layers; a module uses only modules of lower layers (and the core crate),
//! never one above it (`tests/layers.rs` checks it):
//!
//! 1. [`io`] (files, `.npy`, PNG, IDX data sets, progress lines), [`tensor`] (fused tensor
//!    updates, per-sample noise, data-parallel replicas), [`shard`] (sharded runs: part
//!    files, manifests, child processes per device);
//! 2. [`gpu`]: CUDA kernels, cuDNN convolutions, CUDA graphs, the profiler;
//! 3. [`models`]: the `(x, t) → prediction` trait, UNets, checkpoints, guidance, exact-score
//!    problems, the feature classifier;
//! 4. [`sampling`]: the samplers on candle tensors, grid files, a run's configuration;
//! 5. [`measure`] (bench, eval, metrics, references, plots), [`tune`] (tuned grids) and
//!    [`train`] (training a UNet), on top.
//!
//! The math is the `qtaylor-core` crate's, re-exported here: [`series`], [`schedule`],
//! [`grid`], [`exec`], [`program`], [`keys`], [`config`], [`samplers`] (generic over a
//! backend; [`sampling::samplers`] runs them on candle tensors).

pub mod gpu;
pub mod io;
pub mod measure;
pub mod models;
pub mod sampling;
pub mod shard;
pub mod tensor;
pub mod train;
pub mod tune;

// The math, from the core crate (no tensors): one implementation for the CLI, this
// library and the Python package.
pub use qtaylor_core::tune as grid_search;
pub use qtaylor_core::{bail_option, option_error};
pub use qtaylor_core::{config, exec, grid, keys, program, schedule, series};
