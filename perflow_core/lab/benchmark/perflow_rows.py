"""PeRFlow's rows: theta = 0 and calibrated (against its own 8x flow and the exact ODE) on the analytic model,
the trained student's rows beside the peers run on it, and what each calibration cost."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from ...calibration import CalibrationReport, Teacher, calibrate_theta, diffusers_model_fn, rmse, window_line_point
from ...sampling import SamplingPlan
from ...noise_schedule import alphas_cumprod_for
from ...scheduler import PerflowScheduler
from ...settings import PerflowSettings
from ...solver import perflow_step
from ..analytic import solve_probability_flow_ode
from ..pipeline import run_pipeline
from .endpoints import Endpoint, ExactPath, SamplerRun
from .models import CountingModel, StudentEpsModel
from .peers import ComfyEnvironment, comfy_rows, diffusers_rows, network_eps
from .rows import ModelResult, Row, TimeRatio, Workload

TEACHER_MULTIPLIER = 8
STUDENT_PATH = Path(__file__).resolve().parent.parent / "data" / "perflow_student_digits.safetensors"


def perflow_segments_for(nfe: int) -> int:
    """K for an NFE: 4 segments, or 2 at NFE 2 (PeRFlow needs a step per segment)."""
    return 2 if nfe < 4 else 4


def perflow_settings(nfe: int, theta: Optional[torch.Tensor] = None) -> PerflowSettings:
    """The analytic model's PeRFlow setup: ``ddim_eps`` with ``perflow_segments_for(nfe)`` segments."""
    return PerflowSettings(segments=perflow_segments_for(nfe), prediction_type="ddim_eps", theta=theta)


def boundary_levels(alphas_cumprod: torch.Tensor, segment_counts: Sequence[int]) -> List[float]:
    """Signal levels of every window boundary of uniform K-segment PeRFlow, for each K."""
    levels = set()
    for count in segment_counts:
        segments = PerflowSettings(segments=count).build_segments()
        for k in range(count):
            levels.update(float(alphas_cumprod[i]) for i in segments.alpha_indices(k))
    return sorted(levels)


def exact_ode_teacher(plan: SamplingPlan, paths: Sequence[ExactPath]) -> Teacher:
    """Targets for ``calibrate_theta`` from the exact ODE.

    At a step that ends a window the target is the exact ODE state at the window's end; inside a window
    it is the point on the straight line between the exact states at the window's start and end.
    """

    def teacher(noise: torch.Tensor) -> List[torch.Tensor]:
        path = _path_for(noise, paths)
        return [window_line_point(path.states, window) for window in plan.steps]

    teacher.calls_per_sample = 0  # type: ignore[attr-defined]
    return teacher


def _path_for(noise: torch.Tensor, paths: Sequence[ExactPath]) -> ExactPath:
    for path in paths:
        if path.noise.shape == noise.shape and torch.equal(path.noise, noise):
            return path
    raise ValueError("the exact-ODE teacher has no precomputed path for this noise")


THETA_ZERO = "PeRFlow theta=0"
CALIBRATED_PERFLOW_TEACHER = "PeRFlow cal. (PeRFlow 8x teacher)"
CALIBRATED_EXACT_TEACHER = "PeRFlow cal. (exact-ODE teacher)"
CALIBRATED_2M_TEACHER = "PeRFlow cal. (DPM++2M 8x teacher)"
LEARNED_GRID = "PeRFlow cal. + learned grid (2M 8x)"
# Every calibrated analytic row: (name, short name in the ratios, teacher, fit_boundaries, teacher_solver).
CALIBRATED_ROWS = (
    (CALIBRATED_PERFLOW_TEACHER, "cal[8x]", f"PeRFlow flow at {TEACHER_MULTIPLIER}x steps", False, "perflow"),
    (CALIBRATED_EXACT_TEACHER, "cal[exact]", "exact ODE at window ends, straight lines inside", False, "perflow"),
    (CALIBRATED_2M_TEACHER, "cal[2M]", f"DPM-Solver++ 2M at {TEACHER_MULTIPLIER}x steps on the same model", False, "dpmpp_2m"),
    (LEARNED_GRID, "grid[2M]", f"DPM-Solver++ 2M at {TEACHER_MULTIPLIER}x steps; one window per step, boundaries learned", True, "dpmpp_2m"),
)


def run_perflow(model: torch.nn.Module, settings: PerflowSettings, noise: torch.Tensor, nfe: int) -> SamplerRun:
    """PeRFlow through ``PerflowScheduler`` in the pipeline; it stops at its last window's end."""
    scheduler = PerflowScheduler(**settings.to_config())
    counting = CountingModel(model)
    final = run_pipeline(counting, scheduler, noise, nfe)
    return SamplerRun(final, perflow_endpoint(scheduler), counting.calls)


def perflow_endpoint(scheduler: PerflowScheduler) -> Endpoint:
    """PeRFlow's last step ends at its last window's end, ``alphas_cumprod[0]`` (VP space)."""
    last = float(scheduler.timesteps[-1])
    return Endpoint(scheduler.segments.step_at(last, 0.0, scheduler.alphas_cumprod).alpha_end)


@dataclass
class CalibrationCost(TimeRatio):
    """Wall time of one ``calibrate_theta`` call against the teacher sampling inside it; ``ratio`` is total over teacher."""

    RATIO_OF = ("total_seconds", "teacher_seconds")
    model: str
    nfe: int
    teacher: str
    total_seconds: float
    teacher_seconds: float


def perflow_rows(work: Workload, title: str, costs: List[CalibrationCost]) -> List[Row]:
    """PeRFlow theta = 0 and every calibrated variant (`CALIBRATED_ROWS`), each fitted per NFE on the fit seeds."""
    zero = Row(THETA_ZERO, "perflow", "ddim_eps, K=4 (K=2 at NFE 2), NFE = steps", "none")
    calibrated = [
        (Row(name, "perflow", "theta and the windows fitted per NFE on the fit seeds" if grid else "theta fitted per NFE on the fit seeds", teacher), grid, solver)
        for name, _, teacher, grid, solver in CALIBRATED_ROWS
    ]
    reference, noise = work.held_out.endpoint, work.held_out.noise.float()
    for nfe in work.nfes:
        zero.record(nfe, run_perflow(work.model, perflow_settings(nfe), noise, nfe), nfe, reference, work.model)
        for row, grid, solver in calibrated:
            exact = _exact_teacher_for(work, nfe) if row.sampler == CALIBRATED_EXACT_TEACHER else None
            report = _calibrate(work.model, nfe, work, exact, fit_boundaries=grid, teacher_solver=solver)
            row.theta[nfe] = report.theta.tolist()
            row.boundaries[nfe] = report.settings.build_segments().boundaries
            row.record(nfe, run_perflow(work.model, report.settings, noise, nfe), nfe, reference, work.model)
            if exact is None:
                costs.append(CalibrationCost(title, nfe, row.sampler, report.total_seconds, report.teacher_seconds))
    return [zero] + [row for row, _, _ in calibrated]


def _exact_teacher_for(work: Workload, nfe: int) -> Teacher:
    plan = SamplingPlan.for_steps(perflow_settings(nfe), nfe, work.model.alphas_cumprod)
    return exact_ode_teacher(plan, [work.fit, work.held_out])


def _calibrate(model: torch.nn.Module, nfe: int, work: Workload, teacher: Optional[Teacher], settings: Optional[PerflowSettings] = None, **options) -> CalibrationReport:
    settings = settings or perflow_settings(nfe)
    return calibrate_theta(
        diffusers_model_fn(model),
        settings,
        nfe,
        work.model.alphas_cumprod,
        work.fit.noise.float(),
        work.held_out.noise.float(),
        teacher=teacher,
        teacher_multiplier=TEACHER_MULTIPLIER,
        **options,
    )


STUDENT_THETA_ZERO = "student theta=0"
STUDENT_CALIBRATED = "student cal. (exact-ODE teacher)"
STUDENT_STORED = "student, stored theta"
STUDENT_PEER_SUFFIX = " on student"
BEST_PEER_ON_TEACHER = "best peer on teacher"


def load_student_model(path: Path) -> Tuple[Optional[torch.nn.Module], Optional[PerflowSettings], str]:
    """The trained student, or None and why its rows are skipped."""
    if not path.is_file():
        return None, None, f"student file {path} not found"
    try:
        from ..reflow import load_student
    except ImportError as error:
        return None, None, f"perflow_core.lab.reflow.load_student unavailable ({error})"
    model, settings = load_student(path)
    return model, settings, f"student from {path}"


def teacher_smoothing_or_default(path: Path, default: float) -> Tuple[float, str]:
    """The teacher smoothing recorded in the student file's training metadata, else ``default``."""
    from ..reflow import student_smoothing as recorded_smoothing

    try:
        return recorded_smoothing(path), "read from the file's training metadata"
    except ValueError:
        return default, "not recorded in the file; assumed (--student-smoothing)"


def student_rows(student: torch.nn.Module, settings: PerflowSettings, work: Workload, teacher_result: ModelResult, comfy: Optional[ComfyEnvironment] = None) -> Tuple[List[Row], List[str]]:
    """The student at theta = 0, calibrated per NFE, with its stored theta, and under the diffusers peers,
    all against the exact ODE of its teacher, beside the best peer on the teacher itself."""
    zero_settings = settings.replace(theta=None)
    zero = Row(STUDENT_THETA_ZERO, "student", f"{settings.prediction_type}, K={settings.segments}, NFE = steps", "none")
    calibrated = Row(STUDENT_CALIBRATED, "student", "theta fitted per NFE on the fit seeds", "its teacher's exact ODE at window ends")
    stored = Row(STUDENT_STORED, "student", "the theta stored in the file, at every NFE", "stored in the file")
    reference, noise = work.held_out.endpoint, work.held_out.noise.float()
    usable = [nfe for nfe in work.nfes if nfe >= settings.segments]
    for nfe in usable:
        zero.record(nfe, run_perflow(student, zero_settings, noise, nfe), nfe, reference, work.model)
        plan = SamplingPlan.for_steps(zero_settings, nfe, work.model.alphas_cumprod)
        theta = _calibrate(student, nfe, work, exact_ode_teacher(plan, [work.fit, work.held_out]), zero_settings).theta
        calibrated.theta[nfe] = theta.tolist()
        calibrated.record(nfe, run_perflow(student, settings.replace(theta=theta), noise, nfe), nfe, reference, work.model)
        if not settings.theta_is_zero:
            stored.theta[nfe] = settings.theta.tolist()
            stored.record(nfe, run_perflow(student, settings, noise, nfe), nfe, reference, work.model)
    rows = [zero, calibrated] + ([stored] if not settings.theta_is_zero else [])
    eps_model = StudentEpsModel(student, settings)
    rows += diffusers_rows(work, eps_model, STUDENT_PEER_SUFFIX, "student-peer")
    if comfy is not None:
        rows += comfy_rows(comfy, work, network_eps(eps_model, comfy.model_sampling), STUDENT_PEER_SUFFIX, "student-peer")
    rows.append(_best_peer_row(teacher_result, work.nfes))
    notes = [f"student PeRFlow NFE {n} skipped: below its K={settings.segments} segments" for n in work.nfes if n < settings.segments]
    notes.append("peers on the student read its window-end prediction as DDIM eps (StudentEpsModel)")
    return rows, notes


@torch.no_grad()
def student_window_errors(student: torch.nn.Module, settings: PerflowSettings, work: Workload, far: float = 0.2) -> List[str]:
    """Where the student's K-step error comes from: one student step from the exact state at a window's start,
    then the exact ODE the rest of the way, for each window in turn (theta = 0)."""
    plan = SamplingPlan.for_steps(settings.replace(theta=None), settings.segments, work.model.alphas_cumprod)
    states, lines = work.held_out.states, []
    for timestep, window in zip(plan.timesteps, plan.steps):
        start = states[window.alpha_start]
        output = student(start.float(), timestep).sample.double()
        end = perflow_step(settings.prediction_type, output, start, window, None, None, 0, timestep).prev_sample
        final = solve_probability_flow_ode(work.model, end, window.alpha_end, 1.0)
        per_sample = (final - work.held_out.endpoint).pow(2).flatten(1).mean(1).sqrt()
        lines.append(
            f"window {window.index} (t {window.t_start:g} -> {window.t_end:g}): one student step from the exact state is "
            f"{rmse(end, states[window.alpha_end]):.4f} RMSE off at the window end; carried on by the exact ODE, "
            f"{rmse(final, work.held_out.endpoint):.4f} at sigma 0, {float((per_sample > far).double().mean()):.1%} of samples over {far} RMSE"
        )
    return lines


def _best_peer_row(teacher_result: ModelResult, nfes: Sequence[int]) -> Row:
    best = Row(BEST_PEER_ON_TEACHER, "reference", "best diffusers/ComfyUI sampler on the analytic teacher at each NFE")
    for nfe in nfes:
        peer = teacher_result.best_peer(nfe)
        if peer is not None:
            best.errors[nfe], best.errors_x0_map[nfe] = peer.errors[nfe], peer.errors_x0_map[nfe]
            best.best_of[nfe] = peer.sampler
    return best


def student_levels(settings: PerflowSettings, nfes: Sequence[int]) -> List[float]:
    """The signal levels of every window boundary a student's PeRFlow runs and calibrations need."""
    alphas = alphas_cumprod_for(num_train_timesteps=settings.num_train_timesteps)
    plans = [SamplingPlan.for_steps(settings, nfe, alphas) for nfe in nfes if nfe >= settings.segments]
    return sorted({level for plan in plans for w in plan.steps for level in (w.alpha_start, w.alpha_end)})
