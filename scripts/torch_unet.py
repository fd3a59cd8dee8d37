#!/usr/bin/env python3
"""PyTorch eager baseline for the GPU benchmarks: diffusers' UNet2DModel forward written with
torch.nn.functional (the same ops diffusers runs: conv2d, group_norm, silu,
scaled_dot_product_attention, nearest interpolation), loaded from a diffusers checkpoint
folder (`unet/config.json`, `unet/diffusion_pytorch_model.safetensors`). Needs only torch and
numpy (the GPU machine has no diffusers); safetensors are read by a 20-line reader.

It was checked against diffusers 0.42.1 on the parity fixtures (--check): max relative
difference 1e-6 in f32.

  python3 scripts/torch_unet.py --model DIR --batch 256 --device cuda --dtype f32 --steps 10
  python3 scripts/torch_unet.py --check tests/fixtures/unet2d/ddpm_legacy

Prints lines that mirror `qtaylor speed`: forward images/s, a full one-NFE sample loop of
--steps network calls (with the x <- a*x + b*eps update), peak device memory.
"""
import argparse
import json
import math
import os
import statistics
import struct
import time

import numpy as np
import torch
import torch.nn.functional as F

DT = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64}


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype=DT[v["dtype"]]).reshape(v["shape"])
        out[k] = torch.from_numpy(arr.copy())
    return out


LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def load(model_dir, device, dtype):
    d = os.path.join(model_dir, "unet") if os.path.isdir(os.path.join(model_dir, "unet")) else model_dir
    cfg = json.load(open(os.path.join(d, "config.json")))
    defaults = dict(center_input_sample=False, freq_shift=0, flip_sin_to_cos=True, mid_block_scale_factor=1,
                    downsample_padding=1, attention_head_dim=8, norm_eps=1e-5, norm_num_groups=32,
                    resnet_time_scale_shift="default", add_attention=True, attn_norm_num_groups=None)
    for k, v in defaults.items():
        cfg.setdefault(k, v)
    sd = read_safetensors(os.path.join(d, "diffusion_pytorch_model.safetensors"))
    fixed = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) >= 2 and parts[-2] in LEGACY:
            k = ".".join(parts[:-2] + [LEGACY[parts[-2]], parts[-1]])
        fixed[k] = v.to(device=device, dtype=dtype)
    return cfg, fixed


def gn(x, sd, p, g, eps):
    return F.group_norm(x, g, sd[p + ".weight"], sd[p + ".bias"], eps)


def conv(x, sd, p, stride=1, padding=1):
    return F.conv2d(x, sd[p + ".weight"], sd[p + ".bias"], stride=stride, padding=padding)


def lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def temb_of(t, dim, flip, shift, dtype):
    half = dim // 2
    ex = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    a = t.float()[:, None] * torch.exp(ex)[None]
    e = torch.cat([torch.sin(a), torch.cos(a)], -1)
    if flip:
        e = torch.cat([e[:, half:], e[:, :half]], -1)
    return e.to(dtype)


def resnet(x, temb, sd, p, c, osf=1.0):
    g, eps = c["norm_num_groups"], c["norm_eps"]
    h = conv(F.silu(gn(x, sd, p + ".norm1", g, eps)), sd, p + ".conv1")
    t = lin(F.silu(temb), sd, p + ".time_emb_proj")[:, :, None, None]
    if c["resnet_time_scale_shift"] == "default":
        h = gn(h + t, sd, p + ".norm2", g, eps)
    else:
        scale, shift = t.chunk(2, dim=1)
        h = gn(h, sd, p + ".norm2", g, eps) * (1 + scale) + shift
    h = conv(F.silu(h), sd, p + ".conv2")
    if p + ".conv_shortcut.weight" in sd:
        x = conv(x, sd, p + ".conv_shortcut", padding=0)
    return (x + h) / osf


def attn(x, sd, p, c, head_dim, groups, rescale=1.0):
    b, ch, hh, ww = x.shape
    h = gn(x, sd, p + ".group_norm", groups, c["norm_eps"]) if groups is not None else x
    h = h.reshape(b, ch, hh * ww).transpose(1, 2)
    nh = ch // head_dim
    q, k, v = (lin(h, sd, p + n).reshape(b, hh * ww, nh, head_dim).transpose(1, 2)
               for n in (".to_q", ".to_k", ".to_v"))
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, hh * ww, ch)
    o = lin(o, sd, p + ".to_out.0").transpose(1, 2).reshape(b, ch, hh, ww)
    return (o + x) / rescale


def forward(sd, c, x, t):
    boc, L, n = c["block_out_channels"], c["layers_per_block"], len(c["block_out_channels"])
    if c["center_input_sample"]:
        x = 2 * x - 1.0
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    e = temb_of(t, boc[0], c["flip_sin_to_cos"], c["freq_shift"], x.dtype)
    temb = lin(F.silu(lin(e, sd, "time_embedding.linear_1")), sd, "time_embedding.linear_2")
    hd = lambda ch: c["attention_head_dim"] if c["attention_head_dim"] is not None else ch
    g = c["norm_num_groups"]
    h = conv(x, sd, "conv_in")
    skips = [h]
    for i, bt in enumerate(c["down_block_types"]):
        for j in range(L):
            h = resnet(h, temb, sd, f"down_blocks.{i}.resnets.{j}", c)
            if bt == "AttnDownBlock2D":
                h = attn(h, sd, f"down_blocks.{i}.attentions.{j}", c, hd(boc[i]), g)
            skips.append(h)
        if i < n - 1:
            if c["downsample_padding"] == 0:
                h = F.pad(h, (0, 1, 0, 1))
            h = conv(h, sd, f"down_blocks.{i}.downsamplers.0.conv", stride=2, padding=c["downsample_padding"])
            skips.append(h)
    m = c["mid_block_scale_factor"]
    h = resnet(h, temb, sd, "mid_block.resnets.0", c, m)
    if c["add_attention"]:
        ag = c["attn_norm_num_groups"]
        if ag is None:
            ag = g if c["resnet_time_scale_shift"] == "default" else None
        h = attn(h, sd, "mid_block.attentions.0", c, hd(boc[-1]), ag, m)
    h = resnet(h, temb, sd, "mid_block.resnets.1", c, m)
    rev = list(reversed(boc))
    for i, bt in enumerate(c["up_block_types"]):
        for j in range(L + 1):
            h = resnet(torch.cat([h, skips.pop()], dim=1), temb, sd, f"up_blocks.{i}.resnets.{j}", c)
            if bt == "AttnUpBlock2D":
                h = attn(h, sd, f"up_blocks.{i}.attentions.{j}", c, hd(rev[i]), g)
        if i < n - 1:
            h = conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), sd, f"up_blocks.{i}.upsamplers.0.conv")
    return conv(F.silu(gn(h, sd, "conv_norm_out", g, c["norm_eps"])), sd, "conv_out")


def check(fixture):
    c, sd = load(fixture, "cpu", torch.float32)
    r = read_safetensors(os.path.join(fixture, "reference.safetensors"))
    with torch.no_grad():
        y = forward(sd, c, r["x"], r["t"])
    e = ((y - r["out"]).abs().max() / r["out"].abs().max()).item()
    print(f"{fixture}: max relative difference to diffusers {e:.2e}")
    return e


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--check", nargs="*")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top operators")
    ap.add_argument("--tf32", choices=["default", "on", "off"], default="default",
                    help="torch.backends.cudnn.allow_tf32 (PyTorch's default: on for convolutions)")
    a = ap.parse_args()
    if a.tf32 != "default":
        torch.backends.cudnn.allow_tf32 = a.tf32 == "on"
    if a.check:
        worst = max(check(f) for f in a.check)
        raise SystemExit(0 if worst < 1e-4 else 1)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    c, sd = load(a.model, a.device, dtype)
    n = sum(v.numel() for v in sd.values())
    size = c.get("sample_size", 32)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(a.batch, c["in_channels"], size, size, generator=g).to(a.device, dtype)
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def timed(f):
        f()
        sync()
        v = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            f()
            sync()
            v.append(time.perf_counter() - t0)
        return statistics.median(v)

    ts = torch.linspace(999, 0, a.steps).round()

    def fwd():
        with torch.no_grad():
            forward(sd, c, x, 500.0)

    def sample():
        with torch.no_grad():
            xs = x.clone()
            for t in ts:
                eps = forward(sd, c, xs, float(t))
                xs = 1.01 * xs - 0.1 * eps
            xs.float().cpu()

    print(f"torch {torch.__version__} eager, {a.device}, dtype {a.dtype}, batch {a.batch}, {n / 1e6:.2f} M parameters")
    f = timed(fwd)
    print(f"forward: {f:.4f} s per batch, {a.batch / f:.1f} images/s (median of {a.repeats})")
    s = timed(sample)
    print(f"sample, {a.steps} network calls: {s:.4f} s per batch, {a.batch / s:.1f} images/s")
    if cuda:
        print(f"peak device memory (torch.cuda.max_memory_allocated): {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        print(f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32}")
    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            fwd()
            sync()
        key = "cuda_time_total" if cuda else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=30))


if __name__ == "__main__":
    main()
