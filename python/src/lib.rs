//! `qtaylor._core`: the Python face of the Rust core.
//!
//! Nothing here computes a sampler coefficient. Schedules, grids and samplers are the
//! `qtaylor-core` types; a sampler runs either
//!
//! - whole, driven from Rust, on Python tensors through a [`PyBackend`] (the callbacks of a
//!   `qtaylor.torch` ops object): [`run`], used by `qtaylor.torch.sample`;
//! - or as a recorded [`Program`] that a [`Replay`] advances one network call at a time:
//!   `qtaylor.diffusers.QTaylorScheduler.step`.
//!
//! Every error is a Python `ValueError` (bad input) or `RuntimeError` (a failure while
//! running); a Rust panic is caught at the boundary and raised as `RuntimeError`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use numpy::{IntoPyArray, PyArray1, PyArrayDyn, PyReadonlyArray1, PyReadonlyArrayDyn};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use qtaylor_core::config::{DiscreteDefaults, GivenTimes, GridSettings, SamplerSettings};
use qtaylor_core::exec::{Backend, Coef, Ctx, Parameterization, Tolerance};
use qtaylor_core::grid::{Final, Grid, Spacing, TimeGrid};
use qtaylor_core::keys::{self, Key, Spelling, Value};
use qtaylor_core::program::{Op, Program as CoreProgram};
use qtaylor_core::samplers::quasi_taylor::qt_coefficients;
use qtaylor_core::samplers::{self, Expansion, Options, Sampler};
use qtaylor_core::schedule::{self as sched, Schedule as CoreSchedule, Tabulated};

/// How the Python package spells the library's option keys: the keyword, `qt_last=`, or
/// the keyword with its value as Python writes it, `qt_last='taylor'`, `eta=2`,
/// `lower_order_final=True`.
struct Keywords;

impl Spelling for Keywords {
    fn key(&self, key: Key) -> String {
        format!("{key}=")
    }
    fn set(&self, key: Key, value: &Value) -> String {
        match value {
            Value::Text(v) => format!("{key}='{v}'"),
            Value::Number(v) => format!("{key}={v}"),
            Value::Switch(on) => format!("{key}={}", if *on { "True" } else { "False" }),
        }
    }
}

/// An error's chain as Python shows it, every option key spelled as a keyword.
fn message(e: &anyhow::Error) -> String {
    keys::render(e, &Keywords)
}

fn value_err(e: anyhow::Error) -> PyErr {
    PyValueError::new_err(message(&e))
}

/// Runs `f`, turning a panic into a Python `RuntimeError`.
fn guard<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!(
                "internal error in qtaylor (please report): {msg}"
            )))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Schedules

/// A noise schedule: α(t), σ(t), λ(t) and their derivatives of any order, on t ∈ [0, t_end].
///
/// Discrete (diffusers) schedules put step n at t = (n + 1)/T; their "model time" is the
/// (fractional) diffusers timestep, linear in log σ between the trained steps as diffusers'
/// `_sigma_to_t`. Continuous schedules use t itself.
#[pyclass(module = "qtaylor._core", frozen)]
#[derive(Clone)]
struct Schedule {
    inner: Arc<dyn CoreSchedule>,
    train_steps: Option<usize>,
    /// A discrete schedule's betas, as diffusers holds them (float32 values).
    betas: Option<Arc<Vec<f64>>>,
}

fn vectorize(py: Python<'_>, t: &Bound<'_, PyAny>, f: impl Fn(f64) -> f64) -> PyResult<Py<PyAny>> {
    if let Ok(v) = t.extract::<f64>() {
        return Ok(f(v).into_pyobject(py)?.into_any().unbind());
    }
    let arr: PyReadonlyArrayDyn<f64> = t
        .extract()
        .map_err(|_| PyValueError::new_err("expected a float or a numpy array of float64 times"))?;
    let out = arr.as_array().mapv(f);
    Ok(out.into_pyarray(py).into_any().unbind())
}

impl Schedule {
    fn check_t(&self, t: f64) -> PyResult<()> {
        if !(t.is_finite() && t >= 0.0 && t <= self.inner.t_end()) {
            return Err(PyValueError::new_err(format!(
                "time {t} is outside the domain [0, {}] of schedule {}",
                self.inner.t_end(),
                self.inner.name()
            )));
        }
        Ok(())
    }

    fn model_t(&self, t: f64) -> f64 {
        self.inner.network_time(t)
    }
}

#[pymethods]
impl Schedule {
    /// The continuous linear-β VP schedule (score_sde; DDPM's limit for 0.1 / 20).
    #[staticmethod]
    #[pyo3(signature = (beta_min = 0.1, beta_max = 20.0))]
    fn vp_linear(beta_min: f64, beta_max: f64) -> PyResult<Self> {
        let inner = sched::schedule_by_name("vp-linear", beta_min, beta_max).map_err(value_err)?;
        Ok(Schedule {
            inner: Arc::from(inner),
            train_steps: None,
            betas: None,
        })
    }

    /// The cosine schedule of improved DDPM (t ≤ 0.9946).
    #[staticmethod]
    fn cosine() -> Self {
        Schedule {
            inner: Arc::new(sched::Cosine::default()),
            train_steps: None,
            betas: None,
        }
    }

    /// The continuous limit of Stable Diffusion's scaled-linear schedule.
    #[staticmethod]
    fn scaled_linear() -> Self {
        Schedule {
            inner: Arc::new(sched::ScaledLinear::default()),
            train_steps: None,
            betas: None,
        }
    }

    /// A diffusers discrete schedule: `beta_schedule` linear, scaled_linear or
    /// squaredcos_cap_v2 (betas in float32 as diffusers computes them), or explicit
    /// `trained_betas`.
    #[staticmethod]
    #[pyo3(signature = (beta_schedule = "linear", beta_start = 1e-4, beta_end = 0.02, num_train_timesteps = 1000, trained_betas = None))]
    fn discrete(
        beta_schedule: &str,
        beta_start: f64,
        beta_end: f64,
        num_train_timesteps: usize,
        trained_betas: Option<Vec<f64>>,
    ) -> PyResult<Self> {
        let (t, betas) = match trained_betas {
            Some(b) => {
                if b.len() < 2 {
                    return Err(PyValueError::new_err(format!(
                        "trained_betas has {} entries; expected at least 2",
                        b.len()
                    )));
                }
                let t = Tabulated::from_betas("discrete", &b).map_err(value_err)?;
                let f32s: Vec<f64> = b.iter().map(|&v| v as f32 as f64).collect();
                (t, f32s)
            }
            None => {
                let t =
                    Tabulated::diffusers(beta_schedule, beta_start, beta_end, num_train_timesteps)
                        .map_err(value_err)?;
                let b = sched::diffusers_betas(
                    beta_schedule,
                    beta_start,
                    beta_end,
                    num_train_timesteps,
                )
                .map_err(value_err)?;
                (t, b.iter().map(|&v| v as f64).collect())
            }
        };
        let n = t.len();
        Ok(Schedule {
            inner: Arc::new(t),
            train_steps: Some(n),
            betas: Some(Arc::new(betas)),
        })
    }

    #[getter]
    fn name(&self) -> String {
        self.inner.name()
    }

    /// The largest time of the schedule's domain.
    #[getter]
    fn t_end(&self) -> f64 {
        self.inner.t_end()
    }

    /// T for a discrete schedule, None for a continuous one.
    #[getter]
    fn num_train_timesteps(&self) -> Option<usize> {
        self.train_steps
    }

    /// A discrete schedule's betas β_n, n = 0 … T − 1 (diffusers' `betas`); None otherwise.
    #[getter]
    fn betas(&self) -> Option<Vec<f64>> {
        self.betas.as_ref().map(|b| b.as_ref().clone())
    }

    /// A discrete schedule's ᾱ_n at its trained steps (diffusers' `alphas_cumprod`, the
    /// table the schedule interpolates); None otherwise.
    #[getter]
    fn alphas_cumprod(&self) -> Option<Vec<f64>> {
        let n = self.train_steps?;
        Some(
            (0..n)
                .map(|k| {
                    self.inner
                        .alpha_bar(qtaylor_core::grid::time_of_timestep(k as f64, n))
                })
                .collect(),
        )
    }

    fn alpha(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.inner.alpha(t))
    }
    fn sigma(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.inner.sigma(t))
    }
    fn alpha_bar(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.inner.alpha_bar(t))
    }
    fn log_alpha_bar(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.inner.log_alpha_bar(t))
    }
    /// The log-SNR λ = ln(α/σ).
    fn lambda_(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.inner.lambda(t))
    }
    /// β(t) = −d ln ᾱ/dt.
    fn beta(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.inner.beta(t))
    }

    /// The first `order` derivatives (0th = value) of `quantity` (alpha, sigma, lambda,
    /// beta, log_alpha_bar) at t, from the truncated power series.
    fn derivatives(&self, quantity: &str, t: f64, order: usize) -> PyResult<Vec<f64>> {
        guard(|| {
            self.check_t(t)?;
            if order > 64 {
                return Err(PyValueError::new_err(format!(
                    "order {order}: expected at most 64"
                )));
            }
            let s = match quantity {
                "alpha" => self.inner.alpha_series(t, order),
                "sigma" => self.inner.sigma_series(t, order),
                "lambda" => self.inner.lambda_series(t, order),
                "beta" => self.inner.beta_series(t, order),
                "log_alpha_bar" => self.inner.log_alpha_bar_series(t, order),
                other => {
                    return Err(PyValueError::new_err(format!(
                        "unknown quantity '{other}'; expected one of: alpha, sigma, lambda, beta, log_alpha_bar"
                    )));
                }
            };
            Ok((0..=order).map(|k| s.derivative(k)).collect())
        })
    }

    /// The time at which the log-SNR equals `lam`.
    fn t_of_lambda(&self, lam: f64) -> PyResult<f64> {
        self.inner.t_of_lambda(lam).map_err(value_err)
    }

    /// The network's time argument at t: the (fractional) diffusers timestep (discrete), or t.
    fn model_time(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.model_t(t))
    }

    /// The inverse of `model_time` (fractional diffusers timesteps allowed).
    fn time_of_model_time(&self, py: Python<'_>, n: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        if let Ok(v) = n.extract::<f64>() {
            let t = self.inner.time_of_network_time(v).map_err(value_err)?;
            return Ok(t.into_pyobject(py)?.into_any().unbind());
        }
        let arr: PyReadonlyArrayDyn<f64> = n.extract().map_err(|_| {
            PyValueError::new_err("expected a float or a numpy array of float64 timesteps")
        })?;
        let mut out = arr.as_array().to_owned();
        for v in out.iter_mut() {
            *v = self.inner.time_of_network_time(*v).map_err(value_err)?;
        }
        Ok(out.into_pyarray(py).into_any().unbind())
    }

    fn __repr__(&self) -> String {
        match self.train_steps {
            Some(n) => format!("Schedule(discrete, {n} steps)"),
            None => format!("Schedule({})", self.inner.name()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Grids

/// A continuous grid of `steps + 1` times from `t_max` to `t_min`: uniform, quadratic,
/// logsnr or karras (`rho`); with `to_zero` the last of the `steps` steps goes to t = 0
/// (σ = 0, x̂0), as diffusers' final sigma 0. On a discrete
/// schedule `t_min` defaults to the first trained step 1/T and the times are fractional
/// steps, as diffusers' `use_karras_sigmas`.
#[pyfunction]
#[pyo3(signature = (schedule, steps, grid = "uniform", t_max = None, t_min = None, rho = 7.0, to_zero = false))]
#[allow(clippy::too_many_arguments)]
fn continuous_grid<'py>(
    py: Python<'py>,
    schedule: &Schedule,
    steps: usize,
    grid: &str,
    t_max: Option<f64>,
    t_min: Option<f64>,
    rho: f64,
    to_zero: bool,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    guard(|| {
        let g: Grid = GridSettings::grid_of(grid, Some(rho)).map_err(value_err)?;
        let t_max = t_max.unwrap_or_else(|| schedule.inner.t_end().min(1.0));
        let t_min = t_min.unwrap_or(match schedule.train_steps {
            Some(n) => 1.0 / n as f64,
            None => 1e-3,
        });
        let tg = TimeGrid::Continuous {
            grid: g,
            t_max,
            t_min,
            to_zero,
        };
        let ts = tg
            .times(schedule.inner.as_ref(), steps)
            .map_err(value_err)?;
        Ok(PyArray1::from_vec(py, ts))
    })
}

/// The times of a discrete schedule's grid, diffusers style: `spacing` leading, trailing
/// or linspace with `steps_offset`, or explicit descending `timesteps`; `final` "zero"
/// ends at ᾱ = 1 (x̂0), "last" at the first trained step.
#[pyfunction]
#[pyo3(signature = (schedule, steps = None, spacing = "leading", steps_offset = 0, final_ = "zero", timesteps = None))]
fn discrete_grid<'py>(
    py: Python<'py>,
    schedule: &Schedule,
    steps: Option<usize>,
    spacing: &str,
    steps_offset: usize,
    final_: &str,
    timesteps: Option<Vec<i64>>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    guard(|| {
        let Some(train_steps) = schedule.train_steps else {
            return Err(PyValueError::new_err(
                "discrete_grid needs a discrete schedule (Schedule.discrete); use continuous_grid for continuous ones",
            ));
        };
        let spacing: Spacing = spacing.parse().map_err(value_err)?;
        let last: Final = final_.parse().map_err(value_err)?;
        let explicit = match timesteps {
            Some(list) => {
                qtaylor_core::grid::validate_timesteps(&list, train_steps).map_err(value_err)?;
                if let Some(n) = steps
                    && n != list.len()
                {
                    return Err(PyValueError::new_err(format!(
                        "steps {n} and {} timesteps given; give one of them",
                        list.len()
                    )));
                }
                Some(list.iter().map(|&n| n as usize).collect::<Vec<_>>())
            }
            None => None,
        };
        let n = match (&explicit, steps) {
            (Some(l), _) => l.len(),
            (None, Some(n)) => n,
            (None, None) => return Err(PyValueError::new_err("give steps or timesteps")),
        };
        let g = TimeGrid::Discrete {
            spacing,
            offset: steps_offset,
            timesteps: explicit,
            train_steps,
            last,
        };
        let ts = g.times(schedule.inner.as_ref(), n).map_err(value_err)?;
        Ok(PyArray1::from_vec(py, ts))
    })
}

/// The grid of a run, as the command line makes it (`qtaylor.torch.sample` and
/// `QTaylorScheduler` use it): `steps` on a continuous `grid` (uniform, quadratic, logsnr,
/// karras with `rho`) from `t_max`/`sigma_max` to `t_min`/`sigma_min`, a discrete schedule's
/// `spacing` (leading, trailing, linspace) with `steps_offset` and `final_` (zero or last),
/// explicit descending `timesteps` (fractional ones allowed), diffusers `sigmas` (σ/α, a
/// final 0 for x̂0), or explicit `times`. A setting the grid does not use is an error.
#[pyfunction]
#[pyo3(signature = (schedule, steps = None, *, grid = None, rho = None, t_max = None, t_min = None, sigma_max = None, sigma_min = None, spacing = None, steps_offset = None, final_ = None, timesteps = None, sigmas = None, times = None))]
#[allow(clippy::too_many_arguments)]
fn grid_times<'py>(
    py: Python<'py>,
    schedule: &Schedule,
    steps: Option<usize>,
    grid: Option<String>,
    rho: Option<f64>,
    t_max: Option<f64>,
    t_min: Option<f64>,
    sigma_max: Option<f64>,
    sigma_min: Option<f64>,
    spacing: Option<String>,
    steps_offset: Option<usize>,
    final_: Option<String>,
    timesteps: Option<Vec<f64>>,
    sigmas: Option<Vec<f64>>,
    times: Option<Vec<f64>>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    guard(|| {
        let g = GridSettings {
            steps,
            grid,
            rho,
            t_min,
            t_max,
            sigma_min,
            sigma_max,
            spacing,
            steps_offset,
            final_,
            timesteps,
            sigmas,
            times: times.map(|times| GivenTimes {
                key: keys::TIMES,
                what: "explicit times".into(),
                times,
            }),
        };
        let discrete = schedule.train_steps.map(|n| DiscreteDefaults {
            spacing: "leading".into(),
            offset: 0,
            train_steps: n,
        });
        let s = schedule.inner.as_ref();
        let tg = g.time_grid(s, discrete.as_ref()).map_err(value_err)?;
        let ts = g.times(s, &tg).map_err(value_err)?;
        Ok(PyArray1::from_vec(py, ts))
    })
}

/// Two float64 arrays.
type ArrayPair<'py> = (Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>);

/// `(A, B)` arrays of the order-K quasi-Taylor step `x_s = A x_t + B ε̂` for each pair of
/// times (arXiv 2112.13339); `expand` is the expansion variable t, abar or logsnr.
#[pyfunction]
#[pyo3(signature = (schedule, t, s, order, expand = "t"))]
fn quasi_taylor_coefficients<'py>(
    py: Python<'py>,
    schedule: &Schedule,
    t: PyReadonlyArray1<'py, f64>,
    s: PyReadonlyArray1<'py, f64>,
    order: usize,
    expand: &str,
) -> PyResult<ArrayPair<'py>> {
    guard(|| {
        if order == 0 {
            return Err(PyValueError::new_err(
                "order 0: the quasi-Taylor order must be >= 1",
            ));
        }
        let e: Expansion = expand.parse().map_err(value_err)?;
        let (t, s) = (t.as_slice()?, s.as_slice()?);
        if t.len() != s.len() {
            return Err(PyValueError::new_err(format!(
                "t has {} entries and s {}; expected the same number",
                t.len(),
                s.len()
            )));
        }
        let (mut a, mut b) = (Vec::with_capacity(t.len()), Vec::with_capacity(t.len()));
        for (&ti, &si) in t.iter().zip(s) {
            schedule.check_t(ti)?;
            schedule.check_t(si)?;
            if ti <= 0.0 {
                return Err(PyValueError::new_err(format!(
                    "t = {ti}: the expansion point must have sigma > 0"
                )));
            }
            let (ai, bi) = qt_coefficients(schedule.inner.as_ref(), ti, si, order, e);
            a.push(ai);
            b.push(bi);
        }
        Ok((PyArray1::from_vec(py, a), PyArray1::from_vec(py, b)))
    })
}

// ---------------------------------------------------------------------------------------
// Samplers

/// A sampler with its options: the one configuration type shared with the CLI.
#[pyclass(module = "qtaylor._core", frozen)]
#[derive(Clone)]
struct SamplerSpec {
    sampler: Sampler,
    opts: Options,
}

#[pymethods]
impl SamplerSpec {
    #[new]
    #[pyo3(signature = (name, *, eta = None, expand = "t", qt_last = "ddim", ddpm_variance = "beta-tilde", rtol = None, atol = None, lower_order_final = false, unipc_variant = "bh2", unipc_corrector = true, s_churn = 0.0, s_tmin = 0.0, s_tmax = f64::INFINITY, s_noise = 1.0, denoise_final = false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: &str,
        eta: Option<f64>,
        expand: &str,
        qt_last: &str,
        ddpm_variance: &str,
        rtol: Option<f64>,
        atol: Option<f64>,
        lower_order_final: bool,
        unipc_variant: &str,
        unipc_corrector: bool,
        s_churn: f64,
        s_tmin: f64,
        s_tmax: f64,
        s_noise: f64,
        denoise_final: bool,
    ) -> PyResult<Self> {
        guard(|| {
            let sampler: Sampler = name.parse().map_err(value_err)?;
            let settings = SamplerSettings {
                eta,
                expand: Some(expand.into()),
                qt_last: Some(qt_last.into()),
                ddpm_variance: Some(ddpm_variance.into()),
                rtol,
                atol,
                lower_order_final: Some(lower_order_final),
                unipc_variant: Some(unipc_variant.into()),
                unipc_corrector: Some(unipc_corrector),
                s_churn: Some(s_churn),
                s_tmin: Some(s_tmin),
                s_tmax: Some(s_tmax),
                s_noise: Some(s_noise),
                denoise_final: Some(denoise_final),
            };
            // The options the sampler does not read are errors, as on the command line, but
            // for lower_order_final and ddpm_variance, which diffusers configs carry for
            // every scheduler (QTaylorScheduler passes them on whatever the sampler).
            let opts = settings
                .build(
                    &[sampler],
                    None,
                    &[keys::LOWER_ORDER_FINAL, keys::DDPM_VARIANCE],
                )
                .map_err(value_err)?;
            Ok(SamplerSpec { sampler, opts })
        })
    }

    /// The canonical sampler name.
    #[getter]
    fn name(&self) -> String {
        self.sampler.to_string()
    }

    /// True for samplers with step-size control (rk45, dpm-solver-12/23).
    #[getter]
    fn is_adaptive(&self) -> bool {
        self.sampler.is_adaptive()
    }

    /// True when the sampler draws fresh noise during sampling.
    #[getter]
    fn is_stochastic(&self) -> bool {
        self.sampler.is_stochastic(&self.opts)
    }

    /// Network evaluations for `steps` steps (None: adaptive).
    #[pyo3(signature = (steps, ends_at_zero = false))]
    fn nfe(&self, steps: usize, ends_at_zero: bool) -> Option<usize> {
        self.sampler.nfe(steps, ends_at_zero, &self.opts)
    }

    /// The most steps whose NFE fits in `budget` (None if none fits or adaptive).
    #[pyo3(signature = (budget, ends_at_zero = false))]
    fn steps_for_budget(&self, budget: usize, ends_at_zero: bool) -> Option<usize> {
        self.sampler
            .steps_for_budget(budget, ends_at_zero, &self.opts)
    }

    fn __repr__(&self) -> String {
        format!("SamplerSpec('{}')", self.sampler)
    }
}

/// Every sampler family: (name, NFE per step, description).
#[pyfunction]
fn catalog() -> Vec<(String, String, String)> {
    samplers::catalog()
        .into_iter()
        .map(|e| {
            (
                e.name.to_string(),
                e.nfe_per_step.to_string(),
                e.description.to_string(),
            )
        })
        .collect()
}

/// The sampler names of the library's full list (the bench's "all").
#[pyfunction]
fn all_sampler_names() -> Vec<String> {
    samplers::all_samplers()
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn parse_param(prediction_type: &str) -> PyResult<Parameterization> {
    prediction_type.parse().map_err(value_err)
}

fn check_clip(clip: Option<f64>) -> PyResult<()> {
    if let Some(c) = clip
        && !(c > 0.0 && c.is_finite())
    {
        return Err(PyValueError::new_err(format!(
            "clip_sample_range {c}: expected a positive number"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The Python backend

/// Sampler operations on Python objects through an `ops` object with the methods
/// `model(x, t, step)`, `lincomb(coefs, xs)`, `noise(like)`, `clamp(x, limit)`,
/// `error_norm(e, a, b, rtol, atol, kind)` and `begin_step(i, t, x)`.
struct PyBackend<'py, 'a> {
    py: Python<'py>,
    ops: &'a Bound<'py, PyAny>,
    schedule: &'a Schedule,
}

/// A Python exception carried through `anyhow` so it reaches the caller unchanged.
#[derive(Debug)]
struct PyFailure(PyErr);

impl std::fmt::Display for PyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl std::error::Error for PyFailure {}

fn carry(e: PyErr) -> anyhow::Error {
    anyhow::Error::new(PyFailure(e))
}

/// Back to Python: a carried Python exception as it was, anything else as `kind`.
fn to_py(e: anyhow::Error, value: bool) -> PyErr {
    match e.downcast::<PyFailure>() {
        Ok(PyFailure(p)) => p,
        Err(e) if value => PyValueError::new_err(message(&e)),
        Err(e) => PyRuntimeError::new_err(message(&e)),
    }
}

fn coef_obj(py: Python<'_>, c: &Coef) -> PyResult<Py<PyAny>> {
    Ok(match c {
        Coef::All(v) => v.into_pyobject(py)?.into_any().unbind(),
        Coef::Rows(v) => PyList::new(py, v)?.into_any().unbind(),
    })
}

impl Backend for PyBackend<'_, '_> {
    type X = Py<PyAny>;

    fn predict(&mut self, x: &Py<PyAny>, t: &[f64], step: usize) -> anyhow::Result<Py<PyAny>> {
        let mt: Vec<f64> = t.iter().map(|&t| self.schedule.model_t(t)).collect();
        let r = self
            .ops
            .call_method1("model", (x.bind(self.py), mt, step))
            .map_err(carry)?;
        Ok(r.unbind())
    }

    fn lincomb(&mut self, terms: &[(Coef, &Py<PyAny>)]) -> anyhow::Result<Py<PyAny>> {
        let py = self.py;
        let coefs: Vec<Py<PyAny>> = terms
            .iter()
            .map(|(c, _)| coef_obj(py, c))
            .collect::<PyResult<_>>()
            .map_err(carry)?;
        let xs: Vec<&Py<PyAny>> = terms.iter().map(|(_, x)| *x).collect();
        let coefs = PyList::new(py, coefs).map_err(carry)?;
        let xs = PyList::new(py, xs).map_err(carry)?;
        let r = self
            .ops
            .call_method1("lincomb", (coefs, xs))
            .map_err(carry)?;
        Ok(r.unbind())
    }

    fn noise(&mut self, like: &Py<PyAny>) -> anyhow::Result<Py<PyAny>> {
        let r = self
            .ops
            .call_method1("noise", (like.bind(self.py),))
            .map_err(carry)?;
        Ok(r.unbind())
    }

    fn clamp(&mut self, x: &Py<PyAny>, limit: f64) -> anyhow::Result<Py<PyAny>> {
        let r = self
            .ops
            .call_method1("clamp", (x.bind(self.py), limit))
            .map_err(carry)?;
        Ok(r.unbind())
    }

    fn error_norm(
        &mut self,
        e: &Py<PyAny>,
        a: &Py<PyAny>,
        b: &Py<PyAny>,
        rtol: f64,
        atol: f64,
        kind: Tolerance,
    ) -> anyhow::Result<Vec<f64>> {
        let kind = match kind {
            Tolerance::Sum => "sum",
            Tolerance::Max => "max",
        };
        let py = self.py;
        let r = self
            .ops
            .call_method1(
                "error_norm",
                (e.bind(py), a.bind(py), b.bind(py), rtol, atol, kind),
            )
            .map_err(carry)?;
        r.extract::<Vec<f64>>().map_err(carry)
    }

    fn begin_step(&mut self, i: usize, t: f64, x: &Py<PyAny>) -> anyhow::Result<()> {
        let mt = self.schedule.model_t(t);
        self.ops
            .call_method1("begin_step", (i, mt, x.bind(self.py)))
            .map_err(carry)?;
        Ok(())
    }
}

/// Runs `spec` over the grid `times` from `x` (the state at `times[0]`) on a batch of
/// `rows` samples, every tensor operation through `ops`. Returns `(x, nfe)`.
#[pyfunction]
#[pyo3(signature = (schedule, spec, times, x, ops, rows, prediction_type = "epsilon", clip = None))]
#[allow(clippy::too_many_arguments)]
fn run<'py>(
    py: Python<'py>,
    schedule: &Schedule,
    spec: &SamplerSpec,
    times: Vec<f64>,
    x: Bound<'py, PyAny>,
    ops: Bound<'py, PyAny>,
    rows: usize,
    prediction_type: &str,
    clip: Option<f64>,
) -> PyResult<(Py<PyAny>, f64)> {
    guard(|| {
        let param = parse_param(prediction_type)?;
        check_clip(clip)?;
        if rows == 0 {
            return Err(PyValueError::new_err("rows 0: the batch is empty"));
        }
        samplers::check_grid(schedule.inner.as_ref(), &times).map_err(value_err)?;
        let mut backend = PyBackend {
            py,
            ops: &ops,
            schedule,
        };
        let mut ctx = Ctx::new(&mut backend, schedule.inner.as_ref(), param, clip, rows);
        let out = samplers::run(&mut ctx, spec.sampler, &spec.opts, &times, x.unbind())
            .map_err(|e| to_py(e, false))?;
        Ok((out, ctx.nfe()))
    })
}

// ---------------------------------------------------------------------------------------
// Programs

/// A fixed-grid sampler run recorded as operations, for a caller that owns the loop.
#[pyclass(module = "qtaylor._core", frozen)]
struct Program {
    inner: Arc<CoreProgram>,
    schedule: Schedule,
    param: Parameterization,
    clip: Option<f64>,
    /// Grid step of each network call.
    call_steps: Vec<usize>,
}

#[pymethods]
impl Program {
    /// Records `spec` over the grid `times` for a network predicting `prediction_type`.
    #[new]
    #[pyo3(signature = (schedule, spec, times, prediction_type = "epsilon", clip = None))]
    fn new(
        schedule: &Schedule,
        spec: &SamplerSpec,
        times: Vec<f64>,
        prediction_type: &str,
        clip: Option<f64>,
    ) -> PyResult<Self> {
        guard(|| {
            let param = parse_param(prediction_type)?;
            check_clip(clip)?;
            let p = CoreProgram::record(
                schedule.inner.as_ref(),
                spec.sampler,
                &spec.opts,
                &times,
                param,
                clip,
            )
            .map_err(value_err)?;
            let mut step = 0;
            let mut call_steps = Vec::new();
            for op in &p.ops {
                match op {
                    Op::Begin { i, .. } => step = *i,
                    Op::Model { .. } => call_steps.push(step),
                    _ => {}
                }
            }
            Ok(Program {
                inner: Arc::new(p),
                schedule: schedule.clone(),
                param,
                clip,
                call_steps,
            })
        })
    }

    /// The time (schedule units) of every network call, in order.
    #[getter]
    fn call_times(&self) -> Vec<f64> {
        self.inner.model_calls().iter().map(|c| c.1).collect()
    }

    /// The network's time argument (diffusers timestep for discrete schedules) of every
    /// network call.
    #[getter]
    fn call_model_times(&self) -> Vec<f64> {
        self.inner
            .model_calls()
            .iter()
            .map(|c| self.schedule.model_t(c.1))
            .collect()
    }

    /// The grid step each network call belongs to.
    #[getter]
    fn call_steps(&self) -> Vec<usize> {
        self.call_steps.clone()
    }

    /// Network evaluations per sample.
    #[getter]
    fn nfe(&self) -> f64 {
        self.inner.nfe
    }

    /// Number of operations (after dead-code elimination).
    #[getter]
    fn num_ops(&self) -> usize {
        self.inner.ops.len()
    }

    /// The operations as text, one per line (for debugging and documentation).
    fn describe(&self) -> String {
        self.inner
            .ops
            .iter()
            .map(|op| match op {
                Op::Model { x, t, out } => format!("r{out} = model(r{x}, t={t})"),
                Op::Lincomb { out, terms } => format!(
                    "r{out} = {}",
                    terms
                        .iter()
                        .map(|(c, r)| format!("{c:+.6e}*r{r}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                Op::Noise { out, like } => format!("r{out} = randn_like(r{like})"),
                Op::Clamp { out, x, limit } => format!("r{out} = clamp(r{x}, {limit})"),
                Op::Begin { i, t, x } => format!("# step {i} at t={t} from r{x}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The state of one replay of a [`Program`]: its registers and the next network call.
#[pyclass(module = "qtaylor._core")]
struct Replay {
    program: Arc<CoreProgram>,
    schedule: Schedule,
    param: Parameterization,
    clip: Option<f64>,
    regs: Vec<Option<Py<PyAny>>>,
    /// Index into `program.ops` of the network call waiting for its output.
    at: Option<usize>,
    calls_done: usize,
    finished: bool,
}

impl Replay {
    fn advance(&mut self, py: Python<'_>, ops: &Bound<'_, PyAny>, from: usize) -> PyResult<()> {
        let mut backend = PyBackend {
            py,
            ops,
            schedule: &self.schedule,
        };
        let next = self
            .program
            .run_until_model(&mut backend, &mut self.regs, from)
            .map_err(|e| to_py(e, false))?;
        self.at = next;
        self.finished = next.is_none();
        Ok(())
    }

    fn reg(&self, py: Python<'_>, r: usize) -> PyResult<Py<PyAny>> {
        self.regs[r]
            .as_ref()
            .map(|v| v.clone_ref(py))
            .ok_or_else(|| PyRuntimeError::new_err(format!("register {r} is empty")))
    }
}

#[pymethods]
impl Replay {
    /// Starts `program` from the state `x`; `ops` executes the operations.
    #[new]
    fn new(
        py: Python<'_>,
        program: &Program,
        x: Bound<'_, PyAny>,
        ops: Bound<'_, PyAny>,
    ) -> PyResult<Self> {
        guard(|| {
            let mut regs: Vec<Option<Py<PyAny>>> =
                (0..program.inner.registers).map(|_| None).collect();
            regs[0] = Some(x.unbind());
            let mut r = Replay {
                program: program.inner.clone(),
                schedule: program.schedule.clone(),
                param: program.param,
                clip: program.clip,
                regs,
                at: None,
                calls_done: 0,
                finished: false,
            };
            r.advance(py, &ops, 0)?;
            Ok(r)
        })
    }

    /// The state the next network call evaluates (None when finished).
    fn pending_input(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        match self.at {
            Some(j) => match &self.program.ops[j] {
                Op::Model { x, .. } => Ok(Some(self.reg(py, *x)?)),
                _ => Err(PyRuntimeError::new_err("replay is not at a network call")),
            },
            None => Ok(None),
        }
    }

    /// Network calls fed so far.
    #[getter]
    fn calls_done(&self) -> usize {
        self.calls_done
    }

    #[getter]
    fn finished(&self) -> bool {
        self.finished
    }

    /// Feeds the output of the pending network call, evaluated at `sample` (which
    /// replaces the program's copy of that state, so a pipeline may edit its latents), and
    /// runs to the next call. Returns the next state to evaluate, or the result when the
    /// program is finished.
    fn feed(
        &mut self,
        py: Python<'_>,
        model_output: Bound<'_, PyAny>,
        sample: Bound<'_, PyAny>,
        ops: Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        guard(|| {
            let Some(j) = self.at else {
                return Err(PyRuntimeError::new_err(
                    "the sampler has finished: every network call of this grid was fed; call set_timesteps again",
                ));
            };
            let Op::Model { x, out, .. } = self.program.ops[j] else {
                return Err(PyRuntimeError::new_err("replay is not at a network call"));
            };
            self.regs[x] = Some(sample.unbind());
            self.regs[out] = Some(model_output.unbind());
            self.program.free_after(&mut self.regs, j);
            self.calls_done += 1;
            self.advance(py, &ops, j + 1)?;
            match self.at {
                Some(k) => match self.program.ops[k] {
                    Op::Model { x, .. } => self.reg(py, x),
                    _ => Err(PyRuntimeError::new_err("replay is not at a network call")),
                },
                None => self.reg(py, self.program.output),
            }
        })
    }

    /// x̂0 implied by `model_output` at `sample` and time `t` (schedule units), with the
    /// program's parameterization and clip (diffusers' `pred_original_sample`).
    fn x0(
        &self,
        py: Python<'_>,
        model_output: Bound<'_, PyAny>,
        sample: Bound<'_, PyAny>,
        t: f64,
        ops: Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        guard(|| {
            self.schedule.check_t(t)?;
            let mut backend = PyBackend {
                py,
                ops: &ops,
                schedule: &self.schedule,
            };
            let (a, s) = (self.schedule.inner.alpha(t), self.schedule.inner.sigma(t));
            let (_, d) = qtaylor_core::exec::conversion(self.param, a, s);
            let (x, p) = (sample.unbind(), model_output.unbind());
            let mut x0 = backend
                .lincomb(&[(Coef::All(d[0]), &x), (Coef::All(d[1]), &p)])
                .map_err(|e| to_py(e, false))?;
            if let Some(c) = self.clip {
                x0 = backend.clamp(&x0, c).map_err(|e| to_py(e, false))?;
            }
            Ok(x0)
        })
    }
}

// ---------------------------------------------------------------------------------------
// Test problems and noise

/// Per-sample noise streams: sample i draws from its own ChaCha stream (seed, i), exactly
/// as `qtaylor sample --seed` does.
#[pyclass(module = "qtaylor._core")]
struct NoiseStreams {
    inner: qtaylor::tensor::rng::NoiseStreams,
}

#[pymethods]
impl NoiseStreams {
    #[new]
    #[pyo3(signature = (seed, count, first = 0))]
    fn new(seed: u64, count: usize, first: usize) -> Self {
        NoiseStreams {
            inner: qtaylor::tensor::rng::NoiseStreams::new(seed, first, count),
        }
    }

    /// The next standard normal draws, shape (count, *item), float64.
    fn normal<'py>(
        &mut self,
        py: Python<'py>,
        item: Vec<usize>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f64>>> {
        guard(|| {
            let t = self
                .inner
                .normal(&item, candle_core::DType::F64, &candle_core::Device::Cpu)
                .map_err(|e| PyRuntimeError::new_err(format!("{e:#}")))?;
            let mut shape = vec![self.inner.len()];
            shape.extend(&item);
            let data = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f64>())
                .map_err(|e| PyRuntimeError::new_err(format!("{e}")))?;
            let arr = numpy::ndarray::ArrayD::from_shape_vec(shape, data)
                .map_err(|e| PyRuntimeError::new_err(format!("{e}")))?;
            Ok(arr.into_pyarray(py))
        })
    }
}

/// An exact-score test problem (a Gaussian mixture): `eps(x, t)` is the exact noise
/// prediction of the mixture under `schedule`.
#[pyclass(module = "qtaylor._core", frozen)]
struct ExactProblem {
    problem: Box<dyn qtaylor::models::problems::Problem>,
    schedule: Schedule,
}

#[pymethods]
impl ExactProblem {
    /// `name`: gmm-demo or a mixture JSON file (the CLI's `--problem`).
    #[new]
    fn new(name: &str, schedule: &Schedule) -> PyResult<Self> {
        guard(|| {
            let p = qtaylor::models::problems::load_problem(
                name,
                schedule.inner.clone(),
                &candle_core::Device::Cpu,
            )
            .map_err(value_err)?;
            Ok(ExactProblem {
                problem: p,
                schedule: schedule.clone(),
            })
        })
    }

    /// The shape of one sample.
    #[getter]
    fn item_shape(&self) -> Vec<usize> {
        self.problem.item_shape()
    }

    /// The exact ε̂ at states `x` (float64, shape (B, *item)) and schedule times `t` (one
    /// per row, or one).
    fn eps<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArrayDyn<'py, f64>,
        t: Vec<f64>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f64>>> {
        guard(|| {
            let shape = x.as_array().shape().to_vec();
            if shape.len() < 2 || shape[1..] != self.problem.item_shape()[..] {
                return Err(PyValueError::new_err(format!(
                    "x has shape {shape:?}; expected (B, {:?})",
                    self.problem.item_shape()
                )));
            }
            if t.len() != 1 && t.len() != shape[0] {
                return Err(PyValueError::new_err(format!(
                    "{} times for {} rows; expected one time or one per row",
                    t.len(),
                    shape[0]
                )));
            }
            for &ti in &t {
                self.schedule.check_t(ti)?;
            }
            let data: Vec<f64> = x.as_array().iter().copied().collect();
            let xt = candle_core::Tensor::from_vec(data, shape.clone(), &candle_core::Device::Cpu)
                .map_err(|e| PyRuntimeError::new_err(format!("{e}")))?;
            let model = self.problem.model();
            let out = model
                .predict(&xt, &t)
                .and_then(|p| {
                    qtaylor::models::model::to_eps_x0(
                        model.parameterization(),
                        &p,
                        &xt,
                        &t,
                        self.schedule.inner.as_ref(),
                    )
                })
                .and_then(|d| Ok(d.eps.flatten_all()?.to_vec1::<f64>()?))
                .map_err(|e| PyRuntimeError::new_err(format!("{e:#}")))?;
            let arr = numpy::ndarray::ArrayD::from_shape_vec(shape, out)
                .map_err(|e| PyRuntimeError::new_err(format!("{e}")))?;
            Ok(arr.into_pyarray(py))
        })
    }
}

/// Reads and validates a grid file written by `qtaylor tune` against `schedule` (the
/// times must decrease strictly, lie in the schedule's domain and number steps + 1; errors
/// name the file). With `sampler` (and `nfe`, `model`), a `UserWarning` names each way the
/// file was tuned for another run: sampler, NFE, schedule or model, as the command line
/// warns. Returns its contents as a dict (`times`, `timesteps`, `sigmas`, `sampler`, `nfe`,
/// `steps`, `schedule`, `model`, `tuning`).
#[pyfunction]
#[pyo3(signature = (path, schedule, sampler = None, nfe = None, model = None))]
fn read_grid_file(
    py: Python<'_>,
    path: std::path::PathBuf,
    schedule: &Schedule,
    sampler: Option<&str>,
    nfe: Option<usize>,
    model: Option<&str>,
) -> PyResult<Py<PyAny>> {
    guard(|| {
        let g = qtaylor::sampling::gridfile::GridFile::read(&path, schedule.inner.as_ref())
            .map_err(value_err)?;
        if let Some(s) = sampler {
            let model = model.unwrap_or(&g.model);
            for w in g.mismatches(s, nfe, schedule.inner.as_ref(), model) {
                let text = std::ffi::CString::new(format!("grid file {}: {w}", path.display()))
                    .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
                PyErr::warn(
                    py,
                    &py.get_type::<pyo3::exceptions::PyUserWarning>(),
                    &text,
                    2,
                )?;
            }
        }
        let text = serde_json::to_string(&g).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        let json = py.import("json")?;
        Ok(json.call_method1("loads", (text,))?.unbind())
    })
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Schedule>()?;
    m.add_class::<SamplerSpec>()?;
    m.add_class::<Program>()?;
    m.add_class::<Replay>()?;
    m.add_class::<NoiseStreams>()?;
    m.add_class::<ExactProblem>()?;
    m.add_function(wrap_pyfunction!(continuous_grid, m)?)?;
    m.add_function(wrap_pyfunction!(discrete_grid, m)?)?;
    m.add_function(wrap_pyfunction!(grid_times, m)?)?;
    m.add_function(wrap_pyfunction!(quasi_taylor_coefficients, m)?)?;
    m.add_function(wrap_pyfunction!(catalog, m)?)?;
    m.add_function(wrap_pyfunction!(all_sampler_names, m)?)?;
    m.add_function(wrap_pyfunction!(run, m)?)?;
    m.add_function(wrap_pyfunction!(read_grid_file, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    let _ = PyTuple::empty(m.py());
    Ok(())
}
