//! Error and sample-quality measures, in f64.

use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal};

pub use qtaylor_core::loglog_slope;

/// Per-sample RMS difference `sqrt(mean_j (a_ij − b_ij)²)`.
pub fn rmse_per_sample(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(u, v)| {
            let s: f64 = u.iter().zip(v).map(|(x, y)| (x - y) * (x - y)).sum();
            (s / u.len() as f64).sqrt()
        })
        .collect()
}

/// Mean of a slice.
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Sliced Wasserstein-2 distance between two equally sized point sets:
/// `SW₂ = sqrt(mean_θ W₂²(θᵀX, θᵀY))` over `n_proj` random unit directions θ (seeded),
/// each one-dimensional W₂ computed exactly by sorting.
pub fn sliced_w2(x: &[Vec<f64>], y: &[Vec<f64>], n_proj: usize, seed: u64) -> f64 {
    assert_eq!(x.len(), y.len(), "sliced W2 needs equally sized sets");
    let d = x[0].len();
    let mut rng = ChaCha12Rng::seed_from_u64(seed);
    let mut total = 0.0;
    for _ in 0..n_proj {
        let mut theta: Vec<f64> = (0..d).map(|_| StandardNormal.sample(&mut rng)).collect();
        let norm = theta.iter().map(|v| v * v).sum::<f64>().sqrt();
        theta.iter_mut().for_each(|v| *v /= norm);
        let project = |s: &[Vec<f64>]| {
            let mut p: Vec<f64> = s
                .iter()
                .map(|r| r.iter().zip(&theta).map(|(a, b)| a * b).sum())
                .collect();
            p.sort_by(f64::total_cmp);
            p
        };
        let (px, py) = (project(x), project(y));
        total += px
            .iter()
            .zip(&py)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            / px.len() as f64;
    }
    (total / n_proj as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loglog_slope_recovers_a_power_law() {
        let x = [1.0, 2.0, 4.0, 8.0];
        let y: Vec<f64> = x.iter().map(|v: &f64| 3.0 * v.powf(-2.5)).collect();
        assert!((loglog_slope(&x, &y) + 2.5).abs() < 1e-12);
    }

    #[test]
    fn sliced_w2_of_a_shift_is_the_projected_shift() {
        // Y = X + c: every projection shifts by θ·c, so SW₂² = mean_θ (θ·c)² ≈ |c|²/d.
        let mut rng = ChaCha12Rng::seed_from_u64(0);
        let x: Vec<Vec<f64>> = (0..500)
            .map(|_| (0..4).map(|_| StandardNormal.sample(&mut rng)).collect())
            .collect();
        let y: Vec<Vec<f64>> = x
            .iter()
            .map(|r| r.iter().map(|v| v + 1.0).collect())
            .collect();
        assert!(sliced_w2(&x, &x, 16, 1) < 1e-12);
        let sw = sliced_w2(&x, &y, 4000, 1);
        assert!((sw - 1.0).abs() < 0.05, "{sw}");
    }
}
