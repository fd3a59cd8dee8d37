#!/usr/bin/env python3
"""The strong PyTorch baseline of the GPU benchmarks (issue 16): diffusers' own
`UNet2DModel` (the wheel pinned in scripts/gpu-diffusers-wheels.txt travels with the run) on a
diffusers checkpoint folder, in the variants a user who tunes PyTorch would run:

  eager        NCHW, torch.backends.cudnn.benchmark on
  eager-cl     channels_last, cudnn.benchmark on
  compile-nocg torch.compile(mode="max-autotune-no-cudagraphs"), channels_last
  compile      torch.compile(mode="max-autotune") (CUDA graphs), channels_last

in bf16, TF32 (convolutions and matmuls) or exact f32, at each batch size asked for. For every
(batch, variant) it reports the compile time separately (the first two calls, excluded from
the timings), the median time of one forward with a synchronization after it (per call), the
time per forward of --chain forwards queued back to back with one synchronization at the
end, a 10-NFE sample loop (x <- a*x + b*eps with the timestep as a device tensor), the peak
allocated memory (torch.cuda.max_memory_allocated, reset per variant), the FLOP count of one
forward (torch.utils.flop_counter on the eager model: 2 FLOP per multiply-add of convolutions,
linears and attention) and the achieved rate as a share of a measured dense matmul peak of the
same precision (8192^3, best of --peak-repeats), and the largest relative difference of the
output to the eager f32 output on the same input.

  python3 scripts/torch_diffusers_bench.py --model DIR --dtype bf16 --batches 1,8,64,256 --json out.json

Env DEADLINE (epoch seconds): variants that would start after it are skipped and reported so.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch


def log(*a):
    print(*a, flush=True)


def matmul_peak(dtype, repeats, device, sync):
    n = 8192 if device == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * n**3 / best


def flops_of(model, x, t):
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, t, return_dict=False)
    return fc.get_total_flops()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", choices=["bf16", "tf32", "f32"], default="bf16")
    ap.add_argument("--batches", default="256")
    ap.add_argument("--variants", default="eager,eager-cl,compile-nocg,compile")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--chain", type=int, default=30)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-repeats", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to check the script without a GPU")
    a = ap.parse_args()
    dev = a.device
    cuda = dev == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    import diffusers
    from diffusers import UNet2DModel

    torch.backends.cudnn.benchmark = True
    tf32 = a.dtype == "tf32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    deadline = float(os.environ.get("DEADLINE", "inf"))
    sub = "unet" if os.path.isdir(os.path.join(a.model, "unet")) else None
    base = UNet2DModel.from_pretrained(a.model, subfolder=sub).to(dev).eval()
    ref32 = base  # the exact-f32 reference (TF32 off while it runs)
    peak = matmul_peak(dtype, a.peak_repeats, dev, sync)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {card}, "
        f"dtype {a.dtype}; dense {a.dtype} matmul peak (8192^3): {peak / 1e12:.0f} TFLOP/s")
    rows = []

    def save():  # after every row, atomically, so that a run cut short keeps what it measured
        if a.json:
            meta = dict(torch=torch.__version__, diffusers=diffusers.__version__,
                        device=card, peak_flops=peak, dtype=a.dtype)
            with open(a.json + ".tmp", "w") as f:
                json.dump(dict(meta, rows=rows), f, indent=1)
            os.replace(a.json + ".tmp", a.json)

    size = base.config.sample_size
    size = size if isinstance(size, int) else size[0]
    for batch in [int(b) for b in a.batches.split(",")]:
        g = torch.Generator(device="cpu").manual_seed(0)
        x32 = torch.randn(batch, base.config.in_channels, size, size, generator=g).to(dev)
        t = torch.full((batch,), 500.0, device=dev)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        with torch.no_grad():
            want = ref32(x32, t, return_dict=False)[0].float()
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        flops = flops_of(ref32, x32[:1], t[:1]) * batch
        for variant in a.variants.split(","):
            row = dict(batch=batch, variant=variant, dtype=a.dtype, flop=flops)
            if time.time() > deadline:
                row["skipped"] = "deadline"
                rows.append(row)
                log(f"batch {batch} {variant}: skipped (deadline)")
                continue
            torch._dynamo.reset()
            m = UNet2DModel.from_pretrained(a.model, subfolder=sub, torch_dtype=dtype).to(dev).eval()
            cl = variant != "eager"
            if cl:
                m = m.to(memory_format=torch.channels_last)
            fn = m
            if variant.startswith("compile"):
                mode = "max-autotune-no-cudagraphs" if variant == "compile-nocg" else "max-autotune"
                fn = torch.compile(m, mode=mode, fullgraph=True)
            graphs = variant == "compile"
            x = x32.to(dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)

            def call(xx, tt):
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                return fn(xx, tt, return_dict=False)[0]

            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                t0 = time.perf_counter()
                call(x, t)
                call(x, t)
                sync()
                row["compile_s"] = time.perf_counter() - t0
                got = call(x, t).float()
                row["max_rel_err"] = ((got - want).abs().max() / want.abs().max()).item()
                per = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    call(x, t)
                    sync()
                    per.append(time.perf_counter() - t0)
                row["per_call_s"] = statistics.median(per)
                chains = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    for _ in range(a.chain):
                        call(x, t)
                    sync()
                    chains.append((time.perf_counter() - t0) / a.chain)
                row["back_to_back_s"] = min(chains)
                ts = torch.linspace(999, 0, a.steps, device=dev)
                tvec = [torch.full((batch,), float(s), device=dev) for s in ts]
                samples = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    xs = x.clone()
                    for tt in tvec:
                        eps = call(xs, tt)
                        xs = 1.01 * xs - 0.1 * eps
                    xs.float().cpu()
                    samples.append(time.perf_counter() - t0)
                row["sample_s"] = statistics.median(samples)
            row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
            row["tflops"] = flops / row["per_call_s"] / 1e12
            row["share_of_peak"] = flops / row["per_call_s"] / peak
            rows.append(row)
            log(f"batch {batch} {variant}: compile {row['compile_s']:.1f} s, per call {row['per_call_s']:.5f} s, "
                f"back to back {row['back_to_back_s']:.5f} s, {a.steps}-NFE sample {row['sample_s']:.4f} s, "
                f"{row['tflops']:.0f} TFLOP/s ({100 * row['share_of_peak']:.0f} % of peak; {flops / 1e12:.3f} TFLOP), "
                f"peak {row['peak_mib']:.0f} MiB, max rel err vs f32 eager {row['max_rel_err']:.1e}")
            save()
            del fn, m
            if cuda:
                torch.cuda.empty_cache()
    save()


if __name__ == "__main__":
    sys.exit(main())
