"""Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/): small valid inputs of
every loader, from numpy, gzip and diffusers themselves, plus the repository's fixtures.

    target/py-venv/bin/python fuzz/make-seeds.py      # needs numpy, torch, diffusers
"""
import gzip, io, json, pathlib, struct

import numpy as np

root = pathlib.Path(__file__).resolve().parent
corpus = root / "corpus"
repo = root.parent


def put(target, name, data):
    d = corpus / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())


# npy: what numpy writes, f4 and f8, 1-D and 2-D, and an empty array.
for name, a in {
    "f4-2x2": np.arange(4, dtype="<f4").reshape(2, 2),
    "f8-3x2": np.linspace(-1, 1, 6).reshape(3, 2),
    "f4-1d": np.ones(3, dtype="<f4"),
    "f8-0x2": np.zeros((0, 2)),
}.items():
    b = io.BytesIO()
    np.save(b, a)
    put("npy", name, b.getvalue())

# IDX: first byte 0 = plain, 1 = gzip (see targets::idx).
def idx(dims, data):
    return bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + bytes(data)

put("idx", "images", b"\0" + idx([2, 2, 2], range(8)))
put("idx", "labels", b"\0" + idx([3], [1, 2, 3]))
put("idx", "images-gz", b"\1" + gzip.compress(idx([2, 3, 3], range(18)), mtime=0))

# Mixture JSON.
put("mixture", "two", json.dumps({"dim": 2, "weights": [0.3, 0.7], "means": [[0, 1], [1, -1]],
                                  "variances": [[0.1, 0.2], [0.5, 0.5]]}))
put("mixture", "one", json.dumps({"dim": 1, "weights": [1], "means": [[0]], "variances": [[1]]}))

# Scheduler configs: the fixture's, and the other beta schedules and options.
fixture = repo / "tests/fixtures/unet2d/ddpm_legacy"
sched = (fixture / "scheduler/scheduler_config.json").read_text()
put("scheduler_config", "fixture", sched)
for i, extra in enumerate([
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
    {"num_train_timesteps": 4, "trained_betas": [0.1, 0.2, 0.3, 0.4], "clip_sample": True},
]):
    c = json.loads(sched)
    c.update(extra)
    put("scheduler_config", f"variant-{i}", json.dumps(c))

# Grid lists: sampler, --timesteps, --sigmas, grid file (see targets::grid_lists).
grid_file = sorted((repo / "docs/grids-mnist/grids").glob("*.json"))[0].read_text()
put("grid_lists", "ddim", "ddim\n999,500,0\n14.6,1,0.1,0\n" + grid_file)
put("grid_lists", "qt-3", "qt-3\n999.5,500.25,10\n80,5,0.5\n{}")
put("grid_lists", "unipc", "unipc-3\n900,600,300,0\n10,0\n" + grid_file)

# Checkpoints: u32 length + config.json, u32 length + scheduler_config.json, safetensors.
def frame(cfg, sch, weights):
    cfg, sch = cfg.encode(), sch.encode()
    return struct.pack("<I", len(cfg)) + cfg + struct.pack("<I", len(sch)) + sch + weights

import torch
from diffusers import UNet2DModel

torch.manual_seed(0)
tiny = UNet2DModel(sample_size=4, in_channels=1, out_channels=1, layers_per_block=1,
                   block_out_channels=(4, 8), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=2,
                   attention_head_dim=None)
tmp = root / "target" / "seed-model"
tiny.save_pretrained(tmp, safe_serialization=True)
put("checkpoint", "tiny", frame((tmp / "config.json").read_text(), sched,
                                (tmp / "diffusion_pytorch_model.safetensors").read_bytes()))
put("checkpoint", "header-only", frame((tmp / "config.json").read_text(), sched,
                                       struct.pack("<Q", 2) + b"{}"))
print("seeds written to", corpus)
