#!/usr/bin/env python3
"""Checks that diffusers itself loads a checkpoint folder written by `qtaylor train` (default:
the embedded model, assets/mnist-unet) with UNet2DModel.from_pretrained and
DDPMScheduler.from_pretrained, and that its network outputs equal qtaylor's: writes diffusers'
outputs as reference.safetensors into a temporary copy of the folder and runs
`qtaylor parity` on it (f32, tolerance 1e-4). Run by scripts/compare-diffusers.sh.

Usage: diffusers-load-check.py [CHECKPOINT_DIR] [--qtaylor PATH]"""
import argparse
import pathlib
import shutil
import subprocess
import sys
import tempfile

import diffusers
import torch
from safetensors.torch import save_file

REPO = pathlib.Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", default=str(REPO / "assets" / "mnist-unet"))
    ap.add_argument("--qtaylor", default=str(REPO / "target" / "release" / "qtaylor"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp) / "ckpt"
        shutil.copytree(a.checkpoint, d, ignore=shutil.ignore_patterns("train_state*", "*.csv", "*.md"))
        m = diffusers.UNet2DModel.from_pretrained(d).float().eval()
        s = diffusers.DDPMScheduler.from_pretrained(d)
        n = sum(p.numel() for p in m.parameters())
        print(f"diffusers {diffusers.__version__} loaded {a.checkpoint}: UNet2DModel "
              f"({n} parameters), {type(s).__name__} ({s.config.prediction_type}, "
              f"{s.config.timestep_spacing} spacing)")
        size = m.config.sample_size
        x = torch.randn(2, m.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            ref = {
                "x": x,
                "out": m(x, torch.tensor([3, 999])).sample,
                "out_t500": m(x, torch.tensor([500])).sample,
                "out_t37_5": m(x, torch.tensor([37.5])).sample,
            }
        save_file({k: v.contiguous() for k, v in ref.items()}, str(d / "reference.safetensors"))
        p = subprocess.run([a.qtaylor, "parity", "--model", str(d), "--tol", "1e-4"])
        sys.exit(p.returncode)


if __name__ == "__main__":
    main()
