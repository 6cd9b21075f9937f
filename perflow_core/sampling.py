"""The one PeRFlow sampling loop: a plan of steps (model timesteps and where each lies in its segment) and the run.

The diffusers scheduler, the ComfyUI sampler, calibration and the benchmark build a `SamplingPlan` and step
with `perflow_step` through `run_plan` (the scheduler, stepped by a pipeline, uses the plan's steps and theta
rows and the same step). theta's rows are prepared once per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch

from .segments import SegmentStep
from .settings import PerflowSettings
from .solver import StepResult, perflow_step
from .theta import theta_rows_like

# model_fn(z, timestep) -> the raw network output at PeRFlow's (z, timestep).
ModelFn = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class SamplingPlan:
    """The steps of one sampling run.

    Args:
        settings: segments, parameterisation and theta.
        timesteps: the model timesteps of the calls, strictly decreasing.
        steps: step i, from ``timesteps[i]`` to ``timesteps[i + 1]`` (``end`` after the last), in its segment.
        alphas_cumprod: the model's training noise levels the steps were placed with.
    """

    settings: PerflowSettings
    timesteps: Tuple[float, ...]
    steps: Tuple[SegmentStep, ...]
    alphas_cumprod: torch.Tensor = field(compare=False, repr=False)

    @classmethod
    def for_steps(cls, settings: PerflowSettings, steps: int, alphas_cumprod: torch.Tensor, name: str = "steps") -> "SamplingPlan":
        """The original's grid for ``steps`` calls (fewer than K are raised to K, see `PerflowSettings.steps_for`)."""
        grid = settings.build_segments().timesteps(settings.steps_for(steps, name))
        return cls.for_timesteps(settings, [float(t) for t in grid], alphas_cumprod)

    @classmethod
    def for_timesteps(cls, settings: PerflowSettings, timesteps: Sequence[float], alphas_cumprod: torch.Tensor, end: float = 0.0) -> "SamplingPlan":
        """A plan through given timesteps, ending at ``end`` (0: the clean sample)."""
        segments = settings.build_segments()
        ends = list(timesteps[1:]) + [end]
        steps = tuple(segments.step_at(float(t), float(t_next), alphas_cumprod) for t, t_next in zip(timesteps, ends))
        return cls(settings, tuple(float(t) for t in timesteps), steps, alphas_cumprod)

    def __len__(self) -> int:
        return len(self.steps)

    def theta_rows(self, like: torch.Tensor, theta: Optional[torch.Tensor] = None) -> List[Optional[torch.Tensor]]:
        """theta's rows on ``like``'s device and dtype (the settings' theta unless given), None where zero."""
        return theta_rows_like(self.settings.theta if theta is None else theta, like)

    def steps_in_segment(self, segment: int) -> List[int]:
        return [i for i, step in enumerate(self.steps) if step.index == segment]


@dataclass(frozen=True)
class StepRecord:
    """One step as the loop saw it: its index, input sample, model output, the previous output and the result."""

    index: int
    sample: torch.Tensor
    output: torch.Tensor
    previous_output: Optional[torch.Tensor]
    result: StepResult


def run_plan(
    model_fn: ModelFn,
    plan: SamplingPlan,
    sample: torch.Tensor,
    theta: Optional[torch.Tensor] = None,
    indices: Optional[Iterable[int]] = None,
    previous_output: Optional[torch.Tensor] = None,
    on_step: Optional[Callable[[StepRecord], None]] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the plan's steps (all, or those at ``indices``) from ``sample``; returns the last sample and model output.

    Args:
        model_fn: ``model_fn(z, timestep) -> raw output``.
        plan: the steps.
        sample: the sample at the first step's timestep.
        theta: the correction to sample with (default: the plan's settings' theta).
        indices: the steps to run, in order (e.g. one segment's, or a progress bar's range).
        previous_output: the model output of the step before the first one run (theta's third column).
        on_step: called after every step with its `StepRecord`.
    """
    rows = plan.theta_rows(sample, theta)
    z = sample
    for i in range(len(plan)) if indices is None else indices:
        step, timestep = plan.steps[i], plan.timesteps[i]
        output = model_fn(z, timestep)
        result = perflow_step(plan.settings.prediction_type, output, z, step, rows[step.index], previous_output, i, timestep)
        if on_step is not None:
            on_step(StepRecord(i, z, output, previous_output, result))
        previous_output, z = output, result.prev_sample
    return z, previous_output
