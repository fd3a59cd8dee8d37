"""The Python package names every option by its keyword: each fault of
``tests/fixtures/option-faults.json`` raised through ``qtaylor.torch.sample`` or
``SamplerSpec`` is a ValueError whose message spells its options as keywords
(``qt_last='taylor'``), never as the command line's flags. ``tests/option_keys.rs`` runs the
same faults through ``qtaylor sample``, where the same options read ``--qt-last taylor``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qtaylor
import qtaylor.torch as qt
from qtaylor import _core

FAULTS = json.loads(
    (Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "option-faults.json").read_text()
)


@pytest.mark.parametrize("fault", FAULTS, ids=[f["fault"] for f in FAULTS])
def test_each_fault_names_its_options_with_python_keywords(fault):
    py = fault["python"]
    vp = _core.Schedule.vp_linear()
    if py["call"] == "spec":
        call = lambda: qtaylor.SamplerSpec(py["sampler"], **py["kwargs"])  # noqa: E731
    else:
        exact = _core.ExactProblem("gmm-demo", vp)

        def model(x, t):
            return torch.from_numpy(exact.eps(x.double().numpy(), [float(v) for v in t])).to(x.dtype)

        x = torch.from_numpy(_core.NoiseStreams(0, 2).normal([64]))
        call = lambda: qt.sample(model, x, py["sampler"], 5, schedule=vp, **py["kwargs"])  # noqa: E731
    with pytest.raises(ValueError) as info:
        call()
    msg = str(info.value)
    for says in fault["python_says"]:
        assert says in msg, f"{says!r} not in {msg!r}"
    assert "--" not in msg, f"a command-line flag in a Python message: {msg!r}"
