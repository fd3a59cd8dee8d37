"""Bad input gives a Python ValueError that names the bad value and what is accepted, and a
NaN fed anywhere gives a Python exception, never a Rust panic.

A Rust panic reaching Python is pyo3's ``PanicException`` (or, caught by the bindings'
guard, a RuntimeError "internal error in qtaylor (please report)"); both are failures.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import qtaylor
import qtaylor.torch as qt
from qtaylor import _core
from qtaylor._ops import TorchOps

NAN = float("nan")


def no_panic(e: BaseException):
    assert type(e).__name__ != "PanicException", f"a Rust panic reached Python: {e}"
    assert "internal error in qtaylor" not in str(e), f"a Rust panic (caught by the guard): {e}"


def _raised(fn) -> BaseException:
    try:
        got = fn()
    except BaseException as e:  # noqa: BLE001 - a PanicException derives from BaseException
        return e
    shown = repr(got)
    if len(shown) > 300:
        shown = shown[:300] + "..."
    pytest.fail(f"no exception; the call returned {shown}")


def raises_value_error(fn, *fragments):
    """fn() raises ValueError (not a panic) whose message contains every fragment."""
    e = _raised(fn)
    no_panic(e)
    assert isinstance(e, ValueError), f"expected ValueError, got {type(e).__name__}: {e}"
    msg = str(e)
    for f in fragments:
        assert f in msg, f"{f!r} not in the message {msg!r}"
    return e


def raises_python_error(fn, kind=Exception):
    """fn() raises a Python exception of ``kind``, not a Rust panic."""
    e = _raised(fn)
    no_panic(e)
    assert isinstance(e, kind), f"expected {kind.__name__}, got {type(e).__name__}: {e}"
    return e


@pytest.fixture(scope="module")
def vp():
    return _core.Schedule.vp_linear()


@pytest.fixture(scope="module")
def model(vp, exact_eps_model):
    return exact_eps_model(vp)


@pytest.fixture
def x0():
    return torch.from_numpy(_core.NoiseStreams(0, 2).normal([64]))


def scheduler(**kw):
    from qtaylor.diffusers import QTaylorScheduler

    return QTaylorScheduler(**kw)


# ---------------------------------------------------------------------------------------
# Names and values that are not accepted


@pytest.mark.parametrize(
    "route",
    ["spec", "torch", "scheduler", "spec-typo"],
)
def test_unknown_sampler_names_the_value_and_lists_the_samplers(route, model, x0, vp):
    name = "dpmpp-2x" if route == "spec-typo" else "no-such-sampler"
    fn = {
        "spec": lambda: qtaylor.SamplerSpec(name),
        "spec-typo": lambda: qtaylor.SamplerSpec(name),
        "torch": lambda: qt.sample(model, x0, name, 5, schedule=vp),
        "scheduler": lambda: scheduler(sampler=name),
    }[route]
    raises_value_error(fn, f"'{name}'", "qt-K", "ddim", "dpmpp-2m", "unipc-3", "edm-heun")


@pytest.mark.parametrize("route", ["spec", "torch", "scheduler", "coefficients"])
def test_order_zero_names_the_order_and_the_range(route, model, x0, vp):
    fn = {
        "spec": lambda: qtaylor.SamplerSpec("qt-0"),
        "torch": lambda: qt.sample(model, x0, "qt-0", 5, schedule=vp),
        "scheduler": lambda: scheduler(sampler="qt-0"),
        "coefficients": lambda: qtaylor.quasi_taylor_coefficients(vp, np.array([1.0]), np.array([0.9]), 0),
    }[route]
    raises_value_error(fn, "order 0", ">= 1")


def test_zero_steps_is_rejected_with_the_value(model, x0, vp):
    raises_value_error(lambda: qt.sample(model, x0, "qt-3", steps=0, schedule=vp), "steps=0", "positive integer")
    raises_value_error(lambda: qt.sample(model, x0, "qt-3", steps=-3, schedule=vp), "steps=-3", "positive integer")
    raises_value_error(
        lambda: qtaylor.discrete_grid(_core.Schedule.discrete(), steps=0), "steps=0", "at least one step"
    )
    raises_value_error(lambda: qtaylor.continuous_grid(vp, 0), "steps=0", "at least one step")
    raises_value_error(lambda: scheduler().set_timesteps(0), "num_inference_steps=0", "positive integer")


def test_timesteps_that_do_not_decrease_are_rejected():
    d = _core.Schedule.discrete()
    raises_value_error(lambda: qtaylor.discrete_grid(d, timesteps=[99, 199, 299]), "decrease strictly", "199", "99")
    raises_value_error(lambda: qtaylor.discrete_grid(d, timesteps=[500, 500]), "decrease strictly", "500")
    raises_value_error(lambda: scheduler().set_timesteps(timesteps=[1, 5, 3]), "decrease strictly", "5", "1")
    raises_value_error(
        lambda: qt.sample(lambda x, t: x, torch.zeros(1, 3), "ddim", timesteps=[99, 199, 299]),
        "decrease strictly",
        "199",
    )
    raises_value_error(lambda: qtaylor.discrete_grid(d, timesteps=[1000, 5]), "1000", "[0, 1000)")


@pytest.mark.parametrize("route", ["scheduler", "torch", "program"])
def test_unsupported_prediction_type_names_it_and_the_choices(route, model, x0, vp):
    fn = {
        "scheduler": lambda: scheduler(prediction_type="score"),
        "torch": lambda: qt.sample(model, x0, "qt-3", 5, schedule=vp, prediction_type="score"),
        "program": lambda: _core.Program(vp, qtaylor.SamplerSpec("qt-3"), [1.0, 0.5, 0.1], prediction_type="score"),
    }[route]
    raises_value_error(fn, "'score'", "epsilon", "sample", "v_prediction", "flow_prediction")


@pytest.mark.parametrize("route", ["torch", "grid"])
def test_unknown_grid_names_it_and_the_choices(route, model, x0, vp):
    fn = {
        "torch": lambda: qt.sample(model, x0, "qt-3", 5, schedule=vp, grid="cubic"),
        "grid": lambda: qtaylor.continuous_grid(vp, 5, "cubic"),
    }[route]
    raises_value_error(fn, "'cubic'", "uniform", "quadratic", "logsnr", "karras")


@pytest.mark.parametrize("route", ["spec", "torch", "scheduler", "coefficients"])
def test_unknown_expand_names_it_and_the_choices(route, model, x0, vp):
    fn = {
        "spec": lambda: qtaylor.SamplerSpec("qt-3", expand="sigma"),
        "torch": lambda: qt.sample(model, x0, "qt-3", 5, schedule=vp, expand="sigma"),
        "scheduler": lambda: scheduler(expand="sigma"),
        "coefficients": lambda: qtaylor.quasi_taylor_coefficients(
            vp, np.array([1.0]), np.array([0.9]), 2, expand="sigma"
        ),
    }[route]
    raises_value_error(fn, "'sigma'", "abar", "logsnr")


@pytest.mark.parametrize("sampler", ["rk45", "dpm-solver-12", "dpm-solver-23"])
def test_adaptive_sampler_through_the_scheduler_points_to_torch_sample(sampler, vp):
    raises_value_error(lambda: scheduler(sampler=sampler), f"'{sampler}'", "adaptive", "qtaylor.torch.sample")
    raises_value_error(
        lambda: _core.Program(vp, qtaylor.SamplerSpec(sampler), [1.0, 0.5, 0.1]),
        "adaptive",
        "qtaylor.torch.sample",
    )


# ---------------------------------------------------------------------------------------
# NaN: a Python exception, never a panic


def test_nan_in_the_start_state_is_a_value_error(model, x0, vp):
    x = x0.clone()
    x[1, 7] = NAN
    raises_value_error(lambda: qt.sample(model, x, "qt-3", 5, schedule=vp), "NaN")
    x[1, 7] = math.inf
    raises_value_error(lambda: qt.sample(model, x, "qt-3", 5, schedule=vp), "Inf")


@pytest.mark.parametrize(
    "sampler", ["qt-3", "heun", "dpmpp-2m", "pndm", "edm-heun", "ddpm", "rk45", "dpm-solver-12", "dpm-solver-23"]
)
@pytest.mark.parametrize("when", ["first call", "later call"])
def test_a_model_returning_nan_gives_a_python_exception(sampler, when, x0, vp, model):
    def bad(x, t):
        out = model(x, t)
        if when == "first call" or float(t.min()) < 0.5:
            out = out * NAN
        return out

    e = raises_python_error(lambda: qt.sample(bad, x0, sampler, 5, schedule=vp))
    assert isinstance(e, FloatingPointError) and "NaN" in str(e), e


def test_nan_noise_from_a_noise_sampler_gives_a_python_exception(x0, vp, model):
    raises_python_error(
        lambda: qt.sample(
            model, x0, "ddpm", 5, schedule=vp, noise_sampler=lambda like: torch.full_like(like, NAN)
        )
    )


def _ready_scheduler(**kw):
    s = scheduler(**kw)
    s.set_timesteps(5)
    return s


def test_nan_model_output_in_scheduler_step_is_a_value_error():
    s = _ready_scheduler()
    x = torch.randn(1, 4, 8, 8)
    raises_value_error(
        lambda: s.step(torch.full_like(x, NAN), s.timesteps[0], x), "NaN", f"timestep {int(s.timesteps[0])}"
    )
    # A good output after a bad one still runs (the bad one was not fed).
    out = s.step(torch.zeros_like(x), s.timesteps[0], x).prev_sample
    assert torch.isfinite(out).all()


def test_nan_timestep_in_scheduler_step_is_a_value_error():
    # A NaN timestep must not pass the "is this the sampler's next call" check.
    s = _ready_scheduler()
    x = torch.randn(1, 4, 8, 8)
    raises_value_error(lambda: s.step(torch.zeros_like(x), torch.tensor(NAN), x), "nan")


def test_nan_sample_in_scheduler_step_is_a_value_error():
    # qtaylor.torch.sample rejects a non-finite start state; the scheduler should too.
    s = _ready_scheduler()
    x = torch.full((1, 4, 8, 8), NAN)
    raises_value_error(lambda: s.step(torch.zeros_like(x), s.timesteps[0], x), "NaN")


@pytest.mark.parametrize("where", [0, 1, 2])
def test_nan_times_of_a_program_are_a_value_error(where, vp):
    times = [1.0, 0.5, 0.1]
    times[where] = NAN
    raises_value_error(
        lambda: _core.Program(vp, qtaylor.SamplerSpec("qt-3"), times), "NaN", f"entry {where}", "[0, 1]"
    )
    d = _core.Schedule.discrete()
    raises_value_error(lambda: _core.Program(d, qtaylor.SamplerSpec("ddim"), times), "NaN", f"entry {where}")


def test_nan_times_in_torch_sample_are_a_value_error(model, x0, vp):
    raises_value_error(lambda: qt.sample(model, x0, "qt-3", schedule=vp, times=[1.0, NAN, 0.1]), "NaN", "entry 1")
    raises_value_error(lambda: qt.sample(model, x0, "qt-3", 5, schedule=vp, t_max=NAN), "NaN")
    raises_value_error(lambda: qt.sample(model, x0, "qt-3", 5, schedule=vp, t_min=NAN), "NaN")


@pytest.mark.parametrize("grid", ["uniform", "quadratic", "logsnr", "karras"])
def test_nan_ends_of_a_continuous_grid_are_a_value_error(grid, vp):
    raises_value_error(lambda: qtaylor.continuous_grid(vp, 5, grid, t_min=NAN), "NaN")
    raises_value_error(lambda: qtaylor.continuous_grid(vp, 5, grid, t_max=NAN), "NaN")
    if grid == "karras":
        raises_value_error(lambda: qtaylor.continuous_grid(vp, 5, grid, rho=NAN), "rho", "NaN")


def test_nan_discrete_inputs_give_python_exceptions():
    d = _core.Schedule.discrete()
    raises_python_error(lambda: scheduler().set_timesteps(timesteps=[NAN, 5]), ValueError)
    raises_python_error(lambda: scheduler().set_timesteps(NAN), ValueError)
    raises_value_error(lambda: scheduler().set_timesteps(sigmas=[NAN, 1.0, 0.0]), "NaN", "entry 0", "sigmas=")
    raises_value_error(lambda: scheduler().set_timesteps(sigmas=[10.0, NAN, 0.0]), "NaN", "entry 1", "sigmas=")
    raises_python_error(lambda: qtaylor.discrete_grid(d, timesteps=[NAN, 5]), TypeError)
    raises_python_error(
        lambda: qt.sample(lambda x, t: x, torch.zeros(1, 3), "ddim", timesteps=[NAN, 5]), ValueError
    )
    raises_value_error(lambda: _core.Schedule.discrete(trained_betas=[0.1, NAN, 0.2]), "NaN", "beta[1]")
    raises_value_error(lambda: _core.Schedule.discrete("linear", NAN, 0.02), "NaN")
    raises_value_error(lambda: scheduler(clip_sample=True, clip_sample_range=NAN), "nan")


@pytest.mark.parametrize("timestep", [NAN, 5000.0, -5.0])
def test_add_noise_at_a_timestep_outside_the_schedule_is_a_value_error(timestep):
    # diffusers' schedulers raise (IndexError) here; a silent NaN/garbage x_t is a bug.
    s = scheduler()
    x0 = torch.zeros(1, 2)
    raises_value_error(lambda: s.add_noise(x0, torch.ones(1, 2), torch.tensor([timestep])), "timestep")


def test_nan_in_the_scalar_api_is_a_value_error(vp):
    raises_value_error(
        lambda: qtaylor.quasi_taylor_coefficients(vp, np.array([NAN]), np.array([0.9]), 2), "NaN", "[0, 1]"
    )
    raises_value_error(
        lambda: qtaylor.quasi_taylor_coefficients(vp, np.array([1.0]), np.array([NAN]), 2), "NaN", "[0, 1]"
    )
    raises_value_error(lambda: vp.derivatives("alpha", NAN, 2), "NaN", "[0, 1]")
    raises_value_error(lambda: vp.t_of_lambda(NAN), "NaN")
    raises_value_error(lambda: _core.Schedule.vp_linear(NAN, 20.0), "NaN")
    exact = _core.ExactProblem("gmm-demo", vp)
    raises_value_error(lambda: exact.eps(np.zeros((2, 64)), [NAN]), "NaN")
    for key in ("eta", "rtol", "atol", "s_churn", "s_noise", "s_tmin", "s_tmax"):
        raises_value_error(lambda: qtaylor.SamplerSpec("edm-heun", **{key: NAN}), "NaN")


def test_a_replay_rejects_a_nan_time(vp):
    program = _core.Program(vp, qtaylor.SamplerSpec("qt-3"), [1.0, 0.5, 0.1])
    replay = _core.Replay(program, torch.zeros(1, 4), TorchOps())
    raises_value_error(lambda: replay.x0(torch.zeros(1, 4), torch.zeros(1, 4), NAN, TorchOps()), "NaN")


@pytest.mark.parametrize("route", ["scheduler", "torch"])
def test_a_large_but_finite_model_output_is_not_reported_as_nan(route):
    # Every entry is finite (1e38 < float32 max 3.4e38), only their float32 sum overflows:
    # the finiteness check must look at the entries, not at a sum of them.
    big = torch.full((1, 4), 1e38, dtype=torch.float32)
    assert torch.isfinite(big).all()
    if route == "scheduler":
        s = _ready_scheduler(sampler="ddim")
        out = s.step(big, s.timesteps[0], torch.zeros(1, 4)).prev_sample
    else:
        out = qt.sample(lambda x, t: big.clone(), torch.zeros(1, 4), "ddim", 1).x
    assert torch.isfinite(out).all()


def test_a_billion_training_timesteps_is_a_value_error_before_any_table_is_built():
    # The fuzzed Rust loader's finding, through the Python doors: a stated limit of 65536.
    raises_value_error(lambda: _core.Schedule.discrete("linear", 1e-4, 0.02, 1_000_000_000), "65536")
    raises_value_error(lambda: scheduler(num_train_timesteps=1_000_000_000), "65536")
