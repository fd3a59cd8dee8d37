"""The GPU side-by-side's PyTorch script (scripts/torch_diffusers_bench.py) runs on the CPU,
so that a device session is not spent finding a broken baseline: diffusers' UNet2DModel in
the eager variants, with timings, FLOP and parity to eager f32 in its JSON."""

import json
import math
import subprocess
import sys


def test_the_pytorch_baseline_script_measures_every_eager_variant_with_parity_to_eager_f32(repo_root, tmp_path):
    out = tmp_path / "torch.json"
    subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "torch_diffusers_bench.py"),
         "--model", str(repo_root / "tests" / "fixtures" / "unet2d" / "multihead"),
         "--device", "cpu", "--dtype", "f32", "--batches", "1,2", "--variants", "eager,eager-cl",
         "--repeats", "1", "--chain", "2", "--steps", "2", "--peak-repeats", "1", "--json", str(out)],
        check=True, capture_output=True, text=True, cwd=repo_root)
    d = json.loads(out.read_text())
    assert d["dtype"] == "f32" and d["peak_flops"] > 0 and d["diffusers"]
    rows = d["rows"]
    assert [(r["batch"], r["variant"]) for r in rows] == [(1, "eager"), (1, "eager-cl"), (2, "eager"), (2, "eager-cl")]
    for r in rows:
        assert r["per_call_s"] > 0 and r["back_to_back_s"] > 0 and r["sample_s"] > 0
        assert r["max_rel_err"] < 1e-5, r
        assert math.isclose(r["flop"], rows[0]["flop"] * r["batch"], rel_tol=1e-12)
        assert r["tflops"] > 0
