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
//! The keywords are a second parser into the core's settings (the command line is the
//! first): [`schedule`], [`grids`] (`grid_times` is the command line's grid builder),
//! [`spec`] (`SamplerSpec` builds its options with `SamplerSettings`), [`backend`],
//! [`program`], [`problems`].
//!
//! Every error is a Python `ValueError` (bad input) or `RuntimeError` (a failure while
//! running), its option keys written as Python keywords (`qt_last='taylor'`, [`Keywords`]);
//! a Rust panic is caught at the boundary and raised as `RuntimeError`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use numpy::{IntoPyArray, PyArray1, PyArrayDyn, PyReadonlyArray1, PyReadonlyArrayDyn};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use qtaylor_core::config::{DiscreteDefaults, GivenTimes, GridSettings, SamplerSettings};
use qtaylor_core::exec::{Backend, Coef, Ctx, Parameterization, Tolerance, X0Clip};
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

mod backend;
mod grids;
mod problems;
mod program;
mod schedule;
mod spec;

use backend::*;
use grids::*;
use problems::*;
use program::*;
use schedule::*;
use spec::*;

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
