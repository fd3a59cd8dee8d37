//! Time-grid tuning by dynamic programming over a fine candidate grid (GITS: Chen et al.
//! 2024, "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML, arXiv
//! 2405.11326, §4 "Geometry-Inspired Time Scheduling").
//!
//! Given candidate times `c_0 > c_1 > … > c_K` and the cost `C[k][l]` of one solver step
//! from `c_k` to `c_l` (the distance between that step's end point, started on a teacher
//! trajectory at `c_k`, and the teacher's state at `c_l`), the best grid of N steps from
//! `c_0` to `c_K` minimizes the summed cost:
//!
//! ```text
//! D[0][0] = 0,   D[j][l] = min_{k < l} D[j−1][k] + C[k][l],   grid = argmin path of D[N][K]
//! ```
//!
//! solved exactly in O(N K²). Only the scalars live here; computing the costs needs the
//! model (the `qtaylor` crate's `tune` module).

use anyhow::{Result, bail};

/// The candidate indices `0 = k_0 < k_1 < … < k_N = K` of the cheapest path of exactly
/// `steps` steps through the upper-triangular cost matrix (`cost[k][l]`, `k < l`; entries
/// that are not finite are forbidden steps). Returns the path and its total cost.
pub fn cheapest_path(cost: &[Vec<f64>], steps: usize) -> Result<(Vec<usize>, f64)> {
    let n = cost.len();
    if n < 2 {
        bail!("a candidate grid needs at least 2 times, got {n}");
    }
    if steps == 0 || steps > n - 1 {
        bail!(
            "{steps} steps cannot be chosen from {} candidate intervals; expected 1 to {}",
            n - 1,
            n - 1
        );
    }
    for (k, row) in cost.iter().enumerate() {
        if row.len() != n {
            bail!("cost row {k} has {} entries; expected {n}", row.len());
        }
    }
    let inf = f64::INFINITY;
    // d[j][l]: cheapest cost to reach l in j steps; from[j][l]: the previous index.
    let mut d = vec![vec![inf; n]; steps + 1];
    let mut from = vec![vec![usize::MAX; n]; steps + 1];
    d[0][0] = 0.0;
    for j in 1..=steps {
        for l in 1..n {
            for k in 0..l {
                let c = cost[k][l];
                if !c.is_finite() || !d[j - 1][k].is_finite() {
                    continue;
                }
                let v = d[j - 1][k] + c;
                if v < d[j][l] {
                    d[j][l] = v;
                    from[j][l] = k;
                }
            }
        }
    }
    let total = d[steps][n - 1];
    if !total.is_finite() {
        bail!("no path of {steps} steps through the candidate grid has a finite cost");
    }
    let mut path = vec![n - 1];
    let mut l = n - 1;
    for j in (1..=steps).rev() {
        l = from[j][l];
        path.push(l);
    }
    path.reverse();
    Ok((path, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// All paths of `steps` steps from 0 to n − 1, by brute force.
    fn brute(cost: &[Vec<f64>], steps: usize) -> f64 {
        fn go(cost: &[Vec<f64>], at: usize, left: usize) -> f64 {
            let n = cost.len();
            if left == 0 {
                return if at == n - 1 { 0.0 } else { f64::INFINITY };
            }
            (at + 1..n)
                .map(|l| cost[at][l] + go(cost, l, left - 1))
                .fold(f64::INFINITY, f64::min)
        }
        go(cost, 0, steps)
    }

    #[test]
    fn cheapest_path_equals_the_brute_force_minimum() {
        // A deterministic pseudo-random cost matrix.
        let n = 9;
        let mut s = 12345u64;
        let mut cost = vec![vec![f64::INFINITY; n]; n];
        for (k, row) in cost.iter_mut().enumerate() {
            for (l, c) in row.iter_mut().enumerate().skip(k + 1) {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                *c = ((s >> 33) as f64 / (1u64 << 31) as f64) * (l - k) as f64;
            }
        }
        for steps in 1..n {
            let (path, total) = cheapest_path(&cost, steps).unwrap();
            assert_eq!(path.len(), steps + 1);
            assert_eq!((path[0], *path.last().unwrap()), (0, n - 1));
            assert!(path.windows(2).all(|w| w[0] < w[1]));
            let sum: f64 = path.windows(2).map(|w| cost[w[0]][w[1]]).sum();
            assert!((sum - total).abs() < 1e-12);
            assert!((total - brute(&cost, steps)).abs() < 1e-12, "{steps}");
        }
    }

    #[test]
    fn impossible_step_counts_are_refused() {
        let cost = vec![vec![1.0; 3]; 3];
        assert!(cheapest_path(&cost, 0).is_err());
        assert!(cheapest_path(&cost, 3).is_err());
        let mut forbid = vec![vec![f64::INFINITY; 3]; 3];
        forbid[0][1] = 1.0;
        let e = cheapest_path(&forbid, 2).unwrap_err().to_string();
        assert!(e.contains("finite"), "{e}");
    }
}
