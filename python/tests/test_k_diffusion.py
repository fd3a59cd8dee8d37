"""``qtaylor.k_diffusion`` against k-diffusion 0.1.1.post1's own samplers where the
algorithm is the same.

Every parity test runs k-diffusion's function and qtaylor's from the same start, on the
same sigmas, with the same noise (the same ``noise_sampler``, or the same
``torch.manual_seed`` for the churn, which draws from torch's global generator), and
compares in float64 the end points and every callback dict (x, i, sigma, sigma_hat,
denoised) to 1e-6 (measured: about 1e-15).

The model is the exact denoiser of a two-component Gaussian mixture per coordinate in
k-diffusion's scaling (x = x0 + σ ε): D(x, σ) = Σ_k r_k(x) (s_k² x + σ² μ_k)/(s_k² + σ²),
r_k the posterior weights, with the means shifted by an ``extra_args`` keyword so that the
forwarding of extra_args is checked too.

Only ``k_diffusion.sampling`` (and the ``utils`` it imports) is loaded: ``import k_diffusion``
imports every submodule (models, evaluation: scikit-image, clean-fid, …), which the test
environment does not install (scripts/python-env.sh installs k-diffusion with --no-deps).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import types

import pytest
import torch

import qtaylor
from qtaylor._ops import TorchOps
import qtaylor.k_diffusion as qkd
import qtaylor.torch as qt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOL = 1e-6
SHAPE = (3, 2, 4)
STEPS = 10


def _load_k_diffusion_sampling():
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.fail("k-diffusion is not installed; run scripts/python-env.sh (it pins k-diffusion==0.1.1.post1)")
    if "k_diffusion" not in sys.modules:
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
    import k_diffusion.sampling

    return k_diffusion.sampling


@pytest.fixture(scope="module")
def K():
    return _load_k_diffusion_sampling()


class Mixture:
    """The exact VE denoiser of Σ_k w_k N(μ_k + shift, s_k²), per coordinate."""

    def __init__(self):
        self.mu = torch.tensor([-1.0, 0.8], dtype=torch.float64)
        self.sd = torch.tensor([0.3, 0.5], dtype=torch.float64)
        self.w = torch.tensor([0.4, 0.6], dtype=torch.float64)

    def __call__(self, x, sigma, shift=0.0):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype, (sigma.shape, sigma.dtype, x.dtype)
        s2 = sigma.to(torch.float64).view((-1,) + (1,) * x.dim()) ** 2
        xx = x.to(torch.float64)[..., None]
        var = self.sd**2 + s2
        mean = self.mu + shift
        r = torch.softmax(torch.log(self.w) - 0.5 * torch.log(var) - (xx - mean) ** 2 / (2 * var), dim=-1)
        return (r * (self.sd**2 * xx + s2 * mean) / var).sum(-1).to(x.dtype)


EXTRA = {"shift": 0.1}


def _sigmas(K, final_zero=True):
    s = K.get_sigmas_karras(STEPS, 0.03, 14.6).to(torch.float64)
    return s if final_zero else s[:-1]


def _start(sigmas):
    g = torch.Generator().manual_seed(0)
    return torch.randn(SHAPE, generator=g, dtype=torch.float64) * sigmas[0]


def _noise_sampler(sigmas):
    """Noise per step, looked up by the step's (σ_i, σ_{i+1}): the same draws for both
    implementations, and a KeyError if the arguments are not k-diffusion's."""
    g = torch.Generator().manual_seed(1)
    table = {
        (float(a), float(b)): torch.randn(SHAPE, generator=g, dtype=torch.float64)
        for a, b in zip(sigmas[:-1], sigmas[1:])
    }
    return lambda sigma, sigma_next: table[(float(sigma), float(sigma_next))]


def _run(fn, sigmas, seed=5, **kw):
    seen = []
    torch.manual_seed(seed)
    out = fn(Mixture(), _start(sigmas), sigmas, extra_args=EXTRA, callback=seen.append, disable=True, **kw)
    return out, seen, torch.get_rng_state()


def _max_diff(a, b) -> float:
    return (torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)).abs().max().item()


def _compare_callbacks(ref, ours):
    assert len(ours) == len(ref), (len(ours), len(ref))
    for r, o in zip(ref, ours):
        assert set(o) == set(r), (set(o), set(r))
        assert o["i"] == r["i"]
        for key in ("x", "sigma", "sigma_hat", "denoised"):
            assert _max_diff(o[key], r[key]) <= TOL, (r["i"], key, _max_diff(o[key], r[key]))


CHURN = {"s_churn": 2.0, "s_tmin": 0.5, "s_tmax": 5.0, "s_noise": 1.003}  # churns some steps only
NOISY = object()  # stands for the shared noise_sampler

CASES = [
    ("sample_euler", {}),
    ("sample_euler", CHURN),
    ("sample_heun", {}),
    ("sample_heun", CHURN),
    ("sample_dpm_2", {}),
    ("sample_dpm_2", CHURN),
    ("sample_euler_ancestral", {"noise_sampler": NOISY}),
    ("sample_euler_ancestral", {"eta": 0.5, "s_noise": 0.9, "noise_sampler": NOISY}),
    ("sample_euler_ancestral", {"eta": 0.0}),
    ("sample_dpm_2_ancestral", {"noise_sampler": NOISY}),
    ("sample_dpm_2_ancestral", {"eta": 0.5, "s_noise": 0.9, "noise_sampler": NOISY}),
    ("sample_dpm_2_ancestral", {"eta": 0.0}),
    ("sample_lms", {}),
    ("sample_lms", {"order": 3}),
    ("sample_lms", {"order": 2}),
    ("sample_lms", {"order": 1}),
    ("sample_dpmpp_2m", {}),
    ("sample_dpmpp_2m_sde", {"noise_sampler": NOISY}),
    ("sample_dpmpp_2m_sde", {"eta": 0.5, "noise_sampler": NOISY}),
    ("sample_dpmpp_2m_sde", {"eta": 0.0}),
    ("sample_dpmpp_2s_ancestral", {"eta": 0.0}),
    ("sample_dpmpp_sde", {"eta": 0.0}),
]


def _case_id(case):
    name, kw = case
    return name + "".join(f"-{k}={'ns' if v is NOISY else v}" for k, v in kw.items())


@pytest.mark.parametrize("final_zero", [True, False], ids=["to-zero", "to-sigma-min"])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_each_function_equals_k_diffusion_with_the_same_noise_and_callbacks(K, case, final_zero):
    name, kw = case
    sigmas = _sigmas(K, final_zero)
    kw = {k: (_noise_sampler(sigmas) if v is NOISY else v) for k, v in kw.items()}
    ref, ref_seen, _ = _run(getattr(K, name), sigmas, **kw)
    out, seen, _ = _run(getattr(qkd, name), sigmas, **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert _max_diff(out, ref) <= TOL, _max_diff(out, ref)
    _compare_callbacks(ref_seen, seen)


@pytest.mark.parametrize("name", ["sample_euler", "sample_heun", "sample_dpm_2"])
def test_the_churn_draws_one_randn_like_per_step_as_k_diffusion_does(K, name):
    # Same global seed → same samples, and the generator ends in the same state, also with
    # the churn off (k-diffusion draws every step regardless).
    sigmas = _sigmas(K)
    for kw in (CHURN, {}):
        ref, _, ref_state = _run(getattr(K, name), sigmas, **kw)
        out, _, state = _run(getattr(qkd, name), sigmas, **kw)
        assert _max_diff(out, ref) <= TOL
        assert torch.equal(state, ref_state), kw
    churned, _, _ = _run(getattr(qkd, name), sigmas, **CHURN)
    assert _max_diff(churned, _run(getattr(qkd, name), sigmas, seed=6, **CHURN)[0]) > 1e-3  # the noise is used


@pytest.mark.parametrize("n", [6, 7, 8, 10])
def test_sample_dpm_fast_equals_k_diffusion_on_a_float64_grid(K, n):
    # k-diffusion builds its λ grid with torch.linspace in the default dtype (float32 unless
    # set), so the comparison in float64 sets the default dtype for its call.
    x = _start(_sigmas(K))
    ref_seen, seen = [], []
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref = K.sample_dpm_fast(Mixture(), x, 0.03, 14.6, n, extra_args=EXTRA, callback=ref_seen.append, disable=True)
    finally:
        torch.set_default_dtype(previous)
    out = qkd.sample_dpm_fast(Mixture(), x, 0.03, 14.6, n, extra_args=EXTRA, callback=seen.append, disable=True)
    assert _max_diff(out, ref) <= TOL, _max_diff(out, ref)
    assert len(seen) == len(ref_seen)
    for r, o in zip(ref_seen, seen):
        assert set(o) == set(r) and o["i"] == r["i"]
        for key in ("x", "sigma", "sigma_hat", "denoised", "t", "t_up"):
            assert _max_diff(o[key], r[key]) <= TOL, (r["i"], key)


def test_float32_samples_stay_float32_and_follow_k_diffusion(K):
    sigmas = K.get_sigmas_karras(STEPS, 0.03, 14.6)
    x = _start(sigmas).to(torch.float32)
    ref = K.sample_dpmpp_2m(Mixture(), x, sigmas, extra_args=EXTRA, disable=True)
    out = qkd.sample_dpmpp_2m(Mixture(), x, sigmas, extra_args=EXTRA, disable=True)
    assert out.dtype == torch.float32
    assert _max_diff(out, ref) <= 1e-4 * ref.abs().max().item()


@pytest.mark.parametrize("name", sorted(qkd.K_DIFFUSION_EQUIVALENTS))
def test_a_k_diffusion_caller_changes_only_the_import(K, name):
    ours = inspect.signature(getattr(qkd, name)).parameters
    theirs = inspect.signature(getattr(K, name)).parameters
    assert list(ours) == list(theirs)
    for p in theirs:
        assert ours[p].default == theirs[p].default or (
            isinstance(ours[p].default, float) and math.isclose(ours[p].default, theirs[p].default)
        ), (p, ours[p].default, theirs[p].default)
    assert name in qkd.__all__


@pytest.mark.parametrize("name,nearest", [("sample_dpmpp_3m_sde", "dpmpp-3m"), ("sample_dpm_adaptive", "dpm-solver-23")])
def test_functions_of_another_algorithm_are_absent_and_name_the_nearest(K, name, nearest):
    assert callable(getattr(K, name))
    assert name not in qkd.__all__
    with pytest.raises(AttributeError, match=nearest):
        getattr(qkd, name)


def test_dpmpp_3m_sde_is_left_out_because_its_second_step_differs_from_dpmpp_3m(K):
    # With η = 0 k-diffusion's 3M SDE and qtaylor's dpmpp-3m agree on the first step and
    # part at the second (k-diffusion's φ₂ weight against diffusers' midpoint weight).
    sigmas = _sigmas(K)
    ref, ref_seen, _ = _run(K.sample_dpmpp_3m_sde, sigmas, eta=0.0)
    out, seen, _ = _run(lambda *a, **k: qkd.sample(*a, sampler="dpmpp-3m", **k), sigmas)
    assert _max_diff(seen[1]["x"], ref_seen[1]["x"]) <= TOL
    assert _max_diff(seen[2]["x"], ref_seen[2]["x"]) > 1e-4
    assert _max_diff(out, ref) > 1e-4


# ---------------------------------------------------------------------------------------
# Every qtaylor sampler through sample()


def _ve_model_in_vp_coordinates(model, extra):
    # x_ve = x_vp √(1 + σ²) with t = σ on Schedule.ve (written out here independently).
    def vp(x, t):
        f = torch.sqrt(1 + t.to(torch.float64) ** 2).to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        return model(x * f, t.to(x.dtype), **extra)

    return vp


@pytest.mark.parametrize("sampler", qtaylor.all_sampler_names())
def test_every_sampler_runs_on_k_diffusion_arguments_as_torch_sample_runs_it_on_the_ve_schedule(K, sampler):
    sigmas = _sigmas(K)
    x = _start(sigmas)
    torch.manual_seed(3)
    out = qkd.sample(Mixture(), x, sigmas, extra_args=EXTRA, disable=True, sampler=sampler)
    torch.manual_seed(3)
    # the core's loop on the VP state, the model called through the scaling written out above
    x_vp = x / math.sqrt(1 + float(sigmas[0]) ** 2)
    ref, _ = qtaylor._core.run(
        qtaylor.Schedule.ve(sigma_max=2 * float(sigmas[0])),
        qtaylor._core.SamplerSpec(sampler),
        sigmas.tolist(),
        x_vp,
        TorchOps(_ve_model_in_vp_coordinates(Mixture(), EXTRA)),
        x.shape[0],
        prediction_type="sample",
    )
    ref = ref * math.sqrt(1 + float(sigmas[-1]) ** 2)
    assert out.shape == x.shape and out.dtype == x.dtype and bool(torch.isfinite(out).all())
    assert _max_diff(out, ref) <= TOL, _max_diff(out, ref)


def test_sample_passes_sampler_options_and_reports_once_per_step(K):
    sigmas = _sigmas(K)
    seen = []
    a = qkd.sample(Mixture(), _start(sigmas), sigmas, extra_args=EXTRA, callback=seen.append, disable=True,
                   sampler="unipc-3", unipc_variant="bh1")
    b = qkd.sample(Mixture(), _start(sigmas), sigmas, extra_args=EXTRA, disable=True, sampler="unipc-3")
    assert _max_diff(a, b) > 1e-6  # the option reached the sampler
    assert [d["i"] for d in seen] == list(range(STEPS))
    assert all(float(d["sigma"]) == float(d["sigma_hat"]) == float(sigmas[d["i"]]) for d in seen)
    seen.clear()
    qkd.sample(Mixture(), _start(sigmas), sigmas, callback=seen.append, disable=True, sampler="rk4")
    assert [d["i"] for d in seen] == list(range(STEPS))  # 4 network calls per step, one callback


def test_the_named_functions_are_sample_with_their_qtaylor_sampler(K):
    sigmas = _sigmas(K)
    ns = _noise_sampler(sigmas)
    for name, sampler in qkd.K_DIFFUSION_EQUIVALENTS.items():
        if name == "sample_dpm_fast":
            continue  # its own signature, checked against k-diffusion above
        fn = getattr(qkd, name)
        params = inspect.signature(fn).parameters
        kw = {"eta": 0.0} if sampler == "dpmpp-2s" else {"noise_sampler": ns} if "noise_sampler" in params else {}
        torch.manual_seed(2)
        a = fn(Mixture(), _start(sigmas), sigmas, disable=True, **kw)
        torch.manual_seed(2)
        b = qkd.sample(Mixture(), _start(sigmas), sigmas, disable=True, sampler=sampler, noise_sampler=kw.get("noise_sampler"))
        assert _max_diff(a, b) <= TOL, name


def test_a_sampler_with_two_draws_per_step_refuses_a_k_diffusion_noise_sampler(K):
    sigmas = _sigmas(K)
    with pytest.raises(ValueError, match="noise_sampler.*2 normal"):
        qkd.sample(Mixture(), _start(sigmas), sigmas, disable=True, sampler="qit-2", noise_sampler=_noise_sampler(sigmas))
    out = qkd.sample(Mixture(), _start(sigmas), sigmas, disable=True, sampler="qit-2")
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("sampler,options", [("qt-3", {}), ("k-euler", {}), ("k-euler-a", {"eta": 0.0})])
def test_a_run_without_noise_refuses_a_noise_sampler_instead_of_ignoring_it(K, sampler, options):
    sigmas = _sigmas(K)
    with pytest.raises(ValueError, match=f"noise_sampler=.*'{sampler}' draws no noise"):
        qkd.sample(Mixture(), _start(sigmas), sigmas, disable=True, sampler=sampler,
                   noise_sampler=_noise_sampler(sigmas), **options)


def test_disable_false_shows_a_progress_bar_and_true_hides_it(K, capsys):
    sigmas = _sigmas(K)
    qkd.sample_heun(Mixture(), _start(sigmas), sigmas, disable=True)
    assert capsys.readouterr().err == ""
    qkd.sample_heun(Mixture(), _start(sigmas), sigmas, disable=False)
    err = capsys.readouterr().err
    assert "k-heun" in err and "NFE" in err, err


# ---------------------------------------------------------------------------------------
# What is not reproduced is refused, naming the parameter and its value

REFUSED = [
    ("sample_dpmpp_2m_sde", {"solver_type": "heun"}, "solver_type='heun'"),
    ("sample_dpmpp_2m_sde", {"s_noise": 0.5}, "s_noise=0.5"),
    ("sample_dpmpp_2m_sde", {"eta": 2.0}, "eta=2"),
    ("sample_dpmpp_2s_ancestral", {}, "eta=1.0"),
    ("sample_dpmpp_sde", {"eta": 0.5}, "eta=0.5"),
    ("sample_dpmpp_sde", {"eta": 0.0, "r": 0.3}, "r=0.3"),
    ("sample_euler", {"s_churn": 1.0, "s_noise": 0.0}, "s_noise=0.0"),
    ("sample_heun", {"s_churn": -1.0}, "s_churn=-1"),
    ("sample_euler_ancestral", {"eta": -0.5}, "eta=-0.5"),
    ("sample_lms", {"order": 5}, "order=5"),
    ("sample_lms", {"order": 2.0}, "order=2.0"),
]


@pytest.mark.parametrize("name,kw,named", REFUSED, ids=[f"{n}-{m}" for n, _, m in REFUSED])
def test_a_parameter_value_not_reproduced_is_a_value_error_naming_it(K, name, kw, named):
    sigmas = _sigmas(K)
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(".", r"\.")):
        getattr(qkd, name)(Mixture(), _start(sigmas), sigmas, disable=True, **kw)


@pytest.mark.parametrize(
    "kw,named",
    [({"eta": 0.5}, "eta=0.5"), ({"n": 0}, "n=0"), ({"sigma_min": 0.0}, "sigma_min=0.0"),
     ({"sigma_min": 20.0}, "sigma_min=20.0")],
)
def test_sample_dpm_fast_refuses_what_it_does_not_reproduce(kw, named):
    args = {"sigma_min": 0.03, "sigma_max": 14.6, "n": 6, **kw}
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        qkd.sample_dpm_fast(Mixture(), torch.zeros(SHAPE, dtype=torch.float64), disable=True, **args)


@pytest.mark.parametrize(
    "sigmas,named",
    [([14.6, 1.0, 2.0, 0.0], "decrease"), ([0.0, 0.0], "sigmas="), ([[14.6, 0.0]], "shape")],
)
def test_sigmas_that_are_no_grid_are_refused_naming_sigmas(sigmas, named):
    with pytest.raises(ValueError, match=named):
        qkd.sample_euler(Mixture(), torch.zeros(SHAPE, dtype=torch.float64), torch.tensor(sigmas, dtype=torch.float64))
