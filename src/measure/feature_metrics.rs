//! Sample-quality metrics on feature vectors (one row of f64 per image, e.g. the 128-d
//! features of [`crate::models::classifier::Classifier`]), all computed in f64:
//!
//! - [`fid`]: Fréchet distance of Gaussians fitted to two sets (Heusel et al. 2017,
//!   "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium");
//! - [`kid`]: Kernel Inception Distance, the unbiased MMD² with a cubic polynomial kernel
//!   (Bińkowski et al. 2018, "Demystifying MMD GANs");
//! - [`precision_recall`]: improved precision and recall from k-NN balls (Kynkäänniemi et
//!   al. 2019, "Improved Precision and Recall Metric for Assessing Generative Models").
//!
//! Inputs are checked: empty sets, too few rows, ragged rows, mismatched dimensions and
//! non-finite values are errors that say which set and row is wrong. Results do not depend
//! on the number of rayon threads.

use anyhow::{Result, bail};
use nalgebra::{DMatrix, DVector, SymmetricEigen};
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use rayon::prelude::*;

/// Checks that `rows` holds at least `min_rows` finite rows of one dimension and returns it.
fn check_set(name: &str, rows: &[Vec<f64>], min_rows: usize, what: &str) -> Result<usize> {
    if rows.is_empty() {
        bail!("{what}: set {name} is empty, expected at least {min_rows} rows");
    }
    if rows.len() < min_rows {
        bail!(
            "{what}: set {name} has {} row(s), expected at least {min_rows}",
            rows.len()
        );
    }
    let d = rows[0].len();
    if d == 0 {
        bail!("{what}: set {name} has rows of dimension 0");
    }
    for (i, r) in rows.iter().enumerate() {
        if r.len() != d {
            bail!(
                "{what}: row {i} of set {name} has {} values, expected {d} like row 0",
                r.len()
            );
        }
        if let Some(j) = r.iter().position(|v| !v.is_finite()) {
            bail!(
                "{what}: row {i} of set {name} has a non-finite value {} at index {j}",
                r[j]
            );
        }
    }
    Ok(d)
}

/// Checks both sets and that their dimensions agree; returns the dimension.
fn check_pair(
    a: &[Vec<f64>],
    b: &[Vec<f64>],
    names: (&str, &str),
    min_rows: usize,
    what: &str,
) -> Result<usize> {
    let da = check_set(names.0, a, min_rows, what)?;
    let db = check_set(names.1, b, min_rows, what)?;
    if da != db {
        bail!(
            "{what}: set {} has rows of dimension {da}, set {} of dimension {db}; expected equal dimensions",
            names.0,
            names.1
        );
    }
    Ok(da)
}

/// The mean and covariance of a Gaussian fitted to a set of feature vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct GaussianMoments {
    /// Dimension d.
    pub dim: usize,
    /// Mean μ (d values).
    pub mean: Vec<f64>,
    /// Covariance Σ, d × d row-major.
    pub cov: Vec<f64>,
}

/// Sample mean `μ = (1/n) Σ xᵢ` and unbiased covariance `Σ = (1/(n−1)) Σ (xᵢ−μ)(xᵢ−μ)ᵀ` of
/// a set of at least 2 rows.
pub fn gaussian_moments(rows: &[Vec<f64>]) -> Result<GaussianMoments> {
    let d = check_set("a", rows, 2, "Gaussian moments")?;
    let n = rows.len();
    let mut mean = vec![0.0; d];
    for r in rows {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += v;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let centred = DMatrix::from_fn(n, d, |i, j| rows[i][j] - mean[j]);
    let cov = centred.transpose() * &centred / (n as f64 - 1.0);
    // row-major; the matrix is symmetric, but keep the layout explicit
    let cov = (0..d * d).map(|k| cov[(k / d, k % d)]).collect();
    Ok(GaussianMoments { dim: d, mean, cov })
}

fn check_moments(name: &str, m: &GaussianMoments) -> Result<()> {
    if m.dim == 0 || m.mean.len() != m.dim || m.cov.len() != m.dim * m.dim {
        bail!(
            "FID: moments {name} have dim {}, {} mean values and {} covariance values; expected d ≥ 1, d and d²",
            m.dim,
            m.mean.len(),
            m.cov.len()
        );
    }
    if m.mean.iter().chain(&m.cov).any(|v| !v.is_finite()) {
        bail!("FID: moments {name} hold a non-finite value");
    }
    Ok(())
}

/// Symmetric part `(M + Mᵀ)/2` of a square matrix, so that rounding asymmetry never
/// reaches the symmetric eigensolver.
fn symmetrize(m: &DMatrix<f64>) -> DMatrix<f64> {
    (m + m.transpose()) * 0.5
}

/// Eigenvalues and eigenvectors (columns) of a symmetric positive semi-definite matrix, with
/// tiny negative eigenvalues (rounding) clamped to 0.
///
/// nalgebra's symmetric QR iteration returns NaN or ∞ on some covariance matrices
/// (dimforge/nalgebra#379, open). It happened here on the 128-d features of 10 000 MNIST
/// samples, and the NaN was reported as FID 0. Then the singular value decomposition is used
/// instead: a symmetric PSD matrix is M = U Σ Uᵀ, so its singular values are its eigenvalues
/// and U holds the eigenvectors.
fn psd_eigen(m: &DMatrix<f64>) -> (DVector<f64>, DMatrix<f64>) {
    let s = symmetrize(m);
    let e = SymmetricEigen::new(s.clone());
    let finite = e
        .eigenvalues
        .iter()
        .chain(e.eigenvectors.iter())
        .all(|v| v.is_finite());
    let (mut values, vectors) = if finite {
        (e.eigenvalues, e.eigenvectors)
    } else {
        psd_eigen_by_svd(&s)
    };
    // Not `l.max(0.0)`, which would turn a NaN into 0.
    values
        .iter_mut()
        .filter(|l| **l < 0.0)
        .for_each(|l| *l = 0.0);
    (values, vectors)
}

/// [`psd_eigen`]'s fallback: the SVD of a symmetric PSD matrix (unordered, at most 10 000
/// iterations). A matrix with a non-finite entry, or an SVD that does not converge, gives NaN
/// eigenvalues, which [`fid_from_moments`] reports as an error.
fn psd_eigen_by_svd(s: &DMatrix<f64>) -> (DVector<f64>, DMatrix<f64>) {
    let nan = || (DVector::from_element(s.nrows(), f64::NAN), s.clone());
    if !s.iter().all(|v| v.is_finite()) {
        return nan();
    }
    match nalgebra::SVD::try_new_unordered(s.clone(), true, false, f64::EPSILON, 10_000) {
        Some(svd) => match svd.u {
            Some(u) => (svd.singular_values, u),
            None => nan(),
        },
        None => nan(),
    }
}

/// Fréchet distance between N(μa, Σa) and N(μb, Σb) (Heusel et al. 2017, Eq. 6; Dowson &
/// Landau 1982):
///
/// `d² = |μa − μb|² + tr(Σa + Σb − 2 (Σa^{1/2} Σb Σa^{1/2})^{1/2})`.
///
/// `(Σa Σb)^{1/2}` of the usual statement has the same trace as the symmetric
/// `(Σa^{1/2} Σb Σa^{1/2})^{1/2}` used here; both square roots come from symmetric
/// eigendecompositions (`S^{1/2} = V diag(√λ) Vᵀ`) with tiny negative eigenvalues clamped to
/// 0, so the result is real. A result below 0 (rounding of identical moments) is returned
/// as 0.
pub fn fid_from_moments(a: &GaussianMoments, b: &GaussianMoments) -> Result<f64> {
    check_moments("a", a)?;
    check_moments("b", b)?;
    if a.dim != b.dim {
        bail!(
            "FID: moments a have dimension {}, moments b {}; expected equal dimensions",
            a.dim,
            b.dim
        );
    }
    let d = a.dim;
    let sa = DMatrix::from_row_slice(d, d, &a.cov);
    let sb = DMatrix::from_row_slice(d, d, &b.cov);
    let (values, vectors) = psd_eigen(&sa);
    let root_a = &vectors * DMatrix::from_diagonal(&values.map(f64::sqrt)) * vectors.transpose();
    let (inner, _) = psd_eigen(&(&root_a * &sb * &root_a));
    let tr_cross: f64 = inner.iter().map(|l| l.sqrt()).sum();
    let mean_term: f64 = a
        .mean
        .iter()
        .zip(&b.mean)
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    let d2 = mean_term + sa.trace() + sb.trace() - 2.0 * tr_cross;
    // `f64::max` would turn a NaN into 0, the best possible score: refuse it instead.
    if !d2.is_finite() {
        bail!(
            "FID: the distance came out {d2} (mean term {mean_term:e}, traces {:e} and {:e}, cross term {tr_cross:e}): the covariances are too large or ill-conditioned for the eigendecomposition",
            sa.trace(),
            sb.trace()
        );
    }
    Ok(d2.max(0.0))
}

/// Fréchet Inception Distance of two feature sets (Heusel et al. 2017): [`fid_from_moments`]
/// of the Gaussians fitted by [`gaussian_moments`] (mean and unbiased covariance, n − 1).
/// Each set needs at least 2 rows; both must have the same dimension.
pub fn fid(a: &[Vec<f64>], b: &[Vec<f64>]) -> Result<f64> {
    check_pair(a, b, ("a", "b"), 2, "FID")?;
    fid_from_moments(&gaussian_moments(a)?, &gaussian_moments(b)?)
}

/// The KID kernel `k(x, y) = (xᵀy / d + 1)³` (Bińkowski et al. 2018, Sect. 4).
fn cubic_kernel(x: &[f64], y: &[f64]) -> f64 {
    let d = x.len() as f64;
    let s: f64 = x.iter().zip(y).map(|(u, v)| u * v).sum();
    (s / d + 1.0).powi(3)
}

/// Unbiased MMD² of two samples X (m rows) and Y (n rows) (Gretton et al. 2012, Eq. 3 /
/// Lemma 6):
/// `Σ_{i≠j} k(xᵢ,xⱼ)/(m(m−1)) + Σ_{i≠j} k(yᵢ,yⱼ)/(n(n−1)) − 2 Σ_{i,j} k(xᵢ,yⱼ)/(mn)`.
fn mmd2_unbiased(x: &[&[f64]], y: &[&[f64]]) -> f64 {
    let within = |s: &[&[f64]]| {
        let m = s.len() as f64;
        let mut t = 0.0;
        for i in 0..s.len() {
            for j in i + 1..s.len() {
                t += cubic_kernel(s[i], s[j]);
            }
        }
        2.0 * t / (m * (m - 1.0))
    };
    let mut cross = 0.0;
    for u in x {
        for v in y {
            cross += cubic_kernel(u, v);
        }
    }
    within(x) + within(y) - 2.0 * cross / (x.len() * y.len()) as f64
}

/// Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD² with the cubic
/// polynomial kernel `k(x, y) = (xᵀy/d + 1)³`, computed on `subsets` pairs of random subsets
/// of `subset_size` rows drawn without replacement from each set, and returned as (mean,
/// standard deviation over the subsets, dividing by `subsets`).
///
/// `subset_size` is clamped to `min(len a, len b)` (so asking for 1000 on sets of 500 uses
/// 500 rows of each); after clamping it must be at least 2. Subset `s` draws its rows from
/// its own ChaCha stream `(seed, s)`, so the result depends only on the inputs and the seed,
/// not on the thread count. The estimate is unbiased, so it can be slightly negative when
/// the two distributions are equal.
pub fn kid(
    a: &[Vec<f64>],
    b: &[Vec<f64>],
    subsets: usize,
    subset_size: usize,
    seed: u64,
) -> Result<(f64, f64)> {
    check_pair(a, b, ("a", "b"), 2, "KID")?;
    if subsets == 0 {
        bail!("KID: subsets = 0, expected at least 1");
    }
    let m = subset_size.min(a.len()).min(b.len());
    if m < 2 {
        bail!(
            "KID: subset_size = {subset_size} (clamped to {m} by the set sizes {} and {}), expected at least 2",
            a.len(),
            b.len()
        );
    }
    let values: Vec<f64> = (0..subsets)
        .into_par_iter()
        .map(|s| {
            let mut rng = ChaCha12Rng::seed_from_u64(seed);
            rng.set_stream(s as u64);
            fn pick<'s>(set: &'s [Vec<f64>], m: usize, rng: &mut ChaCha12Rng) -> Vec<&'s [f64]> {
                rand::seq::index::sample(rng, set.len(), m)
                    .into_iter()
                    .map(|i| set[i].as_slice())
                    .collect()
            }
            let x = pick(a, m, &mut rng);
            let y = pick(b, m, &mut rng);
            mmd2_unbiased(&x, &y)
        })
        .collect();
    let mean = values.iter().sum::<f64>() / subsets as f64;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / subsets as f64;
    Ok((mean, var.sqrt()))
}

/// The unbiased MMD² with KID's cubic kernel over the whole of both sets (no subsets, so
/// no randomness): what [`kid`] averages over its subsets. Each set needs at least 2 rows.
pub fn mmd2_cubic(a: &[Vec<f64>], b: &[Vec<f64>]) -> Result<f64> {
    check_pair(a, b, ("a", "b"), 2, "MMD")?;
    let x: Vec<&[f64]> = a.iter().map(Vec::as_slice).collect();
    let y: Vec<&[f64]> = b.iter().map(Vec::as_slice).collect();
    Ok(mmd2_unbiased(&x, &y))
}

fn dist2(x: &[f64], y: &[f64]) -> f64 {
    x.iter().zip(y).map(|(u, v)| (u - v) * (u - v)).sum()
}

/// Squared distance from each row to its k-th nearest neighbour among the other rows of the
/// same set (the point itself, by index, is excluded; duplicates of it are not).
fn knn_radii2(set: &[Vec<f64>], k: usize) -> Vec<f64> {
    set.par_iter()
        .enumerate()
        .map(|(i, x)| {
            // the k smallest distances so far, ascending
            let mut best: Vec<f64> = Vec::with_capacity(k + 1);
            for (j, y) in set.iter().enumerate() {
                if i == j {
                    continue;
                }
                let d = dist2(x, y);
                if best.len() == k && d >= best[k - 1] {
                    continue;
                }
                let pos = best.partition_point(|&b| b <= d);
                best.insert(pos, d);
                best.truncate(k);
            }
            best[k - 1]
        })
        .collect()
}

/// Fraction of `queries` that fall inside at least one ball `|q − cᵢ|² ≤ rᵢ²` around the
/// `centres`.
fn coverage(queries: &[Vec<f64>], centres: &[Vec<f64>], radii2: &[f64]) -> f64 {
    let inside = queries
        .par_iter()
        .filter(|q| centres.iter().zip(radii2).any(|(c, &r2)| dist2(q, c) <= r2))
        .count();
    inside as f64 / queries.len() as f64
}

/// Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 1–2). Each point gets the
/// ball of radius = distance to its k-th nearest neighbour within its own set (itself
/// excluded); the manifold of a set is the union of its balls.
///
/// - precision = fraction of `fake` points inside the manifold of `real`;
/// - recall = fraction of `real` points inside the manifold of `fake`.
///
/// Brute force (O(n² d)), exact Euclidean distances, parallel over points with rayon; the
/// result does not depend on the thread count. Each set needs more than `k` rows, k ≥ 1
/// (the paper uses k = 3).
pub fn precision_recall(real: &[Vec<f64>], fake: &[Vec<f64>], k: usize) -> Result<(f64, f64)> {
    if k == 0 {
        bail!("precision/recall: k = 0, expected k ≥ 1 nearest neighbours");
    }
    check_pair(real, fake, ("real", "fake"), k + 1, "precision/recall")?;
    let r_real = knn_radii2(real, k);
    let r_fake = knn_radii2(fake, k);
    Ok((coverage(fake, real, &r_real), coverage(real, fake, &r_fake)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, StandardNormal};

    fn normal_set(n: usize, d: usize, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = ChaCha12Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| (0..d).map(|_| StandardNormal.sample(&mut rng)).collect())
            .collect()
    }

    fn map_set(s: &[Vec<f64>], f: impl Fn(usize, f64) -> f64) -> Vec<Vec<f64>> {
        s.iter()
            .map(|r| r.iter().enumerate().map(|(j, &v)| f(j, v)).collect())
            .collect()
    }

    fn diag_moments(mean: &[f64], var: &[f64]) -> GaussianMoments {
        let d = mean.len();
        let mut cov = vec![0.0; d * d];
        for i in 0..d {
            cov[i * d + i] = var[i];
        }
        GaussianMoments {
            dim: d,
            mean: mean.to_vec(),
            cov,
        }
    }

    /// Closed form for commuting covariances with eigenvalues σ1, σ2 in a shared basis:
    /// |μ1 − μ2|² + Σ (√σ1 − √σ2)².
    fn closed_form(m1: &[f64], v1: &[f64], m2: &[f64], v2: &[f64]) -> f64 {
        let mean: f64 = m1.iter().zip(m2).map(|(a, b)| (a - b) * (a - b)).sum();
        let cov: f64 = v1
            .iter()
            .zip(v2)
            .map(|(a, b)| (a.sqrt() - b.sqrt()).powi(2))
            .sum();
        mean + cov
    }

    /// A random orthogonal matrix (Gram–Schmidt of Gaussian columns), row-major.
    fn random_rotation(d: usize, seed: u64) -> DMatrix<f64> {
        let g = DMatrix::from_row_slice(d, d, &normal_set(d, d, seed).concat());
        g.qr().q()
    }

    fn rotated(m: &GaussianMoments, q: &DMatrix<f64>) -> GaussianMoments {
        let d = m.dim;
        let c = q * DMatrix::from_row_slice(d, d, &m.cov) * q.transpose();
        let mu = q * nalgebra::DVector::from_column_slice(&m.mean);
        GaussianMoments {
            dim: d,
            mean: mu.iter().copied().collect(),
            cov: (0..d * d).map(|k| c[(k / d, k % d)]).collect(),
        }
    }

    #[test]
    fn fid_of_a_set_against_itself_is_zero_relative_to_its_scale() {
        // scale ~ 1e3 per coordinate, correlated coordinates
        let base = normal_set(400, 12, 1);
        let a = map_set(&base, |j, v| 1e3 * (v + 0.5 * j as f64) + 37.0);
        let scale = gaussian_moments(&a)
            .unwrap()
            .cov
            .iter()
            .step_by(13)
            .sum::<f64>();
        let f = fid(&a, &a).unwrap();
        assert!(f.abs() < 1e-9 * scale, "FID {f} vs trace {scale}");
        // and it is not zero for a different sample of the same law
        let b = map_set(&normal_set(400, 12, 2), |j, v| {
            1e3 * (v + 0.5 * j as f64) + 37.0
        });
        assert!(fid(&a, &b).unwrap() > 1e-3 * scale);
    }

    #[test]
    fn fid_uses_the_unbiased_covariance_on_a_hand_computed_example() {
        // a = {0, 2}: μ = 1, s² = 2; b = {1, 3, 5}: μ = 3, s² = 4 (n − 1 denominators).
        // FID = (1 − 3)² + (√2 − √4)² = 4 + 6 − 4√2.
        let a = vec![vec![0.0], vec![2.0]];
        let b = vec![vec![1.0], vec![3.0], vec![5.0]];
        let want = 10.0 - 4.0 * 2f64.sqrt();
        let got = fid(&a, &b).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
    }

    #[test]
    fn fid_from_moments_matches_the_closed_form_for_diagonal_and_commuting_covariances() {
        let m1 = [0.0, 1.0, -2.0, 0.5, 3.0];
        let v1 = [1.0, 4.0, 0.25, 2.0, 9.0];
        let m2 = [1.0, 1.0, 0.0, -0.5, 3.0];
        let v2 = [2.0, 1.0, 0.25, 8.0, 0.01];
        let want = closed_form(&m1, &v1, &m2, &v2);
        let (a, b) = (diag_moments(&m1, &v1), diag_moments(&m2, &v2));
        let got = fid_from_moments(&a, &b).unwrap();
        assert!(
            (got - want).abs() < 1e-10 * want,
            "diagonal: {got} vs {want}"
        );
        // the same pair in a rotated basis: Σi = Q Di Qᵀ commute, FID is rotation invariant
        let q = random_rotation(5, 9);
        let got = fid_from_moments(&rotated(&a, &q), &rotated(&b, &q)).unwrap();
        assert!((got - want).abs() < 1e-9 * want, "rotated: {got} vs {want}");
    }

    #[test]
    fn fid_from_moments_is_symmetric_for_non_commuting_covariances() {
        // Σa diagonal, Σb rotated: they do not commute, and the formula is computed
        // asymmetrically (Σa^{1/2} Σb Σa^{1/2}), yet d(a, b) = d(b, a).
        let a = diag_moments(&[0.0, 0.0, 0.0], &[1.0, 4.0, 0.5]);
        let b = rotated(
            &diag_moments(&[1.0, 0.0, 2.0], &[3.0, 0.2, 1.0]),
            &random_rotation(3, 4),
        );
        let ab = fid_from_moments(&a, &b).unwrap();
        let ba = fid_from_moments(&b, &a).unwrap();
        assert!((ab - ba).abs() < 1e-10 * ab, "{ab} vs {ba}");
        // and differs from the value that ignores the rotation (the closed form of the
        // unrotated pair), so the cross term is really computed
        let naive = closed_form(&a.mean, &[1.0, 4.0, 0.5], &b.mean, &[3.0, 0.2, 1.0]);
        assert!((ab - naive).abs() > 1e-3, "{ab} vs {naive}");
    }

    #[test]
    fn the_svd_fallback_gives_the_symmetric_eigendecomposition_of_a_covariance() {
        let set = normal_set(200, 12, 5);
        let m = gaussian_moments(&set).unwrap();
        let cov = DMatrix::from_row_slice(12, 12, &m.cov);
        let e = SymmetricEigen::new(cov.clone());
        let (mut want, mut got): (Vec<f64>, Vec<f64>) = (
            e.eigenvalues.iter().copied().collect(),
            psd_eigen_by_svd(&cov).0.iter().copied().collect(),
        );
        want.sort_by(f64::total_cmp);
        got.sort_by(f64::total_cmp);
        for (a, b) in want.iter().zip(&got) {
            assert!((a - b).abs() <= 1e-12 * want[11], "{want:?} vs {got:?}");
        }
        let (values, vectors) = psd_eigen_by_svd(&cov);
        let back = &vectors * DMatrix::from_diagonal(&values) * vectors.transpose();
        assert!((back - &cov).abs().max() <= 1e-12 * want[11]);
    }

    #[test]
    fn a_distance_that_is_not_a_number_is_an_error_not_a_perfect_score() {
        // Finite moments whose cross term overflows (1e150 · 1e300 · 1e150 = inf), so the
        // distance is −inf or NaN. It used to be reported as FID 0.
        let huge = diag_moments(&[0.0, 0.0], &[1e300, 1e300]);
        let e = fid_from_moments(&huge, &huge).unwrap_err().to_string();
        assert!(e.contains("FID: the distance came out"), "{e}");
    }

    #[test]
    fn fid_of_large_gaussian_samples_approaches_the_population_value() {
        let (m1, v1) = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]);
        let (m2, v2) = ([1.0, 0.0, -1.0], [4.0, 0.25, 1.0]);
        let want = closed_form(&m1, &v1, &m2, &v2); // 2 + 1 + 0.25 = 3.25
        let a = normal_set(40_000, 3, 11);
        let b = map_set(&normal_set(40_000, 3, 12), |j, v| m2[j] + v2[j].sqrt() * v);
        let got = fid(&a, &b).unwrap();
        assert!((got - want).abs() < 0.05, "{got} vs {want}");
    }

    #[test]
    fn fid_grows_monotonically_with_added_gaussian_noise() {
        let x = normal_set(2000, 8, 21);
        let noise = normal_set(2000, 8, 22);
        let mut last = -1.0;
        for s in [0.0, 0.1, 0.3, 0.6, 1.0, 2.0] {
            let y: Vec<Vec<f64>> = x
                .iter()
                .zip(&noise)
                .map(|(r, e)| r.iter().zip(e).map(|(a, b)| a + s * b).collect())
                .collect();
            let f = fid(&x, &y).unwrap();
            assert!(f > last, "noise {s}: FID {f} not above {last}");
            last = f;
        }
    }

    #[test]
    fn kid_matches_a_hand_computed_unbiased_mmd() {
        // d = 1, k(x, y) = (xy + 1)³; X = {0, 1}, Y = {0, 2}:
        // XX off-diagonal: k(0,1) = 1 → 1; YY: k(0,2) = 1 → 1;
        // XY: 1 + 1 + 1 + 27 = 30 → 2·30/4 = 15; MMD² = 1 + 1 − 15 = −13.
        // With subset_size ≥ 2 every subset is the whole set, so the std is 0.
        let a = vec![vec![0.0], vec![1.0]];
        let b = vec![vec![0.0], vec![2.0]];
        let (m, s) = kid(&a, &b, 3, 100, 0).unwrap();
        assert!((m + 13.0).abs() < 1e-12 && s.abs() < 1e-12, "({m}, {s})");
    }

    #[test]
    fn kid_is_near_zero_for_one_distribution_and_grows_with_a_shift() {
        let a = normal_set(1000, 16, 31);
        let b = normal_set(1000, 16, 32);
        let (same, same_std) = kid(&a, &b, 20, 500, 7).unwrap();
        let mut last = same;
        let mut shifted = Vec::new();
        for shift in [0.1, 0.2, 0.5, 1.0] {
            let c = map_set(&b, |_, v| v + shift);
            let (k, _) = kid(&a, &c, 20, 500, 7).unwrap();
            assert!(k > last, "shift {shift}: KID {k} not above {last}");
            last = k;
            shifted.push(k);
        }
        // the same-distribution value is within noise of 0 and far below a 0.5 shift
        assert!(same.abs() < 0.05 * shifted[2], "{same} vs {}", shifted[2]);
        assert!(same.abs() < 3.0 * same_std + 1e-12, "{same} ± {same_std}");
    }

    #[test]
    fn kid_and_precision_recall_do_not_depend_on_the_thread_count() {
        let a = normal_set(300, 6, 41);
        let b = map_set(&normal_set(300, 6, 42), |_, v| 1.2 * v + 0.1);
        let run = || {
            (
                kid(&a, &b, 8, 100, 3).unwrap(),
                precision_recall(&a, &b, 3).unwrap(),
            )
        };
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(run);
        let four = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap()
            .install(run);
        assert_eq!(one, four);
        // a different seed gives different subsets
        assert_ne!(kid(&a, &b, 8, 100, 4).unwrap(), one.0);
    }

    #[test]
    fn precision_and_recall_are_one_for_identical_sets() {
        let a = normal_set(300, 5, 51);
        assert_eq!(precision_recall(&a, &a, 3).unwrap(), (1.0, 1.0));
    }

    #[test]
    fn precision_drops_when_the_fake_set_moves_away() {
        let real = normal_set(500, 5, 61);
        let fake = normal_set(500, 5, 62);
        let (p_near, r_near) = precision_recall(&real, &fake, 3).unwrap();
        assert!(p_near > 0.8 && r_near > 0.8, "({p_near}, {r_near})");
        let far = map_set(&fake, |_, v| v + 20.0);
        let (p_far, r_far) = precision_recall(&real, &far, 3).unwrap();
        assert_eq!((p_far, r_far), (0.0, 0.0));
        let mid = map_set(&fake, |_, v| v + 1.0);
        let (p_mid, _) = precision_recall(&real, &mid, 3).unwrap();
        assert!(p_mid < p_near && p_mid > p_far, "{p_mid}");
    }

    #[test]
    fn recall_drops_and_precision_stays_high_when_the_fake_set_drops_modes() {
        // real: four well separated clusters; fake: samples of the first cluster only
        let centres = [[0.0, 0.0], [30.0, 0.0], [0.0, 30.0], [30.0, 30.0]];
        let noise = normal_set(800, 2, 71);
        let real: Vec<Vec<f64>> = noise
            .iter()
            .enumerate()
            .map(|(i, e)| vec![centres[i % 4][0] + e[0], centres[i % 4][1] + e[1]])
            .collect();
        let fake = normal_set(400, 2, 72);
        let (p, r) = precision_recall(&real, &fake, 3).unwrap();
        assert!(p > 0.9, "precision {p}");
        assert!(r < 0.3, "recall {r}");
        // the full mixture has both high
        let fake_all: Vec<Vec<f64>> = normal_set(800, 2, 73)
            .iter()
            .enumerate()
            .map(|(i, e)| vec![centres[i % 4][0] + e[0], centres[i % 4][1] + e[1]])
            .collect();
        let (p, r) = precision_recall(&real, &fake_all, 3).unwrap();
        assert!(p > 0.9 && r > 0.9, "({p}, {r})");
    }

    #[test]
    fn mismatched_empty_ragged_or_too_small_inputs_are_errors_naming_the_problem() {
        let a = normal_set(10, 3, 81);
        let b = normal_set(10, 4, 82);
        for e in [
            fid(&a, &b).unwrap_err(),
            kid(&a, &b, 2, 5, 0).unwrap_err(),
            precision_recall(&a, &b, 3).unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(
                e.contains("dimension 3") && e.contains("dimension 4"),
                "{e}"
            );
        }
        let e = fid(&[], &a).unwrap_err().to_string();
        assert!(e.contains("set a is empty"), "{e}");
        let e = fid(&a, &a[..1]).unwrap_err().to_string();
        assert!(e.contains("set b has 1 row"), "{e}");
        let mut ragged = a.clone();
        ragged[4].pop();
        let e = kid(&a, &ragged, 2, 5, 0).unwrap_err().to_string();
        assert!(e.contains("row 4 of set b has 2 values"), "{e}");
        let mut bad = a.clone();
        bad[2][1] = f64::NAN;
        let e = fid(&bad, &a).unwrap_err().to_string();
        assert!(
            e.contains("row 2 of set a") && e.contains("non-finite"),
            "{e}"
        );
        let e = kid(&a, &a, 0, 5, 0).unwrap_err().to_string();
        assert!(e.contains("subsets = 0"), "{e}");
        let e = precision_recall(&a, &a, 10).unwrap_err().to_string();
        assert!(
            e.contains("set real has 10 row(s), expected at least 11"),
            "{e}"
        );
        let e = precision_recall(&a, &a, 0).unwrap_err().to_string();
        assert!(e.contains("k = 0"), "{e}");
        let m = GaussianMoments {
            dim: 3,
            mean: vec![0.0; 3],
            cov: vec![0.0; 8],
        };
        let e = fid_from_moments(&m, &m).unwrap_err().to_string();
        assert!(e.contains("8 covariance values"), "{e}");
    }
}
