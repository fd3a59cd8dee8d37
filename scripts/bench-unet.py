#!/usr/bin/env python3
"""PyTorch (diffusers) side of the UNet throughput and memory comparison (run by hand).

Loads a diffusers UNet2DModel checkpoint (e.g. the random CIFAR-10 DDPM architecture written by
scripts/make-parity-fixtures.py --cifar10 data/ddpm-cifar10-random), times one forward pass at a
batch size, and optionally a full DDIM-style sample loop of N network calls with the same
per-step tensor work a one-NFE sampler does (x <- a*x + b*eps), reporting images/s and peak
memory. Its output lines mirror `qtaylor speed` so the two can be compared in one run:

  qtaylor speed --model DIR --batch 8 --repeats 5 --steps 10
  python3 scripts/bench-unet.py --model DIR --batch 8 --repeats 5 --steps 10

Options: --device cpu|cuda, --dtype f32|bf16|f16, --threads N (CPU), --sample-only (for
/usr/bin/time -v peak-memory runs of a whole sample).
Needs torch, diffusers (0.42.1 was used), safetensors.
"""
import argparse
import resource
import statistics
import time

import torch
from diffusers import UNet2DModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--sample-only", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    sub = "unet" if __import__("os").path.isdir(f"{a.model}/unet") else None
    unet = UNet2DModel.from_pretrained(a.model, subfolder=sub).to(a.device, dtype).eval()
    n = sum(p.numel() for p in unet.parameters())
    size = unet.config.sample_size
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(a.batch, unet.config.in_channels, size, size, generator=g).to(a.device, dtype)
    sync = (lambda: torch.cuda.synchronize()) if a.device.startswith("cuda") else (lambda: None)
    if a.device.startswith("cuda"):
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

    def forward():
        with torch.no_grad():
            unet(x, 500).sample

    ts = torch.linspace(999, 0, a.steps).round().long()

    def sample():
        with torch.no_grad():
            xs = x.clone()
            for t in ts:
                eps = unet(xs, t).sample
                xs = 1.01 * xs - 0.1 * eps  # the one fused update a one-NFE sampler makes
            xs.float().cpu()

    print(f"model {a.model} ({n / 1e6:.2f} M parameters), torch {torch.__version__}, {a.device}, "
          f"dtype {a.dtype}, batch {a.batch}, threads {torch.get_num_threads()}")
    if not a.sample_only:
        fwd = timed(forward)
        print(f"forward: {fwd:.4f} s per batch, {a.batch / fwd:.1f} images/s (median of {a.repeats})")
    full = timed(sample)
    print(f"sample, {a.steps} network calls: {full:.4f} s per batch, {a.batch / full:.1f} images/s")
    if a.device.startswith("cuda"):
        print(f"peak device memory (torch.cuda.max_memory_allocated): "
              f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
