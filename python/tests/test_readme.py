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


def test_readme_flow_section_swaps_the_scheduler_of_sd3_and_flux():
    """The two lines of "Flow-matching models (SD3, Flux)" on tiny SD3 and Flux pipelines
    (built offline as test_flow_pipelines builds them)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
    from test_flow_pipelines import _call, _sd3_parts, _vae

    text = (REPO / "README.md").read_text()
    section = text.split("## Flow-matching models (SD3, Flux)", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1 and "QTaylorScheduler.from_config(pipe.scheduler.config" in blocks[0]
    sd3 = StableDiffusion3Pipeline(**_sd3_parts())
    torch.manual_seed(0)
    from diffusers import FluxTransformer2DModel

    flux = FluxPipeline(
        transformer=FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        ),
        vae=_vae(1), scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
    )
    for pipe in (sd3, flux):
        ns = {"pipe": pipe}
        exec(compile(blocks[0], "README.md (flow two lines)", "exec"), ns)
        assert type(pipe.scheduler).__name__ == "QTaylorScheduler"
        assert pipe.scheduler.config.prediction_type == "flow_prediction"
        out = _call(pipe)
        assert bool(torch.isfinite(out).all())
