//! One sampler step's cost next to the cheapest possible pass over the same data.
//!
//! Baseline: a plain fused `out = a·x + b·y` loop over two slices (one read of each input,
//! one write). Ours: a whole sampler step given the model output — the f64 coefficient
//! algebra (Taylor-mode series for qt-3) plus the fused update of `qtaylor::tensor::ops::lincomb`
//! on candle tensors. The ratio ours/baseline is the step's overhead; see BENCHMARKS.md.

use std::hint::black_box;

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use qtaylor::sampling::samplers::Expansion;
use qtaylor::sampling::samplers::ddim::ddim_coefficients;
use qtaylor::sampling::samplers::quasi_ito_taylor::qit2_coefficients;
use qtaylor::sampling::samplers::quasi_taylor::qt_coefficients;
use qtaylor::schedule::VpLinear;
use qtaylor::tensor::ops::lincomb;

fn plain_axpby(a: f32, x: &[f32], b: f32, y: &[f32]) -> Vec<f32> {
    x.iter().zip(y).map(|(x, y)| a * x + b * y).collect()
}

fn bench(c: &mut Criterion) {
    let sched = VpLinear::default();
    // CIFAR-10-sized batch: 256 × 3×32×32, f32.
    let shape = (256, 3 * 32 * 32);
    let x = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    let e = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    let z1 = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    let z2 = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let es: Vec<f32> = e.flatten_all().unwrap().to_vec1().unwrap();
    let (t, s) = (0.5, 0.45);

    let mut g = c.benchmark_group("step_256x3072_f32");
    g.bench_function("baseline_plain_axpby", |bch| {
        bch.iter(|| black_box(plain_axpby(black_box(1.01), &xs, black_box(-0.3), &es)))
    });
    g.bench_function("ddim_step", |bch| {
        bch.iter(|| {
            let (a, b) = ddim_coefficients(&sched, black_box(t), black_box(s));
            black_box(lincomb(&[(a, &x), (b, &e)]).unwrap())
        })
    });
    g.bench_function("qt3_step", |bch| {
        bch.iter(|| {
            let (a, b) = qt_coefficients(&sched, black_box(t), black_box(s), 3, Expansion::T);
            black_box(lincomb(&[(a, &x), (b, &e)]).unwrap())
        })
    });
    g.bench_function("qt8_step", |bch| {
        bch.iter(|| {
            let (a, b) = qt_coefficients(&sched, black_box(t), black_box(s), 8, Expansion::T);
            black_box(lincomb(&[(a, &x), (b, &e)]).unwrap())
        })
    });
    g.bench_function("qit2_step_4_tensors", |bch| {
        bch.iter(|| {
            let k = qit2_coefficients(&sched, black_box(t), black_box(s));
            black_box(lincomb(&[(k.a, &x), (k.b, &e), (k.c1, &z1), (k.c2, &z2)]).unwrap())
        })
    });
    g.finish();

    // The exact-score bench's size: 1024 × 64, f64.
    let x = Tensor::randn(0f64, 1.0, (1024, 64), &Device::Cpu).unwrap();
    let e = Tensor::randn(0f64, 1.0, (1024, 64), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let es: Vec<f64> = e.flatten_all().unwrap().to_vec1().unwrap();
    let mut g = c.benchmark_group("step_1024x64_f64");
    g.bench_function("baseline_plain_axpby", |bch| {
        bch.iter(|| {
            black_box(
                xs.iter()
                    .zip(&es)
                    .map(|(x, y)| 1.01 * x - 0.3 * y)
                    .collect::<Vec<f64>>(),
            )
        })
    });
    g.bench_function("qt3_step", |bch| {
        bch.iter(|| {
            let (a, b) = qt_coefficients(&sched, black_box(t), black_box(s), 3, Expansion::T);
            black_box(lincomb(&[(a, &x), (b, &e)]).unwrap())
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // Plots need system fonts; the numbers are what BENCHMARKS.md records.
    config = Criterion::default().without_plots();
    targets = bench
}
criterion_main!(benches);
