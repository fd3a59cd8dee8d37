//! The checkpoint folder loader: config.json + scheduler_config.json + safetensors bytes,
//! framed as three length-prefixed parts (u32 little-endian lengths for the first two).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::checkpoint(data));
