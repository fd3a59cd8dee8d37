"""README.md's Python section runs as written (from the repository root)."""

import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def python_blocks():
    text = (REPO / "README.md").read_text()
    section = text.split("## Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_python_section_runs_as_written(monkeypatch):
    blocks = python_blocks()
    assert len(blocks) == 3, f"expected the two-line, pipeline and loop blocks, found {len(blocks)}"
    two_lines, pipeline, loop = blocks
    assert "QTaylorScheduler.from_config(pipe.scheduler.config" in two_lines
    monkeypatch.chdir(REPO)
    import torch

    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(pipeline, "README.md (pipeline)", "exec"), ns)
    assert ns["images"].shape == (4, 28, 28, 1)
    assert np.isfinite(ns["images"]).all()
    exec(compile(two_lines, "README.md (two lines)", "exec"), ns)
    assert type(ns["pipe"].scheduler).__name__ == "QTaylorScheduler"
    exec(compile(loop, "README.md (loop)", "exec"), ns)
    out = ns["out"]
    assert out.x.shape == (4, 1, 28, 28) and out.nfe == 10
    assert torch.isfinite(out.x).all()
