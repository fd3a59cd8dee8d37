//! Properties of the DPM-Solver, DPM-Solver++, UniPC, PNDM, DEIS and EDM families (issue
//! 3): convergence orders as fitted slopes against the exact flow of Gaussian data,
//! one-step identities with DDIM, lower-order starts, history that does not leak between
//! runs, and the final step to σ = 0 of discrete schedules.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device};
use common::*;
use qtaylor::grid::{Final, Grid, Spacing, TimeGrid};
use qtaylor::measure::metrics::loglog_slope;
use qtaylor::models::model::Model;
use qtaylor::sampling::samplers::{Options, Sampler, UniPcVariant, sample};
use qtaylor::schedule::{Schedule, Tabulated, VpLinear};
use qtaylor::tensor::ops::rows_f64;
use qtaylor::tensor::rng::NoiseStreams;

const STEPS: [usize; 3] = [40, 80, 160];

/// Global order of `name` on Gaussian data: t 1 → t_min on `grid`, errors vs the exact flow.
fn order(name: &str, opts: &Options, grid: Grid, t_min: f64) -> (f64, Vec<f64>) {
    let (g, m) = gaussian_model(4);
    let s = VpLinear::default();
    let (x, _) = start(1, 8, 4);
    let want = gaussian_solution(&s, &g, &rows_f64(&x).unwrap(), 1.0, t_min);
    let errs: Vec<f64> = STEPS
        .iter()
        .map(|&n| err(&run(&m, name, opts, grid, n, 1.0, t_min, &x, 1).0, &want))
        .collect();
    let n: Vec<f64> = STEPS.iter().map(|&n| n as f64).collect();
    (-loglog_slope(&n, &errs), errs)
}

fn assert_order(name: &str, opts: &Options, grid: Grid, t_min: f64, want: f64, tol: f64) {
    let (p, e) = order(name, opts, grid, t_min);
    assert!(
        (p - want).abs() < tol,
        "{name} on {grid}: order {p:.2}, want {want} ± {tol}; errors {e:?}"
    );
}

#[test]
fn dpm_solver_k_has_global_order_k() {
    for k in 1..=3 {
        assert_order(
            &format!("dpm-solver-{k}"),
            &Options::default(),
            Grid::LogSnr,
            1e-3,
            k as f64,
            0.2,
        );
    }
}

#[test]
fn dpm_solver_pp_2m_and_2s_have_order_two_and_3m_as_coded_has_order_two() {
    let o = Options::default();
    assert_order("dpmpp-2m", &o, Grid::LogSnr, 1e-3, 2.0, 0.15);
    assert_order("dpmpp-2s", &o, Grid::LogSnr, 1e-3, 2.0, 0.15);
    // The reference code's 3M weights D₂ ≈ h²m''/2 with φ₃ (exact for h²m''): the local
    // error stays O(h³), so the measured global order is 2, not 3 (kept for parity).
    let (p, e) = order("dpmpp-3m", &o, Grid::LogSnr, 1e-3);
    assert!((1.9..2.6).contains(&p), "dpmpp-3m order {p}: {e:?}");
    // ... yet it is more accurate than 2M at every step count measured.
    let (_, e2) = order("dpmpp-2m", &o, Grid::LogSnr, 1e-3);
    assert!(
        e.iter().zip(&e2).all(|(a, b)| a < b),
        "3M {e:?} vs 2M {e2:?}"
    );
}

#[test]
fn unipc_corrector_raises_the_order_by_one() {
    let with = Options::default();
    let without = Options {
        unipc_corrector: false,
        ..Options::default()
    };
    assert_order("unipc-1", &with, Grid::LogSnr, 1e-3, 2.0, 0.15);
    assert_order("unipc-2", &with, Grid::LogSnr, 1e-3, 3.0, 0.2);
    assert_order("unipc-3", &with, Grid::Uniform, 0.1, 4.0, 0.3);
    assert_order("unipc-1", &without, Grid::LogSnr, 1e-3, 1.0, 0.15);
    assert_order("unipc-2", &without, Grid::LogSnr, 1e-3, 2.0, 0.15);
    let bh1 = Options {
        unipc_variant: UniPcVariant::Bh1,
        ..Options::default()
    };
    assert_order("unipc-2", &bh1, Grid::LogSnr, 1e-3, 3.0, 0.25);
}

#[test]
fn deis_tab_k_has_global_order_k() {
    for k in 1..=3 {
        assert_order(
            &format!("deis-{k}"),
            &Options::default(),
            Grid::LogSnr,
            1e-3,
            k as f64,
            0.25,
        );
    }
}

#[test]
fn deis_logrho_k_has_global_order_k() {
    for k in 1..=2 {
        assert_order(
            &format!("deis-logrho-{k}"),
            &Options::default(),
            Grid::LogSnr,
            1e-3,
            k as f64,
            0.25,
        );
    }
    // Order 3 at least: on this Gaussian problem and log-SNR grid the fitted slope is 3.94
    // (errors 5.8e-5, 3.9e-6, 2.5e-7 at 40, 80, 160 steps), its third-order error term is
    // small here; the claim tested is the method's order, ≥ 3.
    let (p, e) = order("deis-logrho-3", &Options::default(), Grid::LogSnr, 1e-3);
    assert!(
        p > 2.75,
        "deis-logrho-3: order {p:.2}, want ≥ 3; errors {e:?}"
    );
}

#[test]
fn dpmpp_singlestep_2_is_second_order() {
    // groups of two grid steps: DPM-Solver++(2S) with the grid's point as its intermediate
    assert_order(
        "dpmpp-singlestep-2",
        &Options::default(),
        Grid::LogSnr,
        1e-3,
        2.0,
        0.2,
    );
}

#[test]
fn pndm_family_is_second_order_on_grids_not_uniform_in_sigma_over_alpha() {
    // Fixed Adams–Bashforth coefficients applied to ε with the DDIM transfer are exact for
    // a step size uniform in ρ = σ/α only; on the usual grids the measured order is 2.
    for name in ["pndm", "plms", "ipndm"] {
        assert_order(name, &Options::default(), Grid::LogSnr, 1e-3, 2.0, 0.15);
        assert_order(name, &Options::default(), Grid::Uniform, 0.1, 2.0, 0.3);
    }
}

#[test]
fn edm_heun_is_second_order() {
    assert_order(
        "edm-heun",
        &Options::default(),
        Grid::LogSnr,
        1e-3,
        2.0,
        0.15,
    );
}

fn runs_equal(a: &str, b: &str, opts_a: &Options, opts_b: &Options, steps: usize, tol: f64) {
    let m = qtaylor::models::problems::gmm::GmmModel::new(
        Arc::new(qtaylor::models::problems::gmm::Gmm::demo(2)),
        linear(),
        &Device::Cpu,
    )
    .unwrap();
    let (x, _) = start(5, 6, 64);
    let (ra, _) = run(&m, a, opts_a, Grid::LogSnr, steps, 1.0, 1e-3, &x, 5);
    let (rb, _) = run(&m, b, opts_b, Grid::LogSnr, steps, 1.0, 1e-3, &x, 5);
    let d = ra
        .iter()
        .flatten()
        .zip(rb.iter().flatten())
        .map(|(u, v)| (u - v).abs())
        .fold(0.0, f64::max);
    assert!(d < tol, "{a} vs {b} ({steps} steps): max difference {d}");
}

#[test]
fn first_order_members_of_every_family_equal_ddim() {
    let o = Options::default();
    let no_corr = Options {
        unipc_corrector: false,
        ..Options::default()
    };
    for name in [
        "dpm-solver-1",
        "deis-1",
        "deis-logrho-1",
        "dpmpp-singlestep-1",
    ] {
        runs_equal(name, "ddim", &o, &o, 12, 1e-10);
    }
    runs_equal("unipc-1", "ddim", &no_corr, &o, 12, 1e-10);
    // One step: every multistep sampler starts at order one.
    for name in ["dpmpp-2m", "dpmpp-3m", "deis-3", "unipc-3", "ipndm", "pndm"] {
        if name == "pndm" {
            continue; // its first step is pseudo-RK4, not a single DDIM step
        }
        runs_equal(name, "ddim", &o, &o, 1, 1e-10);
    }
    // SDE-DPM-Solver++(2M) with η = 0 is 2M.
    let eta0 = Options {
        eta: Some(0.0),
        ..Options::default()
    };
    runs_equal("dpmpp-2m-sde", "dpmpp-2m", &eta0, &o, 10, 1e-10);
    // DPM-Solver-fast with a budget of 1 NFE is one DPM-Solver-1 step; with 3 NFE it is an
    // order-2 step then an order-1 step on the λ-uniform grid, not three DDIM steps.
    runs_equal("dpm-solver-fast", "dpm-solver-1", &o, &o, 1, 1e-10);
}

#[test]
fn multistep_history_does_not_leak_between_runs() {
    let m = qtaylor::models::problems::gmm::GmmModel::new(
        Arc::new(qtaylor::models::problems::gmm::Gmm::demo(2)),
        linear(),
        &Device::Cpu,
    )
    .unwrap();
    let (x1, _) = start(1, 4, 64);
    let (x2, _) = start(2, 4, 64);
    for name in [
        "dpmpp-3m",
        "unipc-3",
        "deis-3",
        "pndm",
        "plms",
        "ipndm",
        "dpmpp-2m-sde",
    ] {
        let fresh = run(
            &m,
            name,
            &Options::default(),
            Grid::LogSnr,
            8,
            1.0,
            1e-3,
            &x2,
            2,
        )
        .0;
        let _ = run(
            &m,
            name,
            &Options::default(),
            Grid::LogSnr,
            8,
            1.0,
            1e-3,
            &x1,
            1,
        )
        .0;
        let again = run(
            &m,
            name,
            &Options::default(),
            Grid::LogSnr,
            8,
            1.0,
            1e-3,
            &x2,
            2,
        )
        .0;
        assert_eq!(fresh, again, "{name}");
    }
}

#[test]
fn adaptive_dpm_solver_error_follows_its_tolerance() {
    let (g, m) = gaussian_model(4);
    let s = VpLinear::default();
    let (x, _) = start(3, 8, 4);
    let want = gaussian_solution(&s, &g, &rows_f64(&x).unwrap(), 1.0, 1e-3);
    for name in ["dpm-solver-12", "dpm-solver-23"] {
        let mut last = (f64::INFINITY, 0.0);
        for tol in [1e-2, 1e-3, 1e-4] {
            let o = Options {
                rtol: Some(tol),
                atol: Some(tol),
                ..Options::default()
            };
            let (got, nfe) = run(&m, name, &o, Grid::Uniform, 1, 1.0, 1e-3, &x, 3);
            let e = err(&got, &want);
            assert!(e < 10.0 * tol, "{name} tol {tol}: error {e}");
            assert!(
                e < last.0 && nfe > last.1,
                "{name}: error {e} / NFE {nfe} vs {last:?}"
            );
            last = (e, nfe);
        }
    }
}

#[test]
fn edm_churn_is_stochastic_and_seeded() {
    let m = qtaylor::models::problems::gmm::GmmModel::new(
        Arc::new(qtaylor::models::problems::gmm::Gmm::demo(2)),
        linear(),
        &Device::Cpu,
    )
    .unwrap();
    let (x, _) = start(1, 4, 64);
    let churn = Options {
        s_churn: 10.0,
        ..Options::default()
    };
    let a = run(&m, "edm-heun", &churn, Grid::LogSnr, 8, 1.0, 1e-3, &x, 1).0;
    let b = run(&m, "edm-heun", &churn, Grid::LogSnr, 8, 1.0, 1e-3, &x, 1).0;
    let c = run(&m, "edm-heun", &churn, Grid::LogSnr, 8, 1.0, 1e-3, &x, 2).0;
    let det = run(
        &m,
        "edm-heun",
        &Options::default(),
        Grid::LogSnr,
        8,
        1.0,
        1e-3,
        &x,
        1,
    )
    .0;
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, det);
}

/// Runs on a discrete schedule with the given grid.
fn discrete_run(
    model: &dyn Model,
    sched: &dyn Schedule,
    name: &str,
    grid: &TimeGrid,
    steps: usize,
) -> (Vec<Vec<f64>>, f64) {
    let ts = grid.times(sched, steps).unwrap();
    let mut noise = NoiseStreams::new(0, 0, 3);
    let x = noise.normal(&[4], DType::F64, &Device::Cpu).unwrap();
    let out = sample(
        model,
        sched,
        name.parse::<Sampler>().unwrap(),
        &Options::default(),
        &ts,
        x,
        &mut noise,
        None,
    )
    .unwrap();
    (rows_f64(&out.x).unwrap(), out.nfe)
}

#[test]
fn a_final_step_to_sigma_zero_returns_the_data_prediction_for_every_sampler() {
    // On single-point data x̂0 is exact everywhere, so every sampler must end on the point.
    let sched: Arc<dyn Schedule> =
        Arc::new(Tabulated::diffusers("linear", 1e-4, 0.02, 1000).unwrap());
    let m = SinglePoint {
        x0: vec![0.8, -0.4, 0.1, 1.2],
        schedule: sched.clone(),
    };
    let grid = TimeGrid::Discrete {
        spacing: Spacing::Trailing,
        offset: 0,
        timesteps: None,
        train_steps: 1000,
        last: Final::Zero,
    };
    let o = Options::default();
    for s in qtaylor::sampling::samplers::all_samplers() {
        let name = s.to_string();
        let (rows, nfe) = discrete_run(&m, sched.as_ref(), &name, &grid, 6);
        for r in &rows {
            for (a, b) in r.iter().zip(&m.x0) {
                assert!((a - b).abs() < 1e-6, "{name}: {a} vs {b}");
            }
        }
        if let Some(want) = s.nfe(6, true, &o) {
            assert_eq!(nfe, want as f64, "{name}");
        }
    }
}

#[test]
fn k_diffusion_heun_and_dpm2_are_second_order_and_lms_fourth() {
    let o = Options::default();
    assert_order("k-heun", &o, Grid::LogSnr, 1e-3, 2.0, 0.15);
    assert_order("k-dpm2", &o, Grid::LogSnr, 1e-3, 2.0, 0.15);
    assert_order("k-euler", &o, Grid::LogSnr, 1e-3, 1.0, 0.15);
    // LMS integrates a Lagrange polynomial of the last K slopes in ς: order K. At 40 to 160
    // steps order 4 is still pre-asymptotic (local slopes 3.5 then 3.7, rising).
    assert_order("k-lms-2", &o, Grid::LogSnr, 1e-3, 2.0, 0.2);
    let (p, e) = order("k-lms", &o, Grid::LogSnr, 1e-3);
    let local: Vec<f64> = e.windows(2).map(|w| (w[0] / w[1]).log2()).collect();
    assert!(
        (3.4..4.4).contains(&p) && local[1] > local[0],
        "k-lms order {p}, local slopes {local:?}: {e:?}"
    );
}

#[test]
fn k_euler_is_ddim_and_the_ancestral_samplers_without_noise_are_their_ode_samplers() {
    let o = Options::default();
    runs_equal("k-euler", "ddim", &o, &o, 12, 1e-10);
    runs_equal("k-lms-1", "ddim", &o, &o, 12, 1e-10);
    let eta0 = Options {
        eta: Some(0.0),
        ..Options::default()
    };
    runs_equal("k-euler-a", "k-euler", &eta0, &o, 12, 1e-10);
    runs_equal("k-dpm2-a", "k-dpm2", &eta0, &o, 12, 1e-10);
    // edm-heun is k-heun on its own Karras grid: with one step both grids are the end points.
    runs_equal("edm-heun", "k-heun", &o, &o, 1, 1e-10);
}

/// (x̃ − x0)/ς at the end of a run from t = 1 to 0.05 on single-point data, per coordinate,
/// and the same at the start.
fn single_point_standardized(name: &str, opts: &Options, steps: usize) -> (Vec<f64>, Vec<f64>) {
    let s = VpLinear::default();
    let m = SinglePoint {
        x0: vec![0.5, -1.0, 0.25, 2.0],
        schedule: linear(),
    };
    let (x, _) = start(11, 4000, 4);
    let (t0, t1) = (1.0, 0.05);
    let (rows, _) = run(&m, name, opts, Grid::LogSnr, steps, t0, t1, &x, 12);
    let std = |rows: &[Vec<f64>], t: f64| -> Vec<f64> {
        let (a, sd) = (s.alpha(t), s.sigma(t));
        rows.iter()
            .flat_map(|r| r.iter().zip(&m.x0).map(move |(v, x0)| (v - a * x0) / sd))
            .collect()
    };
    (std(&rows_f64(&x).unwrap(), t0), std(&rows, t1))
}

#[test]
fn ancestral_steps_keep_the_exact_marginal_and_the_posteriors_correlation_on_single_point_data() {
    // On single-point data the ancestral step from ς to ς' is the VE posterior
    // q(x̃_ς' | x̃_ς, x0) for η = 1: u = (x̃ − x0)/ς stays N(0, 1) at every level, and
    // u_end = Π (ς_down/ς') u_start + independent noise.
    let s = VpLinear::default();
    let steps = 8;
    let ts = Grid::LogSnr.times(&s, steps, 1.0, 0.05).unwrap();
    let sig: Vec<f64> = ts.iter().map(|&t| (-s.lambda(t)).exp()).collect();
    let rho: f64 = sig
        .windows(2)
        .map(|w| qtaylor::sampling::samplers::k_diffusion::ancestral_step(w[0], w[1], 1.0).0 / w[1])
        .product();
    for name in ["k-euler-a", "k-dpm2-a"] {
        let (u0, u1) = single_point_standardized(name, &Options::default(), steps);
        let n = u1.len() as f64;
        let var = u1.iter().map(|v| v * v).sum::<f64>() / n;
        let corr = u0.iter().zip(&u1).map(|(a, b)| a * b).sum::<f64>() / n;
        assert!((var - 1.0).abs() < 0.05, "{name}: variance {var}");
        assert!(
            (corr - rho).abs() < 0.03,
            "{name}: correlation {corr} vs {rho}"
        );
        assert!(rho < 0.5, "the test must tell noise from none: {rho}");
    }
    // Without noise the run is the deterministic flow: correlation 1.
    let eta0 = Options {
        eta: Some(0.0),
        ..Options::default()
    };
    let (u0, u1) = single_point_standardized("k-euler-a", &eta0, steps);
    let d = u0
        .iter()
        .zip(&u1)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(d < 1e-9, "{d}");
}
