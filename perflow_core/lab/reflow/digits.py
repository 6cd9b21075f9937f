"""The analytic digits model's student: its default architecture, its training against the exact ODE, and its
error (and the teacher's own PeRFlow error) against the exact solution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ...calibration import rmse
from ...scheduler import PerflowScheduler
from ...settings import PerflowSettings
from ..analytic import DEFAULT_SMOOTHING, AnalyticDigitsDenoiser, noise_for_seeds, solve_probability_flow_ode
from ..pipeline import run_pipeline
from .student import ReflowStudent, farthest_point_selection
from .trainer import PiecewiseReflowTrainer, ReflowConfig, ReflowHistory
from .windows import AnalyticODETeacher, smoothed_digits_source

# The noise seeds (`noise_for_seeds`) students are judged on: none of theta's fit seeds (0-127) or the benchmark's
# (10000-10255), and far from anything the trainer's generator draws.
VALIDATION_SEEDS = tuple(range(20_000, 20_256))
# The prototype memory starts at a farthest-point selection from this many data samples per prototype.
PROTOTYPE_CANDIDATES_PER_PROTOTYPE = 8


def perflow_pipeline_samples(
    model: nn.Module, settings: PerflowSettings, noise: torch.Tensor, num_inference_steps: int = 4
) -> torch.Tensor:
    """Samples of ``model`` from ``noise`` through ``PerflowScheduler(settings)`` in the pipeline (float32, data
    space, at ``alphas_cumprod[0]``)."""
    return run_pipeline(model, PerflowScheduler(**settings.to_config()), noise, num_inference_steps)


def exact_ode_samples(denoiser: AnalyticDigitsDenoiser, noise: torch.Tensor) -> torch.Tensor:
    """The exact probability-flow ODE solution from ``alphas_cumprod[-1]`` to ``alphas_cumprod[0]`` (float64)."""
    alphas = denoiser.alphas_cumprod
    return solve_probability_flow_ode(denoiser, noise.double(), float(alphas[-1]), float(alphas[0]))


@dataclass
class DigitsStudentReport:
    """4-step (and 8-step) RMSE of a student and of the teacher's own PeRFlow sampling against the exact ODE.

    Args:
        seeds: the noise seeds (`noise_for_seeds`; by default `VALIDATION_SEEDS`).
        student: ``{steps: RMSE}`` of the student's PeRFlow samples.
        teacher: ``{steps: RMSE}`` of PeRFlow (``ddim_eps``) applied to the analytic teacher itself.
    """

    seeds: List[int]
    student: Dict[int, float]
    teacher: Dict[int, float]


def default_digits_student(
    num_prototypes: int = 2048, num_memory_stages: int = 2, num_train_timesteps: int = 1000
) -> ReflowStudent:
    """The shipped student's architecture: width 256, 2 residual blocks, a prototype memory read with 4 heads
    per stage (about 0.9M parameters with the defaults)."""
    return ReflowStudent(
        hidden_size=256,
        num_blocks=2,
        num_prototypes=num_prototypes,
        num_prototype_heads=4,
        num_memory_stages=num_memory_stages,
        num_train_timesteps=num_train_timesteps,
    )


def train_digits_student(
    config: ReflowConfig,
    smoothing: float = DEFAULT_SMOOTHING,
    student: Optional[ReflowStudent] = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
    initialise_prototypes: bool = True,
) -> Tuple[ReflowStudent, ReflowHistory]:
    """Piecewise reflow of the analytic digits model (exact ODE teacher) into a student.

    A student built here (``student=None``: `default_digits_student`) is initialised from
    ``torch.manual_seed(config.seed)``; the prototypes of any student with a memory start at a
    `farthest_point_selection` of data drawn with seed ``config.seed + 1`` unless ``initialise_prototypes`` is
    False (to go on training a trained student). The run is then a function of
    ``config`` and the initial weights (on a fixed CPU thread count).

    Returns:
        ``(student, history)``.
    """
    if student is None:
        torch.manual_seed(config.seed)
        student = default_digits_student(num_train_timesteps=config.num_train_timesteps)
    data_source = smoothed_digits_source(smoothing)
    if initialise_prototypes and getattr(student, "memory", None) is not None:
        count = student.memory.prototypes.shape[0]
        candidates = data_source(PROTOTYPE_CANDIDATES_PER_PROTOTYPE * count, torch.Generator().manual_seed(config.seed + 1))
        student.initialise_prototypes(farthest_point_selection(candidates, count))
    teacher = AnalyticODETeacher(AnalyticDigitsDenoiser(smoothing=smoothing))
    history = PiecewiseReflowTrainer(config).train(student, data_source, teacher, log_every=log_every, log=log)
    return student, history


@torch.no_grad()
def evaluate_digits_student(
    student: nn.Module,
    settings: PerflowSettings,
    smoothing: float = DEFAULT_SMOOTHING,
    seeds: Sequence[int] = VALIDATION_SEEDS,
    steps: Sequence[int] = (4, 8),
) -> DigitsStudentReport:
    """RMSE against the exact probability-flow ODE solution of the analytic teacher (same noise, same end level)."""
    teacher = AnalyticDigitsDenoiser(smoothing=smoothing)
    noise = noise_for_seeds(seeds)
    exact = exact_ode_samples(teacher, noise)
    teacher_settings = PerflowSettings(segments=settings.segments, prediction_type="ddim_eps")
    return DigitsStudentReport(
        seeds=list(seeds),
        student={n: rmse(perflow_pipeline_samples(student, settings, noise, n), exact) for n in steps},
        teacher={n: rmse(perflow_pipeline_samples(teacher, teacher_settings, noise, n), exact) for n in steps},
    )
