//! The Python backend: the core's sampler operations on Python tensors through an ops
//! object, and `run`, the whole sampling loop driven from Rust.

use crate::*;

/// Sampler operations on Python objects through an `ops` object with the methods
/// `model(x, t, step)`, `lincomb(coefs, xs)`, `noise(like)`, `clamp(x, limit)`,
/// `threshold(x, ratio, max)`,
/// `error_norm(e, a, b, rtol, atol, kind)` and `begin_step(i, t, x)`.
pub(crate) struct PyBackend<'py, 'a> {
    pub(crate) py: Python<'py>,
    pub(crate) ops: &'a Bound<'py, PyAny>,
    pub(crate) schedule: &'a Schedule,
    /// The model takes its own state, `state_scale(t) · x` (flow, VE), not the VP state.
    pub(crate) model_state: bool,
}

impl PyBackend<'_, '_> {
    /// `x` scaled per row by `f(t)` (no operation where every factor is 1).
    fn scaled(
        &mut self,
        x: &Py<PyAny>,
        t: &[f64],
        f: impl Fn(f64) -> f64,
    ) -> anyhow::Result<Py<PyAny>> {
        let c: Vec<f64> = t.iter().map(|&t| f(t)).collect();
        if c.iter().all(|&c| c == 1.0) {
            return Ok(x.clone_ref(self.py));
        }
        self.lincomb(&[(Coef::from(c), x)])
    }
}

/// A Python exception carried through `anyhow` so it reaches the caller unchanged.
#[derive(Debug)]
pub(crate) struct PyFailure(PyErr);

impl std::fmt::Display for PyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl std::error::Error for PyFailure {}

pub(crate) fn carry(e: PyErr) -> anyhow::Error {
    anyhow::Error::new(PyFailure(e))
}

/// Back to Python: a carried Python exception as it was, anything else as `kind`.
pub(crate) fn to_py(e: anyhow::Error, value: bool) -> PyErr {
    match e.downcast::<PyFailure>() {
        Ok(PyFailure(p)) => p,
        Err(e) if value => PyValueError::new_err(message(&e)),
        Err(e) => PyRuntimeError::new_err(message(&e)),
    }
}

pub(crate) fn coef_obj(py: Python<'_>, c: &Coef) -> PyResult<Py<PyAny>> {
    Ok(match c {
        Coef::All(v) => v.into_pyobject(py)?.into_any().unbind(),
        Coef::Rows(v) => PyList::new(py, v)?.into_any().unbind(),
    })
}

impl Backend for PyBackend<'_, '_> {
    type X = Py<PyAny>;

    fn predict(&mut self, x: &Py<PyAny>, t: &[f64], step: usize) -> anyhow::Result<Py<PyAny>> {
        let mt: Vec<f64> = t.iter().map(|&t| self.schedule.model_t(t)).collect();
        let input = if self.model_state {
            let s = self.schedule.inner.clone();
            self.scaled(x, t, |t| s.state_scale(t))?
        } else {
            x.clone_ref(self.py)
        };
        let r = self
            .ops
            .call_method1("model", (input.bind(self.py), mt, step))
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

    fn threshold(&mut self, x: &Py<PyAny>, ratio: f64, max: f64) -> anyhow::Result<Py<PyAny>> {
        let r = self
            .ops
            .call_method1("threshold", (x.bind(self.py), ratio, max))
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
/// `rows` samples, every tensor operation through `ops`. Returns `(x, nfe)`. With
/// `model_state`, `x`, the model's input and the result are the model's own state
/// (`state_scale(t)` times the VP state the samplers hold: the flow or VE state).
#[pyfunction]
#[pyo3(signature = (schedule, spec, times, x, ops, rows, prediction_type = "epsilon", clip = None, threshold = None, model_state = false))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<'py>(
    py: Python<'py>,
    schedule: &Schedule,
    spec: &SamplerSpec,
    times: Vec<f64>,
    x: Bound<'py, PyAny>,
    ops: Bound<'py, PyAny>,
    rows: usize,
    prediction_type: &str,
    clip: Option<f64>,
    threshold: Option<(f64, f64)>,
    model_state: bool,
) -> PyResult<(Py<PyAny>, f64)> {
    guard(|| {
        let param = parse_param(prediction_type)?;
        let clip = x0_clip(clip, threshold)?;
        if rows == 0 {
            return Err(PyValueError::new_err("rows 0: the batch is empty"));
        }
        samplers::check_grid(schedule.inner.as_ref(), &times).map_err(value_err)?;
        let mut backend = PyBackend {
            py,
            ops: &ops,
            schedule,
            model_state,
        };
        let sc = schedule.inner.clone();
        let (first, last) = (times[0], times[times.len() - 1]);
        let x = if model_state {
            backend
                .scaled(&x.unbind(), &[first], |t| 1.0 / sc.state_scale(t))
                .map_err(|e| to_py(e, false))?
        } else {
            x.unbind()
        };
        let mut ctx = Ctx::new(&mut backend, schedule.inner.as_ref(), param, clip, rows);
        let out = samplers::run(&mut ctx, spec.sampler, &spec.opts, &times, x)
            .map_err(|e| to_py(e, false))?;
        let nfe = ctx.nfe();
        let out = if model_state {
            backend
                .scaled(&out, &[last], |t| sc.state_scale(t))
                .map_err(|e| to_py(e, false))?
        } else {
            out
        };
        Ok((out, nfe))
    })
}
