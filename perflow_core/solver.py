"""The PeRFlow step: Euler on the piecewise linear path, plus the theta correction (see ``theta.py``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from .parameterization import clean_estimate, time_to_window_end, velocity_and_window_end
from .segments import SegmentStep

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one PeRFlow step produces.

    Args:
        prev_sample: the sample at ``t_next``.
        velocity: the velocity of the straight path (before theta).
        window_end: the predicted end of the current segment (the paper's window end z_e).
        sample, step: the step's input and the `SegmentStep`, from which `pred_original_sample` is computed on demand.
    """

    prev_sample: torch.Tensor
    velocity: torch.Tensor
    window_end: torch.Tensor
    sample: torch.Tensor
    step: SegmentStep

    @property
    def pred_original_sample(self) -> torch.Tensor:
        """An x0 estimate for previews (see ``clean_estimate``); only samplers that show it pay for it."""
        return clean_estimate(self.sample, self.velocity, self.step)


def theta_features(
    prediction_type: str,
    sample: torch.Tensor,
    velocity: torch.Tensor,
    window_end: torch.Tensor,
    previous_output: Optional[torch.Tensor],
    step: SegmentStep,
) -> list[torch.Tensor]:
    """The three terms that theta's columns weight; the step is ``x + dt*v + sum_j theta_j * f_j``.

    The third is the change in the model output since the previous step, mapped through this step's
    parameterisation: ``dt * (v(o) - v(o_prev))`` at the current sample (zero at the first step).
    """
    dt = step.t_next - step.t
    share_of_segment = dt / time_to_window_end(step)
    if previous_output is None:
        output_change = torch.zeros_like(velocity)
    else:
        output_change = dt * (velocity - velocity_and_window_end(prediction_type, previous_output, sample, step)[0])
    return [dt * velocity, share_of_segment * window_end, output_change]


def theta_is_zero(theta_row: Optional[torch.Tensor]) -> bool:
    return theta_row is None or (not theta_row.requires_grad and not bool(theta_row.any()))


def perflow_step(
    prediction_type: str,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    step: SegmentStep,
    theta_row: Optional[torch.Tensor] = None,
    previous_output: Optional[torch.Tensor] = None,
    step_index: Optional[int] = None,
    timestep: Optional[float] = None,
) -> StepResult:
    """One step from ``step.t`` to ``step.t_next``.

    Args:
        prediction_type: ``diff_eps``, ``ddim_eps`` or ``velocity`` (already canonical).
        model_output: the raw network output at (sample, t_c * T).
        sample: the current sample z at t_c.
        step: the step and its segment (``Segments.step_at``).
        theta_row: this segment's theta row ``[3]``; ``None`` or zeros give the original step.
        previous_output: the raw model output of the previous step, for theta's third column.
        step_index, timestep: only used in error messages.
    """
    if not bool(torch.isfinite(model_output).all()):
        raise FloatingPointError(
            f"the model output contains NaN or Inf at step {step_index} (timestep {timestep}); "
            "check the model, its dtype (fp16 overflow) and the input latents"
        )
    velocity, window_end = velocity_and_window_end(prediction_type, model_output, sample, step)
    dt = step.t_next - step.t
    base = sample + dt * velocity
    prev_sample = base
    if not theta_is_zero(theta_row):
        features = theta_features(prediction_type, sample, velocity, window_end, previous_output, step)
        correction = sum(theta_row[j].to(sample.dtype) * f for j, f in enumerate(features))
        prev_sample = base + correction
        if not bool(torch.isfinite(prev_sample).all()) and bool(torch.isfinite(base).all()):
            logger.warning(
                "theta correction gave NaN/Inf at step %s (timestep %s, segment %d); using the theta = 0 step",
                step_index,
                timestep,
                step.index,
            )
            prev_sample = base
    return StepResult(prev_sample, velocity, window_end, sample, step)
