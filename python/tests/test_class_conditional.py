"""A class-conditional checkpoint written by ``qtaylor train`` (``num_class_embeds`` in
its config, trained with label dropout) is a diffusers checkpoint: ``UNet2DModel`` loads it
and its outputs with ``class_labels`` equal qtaylor's to 1e-5 (checked by ``qtaylor
parity`` against diffusers' own outputs); so are the shipped ``assets/mnist-cond-unet`` (the
embedded default) and ``assets/fashion-cond-unet``."""
import gzip
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file

CONFIG = {
    "block_out_channels": [8, 16],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4,
    "attention_head_dim": None,
    "in_channels": 1,
    "out_channels": 1,
    "num_class_embeds": 3,
}


def idx(dims, data):
    head = bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    return head + bytes(data)


def reference(model, x, null, labels):
    """diffusers' outputs in the layout `qtaylor parity` reads: at the null class for three
    timestep sets, and at `labels`."""
    n = {"class_labels": torch.tensor([null] * len(labels))}
    with torch.no_grad():
        return {
            "x": x,
            "out": model(x, torch.tensor([3, 999]), **n).sample,
            "out_t500": model(x, torch.tensor([500, 500]), **n).sample,
            "out_t37_5": model(x, torch.tensor([37.5, 37.5]), **n).sample,
            "labels": torch.tensor([float(c) for c in labels]),
            "out_labels": model(x, torch.tensor([3, 999]), class_labels=torch.tensor(labels)).sample,
        }


def test_diffusers_loads_a_class_conditional_qtaylor_checkpoint_with_equal_outputs(qtaylor_bin, tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(32, 8, 8), dtype=np.uint8)
    labels = (np.arange(32) % 2).astype(np.uint8)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx([32, 8, 8], images.tobytes())))
    (data / "train-labels-idx1-ubyte").write_bytes(idx([32], labels.tobytes()))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(CONFIG))
    ckpt = tmp_path / "ckpt"
    subprocess.run([str(qtaylor_bin), "train", "--data", str(data), "--config", str(cfg), "--out", str(ckpt),
                    "--steps", "4", "--batch", "8", "--label-dropout", "0.2"], check=True, capture_output=True)

    model = UNet2DModel.from_pretrained(ckpt).eval()
    assert model.config.num_class_embeds == 3 and model.class_embedding is not None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 8, generator=g)
    ref = reference(model, x, null=2, labels=[1, 0])
    # The label changes the output (the class embedding is wired in, not ignored).
    assert (ref["out_labels"] - ref["out"]).abs().max() > 1e-4
    save_file({k: v.contiguous() for k, v in ref.items()}, str(ckpt / "reference.safetensors"))
    r = subprocess.run([str(qtaylor_bin), "parity", "--model", str(ckpt), "--tol", "1e-5"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "out_labels" in r.stdout


def test_diffusers_loads_the_shipped_class_conditional_models_with_equal_outputs(qtaylor_bin, tmp_path):
    # The embedded default (assets/mnist-cond-unet) and the Fashion-MNIST model, f16 weights run
    # in f32 on both sides, at the null class 10 and at real labels.
    repo = Path(__file__).resolve().parents[2]
    for name in ["mnist-cond-unet", "fashion-cond-unet"]:
        ckpt = tmp_path / name
        ckpt.mkdir()
        for f in ["config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors"]:
            shutil.copy(repo / "assets" / name / f, ckpt / f)
        model = UNet2DModel.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
        assert model.config.num_class_embeds == 11
        x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
        ref = reference(model, x, null=10, labels=[7, 2])
        assert (ref["out_labels"] - ref["out"]).abs().max() > 1e-3, name
        save_file({k: v.contiguous() for k, v in ref.items()}, str(ckpt / "reference.safetensors"))
        r = subprocess.run([str(qtaylor_bin), "parity", "--model", str(ckpt), "--tol", "1e-5"],
                           capture_output=True, text=True)
        assert r.returncode == 0, name + ": " + r.stderr + r.stdout
        assert "out_labels" in r.stdout, name
