//! numpy `.npy` arrays, with the shape checks the CLI asks for.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::npy(data));
