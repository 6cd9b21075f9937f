"""The PeRFlow step: Euler on the piecewise linear path, plus the theta correction (see ``theta.py``).

Every quantity of a step is linear in the current sample ``z``, the raw model output ``o`` and the previous
output ``o_prev``: the velocity ``v = vz z + vo o``, the predicted segment end (the paper's window end)
``z_e = ez z + eo o``, the next sample ``a z + b o + c o_prev`` and the preview's x0 estimate ``p z + q o``.
`StepCoefficients` holds those scalars, computed once per step of a plan (before the sampling loop), so a step
costs a few fused elementwise operations and no host synchronisation.

A loop may also run in another `Frame`: a state ``s = scale * z`` and a model function whose return ``y`` gives
``o = state_weight * s + y_weight * y`` (ComfyUI's sampler: its own latent ``x`` and the denoised x0). The
coefficients are then rewritten for ``(s, y)`` (`StepCoefficients.in_frame`), so the conversions cost no operation
in the loop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .parameterization import time_to_window_end, window_end_coefficients
from .segments import SegmentStep

logger = logging.getLogger(__name__)

Scalar = Union[float, torch.Tensor]  # a 0-d tensor when theta learns (its graph runs through the coefficients)


class Frame(NamedTuple):
    """A loop's state and model function at one timestep, relative to PeRFlow's ``z`` and raw output ``o``: the state is
    ``scale * z`` and the model function's return ``y`` gives ``o = state_weight * state + y_weight * y``."""

    scale: float = 1.0
    state_weight: float = 0.0
    y_weight: float = 1.0

    def raw_output(self, state: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.state_weight == 0.0:
            return y if self.y_weight == 1.0 else y * self.y_weight
        # (x - d) / sigma as a difference first: x and d nearly cancel at small sigma, and their difference is exact.
        return torch.add(state, y, alpha=self.y_weight / self.state_weight).mul_(self.state_weight)


PERFLOW_FRAME = Frame()  # the state is z, the model function returns o


@dataclass(frozen=True)
class StepCoefficients:
    """The scalars of one step (see the module docstring); ``c`` weighs the previous output (0 at a first step),
    ``c_sample`` the previous step's state (only in a frame whose output reads the state); ``a0``, ``b0`` give the
    step without theta."""

    step: SegmentStep
    vz: float
    vo: float
    ez: float
    eo: float
    a: Scalar
    b: Scalar
    c: Scalar
    p: float
    q: float
    corrected: bool  # theta changes this step
    a0: float
    b0: float
    c_sample: float = 0.0

    @classmethod
    def of(cls, prediction_type: str, step: SegmentStep, theta_row: Optional[Union[Sequence[float], torch.Tensor]] = None, has_previous: bool = False) -> "StepCoefficients":
        remaining = time_to_window_end(step)
        if prediction_type == "velocity":
            ez, eo = 1.0, remaining
        else:
            ez, eo = window_end_coefficients(prediction_type, step)
        vz, vo = (ez - 1.0) / remaining, eo / remaining
        dt = step.t_next - step.t
        a, b, c = 1.0 + dt * vz, dt * vo, 0.0
        corrected = theta_row is not None
        if isinstance(theta_row, torch.Tensor) and not theta_row.requires_grad:
            theta_row = theta_row.tolist()  # plain numbers: the step then needs no tensor arithmetic on theta
        if corrected:
            # x_next = z + dt v + theta_0 dt v + theta_1 (dt / remaining) z_e + theta_2 dt (v(o) - v(o_prev))
            gain, end_scale, change = (theta_row[j] for j in range(3))
            share = dt / remaining
            change = change if has_previous else 0.0 * change
            a = a + gain * dt * vz + end_scale * share * ez
            b = b + gain * dt * vo + end_scale * share * eo + change * dt * vo
            c = -change * dt * vo
        p, q = _preview_coefficients(step, vz, vo)
        return cls(step, vz, vo, ez, eo, a, b, c, p, q, corrected, 1.0 + dt * vz, dt * vo)

    def in_frame(self, frame: Frame, next_scale: float, previous: Frame) -> "StepCoefficients":
        """The same step for a loop in ``frame`` (its next state scaled by ``next_scale``; ``previous``: the previous
        step's frame, for theta's third column). Every ``alpha z + beta o`` becomes ``(alpha / scale + beta
        state_weight) s + beta y_weight y``."""
        if frame == PERFLOW_FRAME and previous == PERFLOW_FRAME and next_scale == 1.0:
            return self
        if isinstance(self.a, torch.Tensor):
            raise ValueError("a theta that learns samples in PeRFlow's own frame")

        def on_state(alpha: float, beta: float, scale: float = 1.0) -> Tuple[float, float]:
            return scale * (alpha / frame.scale + beta * frame.state_weight), scale * beta * frame.y_weight

        vz, vo = on_state(self.vz, self.vo)
        ez, eo = on_state(self.ez, self.eo)
        p, q = on_state(self.p, self.q)
        a, b = on_state(self.a, self.b, next_scale)
        a0, b0 = on_state(self.a0, self.b0, next_scale)
        c_sample, c = next_scale * self.c * previous.state_weight, next_scale * self.c * previous.y_weight
        return StepCoefficients(self.step, vz, vo, ez, eo, a, b, c, p, q, self.corrected, a0, b0, c_sample)

    def next_sample(
        self, sample: torch.Tensor, output: torch.Tensor, previous_output: Optional[torch.Tensor], previous_sample: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``a z + b o (+ c o_prev + c_sample z_prev)`` in fused operations."""
        if isinstance(self.a, torch.Tensor):  # learning theta: keep the graph
            result = self.a.to(sample) * sample + self.b.to(sample) * output
            return result if previous_output is None else result + self.c.to(sample) * previous_output
        result = _combine(sample, self.a, output, self.b)
        if previous_output is None or self.c == 0.0:
            return result
        result.add_(previous_output, alpha=self.c)
        return result if self.c_sample == 0.0 else result.add_(previous_sample, alpha=self.c_sample)

    def original_step(self, sample: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The step without theta, ``z + dt v``."""
        return _combine(sample, self.a0, output, self.b0)


def _combine(sample: torch.Tensor, a: float, output: torch.Tensor, b: float) -> torch.Tensor:
    """``a z + b o``; as ``z + (a - 1) z + b o``, which keeps z's own bits where a is close to 1 (a small step)."""
    return torch.add(sample, output, alpha=b) if a == 1.0 else torch.add(sample, sample, alpha=a - 1.0).add_(output, alpha=b)


def _preview_coefficients(step: SegmentStep, vz: float, vo: float) -> tuple[float, float]:
    """``(p, q)`` of the x0 estimate on the DDIM trajectory through the segment's predicted ends.

    The straight line gives the segment's start and end, ``z_s`` and ``z_e``. Taking both on one deterministic
    DDIM trajectory (Song et al. 2021, eq. 12: ``z = sqrt(a) x0 + sqrt(1-a) eps`` with the same x0 and eps)
    leaves two equations in x0 and eps; solved for x0 it is linear in ``z`` and ``o``.
    """
    a_s, a_e = step.alpha_start, step.alpha_end
    noise_s, noise_e = math.sqrt(1 - a_s), math.sqrt(1 - a_e)
    determinant = max(math.sqrt(a_e) * noise_s - math.sqrt(a_s) * noise_e, 1e-12)
    to_start, to_end = step.t_start - step.t, step.t_end - step.t
    p = (noise_s * (1 + to_end * vz) - noise_e * (1 + to_start * vz)) / determinant
    q = (noise_s * to_end * vo - noise_e * to_start * vo) / determinant
    return p, q


@dataclass
class StepResult:
    """What one PeRFlow step produces: ``prev_sample``; the velocity (before theta), the predicted segment end and
    the preview's x0 estimate are computed from the step's inputs only when read."""

    prev_sample: torch.Tensor
    sample: torch.Tensor
    output: torch.Tensor
    coefficients: StepCoefficients

    @property
    def step(self) -> SegmentStep:
        return self.coefficients.step

    @property
    def velocity(self) -> torch.Tensor:
        k = self.coefficients
        return torch.add(self.sample * k.vz, self.output, alpha=k.vo)

    @property
    def window_end(self) -> torch.Tensor:
        k = self.coefficients
        return torch.add(self.sample * k.ez, self.output, alpha=k.eo)

    @property
    def pred_original_sample(self) -> torch.Tensor:
        """An x0 estimate for previews; only samplers that show it pay for it (two operations)."""
        k = self.coefficients
        return torch.add(self.sample * k.p, self.output, alpha=k.q)


def velocity_and_window_end(
    prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, step: SegmentStep
) -> tuple[torch.Tensor, torch.Tensor]:
    """The velocity of the straight path and the segment end it predicts, from the step's coefficients."""
    k = StepCoefficients.of(prediction_type, step)
    return torch.add(sample * k.vz, model_output, alpha=k.vo), torch.add(sample * k.ez, model_output, alpha=k.eo)


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
    parameterisation: ``dt * (v(o) - v(o_prev)) = dt vo (o - o_prev)`` (zero at the first step).
    """
    dt = step.t_next - step.t
    share_of_segment = dt / time_to_window_end(step)
    if previous_output is None:
        output_change = torch.zeros_like(velocity)
    else:
        k = StepCoefficients.of(prediction_type, step)
        output_change = dt * (velocity - torch.add(sample * k.vz, previous_output, alpha=k.vo))
    return [dt * velocity, share_of_segment * window_end, output_change]


_ZERO = torch.zeros(())  # a CPU scalar: multiplies a tensor on any device, of any floating dtype, without a copy


def finite_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor that is finite exactly when ``tensor`` is (no host sync): the sum of ``0 * tensor``, whose entries
    are 0 where finite and NaN at NaN or Inf, so no sum of finite values can overflow it."""
    return torch.mul(tensor, _ZERO).sum()


def apply_step(
    coefficients: StepCoefficients,
    output: torch.Tensor,
    sample: torch.Tensor,
    previous_output: Optional[torch.Tensor],
    previous_sample: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The next sample and, when theta changes the step, a 0-d device flag: the corrected step was not finite
    where the original one was, so the original step was used (the caller warns once, after its loop)."""
    corrected = coefficients.next_sample(sample, output, previous_output, previous_sample)
    if not coefficients.corrected:
        return corrected, None
    fell_back = ~torch.isfinite(finite_sum(corrected))
    return torch.where(fell_back, coefficients.original_step(sample, output), corrected), fell_back


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
    """One step from ``step.t`` to ``step.t_next``, checked on the spot (a sampling loop checks after the loop).

    Args:
        prediction_type: ``diff_eps``, ``ddim_eps`` or ``velocity`` (already canonical).
        model_output: the raw network output at (sample, t_c * T).
        sample: the current sample z at t_c.
        step: the step and its segment (``Segments.step_at``).
        theta_row: this segment's theta row ``[3]``; ``None`` or zeros give the original step.
        previous_output: the raw model output of the previous step, for theta's third column.
        step_index, timestep: only used in messages.
    """
    if not bool(torch.isfinite(model_output).all()):
        raise nonfinite_output_error(step_index, timestep)
    row = None if theta_row is None or (not theta_row.requires_grad and not bool(theta_row.any())) else theta_row
    coefficients = StepCoefficients.of(prediction_type, step, row, previous_output is not None)
    prev_sample, fell_back = apply_step(coefficients, model_output, sample, previous_output)
    if fell_back is not None and bool(fell_back):
        warn_fallback([(step_index, timestep, step.index)])
    return StepResult(prev_sample, sample, model_output, coefficients)


def nonfinite_output_error(step_index: Optional[int], timestep: Optional[float]) -> FloatingPointError:
    return FloatingPointError(
        f"the model output contains NaN or Inf at step {step_index} (timestep {timestep}); "
        "check the model, its dtype (fp16 overflow), the conditioning and the input latents"
    )


def warn_fallback(places: list) -> None:
    steps = ", ".join(f"step {i} (timestep {t}, segment {k})" for i, t, k in places)
    logger.warning("theta correction gave NaN/Inf at %s; using the theta = 0 step there", steps)
