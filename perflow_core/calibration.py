"""Fit theta for a model: per-segment least squares against a many-step teacher, no backpropagation.

Every PeRFlow step is linear in its segment's theta row (``theta.py``):
``x_next = base + F @ theta[k]`` with ``base`` the original step and ``F`` the three feature terms.
Running the K-step sampler on the fit seeds and collecting, per segment, ``F`` and the residual
``target - base`` against the teacher's state at the same time gives a 3x3 least-squares problem per
segment. Segments are fitted in order, each with the sampler's own states (earlier segments already
corrected); a segment with several steps is refitted until its row settles, since its later steps
start from states that depend on its own theta. A row that does not lower the fit seeds' error at
its segment's end is set back to zero.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .sampling import ModelFn, SamplingPlan, StepRecord, run_plan
from .segments import SegmentStep
from .settings import PerflowSettings
from .solver import theta_features
from .theta import NUM_THETA_COLUMNS, THETA_DOCUMENTED_RANGE

# teacher(noise) -> the teacher's states at every student step end, [steps] tensors like noise.
Teacher = Callable[[torch.Tensor], List[torch.Tensor]]

DEFAULT_RIDGE = 1e-8
# A segment with several steps is refitted until its theta row moves less than this, at most `refits` times.
REFIT_TOLERANCE = 1e-3
DEFAULT_REFITS = 10


@dataclass
class CalibrationReport:
    """What calibration found, measured on held-out seeds (never the fit seeds).

    Args:
        theta: the fitted ``[K, 3]`` theta.
        error_before, error_after: RMSE of the final sample to the teacher's, theta = 0 and fitted.
        fit_samples, holdout_samples: how many seeds each set had.
        teacher_seconds, total_seconds: wall time of the teacher runs and of the whole calibration.
        teacher_calls, student_calls: network evaluations (per sample) of teacher and student runs.
    """

    theta: torch.Tensor
    error_before: float
    error_after: float
    fit_samples: int
    holdout_samples: int
    teacher_seconds: float
    total_seconds: float
    teacher_calls: int
    student_calls: int
    segment_errors_before: List[float] = field(default_factory=list)
    segment_errors_after: List[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.error_after / max(self.error_before, 1e-30)

    def summary(self) -> str:
        return (
            f"held-out RMSE to the teacher: theta=0 {self.error_before:.5f} -> calibrated {self.error_after:.5f} "
            f"(ratio {self.ratio:.3f}; {self.fit_samples} fit / {self.holdout_samples} held-out seeds); "
            f"time {self.total_seconds:.1f} s, of which teacher {self.teacher_seconds:.1f} s"
        )


@torch.no_grad()
def run_student(model_fn: ModelFn, plan: SamplingPlan, noise: torch.Tensor, theta: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """The sampler's states after every step (the plan's theta when not given)."""
    states: List[torch.Tensor] = []
    run_plan(model_fn, plan, noise, theta, on_step=lambda record: states.append(record.result.prev_sample))
    return states


def perflow_teacher(model_fn: ModelFn, plan: SamplingPlan, multiplier: int = 8) -> Teacher:
    """The PeRFlow flow of the same model (theta = 0) with ``multiplier`` times the steps.

    Each student step is cut into ``multiplier`` equal steps (integer timesteps), so the teacher passes
    through every student timestep and its state there is the target.
    """
    if multiplier < 1:
        raise ValueError(f"teacher multiplier must be >= 1; got {multiplier}")
    ends = list(plan.timesteps[1:]) + [0.0]
    fine: List[float] = []
    marks: List[int] = []
    for start, end in zip(plan.timesteps, ends):
        fine += _subdivide(start, end, multiplier)
        marks.append(len(fine) - 1)
    teacher_plan = SamplingPlan.for_timesteps(plan.settings, fine, plan.alphas_cumprod)
    zero = torch.zeros_like(plan.settings.theta)

    def teacher(noise: torch.Tensor) -> List[torch.Tensor]:
        states = run_student(model_fn, teacher_plan, noise, zero)
        return [states[m] for m in marks]

    teacher.calls_per_sample = len(fine)  # type: ignore[attr-defined]
    return teacher


def ode_teacher(solve: Callable[[torch.Tensor, float, float], torch.Tensor], plan: SamplingPlan) -> Teacher:
    """Targets from an exact (or any trusted) ODE solver ``solve(z, alpha_from, alpha_to)`` of another model.

    At a step that ends a window the target is the ODE's state at the window end; inside a window it is the
    point on the straight line between the ODE's states at the window's ends (the path PeRFlow follows).
    Used to calibrate a distilled student against the teacher it was distilled from.
    """
    levels = sorted({w.alpha_start for w in plan.steps} | {w.alpha_end for w in plan.steps})

    def teacher(noise: torch.Tensor) -> List[torch.Tensor]:
        z, current = noise.double(), float(plan.alphas_cumprod[-1])
        states = {current: z}
        for alpha in levels:
            if alpha not in states:
                z, current = solve(z, current, alpha), alpha
                states[alpha] = z
        return [window_line_point(states, w).to(noise.dtype) for w in plan.steps]

    teacher.calls_per_sample = 0  # type: ignore[attr-defined]
    return teacher


def window_line_point(states: Dict[float, torch.Tensor], step: SegmentStep) -> torch.Tensor:
    """The point at ``step.t_next`` on the straight line between the states at the window's two signal levels."""
    share = (step.t_start - step.t_next) / (step.t_start - step.t_end)
    return torch.lerp(states[step.alpha_start], states[step.alpha_end], share)


def _subdivide(start: float, end: float, parts: int) -> List[float]:
    points = sorted({round(start + (end - start) * j / parts) for j in range(parts)} | {start}, reverse=True)
    return [float(p) for p in points if p > end]


@torch.no_grad()
def fit_theta(
    model_fn: ModelFn,
    plan: SamplingPlan,
    noise: torch.Tensor,
    targets: Sequence[torch.Tensor],
    refits: int = DEFAULT_REFITS,
    ridge: float = DEFAULT_RIDGE,
) -> torch.Tensor:
    """Per-segment least squares of theta so the sampler's states match ``targets`` (one per step)."""
    theta = torch.zeros(plan.settings.segments, NUM_THETA_COLUMNS, dtype=torch.float64)
    z_segment, previous_segment = noise, None
    for k in sorted({w.index for w in plan.steps}):
        steps = plan.steps_in_segment(k)
        for _ in range(refits if len(steps) > 1 else 1):
            normal, rhs = torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)

            def collect(record: StepRecord) -> None:
                nonlocal normal, rhs
                features, residual = _least_squares_terms(plan, record, targets[record.index])
                normal += features.T @ features
                rhs += features.T @ residual

            run_plan(model_fn, plan, z_segment, theta, steps, previous_segment, on_step=collect)
            update = _solve_ridge(normal, rhs, ridge)
            converged = bool((update - theta[k]).abs().max() < REFIT_TOLERANCE)
            theta[k] = update
            if converged:
                break
        theta[k] = _better_than_zero(model_fn, plan, steps, z_segment, previous_segment, theta, k, targets[steps[-1]])
        z_segment, previous_segment = run_plan(model_fn, plan, z_segment, theta, steps, previous_segment)
    return theta


def _better_than_zero(model_fn: ModelFn, plan: SamplingPlan, steps: List[int], z, previous, theta: torch.Tensor, k: int, target: torch.Tensor) -> torch.Tensor:
    """Keep segment k's fitted row only if it lowers the fit seeds' error at the segment's end."""
    without = theta.clone()
    without[k] = 0
    fitted = rmse(run_plan(model_fn, plan, z, theta, steps, previous)[0], target)
    plain = rmse(run_plan(model_fn, plan, z, without, steps, previous)[0], target)
    return theta[k] if fitted <= plain else without[k]


def _least_squares_terms(plan: SamplingPlan, record: StepRecord, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The step's theta features ``F`` and the residual ``target - (original step)``, flattened, in float64."""
    result, step = record.result, record.result.step
    terms = theta_features(plan.settings.prediction_type, record.sample, result.velocity, result.window_end, record.previous_output, step)
    features = torch.stack([t.double().flatten() for t in terms], dim=1)
    original_step = record.sample + (step.t_next - step.t) * result.velocity
    return features, (target.double() - original_step.double()).flatten()


def _solve_ridge(normal: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    scale = float(normal.diagonal().max()) or 1.0
    solution = torch.linalg.solve(normal + ridge * scale * torch.eye(3, dtype=normal.dtype), rhs)
    low, high = THETA_DOCUMENTED_RANGE
    return solution.clamp(low, high)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root mean squared difference, in float64."""
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


@torch.no_grad()
def calibrate_theta(
    model_fn: ModelFn,
    settings: PerflowSettings,
    steps: int,
    alphas_cumprod: torch.Tensor,
    fit_noise: torch.Tensor,
    holdout_noise: torch.Tensor,
    teacher: Optional[Teacher] = None,
    teacher_multiplier: int = 8,
    refits: int = DEFAULT_REFITS,
) -> CalibrationReport:
    """Fit theta on ``fit_noise`` and report before/after errors on ``holdout_noise``.

    Args:
        model_fn: ``model_fn(z, timestep) -> raw output`` (conditioning and CFG folded in by the caller).
        settings: segments and parameterisation (its theta is ignored and refitted).
        steps: network calls of the calibrated sampler.
        alphas_cumprod: the model's training noise levels.
        fit_noise, holdout_noise: initial noise; the two sets must differ.
        teacher: targets at every step end; default the PeRFlow flow at ``teacher_multiplier`` x steps.
    """
    started = time.perf_counter()
    plan = SamplingPlan.for_steps(settings, steps, alphas_cumprod)
    teacher = teacher or perflow_teacher(model_fn, plan, teacher_multiplier)
    teacher_started = time.perf_counter()
    fit_targets = teacher(fit_noise)
    holdout_targets = teacher(holdout_noise)
    teacher_seconds = time.perf_counter() - teacher_started
    theta = fit_theta(model_fn, plan, fit_noise, fit_targets, refits)
    zero = torch.zeros_like(theta)
    before = run_student(model_fn, plan, holdout_noise, zero)
    after = run_student(model_fn, plan, holdout_noise, theta)
    return CalibrationReport(
        theta=theta,
        error_before=rmse(before[-1], holdout_targets[-1]),
        error_after=rmse(after[-1], holdout_targets[-1]),
        fit_samples=len(fit_noise),
        holdout_samples=len(holdout_noise),
        teacher_seconds=teacher_seconds,
        total_seconds=time.perf_counter() - started,
        teacher_calls=int(getattr(teacher, "calls_per_sample", 0)),
        student_calls=len(plan.steps),
        segment_errors_before=[rmse(b, t) for b, t in zip(before, holdout_targets)],
        segment_errors_after=[rmse(a, t) for a, t in zip(after, holdout_targets)],
    )


def diffusers_model_fn(unet, encoder_hidden_states=None, negative_encoder_hidden_states=None, guidance_scale: float = 1.0) -> ModelFn:
    """``model_fn`` for a diffusers UNet: the raw output at (z, t), with classifier-free guidance
    ``uncond + guidance_scale * (cond - uncond)`` when negative embeddings are given."""

    def model_fn(z: torch.Tensor, timestep: float) -> torch.Tensor:
        t = torch.full((z.shape[0],), float(timestep), device=z.device)
        with torch.no_grad():
            if encoder_hidden_states is None:
                return unet(z, t).sample
            cond = unet(z, t, encoder_hidden_states=encoder_hidden_states).sample
            if negative_encoder_hidden_states is None or guidance_scale == 1.0:
                return cond
            uncond = unet(z, t, encoder_hidden_states=negative_encoder_hidden_states).sample
            return uncond + guidance_scale * (cond - uncond)

    return model_fn
