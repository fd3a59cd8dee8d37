//! Test problems, noise streams and grid files.

use crate::*;

/// Per-sample noise streams: sample i draws from its own ChaCha stream (seed, i), exactly
/// as `qtaylor sample --seed` does.
#[pyclass(module = "qtaylor._core")]
pub(crate) struct NoiseStreams {
    pub(crate) inner: qtaylor::tensor::rng::NoiseStreams,
}

#[pymethods]
impl NoiseStreams {
    #[new]
    #[pyo3(signature = (seed, count, first = 0))]
    pub(crate) fn new(seed: u64, count: usize, first: usize) -> Self {
        NoiseStreams {
            inner: qtaylor::tensor::rng::NoiseStreams::new(seed, first, count),
        }
    }

    /// The next standard normal draws, shape (count, *item), float64.
    pub(crate) fn normal<'py>(
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
pub(crate) struct ExactProblem {
    pub(crate) problem: Box<dyn qtaylor::models::problems::Problem>,
    pub(crate) schedule: Schedule,
}

#[pymethods]
impl ExactProblem {
    /// `name`: gmm-demo or a mixture JSON file (the CLI's `--problem`).
    #[new]
    pub(crate) fn new(name: &str, schedule: &Schedule) -> PyResult<Self> {
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
    pub(crate) fn item_shape(&self) -> Vec<usize> {
        self.problem.item_shape()
    }

    /// What [`ExactProblem::predict`] returns: epsilon, or flow_prediction (the velocity
    /// ε̂ − x̂0) on schedules that reach pure noise (rectified flow).
    #[getter]
    pub(crate) fn prediction_type(&self) -> String {
        self.problem.model().parameterization().to_string()
    }

    /// The exact ε̂ at states `x` (float64, shape (B, *item)) and schedule times `t` (one
    /// per row, or one).
    pub(crate) fn eps<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArrayDyn<'py, f64>,
        t: Vec<f64>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f64>>> {
        self.evaluate(py, x, t, false)
    }

    /// The problem model's own prediction ([`ExactProblem::prediction_type`]) at VP states
    /// `x` and schedule times `t`, as the command line's model computes it.
    pub(crate) fn predict<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArrayDyn<'py, f64>,
        t: Vec<f64>,
    ) -> PyResult<Bound<'py, PyArrayDyn<f64>>> {
        self.evaluate(py, x, t, true)
    }
}

impl ExactProblem {
    fn evaluate<'py>(
        &self,
        py: Python<'py>,
        x: PyReadonlyArrayDyn<'py, f64>,
        t: Vec<f64>,
        raw: bool,
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
                    if raw {
                        return Ok(p.flatten_all()?.to_vec1::<f64>()?);
                    }
                    qtaylor::models::model::to_eps_x0(
                        model.parameterization(),
                        &p,
                        &xt,
                        &t,
                        self.schedule.inner.as_ref(),
                    )
                    .and_then(|d| Ok(d.eps.flatten_all()?.to_vec1::<f64>()?))
                })
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
/// With `spec` instead (a `SamplerSpec`), the sampler is its name and the NFE its NFE on the
/// file's grid, as the scheduler's `set_grid_file` runs it.
#[pyfunction]
#[pyo3(signature = (path, schedule, sampler = None, nfe = None, model = None, spec = None))]
pub(crate) fn read_grid_file(
    py: Python<'_>,
    path: std::path::PathBuf,
    schedule: &Schedule,
    sampler: Option<&str>,
    nfe: Option<usize>,
    model: Option<&str>,
    spec: Option<&SamplerSpec>,
) -> PyResult<Py<PyAny>> {
    guard(|| {
        let g = qtaylor::sampling::gridfile::GridFile::read(&path, schedule.inner.as_ref())
            .map_err(value_err)?;
        let name = spec.map(|s| s.sampler.to_string());
        let (sampler, nfe) = match (spec, &name) {
            (Some(s), Some(n)) => (
                Some(n.as_str()),
                s.sampler
                    .nfe(g.steps, g.times.last() == Some(&0.0), &s.opts),
            ),
            _ => (sampler, nfe),
        };
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
