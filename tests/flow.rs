//! Rectified flow (SD3, Flux): every sampler on the flow path, checked against the exact
//! solution of a Gaussian, from pure noise (ς = 1) and from below it.
mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::*;
use qtaylor::models::problems::gmm::GmmModel;
use qtaylor::sampling::samplers::{Options, Sampler, all_samplers, sample};
use qtaylor::schedule::{Flow, Schedule};
use qtaylor::tensor::ops::rows_f64;
use qtaylor::tensor::rng::NoiseStreams;

fn flow_run(
    sched: &Arc<dyn Schedule>,
    sampler: Sampler,
    steps: usize,
    t_max: f64,
    t_min: f64,
) -> anyhow::Result<(f64, f64)> {
    let g = gaussian(4);
    let m = GmmModel::new(Arc::new(g.clone()), sched.clone(), &Device::Cpu)?;
    let (x, _) = start(4, 4, 4);
    let ts: Vec<f64> = (0..=steps)
        .map(|i| t_max + (t_min - t_max) * i as f64 / steps as f64)
        .collect();
    let mut noise = NoiseStreams::new(4, 0, 4);
    let _ = noise.normal(&[4], DType::F64, &Device::Cpu)?;
    let truth = gaussian_solution(sched.as_ref(), &g, &rows_f64(&x)?, t_max, t_min);
    let out = sample(
        &m,
        sched.as_ref(),
        sampler,
        &Options::default(),
        &ts,
        x,
        &mut noise,
        None,
    )?;
    Ok((err(&rows_f64(&out.x)?, &truth), out.nfe))
}

fn flow3() -> Arc<dyn Schedule> {
    Arc::new(Flow::new(3.0).unwrap())
}

#[test]
fn every_deterministic_sampler_converges_to_the_exact_flow_of_a_gaussian() {
    // From just below pure noise, every fixed-grid ODE sampler runs on the shifted flow path
    // and its error falls from 10 to 40 steps.
    let sched = flow3();
    for s in all_samplers() {
        if s.is_adaptive() || s.is_stochastic(&Options::default()) {
            continue;
        }
        let (e10, _) = flow_run(&sched, s, 10, 0.999, 1e-3).unwrap();
        let (e40, _) = flow_run(&sched, s, 40, 0.999, 1e-3).unwrap();
        assert!(e10.is_finite() && e40 < 0.7 * e10, "{s}: {e10} -> {e40}");
    }
}

#[test]
fn euler_heun_rk4_have_orders_one_two_four_on_the_flow_path() {
    let sched = flow3();
    for (name, want) in [("euler", 1.0), ("heun", 2.0), ("rk4", 4.0)] {
        let s: Sampler = name.parse().unwrap();
        let steps = [40usize, 80, 160];
        let errs: Vec<f64> = steps
            .iter()
            .map(|&n| flow_run(&sched, s, n, 0.999, 1e-3).unwrap().0)
            .collect();
        let n: Vec<f64> = steps.iter().map(|&n| n as f64).collect();
        let slope = -qtaylor::measure::metrics::loglog_slope(&n, &errs);
        assert!(
            (slope - want).abs() < 0.35,
            "{name}: slope {slope} ({errs:?})"
        );
    }
}

#[test]
fn samplers_that_start_at_pure_noise_run_from_sigma_one_and_the_others_say_why_not() {
    // diffusers' flow pipelines start at ς = 1 (α = 0, λ = −∞).
    let sched = flow3();
    for s in all_samplers() {
        if s.is_adaptive() {
            continue;
        }
        match flow_run(&sched, s, 10, 1.0, 0.0) {
            Ok((e, nfe)) => {
                assert!(s.starts_at_pure_noise(), "{s} ran from pure noise");
                assert!(e.is_finite() && nfe >= 10.0, "{s}: {e}");
                if !s.is_stochastic(&Options::default()) {
                    let (e40, _) = flow_run(&sched, s, 40, 1.0, 0.0).unwrap();
                    assert!(e40 < 0.7 * e, "{s}: {e} -> {e40}");
                }
            }
            Err(e) => {
                let e = e.to_string();
                assert!(!s.starts_at_pure_noise(), "{s}: {e}");
                assert!(
                    e.contains(&format!("sampler={s}"))
                        && e.contains("pure noise")
                        && e.contains("ddim"),
                    "{e}"
                );
            }
        }
    }
}

#[test]
fn the_default_flow_grid_is_fluxs_uniform_to_zero_and_final_last_ends_at_t_min() {
    use qtaylor::config::GridSettings;
    let flow = Flow::new(3.0).unwrap();
    let g = GridSettings {
        steps: Some(4),
        ..GridSettings::default()
    };
    let tg = g.time_grid(&flow, None).unwrap();
    assert!(tg.ends_at_zero());
    // linspace(1, 1/N, N), then 0: diffusers' Flux pipeline, shifted by the schedule
    assert_eq!(
        g.times(&flow, &tg).unwrap(),
        vec![1.0, 0.75, 0.5, 0.25, 0.0]
    );
    let last = GridSettings {
        steps: Some(4),
        final_: Some("last".into()),
        ..GridSettings::default()
    };
    let ts = last
        .times(&flow, &last.time_grid(&flow, None).unwrap())
        .unwrap();
    assert_eq!((ts[0], ts[4], ts.len()), (1.0, 1e-3, 5));
    // a given t_min keeps the last positive level there, then 0
    let tmin = GridSettings {
        steps: Some(4),
        t_min: Some(0.01),
        ..GridSettings::default()
    };
    let ts = tmin
        .times(&flow, &tmin.time_grid(&flow, None).unwrap())
        .unwrap();
    assert_eq!((ts[3], ts[4]), (0.01, 0.0));
}

#[test]
fn the_flow_network_time_is_1000_sigma_and_the_model_state_is_the_flow_state() {
    let f = Flow::new(3.0).unwrap();
    for u in [1.0, 0.6, 0.1] {
        let g = f.flow_sigma(u);
        assert!((f.network_time(u) - 1000.0 * g).abs() < 1e-9);
        // x_flow = (1 − ς) x0 + ς ε = state_scale · (α x0 + σ ε)
        let c = f.state_scale(u);
        assert!((c * f.alpha(u) - (1.0 - g)).abs() < 1e-15 && (c * f.sigma(u) - g).abs() < 1e-15);
    }
}

#[test]
fn the_shipped_flow_model_draws_the_digit_it_is_asked_for() {
    // assets/mnist-flow-unet (trained by `qtaylor train --objective flow`): one sample per
    // class at 10 NFE with guidance 2, read by the shipped MNIST classifier.
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("x.npy");
    let out = run_ok(&[
        "sample",
        "--model",
        "assets/mnist-flow-unet",
        "--sampler",
        "unipc-3",
        "--steps",
        "10",
        "--classes",
        "all",
        "--guidance",
        "2",
        "--batch",
        "20",
        "--out",
        p(&dir.path().join("x.png")),
        "--save-npy",
        p(&npy),
    ]);
    assert!(stderr(&out).contains("NFE"), "{}", stderr(&out));
    let x = Tensor::read_npy(&npy)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_eq!(x.dims(), &[20, 1, 28, 28]);
    let c = qtaylor::models::classifier::Classifier::load(
        std::path::Path::new("assets/classifier-mnist"),
        &Device::Cpu,
    )
    .unwrap();
    let pred: Vec<u32> = c.logits(&x).unwrap().argmax(1).unwrap().to_vec1().unwrap();
    // --classes all: one row per digit, two samples each (sample i asks for i / 2)
    let right = pred
        .iter()
        .enumerate()
        .filter(|(i, p)| **p as usize == i / 2)
        .count();
    assert!(right >= 18, "{right} of 20 drawn as asked: {pred:?}");
}

#[test]
fn from_pure_noise_k_euler_is_ddim_and_k_euler_a_runs() {
    // Euler in ς = σ/α without churn is DDIM (exactly, from ς = ∞ as its limit)
    let sched = flow3();
    let (a, _) = flow_run(&sched, "k-euler".parse().unwrap(), 10, 1.0, 0.0).unwrap();
    let (b, _) = flow_run(&sched, Sampler::Ddim, 10, 1.0, 0.0).unwrap();
    assert!((a - b).abs() < 1e-12 * b, "{a} vs {b}");
    let (e, nfe) = flow_run(&sched, "k-euler-a".parse().unwrap(), 10, 1.0, 0.0).unwrap();
    assert!(e.is_finite() && nfe == 10.0);
}
