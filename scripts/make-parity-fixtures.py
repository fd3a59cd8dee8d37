#!/usr/bin/env python3
"""Parity fixtures for qtaylor's UNet2DModel port (run by hand, not by CI).

Builds small diffusers `UNet2DModel`s with random, not-all-zero weights (GroupNorm affines
randomised too), saves each in the diffusers layout (`unet/config.json`,
`unet/diffusion_pytorch_model.safetensors`, `scheduler/scheduler_config.json`) together with
`reference.safetensors`: inputs `x` (2, 3, 8, 8), timesteps `t` and diffusers' outputs at
three timesteps (`out`, per-sample t = [3, 999]; `out_t500`, t = 500 for both samples;
`out_t37_5`, t = 37.5 as a float tensor), plus per-block activations for debugging.

Cases:
  ddpm_legacy   DDPM/CIFAR-10 style: one full-width head, downsample_padding = 0, sin-first,
                freq_shift 1, eps 1e-6, attention weights saved under the legacy key names
                (query/key/value/proj_attn)
  multihead     several heads (attention_head_dim 4), cos-first, downsample_padding 1,
                center_input_sample, mid_block_scale_factor sqrt(2)
  scale_shift   resnet_time_scale_shift = scale_shift (the mid attention has no group norm)
  class_cond    class-conditional: num_class_embeds = 4 (class_embed_type null, the label's
                embedding added to the time embedding); its reference also holds `labels`
                ([1, 3]) and `out_labels`, the output at t = [3, 999] with those labels

  --cifar10 DIR additionally writes the full CIFAR-10 DDPM architecture (google/ddpm-cifar10-32
  config, 35.7 M parameters) with random weights to DIR (not committed; used by the speed and
  memory benchmarks).

Usage (diffusers 0.42.1, torch 2.x, numpy; e.g. in the venv of scripts/compare-diffusers.sh):
  python3 scripts/make-parity-fixtures.py [--out tests/fixtures/unet2d] [--cifar10 data/ddpm-cifar10-random]
"""
import argparse
import math
import os

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file, save_file

COMMON = dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16, 16),
              layers_per_block=1, norm_num_groups=4)
CASES = {
    "ddpm_legacy": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                        attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False,
                        freq_shift=1, norm_eps=1e-6),
    "multihead": dict(down_block_types=("AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"),
                      attention_head_dim=4, downsample_padding=1, flip_sin_to_cos=True,
                      freq_shift=0, norm_eps=1e-5, center_input_sample=True,
                      mid_block_scale_factor=math.sqrt(2)),
    "scale_shift": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                        attention_head_dim=8, resnet_time_scale_shift="scale_shift",
                        downsample_padding=0, norm_eps=1e-6),
    "class_cond": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                       attention_head_dim=None, num_class_embeds=4),
}
LEGACY = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
               layers_per_block=2,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
               attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
               norm_eps=1e-6, norm_num_groups=32)


def randomise_norms(model):
    # default init leaves GroupNorm affines at 1/0: randomise them so a swapped tensor shows
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))


def make_case(out, name, extra):
    torch.manual_seed(0)
    model = UNet2DModel(**COMMON, **extra).eval()
    randomise_norms(model)
    d = os.path.join(out, name, "unet")
    model.save_pretrained(d)
    if name == "ddpm_legacy":
        path = os.path.join(d, "diffusion_pytorch_model.safetensors")
        sd = load_file(path)
        sd = {next((k.replace(a, b) for a, b in LEGACY.items() if a in k), k): v for k, v in sd.items()}
        save_file(sd, path, metadata={"format": "pt"})
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(os.path.join(out, name, "scheduler"))
    # reference outputs from the reloaded model (this also exercises diffusers' legacy-key path)
    model = UNet2DModel.from_pretrained(d).eval()
    acts = {}

    def hook(tag):
        return lambda m, i, o: acts.__setitem__(tag, (o[0] if isinstance(o, tuple) else o).clone())

    model.time_proj.register_forward_hook(hook("time_proj"))
    model.time_embedding.register_forward_hook(hook("temb"))
    model.conv_in.register_forward_hook(hook("conv_in"))
    for i, b in enumerate(model.down_blocks):
        b.register_forward_hook(hook(f"down.{i}"))
    model.mid_block.register_forward_hook(hook("mid"))
    for i, b in enumerate(model.up_blocks):
        b.register_forward_hook(hook(f"up.{i}"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([3, 999], dtype=torch.long)
    conditional = extra.get("num_class_embeds") is not None
    # A class-conditional model needs labels in every call: the last class (the null class of
    # qtaylor's convention) for the plain outputs.
    null = {"class_labels": torch.tensor([3, 3])} if conditional else {}
    with torch.no_grad():
        out_t500 = model(x, torch.tensor([500, 500]), **null).sample
        out_t37_5 = model(x, torch.tensor([37.5, 37.5]), **null).sample
        acts.clear()
        y = model(x, t, **null).sample
        more = {}
        if conditional:
            labels = torch.tensor([1, 3])
            more = {"labels": labels.to(torch.float32),
                    "out_labels": model(x, t, class_labels=labels).sample}
    tensors = {"x": x, "t": t.to(torch.float32), "out": y, "out_t500": out_t500,
               "out_t37_5": out_t37_5, **more, **{f"act.{k}": v for k, v in acts.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(out, name, "reference.safetensors"))
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n} parameters, output std {y.std():.3f}")


def make_cifar10(d):
    torch.manual_seed(0)
    model = UNet2DModel(**CIFAR10).eval()
    model.save_pretrained(os.path.join(d, "unet"))
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                  clip_sample=True, variance_type="fixed_small").save_pretrained(os.path.join(d, "scheduler"))
    n = sum(p.numel() for p in model.parameters())
    print(f"CIFAR-10 DDPM architecture with random weights: {n} parameters -> {d}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures/unet2d")
    ap.add_argument("--cifar10", default=None, help="also write the random CIFAR-10 DDPM model here")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated cases to write")
    a = ap.parse_args()
    for name in a.cases.split(","):
        make_case(a.out, name, CASES[name])
    if a.cifar10:
        make_cifar10(a.cifar10)


if __name__ == "__main__":
    main()
