//! `SamplerSpec`: a sampler with its options (the core's `SamplerSettings` builder), and the
//! sampler catalog.

use crate::*;

/// A sampler with its options: the one configuration type shared with the CLI.
#[pyclass(module = "qtaylor._core", frozen)]
#[derive(Clone)]
pub(crate) struct SamplerSpec {
    pub(crate) sampler: Sampler,
    pub(crate) opts: Options,
}

#[pymethods]
impl SamplerSpec {
    #[new]
    #[pyo3(signature = (name, *, eta = None, expand = "t", qt_last = "ddim", ddpm_variance = "beta-tilde", rtol = None, atol = None, lower_order_final = false, unipc_variant = "bh2", unipc_corrector = true, s_churn = 0.0, s_tmin = 0.0, s_tmax = f64::INFINITY, s_noise = 1.0, denoise_final = false))]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
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
    pub(crate) fn name(&self) -> String {
        self.sampler.to_string()
    }

    /// True for samplers with step-size control (rk45, dpm-solver-12/23).
    #[getter]
    pub(crate) fn is_adaptive(&self) -> bool {
        self.sampler.is_adaptive()
    }

    /// True if the sampler can start at pure noise (α = 0: rectified flow's ς = 1, where
    /// diffusers' flow pipelines start); the others refuse such a grid.
    #[getter]
    pub(crate) fn starts_at_pure_noise(&self) -> bool {
        self.sampler.starts_at_pure_noise()
    }

    /// True when the sampler draws fresh noise during sampling.
    #[getter]
    pub(crate) fn is_stochastic(&self) -> bool {
        self.sampler.is_stochastic(&self.opts)
    }

    /// Network evaluations for `steps` steps (None: adaptive).
    #[pyo3(signature = (steps, ends_at_zero = false))]
    pub(crate) fn nfe(&self, steps: usize, ends_at_zero: bool) -> Option<usize> {
        self.sampler.nfe(steps, ends_at_zero, &self.opts)
    }

    /// The most steps whose NFE fits in `budget` (None if none fits or adaptive).
    #[pyo3(signature = (budget, ends_at_zero = false))]
    pub(crate) fn steps_for_budget(&self, budget: usize, ends_at_zero: bool) -> Option<usize> {
        self.sampler
            .steps_for_budget(budget, ends_at_zero, &self.opts)
    }

    pub(crate) fn __repr__(&self) -> String {
        format!("SamplerSpec('{}')", self.sampler)
    }
}

/// Every sampler family: (name, NFE per step, description).
#[pyfunction]
pub(crate) fn catalog() -> Vec<(String, String, String)> {
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
pub(crate) fn all_sampler_names() -> Vec<String> {
    samplers::all_samplers()
        .iter()
        .map(|s| s.to_string())
        .collect()
}

pub(crate) fn parse_param(prediction_type: &str) -> PyResult<Parameterization> {
    prediction_type.parse().map_err(value_err)
}

/// The x̂0 treatment of `clip` (diffusers' `clip_sample_range`) or `threshold`
/// (`(dynamic_thresholding_ratio, sample_max_value)`), checked.
pub(crate) fn x0_clip(
    clip: Option<f64>,
    threshold: Option<(f64, f64)>,
) -> PyResult<Option<X0Clip>> {
    if let Some(c) = clip
        && !(c > 0.0 && c.is_finite())
    {
        return Err(PyValueError::new_err(format!(
            "clip_sample_range {c}: expected a positive number"
        )));
    }
    match (clip, threshold) {
        (Some(_), Some(_)) => Err(PyValueError::new_err(
            "clip and threshold are both given: clip_sample and thresholding exclude each other; choose one",
        )),
        (Some(c), None) => Ok(Some(X0Clip::Clamp(c))),
        (None, Some((ratio, max))) => {
            if !(ratio > 0.0 && ratio <= 1.0) {
                return Err(PyValueError::new_err(format!(
                    "dynamic_thresholding_ratio {ratio}: expected a quantile in (0, 1]"
                )));
            }
            if !(max > 0.0 && max.is_finite()) {
                return Err(PyValueError::new_err(format!(
                    "sample_max_value {max}: expected a positive number"
                )));
            }
            Ok(Some(X0Clip::Threshold { ratio, max }))
        }
        (None, None) => Ok(None),
    }
}
