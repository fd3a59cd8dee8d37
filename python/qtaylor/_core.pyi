"""Type stubs of the Rust extension ``qtaylor._core``."""

from typing import Any, List, Optional, Sequence, Tuple, Union, overload

import numpy as np
import numpy.typing as npt

__version__: str

FloatOrArray = Union[float, npt.NDArray[np.float64]]

class Schedule:
    """A noise schedule; discrete schedules put step n at t = (n + 1)/T."""

    @staticmethod
    def vp_linear(beta_min: float = 0.1, beta_max: float = 20.0) -> "Schedule": ...
    @staticmethod
    def cosine() -> "Schedule": ...
    @staticmethod
    def scaled_linear() -> "Schedule": ...
    @staticmethod
    def ve(sigma_max: float = 80.0) -> "Schedule": ...
    @staticmethod
    def flow(shift: Optional[float] = None, mu: Optional[float] = None, time_shift: Optional[str] = None) -> "Schedule": ...
    def state_scale(self, t: Any) -> Any: ...
    def time_of_level(self, level: Any) -> Any: ...
    @staticmethod
    def discrete(
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        num_train_timesteps: int = 1000,
        trained_betas: Optional[Sequence[float]] = None,
        rescale_betas_zero_snr: bool = False,
    ) -> "Schedule": ...
    @property
    def name(self) -> str: ...
    @property
    def t_end(self) -> float: ...
    @property
    def num_train_timesteps(self) -> Optional[int]: ...
    @overload
    def alpha(self, t: float) -> float: ...
    @overload
    def alpha(self, t: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]: ...
    def sigma(self, t: FloatOrArray) -> FloatOrArray: ...
    def alpha_bar(self, t: FloatOrArray) -> FloatOrArray: ...
    def log_alpha_bar(self, t: FloatOrArray) -> FloatOrArray: ...
    def lambda_(self, t: FloatOrArray) -> FloatOrArray: ...
    def beta(self, t: FloatOrArray) -> FloatOrArray: ...
    def derivatives(self, quantity: str, t: float, order: int) -> List[float]: ...
    def t_of_lambda(self, lam: float) -> float: ...
    def model_time(self, t: FloatOrArray) -> FloatOrArray: ...
    def time_of_model_time(self, n: FloatOrArray) -> FloatOrArray: ...

def continuous_grid(
    schedule: Schedule,
    steps: int,
    grid: str = "uniform",
    t_max: Optional[float] = None,
    t_min: float = 1e-3,
    rho: float = 7.0,
) -> npt.NDArray[np.float64]: ...
def grid_times(
    schedule: Schedule,
    steps: Optional[int] = None,
    *,
    grid: Optional[str] = None,
    rho: Optional[float] = None,
    t_max: Optional[float] = None,
    t_min: Optional[float] = None,
    sigma_max: Optional[float] = None,
    sigma_min: Optional[float] = None,
    spacing: Optional[str] = None,
    steps_offset: Optional[int] = None,
    final_: Optional[str] = None,
    timesteps: Optional[Sequence[float]] = None,
    sigmas: Optional[Sequence[float]] = None,
    times: Optional[Sequence[float]] = None,
) -> npt.NDArray[np.float64]: ...
def discrete_grid(
    schedule: Schedule,
    steps: Optional[int] = None,
    spacing: str = "leading",
    steps_offset: int = 0,
    final_: str = "zero",
    timesteps: Optional[Sequence[int]] = None,
) -> npt.NDArray[np.float64]: ...
def quasi_taylor_coefficients(
    schedule: Schedule,
    t: npt.NDArray[np.float64],
    s: npt.NDArray[np.float64],
    order: int,
    expand: str = "t",
) -> Tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...

class SamplerSpec:
    def __init__(
        self,
        name: str,
        *,
        eta: Optional[float] = None,
        expand: str = "t",
        qt_last: str = "ddim",
        ddpm_variance: str = "beta-tilde",
        rtol: Optional[float] = None,
        atol: Optional[float] = None,
        lower_order_final: bool = False,
        unipc_variant: str = "bh2",
        unipc_corrector: bool = True,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = ...,
        s_noise: float = 1.0,
        denoise_final: bool = False,
    ) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def is_adaptive(self) -> bool: ...
    @property
    def starts_at_pure_noise(self) -> bool: ...
    @property
    def is_stochastic(self) -> bool: ...
    def nfe(self, steps: int, ends_at_zero: bool = False) -> Optional[int]: ...
    def steps_for_budget(self, budget: int, ends_at_zero: bool = False) -> Optional[int]: ...

def catalog() -> List[Tuple[str, str, str]]: ...
def all_sampler_names() -> List[str]: ...
def run(
    schedule: Schedule,
    spec: SamplerSpec,
    times: Sequence[float],
    x: Any,
    ops: Any,
    rows: int,
    prediction_type: str = "epsilon",
    clip: Optional[float] = None,
    threshold: Optional[Tuple[float, float]] = None,
) -> Tuple[Any, float]: ...

class Program:
    def __init__(
        self,
        schedule: Schedule,
        spec: SamplerSpec,
        times: Sequence[float],
        prediction_type: str = "epsilon",
        clip: Optional[float] = None,
        threshold: Optional[Tuple[float, float]] = None,
    ) -> None: ...
    @property
    def call_times(self) -> List[float]: ...
    @property
    def call_model_times(self) -> List[float]: ...
    @property
    def call_steps(self) -> List[int]: ...
    @property
    def nfe(self) -> float: ...
    @property
    def num_ops(self) -> int: ...
    def describe(self) -> str: ...

class Replay:
    def __init__(self, program: Program, x: Any, ops: Any) -> None: ...
    def pending_input(self) -> Optional[Any]: ...
    @property
    def calls_done(self) -> int: ...
    @property
    def finished(self) -> bool: ...
    def feed(self, model_output: Any, sample: Any, ops: Any) -> Any: ...
    def x0(self, model_output: Any, sample: Any, t: float, ops: Any) -> Any: ...

class NoiseStreams:
    def __init__(self, seed: int, count: int, first: int = 0) -> None: ...
    def normal(self, item: Sequence[int]) -> npt.NDArray[np.float64]: ...

class ExactProblem:
    def __init__(self, name: str, schedule: Schedule) -> None: ...
    @property
    def item_shape(self) -> List[int]: ...
    def eps(self, x: npt.NDArray[np.float64], t: Sequence[float]) -> npt.NDArray[np.float64]: ...
    @property
    def prediction_type(self) -> str: ...
    def predict(self, x: npt.NDArray[np.float64], t: Sequence[float]) -> npt.NDArray[np.float64]: ...

def read_grid_file(
    path: str,
    schedule: Schedule,
    sampler: Optional[str] = None,
    nfe: Optional[int] = None,
    model: Optional[str] = None,
    spec: Optional[SamplerSpec] = None,
) -> dict: ...
