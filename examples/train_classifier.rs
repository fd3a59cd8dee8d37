//! Trains the MNIST-feature classifier of `qtaylor::classifier` and saves it.
//!
//! ```sh
//! cargo run --release --example train_classifier -- mnist assets/classifier-mnist 3 0
//! ```
//!
//! Arguments: data set (`mnist`, `fashion-mnist` or a folder of IDX files), output folder,
//! epochs, seed. Batch 128 and peak learning rate 1e-3 (AdamW, cosine decay).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use qtaylor::classifier::{ClassifierTrainOptions, train_and_save};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 4 {
        bail!(
            "usage: train_classifier DATASET OUT_DIR EPOCHS SEED (got {} arguments)",
            args.len()
        );
    }
    let epochs: usize = args[2]
        .parse()
        .with_context(|| format!("EPOCHS = {:?}, expected a positive integer", args[2]))?;
    let seed: u64 = args[3]
        .parse()
        .with_context(|| format!("SEED = {:?}, expected an unsigned integer", args[3]))?;
    let opts = ClassifierTrainOptions {
        epochs,
        seed,
        command: Some(format!(
            "cargo run --release --example train_classifier -- {}",
            args.join(" ")
        )),
        ..Default::default()
    };
    let out = PathBuf::from(&args[1]);
    let acc = train_and_save(&args[0], &out, &opts, &Device::Cpu)?;
    println!("test accuracy {:.4}; saved to {}", acc, out.display());
    Ok(())
}
