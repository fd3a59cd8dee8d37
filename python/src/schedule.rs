//! `Schedule`: a noise schedule's α, σ, λ, β and their derivatives over numpy arrays.

use crate::*;

/// A noise schedule: α(t), σ(t), λ(t) and their derivatives of any order, on t ∈ [0, t_end].
///
/// Discrete (diffusers) schedules put step n at t = (n + 1)/T; their "model time" is the
/// (fractional) diffusers timestep, linear in log σ between the trained steps as diffusers'
/// `_sigma_to_t`. Continuous schedules use t itself.
#[pyclass(module = "qtaylor._core", frozen)]
#[derive(Clone)]
pub(crate) struct Schedule {
    pub(crate) inner: Arc<dyn CoreSchedule>,
    pub(crate) train_steps: Option<usize>,
    /// A discrete schedule's betas, as diffusers holds them (float32 values).
    pub(crate) betas: Option<Arc<Vec<f64>>>,
}

pub(crate) fn vectorize(
    py: Python<'_>,
    t: &Bound<'_, PyAny>,
    f: impl Fn(f64) -> f64,
) -> PyResult<Py<PyAny>> {
    if let Ok(v) = t.extract::<f64>() {
        return Ok(f(v).into_pyobject(py)?.into_any().unbind());
    }
    let arr: PyReadonlyArrayDyn<f64> = t
        .extract()
        .map_err(|_| PyValueError::new_err("expected a float or a numpy array of float64 times"))?;
    let out = arr.as_array().mapv(f);
    Ok(out.into_pyarray(py).into_any().unbind())
}

/// `f` over a float or a numpy array of float64 `what`, its first error raised as ValueError.
pub(crate) fn try_vectorize(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    what: &str,
    f: impl Fn(f64) -> anyhow::Result<f64>,
) -> PyResult<Py<PyAny>> {
    if let Ok(v) = x.extract::<f64>() {
        let t = f(v).map_err(value_err)?;
        return Ok(t.into_pyobject(py)?.into_any().unbind());
    }
    let arr: PyReadonlyArrayDyn<f64> = x.extract().map_err(|_| {
        PyValueError::new_err(format!(
            "expected a float or a numpy array of float64 {what}"
        ))
    })?;
    let mut out = arr.as_array().to_owned();
    for v in out.iter_mut() {
        *v = f(*v).map_err(value_err)?;
    }
    Ok(out.into_pyarray(py).into_any().unbind())
}

impl Schedule {
    pub(crate) fn check_t(&self, t: f64) -> PyResult<()> {
        if !(t.is_finite() && t >= 0.0 && t <= self.inner.t_end()) {
            return Err(PyValueError::new_err(format!(
                "time {t} is outside the domain [0, {}] of schedule {}",
                self.inner.t_end(),
                self.inner.name()
            )));
        }
        Ok(())
    }

    pub(crate) fn model_t(&self, t: f64) -> f64 {
        self.inner.network_time(t)
    }
}

#[pymethods]
impl Schedule {
    /// The continuous linear-β VP schedule (score_sde; DDPM's limit for 0.1 / 20).
    #[staticmethod]
    #[pyo3(signature = (beta_min = 0.1, beta_max = 20.0))]
    pub(crate) fn vp_linear(beta_min: f64, beta_max: f64) -> PyResult<Self> {
        let inner = sched::schedule_by_name("vp-linear", beta_min, beta_max).map_err(value_err)?;
        Ok(Schedule {
            inner: Arc::from(inner),
            train_steps: None,
            betas: None,
        })
    }

    /// The cosine schedule of improved DDPM (t ≤ 0.9946).
    #[staticmethod]
    pub(crate) fn cosine() -> Self {
        Schedule {
            inner: Arc::new(sched::Cosine::default()),
            train_steps: None,
            betas: None,
        }
    }

    /// The variance-exploding path of EDM and k-diffusion up to `sigma_max`, in VP
    /// coordinates: time is the noise level σ itself (ᾱ = 1/(1 + σ²)).
    #[staticmethod]
    #[pyo3(signature = (sigma_max = 80.0))]
    pub(crate) fn ve(sigma_max: f64) -> PyResult<Self> {
        let inner = sched::Ve::new(sigma_max).map_err(value_err)?;
        Ok(Schedule {
            inner: Arc::new(inner),
            train_steps: None,
            betas: None,
        })
    }

    /// Rectified flow (SD3, Flux): `x = (1 − ς) x0 + ς ε` in VP coordinates, time t the
    /// unshifted flow time, `ς = s t/(1 + (s − 1) t)` with `shift` s, or diffusers' dynamic
    /// `mu` with `time_shift` (diffusers' `time_shift_type`; exponential: s = e^μ; linear:
    /// s = μ). The model's state is
    /// the VP state times `state_scale(t) = 1/(α + σ)`; its network time is `1000 ς`.
    #[staticmethod]
    #[pyo3(signature = (shift = None, mu = None, time_shift = None))]
    pub(crate) fn flow(
        shift: Option<f64>,
        mu: Option<f64>,
        time_shift: Option<&str>,
    ) -> PyResult<Self> {
        let inner = sched::Flow::from_settings(shift, mu, time_shift).map_err(value_err)?;
        Ok(Schedule {
            inner: Arc::new(inner),
            train_steps: None,
            betas: None,
        })
    }

    /// The times of noise levels in the model's own terms (σ/α on VP and VE schedules,
    /// diffusers' `sigmas`; ς on flow); 0 is t = 0.
    pub(crate) fn time_of_level(
        &self,
        py: Python<'_>,
        level: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        try_vectorize(py, level, "noise levels", |v| self.inner.time_of_level(v))
    }

    /// The model's state over the VP state at t (1 on VP, 1/α on VE, 1/(α + σ) on flow).
    pub(crate) fn state_scale(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.inner.state_scale(t))
    }

    /// The continuous limit of Stable Diffusion's scaled-linear schedule.
    #[staticmethod]
    pub(crate) fn scaled_linear() -> Self {
        Schedule {
            inner: Arc::new(sched::ScaledLinear::default()),
            train_steps: None,
            betas: None,
        }
    }

    /// A diffusers discrete schedule: `beta_schedule` linear, scaled_linear or
    /// squaredcos_cap_v2 (betas in float32 as diffusers computes them), or explicit
    /// `trained_betas`. `rescale_betas_zero_snr`: the betas rescaled to zero terminal SNR
    /// (diffusers' `rescale_zero_terminal_snr`, in float32), the last ᾱ (0) replaced by
    /// 2⁻²⁴ as diffusers' Euler, DPM-Solver multistep and UniPC schedulers do.
    #[staticmethod]
    #[pyo3(signature = (beta_schedule = "linear", beta_start = 1e-4, beta_end = 0.02, num_train_timesteps = 1000, trained_betas = None, rescale_betas_zero_snr = false))]
    pub(crate) fn discrete(
        beta_schedule: &str,
        beta_start: f64,
        beta_end: f64,
        num_train_timesteps: usize,
        trained_betas: Option<Vec<f64>>,
        rescale_betas_zero_snr: bool,
    ) -> PyResult<Self> {
        if let Some(b) = &trained_betas
            && b.len() < 2
        {
            return Err(PyValueError::new_err(format!(
                "trained_betas has {} entries; expected at least 2",
                b.len()
            )));
        }
        let (t, betas): (Tabulated, Vec<f64>) = match trained_betas {
            // given betas keep their f64 product (as before); only the zero-SNR rescaling,
            // which diffusers computes in float32, takes them as float32
            Some(b) if !rescale_betas_zero_snr => {
                let t = Tabulated::from_betas("discrete", &b).map_err(value_err)?;
                (t, b.iter().map(|&v| v as f32 as f64).collect())
            }
            given => {
                let b: Vec<f32> = match given {
                    Some(b) => b.iter().map(|&v| v as f32).collect(),
                    None => sched::diffusers_betas(
                        beta_schedule,
                        beta_start,
                        beta_end,
                        num_train_timesteps,
                    )
                    .map_err(value_err)?,
                };
                let (t, b) = if rescale_betas_zero_snr {
                    Tabulated::diffusers_zero_snr(&b).map_err(value_err)?
                } else {
                    let abar = sched::diffusers_alphas_cumprod(&b);
                    (
                        Tabulated::from_alpha_bars("discrete", &abar).map_err(value_err)?,
                        b,
                    )
                };
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
    pub(crate) fn name(&self) -> String {
        self.inner.name()
    }

    /// The largest time of the schedule's domain.
    #[getter]
    pub(crate) fn t_end(&self) -> f64 {
        self.inner.t_end()
    }

    /// T for a discrete schedule, None for a continuous one.
    #[getter]
    pub(crate) fn num_train_timesteps(&self) -> Option<usize> {
        self.train_steps
    }

    /// A discrete schedule's betas β_n, n = 0 … T − 1 (diffusers' `betas`); None otherwise.
    #[getter]
    pub(crate) fn betas(&self) -> Option<Vec<f64>> {
        self.betas.as_ref().map(|b| b.as_ref().clone())
    }

    /// A discrete schedule's ᾱ_n at its trained steps (diffusers' `alphas_cumprod`, the
    /// table the schedule interpolates); None otherwise.
    #[getter]
    pub(crate) fn alphas_cumprod(&self) -> Option<Vec<f64>> {
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

    pub(crate) fn alpha(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.inner.alpha(t))
    }
    pub(crate) fn sigma(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.inner.sigma(t))
    }
    pub(crate) fn alpha_bar(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.inner.alpha_bar(t))
    }
    pub(crate) fn log_alpha_bar(
        &self,
        py: Python<'_>,
        t: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.inner.log_alpha_bar(t))
    }
    /// The log-SNR λ = ln(α/σ).
    pub(crate) fn lambda_(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.inner.lambda(t))
    }
    /// β(t) = −d ln ᾱ/dt.
    pub(crate) fn beta(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.inner.beta(t))
    }

    /// The first `order` derivatives (0th = value) of `quantity` (alpha, sigma, lambda,
    /// beta, log_alpha_bar) at t, from the truncated power series.
    pub(crate) fn derivatives(&self, quantity: &str, t: f64, order: usize) -> PyResult<Vec<f64>> {
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
    pub(crate) fn t_of_lambda(&self, lam: f64) -> PyResult<f64> {
        self.inner.t_of_lambda(lam).map_err(value_err)
    }

    /// The network's time argument at t: the (fractional) diffusers timestep (discrete), or t.
    pub(crate) fn model_time(&self, py: Python<'_>, t: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        vectorize(py, t, |t| self.model_t(t))
    }

    /// The inverse of `model_time` (fractional diffusers timesteps allowed).
    pub(crate) fn time_of_model_time(
        &self,
        py: Python<'_>,
        n: &Bound<'_, PyAny>,
    ) -> PyResult<Py<PyAny>> {
        try_vectorize(py, n, "timesteps", |v| self.inner.time_of_network_time(v))
    }

    pub(crate) fn __repr__(&self) -> String {
        match self.train_steps {
            Some(n) => format!("Schedule(discrete, {n} steps)"),
            None => format!("Schedule({})", self.inner.name()),
        }
    }
}
