//! Timestep and sigma lists and grid files, then every fixed-step sampler recorded over the
//! grid they give. Lines: sampler name, `--timesteps` list, `--sigmas` list, grid-file JSON.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::grid_lists(data));
