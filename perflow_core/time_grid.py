"""Learn the time grid with theta: one window per step, its boundaries chosen on a fine teacher grid.

The teacher solves the model's probability-flow ODE once per seed set on a fine grid of integer timesteps
(the calibrated step grid, each step cut into ``multiplier``), keeping its state and the model output at every
grid point. A one-step window from grid point i to grid point j, started from the teacher's state ``z_i``, needs
no further network call: with theta's first two columns its end is any ``a z_i + b o_i`` (``theta.py``: the
window-end prediction ``lambda z + eta o`` scaled by ``1 + theta_0 + theta_1`` minus ``theta_0 z``). The local
error of the best such step (least squares over the fit seeds) comes from Gram matrices of the cached states and
outputs, and dynamic programming picks the boundaries that minimise the sum of the local RMSEs (the triangle
inequality's bound on the final error when errors are carried with gain about 1). Deterministic, no gradients.

Only ``ddim_eps`` models can have their grid learned: their output is the usual epsilon whatever the windows;
``diff_eps`` and ``velocity`` models predict for the windows they were trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

import torch

from .sampling import ModelFn, SamplingPlan
from .noise_schedule import alpha_at_timestep
from .segments import SegmentStep
from .settings import PerflowSettings

# "perflow": first order (DDIM, which is PeRFlow ddim_eps with one window per teacher step);
# "dpmpp_2m": DPM-Solver++(2M) on the same grid (Lu et al. 2022), second order at the same calls.
GRID_SOLVERS = ("perflow", "dpmpp_2m")


@dataclass
class GridPath:
    """The teacher's states at every fine grid timestep (``states[i]`` at ``timesteps[i]``, the last at 0) and the
    model outputs it saw there (``outputs[i]`` at ``states[i]``, none at the last point)."""

    timesteps: List[float]
    states: List[torch.Tensor]
    outputs: List[torch.Tensor]

    def state_at(self, timestep: float) -> torch.Tensor:
        return self.states[self.timesteps.index(float(timestep))]

    def part(self, samples: slice) -> "GridPath":
        """The same path for some of the samples."""
        return GridPath(self.timesteps, [s[samples] for s in self.states], [o[samples] for o in self.outputs])


def check_grid_fit(settings: PerflowSettings, solver: str, name: str = "fit_boundaries") -> None:
    """Whether the grid of a model with these settings can be learned; errors name the option as ``name``."""
    if settings.t_clean:
        raise ValueError(f"{name} needs t_clean 0 (the learned grid ends at timestep 0); got t_clean={settings.t_clean}")
    if settings.prediction_type != "ddim_eps":
        raise ValueError(
            f"{name} needs prediction_type ddim_eps (a model whose output is the usual epsilon); got "
            f"{settings.prediction_type}: diff_eps and velocity models predict for the windows they were trained on, which stay fixed"
        )
    check_solver(solver, settings)


def check_solver(solver: str, settings: PerflowSettings) -> None:
    if solver not in GRID_SOLVERS:
        raise ValueError(f"teacher_solver must be one of {', '.join(GRID_SOLVERS)}; got {solver!r}")
    if solver != "perflow" and settings.prediction_type != "ddim_eps":
        raise ValueError(f"teacher_solver {solver} needs prediction_type ddim_eps (epsilon outputs); got {settings.prediction_type}")


def fine_grid(plan: SamplingPlan, multiplier: int) -> List[float]:
    """The plan's timesteps with each step cut into ``multiplier`` integer steps, ending at 0."""
    return [t for part in fine_steps(plan, multiplier) for t in part] + [0.0]


def fine_steps(plan: SamplingPlan, multiplier: int) -> List[List[float]]:
    """Each plan step cut into ``multiplier`` integer steps: per step, the fine timesteps it starts (see `subdivide`)."""
    if multiplier < 1:
        raise ValueError(f"teacher multiplier must be >= 1; got {multiplier}")
    ends = list(plan.timesteps[1:]) + [0.0]
    return [subdivide(start, end, multiplier) for start, end in zip(plan.timesteps, ends)]


def subdivide(start: float, end: float, parts: int) -> List[float]:
    """``parts`` integer timesteps from ``start`` towards ``end`` (fewer where rounding meets), ``end`` excluded."""
    points = sorted({round(start + (end - start) * j / parts) for j in range(parts)} | {start}, reverse=True)
    return [float(p) for p in points if p > end]


@torch.no_grad()
def solve_on_grid(model_fn: ModelFn, timesteps: Sequence[float], alphas_cumprod: torch.Tensor, noise: torch.Tensor, solver: str = "perflow") -> GridPath:
    """The epsilon model's ODE from ``noise`` at ``timesteps[0]`` through every grid timestep (DDIM or DPM-Solver++ 2M)."""
    levels = [alpha_at_timestep(alphas_cumprod, t) for t in timesteps]
    z, states, outputs, previous_x0 = noise, [noise], [], None
    for i in range(len(timesteps) - 1):
        output = model_fn(z, timesteps[i])
        outputs.append(output)
        alpha, sigma = math.sqrt(levels[i]), math.sqrt(1 - levels[i])
        alpha_next, sigma_next = math.sqrt(levels[i + 1]), math.sqrt(1 - levels[i + 1])
        x0 = (z - sigma * output) / alpha
        h = _log_snr(levels[i + 1]) - _log_snr(levels[i])
        estimate = x0
        if solver == "dpmpp_2m" and previous_x0 is not None:
            ratio = (_log_snr(levels[i]) - _log_snr(levels[i - 1])) / h
            estimate = (1 + 1 / (2 * ratio)) * x0 - (1 / (2 * ratio)) * previous_x0
        z = (sigma_next / sigma) * z - alpha_next * math.expm1(-h) * estimate
        states.append(z)
        previous_x0 = x0
    return GridPath([float(t) for t in timesteps], states, outputs)


def _log_snr(level: float) -> float:
    return 0.5 * math.log(level / (1 - level))


def grid_targets(path: GridPath, plan: SamplingPlan) -> List[torch.Tensor]:
    """Targets for `calibration.fit_theta` from a grid path, one per plan step: the state at a window's end, and
    inside a window the point on the straight line between the states at its ends (the path PeRFlow follows)."""
    return [_line_point(path, step, plan.settings.num_train_timesteps) for step in plan.steps]


def _line_point(path: GridPath, step: SegmentStep, scale: int) -> torch.Tensor:
    return line_point(path.state_at(round(step.t_start * scale)), path.state_at(round(step.t_end * scale)), step)


def line_point(start: torch.Tensor, end: torch.Tensor, step: SegmentStep) -> torch.Tensor:
    """The point at ``step.t_next`` on the straight line between the states at the window's start and end."""
    return torch.lerp(start, end, (step.t_start - step.t_next) / (step.t_start - step.t_end))


def local_errors(path: GridPath) -> torch.Tensor:
    """``[M, M]`` RMSE of the best one-step window ``a z_i + b o_i`` against ``z_j`` (inf where j <= i)."""
    states = torch.stack([s.double().flatten() for s in path.states])
    outputs = torch.stack([o.double().flatten() for o in path.outputs])
    count, size = len(path.states), states.shape[1]
    zz, oz = states @ states.T, outputs @ states.T
    oo = (outputs * outputs).sum(1)
    errors = torch.full((count, count), math.inf, dtype=torch.float64)
    for i in range(count - 1):
        gram = torch.tensor([[zz[i, i], oz[i, i]], [oz[i, i], oo[i]]], dtype=torch.float64)
        gram += 1e-12 * float(gram.diagonal().max()) * torch.eye(2, dtype=torch.float64)
        rhs = torch.stack([zz[i, i + 1 :], oz[i, i + 1 :]])  # [2, later points]
        explained = (rhs * torch.linalg.solve(gram, rhs)).sum(0)
        errors[i, i + 1 :] = ((zz.diagonal()[i + 1 :] - explained).clamp_min(0) / size).sqrt()
    return errors


def best_boundaries(errors: torch.Tensor, timesteps: Sequence[float], windows: int) -> List[float]:
    """The ``windows + 1`` grid timesteps from the first to the last that minimise the summed local errors."""
    count = len(timesteps)
    if not 1 <= windows <= count - 1:
        raise ValueError(f"{windows} windows do not fit on a teacher grid of {count - 1} steps; raise the teacher multiplier")
    cost = torch.full((count,), math.inf, dtype=torch.float64)
    cost[0] = 0.0
    choices = []
    for _ in range(windows):
        total = cost[:, None] + errors  # [from, to]
        cost, came_from = total.min(0)
        choices.append(came_from)
    route = [count - 1]
    for came_from in reversed(choices):
        route.append(int(came_from[route[-1]]))
    return [float(timesteps[i]) for i in reversed(route)]


def learned_settings(settings: PerflowSettings, boundaries: Sequence[float]) -> PerflowSettings:
    """The settings with one window per learned step (theta reset, fitted next)."""
    return settings.replace(segment_boundaries=list(boundaries), theta=None)

