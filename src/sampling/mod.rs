//! Sampling: the core's samplers on candle tensors ([`samplers`]), tuned grid files
//! ([`gridfile`]), one run's configuration ([`spec`]: the settings a front end parsed and the
//! one builder that validates them) and the `sample` command's run ([`sample::run`]). Everything here sees models
//! through [`crate::models::model::Model`] only.

pub mod gridfile;
pub mod sample;
pub mod samplers;
pub mod spec;
