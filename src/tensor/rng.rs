//! Per-sample random streams. Sample `i` of a run draws all of its noise (the start
//! noise and every stochastic step) from its own ChaCha stream `(seed, i)`, so its result
//! does not depend on the batch it was drawn in, nor on the thread count.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal};

/// One random stream per sample of a batch.
pub struct NoiseStreams {
    rngs: Vec<ChaCha12Rng>,
}

impl NoiseStreams {
    /// Streams for the samples with global indices `first .. first + count`.
    pub fn new(seed: u64, first: usize, count: usize) -> Self {
        let rngs = (first..first + count)
            .map(|i| {
                let mut r = ChaCha12Rng::seed_from_u64(seed);
                r.set_stream(i as u64);
                r
            })
            .collect();
        NoiseStreams { rngs }
    }

    /// Number of samples (rows).
    pub fn len(&self) -> usize {
        self.rngs.len()
    }

    /// True when there are no streams.
    pub fn is_empty(&self) -> bool {
        self.rngs.is_empty()
    }

    /// Standard normal noise of shape `(B, item…)`: row `i` is the next `prod(item)` draws
    /// of stream `i`, drawn in f64 and rounded to `dtype`.
    pub fn normal(&mut self, item: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let per: usize = item.iter().product();
        let mut data = Vec::with_capacity(per * self.rngs.len());
        for r in &mut self.rngs {
            for _ in 0..per {
                let v: f64 = StandardNormal.sample(r);
                data.push(v);
            }
        }
        let mut shape = vec![self.rngs.len()];
        shape.extend_from_slice(item);
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::ops::rows_f64;

    #[test]
    fn a_sample_noise_depends_only_on_seed_and_index() {
        let dev = Device::Cpu;
        let mut all = NoiseStreams::new(7, 0, 5);
        let mut part = NoiseStreams::new(7, 3, 2);
        let a = rows_f64(&all.normal(&[4], DType::F64, &dev).unwrap()).unwrap();
        let b = rows_f64(&part.normal(&[4], DType::F64, &dev).unwrap()).unwrap();
        assert_eq!(a[3], b[0]);
        assert_eq!(a[4], b[1]);
        assert_ne!(a[0], a[1]);
        let other = rows_f64(
            &NoiseStreams::new(8, 0, 1)
                .normal(&[4], DType::F64, &dev)
                .unwrap(),
        )
        .unwrap();
        assert_ne!(other[0], a[0]);
    }
}
