//! Quasi-Taylor samplers on the probability-flow ODE (arXiv 2112.13339; DESIGN §4).
//!
//! Under the single point approximation the ODE's solution through `(x_t, t)` is
//! `x(s) = α(s) x̂0 + σ(s) ε̂` (DDIM). The order-K step is its K-th order Taylor polynomial
//! in an expansion variable `v` (t by default):
//!
//! ```text
//! x_s = Σ_{n=0..K} (v_s − v_t)^n / n! · [α⁽ⁿ⁾ x̂0 + σ⁽ⁿ⁾ ε̂]   (derivatives in v, at t)
//!     = A x_t + B ε̂,   A = P_α/α_t,   B = P_σ − A σ_t,
//! ```
//!
//! with `P_f = Σ_{n ≤ K} f_n h^n` the truncated series of f = α, σ. The series come from
//! Taylor-mode arithmetic ([`crate::series`]), so any order and any schedule work; one
//! NFE per step at every order.
//!
//! Expansion variables: `t` (the SDE time), `abar` (`u = ᾱ`: α = √u, σ = √(1−u), binomial
//! series independent of the schedule), `logsnr` (λ: α = (1 + e^{−2λ})^{−1/2},
//! σ = (1 + e^{2λ})^{−1/2}), `state` (the model's own state `c α x̂0 + c σ ε̂`,
//! `c` = [`Schedule::state_scale`], in t: on rectified flow `(1 − ς) x̂0 + ς ε̂`, on VE
//! `x̂0 + t ε̂`; then divided by `c(s)`; on VP it is `t`).
//!
//! On rectified flow with shift 1 (ς = t) the `state` solution is linear in t, so every
//! order K equals DDIM (flow Euler) exactly; with a shift ς(t) is a rational function and
//! the orders differ. At pure noise (α_t = 0, ς = 1) the step is taken in x̂0:
//! `x_s = (P_α(h) x̂0 + P_σ(h) ε̂)/c(s)` (`t` and `state`; ᾱ and λ are singular there).
//!
//! The final step. σ(t) has a branch point at t = 0 (ᾱ = 1), so the Taylor series around
//! t_{N−1} has radius at most t_{N−1}, and the last step to t_min lies on it
//! (Δ/t_{N−1} = 1 − t_min/t_{N−1} ≈ 1): its terms grow like σ^{−(2n−1)} and the orders do not
//! approach DDIM there. [`LastStep::Ddim`] (the default, chosen from the measurements in
//! BENCHMARKS.md) takes that step with the K → ∞ limit (DDIM, same single NFE);
//! [`LastStep::Taylor`] keeps the truncated series.

use std::fmt;
use std::str::FromStr;

use anyhow::Result;

use super::ddim::ddim_coefficients;
use super::{Backend, Ctx, pure_noise, reaches_zero};
use crate::schedule::Schedule;
use crate::series::Series;

/// The variable in which the quasi-Taylor polynomial is expanded.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Expansion {
    T,
    AlphaBar,
    LogSnr,
    /// The model's state in t (VP: same as t).
    State,
}

impl FromStr for Expansion {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "t" => Expansion::T,
            "abar" => Expansion::AlphaBar,
            "logsnr" => Expansion::LogSnr,
            "state" => Expansion::State,
            other => crate::bail_option!(
                (crate::keys::EXPAND, other),
                ": unknown expansion variable; expected t, abar, logsnr or state"
            ),
        })
    }
}

impl fmt::Display for Expansion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expansion::T => "t",
            Expansion::AlphaBar => "abar",
            Expansion::LogSnr => "logsnr",
            Expansion::State => "state",
        })
    }
}

/// How the final step (to t_min, on the convergence radius) is taken.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LastStep {
    /// The K → ∞ limit: a DDIM step (same one NFE).
    Ddim,
    /// The truncated Taylor polynomial, like every other step.
    Taylor,
}

impl fmt::Display for LastStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LastStep::Ddim => "ddim",
            LastStep::Taylor => "taylor",
        })
    }
}

impl FromStr for LastStep {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "ddim" => LastStep::Ddim,
            "taylor" => LastStep::Taylor,
            other => crate::bail_option!(
                (crate::keys::QT_LAST, other),
                ": unknown last step; expected ddim or taylor"
            ),
        })
    }
}

/// The truncated series of a step: α and σ (or the model state's `c α`, `c σ`) in the
/// expansion variable around t, the increment h of that variable from t to s, and the
/// state scales `c_t`, `c_s` (1 unless the expansion is [`Expansion::State`]).
pub struct StepSeries {
    pub alpha: Series,
    pub sigma: Series,
    pub h: f64,
    pub c_t: f64,
    pub c_s: f64,
}

/// Taylor series of α and σ in the expansion variable around t (order K), and the
/// increment h of that variable from t to s.
pub fn expansion_series(
    schedule: &dyn Schedule,
    t: f64,
    s: f64,
    order: usize,
    expand: Expansion,
) -> StepSeries {
    let plain = |alpha, sigma, h| StepSeries {
        alpha,
        sigma,
        h,
        c_t: 1.0,
        c_s: 1.0,
    };
    match expand {
        Expansion::T => plain(
            schedule.alpha_series(t, order),
            schedule.sigma_series(t, order),
            s - t,
        ),
        Expansion::State => {
            let (alpha, sigma) = schedule.state_series(t, order);
            StepSeries {
                alpha,
                sigma,
                h: s - t,
                c_t: schedule.state_scale(t),
                c_s: schedule.state_scale(s),
            }
        }
        Expansion::AlphaBar => {
            let u = Series::variable(schedule.alpha_bar(t), order);
            // 1 − u with its constant term σ_t² computed without cancellation.
            let mut one_minus = -&u;
            one_minus.0[0] = -schedule.log_alpha_bar(t).exp_m1();
            plain(
                u.sqrt(),
                one_minus.sqrt(),
                schedule.alpha_bar(s) - schedule.alpha_bar(t),
            )
        }
        Expansion::LogSnr => {
            let l = Series::variable(schedule.lambda(t), order);
            let alpha = (&(&l * -2.0).exp() + 1.0).powf(-0.5);
            let sigma = (&(&l * 2.0).exp() + 1.0).powf(-0.5);
            plain(alpha, sigma, schedule.lambda(s) - schedule.lambda(t))
        }
    }
}

/// Coefficients `(A, B)` of the order-K quasi-Taylor step `x_s = A x_t + B ε̂`:
/// `A = P_α(h) c_t/(c_s α̃_t)`, `B = P_σ(h)/c_s − A σ_t` (α̃_t = the series' value).
pub fn qt_coefficients(
    schedule: &dyn Schedule,
    t: f64,
    s: f64,
    order: usize,
    expand: Expansion,
) -> (f64, f64) {
    let e = expansion_series(schedule, t, s, order, expand);
    let a = e.alpha.eval(e.h) * e.c_t / (e.c_s * e.alpha.value());
    (a, e.sigma.eval(e.h) / e.c_s - a * e.sigma.value() / e.c_t)
}

/// Coefficients `(K₀, K_ε)` of the same step written in x̂0 and ε̂,
/// `x_s = K₀ x̂0 + K_ε ε̂ = (P_α(h) x̂0 + P_σ(h) ε̂)/c_s`: the form used at pure noise
/// (α_t = 0), where `A` is infinite. Errors for the expansions that are singular there.
pub fn qt_x0_coefficients(
    schedule: &dyn Schedule,
    t: f64,
    s: f64,
    order: usize,
    expand: Expansion,
) -> Result<(f64, f64)> {
    if matches!(expand, Expansion::AlphaBar | Expansion::LogSnr) {
        crate::bail_option!(
            (crate::keys::EXPAND, expand.to_string()),
            format!(
                ": the expansion in {expand} is singular at pure noise (t = {t}, alpha = 0); expand in t or state"
            )
        );
    }
    let e = expansion_series(schedule, t, s, order, expand);
    Ok((e.alpha.eval(e.h) / e.c_s, e.sigma.eval(e.h) / e.c_s))
}

/// Quasi-Taylor sampler of order K: one NFE per step, `x ← A x + B ε̂`.
pub fn sample_qt<B: Backend>(
    ctx: &mut Ctx<B>,
    mut x: B::X,
    ts: &[f64],
    order: usize,
    expand: Expansion,
    last: LastStep,
) -> Result<B::X> {
    let n = ts.len() - 1;
    for i in 0..n {
        let (t, s) = (ts[i], ts[i + 1]);
        ctx.begin_step(i, t, &x)?;
        let d = ctx.denoise(&x, t)?;
        if reaches_zero(ctx.schedule, s) {
            x = d.x0;
            continue;
        }
        if pure_noise(ctx.schedule, t) {
            let (k0, ke) = if i + 1 == n && last == LastStep::Ddim {
                (ctx.schedule.alpha(s), ctx.schedule.sigma(s))
            } else {
                qt_x0_coefficients(ctx.schedule, t, s, order, expand)?
            };
            x = ctx.lc(&[(k0, &d.x0), (ke, &d.eps)])?;
            continue;
        }
        let (a, b) = if i + 1 == n && last == LastStep::Ddim {
            ddim_coefficients(ctx.schedule, t, s)
        } else {
            qt_coefficients(ctx.schedule, t, s, order, expand)
        };
        x = ctx.lc(&[(a, &x), (b, &d.eps)])?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loglog_slope as fit_slope;
    use crate::schedule::{Cosine, VpLinear};

    #[test]
    fn qt_step_matches_design_golden_values() {
        let s = VpLinear::default();
        // (t, s, DDIM, qt-1..4) from DESIGN §4.
        type Golden = (f64, f64, [(f64, f64); 5]);
        let rows: [Golden; 3] = [
            (
                1.0,
                0.9,
                [
                    (2.586356, -1.586445),
                    (2.0, -1.000022),
                    (2.450250, -1.450303),
                    (2.567167, -1.567242),
                    (2.585196, -1.585281),
                ],
            ),
            (
                0.5,
                0.4,
                [
                    (1.572631, -0.612264),
                    (1.502500, -0.523626),
                    (1.579003, -0.614640),
                    (1.575151, -0.614553),
                    (1.572764, -0.612464),
                ],
            ),
            (
                0.2,
                0.001,
                [
                    (1.232377, -0.709836),
                    (1.405960, -0.694545),
                    (1.291347, -0.770133),
                    (1.222517, -0.711509),
                    (1.226822, -0.697799),
                ],
            ),
        ];
        for (t, sn, want) in rows {
            let (a, b) = ddim_coefficients(&s, t, sn);
            assert!(
                (a - want[0].0).abs() < 2e-6 && (b - want[0].1).abs() < 2e-6,
                "ddim {t}: {a} {b}"
            );
            for (k, &(wa, wb)) in want.iter().enumerate().skip(1) {
                let (a, b) = qt_coefficients(&s, t, sn, k, Expansion::T);
                assert!(
                    (a - wa).abs() < 2e-6 && (b - wb).abs() < 2e-6,
                    "qt-{k} {t}: {a} {b}"
                );
            }
        }
    }

    #[test]
    fn qt_order_one_is_euler_on_the_probability_flow_ode() {
        // Euler: x_s = x + (s−t)(−½β x + β/(2σ) ε̂).
        let s = VpLinear::default();
        for &(t, sn) in &[(0.9, 0.8), (0.3, 0.25)] {
            let (a, b) = qt_coefficients(&s, t, sn, 1, Expansion::T);
            let (beta, sig) = (s.beta(t), s.sigma(t));
            assert!((a - (1.0 - 0.5 * beta * (sn - t))).abs() < 1e-13);
            assert!((b - (sn - t) * beta / (2.0 * sig)).abs() < 1e-13);
        }
    }

    /// Distance of the order-K step from DDIM for step size Δ.
    fn ddim_gap(s: &dyn Schedule, t: f64, delta: f64, k: usize, e: Expansion) -> f64 {
        let (a, b) = qt_coefficients(s, t, t - delta, k, e);
        let (da, db) = ddim_coefficients(s, t, t - delta);
        (a - da).abs() + (b - db).abs()
    }

    #[test]
    fn qt_k_step_differs_from_ddim_by_delta_to_the_k_plus_one() {
        let s = VpLinear::default();
        for e in [Expansion::T, Expansion::AlphaBar, Expansion::LogSnr] {
            for k in 1..=5 {
                let deltas = [0.02, 0.01, 0.005, 0.0025];
                let gaps: Vec<f64> = deltas.iter().map(|&d| ddim_gap(&s, 0.5, d, k, e)).collect();
                let slope = fit_slope(&deltas, &gaps);
                assert!(
                    (slope - (k + 1) as f64).abs() < 0.15,
                    "expand {e} qt-{k}: slope {slope} gaps {gaps:?}"
                );
            }
        }
    }

    #[test]
    fn qt_converges_to_ddim_as_the_order_grows() {
        for sched in [&VpLinear::default() as &dyn Schedule, &Cosine::default()] {
            for &(t, sn) in &[(0.9, 0.7), (0.5, 0.4), (0.3, 0.2)] {
                let gaps: Vec<f64> = (1..=12)
                    .map(|k| ddim_gap(sched, t, t - sn, k, Expansion::T))
                    .collect();
                // The series alternates around its branch points, so the decrease is
                // checked two orders apart; the gap must vanish geometrically.
                for k in 0..gaps.len() - 2 {
                    assert!(
                        gaps[k + 2] < gaps[k],
                        "{} {t}->{sn}: {gaps:?}",
                        sched.name()
                    );
                }
                assert!(
                    gaps[11] < 1e-4 * gaps[0],
                    "{} {t}->{sn}: {gaps:?}",
                    sched.name()
                );
            }
        }
    }

    #[test]
    fn qt_in_abar_has_schedule_independent_binomial_coefficients() {
        // In u = ᾱ, α = √u: the series coefficients depend only on u, not on the schedule.
        let (lin, cos) = (VpLinear::default(), Cosine::default());
        let t_lin = 0.4;
        let target = lin.alpha_bar(t_lin);
        // find the cosine time with the same ᾱ
        let t_cos = cos.t_of_lambda(lin.lambda(t_lin)).unwrap();
        assert!((cos.alpha_bar(t_cos) - target).abs() < 1e-12);
        let e1 = expansion_series(&lin, t_lin, 0.3, 6, Expansion::AlphaBar);
        let e2 = expansion_series(&cos, t_cos, 0.3, 6, Expansion::AlphaBar);
        let (a1, s1, a2, s2) = (e1.alpha, e1.sigma, e2.alpha, e2.sigma);
        for n in 0..=6 {
            assert!((a1.0[n] - a2.0[n]).abs() < 1e-9 * (1.0 + a1.0[n].abs()));
            assert!((s1.0[n] - s2.0[n]).abs() < 1e-9 * (1.0 + s1.0[n].abs()));
        }
        // and the first one is d√u/du = 1/(2√u)
        assert!((a1.0[1] - 0.5 / target.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn on_unshifted_flow_every_order_in_the_model_state_equals_ddim() {
        // Under the SPA the flow state is (1 − ς) x̂0 + ς ε̂: linear in ς = t when shift = 1, so
        // its Taylor polynomial of any order K ≥ 1 is exact, and qt-K (expand = state) is DDIM
        // (flow Euler), from pure noise (ς = 1) too.
        let f = crate::schedule::Flow::new(1.0).unwrap();
        for &(t, s) in &[(1.0, 0.8), (0.9, 0.5), (0.3, 0.05), (0.2, 0.0001)] {
            for k in 1..=6 {
                let (k0, ke) = qt_x0_coefficients(&f, t, s, k, Expansion::State).unwrap();
                assert!((k0 - f.alpha(s)).abs() < 1e-14, "K={k} {t}->{s}: {k0}");
                assert!((ke - f.sigma(s)).abs() < 1e-14, "K={k} {t}->{s}: {ke}");
                if t < 1.0 {
                    let (a, b) = qt_coefficients(&f, t, s, k, Expansion::State);
                    let (da, db) = ddim_coefficients(&f, t, s);
                    assert!(
                        (a - da).abs() < 1e-12 * da.abs() && (b - db).abs() < 1e-12,
                        "K={k}"
                    );
                }
            }
        }
    }

    #[test]
    fn on_shifted_flow_the_orders_approach_ddim_and_expanding_the_vp_state_does_not_give_ddim() {
        // With shift 3, ς(t) = 3t/(1 + 2t) is not linear: order K differs from DDIM by
        // O(Δ^{K+1}) and converges to it; in t on the VP state even shift 1 is not DDIM.
        let f = crate::schedule::Flow::new(3.0).unwrap();
        let (t, s) = (0.6, 0.5);
        let ddim = (f.alpha(s), f.sigma(s));
        let gaps: Vec<f64> = (1..=6)
            .map(|k| {
                let (k0, ke) = qt_x0_coefficients(&f, t, s, k, Expansion::State).unwrap();
                (k0 - ddim.0).abs() + (ke - ddim.1).abs()
            })
            .collect();
        assert!(gaps[0] > 1e-3, "{gaps:?}");
        for w in gaps.windows(2) {
            assert!(w[1] < 0.5 * w[0], "{gaps:?}");
        }
        let one = crate::schedule::Flow::new(1.0).unwrap();
        let (k0, _) = qt_x0_coefficients(&one, 0.6, 0.4, 1, Expansion::T).unwrap();
        assert!((k0 - one.alpha(0.4)).abs() > 1e-3);
        // the expansions in ᾱ and λ are singular at pure noise, and say so
        let e = qt_x0_coefficients(&f, 1.0, 0.9, 2, Expansion::LogSnr)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expand") && e.contains("pure noise"), "{e}");
    }

    #[test]
    fn on_vp_schedules_the_state_expansion_is_the_expansion_in_t() {
        let s = VpLinear::default();
        for k in 1..=4 {
            let a = qt_coefficients(&s, 0.7, 0.6, k, Expansion::State);
            let b = qt_coefficients(&s, 0.7, 0.6, k, Expansion::T);
            assert_eq!(a, b);
        }
    }
}
