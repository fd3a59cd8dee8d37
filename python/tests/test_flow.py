"""Rectified flow (SD3, Flux: x = (1 − ς) x0 + ς ε, the network predicts v = ε − x0) through
``QTaylorScheduler``: the same numbers as diffusers' flow schedulers on a Gaussian mixture
with the exact velocity, the command line's numbers, every sampler on flow configs,
``scale_noise`` and copies, and clear errors for bad flow input.

The velocity of the mixture is written out here in torch (independently of the core's
mixture model), in float64.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import pickle
import subprocess
import warnings

import diffusers
import numpy as np
import pytest
import torch

import qtaylor
import qtaylor.torch
from qtaylor.diffusers import QTaylorScheduler

REL_TOL = 1e-5
MEANS = torch.tensor([[1.0, -0.5, 0.3], [-1.0, 0.8, -0.2], [0.2, 0.1, 1.1]], dtype=torch.float64)
VARS = torch.tensor([[0.1, 0.3, 0.05], [0.2, 0.05, 0.1], [0.02, 0.4, 0.2]], dtype=torch.float64)
WEIGHTS = torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64)


def velocity(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The exact v = ε̂ − x̂0 of the mixture at flow state x and timestep 1000 ς."""
    sig = (timestep.to(torch.float64) / 1000.0).reshape(-1, 1, 1).expand(x.shape[0], 1, 1)
    a = 1.0 - sig
    tv = a**2 * VARS[None] + sig**2
    diff = x.to(torch.float64)[:, None, :] - a * MEANS[None]
    logp = -0.5 * (diff**2 / tv + torch.log(2 * math.pi * tv)).sum(-1) + torch.log(WEIGHTS)[None]
    r = torch.softmax(logp, -1)[..., None]
    z = diff / tv
    eps = (r * sig * z).sum(1)
    x0 = (r * (MEANS[None] + a * VARS[None] * z)).sum(1)
    return (eps - x0).to(x.dtype)


def start(rows=256, seed=0) -> torch.Tensor:
    return torch.randn(rows, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run(scheduler, steps, x, generator=None, **kw) -> torch.Tensor:
    scheduler.set_timesteps(steps, **kw)
    for t in scheduler.timesteps:
        v = velocity(x, t.reshape(1).expand(x.shape[0]))
        kw_step = {} if generator is None else {"generator": generator}
        x = scheduler.step(v, t, x, **kw_step).prev_sample
    return x


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


FLOW_MATCH = [
    ("shift3", dict(shift=3.0), {}),
    ("mu-exponential", dict(shift=3.0, use_dynamic_shifting=True), dict(mu=0.8)),
    ("mu-linear", dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=2.5)),
    ("shift-terminal", dict(shift=3.0, shift_terminal=0.05), {}),
    ("karras", dict(shift=3.0, use_karras_sigmas=True), {}),
]
MULTISTEP = [
    ("dpmpp-2m", diffusers.DPMSolverMultistepScheduler, dict(solver_order=2)),
    ("dpmpp-3m", diffusers.DPMSolverMultistepScheduler, dict(solver_order=3)),
    ("unipc-2", diffusers.UniPCMultistepScheduler, dict(solver_order=2)),
    ("unipc-3", diffusers.UniPCMultistepScheduler, dict(solver_order=3)),
]


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("label,cfg,kw", FLOW_MATCH, ids=[c[0] for c in FLOW_MATCH])
def test_the_swap_reproduces_flow_match_euler(label, cfg, kw, steps):
    src = diffusers.FlowMatchEulerDiscreteScheduler(**cfg)
    ref = run(src, steps, start(), **kw)
    q = QTaylorScheduler.from_config(src.config)
    assert q.config.sampler == "ddim" and q.config.reproduces == "FlowMatchEulerDiscreteScheduler"
    out = run(q, steps, start(), **kw)
    # the same levels and network timesteps (float32 ς·1000), then the same end point
    assert torch.equal(q.sigmas, src.sigmas) and torch.equal(q.timesteps, src.timesteps)
    assert q.timesteps.dtype == torch.float32
    assert rel(out, ref) <= REL_TOL, rel(out, ref)


@pytest.mark.parametrize("steps", [5, 10, 20])
@pytest.mark.parametrize("mu", [None, 0.8], ids=["shift3", "mu"])
@pytest.mark.parametrize("own,cls,extra", MULTISTEP, ids=[c[0] for c in MULTISTEP])
def test_the_swap_reproduces_dpm_solver_and_unipc_on_flow_sigmas(own, cls, extra, mu, steps):
    cfg = dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", **extra)
    if mu is not None:
        cfg.update(use_dynamic_shifting=True)
    kw = {} if mu is None else dict(mu=mu)
    src = cls(**cfg)
    ref = run(src, steps, start(), **kw)
    q = QTaylorScheduler.from_config(cls(**cfg).config)
    assert q.config.sampler == own
    out = run(q, steps, start(), **kw)
    # diffusers calls the network at int64 timesteps (ς·1000 truncated) but updates with ς
    # itself; the swap calls at the same integers
    assert q.timesteps.dtype == torch.int64 and torch.equal(q.timesteps, src.timesteps)
    assert rel(out, ref) <= REL_TOL, rel(out, ref)


def test_flux_sigmas_reach_flow_match_and_unipc_as_retrieve_timesteps_passes_them():
    n = 8
    sig = np.linspace(1.0, 1 / n, n)
    for cls, cfg in [
        (diffusers.FlowMatchEulerDiscreteScheduler, dict(use_dynamic_shifting=True)),
        (diffusers.UniPCMultistepScheduler, dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                 use_dynamic_shifting=True, solver_order=2)),
    ]:
        src = cls(**cfg)
        ref = run(src, None, start(), sigmas=sig, mu=1.1)
        q = QTaylorScheduler.from_config(src.config)
        out = run(q, None, start(), sigmas=sig, mu=1.1)
        assert rel(out, ref) <= REL_TOL, (cls.__name__, rel(out, ref))


NON_ADAPTIVE = [n for n in qtaylor.all_sampler_names() if not qtaylor.SamplerSpec(n).is_adaptive]


@pytest.mark.parametrize("sampler", NON_ADAPTIVE)
def test_every_sampler_runs_on_a_flow_config_or_names_why_it_cannot_start_at_pure_noise(sampler):
    src = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = QTaylorScheduler.from_config(src.config, sampler=sampler)
    spec = qtaylor.SamplerSpec(sampler)
    try:
        out = run(q, 8, start(32), generator=torch.Generator().manual_seed(1))
    except ValueError as e:
        # FlowMatch starts at ς = 1 (pure noise): the samplers whose variable is infinite there
        assert f"sampler={sampler!r}" in str(e) and "pure noise" in str(e) and "ddim" in str(e), str(e)
        # they run on UniPC's flow grid, which starts at 1 − 1e-6
        uni = diffusers.UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = QTaylorScheduler.from_config(uni.config, sampler=sampler)
        if spec.nfe(1, False) > 1:
            with pytest.raises(ValueError, match="one call per step"):
                run(q, 8, start(32))
            return
        out = run(q, 8, start(32), generator=torch.Generator().manual_seed(1))
        # a run, not necessarily a good one: Euler–Maruyama and qit-1/2 step the reverse SDE,
        # whose drift is ~1/(1 − ς) at the grid's start 1 − 1e-6
        assert out.shape == (32, 3) and bool(torch.isfinite(out).all())
        return
    assert out.shape == (32, 3) and bool(torch.isfinite(out).all())
    # near the data: the mixture's component means are within a few units
    assert float(out.abs().max()) < 10.0


def test_on_unshifted_flow_qt_k_in_the_model_state_is_flow_euler():
    # under the SPA the flow state is linear in ς, so every order equals DDIM (= FlowMatch Euler)
    src = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
    ref = run(src, 10, start())
    for k in (1, 2, 3, 5):
        with pytest.warns(UserWarning):
            q = QTaylorScheduler.from_config(src.config, sampler=f"qt-{k}", expand="state")
        assert rel(run(q, 10, start()), ref) <= REL_TOL
    # in t on the VP state, or with a shift, the orders are other samplers
    with pytest.warns(UserWarning):
        q = QTaylorScheduler.from_config(src.config, sampler="qt-2")
    assert rel(run(q, 10, start()), ref) > 1e-4


def _mixture_file(tmp_path):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps({"dim": 3, "weights": WEIGHTS.tolist(), "means": MEANS.tolist(), "variances": VARS.tolist()}))
    return path


@pytest.mark.parametrize("sampler", ["ddim", "qt-3", "dpmpp-2m", "dpmpp-3m", "unipc-3"])
def test_the_command_line_gives_the_schedulers_end_points(qtaylor_bin, tmp_path, sampler):
    """``qtaylor sample --schedule flow --shift 3 --sigmas <the scheduler's ς>`` on the same
    mixture and start noise equals the Python scheduler to 1e-10 in float64."""
    mix = _mixture_file(tmp_path)
    rows, seed = 6, 4
    src = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = QTaylorScheduler.from_config(src.config, sampler=sampler)
    q.set_timesteps(8)
    sigmas = [float(v) for v in q.sigmas.tolist()]
    exact = qtaylor._core.ExactProblem(str(mix), q.schedule)
    assert exact.prediction_type == "flow_prediction"
    draw, _ = qtaylor.torch.stream_noise(seed, rows)
    x = draw([3])
    for k, t in enumerate(q.timesteps):
        # the core's mixture model at the VP state of this call (x / state_scale), at the
        # call's level ς_k itself (the float32 timestep ς·1000 rounds it)
        tt = float(q.schedule.time_of_level(sigmas[k]))
        c = float(q.schedule.state_scale(tt))
        v = torch.from_numpy(exact.predict(np.ascontiguousarray((x / c).numpy()), [tt]))
        x = q.step(v, t, x).prev_sample
    out = tmp_path / "cli.npy"
    # the scheduler's lower_order_final (diffusers' default, on) for the multistep samplers
    flags = ["--lower-order-final"] if sampler in ("dpmpp-2m", "dpmpp-3m", "unipc-3") else []
    cmd = [str(qtaylor_bin), "sample", "--problem", str(mix), "--schedule", "flow", "--shift", "3", *flags,
           "--sigmas", ",".join(repr(s) for s in sigmas), "--sampler", sampler, "--dtype", "f64",
           "--seed", str(seed), "--batch", str(rows), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cli = torch.from_numpy(np.load(out))
    assert rel(x, cli) <= 1e-10, rel(x, cli)


def test_scale_noise_is_the_flow_forward_process_for_img2img():
    src = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    q = QTaylorScheduler.from_config(src.config)
    src.set_timesteps(10)
    q.set_timesteps(10)
    x0, noise = start(4), start(4, seed=9)
    for k in (0, 3, 7):
        t = q.timesteps[k : k + 1].repeat(4)
        want = src.scale_noise(x0, src.timesteps[k : k + 1].repeat(4), noise)
        assert rel(q.scale_noise(x0, t, noise), want) <= 1e-6
    # img2img: start at call 4 (set_begin_index), from the noised image
    q.set_begin_index(4)
    src.set_begin_index(4)
    xs = q.scale_noise(x0, q.timesteps[:1].repeat(4), noise)
    ref_x = src.scale_noise(x0, src.timesteps[4:5].repeat(4), noise)
    for t, ts in zip(q.timesteps, src.timesteps[4:]):
        xs = q.step(velocity(xs, t.reshape(1).expand(4)), t, xs).prev_sample
        ref_x = src.step(velocity(ref_x, ts.reshape(1).expand(4)), ts, ref_x).prev_sample
    assert rel(xs, ref_x) <= REL_TOL


def test_a_flow_swap_survives_copies_and_save_pretrained(tmp_path):
    src = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    q = QTaylorScheduler.from_config(src.config)
    q.set_timesteps(6, mu=0.9)
    for c in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert torch.equal(c.timesteps, q.timesteps) and c.schedule.name == q.schedule.name
        assert rel(run(c, 6, start(), mu=0.9), run(q, 6, start(), mu=0.9)) == 0.0
    q.save_pretrained(tmp_path)
    back = QTaylorScheduler.from_pretrained(tmp_path)
    assert back.config.prediction_type == "flow_prediction" and back.config.use_dynamic_shifting
    assert rel(run(back, 6, start(), mu=0.9), run(q, 6, start(), mu=0.9)) == 0.0
    with pytest.raises(AttributeError, match="alphas_cumprod"):
        _ = q.alphas_cumprod


@pytest.mark.parametrize(
    "make,says",
    [
        (lambda: QTaylorScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True).config),
         "stochastic_sampling"),
        (lambda: QTaylorScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(invert_sigmas=True).config),
         "invert_sigmas"),
        (lambda: QTaylorScheduler(prediction_type="flow_prediction", shift=0.0), "'shift' = 0.0"),
        (lambda: QTaylorScheduler(prediction_type="flow_prediction", shift=-2.0), "'shift' = -2.0"),
        (lambda: QTaylorScheduler(prediction_type="flow_prediction", time_shift_type="cubic"), "'cubic'"),
        (lambda: QTaylorScheduler.from_config(diffusers.FlowMatchHeunDiscreteScheduler().config), "FlowMatchHeun"),
        (lambda: QTaylorScheduler.from_config(diffusers.DDIMScheduler(prediction_type="flow_prediction").config),
         "use_flow_sigmas"),
    ],
)
def test_a_flow_config_that_cannot_be_honoured_is_refused_naming_the_key(make, says):
    with pytest.raises(ValueError) as e:
        make()
    assert says in str(e.value), str(e.value)


def test_bad_flow_timesteps_are_refused_with_the_value_and_nothing_changes():
    q = QTaylorScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config)
    with pytest.raises(ValueError, match="mu"):
        q.set_timesteps(10)  # use_dynamic_shifting without mu
    q = QTaylorScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    q.set_timesteps(4)
    before = q.timesteps.clone()
    for bad in ([1.2, 0.5, 0.1], [0.9, -0.1, 0.05], [0.9, float("nan"), 0.1]):
        with pytest.raises(ValueError) as e:
            q.set_timesteps(sigmas=bad)
        assert "outside (0, 1]" in str(e.value)
    assert torch.equal(q.timesteps, before)
    with pytest.raises(ValueError, match="mu"):
        QTaylorScheduler().set_timesteps(10, mu=0.5)  # a VP config has no dynamic shift


# Values other than the defaults of the flow classes' keys, for the no-silent-key walk.
FLOW_OTHER = {
    "num_train_timesteps": [500],
    "shift": [3.0, 0.5],
    "use_dynamic_shifting": [True],
    "base_shift": [0.3],
    "max_shift": [1.5],
    "base_image_seq_len": [128],
    "max_image_seq_len": [2048],
    "invert_sigmas": [True],
    "shift_terminal": [0.1],
    "use_karras_sigmas": [True],
    "use_exponential_sigmas": [True],
    "use_beta_sigmas": [True],
    "time_shift_type": ["linear"],
    "stochastic_sampling": [True],
    "flow_shift": [3.0],
    "solver_order": [1, 3],
    "lower_order_final": [False],
    "final_sigmas_type": ["sigma_min"],
    "algorithm_type": ["sde-dpmsolver++", "dpmsolver"],
    "solver_type": ["heun", "bh1"],
    "euler_at_final": [True],
    "lambda_min_clipped": [-5.0],
    "timestep_spacing": ["leading", "trailing"],
    "steps_offset": [1],
    "disable_corrector": [[1]],
    "predict_x0": [False],
    "use_lu_lambdas": [True],
    "thresholding": [True],
    "sample_max_value": [0.5],
    "dynamic_thresholding_ratio": [0.9],
    "variance_type": ["learned_range"],
    "rescale_betas_zero_snr": [True],
    "sigma_min": [0.01],
    "sigma_max": [50.0],
    "beta_start": [0.00085],
    "beta_end": [0.012],
    "beta_schedule": ["scaled_linear"],
    "trained_betas": [None],
    "solver_p": [None],
    "prediction_type": ["epsilon"],
    "use_flow_sigmas": [False],
    "timestep_type": ["continuous"],
    "interpolation_type": ["log_linear"],
}
FLOW_BASES = [
    (diffusers.FlowMatchEulerDiscreteScheduler, dict(shift=3.0)),
    (diffusers.DPMSolverMultistepScheduler, dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")),
    (diffusers.UniPCMultistepScheduler, dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")),
]


def _flow_variants():
    out = []
    for cls, base in FLOW_BASES:
        params = inspect.signature(cls.__init__).parameters
        for key, p in params.items():
            if key in ("self", "kwargs"):
                continue
            assert key in FLOW_OTHER, f"{cls.__name__}.{key} has no test value: add one to FLOW_OTHER"
            for v in FLOW_OTHER[key]:
                if v == base.get(key, p.default):
                    continue
                out.append((cls, base, key, v))
    return out


FLOW_VARIANTS = _flow_variants()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize(
    "cls,base,key,value", FLOW_VARIANTS, ids=[f"{c.__name__}-{k}={v!r}"[:80] for c, _, k, v in FLOW_VARIANTS]
)
def test_every_key_of_a_flow_class_is_honoured_or_refused(cls, base, key, value):
    cfg = dict(base, **{key: value})
    kw = {}
    try:
        ref = cls(**cfg)
        kw = {"mu": 0.8} if ref.config.get("use_dynamic_shifting") else {}
        ref.set_timesteps(10, **kw)
    except Exception:  # noqa: BLE001 - diffusers itself does not take this value
        pytest.skip(f"{cls.__name__} does not accept {key}={value!r}")
    try:
        ours = QTaylorScheduler.from_config(ref)
        ours.set_timesteps(10, **kw)
    except ValueError as e:
        assert f"'{key}'" in str(e), f"refused, but the message does not name '{key}': {e}"
        return
    # the stochastic ones draw from the same generator on both sides
    gen = (lambda: torch.Generator().manual_seed(5)) if "generator" in inspect.signature(cls.step).parameters else (lambda: None)
    try:
        a = run(cls(**cfg), 10, start(), generator=gen(), **kw)
    except Exception:  # noqa: BLE001 - diffusers' own step does not take this value
        pytest.skip(f"{cls.__name__}.step fails with {key}={value!r}")
    if not torch.isfinite(a).all():
        pytest.skip(f"{cls.__name__} with {key}={value!r} gives NaN itself")
    b = run(ours, 10, start(), generator=gen(), **kw)
    assert rel(b, a) <= REL_TOL, f"{key}={value!r} was taken but not reproduced: {rel(b, a):.2e}"


def test_the_command_line_loads_a_flow_checkpoint_as_diffusers_does(qtaylor_bin, tmp_path):
    """A folder whose scheduler_config.json is a FlowMatchEulerDiscreteScheduler config is a
    flow model on the command line: ``qtaylor sample --model`` with ``ddim`` on diffusers'
    sigmas ends where diffusers' own Euler loop with the same UNet ends."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    unet.save_pretrained(tmp_path / "ck" / "unet")
    src = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    src.save_pretrained(tmp_path / "ck" / "scheduler")
    src.set_timesteps(6)
    rows, seed = 3, 2
    draw, _ = qtaylor.torch.stream_noise(seed, rows)
    x = draw([1, 8, 8]).float()
    with torch.no_grad():
        for t in src.timesteps:
            x = src.step(unet(x, t).sample, t, x).prev_sample
    out = tmp_path / "x.npy"
    cmd = [str(qtaylor_bin), "sample", "--model", str(tmp_path / "ck"), "--sampler", "ddim", "--seed", str(seed),
           "--batch", str(rows), "--sigmas", ",".join(repr(float(v)) for v in src.sigmas.tolist()),
           "--out", str(tmp_path / "x.png"), "--save-npy", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cli = torch.from_numpy(np.load(out)).float()
    assert cli.shape == x.shape
    assert rel(cli, x) <= 1e-4, rel(cli, x)  # float32 networks on both sides


def test_the_command_line_refuses_flow_keys_it_does_not_take(qtaylor_bin, tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    unet.save_pretrained(tmp_path / "ck" / "unet")
    for kw, key in [(dict(use_dynamic_shifting=True), "use_dynamic_shifting"), (dict(shift=-1.0), "shift"),
                    (dict(use_karras_sigmas=True), "use_karras_sigmas")]:
        diffusers.FlowMatchEulerDiscreteScheduler(**kw).save_pretrained(tmp_path / "ck" / "scheduler")
        out = tmp_path / "never.png"
        r = subprocess.run([str(qtaylor_bin), "sample", "--model", str(tmp_path / "ck"), "--sampler", "ddim",
                            "--steps", "4", "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and f"'{key}'" in r.stderr and "panicked" not in r.stderr, r.stderr
        assert not out.exists()


def test_diffusers_loads_the_shipped_flow_model_and_the_swap_reproduces_its_scheduler(repo_root):
    """assets/mnist-flow-unet is a diffusers folder: UNet2DModel and
    FlowMatchEulerDiscreteScheduler load it as they are; the swap runs it as they do."""
    folder = repo_root / "assets" / "mnist-flow-unet"
    unet = diffusers.UNet2DModel.from_pretrained(folder).float().eval()
    src = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder)
    labels = torch.arange(10)

    def loop(s, x):
        s.set_timesteps(6)
        with torch.no_grad():
            for t in s.timesteps:
                x = s.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
        return x

    x = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ref = loop(src, x.clone())
    ours = loop(QTaylorScheduler.from_config(src.config), x.clone())
    assert rel(ours, ref) <= 1e-5, rel(ours, ref)
    assert float(ref.min()) > -1.5 and float(ref.max()) < 1.5  # images in [−1, 1], not noise


def test_the_pytorch_loop_samples_a_flow_model_in_its_own_state():
    """qtaylor.torch.sample on Schedule.flow: x, the model's input and the result are the flow
    state, the model gets 1000 ς; ddim there is FlowMatch's Euler loop on the same levels."""
    src = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref = run(src, 8, start())
    sched = qtaylor.Schedule.flow(shift=3.0)
    times = [float(t) for t in sched.time_of_level(np.asarray(src.sigmas.tolist(), dtype=np.float64))]
    seen = []

    def model(x, t):
        seen.append(float(t[0]))
        return velocity(x, t)

    out = qtaylor.torch.sample(model, start(), "ddim", schedule=sched, times=times, prediction_type="flow_prediction")
    assert out.nfe == 8 and rel(out.x, ref) <= REL_TOL, rel(out.x, ref)
    assert abs(seen[0] - 1000.0) < 1e-9 and abs(seen[1] - float(src.timesteps[1])) < 1e-3


def test_a_grid_file_tuned_on_the_flow_path_sets_the_swaps_levels(qtaylor_bin, tmp_path):
    """``qtaylor tune --schedule flow`` writes ς levels; ``set_grid_file`` runs them as they
    are (the source's ``set_timesteps(sigmas=)`` would shift them a second time)."""
    mix = _mixture_file(tmp_path)
    grid = tmp_path / "g.json"
    r = subprocess.run([str(qtaylor_bin), "tune", "--problem", str(mix), "--schedule", "flow", "--shift", "3",
                        "--sampler", "unipc-3", "--nfe", "5", "--out", str(grid)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    g = json.loads(grid.read_text())
    assert g["sigmas"][0] == 1.0 and g["sigmas"][-1] == 0.0 and all(0 <= v <= 1 for v in g["sigmas"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = QTaylorScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config, sampler="unipc-3")
    q.set_grid_file(grid)
    assert np.allclose(q.sigmas.double().numpy(), g["sigmas"], rtol=1e-6, atol=0)
    assert len(q.timesteps) == 5 and abs(float(q.timesteps[0]) - 1000.0) < 1e-3
    out = run_grid(q, start())
    assert bool(torch.isfinite(out).all())


def run_grid(q, x):
    for t in q.timesteps:
        x = q.step(velocity(x, t.reshape(1).expand(x.shape[0])), t, x).prev_sample
    return x


@pytest.mark.parametrize(
    "kw,says",
    [
        (dict(shift=0.0), "shift=0"),
        (dict(shift=-3.0), "shift=-3"),
        (dict(mu=float("nan")), "mu=NaN"),
        (dict(mu=-1.0, time_shift="linear"), "mu=-1"),
        (dict(mu=1.0, time_shift="cubic"), "time_shift='cubic'"),
        (dict(shift=2.0, mu=1.0), "not both"),
        (dict(shift=2.0, time_shift="linear"), "time_shift='linear' applies to mu"),
    ],
)
def test_a_bad_flow_schedule_names_the_keyword_and_its_value(kw, says):
    with pytest.raises(ValueError) as e:
        qtaylor.Schedule.flow(**kw)
    assert says in str(e.value), str(e.value)
    # and a level outside [0, 1] names the value
    with pytest.raises(ValueError, match="1.5"):
        qtaylor.Schedule.flow(shift=3.0).time_of_level(1.5)
