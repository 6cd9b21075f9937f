"""The one PeRFlow sampling loop: a plan of steps (model timesteps and where each lies in its segment) and the run.

The diffusers scheduler, the ComfyUI sampler, calibration and the benchmark build a `SamplingPlan`; every step's
coefficients (`solver.StepCoefficients`, theta folded in, and the loop's `solver.Frame` when it samples in another
space) are computed once, before the loop, and `run_plan` applies them (the scheduler, stepped by a pipeline, uses
the same coefficients and step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .segments import Segments, SegmentStep
from .settings import PerflowSettings
from .solver import PERFLOW_FRAME, Frame, StepCoefficients, StepResult, apply_step, finite_sum, nonfinite_output_error, warn_fallback
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
    _in_frames: Dict[Tuple[Frame, ...], list] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def for_steps(cls, settings: PerflowSettings, steps: int, alphas_cumprod: torch.Tensor, name: str = "steps") -> "SamplingPlan":
        """The original's grid for ``steps`` calls (fewer than K are raised to K, see `PerflowSettings.steps_for`)."""
        grid = settings.build_segments().timesteps(settings.steps_for(steps, name), name)
        return cls.for_timesteps(settings, [float(t) for t in grid], alphas_cumprod)

    @classmethod
    def for_timesteps(cls, settings: PerflowSettings, timesteps: Sequence[float], alphas_cumprod: torch.Tensor, end: float = 0.0) -> "SamplingPlan":
        """A plan through given timesteps, ending at ``end`` (0: the clean sample)."""
        segments = settings.build_segments()
        ends = list(timesteps[1:]) + [end]
        levels = _noise_levels(segments, timesteps, alphas_cumprod)
        steps = tuple(segments.step_at(float(t), float(t_next), levels) for t, t_next in zip(timesteps, ends))
        return cls(settings, tuple(float(t) for t in timesteps), steps, alphas_cumprod)

    def __len__(self) -> int:
        return len(self.steps)

    def coefficients(
        self, like: torch.Tensor, theta: Optional[torch.Tensor] = None, frames: Optional[Tuple[Frame, ...]] = None
    ) -> List[Tuple[StepCoefficients, StepCoefficients]]:
        """Every step's coefficients for a run with ``theta`` (default: the settings'), computed once before the loop:
        per step, the pair (as a run's first step, after a previous step). ``like`` gives the device for a theta that
        learns. ``frames``: the loop's frame at every timestep and, last, at the end (only its scale counts); with the
        settings' theta the coefficients in those frames are kept with the plan."""
        if theta is not None:
            coefficients = self._coefficients(theta_rows_like(theta, like))
            return coefficients if frames is None else _in_frames(coefficients, frames)
        if frames is None:
            return self._settings_coefficients
        if frames not in self._in_frames:
            self._in_frames[frames] = _in_frames(self._settings_coefficients, frames)
        return self._in_frames[frames]

    @cached_property
    def _settings_coefficients(self) -> List[Tuple[StepCoefficients, StepCoefficients]]:
        """The coefficients with the settings' theta (fixed numbers): computed at a plan's first run, then reused."""
        return self._coefficients(theta_rows_like(self.settings.theta, self.alphas_cumprod))

    def _coefficients(self, rows: Sequence[Optional[Sequence[float]]]) -> List[Tuple[StepCoefficients, StepCoefficients]]:
        kind = self.settings.prediction_type

        def pair(step: SegmentStep, row: Optional[Sequence[float]]) -> Tuple[StepCoefficients, StepCoefficients]:
            first = StepCoefficients.of(kind, step, row, False)
            return (first, first) if row is None else (first, StepCoefficients.of(kind, step, row, True))

        return [pair(step, rows[step.index]) for step in self.steps]

    def steps_in_segment(self, segment: int) -> List[int]:
        return [i for i, step in enumerate(self.steps) if step.index == segment]


def _in_frames(coefficients: List[Tuple[StepCoefficients, StepCoefficients]], frames: Tuple[Frame, ...]) -> List[Tuple[StepCoefficients, StepCoefficients]]:
    previous = (PERFLOW_FRAME,) + frames
    return [
        tuple(k.in_frame(frame, following.scale, before) for k in pair)
        for pair, frame, following, before in zip(coefficients, frames, frames[1:], previous)
    ]


def _noise_levels(segments: Segments, timesteps: Sequence[float], alphas_cumprod: torch.Tensor) -> Dict[int, float]:
    """The entries of ``alphas_cumprod`` that the steps' segments start and end at, read in one indexing."""
    indices = sorted({i for k in {segments.index_of(float(t)) for t in timesteps} for i in segments.alpha_indices(k)})
    return dict(zip(indices, alphas_cumprod[indices].tolist()))


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
    frames: Optional[Tuple[Frame, ...]] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Run the plan's steps (all, or those at ``indices``) from ``sample``; returns the last sample and model output.

    Nothing in the loop waits on the device: a model output with NaN/Inf raises FloatingPointError after the loop,
    naming the first step where it happened, and a theta correction that overflowed (the step then fell back to
    theta = 0) is reported once, after the loop.

    Args:
        model_fn: ``model_fn(z, timestep) -> raw output``.
        plan: the steps.
        sample: the sample at the first step's timestep.
        theta: the correction to sample with (default: the plan's settings' theta).
        indices: the steps to run, in order (e.g. one segment's, or a progress bar's range).
        previous_output: the model output of the step before the first one run (theta's third column).
        on_step: called after every step with its `StepRecord`.
        frames: the loop's `Frame` at every timestep and at the end (default: PeRFlow's own ``z`` and ``o``); the
            sample, the model function's returns and the result are then in those frames.
    """
    coefficients = plan.coefficients(sample, theta, frames)
    checks = LoopChecks()
    z, previous_sample = sample, None
    for i in range(len(plan)) if indices is None else indices:
        step = coefficients[i][previous_output is not None]
        output = model_fn(z, plan.timesteps[i])
        z_next, fell_back = apply_step(step, output, z, previous_output, previous_sample)
        checks.record(i, output, fell_back)
        if on_step is not None:
            on_step(StepRecord(i, z, output, previous_output, StepResult(z_next, z, output, step)))
        previous_sample, previous_output, z = z, output, z_next
    checks.raise_or_warn(plan)
    return z, previous_output


class LoopChecks:
    """Per-step checks kept on the device while a loop runs, read once after it. `finite_sum` of a model output is
    finite exactly when the output is, and costs a multiplication and a reduction where ``isfinite(...).all()`` costs
    a full boolean tensor."""

    def __init__(self) -> None:
        self.finite: List[Tuple[int, torch.Tensor]] = []
        self.fallbacks: List[Tuple[int, torch.Tensor]] = []

    def record(self, index: int, output: torch.Tensor, fell_back: Optional[torch.Tensor]) -> None:
        if index < 0:
            return
        self.finite.append((index, finite_sum(output)))
        if fell_back is not None:
            self.fallbacks.append((index, fell_back))

    @staticmethod
    def check_now(index: int, output: torch.Tensor, fell_back: Optional[torch.Tensor], step: SegmentStep, timestep: float) -> None:
        """The same checks for a lone step, read at once."""
        if not bool(torch.isfinite(output).all()):
            raise nonfinite_output_error(index, timestep)
        if fell_back is not None and bool(fell_back):
            warn_fallback([(index, timestep, step.index)])

    def raise_or_warn(self, plan: SamplingPlan) -> None:
        if self.finite:
            totals = torch.stack([total for _, total in self.finite]).detach()
            if not math.isfinite(totals.sum()):  # one read: the sum is NaN or Inf when any step's is
                first = self.finite[int((~torch.isfinite(totals)).nonzero()[0])][0]
                raise nonfinite_output_error(first, plan.timesteps[first])
        if self.fallbacks:
            flags = torch.stack([flag for _, flag in self.fallbacks])
            if bool(flags.any()):
                warn_fallback([(i, plan.timesteps[i], plan.steps[i].index) for (i, _), flag in zip(self.fallbacks, flags.tolist()) if flag])
