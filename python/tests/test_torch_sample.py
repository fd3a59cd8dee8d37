"""``qtaylor.torch.sample``: no autograd graph unless asked, one callback per network call
(adaptive samplers too) with the calls so far, and a progress bar over the calls."""

from __future__ import annotations

import pytest
import torch

import qtaylor.torch as qt
from qtaylor import _core


@pytest.fixture(scope="module")
def vp():
    return _core.Schedule.vp_linear()


def _model(vp, weight=None):
    exact = _core.ExactProblem("gmm-demo", vp)

    def model(x, t):
        eps = torch.from_numpy(exact.eps(x.detach().double().numpy(), [float(v) for v in t])).to(x.dtype)
        return eps if weight is None else eps * weight

    return model


def _x():
    return torch.from_numpy(_core.NoiseStreams(0, 3).normal([64]))


def test_no_autograd_graph_is_kept_unless_asked(vp):
    w = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    out = qt.sample(_model(vp, w), _x(), "qt-3", 5, schedule=vp)
    assert not out.x.requires_grad and out.x.grad_fn is None
    out = qt.sample(_model(vp, w), _x(), "qt-3", 5, schedule=vp, grad=True)
    assert out.x.requires_grad
    out.x.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad)


@pytest.mark.parametrize("sampler,steps", [("qt-3", 6), ("heun", 4), ("dpmpp-2s", 3), ("rk45", 4), ("dpm-solver-23", 4)])
def test_the_callback_fires_once_per_network_call_with_the_calls_so_far(vp, sampler, steps):
    seen = []
    x = _x()[:1]
    out = qt.sample(_model(vp), x, sampler, steps, schedule=vp, callback=seen.append)
    assert [d["nfe"] for d in seen] == list(range(1, len(seen) + 1))
    assert len(seen) == round(out.nfe), (len(seen), out.nfe)
    for d in seen:
        assert d["x"].shape == x.shape and d["output"].shape == x.shape
        assert isinstance(d["i"], int) and isinstance(d["t"], float)


def test_progress_shows_a_bar_over_the_network_calls(vp, capsys):
    out = qt.sample(_model(vp), _x(), "heun", 4, schedule=vp, progress=True)
    err = capsys.readouterr().err
    assert f"{round(out.nfe)}/{round(out.nfe)}" in err, err
    assert "heun" in err and "NFE" in err
