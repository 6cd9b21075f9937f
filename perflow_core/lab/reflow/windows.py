"""What one training pair of a window is made of: the windows, the noisy start, the straight-line input and
regression target, the clean data, and the teachers that carry a window's start to its end."""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Union

import torch

from ...noise_schedule import alpha_at_timestep, alphas_cumprod_for, sigma_for_alpha
from ...parameterization import canonical_prediction_type, window_start_coefficients
from ...segments import Segments, SegmentStep
from ..analytic import DEFAULT_SMOOTHING, AnalyticDigitsDenoiser, solve_probability_flow_ode

DataSource = Callable[[int, torch.Generator], torch.Tensor]
# teacher(z_start, window) -> z_end: the teacher's ODE solution across one window (unlike calibration's
# Teacher, which maps noise to the targets of every step).
WindowTeacher = Callable[[torch.Tensor, SegmentStep], torch.Tensor]

# The analytic teacher's RK4 grid: 4 steps per unit of log(sigma) land within ~1e-4 RMSE of the exact
# window end in every window of SD1.5 with K = 4, far below what a student can fit.
ANALYTIC_TEACHER_STEPS_PER_LOG_SIGMA = 4.0


def training_windows(segments: Segments, alphas_cumprod: torch.Tensor) -> List[SegmentStep]:
    """Each segment as a `SegmentStep` from its start to its end (``t = t_start``, ``t_next = t_end``)."""
    windows = []
    for k in range(len(segments)):
        i_start, i_end = segments.alpha_indices(k)
        t_s, t_e = segments.starts[k], segments.ends[k]
        alpha_start, alpha_end = float(alphas_cumprod[i_start]), float(alphas_cumprod[i_end])
        windows.append(SegmentStep(k, t_s, t_e, t_s, t_e, alpha_start, alpha_end))
    return windows


def window_indices(segments: Segments, t: torch.Tensor) -> torch.Tensor:
    """The window of each time in ``t`` (a boundary belongs to the later window, as in sampling)."""
    scale = segments.num_train_timesteps
    return torch.tensor([segments.index_of(float(value) * scale) for value in t], dtype=torch.long)


def noise_to_window_start(x0: torch.Tensor, window: SegmentStep, generator: torch.Generator) -> torch.Tensor:
    """The DDPM marginal at the window start: ``sqrt(a_s) x0 + sqrt(1 - a_s) noise``."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return math.sqrt(window.alpha_start) * x0 + math.sqrt(1.0 - window.alpha_start) * noise


def interpolate_in_window(z_start: torch.Tensor, z_end: torch.Tensor, t: torch.Tensor, window: SegmentStep) -> torch.Tensor:
    """The point at time ``t`` on the straight line from ``z_start`` (at t_s) to ``z_end`` (at t_e)."""
    share = ((window.t_start - t) / (window.t_start - window.t_end)).to(z_start.dtype)
    return torch.lerp(z_start, z_end, share.view(-1, *([1] * (z_start.ndim - 1))))


def reflow_target(prediction_type: str, z_start: torch.Tensor, z_end: torch.Tensor, window: SegmentStep) -> torch.Tensor:
    """The raw network output that makes the PeRFlow step land on ``z_end`` from anywhere in the window.

    ``velocity``: the straight-line slope ``(z_e - z_s) / (t_e - t_s)``. ``diff_eps`` / ``ddim_eps``: the
    ``o`` with ``z_e = lambda_s z_s + eta_s o`` at the window start; the in-window coefficients
    (``window_end_coefficients``) are built so that the same ``o`` predicts ``z_e`` from every point of the line.
    """
    prediction_type = canonical_prediction_type(prediction_type)
    if prediction_type == "velocity":
        return (z_end - z_start) / (window.t_end - window.t_start)
    lam, eta = window_start_coefficients(prediction_type, window.alpha_start, window.alpha_end)
    return (z_end - lam * z_start) / eta


def smoothed_digits_source(smoothing: float = DEFAULT_SMOOTHING) -> DataSource:
    """Clean samples of the analytic model's distribution: a random digit in [-1, 1] plus ``smoothing`` noise."""
    means = AnalyticDigitsDenoiser(smoothing=smoothing).data_means.to(torch.float32)

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        picks = torch.randint(0, means.shape[0], (batch_size,), generator=generator)
        return means[picks] + smoothing * torch.randn((batch_size, *means.shape[1:]), generator=generator)

    return draw


class DDIMTeacher:
    """A frozen eps model followed with N deterministic DDIM steps from a window's start to its end.

    The steps are uniform in model timestep between ``t_s * T`` and ``t_e * T``; a model timestep ``tau`` has
    the signal level ``alpha_at_timestep(alphas_cumprod, tau)`` (``alphas_cumprod[tau - 1]``, interpolated),
    so the first and last levels are exactly the window's ``alpha_start`` and ``alpha_end``.

    Args:
        eps_model: called as ``eps_model(x, timestep)`` with a float timestep tensor ``[B]``; returns eps as a
            tensor or an object with ``.sample``.
        alphas_cumprod: the schedule (SD1.5's by default).
        steps: DDIM steps per window (the original uses 8-10).
    """

    def __init__(self, eps_model: Callable, alphas_cumprod: Optional[torch.Tensor] = None, steps: int = 8):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.eps_model = eps_model
        self.alphas_cumprod = alphas_cumprod_for() if alphas_cumprod is None else alphas_cumprod
        self.steps = int(steps)

    @torch.no_grad()
    def __call__(self, z_start: torch.Tensor, window: SegmentStep) -> torch.Tensor:
        scale = len(self.alphas_cumprod)
        taus = torch.linspace(window.t_start * scale, window.t_end * scale, self.steps + 1, dtype=torch.float64)
        x = z_start
        for tau, tau_next in zip(taus[:-1], taus[1:]):
            eps = _raw_output(self.eps_model(x, tau.to(x.dtype).expand(x.shape[0])))
            x = ddim_step(x, eps.to(x.dtype), self._alpha(tau), self._alpha(tau_next))
        return x

    def _alpha(self, tau: torch.Tensor) -> float:
        return float(alpha_at_timestep(self.alphas_cumprod, tau))


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha: float, alpha_next: float) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12): keep eps, move x0's estimate to the next level."""
    x0 = (x - math.sqrt(1.0 - alpha) * eps) / math.sqrt(alpha)
    return math.sqrt(alpha_next) * x0 + math.sqrt(1.0 - alpha_next) * eps


class AnalyticODETeacher:
    """The exact probability-flow ODE of an `AnalyticDigitsDenoiser` over a window (``solve_probability_flow_ode``).

    Args:
        denoiser: the analytic model.
        steps_per_log_sigma: RK4 steps per unit of ``log(sigma)``; None uses the solver's ~1e-6 default grid.
            The default 4 is within ~1e-4 RMSE of it on SD1.5's windows and about 5x cheaper.
    """

    def __init__(
        self, denoiser: AnalyticDigitsDenoiser, steps_per_log_sigma: Optional[float] = ANALYTIC_TEACHER_STEPS_PER_LOG_SIGMA
    ):
        self.denoiser = denoiser
        self.steps_per_log_sigma = steps_per_log_sigma

    @torch.no_grad()
    def __call__(self, z_start: torch.Tensor, window: SegmentStep) -> torch.Tensor:
        z_end = solve_probability_flow_ode(
            self.denoiser, z_start, window.alpha_start, window.alpha_end, steps=self._steps(window)
        )
        return z_end.to(z_start.dtype)

    def _steps(self, window: SegmentStep) -> Optional[int]:
        if self.steps_per_log_sigma is None:
            return None
        span = abs(math.log(sigma_for_alpha(window.alpha_start) / sigma_for_alpha(window.alpha_end)))
        return max(1, math.ceil(self.steps_per_log_sigma * span))


def _raw_output(output: Union[torch.Tensor, object]) -> torch.Tensor:
    return output if torch.is_tensor(output) else output.sample
