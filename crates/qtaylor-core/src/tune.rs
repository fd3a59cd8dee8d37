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

/// The outcome of [`refine`].
#[derive(Clone, Debug, PartialEq)]
pub struct Refined {
    /// The refined coordinates (same length and fixed entries as the start).
    pub x: Vec<f64>,
    /// The objective there.
    pub cost: f64,
    /// The objective at the start.
    pub start_cost: f64,
    /// Objective evaluations, the start's included.
    pub evals: usize,
}

/// `refine`'s callback after each sweep: `(sweep, x, cost) → stop?`.
pub type SweepEnd<'a> = dyn FnMut(usize, &[f64], f64) -> Result<bool> + 'a;

/// Derivative-free refinement of a grid against the sampler's *global* error: a compass
/// (pattern) search over the free coordinates of a strictly increasing sequence
/// `x_0 < x_1 < … < x_m` (for a time grid: its log-SNR values λ, which increase as t falls).
///
/// The first entry stays fixed. The last one stays fixed unless `last_up_to = Some(b)`, when
/// it may move in `(x_{m−1}, b)`. Each trial moves one free `x_i` a fraction `s` of the way
/// towards a neighbour (or the bound), so every trial grid is strictly increasing. A trial is
/// kept only if it lowers the objective; a sweep over all coordinates that keeps none halves
/// `s` (from 1/2). It stops after `sweeps` sweeps, when `s < min_step`, or when
/// `after_sweep(sweep, x, cost)` (called after every sweep `1, 2, …` with the grid and
/// objective it ended with) returns `true`: the caller's early stop, e.g. on held-out data.
///
/// This is the refinement stage after GITS' dynamic program: the dynamic program minimizes
/// a sum of *local* one-step errors, which charges multistep samplers their history-free
/// first step; here the objective is the full sampler's end-point error (as in LD3, Tong et
/// al. 2025, arXiv 2412.09785, which optimizes it by gradients; compass search needs only
/// evaluations, Kolda, Lewis and Torczon 2003, SIAM Review 45(3)). The objective never
/// rises: the result is at least as good as the start.
pub fn refine(
    start: &[f64],
    last_up_to: Option<f64>,
    sweeps: usize,
    min_step: f64,
    objective: &mut dyn FnMut(&[f64]) -> Result<f64>,
    after_sweep: &mut SweepEnd,
) -> Result<Refined> {
    let m = start.len();
    if m < 2 {
        bail!("refine: a grid needs at least 2 coordinates, got {m}");
    }
    if !start.windows(2).all(|w| w[0] < w[1]) || start.iter().any(|v| !v.is_finite()) {
        bail!("refine: the start {start:?} is not finite and strictly increasing");
    }
    if let Some(b) = last_up_to
        && (b.is_nan() || b <= start[m - 1])
    {
        bail!(
            "refine: the bound {b} of the last coordinate must exceed it ({})",
            start[m - 1]
        );
    }
    if !(min_step > 0.0 && min_step < 1.0) {
        bail!("refine: min_step {min_step}: expected a fraction in (0, 1)");
    }
    let mut x = start.to_vec();
    let start_cost = objective(&x)?;
    let mut cost = start_cost;
    let mut evals = 1;
    let free: Vec<usize> = (1..m)
        .filter(|&i| i + 1 < m || last_up_to.is_some())
        .collect();
    let mut s = 0.5;
    for sweep in 1..=sweeps {
        if s < min_step || free.is_empty() {
            break;
        }
        let mut kept = false;
        for &i in &free {
            let right = if i + 1 < m {
                x[i + 1]
            } else {
                last_up_to.unwrap_or(x[i])
            };
            for target in [x[i - 1], right] {
                let trial_value = x[i] + s * (target - x[i]);
                if !(trial_value > x[i - 1] && trial_value < right) {
                    continue; // rounding left no room
                }
                let mut trial = x.clone();
                trial[i] = trial_value;
                let c = objective(&trial)?;
                evals += 1;
                if c < cost {
                    x = trial;
                    cost = c;
                    kept = true;
                    break;
                }
            }
        }
        if !kept {
            s *= 0.5;
        }
        if after_sweep(sweep, &x, cost)? {
            break;
        }
    }
    Ok(Refined {
        x,
        cost,
        start_cost,
        evals,
    })
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
    #[test]
    fn refine_finds_the_minimum_of_a_separable_quadratic_and_keeps_the_order() {
        // Minimum at x = (0, 1, 3, 4, 7) with the first fixed at 0 and the last free up to 10.
        let want = [0.0, 1.0, 3.0, 4.0, 7.0];
        let mut f = |x: &[f64]| -> Result<f64> {
            Ok(x.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum())
        };
        let start = [0.0, 2.0, 4.0, 6.0, 8.0];
        let r = refine(&start, Some(10.0), 200, 1e-9, &mut f, &mut |_, _, _| {
            Ok(false)
        })
        .unwrap();
        assert!(r.cost < 1e-6 && r.cost <= r.start_cost, "{r:?}");
        for (a, b) in r.x.iter().zip(want) {
            assert!((a - b).abs() < 1e-3, "{:?}", r.x);
        }
        assert_eq!(r.x[0], 0.0);
        // A fixed last coordinate stays where it is.
        let r = refine(&start, None, 200, 1e-9, &mut f, &mut |_, _, _| Ok(false)).unwrap();
        assert_eq!((r.x[0], r.x[4]), (0.0, 8.0));
        assert!(r.x.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn refine_never_raises_the_objective_and_keeps_every_trial_increasing() {
        // A rugged objective; every trial it sees must be strictly increasing and inside the bound.
        let mut seen_bad = false;
        let mut f = |x: &[f64]| -> Result<f64> {
            if !x.windows(2).all(|w| w[0] < w[1]) || x[x.len() - 1] >= 5.0 {
                seen_bad = true;
            }
            Ok(x.iter()
                .enumerate()
                .map(|(i, v)| (v * 7.3 + i as f64).sin())
                .sum())
        };
        let start = [0.0, 0.5, 1.0, 2.0, 4.0];
        let r = refine(&start, Some(5.0), 30, 1e-4, &mut f, &mut |_, _, _| {
            Ok(false)
        })
        .unwrap();
        assert!(r.cost <= r.start_cost);
        assert!(r.evals > 1);
        assert!(!seen_bad);
        // Bad starts are refused.
        let mut g = |_: &[f64]| -> Result<f64> { Ok(0.0) };
        assert!(refine(&[0.0, 0.0], None, 3, 0.01, &mut g, &mut |_, _, _| Ok(false)).is_err());
        assert!(
            refine(&[0.0, 1.0], Some(0.5), 3, 0.01, &mut g, &mut |_, _, _| Ok(
                false
            ))
            .is_err()
        );
    }

    #[test]
    fn refine_stops_when_the_sweep_callback_says_so_and_reports_each_sweep() {
        let want = [0.0, 1.0, 3.0, 4.0, 7.0];
        let mut f = |x: &[f64]| -> Result<f64> {
            Ok(x.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum())
        };
        let start = [0.0, 2.0, 4.0, 6.0, 8.0];
        let mut seen = Vec::new();
        let mut stop = |sweep: usize, x: &[f64], c: f64| -> Result<bool> {
            seen.push((sweep, x.to_vec(), c));
            Ok(sweep == 2)
        };
        let r = refine(&start, Some(10.0), 200, 1e-9, &mut f, &mut stop).unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!((seen[0].0, seen[1].0), (1, 2));
        // The result is the grid the last reported sweep ended with, and costs fall.
        assert_eq!((seen[1].1.clone(), seen[1].2), (r.x.clone(), r.cost));
        assert!(seen[1].2 <= seen[0].2 && seen[0].2 < r.start_cost);
        // Running on to the end goes further.
        let full = refine(&start, Some(10.0), 200, 1e-9, &mut f, &mut |_, _, _| {
            Ok(false)
        })
        .unwrap();
        assert!(full.cost < r.cost);
    }
}
