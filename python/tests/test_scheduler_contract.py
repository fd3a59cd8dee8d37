"""What diffusers pipelines rely on from a scheduler (cf. diffusers' SchedulerCommonTest),
checked on QTaylorScheduler."""

from __future__ import annotations

import io
import logging

import pytest
import torch

import qtaylor
import qtaylor.torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from qtaylor.diffusers import QTaylorScheduler, QTaylorSchedulerOutput

SHAPE = (2, 3, 8, 8)
ADAPTIVE = {"rk45", "dpm-solver-12", "dpm-solver-23"}
# network calls per step of the samplers with several (the rest make one)
MULTI_CALL = {
    "heun": 2,
    "rk4": 4,
    "dpm-solver-2": 2,
    "dpm-solver-3": 3,
    "dpmpp-2s": 2,
    "edm-heun": 2,
    "k-heun": 2,
    "k-dpm2": 2,
    "k-dpm2-a": 2,
}
# one call per step, but a warm-up with more calls (so `order` stays 1, more timesteps)
WARM_UP = {"pndm", "plms"}
STOCHASTIC = ["ddpm", "dpmpp-2m-sde", "k-euler-a", "k-dpm2-a"]


def gaussian_eps(ac: torch.Tensor):
    """Exact ε̂ of N(0.3, 0.5²) per pixel under ᾱ at (possibly fractional) timesteps."""

    def model(x, t):
        if isinstance(t, torch.Tensor) and t.dim() == 1:  # qtaylor.torch.sample: one per row
            assert bool((t == t[0]).all())
            t = t[0]
        tf = float(t)
        lo = int(tf)
        hi = min(lo + 1, len(ac) - 1)
        w = tf - lo
        abar = (1 - w) * ac[lo].double() + w * ac[hi].double()
        a, s = abar.sqrt(), (1 - abar).sqrt()
        xd = x.double()
        return (s * (xd - a * 0.3) / (a * a * 0.25 + s * s)).to(x.dtype)

    return model


def noise(seed=0, dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


def full_loop(sched, x, model=None, seed=None, steps=None):
    if steps is not None:
        sched.set_timesteps(steps)
    model = model or gaussian_eps(DDPMScheduler().alphas_cumprod)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, generator=gen).prev_sample
    return x


# ---------------------------------------------------------------------------------------
# Configs


def test_save_pretrained_round_trip(tmp_path):
    opts = dict(
        sampler="unipc-2", unipc_variant="bh1", unipc_corrector=False, lower_order_final=False,
        timestep_spacing="trailing", prediction_type="v_prediction", final_sigmas_type="sigma_min",
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
        clip_sample=True, clip_sample_range=2.0,
    )
    s = QTaylorScheduler(**opts)
    s.save_pretrained(tmp_path)
    t = QTaylorScheduler.from_pretrained(tmp_path)
    assert type(t) is QTaylorScheduler
    for k, v in opts.items():
        assert t.config[k] == v, k
    assert {k: v for k, v in t.config.items() if not k.startswith("_")} == {
        k: v for k, v in s.config.items() if not k.startswith("_")
    }
    s.set_timesteps(8)
    t.set_timesteps(8)
    assert s.timesteps.tolist() == t.timesteps.tolist()
    torch.testing.assert_close(full_loop(s, noise()), full_loop(t, noise()), rtol=0, atol=0)


@pytest.mark.parametrize(
    "sampler,opts",
    [
        ("qt-3", dict(expand="logsnr", qt_last="taylor")),
        ("ddim", dict(eta=0.3)),
        ("ddpm", dict(ddpm_variance="beta")),
        ("edm-heun", dict(s_churn=0.5, s_tmin=0.1, s_tmax=50.0, s_noise=1.003)),
        ("edm-heun", dict()),  # s_tmax = inf goes through JSON (as Infinity)
    ],
)
def test_sampler_options_survive_save_and_load(tmp_path, sampler, opts):
    s = QTaylorScheduler(sampler=sampler, **opts)
    s.save_config(tmp_path)
    t = QTaylorScheduler.from_pretrained(tmp_path)
    assert t.config.sampler == sampler
    for k, v in opts.items():
        assert t.config[k] == v, k
    assert t.config.s_tmax == s.config.s_tmax


def test_from_config_keeps_options_and_overrides():
    src = QTaylorScheduler(sampler="qt-2", expand="abar")
    t = QTaylorScheduler.from_config(src.config, sampler="qt-4")
    assert t.config.sampler == "qt-4" and t.config.expand == "abar"


class _Capture:
    """Captures what diffusers logs (its root logger does not propagate to pytest's)."""

    def __enter__(self):
        self.buf = io.StringIO()
        self.handler = logging.StreamHandler(self.buf)
        self.handler.setLevel(logging.WARNING)
        self.logger = logging.getLogger("diffusers")
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)

    @property
    def text(self):
        return self.buf.getvalue()


@pytest.mark.parametrize(
    "cls",
    [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler,
     PNDMScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler],
)
def test_from_config_of_diffusers_schedulers_warns_nothing(cls, tmp_path):
    # both an in-memory config and a saved one (no _use_default_values: every key explicit)
    cls().save_config(tmp_path)
    for config in (cls().config, QTaylorScheduler.load_config(tmp_path)):
        with _Capture() as cap:
            s = QTaylorScheduler.from_config(config, sampler="qt-3")
        assert cap.text == "", cap.text
        assert s.config.sampler == "qt-3"
        s.set_timesteps(5)
    assert cls.__name__ in QTaylorScheduler._compatibles


def test_unknown_config_key_does_warn():
    """The capture works: a key no compatible scheduler has is reported."""
    with _Capture() as cap:
        QTaylorScheduler.from_config({**DDIMScheduler().config, "not_a_key": 3}, sampler="qt-3")
    assert "not_a_key" in cap.text


def test_scheduler_basics():
    s = QTaylorScheduler(sampler="qt-3")
    assert len(s) == 1000 and s.init_noise_sigma == 1.0
    x = noise()
    assert s.scale_model_input(x, 10) is x
    s.set_timesteps(6, device="cpu")
    assert s.num_inference_steps == 6 and s.timesteps.dtype == torch.int64
    assert s.step_index is None
    model = gaussian_eps(DDPMScheduler().alphas_cumprod)
    for i, t in enumerate(s.timesteps):
        out = s.step(model(x, t), t, x)
        assert isinstance(out, QTaylorSchedulerOutput)
        assert s.step_index == i + 1
        x = out.prev_sample
    with pytest.raises(ValueError):  # past the last call
        s.step(model(x, 0), s.timesteps[-1], x)


# ---------------------------------------------------------------------------------------
# step()


@pytest.mark.parametrize("sampler", ["qt-3", "dpmpp-3m", "unipc-3", "heun", "ddim"])
def test_return_dict_false_gives_the_same_prev_sample(sampler):
    model = gaussian_eps(DDPMScheduler().alphas_cumprod)
    a = QTaylorScheduler(sampler=sampler)
    b = QTaylorScheduler(sampler=sampler)
    a.set_timesteps(6)
    b.set_timesteps(6)
    xa = xb = noise()
    for t in a.timesteps:
        oa = a.step(model(xa, t), t, xa, return_dict=True)
        ob = b.step(model(xb, t), t, xb, return_dict=False)
        assert isinstance(ob, tuple) and len(ob) == 1
        torch.testing.assert_close(oa.prev_sample, ob[0], rtol=0, atol=0)
        assert oa[0] is oa.prev_sample  # BaseOutput indexing, as pipelines use [0]
        xa, xb = oa.prev_sample, ob[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sampler", ["qt-3", "unipc-3", "dpmpp-2m", "heun", "ddpm"])
def test_output_dtype_is_the_sample_dtype(dtype, sampler):
    s = QTaylorScheduler(sampler=sampler)
    s.set_timesteps(5)
    model = gaussian_eps(DDPMScheduler().alphas_cumprod)
    x = noise(dtype=dtype)
    for t in s.timesteps:
        out = s.step(model(x, t), t, x, generator=torch.Generator().manual_seed(0))
        assert out.prev_sample.dtype == dtype
        assert out.pred_original_sample.dtype == dtype
        x = out.prev_sample
    assert torch.isfinite(x.float()).all()
    # and close to the float32 run
    ref = full_loop(QTaylorScheduler(sampler=sampler), noise(), steps=5, seed=0)
    if sampler != "ddpm":  # ddpm draws its noise in the sample's dtype
        tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float32: 1e-6}[dtype]
        assert float((x.float() - ref).abs().max()) <= tol * float(ref.abs().max())


def test_add_noise_equals_ddpm_scheduler():
    for ref in (
        DDPMScheduler(),
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
    ):
        ours = QTaylorScheduler.from_config(ref.config, sampler="ddim")
        x0 = noise(1)
        eps = noise(2)
        ts = torch.tensor([999, 0], dtype=torch.int64)
        ac = ref.alphas_cumprod.double()
        want = ac[ts].sqrt().view(-1, 1, 1, 1) * x0.double() + (1 - ac[ts]).sqrt().view(-1, 1, 1, 1) * eps.double()
        got = ours.add_noise(x0, eps, ts)
        assert got.dtype == x0.dtype and got.shape == x0.shape
        assert float((got.double() - want).abs().max()) <= 1e-6
        torch.testing.assert_close(got, ref.add_noise(x0, eps, ts), rtol=0, atol=1e-6)
        for t in (500, torch.tensor(37), torch.tensor([250])):  # one timestep for the batch
            torch.testing.assert_close(
                ours.add_noise(x0, eps, t),
                ref.add_noise(x0, eps, torch.as_tensor(t).reshape(-1)),
                rtol=0, atol=1e-6,
            )
    half = ours.add_noise(x0.half(), eps.half(), ts)
    assert half.dtype == torch.float16


# ---------------------------------------------------------------------------------------
# Grids


def test_retrieve_timesteps_accepts_our_set_timesteps():
    s = QTaylorScheduler(sampler="dpmpp-2m")
    ts, n = retrieve_timesteps(s, 7, "cpu")
    assert n == 7 and ts.tolist() == s.timesteps.tolist() and len(ts) == 7

    ts, n = retrieve_timesteps(s, None, "cpu", timesteps=[999, 700, 400, 100])
    assert n == 4 and ts.tolist() == [999, 700, 400, 100]
    x = full_loop(s, noise())
    assert torch.isfinite(x).all()

    # sigmas (σ/α, with a final 0) at exact integer timesteps come back as those timesteps
    ac = DDPMScheduler().alphas_cumprod.double()
    sig = [float(((1 - ac[t]) / ac[t]).sqrt()) for t in (999, 500, 100)] + [0.0]
    ts, n = retrieve_timesteps(s, None, "cpu", sigmas=sig)
    assert n == 3 and ts.tolist() == [999, 500, 100]

    # other sigmas: fractional timesteps, close to EulerDiscreteScheduler's
    sig = [10.0, 3.0, 1.0, 0.1, 0.0]
    ts, n = retrieve_timesteps(s, None, "cpu", sigmas=sig)
    e = EulerDiscreteScheduler()
    e.set_timesteps(sigmas=sig)
    assert n == 4 and ts.dtype.is_floating_point
    assert float((ts - e.timesteps).abs().max()) < 0.05
    x = full_loop(s, noise())  # step() takes the fractional timesteps
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("steps", [4, 10])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_heun_order_2_and_2n_minus_1_timesteps(steps, spacing):
    s = QTaylorScheduler(sampler="heun", timestep_spacing=spacing, steps_offset=1)
    s.set_timesteps(steps)
    assert s.order == 2
    assert len(s.timesteps) == 2 * steps - 1
    # the same pattern (t0, t1, t1, t2, t2, ...) as diffusers' HeunDiscreteScheduler
    h = HeunDiscreteScheduler(timestep_spacing=spacing, steps_offset=1)
    h.set_timesteps(steps)
    assert [float(v) for v in s.timesteps.tolist()] == h.timesteps.tolist()
    assert torch.isfinite(full_loop(s, noise())).all()


def test_heun_sigma_min_final_has_2n_calls():
    s = QTaylorScheduler(sampler="heun", final_sigmas_type="sigma_min", timestep_spacing="trailing")
    s.set_timesteps(5)
    assert s.order == 2 and len(s.timesteps) == 10
    assert torch.isfinite(full_loop(s, noise())).all()


@pytest.mark.parametrize("sampler", STOCHASTIC)
def test_seeded_generator_repeats_a_stochastic_sampler(sampler):
    s = QTaylorScheduler(sampler=sampler)
    assert s.sampler_spec.is_stochastic
    a = full_loop(s, noise(), steps=8, seed=123)
    b = full_loop(s, noise(), steps=8, seed=123)
    c = full_loop(s, noise(), steps=8, seed=124)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float((a - c).abs().max()) > 1e-3
    # without a generator: torch's global RNG
    torch.manual_seed(5)
    d = full_loop(s, noise(), steps=8)
    torch.manual_seed(5)
    e = full_loop(s, noise(), steps=8)
    torch.testing.assert_close(d, e, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "dpmpp-3m", "unipc-3", "deis-3", "ipndm", "heun", "qt-3"])
@pytest.mark.parametrize("begin_step", [0, 3, 6])
def test_set_begin_index_for_multistep_samplers(sampler, begin_step):
    """img2img: set_timesteps(N), set_begin_index(k·order), loop over timesteps[k·order:]
    == a fresh run on the remaining grid (history starting afresh)."""
    model = gaussian_eps(DDPMScheduler().alphas_cumprod)
    s = QTaylorScheduler(sampler=sampler, timestep_spacing="trailing")
    s.set_timesteps(10)
    begin = begin_step * s.order
    ts = s.timesteps[begin:]
    s.set_begin_index(begin)
    assert s.begin_index == begin
    assert s.timesteps.tolist() == ts.tolist()
    x = noise()
    for t in ts:
        x = s.step(model(x, t), t, x).prev_sample

    ref = QTaylorScheduler(sampler=sampler, timestep_spacing="trailing")
    full = QTaylorScheduler(sampler=sampler, timestep_spacing="trailing")
    full.set_timesteps(10)
    grid = [int(v) for v in full.timesteps.tolist()[::full.order]]
    ref.set_timesteps(timesteps=grid[begin_step:])
    assert ref.timesteps.tolist() == ts.tolist()
    y = full_loop(ref, noise(), model)
    torch.testing.assert_close(x, y, rtol=0, atol=0)

    # a pipeline that slices the timesteps without calling set_begin_index
    z = QTaylorScheduler(sampler=sampler, timestep_spacing="trailing")
    z.set_timesteps(10)
    w = noise()
    for t in z.timesteps[begin:]:
        w = z.step(model(w, t), t, w).prev_sample
    torch.testing.assert_close(w, y, rtol=0, atol=0)


def test_set_begin_index_inside_a_step_is_an_error():
    s = QTaylorScheduler(sampler="heun")
    s.set_timesteps(5)
    with pytest.raises(ValueError, match="inside step"):
        s.set_begin_index(3)


# ---------------------------------------------------------------------------------------
# Every sampler


def _fixed_grid_samplers():
    return [n for n in qtaylor.all_sampler_names() if n not in ADAPTIVE]


@pytest.mark.parametrize("sampler", _fixed_grid_samplers())
def test_every_fixed_grid_sampler_runs_through_step(sampler):
    steps = 8
    s = QTaylorScheduler(sampler=sampler)
    s.set_timesteps(steps)
    calls = len(s.timesteps)
    if sampler in MULTI_CALL:
        k = MULTI_CALL[sampler]
        assert s.order == k and calls == k * (steps - 1) + 1
    elif sampler in WARM_UP:
        assert s.order == 1 and calls > steps
    else:
        assert s.order == 1 and calls == steps, (s.order, calls)
    assert s.program.nfe == calls
    x = full_loop(s, noise(), seed=0)
    assert x.shape == SHAPE and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    # the exact ε̂ of N(0.3, 0.5²): the end points land in the data's neighbourhood (loose:
    # 8 steps are few for some samplers, e.g. qt-4 has std 0.13 here)
    assert abs(float(x.mean()) - 0.3) < 0.25 and 0.05 < float(x.std()) < 1.5, (
        float(x.mean()), float(x.std())
    )
    # and it is the same run as qtaylor.torch.sample's loop (the scheduler's default
    # lower_order_final=True made explicit: torch.sample's default is False)
    model = gaussian_eps(DDPMScheduler().alphas_cumprod)
    y = qtaylor.torch.sample(
        model, noise(), sampler=sampler, steps=steps, lower_order_final=True,
        generator=torch.Generator().manual_seed(0),
    ).x
    torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


def test_catalog_agrees_with_the_order_table():
    nfe = {name: per for name, per, _ in qtaylor.catalog()}
    for name, k in MULTI_CALL.items():
        assert nfe[name] == str(k), name


@pytest.mark.parametrize("sampler", sorted(ADAPTIVE))
def test_adaptive_samplers_point_to_torch_sample(sampler):
    with pytest.raises(ValueError, match=r"qtaylor\.torch\.sample"):
        QTaylorScheduler(sampler=sampler)
    with pytest.raises(ValueError, match=r"qtaylor\.torch\.sample"):
        QTaylorScheduler.from_config(DDIMScheduler().config, sampler=sampler)


# ---------------------------------------------------------------------------------------
# Found while writing these tests (see the report): the contract says these hold


@pytest.mark.parametrize(
    "spacing,offset", [("trailing", 0), ("leading", 1), ("leading", 0), ("linspace", 0)]
)
@pytest.mark.parametrize("sampler", ["dpmpp-2m", "ddim"])
def test_set_timesteps_n_gives_n_steps_with_sigma_min(sampler, spacing, offset):
    """set_timesteps(N) must give N steps (N network calls for a one-call sampler):
    pipelines take len(timesteps) == N·order (img2img slices timesteps[t_start·order:] for
    its strength; retrieve_timesteps returns len(timesteps) as the step count), and
    diffusers' DDIM/DPM/UniPC give N with final_sigmas_type="sigma_min". When the spaced
    grid already ends at timestep 0 (leading with offset 0, linspace), QTaylorScheduler
    drops that timestep and gives N − 1."""
    s = QTaylorScheduler(
        sampler=sampler, final_sigmas_type="sigma_min", timestep_spacing=spacing, steps_offset=offset
    )
    s.set_timesteps(10)
    assert (len(s.timesteps), s.num_inference_steps) == (10, 10), s.timesteps.tolist()
    ref = DPMSolverMultistepScheduler(
        final_sigmas_type="sigma_min", timestep_spacing=spacing, steps_offset=offset
    )
    ref.set_timesteps(10)
    assert len(ref.timesteps) == 10


def test_explicit_timesteps_are_all_called_with_sigma_min():
    """set_timesteps(timesteps=[999, 500, 0]) with sigma_min: the network should be called
    at every given timestep (diffusers' DPMSolverMultistep keeps all three)."""
    s = QTaylorScheduler(sampler="dpmpp-2m", final_sigmas_type="sigma_min")
    s.set_timesteps(timesteps=[999, 500, 0])
    ref = DPMSolverMultistepScheduler(final_sigmas_type="sigma_min")
    ref.set_timesteps(timesteps=[999, 500, 0])
    assert ref.timesteps.tolist() == [999, 500, 0]
    assert s.timesteps.tolist() == [999, 500, 0]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_scheduler_can_be_copied(how):
    """copy.deepcopy / pickle of a scheduler (diffusers' schedulers support both; several
    diffusers pipelines deepcopy their scheduler, and multiprocessing pickles it)."""
    import copy
    import pickle

    dup = copy.deepcopy if how == "deepcopy" else (lambda o: pickle.loads(pickle.dumps(o)))
    s = QTaylorScheduler(sampler="unipc-3", timestep_spacing="trailing")
    c = dup(s)  # fresh
    assert dict(c.config) == dict(s.config)
    s.set_timesteps(6)
    c = dup(s)  # with a recorded program
    torch.testing.assert_close(full_loop(c, noise()), full_loop(s, noise()), rtol=0, atol=0)
