//! Deterministic mode (`--deterministic`, `QTAYLOR_DETERMINISTIC=1`): on CUDA, a sample's bits
//! depend only on its inputs, not on the run, the batch it is drawn in or the shard.
//!
//! On the CPU this holds already (README, "Reproducible"). On CUDA three things break it, and
//! the mode changes each (the GPU check `scripts/gpu-determinism.sh` shows which operations
//! differ with the mode off and that none differ with it on, BENCHMARKS.md §14):
//!
//! 1. **Choices made by timing.** Exact-f32 convolutions and their gradients pick the fastest
//!    algorithm by running every candidate (`cudnnFind…`); timings differ from run to run, so
//!    the algorithm and its rounding do. The mode never times: an algorithm comes from cuDNN's
//!    heuristic ranking, a deterministic function of the shape and the card
//!    (`src/gpu/conv_cudnn.rs`). `QTAYLOR_CUDNN_ALGO=find|graph-find` is refused with it.
//! 2. **Choices that depend on the batch.** cuDNN's and cuBLAS's heuristics choose a kernel for
//!    the whole problem, batch included: at a small batch they split the reduction over the
//!    input channels (split-K) to fill the card, at a large one they do not, and the sums then
//!    round differently. Channels-last group norm puts more groups in a block when the batch
//!    is large. The mode chooses each kernel once per shape *with the batch replaced by
//!    [`REFERENCE_BATCH`]* and runs that same kernel at every batch: a cuDNN engine with its
//!    knob choices (`src/gpu/conv_cudnn.rs`), a cuBLASLt algorithm without split-K on a fixed
//!    workspace (`src/gpu/matmul.rs`), a group-norm launch whose per-row work does not
//!    depend on the batch (`src/gpu/kernels/`). Within one kernel each output element's
//!    sum runs in the same order whatever row it is in, so a row's bits do not depend on the
//!    other rows.
//! 3. **Kernels that add with atomics.** cuDNN engines carrying the `NONDETERMINISTIC`
//!    numerical note and legacy algorithms not marked `CUDNN_DETERMINISTIC` are skipped (the
//!    legacy filter-gradient and data-gradient searches were already restricted to the
//!    deterministic ones). qtaylor's own kernels and the candle kernels the models use reduce
//!    in a fixed order per row (no atomics).
//!
//! CUDA graphs replay the kernels a plain pass queued, so they give the same bits on or off.
//! Off CUDA the mode changes nothing.

use std::sync::atomic::{AtomicU8, Ordering};

/// The batch every kernel choice of the deterministic mode is made for: the batch at which
/// the mode's cost is judged (BENCHMARKS.md §14), so that the kernels it keeps are the fast
/// ones there.
pub const REFERENCE_BATCH: usize = 256;

/// The environment variable that turns the mode on (`1`, `on`, `true`) or off (`0`, `off`,
/// `false`) when no flag says otherwise.
pub const ENV: &str = "QTAYLOR_DETERMINISTIC";

/// Unset, off, on.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Sets the mode for this process: `flag` (the command line's `--deterministic[=on|off]`)
/// when given, else [`ENV`], else off. An [`ENV`] value that is none of the accepted words is
/// an error naming it. Returns the mode set.
pub fn configure(flag: Option<bool>) -> anyhow::Result<bool> {
    let on = match flag {
        Some(on) => on,
        None => match std::env::var(ENV) {
            Ok(v) => parse(&v).ok_or_else(|| {
                anyhow::anyhow!(
                    "environment variable {ENV}={v:?}: expected 1, on or true (deterministic \
                     GPU kernels) or 0, off or false"
                )
            })?,
            Err(std::env::VarError::NotPresent) => false,
            Err(std::env::VarError::NotUnicode(v)) => {
                anyhow::bail!("environment variable {ENV}={v:?} is not text: expected 1 or 0")
            }
        },
    };
    set(on);
    Ok(on)
}

/// `on`/`off` and their synonyms.
pub fn parse(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "true" | "yes" => Some(true),
        "0" | "off" | "false" | "no" | "" => Some(false),
        _ => None,
    }
}

/// Turns the mode on or off for the kernels chosen from now on (plans and algorithms are
/// cached per mode, so a process may time both: `qtaylor determinism`).
pub fn set(on: bool) {
    MODE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether GPU kernels are chosen deterministically ([`configure`], [`set`]).
pub fn deterministic() -> bool {
    MODE.load(Ordering::Relaxed) == 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_words_parse_and_others_are_refused_by_name() {
        for (w, on) in [
            ("1", true),
            ("ON", true),
            ("true", true),
            ("0", false),
            ("off", false),
        ] {
            assert_eq!(parse(w), Some(on), "{w}");
        }
        assert_eq!(parse("maybe"), None);
        // The flag wins over the environment (which is not read at all then). (The global
        // itself is not asserted: other tests of this process switch it.)
        assert!(configure(Some(true)).unwrap());
        assert!(!configure(Some(false)).unwrap());
    }
}
