//! Convergence orders, exactness and reproducibility of the samplers, measured on problems
//! with known solutions. References are computed in f64.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use qtaylor::grid::Grid;
use qtaylor::measure::metrics::loglog_slope;
use qtaylor::measure::reference::reference_endpoint;
use qtaylor::models::model::{Model, Parameterization};
use qtaylor::sampling::samplers::{LastStep, Options, Sampler, sample};
use qtaylor::schedule::{Schedule, VpLinear};
use qtaylor::tensor::ops::rows_f64;
use qtaylor::tensor::rng::NoiseStreams;

/// An exact end point for given start rows.
type Exact<'a> = dyn Fn(&[Vec<f64>]) -> Vec<Vec<f64>> + 'a;

const STEPS: [usize; 4] = [16, 32, 64, 128];

fn single_point() -> SinglePoint {
    SinglePoint {
        x0: vec![0.8, -0.4, 0.1, 1.2],
        schedule: linear(),
    }
}

/// Global errors of `sampler` vs an exact solution over STEPS on a uniform grid 1 → t_min.
fn global_errors(
    model: &dyn Model,
    sampler: &str,
    opts: &Options,
    t_min: f64,
    exact: &Exact,
) -> Vec<f64> {
    let (x, _) = start(1, 8, 4);
    let want = exact(&rows_f64(&x).unwrap());
    STEPS
        .iter()
        .map(|&n| {
            let (got, _) = run(model, sampler, opts, Grid::Uniform, n, 1.0, t_min, &x, 1);
            err(&got, &want)
        })
        .collect()
}

fn order(errors: &[f64]) -> f64 {
    let n: Vec<f64> = STEPS.iter().map(|&n| n as f64).collect();
    -loglog_slope(&n, errors)
}

#[test]
fn on_single_point_data_qt_k_has_global_order_k_and_ddim_is_exact() {
    let m = single_point();
    let s = VpLinear::default();
    let t_min = 0.1;
    let exact = |x: &[Vec<f64>]| single_point_solution(&s, &m.x0, x, 1.0, t_min);
    // Every step (the last one included) is a Taylor step here.
    let opts = Options {
        qt_last: LastStep::Taylor,
        ..Options::default()
    };
    for k in 1..=4 {
        let e = global_errors(&m, &format!("qt-{k}"), &opts, t_min, &exact);
        let p = order(&e);
        assert!(
            (p - k as f64).abs() < 0.25,
            "qt-{k}: order {p}, errors {e:?}"
        );
    }
    let e = global_errors(&m, "ddim", &opts, t_min, &exact);
    assert!(e.iter().all(|&e| e < 1e-10), "ddim errors {e:?}");
}

#[test]
fn euler_heun_rk4_have_global_orders_one_two_four_on_gaussian_data() {
    let (g, m) = gaussian_model(4);
    let s = VpLinear::default();
    let t_min = 0.1;
    let exact = |x: &[Vec<f64>]| gaussian_solution(&s, &g, x, 1.0, t_min);
    let opts = Options::default();
    for (name, want) in [("euler", 1.0), ("heun", 2.0), ("rk4", 4.0)] {
        let e = global_errors(&m, name, &opts, t_min, &exact);
        let p = order(&e);
        assert!((p - want).abs() < 0.25, "{name}: order {p}, errors {e:?}");
    }
}

#[test]
fn on_gaussian_data_every_qt_order_is_globally_first_order() {
    // DESIGN §4: for data that is not a single point the SPA error dominates.
    let (g, m) = gaussian_model(4);
    let s = VpLinear::default();
    let t_min = 0.1;
    let exact = |x: &[Vec<f64>]| gaussian_solution(&s, &g, x, 1.0, t_min);
    for sampler in ["qt-2", "qt-3", "ddim"] {
        let e = global_errors(&m, sampler, &Options::default(), t_min, &exact);
        let p = order(&e);
        assert!((p - 1.0).abs() < 0.2, "{sampler}: order {p}, errors {e:?}");
    }
}

#[test]
fn rk45_meets_its_tolerance() {
    let (g, m) = gaussian_model(4);
    let s = VpLinear::default();
    let (x, _) = start(2, 16, 4);
    let want = gaussian_solution(&s, &g, &rows_f64(&x).unwrap(), 1.0, 1e-3);
    let mut last = 0.0;
    for tol in [1e-9, 1e-7, 1e-5] {
        let opts = Options {
            rtol: Some(tol),
            atol: Some(tol),
            ..Options::default()
        };
        let (got, nfe) = run(&m, "rk45", &opts, Grid::Uniform, 1, 1.0, 1e-3, &x, 2);
        let worst = got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        // Local error per step ≤ tol (scaled); the global error stays within a small
        // multiple of it and shrinks with the tolerance.
        assert!(
            worst < 10.0 * tol,
            "tol {tol}: max error {worst} (NFE {nfe})"
        );
        assert!(worst > last, "the error must grow with the tolerance");
        last = worst;
    }
}

#[test]
fn reference_solution_matches_the_exact_gaussian_flow_and_checks_itself() {
    let (g, m) = gaussian_model(4);
    let s = VpLinear::default();
    let (x, _) = start(3, 8, 4);
    let r = reference_endpoint(&m, &s, &x, 1.0, 1e-3, 1e-9).unwrap();
    let want = gaussian_solution(&s, &g, &rows_f64(&x).unwrap(), 1.0, 1e-3);
    let worst = rows_f64(&r.x)
        .unwrap()
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-7, "reference error {worst}");
    assert!(
        r.check < 1e-7 && r.check >= worst * 1e-3,
        "self-check {} vs true error {worst}",
        r.check
    );
}

const ALL: [&str; 33] = [
    "qt-1",
    "qt-2",
    "qt-3",
    "qt-5",
    "ddim",
    "ddpm",
    "qit-1",
    "qit-2",
    "qit-inf",
    "euler",
    "heun",
    "rk4",
    "rk45",
    "em",
    "dpm-solver-2",
    "dpm-solver-3",
    "dpm-solver-fast",
    "dpm-solver-12",
    "dpm-solver-23",
    "dpmpp-2m",
    "dpmpp-3m",
    "dpmpp-2s",
    "dpmpp-2m-sde",
    "unipc-2",
    "unipc-3",
    "pndm",
    "plms",
    "ipndm",
    "deis-2",
    "deis-3",
    "deis-logrho-3",
    "dpmpp-singlestep-2",
    "edm-heun",
];

fn demo_model() -> qtaylor::models::problems::gmm::GmmModel {
    let g = qtaylor::models::problems::gmm::Gmm::demo(5);
    qtaylor::models::problems::gmm::GmmModel::new(std::sync::Arc::new(g), linear(), &Device::Cpu)
        .unwrap()
}

fn draw(
    model: &dyn Model,
    sampler: &str,
    seed: u64,
    first: usize,
    b: usize,
    opts: &Options,
) -> Vec<Vec<f64>> {
    let s = VpLinear::default();
    let ts = Grid::LogSnr.times(&s, 6, 1.0, 1e-3).unwrap();
    let mut noise = NoiseStreams::new(seed, first, b);
    let x = noise.normal(&[64], DType::F32, &Device::Cpu).unwrap();
    let out = sample(
        model,
        &s,
        sampler.parse().unwrap(),
        opts,
        &ts,
        x,
        &mut noise,
        None,
    )
    .unwrap();
    rows_f64(&out.x).unwrap()
}

#[test]
fn the_same_seed_gives_the_same_bits_and_another_seed_differs() {
    let m = demo_model();
    let opts = Options {
        eta: Some(0.5),
        ..Options::default()
    };
    for name in ALL {
        let a = draw(&m, name, 11, 0, 4, &opts);
        let b = draw(&m, name, 11, 0, 4, &opts);
        let c = draw(&m, name, 12, 0, 4, &opts);
        assert_eq!(a, b, "{name}");
        assert_ne!(a, c, "{name}");
    }
}

#[test]
fn a_samples_output_does_not_depend_on_the_batch_it_was_drawn_in() {
    let m = demo_model();
    let opts = Options {
        eta: Some(0.5),
        ..Options::default()
    };
    for name in ALL.iter().chain(&["ddim"]) {
        let big = draw(&m, name, 3, 0, 7, &opts);
        let small = draw(&m, name, 3, 2, 3, &opts); // samples 2, 3, 4 alone
        for i in 0..3 {
            assert_eq!(big[i + 2], small[i], "{name}: sample {}", i + 2);
        }
    }
}

/// A model whose output turns NaN below t = 0.5.
struct NanBelowHalf;
impl Model for NanBelowHalf {
    fn parameterization(&self) -> Parameterization {
        Parameterization::Eps
    }
    fn predict(&self, x: &Tensor, t: &[f64]) -> anyhow::Result<Tensor> {
        Ok(if t[0] < 0.5 {
            (x * f64::NAN)?
        } else {
            x.clone()
        })
    }
}

#[test]
fn a_non_finite_model_output_stops_sampling_naming_step_time_and_sampler() {
    let s = VpLinear::default();
    let ts = Grid::Uniform.times(&s, 4, 1.0, 1e-3).unwrap();
    for name in ["qt-3", "heun", "rk45", "qit-2"] {
        let mut noise = NoiseStreams::new(0, 0, 2);
        let x = noise.normal(&[3], DType::F32, &Device::Cpu).unwrap();
        let sampler: Sampler = name.parse().unwrap();
        let e = sample(
            &NanBelowHalf,
            &s,
            sampler,
            &Options::default(),
            &ts,
            x,
            &mut noise,
            None,
        )
        .err()
        .unwrap_or_else(|| panic!("{name} did not stop"))
        .to_string();
        assert!(
            e.contains("NaN or Inf") && e.contains("step") && e.contains("t ") && e.contains(name),
            "{e}"
        );
    }
}

#[test]
fn a_nan_from_a_half_precision_model_still_names_the_step_and_t() {
    // Models run in f16 and bf16 too: the finiteness check reads their output the same way.
    let s = VpLinear::default();
    let ts = Grid::Uniform.times(&s, 4, 1.0, 1e-3).unwrap();
    let first = ts.iter().position(|&t| t < 0.5).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        for name in ["qt-3", "ddim", "dpmpp-2m"] {
            let mut noise = NoiseStreams::new(0, 0, 2);
            let x = noise.normal(&[3], dtype, &Device::Cpu).unwrap();
            let e = sample(
                &NanBelowHalf,
                &s,
                name.parse().unwrap(),
                &Options::default(),
                &ts,
                x,
                &mut noise,
                None,
            )
            .err()
            .unwrap_or_else(|| panic!("{name} in {dtype:?} did not stop"))
            .to_string();
            assert!(
                e.contains("NaN or Inf")
                    && e.contains(&format!("step {first} (t = {})", ts[first])),
                "{dtype:?} {name}: {e}"
            );
        }
    }
}

#[test]
fn deferred_finiteness_checks_report_the_first_non_finite_call() {
    // Fixed-grid samplers read their finiteness checks back once at the end: the error must
    // still name the first call whose output was not finite.
    let s = VpLinear::default();
    let ts = Grid::Uniform.times(&s, 6, 1.0, 1e-3).unwrap();
    let first = ts.iter().position(|&t| t < 0.5).unwrap();
    let mut noise = NoiseStreams::new(0, 0, 2);
    let x = noise.normal(&[3], DType::F32, &Device::Cpu).unwrap();
    let e = sample(
        &NanBelowHalf,
        &s,
        "qt-3".parse().unwrap(),
        &Options::default(),
        &ts,
        x,
        &mut noise,
        None,
    )
    .err()
    .expect("qt-3 did not stop")
    .to_string();
    assert!(
        e.contains(&format!("step {first} (t = {})", ts[first])),
        "{e}"
    );
}

#[test]
fn schedules_other_than_linear_sample_consistently_with_their_reference() {
    // A smoke check of the whole path on the cosine schedule: 50-step rk4 lands on the
    // reference solution.
    let sched: std::sync::Arc<dyn Schedule> =
        std::sync::Arc::new(qtaylor::schedule::Cosine::default());
    let g = gaussian(4);
    let m = qtaylor::models::problems::gmm::GmmModel::new(
        std::sync::Arc::new(g),
        sched.clone(),
        &Device::Cpu,
    )
    .unwrap();
    let (x, mut noise) = start(4, 4, 4);
    let t_max = sched.t_end();
    let r = reference_endpoint(&m, sched.as_ref(), &x, t_max, 1e-3, 1e-9).unwrap();
    let ts = Grid::LogSnr.times(sched.as_ref(), 50, t_max, 1e-3).unwrap();
    let out = sample(
        &m,
        sched.as_ref(),
        Sampler::Rk4,
        &Options::default(),
        &ts,
        x,
        &mut noise,
        None,
    )
    .unwrap();
    let e = err(&rows_f64(&out.x).unwrap(), &rows_f64(&r.x).unwrap());
    assert!(e < 1e-3, "cosine rk4 vs reference: {e}");
}
