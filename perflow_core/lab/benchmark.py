"""Error-vs-NFE benchmark: PeRFlow (theta = 0 and calibrated) against diffusers' and ComfyUI's samplers.

Every sampler starts from the same held-out noise on the analytic digits model (``analytic.py``, exact
epsilon, SD1.5 schedule) and is compared with the exact probability-flow ODE solution at sigma = 0.

NFE and steps: PeRFlow (``ddim_eps``, K = 4, K = 2 at NFE 2), diffusers' Euler, DDIM, DPM-Solver++ 2M, UniPC
and DEIS, and ComfyUI's samplers take NFE steps of one call; diffusers' Heun takes NFE // 2 steps, which
make 2 * steps - 1 calls (its last step, to sigma 0, is an Euler step). Calls are counted, never assumed.

Where each sampler stops (read from the scheduler after ``set_timesteps``, not assumed):

- sigma 0: diffusers Euler, Heun (``sigmas[-1] = 0``, Karras' ``x`` equals z there), DPM-Solver++ and UniPC
  (``final_sigmas_type="zero"``), DDIM (``set_alpha_to_one=True``, its default), ComfyUI euler, dpmpp_2m,
  ipndm and deis. These are never remapped.
- ``alphas_cumprod[0]`` (sigma 0.029): PeRFlow (its last window ends there) and diffusers DEIS
  (``sigmas[-1]`` is that level's sigma); ComfyUI uni_pc stops at sigma 0.001. These are carried to sigma 0.

The default carrier is the model's exact ODE flow map (an exact state lands on the exact solution to
~1e-7). ``--endpoint-map x0`` uses the model's exact x0 prediction ``E[x0 | z]`` instead; that is not the ODE's
endpoint (on the exact state at ``alphas_cumprod[0]`` it is off by 6.8e-3 RMSE at smoothing 0.05, nearly the
whole 7.9e-3 gap), so both errors are computed for every row and both sets of ratios are printed.

The analytic model reads timestep ``tau`` at ``alphas_cumprod[tau - 1]`` (PeRFlow's convention); diffusers'
schedulers mean ``alphas_cumprod[t]``, so they see the model through ``CountingModel(timestep_offset=1)``.
ComfyUI's samplers see it as ``model(x, sigma) -> denoised``, evaluated at the exact sigma.

Run ``python -m perflow_core.lab.benchmark`` (``--quick`` for a smoke test). It prints one table per model,
the required ratios, the sampler overhead and the calibration cost, and writes ``benchmark.json`` and
``benchmark.png`` to ``--output-dir``. ComfyUI's samplers join when ``COMFYUI_PATH`` points at a ComfyUI
checkout that imports; the trained student joins when its file exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image, ImageDraw, ImageFont

from .analytic import AnalyticDigitsDenoiser, noise_for_seeds, solve_probability_flow_ode
from ..calibration import CalibrationReport, StudentPlan, Teacher, calibrate_theta, diffusers_model_fn, rmse, window_line_point
from ..noise_schedule import alphas_cumprod_for
from ..parameterization import clean_estimate, velocity_and_window_end
from .pipeline import UnconditionalPipeline
from ..scheduler import PerflowScheduler
from ..settings import PerflowSettings
from ..solver import perflow_step

NFES = (2, 4, 6, 8, 16)
QUICK_NFES = (2, 4, 8)
SMOOTHINGS = (0.05, 0.2)
HELD_OUT_FIRST_SEED, HELD_OUT_COUNT, QUICK_HELD_OUT_COUNT = 10_000, 256, 32
FIT_FIRST_SEED, FIT_COUNT, QUICK_FIT_COUNT = 0, 128, 16
TEACHER_MULTIPLIER = 8
STUDENT_PATH = Path(__file__).resolve().parent / "data" / "perflow_student_digits.safetensors"
SD15_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
# RK4 steps of the exact flow map from a sampler's last noise level to sigma = 0: ~1e-7 RMSE on this model.
FLOW_MAP_STEPS = 16
ENDPOINT_MAPS = ("ode", "x0")
COMFY_SAMPLERS = ("euler", "dpmpp_2m", "uni_pc", "ipndm", "deis")
COMFY_UNI_PC_LAST_SIGMA = 0.001  # sample_unipc replaces a final sigma of 0 by this and stops there
FREE_MODEL_REPEAT_FACTOR = 20
TARGETS = {"theta": 0.7, "peer_same_nfe": 1.0, "peer_8": 1.0, "student": 1.0}


# ------------------------------------------------------------------------------------------ endpoints
@dataclass(frozen=True)
class Endpoint:
    """Where a sampler's returned state lies.

    Args:
        alpha: its signal level (1.0 = sigma 0).
        variance_exploding: the state is ``x = z / sqrt(alpha)`` (Karras / k-diffusion samplers) rather
            than the variance-preserving ``z = sqrt(alpha) x0 + sqrt(1 - alpha) eps``.
    """

    alpha: float
    variance_exploding: bool = False

    @property
    def sigma(self) -> float:
        return math.sqrt(max(1.0 - self.alpha, 0.0) / self.alpha)

    @property
    def at_sigma_zero(self) -> bool:
        return self.alpha >= 1.0

    def describe(self) -> str:
        space = "VE x" if self.variance_exploding else "VP z"
        where = "sigma 0 (not remapped)" if self.at_sigma_zero else f"sigma {self.sigma:.4g} (alpha {self.alpha:.6f}), mapped"
        return f"{space} at {where}"


def endpoint_from_sigma(sigma: float, variance_exploding: bool) -> Endpoint:
    """The endpoint of a state at noise-to-signal ratio ``sigma``."""
    return Endpoint(1.0 / (1.0 + float(sigma) ** 2), variance_exploding)


def map_to_sigma_zero(model: AnalyticDigitsDenoiser, state: torch.Tensor, endpoint: Endpoint, method: str = "ode") -> torch.Tensor:
    """A sampler's last state carried to sigma = 0 (float64); unchanged if it is already there.

    ``ode``: the model's exact probability-flow map (an exact state lands on the exact solution).
    ``x0``: the model's exact x0 prediction ``E[x0 | z]``, which is not the ODE's endpoint: on an exact
    state at ``alphas_cumprod[0]`` it is off by about as much as leaving the state unmapped.
    """
    if method not in ENDPOINT_MAPS:
        raise ValueError(f"endpoint map must be one of {ENDPOINT_MAPS}; got {method!r}")
    z = state.double() * math.sqrt(endpoint.alpha) if endpoint.variance_exploding else state.double()
    if endpoint.at_sigma_zero:
        return z
    if method == "x0":
        return model.x0_prediction(z, endpoint.alpha)
    return solve_probability_flow_ode(model, z, endpoint.alpha, 1.0, steps=FLOW_MAP_STEPS)


@dataclass
class SamplerRun:
    """A sampler's returned states, where they lie, and how many network calls it made."""

    final: torch.Tensor
    endpoint: Endpoint
    calls: int


# ------------------------------------------------------------------------------------------ models
class ModelWrapper(torch.nn.Module):
    """A module around ``self.model`` that a pipeline takes for the model (its config, dtype and device)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device


class CountingModel(ModelWrapper):
    """Wraps a ``model(sample, timestep)`` for a pipeline: counts calls and shifts the timestep.

    The analytic model reads model timestep ``tau`` at ``alphas_cumprod[tau - 1]`` (PeRFlow's
    convention); diffusers' schedulers mean ``alphas_cumprod[t]``, so they need ``timestep_offset=1``.
    """

    def __init__(self, model: torch.nn.Module, timestep_offset: float = 0.0):
        super().__init__(model)
        self.timestep_offset = timestep_offset
        self.calls = 0

    def forward(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.model(sample, timestep + self.timestep_offset, **kwargs)


class ConstantOutputModel(torch.nn.Module):
    """A free 'network' returning a fixed tensor: what is left of a sampling loop is the sampler's own cost."""

    def __init__(self, output: torch.Tensor, config: Any):
        super().__init__()
        self.output = output
        self.config = config

    @property
    def dtype(self) -> torch.dtype:
        return self.output.dtype

    @property
    def device(self) -> torch.device:
        return self.output.device

    def forward(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> Any:
        return SimpleNamespace(sample=self.output)


def run_pipeline(model: torch.nn.Module, scheduler: Any, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """``UnconditionalPipeline`` samples (data space, unclipped) from ``noise``."""
    pipeline = UnconditionalPipeline(unet=model, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(latents=noise, num_inference_steps=steps, output_type="pt").images


# ------------------------------------------------------------------------------------------ exact ODE
@dataclass
class ExactPath:
    """The exact ODE solution from ``noise``: its states at chosen signal levels and at sigma = 0."""

    noise: torch.Tensor
    states: Dict[float, torch.Tensor]
    endpoint: torch.Tensor
    seconds: float


def exact_path(model: AnalyticDigitsDenoiser, noise: torch.Tensor, levels: Sequence[float]) -> ExactPath:
    """Solve the ODE once from ``alphas_cumprod[-1]``, stopping at every level in ``levels`` on the way."""
    started = time.perf_counter()
    current = float(model.alphas_cumprod[-1])
    z = noise.double()
    states = {current: z}
    for alpha in sorted(set(levels) - {current}):
        z = solve_probability_flow_ode(model, z, current, alpha)
        states[alpha], current = z, alpha
    endpoint = solve_probability_flow_ode(model, z, current, 1.0)
    return ExactPath(noise, states, endpoint, time.perf_counter() - started)


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


def exact_ode_teacher(plan: StudentPlan, paths: Sequence[ExactPath]) -> Teacher:
    """Targets for ``calibrate_theta`` from the exact ODE.

    At a step that ends a window the target is the exact ODE state at the window's end; inside a window
    it is the point on the straight line between the exact states at the window's start and end.
    """

    def teacher(noise: torch.Tensor) -> List[torch.Tensor]:
        path = _path_for(noise, paths)
        return [window_line_point(path.states, window) for window in plan.windows]

    teacher.calls_per_sample = 0  # type: ignore[attr-defined]
    return teacher


def _path_for(noise: torch.Tensor, paths: Sequence[ExactPath]) -> ExactPath:
    for path in paths:
        if path.noise.shape == noise.shape and torch.equal(path.noise, noise):
            return path
    raise ValueError("the exact-ODE teacher has no precomputed path for this noise")


# ------------------------------------------------------------------------------------------ rows
@dataclass
class Row:
    """One sampler's errors per NFE (RMSE to the exact solution at sigma 0)."""

    sampler: str
    family: str
    note: str = ""
    teacher: Optional[str] = None
    errors: Dict[int, float] = field(default_factory=dict)
    errors_x0_map: Dict[int, float] = field(default_factory=dict)
    calls: Dict[int, int] = field(default_factory=dict)
    steps: Dict[int, int] = field(default_factory=dict)
    endpoints: Dict[int, str] = field(default_factory=dict)
    theta: Dict[int, List[List[float]]] = field(default_factory=dict)
    best_of: Dict[int, str] = field(default_factory=dict)
    mapped: Dict[int, bool] = field(default_factory=dict)

    def record(self, nfe: int, run: SamplerRun, steps: int, reference: torch.Tensor, model: AnalyticDigitsDenoiser) -> None:
        self.errors[nfe] = rmse(map_to_sigma_zero(model, run.final, run.endpoint, "ode"), reference)
        self.errors_x0_map[nfe] = rmse(map_to_sigma_zero(model, run.final, run.endpoint, "x0"), reference)
        self.calls[nfe], self.steps[nfe], self.endpoints[nfe] = run.calls, steps, run.endpoint.describe()
        self.mapped[nfe] = not run.endpoint.at_sigma_zero

    @property
    def is_mapped(self) -> bool:
        """Whether some final state lay short of sigma 0 (so the endpoint map changes its errors)."""
        return any(self.mapped.values())

    def error(self, nfe: int, endpoint_map: str) -> Optional[float]:
        return (self.errors if endpoint_map == "ode" else self.errors_x0_map).get(nfe)

    def as_json(self) -> Dict[str, Any]:
        keyed = lambda values: {str(k): v for k, v in values.items()}  # noqa: E731
        return {
            "sampler": self.sampler,
            "family": self.family,
            "note": self.note,
            "teacher": self.teacher,
            "errors": keyed(self.errors),
            "errors_x0_map": keyed(self.errors_x0_map),
            "calls": keyed(self.calls),
            "steps": keyed(self.steps),
            "endpoints": keyed(self.endpoints),
            "theta": keyed(self.theta),
            "best_of": keyed(self.best_of),
        }


@dataclass
class ModelResult:
    """A model's rows and what its table needs to say."""

    title: str
    smoothing: float
    rows: List[Row]
    notes: List[str] = field(default_factory=list)

    def row(self, sampler: str) -> Optional[Row]:
        return next((r for r in self.rows if r.sampler == sampler), None)

    def best_peer(self, nfe: int, endpoint_map: str = "ode") -> Optional[Row]:
        peers = [r for r in self.rows if r.family in ("diffusers", "comfyui") and r.error(nfe, endpoint_map) is not None]
        return min(peers, key=lambda r: r.error(nfe, endpoint_map), default=None)


# ------------------------------------------------------------------------------------------ PeRFlow
THETA_ZERO = "PeRFlow theta=0"
CALIBRATED_PERFLOW_TEACHER = "PeRFlow cal. (PeRFlow 8x teacher)"
CALIBRATED_EXACT_TEACHER = "PeRFlow cal. (exact-ODE teacher)"


def run_perflow(model: torch.nn.Module, settings: PerflowSettings, noise: torch.Tensor, nfe: int) -> SamplerRun:
    """PeRFlow through ``PerflowScheduler`` in the pipeline; it stops at its last window's end."""
    scheduler = PerflowScheduler(**settings.scheduler_kwargs())
    counting = CountingModel(model)
    final = run_pipeline(counting, scheduler, noise, nfe)
    return SamplerRun(final, perflow_endpoint(scheduler), counting.calls)


def perflow_endpoint(scheduler: PerflowScheduler) -> Endpoint:
    """PeRFlow's last step ends at its last window's end, ``alphas_cumprod[0]`` (VP space)."""
    last = float(scheduler.timesteps[-1])
    return Endpoint(scheduler.segments.window(last, 0.0, scheduler.alphas_cumprod).alpha_end)


@dataclass
class CalibrationCost:
    """Wall time of one ``calibrate_theta`` call against the teacher sampling inside it."""

    model: str
    nfe: int
    teacher: str
    total_seconds: float
    teacher_seconds: float

    @property
    def ratio(self) -> float:
        return self.total_seconds / max(self.teacher_seconds, 1e-12)


@dataclass
class Workload:
    """The noise and exact solutions one model is measured with."""

    model: AnalyticDigitsDenoiser
    held_out: ExactPath
    fit: ExactPath
    nfes: Sequence[int]


def perflow_rows(work: Workload, title: str, costs: List[CalibrationCost]) -> List[Row]:
    """PeRFlow theta = 0, calibrated against its own 8x flow, and calibrated against the exact ODE."""
    zero = Row(THETA_ZERO, "perflow", "ddim_eps, K=4 (K=2 at NFE 2), NFE = steps", "none")
    own = Row(CALIBRATED_PERFLOW_TEACHER, "perflow", "theta fitted per NFE on the fit seeds", f"PeRFlow flow at {TEACHER_MULTIPLIER}x steps")
    exact = Row(CALIBRATED_EXACT_TEACHER, "perflow", "theta fitted per NFE on the fit seeds", "exact ODE at window ends, straight lines inside")
    reference, noise = work.held_out.endpoint, work.held_out.noise.float()
    for nfe in work.nfes:
        zero.record(nfe, run_perflow(work.model, perflow_settings(nfe), noise, nfe), nfe, reference, work.model)
        for row, teacher in ((own, None), (exact, _exact_teacher_for(work, nfe))):
            report = _calibrate(work.model, nfe, work, teacher)
            row.theta[nfe] = report.theta.tolist()
            row.record(nfe, run_perflow(work.model, perflow_settings(nfe, report.theta), noise, nfe), nfe, reference, work.model)
            if teacher is None:
                costs.append(CalibrationCost(title, nfe, own.teacher or "", report.total_seconds, report.teacher_seconds))
    return [zero, own, exact]


def _exact_teacher_for(work: Workload, nfe: int) -> Teacher:
    plan = StudentPlan.build(perflow_settings(nfe), nfe, work.model.alphas_cumprod)
    return exact_ode_teacher(plan, [work.fit, work.held_out])


def _calibrate(model: torch.nn.Module, nfe: int, work: Workload, teacher: Optional[Teacher], settings: Optional[PerflowSettings] = None) -> CalibrationReport:
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
    )


# ------------------------------------------------------------------------------------------ diffusers
@dataclass(frozen=True)
class DiffusersPeer:
    """A diffusers scheduler with its defaults and ``timestep_spacing="trailing"``.

    Args:
        name: row label.
        class_name: the scheduler class in ``diffusers``.
        variance_exploding: its sample is Karras' ``x = z / sqrt(alpha)`` (Euler, Heun), not VP ``z``.
        calls_per_step: network calls per step (Heun 2, its last step to sigma 0 is Euler: 2 * steps - 1).
        overrides: config values that differ from the class defaults (and why, in ``note``).
    """

    name: str
    class_name: str
    variance_exploding: bool = False
    calls_per_step: int = 1
    overrides: Tuple[Tuple[str, Any], ...] = ()
    note: str = ""

    def steps_for(self, nfe: int) -> int:
        return max(1, nfe // self.calls_per_step)

    def build(self) -> Any:
        import diffusers

        return getattr(diffusers, self.class_name)(**SD15_SCHEDULE, timestep_spacing="trailing", **dict(self.overrides))


DIFFUSERS_PEERS = (
    DiffusersPeer("diffusers Euler", "EulerDiscreteScheduler", variance_exploding=True),
    # DDIM's default clip_sample=True clamps x0 to [-1, 1], which smoothed data exceeds (a 0.1 RMSE floor at
    # smoothing 0.2); SD1.5's own scheduler config turns it off too.
    DiffusersPeer("diffusers DDIM", "DDIMScheduler", overrides=(("clip_sample", False),), note="clip_sample=False"),
    DiffusersPeer("diffusers DPM++ 2M", "DPMSolverMultistepScheduler"),
    DiffusersPeer("diffusers UniPC", "UniPCMultistepScheduler"),
    DiffusersPeer("diffusers DEIS", "DEISMultistepScheduler"),
    DiffusersPeer("diffusers Heun", "HeunDiscreteScheduler", variance_exploding=True, calls_per_step=2),
)


def diffusers_endpoint(scheduler: Any, variance_exploding: bool) -> Endpoint:
    """Where a diffusers scheduler's last step lands, read from the scheduler after ``set_timesteps``.

    Sigma-based schedulers end at ``sigmas[-1]`` (0 for ``final_sigmas_type="zero"``; DEIS ends at
    ``alphas_cumprod[0]``'s sigma); DDIM ends at ``final_alpha_cumprod`` (1 with ``set_alpha_to_one=True``).
    """
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas):
        return endpoint_from_sigma(float(sigmas[-1]), variance_exploding)
    return Endpoint(float(scheduler.final_alpha_cumprod), variance_exploding)


def run_diffusers_peer(peer: DiffusersPeer, model: torch.nn.Module, noise: torch.Tensor, nfe: int) -> SamplerRun:
    scheduler = peer.build()
    counting = CountingModel(model, timestep_offset=1.0)
    final = run_pipeline(counting, scheduler, noise, peer.steps_for(nfe))
    return SamplerRun(final, diffusers_endpoint(scheduler, peer.variance_exploding), counting.calls)


def diffusers_rows(work: Workload, model: Optional[torch.nn.Module] = None, suffix: str = "", family: str = "diffusers") -> List[Row]:
    """Every diffusers peer on ``model`` (default: the workload's analytic model), against the analytic model's exact ODE."""
    rows = []
    for peer in DIFFUSERS_PEERS:
        steps = "steps = NFE // 2, calls = 2 * steps - 1" if peer.calls_per_step == 2 else "steps = NFE"
        settings = "defaults + trailing" + (f", {peer.note}" if peer.note else "")
        row = Row(f"{peer.name}{suffix}", family, f"{peer.class_name}, {settings}; {steps}")
        for nfe in work.nfes:
            run = run_diffusers_peer(peer, model or work.model, work.held_out.noise.float(), nfe)
            row.record(nfe, run, peer.steps_for(nfe), work.held_out.endpoint, work.model)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ ComfyUI
@dataclass
class ComfyEnvironment:
    """ComfyUI's sampling modules and an SD1.5 EPS ``model_sampling``."""

    sampling: Any
    uni_pc: Any
    samplers: Any
    model_sampling: Any
    scheduler: str

    def sampler(self, name: str) -> Callable[..., torch.Tensor]:
        return self.uni_pc.sample_unipc if name == "uni_pc" else getattr(self.sampling, f"sample_{name}")

    def sigmas(self, name: str, steps: int) -> torch.Tensor:
        """The sigmas ComfyUI's KSampler gives ``name`` (uni_pc: one more step, penultimate sigma dropped)."""
        if name in self.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
            sigmas = self.samplers.calculate_sigmas(self.model_sampling, self.scheduler, steps + 1)
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        return self.samplers.calculate_sigmas(self.model_sampling, self.scheduler, steps)


def load_comfy(scheduler: str) -> Tuple[Optional[ComfyEnvironment], str]:
    """ComfyUI from ``COMFYUI_PATH``, or None and the reason it was skipped."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return None, "COMFYUI_PATH is not set"
    if not (Path(path) / "comfy").is_dir():
        return None, f"COMFYUI_PATH={path} has no comfy/ package"
    if path not in sys.path:
        sys.path.insert(0, path)
    try:
        from comfy.cli_args import args

        args.cpu = True
        import comfy.extra_samplers.uni_pc as uni_pc
        import comfy.k_diffusion.sampling as sampling
        import comfy.model_sampling as model_sampling
        import comfy.samplers as samplers
    except Exception as error:  # ComfyUI's import chain can fail in many ways; any of them means skip.
        return None, f"importing ComfyUI from {path} failed: {type(error).__name__}: {error}"
    eps_class = type("ModelSamplingDiscreteEPS", (model_sampling.ModelSamplingDiscrete, model_sampling.EPS), {})
    return ComfyEnvironment(sampling, uni_pc, samplers, eps_class(), scheduler), f"ComfyUI from {path}, '{scheduler}' sigmas"


# eps_fn(z, sigma) -> eps: z in VP space, sigma the [B] noise-to-signal ratios of a ComfyUI sampler.
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def analytic_eps(model: AnalyticDigitsDenoiser) -> EpsFn:
    """The analytic model's exact eps at any sigma (it is continuous: no snapping to training timesteps)."""
    return lambda z, sigma: model.eps_prediction(z, 1.0 / (1.0 + sigma**2))


def network_eps(model: torch.nn.Module, model_sampling: Any) -> EpsFn:
    """An eps network called at ComfyUI's timestep for the sigma (the nearest training index) plus one,
    PeRFlow's convention, as the node pack's wrapper calls PeRFlow models."""

    @torch.no_grad()
    def eps(z: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        timestep = model_sampling.timestep(sigma[:1].float()) + 1
        return model(z.float(), timestep).sample.double()

    return eps


class ComfyDenoiser:
    """``model(x, sigma) -> denoised`` over an eps function, shaped like ComfyUI's wrapped model.

    ``inner_model.inner_model.model_sampling`` is what ``perflow_core.k_sampling.sample_perflow`` reads.
    """

    def __init__(self, eps_fn: EpsFn, model_sampling: Any):
        self.eps_fn = eps_fn
        self.inner_model = SimpleNamespace(inner_model=SimpleNamespace(model_sampling=model_sampling))
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor:
        self.calls += 1
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        scale = sigma.view(-1, *([1] * (x.ndim - 1)))
        z = x.double() / (1.0 + scale**2).sqrt()
        return (x.double() - scale * self.eps_fn(z, sigma)).to(x.dtype)


def run_comfy_sampler(comfy: ComfyEnvironment, name: str, eps_fn: EpsFn, noise: torch.Tensor, nfe: int) -> SamplerRun:
    """A ComfyUI sampler from ``x = noise * sqrt(1 + sigma_max^2)`` (KSAMPLER's full-denoise scaling)."""
    sigmas = comfy.sigmas(name, nfe)
    denoiser = ComfyDenoiser(eps_fn, comfy.model_sampling)
    x = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    final = comfy.sampler(name)(denoiser, x, sigmas.clone(), extra_args={}, callback=None, disable=True)
    last_sigma = float(sigmas[-1])
    if name == "uni_pc" and last_sigma == 0.0:
        last_sigma = COMFY_UNI_PC_LAST_SIGMA
    return SamplerRun(final, endpoint_from_sigma(last_sigma, variance_exploding=True), denoiser.calls)


def comfy_rows(comfy: ComfyEnvironment, work: Workload, eps_fn: Optional[EpsFn] = None, suffix: str = "", family: str = "comfyui") -> List[Row]:
    """ComfyUI's samplers on ``eps_fn`` (default: the workload's analytic model), against the analytic model's exact ODE."""
    eps_fn = eps_fn or analytic_eps(work.model)
    rows = []
    for name in COMFY_SAMPLERS:
        row = Row(f"ComfyUI {name}{suffix}", family, f"'{comfy.scheduler}' sigmas, steps = NFE")
        for nfe in work.nfes:
            run = run_comfy_sampler(comfy, name, eps_fn, work.held_out.noise.float(), nfe)
            row.record(nfe, run, nfe, work.held_out.endpoint, work.model)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ student
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
        from .reflow import load_student
    except ImportError as error:
        return None, None, f"perflow_core.lab.reflow.load_student unavailable ({error})"
    model, settings = load_student(path)
    return model, settings, f"student from {path}"


def teacher_smoothing_or_default(path: Path, default: float) -> Tuple[float, str]:
    """The teacher smoothing recorded in the student file's training metadata, else ``default``."""
    from .reflow import student_smoothing as recorded_smoothing

    try:
        return recorded_smoothing(path), "read from the file's training metadata"
    except ValueError:
        return default, "not recorded in the file; assumed (--student-smoothing)"


def student_rows(student: torch.nn.Module, settings: PerflowSettings, work: Workload, teacher_result: ModelResult, comfy: Optional[ComfyEnvironment] = None) -> Tuple[List[Row], List[str]]:
    """The student at theta = 0, calibrated per NFE, with its stored theta, and under the diffusers peers,
    all against the exact ODE of its teacher, beside the best peer on the teacher itself."""
    zero_settings = dataclasses.replace(settings, theta=None)
    zero = Row(STUDENT_THETA_ZERO, "student", f"{settings.prediction_type}, K={settings.segments}, NFE = steps", "none")
    calibrated = Row(STUDENT_CALIBRATED, "student", "theta fitted per NFE on the fit seeds", "its teacher's exact ODE at window ends")
    stored = Row(STUDENT_STORED, "student", "the theta stored in the file, at every NFE", "stored in the file")
    reference, noise = work.held_out.endpoint, work.held_out.noise.float()
    usable = [nfe for nfe in work.nfes if nfe >= settings.segments]
    for nfe in usable:
        zero.record(nfe, run_perflow(student, zero_settings, noise, nfe), nfe, reference, work.model)
        plan = StudentPlan.build(zero_settings, nfe, work.model.alphas_cumprod)
        theta = _calibrate(student, nfe, work, exact_ode_teacher(plan, [work.fit, work.held_out]), zero_settings).theta
        calibrated.theta[nfe] = theta.tolist()
        calibrated.record(nfe, run_perflow(student, dataclasses.replace(settings, theta=theta), noise, nfe), nfe, reference, work.model)
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
    plan = StudentPlan.build(dataclasses.replace(settings, theta=None), settings.segments, work.model.alphas_cumprod)
    states, lines = work.held_out.states, []
    for timestep, window in zip(plan.timesteps, plan.windows):
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


class StudentEpsModel(ModelWrapper):
    """A PeRFlow student read as an eps model, so any diffusers solver can sample it.

    At ``(z, t)`` the student predicts its window's straight line; the line's two ends ``z_s``, ``z_e`` are put
    on one deterministic DDIM trajectory, ``z = sqrt(a) x0 + sqrt(1 - a) eps`` with the same x0 and eps
    (`perflow_core.parameterization.clean_estimate` solves it for x0), and that eps is returned. Timesteps are PeRFlow's (use
    ``CountingModel(..., timestep_offset=1)`` under a diffusers scheduler).
    """

    def __init__(self, student: torch.nn.Module, settings: PerflowSettings):
        super().__init__(student)
        self.prediction_type = settings.prediction_type
        self.segments = settings.build_segments()
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps=settings.num_train_timesteps)

    def forward(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> Any:
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        window = self.segments.window(t, t, self.alphas_cumprod)
        velocity, _ = velocity_and_window_end(self.prediction_type, self.model(sample, t).sample, sample, window)
        x0 = clean_estimate(sample, velocity, window)
        z_start = sample + (window.t_start - window.t) * velocity
        eps = (z_start - math.sqrt(window.alpha_start) * x0) / math.sqrt(1 - window.alpha_start)
        return SimpleNamespace(sample=eps)


# ------------------------------------------------------------------------------------------ timing
def interleaved_medians(tasks: Dict[str, Callable[[], Any]], repeats: int) -> Dict[str, float]:
    """Median wall time of each task, run in turn ``repeats`` times after one warm-up each."""
    for task in tasks.values():
        task()
    times: Dict[str, List[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, task in tasks.items():
            started = time.perf_counter()
            task()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


@dataclass
class Overhead:
    """Time per step of two samplers at equal NFE, measured side by side."""

    setting: str
    nfe: int
    ours: str
    theirs: str
    ours_seconds_per_step: float
    theirs_seconds_per_step: float

    @property
    def ratio(self) -> float:
        return self.ours_seconds_per_step / max(self.theirs_seconds_per_step, 1e-12)


def euler_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(**SD15_SCHEDULE, timestep_spacing="trailing")


def scheduler_overheads(model: torch.nn.Module, noise: torch.Tensor, label: str, nfes: Sequence[int], repeats: int, timestep_offset: float) -> List[Overhead]:
    """PerflowScheduler vs EulerDiscreteScheduler in the same pipeline on ``model``."""
    results = []
    for nfe in nfes:
        tasks = {
            "perflow": lambda: run_pipeline(CountingModel(model), PerflowScheduler(segments=perflow_segments_for(nfe)), noise, nfe),
            "euler": lambda: run_pipeline(CountingModel(model, timestep_offset), euler_scheduler(), noise, nfe),
        }
        medians = interleaved_medians(tasks, repeats)
        results.append(Overhead(label, nfe, "PerflowScheduler", "EulerDiscreteScheduler", medians["perflow"] / nfe, medians["euler"] / nfe))
    return results


def tiny_unet() -> torch.nn.Module:
    """A small random-weight ``UNet2DModel`` (32x32x3, two levels) standing in for a real network."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    return unet.eval()


def comfy_overheads(comfy: ComfyEnvironment, model: AnalyticDigitsDenoiser, noise: torch.Tensor, nfes: Sequence[int], repeats: int) -> List[Overhead]:
    """ComfyUI's sample_euler vs our sample_perflow, both on the same ComfyUI-style stand-in model."""
    from ..k_sampling import ModelSpace, perflow_sigmas, sample_perflow

    denoiser = ComfyDenoiser(analytic_eps(model), comfy.model_sampling)
    space = ModelSpace.of(comfy.model_sampling)
    results = []
    for nfe in nfes:
        settings = perflow_settings(nfe)
        ours, theirs = perflow_sigmas(space, settings, nfe), comfy.sigmas("euler", nfe)
        x = noise * math.sqrt(1.0 + float(theirs[0]) ** 2)
        tasks = {
            "perflow": lambda: sample_perflow(denoiser, x, ours, disable=True, settings=settings),
            "euler": lambda: comfy.sampling.sample_euler(denoiser, x, theirs, disable=True),
        }
        medians = interleaved_medians(tasks, repeats)
        results.append(Overhead("ComfyUI convention, analytic model, batch %d" % len(noise), nfe, "sample_perflow", "ComfyUI sample_euler", medians["perflow"] / nfe, medians["euler"] / nfe))
    return results


def measure_overheads(model: AnalyticDigitsDenoiser, noise: torch.Tensor, comfy: Optional[ComfyEnvironment], quick: bool) -> List[Overhead]:
    """Every side-by-side timing of the report."""
    repeats, nfes = (3, (4,)) if quick else (21, (4, 8))
    batch = len(noise)
    results = scheduler_overheads(model, noise, f"analytic model, batch {batch}", nfes, repeats, 1.0)
    free = ConstantOutputModel(0.1 * noise, model.config)
    # A loop with a free network takes about a millisecond: many more repetitions keep its median steady.
    results += scheduler_overheads(free, noise, f"scheduler only (free constant 'network'), batch {batch}", nfes, repeats * FREE_MODEL_REPEAT_FACTOR, 0.0)
    unet = tiny_unet()
    unet_noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        results += scheduler_overheads(unet, unet_noise, "tiny UNet2DModel (32x32x3), batch 4", nfes, repeats, 0.0)
    if comfy is not None:
        results += comfy_overheads(comfy, model, noise, nfes, repeats)
    return results


# ------------------------------------------------------------------------------------------ ratios
@dataclass
class Ratio:
    """A required ratio, its target and whether it is met."""

    name: str
    value: Optional[float]
    target: float
    inclusive: bool
    endpoint_map: str

    @property
    def met(self) -> Optional[bool]:
        if self.value is None:
            return None
        return self.value <= self.target if self.inclusive else self.value < self.target

    def line(self) -> str:
        sign = "<=" if self.inclusive else "<"
        if self.value is None:
            return f"{self.name} = n/a (target {sign} {self.target:g}): not measured"
        return f"{self.name} = {self.value:.3f} (target {sign} {self.target:g}): {'met' if self.met else 'NOT met'}"


def _divide(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def required_ratios(analytic: Sequence[ModelResult], student: Optional[ModelResult], endpoint_map: str) -> List[Ratio]:
    """The ratios the brief asks for, at both smoothings, for both calibration teachers."""
    ratios = []
    for result in analytic:
        zero = result.row(THETA_ZERO)
        peer4, peer8 = result.best_peer(4, endpoint_map), result.best_peer(8, endpoint_map)
        tag = f"s={result.smoothing:g}"
        for calibrated_name, short in ((CALIBRATED_PERFLOW_TEACHER, "cal[8x]"), (CALIBRATED_EXACT_TEACHER, "cal[exact]")):
            calibrated = result.row(calibrated_name)
            c4 = calibrated.error(4, endpoint_map) if calibrated else None
            ratios.append(Ratio(f"{tag} {short}@4 / theta=0@4", _divide(c4, zero.error(4, endpoint_map) if zero else None), TARGETS["theta"], True, endpoint_map))
            ratios.append(Ratio(f"{tag} {short}@4 / best peer@4 ({_name(peer4)})", _divide(c4, peer4.error(4, endpoint_map) if peer4 else None), TARGETS["peer_same_nfe"], False, endpoint_map))
            ratios.append(Ratio(f"{tag} {short}@4 / best peer@8 ({_name(peer8)})", _divide(c4, peer8.error(8, endpoint_map) if peer8 else None), TARGETS["peer_8"], False, endpoint_map))
    if student is not None:
        best = student.row(BEST_PEER_ON_TEACHER)
        for row in (student.row(STUDENT_THETA_ZERO), student.row(STUDENT_CALIBRATED), student.row(STUDENT_STORED)):
            if row is not None and best is not None:
                peer = best.best_of.get(8, "n/a")
                ratios.append(Ratio(f"student s={student.smoothing:g} {row.sampler}@4 / best peer on teacher@8 ({peer})", _divide(row.error(4, endpoint_map), best.error(8, endpoint_map)), TARGETS["student"], False, endpoint_map))
    return ratios


def _name(row: Optional[Row]) -> str:
    return row.sampler if row is not None else "none"


# ------------------------------------------------------------------------------------------ report
def format_table(result: ModelResult, nfes: Sequence[int], endpoint_map: str, samples: int) -> str:
    """Rows: sampler; columns: NFE; cells: RMSE to the exact ODE solution at sigma 0."""
    width = max(len(r.sampler) for r in result.rows) + 2
    header = f"{'sampler':<{width}}" + "".join(f"{'NFE ' + str(n):>11}" for n in nfes)
    lines = [f"== {result.title}: RMSE to the exact ODE solution at sigma 0 ({samples} held-out seeds, endpoint map: {endpoint_map}) ==", header]
    other_map = next(m for m in ENDPOINT_MAPS if m != endpoint_map)
    for row in result.rows:
        lines.append(f"{row.sampler:<{width}}" + "".join(f"{_cell(row.error(n, endpoint_map)):>11}" for n in nfes))
        if row.is_mapped:
            lines.append(f"{'  ' + other_map + ' map':<{width}}" + "".join(f"{_cell(row.error(n, other_map)):>11}" for n in nfes))
    best = result.row(BEST_PEER_ON_TEACHER)
    if best is not None:
        lines.append(f"{'  (best peer)':<{width}}" + "".join(f"{_short(best.best_of.get(n, '')):>11}" for n in nfes))
    lines += [f"  note: {note}" for note in result.notes]
    return "\n".join(lines)


def _cell(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3e}"


def _short(name: str) -> str:
    return name.replace("diffusers ", "d:").replace("ComfyUI ", "c:")[:10]


def sampler_notes(results: Sequence[ModelResult], nfes: Sequence[int]) -> List[str]:
    """How NFE maps to steps and where each sampler ends (each sampler once, from its first table)."""
    lines = ["== samplers: steps, network calls and final state (mapped to sigma 0 when short of it) =="]
    rows = {row.sampler: row for result in reversed(results) for row in result.rows if row.family != "reference"}
    for row in sorted(rows.values(), key=lambda r: _first_position(results, r.sampler)):
        steps = ", ".join(f"{n}:{row.steps.get(n, '-')}/{row.calls.get(n, '-')}" for n in nfes)
        endpoint = sorted(set(row.endpoints.values()))
        teacher = f"; teacher: {row.teacher}" if row.teacher and row.teacher != "none" else ""
        lines.append(f"{row.sampler}: {row.note}{teacher}; NFE:steps/calls {steps}; ends: {' | '.join(endpoint)}")
    return lines


def _first_position(results: Sequence[ModelResult], sampler: str) -> Tuple[int, int]:
    return next((i, j) for i, result in enumerate(results) for j, row in enumerate(result.rows) if row.sampler == sampler)


def overhead_lines(overheads: Sequence[Overhead]) -> List[str]:
    lines = ["== sampler overhead: time per step, side by side (interleaved repetitions, median) =="]
    for o in overheads:
        lines.append(
            f"{o.setting}, NFE {o.nfe}: {o.ours} {o.ours_seconds_per_step * 1e3:.3f} ms/step, {o.theirs} "
            f"{o.theirs_seconds_per_step * 1e3:.3f} ms/step, ratio {o.ratio:.2f}"
        )
    return lines


def cost_lines(costs: Sequence[CalibrationCost]) -> List[str]:
    lines = ["== calibration cost: calibrate_theta wall time / its teacher sampling time (fit + held-out seeds) =="]
    for c in costs:
        lines.append(f"{c.model}, NFE {c.nfe} ({c.teacher}): total {c.total_seconds:.2f} s, teacher {c.teacher_seconds:.2f} s, ratio {c.ratio:.2f}")
    return lines


# ------------------------------------------------------------------------------------------ plot
PALETTE = [
    (0, 0, 0), (214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 0, 0), (0, 100, 0),
    (255, 0, 255), (70, 130, 180), (210, 105, 30), (95, 158, 160),
]
PANEL_W, PANEL_H, MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 520, 410, 70, 20, 50, 50


def plot_results(results: Sequence[ModelResult], nfes: Sequence[int], endpoint_map: str, path: Path) -> None:
    """One panel per model: RMSE vs NFE, log-scale y, a line per sampler, a shared legend below."""
    names = list(dict.fromkeys(_colour_key(r.sampler) for result in results for r in result.rows))
    colours = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}
    legend_rows = math.ceil(len(names) / 3)
    image = Image.new("RGB", (PANEL_W * len(results), PANEL_H + 20 + 18 * legend_rows), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    values = [v for result in results for r in result.rows for v in (r.error(n, endpoint_map) for n in nfes) if v and v > 0]
    low, high = (math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))) if values else (-4, 0)
    high = max(high, low + 1)
    for index, result in enumerate(results):
        _draw_panel(draw, font, index * PANEL_W, result, nfes, endpoint_map, (low, high), colours)
    _draw_legend(draw, font, PANEL_H + 10, names, colours, image.width)
    image.save(path)


def _font() -> Any:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _draw_panel(draw: ImageDraw.ImageDraw, font: Any, left: int, result: ModelResult, nfes: Sequence[int], endpoint_map: str, decades: Tuple[int, int], colours: Dict[str, Tuple[int, int, int]]) -> None:
    box = (left + MARGIN_L, MARGIN_T, left + PANEL_W - MARGIN_R, PANEL_H - MARGIN_B)
    draw.rectangle(box, outline="black")
    draw.text((box[0], 8), result.title, fill="black", font=font)
    to_x = _axis(math.log2(min(nfes)), math.log2(max(nfes)), box[0] + 10, box[2] - 10)
    to_y = _axis(decades[1], decades[0], box[1], box[3])
    for decade in range(decades[0], decades[1] + 1):
        y = to_y(decade)
        draw.line((box[0], y, box[2], y), fill=(225, 225, 225))
        draw.text((box[0] - 48, y - 7), f"1e{decade}", fill="black", font=font)
        for minor in (2, 5):
            if decade + math.log10(minor) < decades[1]:
                minor_y = to_y(decade + math.log10(minor))
                draw.line((box[0], minor_y, box[0] + 5, minor_y), fill="black")
    for nfe in nfes:
        x = to_x(math.log2(nfe))
        draw.line((x, box[3], x, box[3] + 5), fill="black")
        draw.text((x - 6, box[3] + 8), str(nfe), fill="black", font=font)
    draw.text(((box[0] + box[2]) // 2 - 40, box[3] + 26), "NFE (network calls)", fill="black", font=font)
    draw.text((box[0], 26), f"RMSE to the exact sigma-0 solution, log scale ({endpoint_map} map)", fill="black", font=font)
    for row in result.rows:
        points = [(to_x(math.log2(n)), to_y(math.log10(v))) for n in nfes if (v := row.error(n, endpoint_map))]
        width = 3 if row.family in ("perflow", "student") else 1
        if len(points) > 1:
            draw.line(points, fill=colours[_colour_key(row.sampler)], width=width)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colours[_colour_key(row.sampler)])


def _colour_key(sampler: str) -> str:
    """A peer run on the student takes its own colour (the student's panel shows no peer on the teacher)."""
    return sampler.removesuffix(STUDENT_PEER_SUFFIX)


def _axis(value_low: float, value_high: float, pixel_low: float, pixel_high: float) -> Callable[[float], float]:
    scale = (pixel_high - pixel_low) / (value_high - value_low)
    return lambda value: pixel_low + (value - value_low) * scale


def _draw_legend(draw: ImageDraw.ImageDraw, font: Any, top: int, names: Sequence[str], colours: Dict[str, Tuple[int, int, int]], width: int) -> None:
    column = width // 3
    for i, name in enumerate(names):
        x, y = (i % 3) * column + 20, top + (i // 3) * 18
        draw.line((x, y + 7, x + 24, y + 7), fill=colours[name], width=3)
        draw.text((x + 30, y), name, fill="black", font=font)


# ------------------------------------------------------------------------------------------ main
def parse_seeds(text: str, first: int) -> List[int]:
    """``N`` (N seeds from ``first``) or ``A:B`` (seeds A..B-1)."""
    if ":" in text:
        start, stop = (int(part) for part in text.split(":", 1))
        seeds = list(range(start, stop))
    else:
        seeds = list(range(first, first + int(text)))
    if not seeds:
        raise ValueError(f"no seeds in {text!r}")
    return seeds


def build_parser(prog: str = "python -m perflow_core.lab.benchmark") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Error vs NFE of PeRFlow and its peers on the analytic digits model.")
    parser.add_argument("--quick", action="store_true", help=f"smoke test: NFE {QUICK_NFES}, {QUICK_HELD_OUT_COUNT} held-out / {QUICK_FIT_COUNT} fit seeds, few timing repeats")
    parser.add_argument("--output-dir", default="outputs/benchmark", help="where benchmark.json and benchmark.png go")
    parser.add_argument("--seeds", default=None, help=f"held-out seeds: N (from {HELD_OUT_FIRST_SEED}) or A:B (default {HELD_OUT_COUNT})")
    parser.add_argument("--fit-seeds", default=None, help=f"calibration fit seeds: N (from {FIT_FIRST_SEED}) or A:B (default {FIT_COUNT})")
    parser.add_argument("--endpoint-map", choices=ENDPOINT_MAPS, default="ode", help="how states short of sigma 0 are carried there for the tables (both go to the JSON)")
    parser.add_argument("--comfy-scheduler", choices=("simple", "karras"), default="simple", help="ComfyUI sigma schedule")
    parser.add_argument("--student", default=str(STUDENT_PATH), help="trained PeRFlow student (.safetensors)")
    parser.add_argument("--student-smoothing", type=float, default=0.05, help="its teacher's smoothing when the file does not record it")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable timings on shared cores)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    except ValueError as error:
        print(f"benchmark: error: {error}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> int:
    """Measure everything, print the report and write the JSON and the plot."""
    started = time.perf_counter()
    nfes = QUICK_NFES if args.quick else NFES
    held_out = parse_seeds(args.seeds or str(QUICK_HELD_OUT_COUNT if args.quick else HELD_OUT_COUNT), HELD_OUT_FIRST_SEED)
    fit = parse_seeds(args.fit_seeds or str(QUICK_FIT_COUNT if args.quick else FIT_COUNT), FIT_FIRST_SEED)
    if set(held_out) & set(fit):
        raise ValueError("--seeds and --fit-seeds overlap; calibration must be measured on seeds it was not fitted on")
    comfy, comfy_status = load_comfy(args.comfy_scheduler)
    costs: List[CalibrationCost] = []
    workloads: Dict[float, Workload] = {}
    results = []
    for smoothing in SMOOTHINGS:
        workloads[smoothing] = build_workload(smoothing, held_out, fit, nfes)
        results.append(analytic_result(workloads[smoothing], comfy, costs))
    student_result, student_status = student_section(Path(args.student), args.student_smoothing, held_out, fit, nfes, workloads, results, comfy, costs)
    overheads = measure_overheads(workloads[SMOOTHINGS[0]].model, workloads[SMOOTHINGS[0]].held_out.noise.float(), comfy, args.quick)
    tables = results + ([student_result] if student_result else [])
    ratios = {m: required_ratios(results, student_result, m) for m in ENDPOINT_MAPS}
    report = compose_report(args, tables, nfes, len(held_out), ratios, overheads, costs, workloads, comfy_status, student_status)
    print(report)
    seconds = time.perf_counter() - started
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    payload = json_payload(args, tables, nfes, held_out, fit, ratios, overheads, costs, workloads, comfy_status, student_status, seconds)
    (output / "benchmark.json").write_text(json.dumps(payload, indent=2))
    plot_results(tables, nfes, args.endpoint_map, output / "benchmark.png")
    print(f"wrote {output / 'benchmark.json'} and {output / 'benchmark.png'}; total time {seconds:.1f} s")
    return 0


def build_workload(smoothing: float, held_out: Sequence[int], fit: Sequence[int], nfes: Sequence[int], extra_levels: Sequence[float] = ()) -> Workload:
    """The analytic model at ``smoothing`` and the exact ODE paths of the held-out and fit noise, with states at
    every PeRFlow window boundary the analytic rows use and at ``extra_levels``."""
    model = AnalyticDigitsDenoiser(smoothing=smoothing)
    levels = boundary_levels(model.alphas_cumprod, sorted({perflow_segments_for(n) for n in nfes})) + list(extra_levels)
    return Workload(model, exact_path(model, noise_for_seeds(held_out), levels), exact_path(model, noise_for_seeds(fit), levels), nfes)


def analytic_result(work: Workload, comfy: Optional[ComfyEnvironment], costs: List[CalibrationCost]) -> ModelResult:
    smoothing = work.model.config.smoothing
    title = f"analytic digits, smoothing {smoothing:g}"
    rows = perflow_rows(work, title, costs) + diffusers_rows(work)
    if comfy is not None:
        rows += comfy_rows(comfy, work)
    return ModelResult(title, smoothing, rows, endpoint_floor_notes(work))


def endpoint_floor_notes(work: Workload) -> List[str]:
    """How far the exact state at ``alphas_cumprod[0]`` is from the sigma-0 solution, unmapped and x0-mapped."""
    alpha = float(work.model.alphas_cumprod[0])
    state = work.held_out.states[alpha]
    x0 = map_to_sigma_zero(work.model, state, Endpoint(alpha), "x0")
    ode = map_to_sigma_zero(work.model, state, Endpoint(alpha), "ode")
    return [
        f"the exact state at alphas_cumprod[0] is {rmse(state, work.held_out.endpoint):.2e} from the sigma-0 solution unmapped, "
        f"{rmse(x0, work.held_out.endpoint):.2e} after the x0-prediction map, {rmse(ode, work.held_out.endpoint):.1e} after the ODE map"
    ]


def student_levels(settings: PerflowSettings, nfes: Sequence[int]) -> List[float]:
    """The signal levels of every window boundary a student's PeRFlow runs and calibrations need."""
    alphas = alphas_cumprod_for(num_train_timesteps=settings.num_train_timesteps)
    plans = [StudentPlan.build(settings, nfe, alphas) for nfe in nfes if nfe >= settings.segments]
    return sorted({level for plan in plans for w in plan.windows for level in (w.alpha_start, w.alpha_end)})


def _with_levels(work: Workload, levels: Sequence[float], held_out: Sequence[int], fit: Sequence[int]) -> Workload:
    """``work``, or the same workload solved again with states at ``levels`` too if it lacks some."""
    if set(levels) <= set(work.held_out.states):
        return work
    return build_workload(work.model.config.smoothing, held_out, fit, work.nfes, levels)


def student_section(path: Path, default_smoothing: float, held_out: Sequence[int], fit: Sequence[int], nfes: Sequence[int], workloads: Dict[float, Workload], results: Sequence[ModelResult], comfy: Optional[ComfyEnvironment], costs: List[CalibrationCost]) -> Tuple[Optional[ModelResult], str]:
    """The student's table, or None and the note saying why it was skipped."""
    student, settings, status = load_student_model(path)
    if student is None or settings is None:
        return None, f"student rows skipped: {status}"
    smoothing, how = teacher_smoothing_or_default(path, default_smoothing)
    teacher_result = next((r for r in results if r.smoothing == smoothing), None)
    if teacher_result is None:
        workloads[smoothing] = build_workload(smoothing, held_out, fit, nfes)
        teacher_result = analytic_result(workloads[smoothing], comfy, [])
    title = f"PeRFlow student vs its teacher (analytic, smoothing {smoothing:g})"
    work = _with_levels(workloads[smoothing], student_levels(settings, nfes), held_out, fit)
    rows, notes = student_rows(student, settings, work, teacher_result, comfy)
    notes += student_window_errors(student, settings, work)
    return ModelResult(title, smoothing, rows, notes + [f"teacher smoothing {how}"]), status


def compose_report(args: argparse.Namespace, tables: Sequence[ModelResult], nfes: Sequence[int], samples: int, ratios: Dict[str, List[Ratio]], overheads: Sequence[Overhead], costs: Sequence[CalibrationCost], workloads: Dict[float, Workload], comfy_status: str, student_status: str) -> str:
    lines: List[str] = [f"torch threads: {torch.get_num_threads()}; ComfyUI samplers: {comfy_status}; {student_status}", ""]
    for table in tables:
        lines += [format_table(table, nfes, args.endpoint_map, samples), ""]
    for endpoint_map in (args.endpoint_map,) + tuple(m for m in ENDPOINT_MAPS if m != args.endpoint_map):
        lines.append(f"== required ratios (endpoint map: {endpoint_map}) ==")
        lines += [ratio.line() for ratio in ratios[endpoint_map]] + [""]
    lines += sampler_notes(tables, nfes) + [""]
    lines += overhead_lines(overheads) + [""] + cost_lines(costs)
    exact_seconds = sum(w.held_out.seconds + w.fit.seconds for w in workloads.values())
    lines.append(f"exact ODE paths (reference and exact-ODE teacher), all models: {exact_seconds:.1f} s")
    return "\n".join(lines)


def json_payload(args: argparse.Namespace, tables: Sequence[ModelResult], nfes: Sequence[int], held_out: Sequence[int], fit: Sequence[int], ratios: Dict[str, List[Ratio]], overheads: Sequence[Overhead], costs: Sequence[CalibrationCost], workloads: Dict[float, Workload], comfy_status: str, student_status: str, seconds: float) -> Dict[str, Any]:
    return {
        "config": {
            "nfes": list(nfes),
            "smoothings": list(SMOOTHINGS),
            "held_out_seeds": [held_out[0], held_out[-1] + 1, len(held_out)],
            "fit_seeds": [fit[0], fit[-1] + 1, len(fit)],
            "endpoint_map": args.endpoint_map,
            "teacher_multiplier": TEACHER_MULTIPLIER,
            "threads": torch.get_num_threads(),
            "quick": bool(args.quick),
            "comfyui": comfy_status,
            "student": student_status,
        },
        "models": [
            {"title": t.title, "smoothing": t.smoothing, "notes": t.notes, "rows": [r.as_json() for r in t.rows]} for t in tables
        ],
        "ratios": {m: [{"name": r.name, "value": r.value, "target": r.target, "inclusive": r.inclusive, "met": r.met} for r in rs] for m, rs in ratios.items()},
        "overhead": [{"setting": o.setting, "nfe": o.nfe, "ours": o.ours, "theirs": o.theirs, "ours_seconds_per_step": o.ours_seconds_per_step, "theirs_seconds_per_step": o.theirs_seconds_per_step, "ratio": o.ratio} for o in overheads],
        "calibration_cost": [{"model": c.model, "nfe": c.nfe, "teacher": c.teacher, "total_seconds": c.total_seconds, "teacher_seconds": c.teacher_seconds, "ratio": c.ratio} for c in costs],
        "exact_ode_seconds": sum(w.held_out.seconds + w.fit.seconds for w in workloads.values()),
        "seconds": seconds,
    }


if __name__ == "__main__":
    sys.exit(main())
