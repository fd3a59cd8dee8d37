#!/usr/bin/env python3
"""PyTorch baseline for `qtaylor train`: the same training step with diffusers' own
UNet2DModel, built from the same config.json, on the same data.

One step, as qtaylor's (src/train/mod.rs): a batch of MNIST digits scaled to [-1, 1], a timestep
uniform in {0, ..., 999} per image, eps ~ N(0, I), x_t = sqrt(abar) x0 + sqrt(1 - abar) eps on
diffusers' linear beta schedule, labels dropped to the null class (the last one) with
probability --label-dropout when the config has num_class_embeds; MSE of the predicted eps;
backward; global gradient norm clipped to 1; torch.optim.AdamW (lr 1e-3, betas 0.9/0.999,
eps 1e-8, no weight decay); an EMA of the weights (decay min(0.999, (1+k)/(10+k))).

What a user would run at its strongest: the data stays on the GPU (indices, timesteps and
noise drawn there), AdamW in its default multi-tensor form or fused, the EMA as one
torch._foreach_lerp_, no host synchronisation inside the timed steps, cudnn.benchmark on.
Variants (--variants, comma-separated):
  eager         NCHW, foreach AdamW
  eager-fused   NCHW, AdamW(fused=True)
  channels-last model and batches in channels_last, fused AdamW
  compile       torch.compile(model) (default mode), fused AdamW; its compile time (the
                warm-up steps) is printed on its own line and left out of the rate
--tf32 on|off: torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
(PyTorch's defaults are on for convolutions and off for matmuls; `off` is exact f32).

Prints one line per variant:
  torch-train VARIANT tf32=on|off: R steps/s, M ms/step, peak P MiB (compile C s)
"""
import argparse
import gzip
import json
import os
import struct
import sys
import time

import numpy as np
import torch


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        sys.exit(f"error: {path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(data, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(data, name)
        if os.path.exists(p):
            return p
    sys.exit(f"error: {data}: no {stem}[.gz]")


def run(variant, args, config, images, labels, device):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel.from_config(config).to(device)
    model.train()
    fmt = torch.channels_last if variant == "channels-last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    params = [p for p in model.parameters()]
    fused = variant != "eager" and device.type == "cuda"
    opt = torch.optim.AdamW(
        params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=fused
    )
    ema = [p.detach().clone() for p in params]
    net = torch.compile(model) if variant == "compile" else model
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    abar = torch.cumprod(1.0 - betas, 0).to(device)
    classes = config.get("num_class_embeds")
    n = images.shape[0]
    gen = torch.Generator(device=device)
    gen.manual_seed(0)

    def step(k):
        idx = torch.randint(0, n, (args.batch,), device=device, generator=gen)
        x0 = images[idx]
        t = torch.randint(0, 1000, (args.batch,), device=device, generator=gen)
        eps = torch.randn(x0.shape, device=device, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = (a.sqrt() * x0 + (1 - a).sqrt() * eps).contiguous(memory_format=fmt)
        cl = None
        if classes:
            cl = labels[idx]
            drop = torch.rand(args.batch, device=device, generator=gen) < args.label_dropout
            cl = torch.where(drop, torch.full_like(cl, classes - 1), cl)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, k / 200)
        pred = net(xt, t, class_labels=cl).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + k) / (10 + k))
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - decay)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for k in range(1, args.warmup + 1):
        loss = step(k)
    sync()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in range(args.warmup + 1, args.warmup + args.steps + 1):
        loss = step(k)
    sync()
    secs = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    extra = f" (compile and {args.warmup} warm-up steps {warm:.1f} s)" if variant == "compile" else ""
    print(
        f"torch-train {variant} tf32={args.tf32}: {args.steps / secs:.3f} steps/s, "
        f"{1e3 * secs / args.steps:.1f} ms/step, peak {peak:.0f} MiB, "
        f"loss {loss.item():.4f}{extra}",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a UNet2DModel config.json")
    ap.add_argument("--data", required=True, help="folder with train-images-idx3-ubyte[.gz]")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--label-dropout", type=float, default=0.1)
    ap.add_argument("--variants", default="eager,eager-fused,channels-last,compile")
    ap.add_argument("--tf32", choices=["on", "off"], default="on")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
    with open(args.config) as f:
        config = json.load(f)
    imgs = read_idx(find(args.data, "train-images-idx3-ubyte"))
    labs = read_idx(find(args.data, "train-labels-idx1-ubyte"))
    images = torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1.0).unsqueeze(1).to(device)
    labels = torch.from_numpy(labs.astype(np.int64)).to(device)
    for v in args.variants.split(","):
        try:
            run(v.strip(), args, config, images, labels, device)
        except Exception as e:  # one failed variant (e.g. no compiler) leaves the others
            print(f"torch-train {v} tf32={args.tf32}: failed: {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
