//! `Program` and `Replay`: a fixed-grid run recorded as operations, replayed one network
//! call at a time (the diffusers scheduler's `step`).

use crate::*;

/// A fixed-grid sampler run recorded as operations, for a caller that owns the loop.
#[pyclass(module = "qtaylor._core", frozen)]
pub(crate) struct Program {
    pub(crate) inner: Arc<CoreProgram>,
    pub(crate) schedule: Schedule,
    pub(crate) param: Parameterization,
    pub(crate) clip: Option<X0Clip>,
    /// Grid step of each network call.
    pub(crate) call_steps: Vec<usize>,
}

#[pymethods]
impl Program {
    /// Records `spec` over the grid `times` for a network predicting `prediction_type`,
    /// x̂0 clamped to ±`clip` or dynamically thresholded with `threshold = (ratio, max)`.
    #[new]
    #[pyo3(signature = (schedule, spec, times, prediction_type = "epsilon", clip = None, threshold = None))]
    pub(crate) fn new(
        schedule: &Schedule,
        spec: &SamplerSpec,
        times: Vec<f64>,
        prediction_type: &str,
        clip: Option<f64>,
        threshold: Option<(f64, f64)>,
    ) -> PyResult<Self> {
        guard(|| {
            let param = parse_param(prediction_type)?;
            let clip = x0_clip(clip, threshold)?;
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
    pub(crate) fn call_times(&self) -> Vec<f64> {
        self.inner.model_calls().iter().map(|c| c.1).collect()
    }

    /// The network's time argument (diffusers timestep for discrete schedules) of every
    /// network call.
    #[getter]
    pub(crate) fn call_model_times(&self) -> Vec<f64> {
        self.inner
            .model_calls()
            .iter()
            .map(|c| self.schedule.model_t(c.1))
            .collect()
    }

    /// The grid step each network call belongs to.
    #[getter]
    pub(crate) fn call_steps(&self) -> Vec<usize> {
        self.call_steps.clone()
    }

    /// Network evaluations per sample.
    #[getter]
    pub(crate) fn nfe(&self) -> f64 {
        self.inner.nfe
    }

    /// Number of operations (after dead-code elimination).
    #[getter]
    pub(crate) fn num_ops(&self) -> usize {
        self.inner.ops.len()
    }

    /// The operations as text, one per line (for debugging and documentation).
    pub(crate) fn describe(&self) -> String {
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
                Op::Threshold { out, x, ratio, max } => {
                    format!("r{out} = threshold(r{x}, ratio={ratio}, max={max})")
                }
                Op::Begin { i, t, x } => format!("# step {i} at t={t} from r{x}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The state of one replay of a [`Program`]: its registers and the next network call.
#[pyclass(module = "qtaylor._core")]
pub(crate) struct Replay {
    pub(crate) program: Arc<CoreProgram>,
    pub(crate) schedule: Schedule,
    pub(crate) param: Parameterization,
    pub(crate) clip: Option<X0Clip>,
    pub(crate) regs: Vec<Option<Py<PyAny>>>,
    /// Index into `program.ops` of the network call waiting for its output.
    pub(crate) at: Option<usize>,
    pub(crate) calls_done: usize,
    pub(crate) finished: bool,
}

impl Replay {
    pub(crate) fn advance(
        &mut self,
        py: Python<'_>,
        ops: &Bound<'_, PyAny>,
        from: usize,
    ) -> PyResult<()> {
        let mut backend = PyBackend {
            py,
            ops,
            schedule: &self.schedule,
            model_state: false,
        };
        let next = self
            .program
            .run_until_model(&mut backend, &mut self.regs, from)
            .map_err(|e| to_py(e, false))?;
        self.at = next;
        self.finished = next.is_none();
        Ok(())
    }

    pub(crate) fn reg(&self, py: Python<'_>, r: usize) -> PyResult<Py<PyAny>> {
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
    pub(crate) fn new(
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
    pub(crate) fn pending_input(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
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
    pub(crate) fn calls_done(&self) -> usize {
        self.calls_done
    }

    #[getter]
    pub(crate) fn finished(&self) -> bool {
        self.finished
    }

    /// Feeds the output of the pending network call, evaluated at `sample` (which
    /// replaces the program's copy of that state, so a pipeline may edit its latents), and
    /// runs to the next call. Returns the next state to evaluate, or the result when the
    /// program is finished.
    pub(crate) fn feed(
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
    pub(crate) fn x0(
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
                model_state: false,
            };
            let (a, s) = (self.schedule.inner.alpha(t), self.schedule.inner.sigma(t));
            let (_, d) = qtaylor_core::exec::conversion(self.param, a, s);
            let (x, p) = (sample.unbind(), model_output.unbind());
            let mut x0 = backend
                .lincomb(&[(Coef::All(d[0]), &x), (Coef::All(d[1]), &p)])
                .map_err(|e| to_py(e, false))?;
            if let Some(clip) = self.clip {
                x0 = clip.apply(&mut backend, &x0).map_err(|e| to_py(e, false))?;
            }
            Ok(x0)
        })
    }
}
