//! A small CNN classifier of 28 × 28 grey-scale images in [−1, 1] (MNIST, Fashion-MNIST),
//! used as the feature extractor of an "MNIST-feature FID": Inception-v3 weights (Heusel
//! et al. 2017) cannot be downloaded here, so FID / KID / precision-recall
//! (computed by the measurement layer, `measure::feature_metrics`) are computed on the 128-d penultimate activations of this
//! network, trained on the data set being sampled.
//!
//! Architecture (LeCun et al. 1998 style, ReLU + max-pooling):
//!
//! ```text
//! x (B,1,28,28) → conv3×3(1→32, pad 1) → ReLU → maxpool 2 → conv3×3(32→64, pad 1) → ReLU
//!   → maxpool 2 → flatten (3136) → linear(3136→128) → ReLU = features (B,128)
//!   → linear(128→10) = logits (B,10)
//! ```
//!
//! Weights are initialised from a seeded ChaCha stream (He et al. 2015 uniform:
//! U(±√(6/fan_in)), biases 0) and trained with AdamW (Loshchilov & Hutter 2019) on the
//! cross-entropy, learning rate decayed by a cosine from `lr` to 0 (Loshchilov & Hutter
//! 2017); the batch order of each epoch is a seeded ChaCha shuffle, so training is
//! deterministic given the seed on one machine.
//!
//! A trained classifier is a folder: `model.safetensors` (f32 tensors `conv1.weight`,
//! `conv1.bias`, `conv2.weight`, `conv2.bias`, `fc1.weight`, `fc1.bias`, `fc2.weight`,
//! `fc2.bias`, PyTorch layouts) and `classifier.json` ([`ClassifierInfo`]: architecture,
//! data set, test accuracy, training command, steps, seed, and the features and logits of
//! an all −1 image as a check value against corruption, see [`Classifier::verify`]).
//!
//! The intended CLI (wired in `src/main.rs`):
//!
//! ```text
//! qtaylor train-classifier --dataset mnist --out assets/classifier-mnist \
//!     --epochs 3 --batch 128 --lr 1e-3 --seed 0 [--device cpu|cuda]
//! ```
//!
//! which calls [`train_and_save`] and prints the test accuracy.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, Uniform};
use serde::{Deserialize, Serialize};

use crate::io::idx::{ImageSet, Split, load_image_set};

/// The architecture string recorded in `classifier.json`; [`Classifier::load`] accepts
/// only this one.
pub const ARCHITECTURE: &str = "conv3x3(1->32,pad1)+relu,maxpool2,conv3x3(32->64,pad1)+relu,maxpool2,linear(3136->128)+relu=features,linear(128->10)=logits";
/// Image side length the network takes.
pub const IMAGE_SIZE: usize = 28;
/// Dimension of [`Classifier::features`].
pub const FEATURE_DIM: usize = 128;
/// Number of classes (logits).
pub const NUM_CLASSES: usize = 10;
/// Weights file inside a classifier folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Metadata file inside a classifier folder.
pub const INFO_FILE: &str = "classifier.json";

/// Names and shapes of the parameters, in a fixed order.
fn param_shapes() -> [(&'static str, Vec<usize>); 8] {
    [
        ("conv1.weight", vec![32, 1, 3, 3]),
        ("conv1.bias", vec![32]),
        ("conv2.weight", vec![64, 32, 3, 3]),
        ("conv2.bias", vec![64]),
        ("fc1.weight", vec![FEATURE_DIM, 64 * 7 * 7]),
        ("fc1.bias", vec![FEATURE_DIM]),
        ("fc2.weight", vec![NUM_CLASSES, FEATURE_DIM]),
        ("fc2.bias", vec![NUM_CLASSES]),
    ]
}

/// 3 × 3 convolution, stride 1, zero padding 1, as im2col + one matrix product:
/// `y[b,o,p] = Σ_{c,k} w[o,c,k] · x_pad[b,c,p+k]` with the 9 shifted views of the padded
/// input stacked as the (c, k) rows. Same values as `Tensor::conv2d(w, 1, 1, 1, 1)` up to
/// summation order; used because its backward pass is a matrix product too, several times
/// faster on the CPU than candle's `conv_transpose2d` gradient.
fn conv3x3_same(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, wd) = x.dims4()?;
    let o = w.dim(0)?;
    let xp = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let mut views = Vec::with_capacity(9);
    for dy in 0..3 {
        for dx in 0..3 {
            views.push(xp.narrow(2, dy, h)?.narrow(3, dx, wd)?);
        }
    }
    // (B, C, 9, H, W) → (B, C·9, H·W); row c·9 + k matches w's (O, C, 3, 3) layout
    let cols = Tensor::stack(&views, 2)?.reshape((b, c * 9, h * wd))?;
    crate::gpu::matmul::matmul(&w.reshape((o, c * 9))?.broadcast_left(b)?, &cols)?
        .reshape((b, o, h, wd))
}

/// The check value stored at training time: outputs for an all −1 (black) image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CheckValue {
    /// What the input is.
    pub input: String,
    /// Its features (128 values).
    pub features: Vec<f64>,
    /// Its logits (10 values).
    pub logits: Vec<f64>,
}

/// The contents of `classifier.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClassifierInfo {
    /// Must equal [`ARCHITECTURE`].
    pub architecture: String,
    /// Data set name or folder it was trained on (`mnist`, `fashion-mnist`, …).
    pub dataset: String,
    /// Number of training images.
    pub train_images: usize,
    /// Accuracy on the test split, in [0, 1] (NaN is not allowed: −1 when not measured).
    pub test_accuracy: f64,
    /// The command that produced the folder.
    pub command: String,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Epochs over the training set.
    pub epochs: usize,
    /// Batch size.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Seed of initialisation and batch order.
    pub seed: u64,
    /// Wall-clock training time in seconds, and where.
    pub train_seconds: f64,
    /// Device the training ran on.
    pub device: String,
    /// Outputs for an all −1 image, checked by [`Classifier::verify`].
    pub check: CheckValue,
}

/// The trained (or freshly initialised) network with its metadata.
pub struct Classifier {
    params: Vec<(String, Var)>,
    device: Device,
    /// What `classifier.json` holds (or will hold once saved).
    pub info: ClassifierInfo,
}

/// Options of [`train_classifier`].
#[derive(Clone, Debug)]
pub struct ClassifierTrainOptions {
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per step.
    pub batch: usize,
    /// Peak learning rate of AdamW (cosine-decayed to 0).
    pub lr: f64,
    /// Seed of the initial weights and of the batch order.
    pub seed: u64,
    /// The command recorded in `classifier.json` by [`train_and_save`]; `None` records the
    /// process's own command line.
    pub command: Option<String>,
}

impl Default for ClassifierTrainOptions {
    fn default() -> Self {
        ClassifierTrainOptions {
            epochs: 3,
            batch: 128,
            lr: 1e-3,
            seed: 0,
            command: None,
        }
    }
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        other => format!("{:?}", other.location()),
    }
}

/// Images in [−1, 1] → the 8-bit grey levels a PNG would store → back to [−1, 1]: what the
/// feature metrics see of a sample (eval's rows and the tuner's feature objectives).
pub fn quantise(x: &Tensor) -> Result<Tensor> {
    let q = ((x.to_dtype(DType::F32)?.clamp(-1f32, 1f32)? + 1.0)? * 127.5)?.round()?;
    Ok(((q / 127.5)? - 1.0)?)
}

/// Images `idx` of a set as a `(B, 1, H, W)` f32 tensor in [−1, 1] on `device`.
pub fn image_batch(set: &ImageSet, idx: &[usize], device: &Device) -> Result<Tensor> {
    let mut data = Vec::with_capacity(idx.len() * set.h * set.w);
    for &i in idx {
        if i >= set.n {
            bail!("image index {i} out of range: the set has {} images", set.n);
        }
        data.extend(set.image_f32(i));
    }
    Ok(Tensor::from_vec(
        data,
        (idx.len(), 1, set.h, set.w),
        device,
    )?)
}

fn check_image_set(set: &ImageSet) -> Result<()> {
    if set.h != IMAGE_SIZE || set.w != IMAGE_SIZE {
        bail!(
            "images of {}×{}, the classifier takes {IMAGE_SIZE}×{IMAGE_SIZE}",
            set.h,
            set.w
        );
    }
    if set.labels.len() != set.n {
        bail!("{} labels for {} images", set.labels.len(), set.n);
    }
    if let Some(l) = set.labels.iter().find(|&&l| l as usize >= NUM_CLASSES) {
        bail!("label {l} out of range, expected 0..{NUM_CLASSES}");
    }
    Ok(())
}

impl Classifier {
    /// A network with He-uniform initial weights drawn from ChaCha `seed`, stream 0, and
    /// placeholder metadata.
    pub fn new_random(seed: u64, device: &Device) -> Result<Self> {
        let mut rng = ChaCha12Rng::seed_from_u64(seed);
        rng.set_stream(0);
        let mut params = Vec::new();
        for (name, shape) in param_shapes() {
            let count: usize = shape.iter().product();
            let values: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; count]
            } else {
                let fan_in: usize = shape[1..].iter().product();
                let bound = (6.0 / fan_in as f64).sqrt();
                let u = Uniform::new(-bound, bound)?;
                (0..count).map(|_| u.sample(&mut rng) as f32).collect()
            };
            let t = Tensor::from_vec(values, shape, device)?;
            params.push((name.to_string(), Var::from_tensor(&t)?));
        }
        let mut c = Classifier {
            params,
            device: device.clone(),
            info: ClassifierInfo {
                architecture: ARCHITECTURE.to_string(),
                dataset: String::new(),
                train_images: 0,
                test_accuracy: -1.0,
                command: String::new(),
                steps: 0,
                epochs: 0,
                batch: 0,
                lr: 0.0,
                seed,
                train_seconds: 0.0,
                device: device_name(device),
                check: CheckValue {
                    input: String::new(),
                    features: vec![],
                    logits: vec![],
                },
            },
        };
        c.info.check = c.compute_check()?;
        Ok(c)
    }

    fn param(&self, i: usize) -> &Tensor {
        self.params[i].1.as_tensor()
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Penultimate activations (B, 128) of images `x` of shape (B, 1, 28, 28), f32 in
    /// [−1, 1].
    pub fn features(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() != 4 || dims[1] != 1 || dims[2] != IMAGE_SIZE || dims[3] != IMAGE_SIZE {
            bail!(
                "classifier input of shape {dims:?}, expected (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE})"
            );
        }
        let x = x.to_dtype(DType::F32)?.to_device(&self.device)?;
        let conv = |h: &Tensor, w: &Tensor, b: &Tensor| -> Result<Tensor> {
            Ok(conv3x3_same(h, w)?
                .broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?
                .relu()?
                .max_pool2d(2)?)
        };
        let h = conv(&x, self.param(0), self.param(1))?;
        let h = conv(&h, self.param(2), self.param(3))?;
        let h = h.flatten_from(1)?;
        Ok(crate::gpu::matmul::matmul(&h, &self.param(4).t()?)?
            .broadcast_add(self.param(5))?
            .relu()?)
    }

    /// Class scores (B, 10) of images `x` of shape (B, 1, 28, 28).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        self.logits_of_features(&self.features(x)?)
    }

    fn logits_of_features(&self, f: &Tensor) -> Result<Tensor> {
        Ok(crate::gpu::matmul::matmul(f, &self.param(6).t()?)?.broadcast_add(self.param(7))?)
    }

    /// Features `(B, 128)` and logits `(B, 10)` computed one image at a time, so that an
    /// image's values do not depend on the batch it came in (a batched matrix product's
    /// rounding can depend on its size). What the feature metrics use.
    pub fn features_and_logits_by_image(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut fs = Vec::with_capacity(x.dim(0)?);
        let mut ls = Vec::with_capacity(x.dim(0)?);
        for i in 0..x.dim(0)? {
            let f = self.features(&x.narrow(0, i, 1)?)?;
            ls.push(self.logits_of_features(&f)?);
            fs.push(f);
        }
        Ok((Tensor::cat(&fs, 0)?, Tensor::cat(&ls, 0)?))
    }

    /// Features of images `first..first+count` of a set as rows of f64 (for
    /// the measurement layer's feature metrics), one image at a time
    /// ([`Classifier::features_and_logits_by_image`]) in batches of 500.
    pub fn features_of_set(&self, set: &ImageSet, count: usize) -> Result<Vec<Vec<f64>>> {
        check_image_set(set)?;
        if count > set.n {
            bail!("{count} images asked for, the set has {}", set.n);
        }
        let mut rows = Vec::with_capacity(count);
        for start in (0..count).step_by(500) {
            let idx: Vec<usize> = (start..(start + 500).min(count)).collect();
            let (f, _) =
                self.features_and_logits_by_image(&image_batch(set, &idx, &self.device)?)?;
            rows.extend(f.to_dtype(DType::F64)?.to_vec2::<f64>()?);
        }
        Ok(rows)
    }

    /// Fraction of the set's images whose arg-max logit is their label.
    pub fn accuracy(&self, set: &ImageSet) -> Result<f64> {
        check_image_set(set)?;
        let mut correct = 0usize;
        for start in (0..set.n).step_by(500) {
            let idx: Vec<usize> = (start..(start + 500).min(set.n)).collect();
            let pred: Vec<u32> = self
                .logits(&image_batch(set, &idx, &self.device)?)?
                .argmax(1)?
                .to_vec1()?;
            correct += idx
                .iter()
                .zip(&pred)
                .filter(|&(&i, &p)| set.labels[i] as u32 == p)
                .count();
        }
        Ok(correct as f64 / set.n as f64)
    }

    fn compute_check(&self) -> Result<CheckValue> {
        let x = Tensor::full(-1f32, (1, 1, IMAGE_SIZE, IMAGE_SIZE), &self.device)?;
        let f = self.features(&x)?;
        let l = self.logits_of_features(&f)?;
        let row = |t: &Tensor| -> Result<Vec<f64>> {
            Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)
        };
        Ok(CheckValue {
            input: "all -1 image (1,1,28,28)".to_string(),
            features: row(&f)?,
            logits: row(&l)?,
        })
    }

    /// Recomputes the features and logits of the all −1 image and compares them with the
    /// check value recorded at training time: each must agree to 1e-5 relative to the
    /// largest recorded magnitude. Fails (naming the first differing entry) when the
    /// weights or the metadata were altered.
    pub fn verify(&self) -> Result<()> {
        let now = self.compute_check()?;
        for (what, got, want) in [
            ("features", &now.features, &self.info.check.features),
            ("logits", &now.logits, &self.info.check.logits),
        ] {
            if got.len() != want.len() {
                bail!(
                    "check value: {} recorded {what}, the network gives {}",
                    want.len(),
                    got.len()
                );
            }
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
            if let Some(i) = (0..got.len()).find(|&i| (got[i] - want[i]).abs() > 1e-5 * scale) {
                bail!(
                    "check value: {what}[{i}] of the all -1 image is {}, {} was recorded (tolerance 1e-5 × {scale})",
                    got[i],
                    want[i]
                );
            }
        }
        Ok(())
    }

    /// Writes `dir/model.safetensors` and `dir/classifier.json` atomically (creating `dir`).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the folder {}", dir.display()))?;
        let mut map = HashMap::new();
        for (name, v) in &self.params {
            map.insert(name.clone(), v.as_tensor().to_device(&Device::Cpu)?);
        }
        crate::io::write_atomic_with(&dir.join(WEIGHTS_FILE), |tmp| {
            Ok(candle_core::safetensors::save(&map, tmp)?)
        })?;
        let json = serde_json::to_string_pretty(&self.info)?;
        crate::io::write_atomic(&dir.join(INFO_FILE), format!("{json}\n").as_bytes())
    }

    /// Reads a folder written by [`Classifier::save`] onto `device`. Errors name the file
    /// and the missing or malformed key or tensor.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let info_path = dir.join(INFO_FILE);
        let text = std::fs::read_to_string(&info_path)
            .with_context(|| format!("{}: cannot read the file", info_path.display()))?;
        let info: ClassifierInfo = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid classifier.json", info_path.display()))?;
        if info.architecture != ARCHITECTURE {
            bail!(
                "{}: key \"architecture\" is {:?}, expected {ARCHITECTURE:?}",
                info_path.display(),
                info.architecture
            );
        }
        let w_path = dir.join(WEIGHTS_FILE);
        if !w_path.is_file() {
            bail!("{}: no such file", w_path.display());
        }
        let mut tensors = candle_core::safetensors::load(&w_path, &Device::Cpu).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a readable safetensors file ({e})",
                w_path.display()
            )
        })?;
        let mut params = Vec::new();
        for (name, shape) in param_shapes() {
            let Some(t) = tensors.remove(name) else {
                bail!(
                    "{}: no tensor \"{name}\" (expected shape {shape:?})",
                    w_path.display()
                );
            };
            if t.dims() != shape.as_slice() {
                bail!(
                    "{}: tensor \"{name}\" has shape {:?}, expected {shape:?}",
                    w_path.display(),
                    t.dims()
                );
            }
            if t.dtype() != DType::F32 {
                bail!(
                    "{}: tensor \"{name}\" has dtype {:?}, expected f32",
                    w_path.display(),
                    t.dtype()
                );
            }
            params.push((name.to_string(), Var::from_tensor(&t.to_device(device)?)?));
        }
        if let Some(extra) = tensors.keys().min() {
            bail!(
                "{}: unexpected tensor \"{extra}\" (this architecture has only {:?})",
                w_path.display(),
                param_shapes().map(|(n, _)| n)
            );
        }
        Ok(Classifier {
            params,
            device: device.clone(),
            info,
        })
    }
}

/// Learning rate of step `t` of `total`: `lr · (1 + cos(π t / total)) / 2` (cosine decay,
/// Loshchilov & Hutter 2017, without restarts).
fn cosine_lr(lr: f64, t: usize, total: usize) -> f64 {
    lr * 0.5 * (1.0 + (std::f64::consts::PI * t as f64 / total as f64).cos())
}

/// Trains a classifier on a labelled 28 × 28 image set: AdamW (weight decay 0.01, β =
/// (0.9, 0.999)) on the mean cross-entropy, `epochs` passes in batches of `batch` (the last
/// batch of an epoch may be smaller), cosine-decayed learning rate. Initial weights come
/// from ChaCha `(seed, stream 0)`, the batch order of epoch e from ChaCha `(seed, stream
/// 1 + e)`. A progress bar on stderr shows the running loss. The returned classifier's info
/// holds the training settings and the check value; dataset, test accuracy and command are
/// filled in by [`train_and_save`].
pub fn train_classifier(
    train: &ImageSet,
    opts: &ClassifierTrainOptions,
    device: &Device,
) -> Result<Classifier> {
    check_image_set(train)?;
    if opts.epochs == 0 || opts.batch == 0 {
        bail!(
            "epochs = {} and batch = {}: both must be at least 1",
            opts.epochs,
            opts.batch
        );
    }
    if !(opts.lr.is_finite() && opts.lr > 0.0) {
        bail!("learning rate {}: expected a positive number", opts.lr);
    }
    let start = Instant::now();
    let mut model = Classifier::new_random(opts.seed, device)?;
    let mut opt = AdamW::new(
        model.params.iter().map(|(_, v)| v.clone()).collect(),
        ParamsAdamW {
            lr: opts.lr,
            ..Default::default()
        },
    )?;
    let per_epoch = train.n.div_ceil(opts.batch);
    let total = per_epoch * opts.epochs;
    let bar = crate::io::progress::Progress::new(
        "train-classifier",
        "step",
        total as u64,
        "{elapsed_precise} [{bar:30}] {pos}/{len} steps, {msg} (eta {eta})",
    );
    let mut order: Vec<usize> = (0..train.n).collect();
    let mut step = 0;
    let mut running = f64::NAN;
    for epoch in 0..opts.epochs {
        let mut rng = ChaCha12Rng::seed_from_u64(opts.seed);
        rng.set_stream(1 + epoch as u64);
        order.sort_unstable();
        order.shuffle(&mut rng);
        for idx in order.chunks(opts.batch) {
            opt.set_learning_rate(cosine_lr(opts.lr, step, total));
            let x = image_batch(train, idx, device)?;
            let y: Vec<u32> = idx.iter().map(|&i| train.labels[i] as u32).collect();
            let y = Tensor::from_vec(y, idx.len(), device)?;
            let loss = candle_nn::loss::cross_entropy(&model.logits(&x)?, &y)?;
            opt.backward_step(&loss)?;
            let l = loss.to_scalar::<f32>()? as f64;
            if !l.is_finite() {
                bail!("the training loss became {l} at step {step} (try a smaller learning rate)");
            }
            running = if running.is_nan() {
                l
            } else {
                0.98 * running + 0.02 * l
            };
            step += 1;
            bar.set_message(format!(
                "epoch {}/{}, loss {running:.4}",
                epoch + 1,
                opts.epochs
            ));
            bar.set_position(step as u64);
        }
    }
    bar.finish();
    let check = model.compute_check()?;
    model.info = ClassifierInfo {
        train_images: train.n,
        steps: step,
        epochs: opts.epochs,
        batch: opts.batch,
        lr: opts.lr,
        seed: opts.seed,
        train_seconds: start.elapsed().as_secs_f64(),
        device: device_name(device),
        check,
        ..model.info
    };
    Ok(model)
}

/// Loads the train split of `dataset` (`mnist`, `fashion-mnist` or a folder of IDX files),
/// trains a classifier, measures its accuracy on the test split, records dataset, accuracy
/// and command (`opts.command`, else this process's command line) and saves it to `out`.
/// Returns the test accuracy.
pub fn train_and_save(
    dataset: &str,
    out: &Path,
    opts: &ClassifierTrainOptions,
    device: &Device,
) -> Result<f64> {
    let train = load_image_set(dataset, Split::Train)?;
    let test = load_image_set(dataset, Split::Test)?;
    let mut model =
        train_classifier(&train, opts, device).with_context(|| format!("training on {dataset}"))?;
    let acc = model.accuracy(&test)?;
    model.info.dataset = dataset.to_string();
    model.info.test_accuracy = acc;
    model.info.command = opts
        .command
        .clone()
        .unwrap_or_else(|| std::env::args().collect::<Vec<_>>().join(" "));
    model.save(out)?;
    Ok(acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::StandardNormal;

    /// Two classes: bright top half (label 0) or bright bottom half (label 1), with noise.
    fn halves(n: usize, seed: u64) -> ImageSet {
        let mut rng = ChaCha12Rng::seed_from_u64(seed);
        let mut images = Vec::with_capacity(n * 784);
        let mut labels = Vec::with_capacity(n);
        for i in 0..n {
            let label = (i % 2) as u8;
            for y in 0..28 {
                let bright = (y < 14) == (label == 0);
                for _ in 0..28 {
                    let e: f64 = StandardNormal.sample(&mut rng);
                    let v = if bright { 170.0 } else { 60.0 } + 40.0 * e;
                    images.push(v.clamp(0.0, 255.0) as u8);
                }
            }
            labels.push(label);
        }
        ImageSet {
            n,
            h: 28,
            w: 28,
            images,
            labels,
        }
    }

    /// The features of `x` as one flat vector.
    fn feature_vec(c: &Classifier, x: &Tensor) -> Vec<f32> {
        c.features(x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30) as f64;
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0.0, f64::max)
            / scale
    }

    #[test]
    fn im2col_convolution_matches_candle_conv2d() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 4, 9, 7), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 4, 3, 3), &dev).unwrap();
        let a: Vec<f32> = conv3x3_same(&x, &w)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = x
            .conv2d(&w, 1, 1, 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a.len(), 3 * 5 * 9 * 7);
        assert!(rel_diff(&a, &b) < 1e-5, "{}", rel_diff(&a, &b));
    }

    #[test]
    fn features_are_deterministic_and_independent_of_the_batch() {
        let dev = Device::Cpu;
        let c = Classifier::new_random(3, &dev).unwrap();
        let set = halves(8, 1);
        let idx: Vec<usize> = (0..8).collect();
        let x = image_batch(&set, &idx, &dev).unwrap();
        let f1 = feature_vec(&c, &x);
        let f2 = feature_vec(&c, &x);
        assert_eq!(f1.len(), 8 * FEATURE_DIM);
        assert!(f1.iter().zip(&f2).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(f1.iter().any(|&v| v > 0.0), "all features are zero");
        for i in [0, 5] {
            let alone = image_batch(&set, &[i], &dev).unwrap();
            let fi = feature_vec(&c, &alone);
            let row = &f1[i * FEATURE_DIM..(i + 1) * FEATURE_DIM];
            assert!(
                rel_diff(&fi, row) < 1e-6,
                "sample {i}: {}",
                rel_diff(&fi, row)
            );
        }
        // a different image gives different features
        assert!(rel_diff(&f1[..FEATURE_DIM], &f1[FEATURE_DIM..2 * FEATURE_DIM]) > 1e-3);
    }

    #[test]
    fn training_on_two_synthetic_classes_reaches_high_accuracy_and_is_deterministic() {
        let dev = Device::Cpu;
        let train = halves(64, 10);
        let test = halves(200, 11);
        let opts = ClassifierTrainOptions {
            epochs: 10,
            batch: 16,
            lr: 1e-3,
            seed: 5,
            command: None,
        };
        let untrained = Classifier::new_random(5, &dev)
            .unwrap()
            .accuracy(&test)
            .unwrap();
        let c = train_classifier(&train, &opts, &dev).unwrap();
        let acc = c.accuracy(&test).unwrap();
        assert!(acc > 0.95, "test accuracy {acc} (untrained {untrained})");
        assert_eq!(c.info.steps, 40);
        c.verify().unwrap();
        // same seed, same weights
        let again = train_classifier(
            &train,
            &ClassifierTrainOptions {
                epochs: 1,
                ..opts.clone()
            },
            &dev,
        )
        .unwrap();
        let twice =
            train_classifier(&train, &ClassifierTrainOptions { epochs: 1, ..opts }, &dev).unwrap();
        assert_eq!(again.info.check, twice.info.check);
    }

    #[test]
    fn save_then_load_gives_identical_features_and_info() {
        let dev = Device::Cpu;
        let mut c = Classifier::new_random(7, &dev).unwrap();
        c.info.dataset = "synthetic".into();
        c.info.test_accuracy = 0.5;
        let dir = tempfile::tempdir().unwrap();
        c.save(dir.path()).unwrap();
        let back = Classifier::load(dir.path(), &dev).unwrap();
        assert_eq!(back.info, c.info);
        back.verify().unwrap();
        let x = image_batch(&halves(4, 2), &[0, 1, 2, 3], &dev).unwrap();
        let (a, b) = (feature_vec(&c, &x), feature_vec(&back, &x));
        assert!(a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()));
        // a classifier with other weights fails the recorded check value
        let other = Classifier::new_random(8, &dev).unwrap();
        let mut swapped = Classifier::load(dir.path(), &dev).unwrap();
        swapped.params = other.params;
        let e = swapped.verify().unwrap_err().to_string();
        assert!(e.contains("check value"), "{e}");
    }

    #[test]
    fn loading_a_folder_with_a_missing_tensor_or_key_names_the_file_and_what_is_missing() {
        let dev = Device::Cpu;
        let c = Classifier::new_random(1, &dev).unwrap();
        let dir = tempfile::tempdir().unwrap();
        c.save(dir.path()).unwrap();
        let w = dir.path().join(WEIGHTS_FILE);
        let mut map = candle_core::safetensors::load(&w, &dev).unwrap();
        map.remove("fc1.bias");
        candle_core::safetensors::save(&map, &w).unwrap();
        let e = format!("{:#}", Classifier::load(dir.path(), &dev).err().unwrap());
        assert!(
            e.contains("model.safetensors") && e.contains("fc1.bias"),
            "{e}"
        );
        map.insert(
            "fc1.bias".into(),
            Tensor::zeros(3, DType::F32, &dev).unwrap(),
        );
        candle_core::safetensors::save(&map, &w).unwrap();
        let e = format!("{:#}", Classifier::load(dir.path(), &dev).err().unwrap());
        assert!(
            e.contains("fc1.bias") && e.contains("[3]") && e.contains("[128]"),
            "{e}"
        );
        let info = dir.path().join(INFO_FILE);
        let text = std::fs::read_to_string(&info).unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v.as_object_mut().unwrap().remove("test_accuracy");
        std::fs::write(&info, v.to_string()).unwrap();
        let e = format!("{:#}", Classifier::load(dir.path(), &dev).err().unwrap());
        assert!(
            e.contains("classifier.json") && e.contains("test_accuracy"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            Classifier::load(&dir.path().join("none"), &dev)
                .err()
                .unwrap()
        );
        assert!(e.contains("none/classifier.json"), "{e}");
    }

    #[test]
    fn images_of_the_wrong_size_are_errors_not_panics() {
        let dev = Device::Cpu;
        let c = Classifier::new_random(1, &dev).unwrap();
        let x = Tensor::zeros((2, 1, 32, 32), DType::F32, &dev).unwrap();
        let e = c.features(&x).unwrap_err().to_string();
        assert!(e.contains("[2, 1, 32, 32]"), "{e}");
        let mut set = halves(2, 0);
        set.h = 14;
        set.w = 56;
        let e = c.accuracy(&set).unwrap_err().to_string();
        assert!(e.contains("14×56"), "{e}");
    }

    fn committed(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("assets")
            .join(name)
    }

    #[test]
    fn committed_classifiers_reproduce_their_recorded_check_values() {
        // needs no data: guards the committed weights and metadata against corruption
        for (name, dataset, min_acc) in [
            ("classifier-mnist", "mnist", 0.98),
            ("classifier-fashion-mnist", "fashion-mnist", 0.88),
        ] {
            let c = Classifier::load(&committed(name), &Device::Cpu).unwrap();
            c.verify().unwrap();
            assert_eq!(c.info.dataset, dataset);
            assert!(
                c.info.test_accuracy >= min_acc,
                "{name}: {}",
                c.info.test_accuracy
            );
        }
    }

    #[test]
    fn committed_mnist_classifier_gives_finite_varied_features_on_mnist() {
        let test = match load_image_set("mnist", Split::Test) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("skipped: MNIST is not here ({e:#})");
                return;
            }
        };
        let c = Classifier::load(&committed("classifier-mnist"), &Device::Cpu).unwrap();
        assert!(c.info.test_accuracy >= 0.98, "{}", c.info.test_accuracy);
        let rows = c.features_of_set(&test, 256).unwrap();
        assert_eq!((rows.len(), rows[0].len()), (256, FEATURE_DIM));
        assert!(rows.iter().flatten().all(|v| v.is_finite()));
        let spread: f64 = (0..FEATURE_DIM)
            .map(|j| {
                let m = rows.iter().map(|r| r[j]).sum::<f64>() / 256.0;
                rows.iter().map(|r| (r[j] - m).powi(2)).sum::<f64>() / 256.0
            })
            .sum();
        assert!(
            spread > 1e-3,
            "features are nearly constant: total variance {spread}"
        );
        // and the digits are told apart
        let sub = ImageSet {
            n: 256,
            images: test.images[..256 * 784].to_vec(),
            labels: test.labels[..256].to_vec(),
            ..test
        };
        assert!(c.accuracy(&sub).unwrap() > 0.95);
    }
}
