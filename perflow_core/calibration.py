"""Fit theta for a model: per-segment least squares against a many-step teacher, no backpropagation.

Every PeRFlow step is linear in its segment's theta row (``theta.py``):
``x_next = base + F @ theta[k]`` with ``base`` the original step and ``F`` the three feature terms.
Running the K-step sampler on the fit seeds and collecting, per segment, ``F`` and the residual
``target - base`` against the teacher's state at the same time gives a 3x3 least-squares problem per
segment. Segments are fitted in order, each with the sampler's own states (earlier segments already
corrected); a segment with several steps is refitted until its row settles, since its later steps
start from states that depend on its own theta. A row that does not lower the fit seeds' error at
its segment's end is set back to zero.

With ``fit_boundaries`` the windows are learned too (one per step, see ``time_grid.py`` and `learn_grid`: the last steps
are then refitted together against the final target, `refine_to_endpoint`), and a
``progress`` hook is told before every network call (ComfyUI's progress bar and Cancel).
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
from .time_grid import (
    GridPath,
    best_boundaries,
    check_grid_fit,
    check_solver,
    fine_grid,
    fine_steps,
    grid_targets,
    learned_settings,
    line_point,
    local_errors,
    solve_on_grid,
)

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
        settings: the calibrated settings: theta, and the learned windows when the grid was fitted.
        model_calls: network calls (batches) the whole calibration made.
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
    settings: Optional[PerflowSettings] = None
    model_calls: int = 0

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
    fine: List[float] = []
    marks: List[int] = []
    for part in fine_steps(plan, multiplier):
        fine += part
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
    return line_point(states[step.alpha_start], states[step.alpha_end], step)


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
        theta[k], z_segment, previous_segment = fit_segment(model_fn, plan, k, theta, z_segment, previous_segment, targets, refits, ridge)
    return theta


def fit_segment(
    model_fn: ModelFn,
    plan: SamplingPlan,
    k: int,
    theta: torch.Tensor,
    z_segment: torch.Tensor,
    previous_segment: Optional[torch.Tensor],
    targets: Sequence[torch.Tensor],
    refits: int = DEFAULT_REFITS,
    ridge: float = DEFAULT_RIDGE,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Segment k's theta row (earlier rows as in ``theta``), and the sample and model output at the segment's end.

    Every run of the segment starts from ``z_segment``, so its first model output is computed once."""
    model_fn = FirstOutputCache(model_fn, z_segment)
    theta = theta.clone()
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
    z_end, previous_end = run_plan(model_fn, plan, z_segment, theta, steps, previous_segment)
    return theta[k], z_end, previous_end


class FirstOutputCache:
    """``model_fn`` that computes the output at one given sample (the same tensor object) once."""

    def __init__(self, model_fn: ModelFn, sample: torch.Tensor):
        self.model_fn, self.sample, self.outputs = model_fn, sample, {}

    def __call__(self, z: torch.Tensor, timestep: float) -> torch.Tensor:
        if z is not self.sample:
            return self.model_fn(z, timestep)
        if timestep not in self.outputs:
            self.outputs[timestep] = self.model_fn(z, timestep)
        return self.outputs[timestep]


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


class GridSearch:
    """The fit seeds' final error of a one-window-per-step grid with theta fitted (``fit_segment``), against a grid
    teacher path. A step's model output depends only on the boundaries up to its start and a segment's fit only on
    those up to its end, so both are kept by that prefix: moving one boundary re-runs only the steps after it."""

    def __init__(self, model_fn: ModelFn, settings: PerflowSettings, alphas_cumprod: torch.Tensor, noise: torch.Tensor, path: GridPath):
        self.model_fn, self.settings, self.alphas_cumprod, self.noise, self.path = model_fn, settings, alphas_cumprod, noise, path
        self.outputs: Dict[Tuple[float, ...], torch.Tensor] = {}
        self.segments: Dict[Tuple[float, ...], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.errors: Dict[Tuple[float, ...], float] = {}

    def plan(self, boundaries: Sequence[float]) -> SamplingPlan:
        return SamplingPlan.for_steps(learned_settings(self.settings, boundaries), len(boundaries) - 1, self.alphas_cumprod)

    def theta(self, boundaries: Sequence[float]) -> torch.Tensor:
        self.error(boundaries)
        return torch.stack([self.segments[tuple(boundaries[: k + 2])][0] for k in range(len(boundaries) - 1)])

    def error(self, boundaries: Sequence[float]) -> float:
        key = tuple(boundaries)
        if key not in self.errors:
            plan = self.plan(boundaries)
            targets = grid_targets(self.path, plan)
            theta = torch.zeros(len(plan), NUM_THETA_COLUMNS, dtype=torch.float64)
            z, previous = self.noise, None
            for k in range(len(plan)):
                done = key[: k + 2]
                if done not in self.segments:
                    model_fn = self._output_for(key[: k + 1])
                    self.segments[done] = fit_segment(model_fn, plan, k, theta, z, previous, targets)
                theta[k], z, previous = self.segments[done]
            self.errors[key] = rmse(z, self.path.states[-1])
        return self.errors[key]

    def known_outputs(self, boundaries: Sequence[float]) -> ModelFn:
        """``model_fn`` for a run of these boundaries with their fitted theta, whose outputs `error` already computed."""
        self.error(boundaries)
        outputs = {float(boundaries[k]): self.outputs[tuple(boundaries[: k + 1])] for k in range(len(boundaries) - 1)}
        return lambda z, timestep: outputs[float(timestep)]

    def _output_for(self, prefix: Tuple[float, ...]) -> ModelFn:
        def model_fn(z: torch.Tensor, timestep: float) -> torch.Tensor:
            if prefix not in self.outputs:
                self.outputs[prefix] = self.model_fn(z, timestep)
            return self.outputs[prefix]

        return model_fn


def search_grid(search: GridSearch, grid: Sequence[float], start: Sequence[float], budget: Callable[[], bool]) -> List[float]:
    """Coordinate search over the interior boundaries on the teacher's grid: move one boundary by ``stride`` grid
    points either way while that lowers the error, halving the stride down to 1, until ``budget()`` says stop."""
    positions = {t: i for i, t in enumerate(grid)}
    best = list(start)
    stride = max(1, (len(grid) - 1) // (4 * (len(best) - 1)))
    while stride >= 1 and not budget():
        improved = False
        for k in range(1, len(best) - 1):
            for move in (-stride, stride):
                place = positions[best[k]] + move
                if budget() or not positions[best[k - 1]] < place < positions[best[k + 1]]:
                    continue
                candidate = best[:k] + [grid[place]] + best[k + 1 :]
                if search.error(candidate) < search.error(best):
                    best, improved = candidate, True
        stride = stride if improved else stride // 2
    return best


def refinement_calls(last: int) -> int:
    """At most this many network calls for `refine_to_endpoint` on the ``last`` steps, its run's outputs known: each of
    their 3 theta columns carried to the end by the steps after it, and up to two trial runs of those steps."""
    return 3 * last * (last - 1) // 2 + 2 * last


def endpoint_steps(steps: int, budget: int) -> int:
    """The most last steps `refine_to_endpoint` can take within ``budget`` calls; 0 below 2 (the last step alone is
    already fitted against the final target)."""
    return max((m for m in range(2, steps + 1) if refinement_calls(m) <= budget), default=0)


@torch.no_grad()
def refine_to_endpoint(model_fn: ModelFn, plan: SamplingPlan, noise: torch.Tensor, theta: torch.Tensor, target: torch.Tensor, last: int, known: Optional[ModelFn] = None, ridge: float = 1e-6) -> torch.Tensor:
    """One Gauss-Newton step on the theta rows of the ``last`` steps (one window per step) against the final target.

    Fitted step by step, each step matches the teacher's state at its end, so an early step cannot leave an error
    that a later one cancels. A step is linear in its own row (``x_next = base + F theta``), so the final sample's
    derivative in that row is ``F`` carried through the later steps: one finite difference per column (a run of the
    later steps from ``x_next + h F``). The step is kept only if it lowers the fit seeds' final error (else half of
    it is tried). ``known`` gives the outputs of the run with ``theta`` when they were computed before."""
    records: List[StepRecord] = []
    final, _ = run_plan(known or model_fn, plan, noise, theta, on_step=records.append)
    count, first = len(plan), len(plan) - last
    columns = []
    for k in range(first, count):
        features, _ = _least_squares_terms(plan, records[k], records[k].result.prev_sample)
        for column in features.T:
            columns.append(column if k == count - 1 else _carried(model_fn, plan, theta, records[k], column, final))
    jacobian = torch.stack(columns, dim=1)
    residual = (target.double() - final.double()).flatten()
    normal = jacobian.T @ jacobian
    scale = float(normal.diagonal().max()) or 1.0
    update = torch.linalg.solve(normal + ridge * scale * torch.eye(len(columns), dtype=normal.dtype), jacobian.T @ residual)
    rows = [plan.steps[k].index for k in range(first, count)]
    best, best_error = theta, rmse(final, target)
    for share in (1.0, 0.5):
        trial = theta.clone()
        trial[rows] = (theta[rows] + share * update.view(last, NUM_THETA_COLUMNS)).clamp(*THETA_DOCUMENTED_RANGE)
        end, _ = run_plan(model_fn, plan, records[first].sample, trial, range(first, count), records[first].previous_output)
        if rmse(end, target) < best_error:
            return trial
    return best


def _carried(model_fn: ModelFn, plan: SamplingPlan, theta: torch.Tensor, record: StepRecord, column: torch.Tensor, final: torch.Tensor) -> torch.Tensor:
    """The change of the run's ``final`` sample per unit move of ``record``'s result along ``column`` (a finite difference)."""
    start = record.result.prev_sample
    direction = column.view(start.shape).to(start.dtype)
    h = 1e-3 * float(start.double().pow(2).mean().sqrt()) / max(float(direction.double().pow(2).mean().sqrt()), 1e-30)
    moved, _ = run_plan(model_fn, plan, start + h * direction, theta, range(record.index + 1, len(plan)), record.output)
    return ((moved.double() - final.double()) / h).flatten()


def learn_grid(model_fn: CountedModel, settings: PerflowSettings, alphas_cumprod: torch.Tensor, noise: torch.Tensor, path: GridPath, given: List[float]) -> Tuple[List[float], torch.Tensor]:
    """The learned boundaries and their theta. Candidates: the grid the local errors pick (`time_grid.best_boundaries`),
    the given one, and a coordinate search from the better of them on one half of the fit seeds; the other half picks
    among them, so the search cannot win by fitting its own seeds. Theta is then fitted on all the fit seeds, step by
    step, and its last steps refitted together against the final target (`refine_to_endpoint`). The search and the
    refit share at most half the calls the teacher makes per seed set, the refit first (its run reuses the outputs the
    search computed)."""
    budget = (len(path.timesteps) - 1) // 2
    last = endpoint_steps(len(given) - 1, budget)
    search_budget = budget - (refinement_calls(last) if last else 0)
    local = best_boundaries(local_errors(path), path.timesteps, len(given) - 1)
    half = len(noise) // 2
    if half == 0:
        candidates = [local, given]
    else:
        search = GridSearch(model_fn, settings, alphas_cumprod, noise[:half], path.part(slice(0, half)))
        check = GridSearch(model_fn, settings, alphas_cumprod, noise[half:], path.part(slice(half, None)))
        started = model_fn.calls
        searched = search_grid(search, path.timesteps, min([local, given], key=search.error), lambda: model_fn.calls - started >= search_budget)
        candidates = [min([local, given, searched], key=check.error)]
    full = GridSearch(model_fn, settings, alphas_cumprod, noise, path)
    boundaries = min(candidates, key=full.error)
    theta = full.theta(boundaries)
    if last:
        theta = refine_to_endpoint(model_fn, full.plan(boundaries), noise, theta, path.states[-1], last, full.known_outputs(boundaries))
    return boundaries, theta


# progress(calls_done, calls_planned): told before every network call of a calibration (``calls_planned`` is an upper
# bound: refits can stop early); raising from it stops the calibration there (ComfyUI's Cancel).
Progress = Callable[[int, int], None]


class CountedModel:
    """``model_fn`` that tells ``progress`` before each call; it reads no tensor (nothing waits on the device)."""

    def __init__(self, model_fn: ModelFn, planned: int, progress: Optional[Progress]):
        self.model_fn, self.planned, self.progress, self.calls = model_fn, planned, progress, 0

    def __call__(self, z: torch.Tensor, timestep: float) -> torch.Tensor:
        if self.progress is not None:
            self.progress(self.calls, self.planned)
        self.calls += 1
        return self.model_fn(z, timestep)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.calls, self.calls)


def planned_calls(plan: SamplingPlan, teacher_calls: int, refits: int) -> int:
    """At most this many network calls: the teacher on both seed sets, `fit_theta` (a segment's first output is
    computed once), and the before/after runs."""
    per_segment = [len(plan.steps_in_segment(k)) for k in sorted({w.index for w in plan.steps})]
    fit = sum(1 + ((refits if n > 1 else 1) + 3) * (n - 1) for n in per_segment)
    return 2 * teacher_calls + fit + 2 * len(plan)


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
    *,
    fit_boundaries: bool = False,
    teacher_solver: str = "perflow",
    progress: Optional[Progress] = None,
) -> CalibrationReport:
    """Fit theta (and with ``fit_boundaries`` the time grid) on ``fit_noise``; report errors on ``holdout_noise``.

    Args:
        model_fn: ``model_fn(z, timestep) -> raw output`` (conditioning and CFG folded in by the caller).
        settings: segments and parameterisation (its theta is ignored and refitted).
        steps: network calls of the calibrated sampler.
        alphas_cumprod: the model's training noise levels.
        fit_noise, holdout_noise: initial noise; the two sets must differ.
        teacher: targets at every step end; default the PeRFlow flow at ``teacher_multiplier`` x steps.
        fit_boundaries: also learn the windows (``time_grid.py``): one window per step, boundaries on the teacher's
            grid; the result's settings carry them. ``ddim_eps`` only; a PeRFlow-trained model keeps its windows
            unless this is asked for.
        teacher_solver: ``perflow`` (default) or ``dpmpp_2m`` (a second-order teacher on the same grid and calls,
            ``ddim_eps`` only). With ``fit_boundaries``, ``perflow`` is its flow with one window per teacher step.
        progress: ``progress(calls_done, calls_planned)`` before every network call; raise from it to stop.
    """
    started = time.perf_counter()
    plan = SamplingPlan.for_steps(settings, steps, alphas_cumprod)
    if fit_boundaries:
        check_grid_fit(settings, teacher_solver)
        if teacher is not None:
            raise ValueError("fit_boundaries learns the grid from its own grid teacher; a teacher callable cannot be used with it")
    else:
        check_solver(teacher_solver, settings)
    on_grid = teacher is None and (fit_boundaries or teacher_solver != "perflow")
    # The default teacher (the PeRFlow flow, or a solver on the same fine grid) calls the network once per grid step.
    grid = fine_grid(plan, teacher_multiplier) if teacher is None else []
    teacher_calls = len(grid) - 1 if teacher is None else int(getattr(teacher, "calls_per_sample", 0))
    planned = 3 * teacher_calls + 8 * len(plan) if fit_boundaries else planned_calls(plan, teacher_calls, refits)
    counted = CountedModel(model_fn, planned, progress)
    teacher_started = time.perf_counter()
    if on_grid:
        paths = [solve_on_grid(counted, grid, alphas_cumprod, noise, teacher_solver) for noise in (fit_noise, holdout_noise)]
        teacher_seconds = time.perf_counter() - teacher_started
        fitted_plan, theta = plan, None
        if fit_boundaries:
            boundaries, theta = learn_grid(counted, settings, alphas_cumprod, fit_noise, paths[0], [float(t) for t in plan.timesteps] + [0.0])
            fitted_plan = SamplingPlan.for_steps(learned_settings(settings, boundaries), len(plan), alphas_cumprod)
        fit_targets, holdout_targets = (grid_targets(path, fitted_plan) for path in paths)
        before_targets = grid_targets(paths[1], plan)
    else:
        teacher = teacher or perflow_teacher(counted, plan, teacher_multiplier)
        fit_targets, holdout_targets = teacher(fit_noise), teacher(holdout_noise)
        before_targets, fitted_plan, theta = holdout_targets, plan, None
        teacher_seconds = time.perf_counter() - teacher_started
    if theta is None:
        theta = fit_theta(counted, fitted_plan, fit_noise, fit_targets, refits)
    before = run_student(counted, plan, holdout_noise, torch.zeros_like(plan.settings.theta))
    after = run_student(counted, fitted_plan, holdout_noise, theta)
    counted.finish()
    return CalibrationReport(
        theta=theta,
        error_before=rmse(before[-1], before_targets[-1]),
        error_after=rmse(after[-1], holdout_targets[-1]),
        fit_samples=len(fit_noise),
        holdout_samples=len(holdout_noise),
        teacher_seconds=teacher_seconds,
        total_seconds=time.perf_counter() - started,
        teacher_calls=teacher_calls,
        student_calls=len(plan.steps),
        segment_errors_before=[rmse(b, t) for b, t in zip(before, before_targets)],
        segment_errors_after=[rmse(a, t) for a, t in zip(after, holdout_targets)],
        settings=fitted_plan.settings.replace(theta=theta),
        model_calls=counted.calls,
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

