"""qtaylor: few-NFE sampling of diffusion models, centred on the quasi-Taylor samplers
(arXiv 2112.13339), with every sampler computed by one Rust core.

- ``qtaylor.diffusers.QTaylorScheduler``: every sampler as a drop-in diffusers scheduler;
- ``qtaylor.torch.sample``: a k-diffusion-style sampling loop for any ``model(x, t)``;
- ``qtaylor.k_diffusion``: k-diffusion's own signatures (``sample_euler``, ``sample_dpmpp_2m``,
  …, and ``sample(..., sampler=name)`` for every sampler) for its denoisers ``model(x, σ)``;
- the scalar API below: schedules (α, σ, λ and their derivatives), time grids and the
  quasi-Taylor coefficients over numpy arrays.

The coefficients of every sampler are computed in f64 by the Rust core
(``qtaylor._core``); the Python code only moves tensors.
"""

from ._core import (
    ExactProblem,
    NoiseStreams,
    Program,
    SamplerSpec,
    Schedule,
    __version__,
    all_sampler_names,
    catalog,
    continuous_grid,
    discrete_grid,
    grid_times,
    quasi_taylor_coefficients,
    read_grid_file,
)

__all__ = [
    "ExactProblem",
    "NoiseStreams",
    "Program",
    "SamplerSpec",
    "Schedule",
    "QTaylorScheduler",
    "all_sampler_names",
    "catalog",
    "continuous_grid",
    "discrete_grid",
    "grid_times",
    "quasi_taylor_coefficients",
    "read_grid_file",
    "samplers",
    "__version__",
]


def samplers():
    """Every sampler family as ``(name, NFE per step, description)``."""
    return catalog()


def __getattr__(name):
    # Lazy, so that ``import qtaylor`` needs neither torch nor diffusers.
    if name == "QTaylorScheduler":
        from .diffusers import QTaylorScheduler

        return QTaylorScheduler
    raise AttributeError(f"module 'qtaylor' has no attribute '{name}'")
