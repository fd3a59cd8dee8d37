"""QTaylorScheduler inside real diffusers pipelines, tiny and local (no model hub).

- a tiny StableDiffusionPipeline from random components (diffusers' get_dummy_components
  sizes) with a local CLIP tokenizer, classifier-free guidance, save/load round trip;
- StableDiffusionImg2ImgPipeline from the same components (strength 0.5: the pipeline
  slices ``timesteps[t_start * order:]`` and calls ``set_begin_index``);
- DDPMPipeline on the shipped MNIST checkpoint ``assets/mnist-unet`` against the
  ``qtaylor sample`` command line from the same start noise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import inspect

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from qtaylor.diffusers import QTaylorScheduler

REPO = Path(__file__).resolve().parents[2]
MNIST = REPO / "assets" / "mnist-unet"
PROMPT = "a small cat"

# Stable Diffusion's schedule (as a DDIMScheduler config would carry it)
SD_SCHEDULE = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
)


def _sd_scheduler(sampler: str, **kw) -> QTaylorScheduler:
    return QTaylorScheduler.from_config(DDIMScheduler(**SD_SCHEDULE).config, sampler=sampler, **kw)


def _tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single letters (ids < 60, inside the text model's vocab)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    try:  # transformers >= 5: vocab/merges given directly
        return CLIPTokenizer(vocab=vocab, merges=[], pad_token="!", model_max_length=77)
    except TypeError:  # older transformers: files
        import tempfile

        d = Path(tempfile.mkdtemp())
        (d / "vocab.json").write_text(json.dumps(vocab))
        (d / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            vocab_file=str(d / "vocab.json"), merges_file=str(d / "merges.txt"),
            pad_token="!", model_max_length=77,
        )


@pytest.fixture(scope="module")
def sd_components():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=2,
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=2,
    ).eval()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=8,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=1000,
        )
    ).eval()
    tokenizer = _tiny_tokenizer()
    assert tokenizer(PROMPT).input_ids[0] == 0 and max(tokenizer(PROMPT).input_ids) < 1000
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sd_pipe(components, sampler, cls=StableDiffusionPipeline):
    pipe = cls(**components, scheduler=_sd_scheduler(sampler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _txt2img(pipe, seed=0, **kw):
    args = dict(
        guidance_scale=7.5,
        num_inference_steps=5,
        output_type="np",
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(seed),
    )
    args.update(kw)
    if "prompt_embeds" not in args:
        args["prompt"] = PROMPT
    return pipe(**args).images


def _public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------
# Stable Diffusion text to image


@pytest.mark.parametrize("sampler", ["qt-2", "unipc-3"])
def test_stable_diffusion_cfg_save_and_reload(sd_components, sampler, tmp_path):
    pipe = _sd_pipe(sd_components, sampler)
    assert pipe.scheduler.config.steps_offset == 1
    img = _txt2img(pipe)
    assert img.shape == (1, 32, 32, 3)
    assert np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
    assert img.std() > 0
    assert len(pipe.scheduler.timesteps) == 5 and pipe.scheduler.order == 1
    np.testing.assert_array_equal(_txt2img(pipe), img)  # same seed repeats exactly
    assert np.abs(_txt2img(pipe, seed=1) - img).max() > 0  # another seed: another image

    pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "QTaylorScheduler" and saved["sampler"] == sampler
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["qtaylor.diffusers", "QTaylorScheduler"]

    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is QTaylorScheduler
    assert _public(loaded.scheduler.config) == _public(pipe.scheduler.config)
    assert loaded.scheduler.config.sampler == sampler
    np.testing.assert_array_equal(_txt2img(loaded), img)


def test_stable_diffusion_prompt_embeds(sd_components):
    """prompt_embeds / negative_prompt_embeds directly (no tokenizer use) with a
    stochastic sampler: the pipeline passes its generator to step()."""
    pipe = _sd_pipe(sd_components, "dpmpp-2m-sde")
    g = torch.Generator().manual_seed(4)
    pe = torch.randn(1, 77, 8, generator=g)
    ne = torch.randn(1, 77, 8, generator=g)
    a = _txt2img(pipe, prompt_embeds=pe, negative_prompt_embeds=ne)
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(_txt2img(pipe, prompt_embeds=pe, negative_prompt_embeds=ne), a)


def test_stable_diffusion_heun_runs_every_call(sd_components):
    """order 2: the pipeline's loop runs every network call: 2N, since SD's DDIM config has
    set_alpha_to_one=False, so the last step ends at the first trained step (ᾱ_0), not at
    ᾱ = 1, and Heun takes both of its calls there too (ending at ᾱ = 1 it would be 2N − 1)."""
    pipe = _sd_pipe(sd_components, "heun")
    calls = []
    orig = pipe.unet.forward

    def counting(*a, **k):
        calls.append(a[1] if len(a) > 1 else k["timestep"])
        return orig(*a, **k)

    pipe.unet.forward = counting
    try:
        img = _txt2img(pipe, num_inference_steps=4)
    finally:
        pipe.unet.forward = orig
    assert pipe.scheduler.order == 2
    assert len(calls) == 2 * 4 == len(pipe.scheduler.timesteps)
    assert np.isfinite(img).all()


# ---------------------------------------------------------------------------------------
# Stable Diffusion image to image


def _init_image():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "unipc-3", "heun"])
def test_img2img_strength_half(sd_components, sampler):
    pipe = _sd_pipe(sd_components, sampler, cls=StableDiffusionImg2ImgPipeline)
    calls = []
    orig = pipe.unet.forward

    def counting(*a, **k):
        calls.append(int(a[1] if len(a) > 1 else k["timestep"]))
        return orig(*a, **k)

    pipe.unet.forward = counting
    try:
        args = dict(
            prompt=PROMPT, image=_init_image(), strength=0.5, guidance_scale=7.5,
            num_inference_steps=10, output_type="np",
        )
        img = pipe(**args, generator=torch.Generator().manual_seed(0)).images
        first = list(calls)
        again = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    finally:
        pipe.unet.forward = orig
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    np.testing.assert_array_equal(again, img)
    sched = pipe.scheduler
    full = _sd_scheduler(sampler)
    full.set_timesteps(10)
    order = full.order
    # the run is the second half of the 10-step grid: steps 5..9, every call of them
    assert first == [int(t) for t in full.timesteps[5 * order:]]
    assert sched.begin_index == 5 * order
    assert first[0] == 401  # SD leading spacing with steps_offset 1
    # (Heun: 2 calls in each of the 5 steps, the last one included: set_alpha_to_one=False.)
    assert (order, len(first)) == ((2, 10) if sampler == "heun" else (1, 5))


def test_img2img_matches_manual_loop(sd_components):
    """The pipeline's img2img latents path equals add_noise + a loop over the sliced
    timesteps after set_begin_index (here without guidance, on the UNet directly)."""
    comps = sd_components
    sched = _sd_scheduler("dpmpp-2m")
    sched.set_timesteps(10)
    ts = sched.timesteps[5:]
    sched.set_begin_index(5)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 4, 16, 16, generator=g)
    noise = torch.randn(1, 4, 16, 16, generator=g)
    emb = torch.randn(1, 77, 8, generator=g)
    x = sched.add_noise(x0, noise, ts[:1])
    with torch.no_grad():
        for t in ts:
            x = sched.step(comps["unet"](x, t, encoder_hidden_states=emb).sample, t, x).prev_sample
    # a fresh scheduler on the remaining grid gives the same run
    ref = _sd_scheduler("dpmpp-2m")
    ref.set_timesteps(timesteps=ts.tolist())
    y = ref.add_noise(x0, noise, ts[:1])
    with torch.no_grad():
        for t in ref.timesteps:
            y = ref.step(comps["unet"](y, t, encoder_hidden_states=emb).sample, t, y).prev_sample
    torch.testing.assert_close(x, y, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# DDPMPipeline on the shipped MNIST model vs the command line


@pytest.fixture(scope="module")
def cli_bin() -> Path:
    path = Path(os.environ.get("QTAYLOR_BIN") or REPO / "target" / "release" / "qtaylor")
    if not path.is_file():
        pytest.skip(f"the qtaylor binary {path} is missing (build with cargo build --release)")
    return path


@pytest.fixture(scope="module")
def mnist_unet():
    assert (MNIST / "config.json").is_file() and (MNIST / "scheduler_config.json").is_file()
    unet = UNet2DModel.from_pretrained(MNIST).eval()
    return unet


def _mnist_config() -> dict:
    return json.loads((MNIST / "scheduler_config.json").read_text())


def _ddpm_pipe(unet, **kw):
    sched = QTaylorScheduler.from_config(_mnist_config(), sampler="qt-3", **kw)
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cli(cli_bin, x_npy, out_dir, *extra):
    out = out_dir / "out.npy"
    r = subprocess.run(
        [
            str(cli_bin), "sample", "--model", str(MNIST), "--sampler", "qt-3", "--steps", "10",
            "--x-init", str(x_npy), "--save-npy", str(out), "--out", str(out_dir / "grid.png"),
            *extra,
        ],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert (out_dir / "grid.png").is_file()
    return np.load(out), r.stdout + r.stderr


def _as_pipeline_output(x):
    """CLI samples (B, C, H, W) in [-1, 1], saved raw -> DDPMPipeline's np output."""
    return np.clip(x.astype(np.float32) / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def mnist_run(mnist_unet, tmp_path_factory):
    """DDPMPipeline with QTaylorScheduler(qt-3) from the checkpoint's config, 10 steps,
    batch 4, seed 0; and the start noise it drew, saved for the command line."""
    pipe = _ddpm_pipe(mnist_unet)
    images = pipe(
        batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=10,
        output_type="np",
    ).images
    # the start noise DDPMPipeline draws: randn_tensor(shape, generator, dtype=unet.dtype)
    x = randn_tensor(
        (4, mnist_unet.config.in_channels, 28, 28),
        generator=torch.Generator().manual_seed(0),
        dtype=mnist_unet.dtype,
    )
    x_npy = tmp_path_factory.mktemp("mnist") / "x.npy"
    np.save(x_npy, x.numpy())
    return pipe, images, x_npy


def test_ddpm_pipeline_matches_cli(mnist_run, cli_bin, tmp_path):
    cfg = _mnist_config()
    assert cfg["timestep_spacing"] == "trailing" and cfg["clip_sample"] is True
    pipe, images, x_npy = mnist_run
    assert pipe.unet.dtype == torch.float32  # f16 weights on disk, loaded as f32
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    assert pipe.scheduler.config.clip_sample is True
    assert pipe.scheduler.config.final_sigmas_type == "zero"
    assert images.shape == (4, 28, 28, 1) and np.isfinite(images).all()
    assert pipe.scheduler.timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]

    got, log = _cli(cli_bin, x_npy, tmp_path)
    assert got.shape == (4, 1, 28, 28)
    # the CLI reads the same grid from the checkpoint: trailing spacing, final zero
    assert re.search(r"trailing spacing \(offset 0\)", log) and "final zero" in log, log
    assert np.abs(_as_pipeline_output(got) - images).max() <= 1e-4
    # clip_sample from the config: the clipped x̂0 of the last step stays in [-1, 1]
    assert got.min() >= -1 - 1e-6 and got.max() <= 1 + 1e-6


def test_ddpm_pipeline_no_clip_matches_cli_no_clip(mnist_unet, mnist_run, cli_bin, tmp_path):
    """Both honour clip_sample: with it off on both sides they agree again, and the
    unclipped run differs from the clipped one (so the clip was in force above)."""
    _, clipped, x_npy = mnist_run
    pipe = _ddpm_pipe(mnist_unet, clip_sample=False)
    raw = pipe(
        batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=10,
        output_type="np",
    ).images
    got, _ = _cli(cli_bin, x_npy, tmp_path, "--no-clip")
    assert np.abs(_as_pipeline_output(got) - raw).max() <= 1e-4
    assert np.abs(raw - clipped).max() > 1e-3


def _sd_source(cls, **kw):
    """``cls`` with the SD 1.5 schedule keys it takes (leading spacing, steps_offset 1)."""
    keys = inspect.signature(cls.__init__).parameters
    cfg = {k: v for k, v in dict(SD_SCHEDULE, timestep_spacing="leading").items() if k in keys}
    return cls(**cfg, **kw)


SD_SOURCES = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "plms": (PNDMScheduler, dict(skip_prk_steps=True)),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp-2m-sde": (DPMSolverMultistepScheduler, dict(algorithm_type="sde-dpmsolver++")),
    "unipc-2": (UniPCMultistepScheduler, {}),
    "deis-2": (DEISMultistepScheduler, {}),
    "dpmpp-2s": (DPMSolverSinglestepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-karras": (EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
    "dpmpp-2m-karras": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True)),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
    "kdpm2-a": (KDPM2AncestralDiscreteScheduler, {}),
}


@pytest.mark.parametrize("name", list(SD_SOURCES))
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_swap_without_a_sampler_reproduces_the_pipelines_latents(sd_components, name, tmp_path):
    """The one-line swap on Stable Diffusion, no sampler given, from the config as a saved
    pipeline carries it (with its _class_name): the same latents as the pipeline's own
    scheduler (SD 1.5's schedule, leading spacing, steps_offset 1, DDIM/PNDM with
    set_alpha_to_one=False), to 1e-5 relative; the stochastic ones with the pipeline's
    generator."""
    import copy

    cls, kw = SD_SOURCES[name]
    source = _sd_source(cls, **kw)
    source.save_config(tmp_path)
    saved = cls.load_config(tmp_path)
    theirs = StableDiffusionPipeline(**sd_components, scheduler=copy.deepcopy(source))
    theirs.set_progress_bar_config(disable=True)
    # 10 steps: PNDM's midpoints lie in the middle only where T//N is even (see test_drop_in)
    a = _txt2img(theirs, num_inference_steps=10, output_type="latent")
    ours = StableDiffusionPipeline(**sd_components, scheduler=QTaylorScheduler.from_config(saved))
    ours.set_progress_bar_config(disable=True)
    b = _txt2img(ours, num_inference_steps=10, output_type="latent")
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert torch.isfinite(b).all()
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
