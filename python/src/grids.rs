//! Time grids: continuous and discrete ones, the command line's grid builder (`grid_times`),
//! and the quasi-Taylor coefficients.

use crate::*;

/// A continuous grid of `steps + 1` times from `t_max` to `t_min`: uniform, quadratic,
/// logsnr or karras (`rho`); with `to_zero` the last of the `steps` steps goes to t = 0
/// (σ = 0, x̂0), as diffusers' final sigma 0. On a discrete
/// schedule `t_min` defaults to the first trained step 1/T and the times are fractional
/// steps, as diffusers' `use_karras_sigmas`.
#[pyfunction]
#[pyo3(signature = (schedule, steps, grid = "uniform", t_max = None, t_min = None, rho = 7.0, to_zero = false))]
#[allow(clippy::too_many_arguments)]
pub(crate) fn continuous_grid<'py>(
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
pub(crate) fn discrete_grid<'py>(
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
pub(crate) fn grid_times<'py>(
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
pub(crate) type ArrayPair<'py> = (Bound<'py, PyArray1<f64>>, Bound<'py, PyArray1<f64>>);

/// `(A, B)` arrays of the order-K quasi-Taylor step `x_s = A x_t + B ε̂` for each pair of
/// times (arXiv 2112.13339); `expand` is the expansion variable t, abar or logsnr.
#[pyfunction]
#[pyo3(signature = (schedule, t, s, order, expand = "t"))]
pub(crate) fn quasi_taylor_coefficients<'py>(
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
