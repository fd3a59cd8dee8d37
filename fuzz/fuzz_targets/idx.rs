//! IDX files (MNIST's format), plain or gzipped: the first byte's low bit selects gzip.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::idx(data));
