//! A diffusers scheduler_config.json: parse, check, build the discrete schedule and query it.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::scheduler_config(data));
