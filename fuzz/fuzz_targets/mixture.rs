//! The Gaussian-mixture JSON of `--problem mixture:FILE`: parse, check, evaluate the density.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::mixture(data));
