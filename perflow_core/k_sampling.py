"""PeRFlow as a k-diffusion style sampling function, for ComfyUI's ``KSAMPLER`` (no ComfyUI import).

ComfyUI samples in its model's own space: for EPS and V-prediction models ``x = x0 + sigma * noise``
(variance exploding) and the model returns the denoised x0 after CFG; for flow (CONST) models
``x = sigma * noise + (1 - sigma) * x0``. PeRFlow's path lives in the variance-preserving space
``z = x / sqrt(1 + sigma^2)`` of the original scheduler, with the raw network output. ``ModelSpace.frame``
relates them at each sigma; the loop is ``perflow_core.sampling.run_plan``, the same steps as the diffusers
scheduler's, with their coefficients rewritten once for ComfyUI's ``x`` and denoised x0 (``solver.Frame``), so
no conversion costs an operation per step.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import trange

from .parameterization import path_noise_scales
from .sampling import SamplingPlan, StepRecord, run_plan
from .segments import BOUNDARY_TOLERANCE
from .settings import PerflowSettings
from .solver import Frame


MODEL_KINDS = ("eps", "v", "flow")
FLOW_TIMESTEPS = 1000
# A sigma within this (relative) of a training sigma is that training sigma (float32 and float16 rounding; neighbouring
# training sigmas are 0.3% or more apart); one further off is refused (`off_grid_error`).
_SNAP_TOLERANCE = 1e-3


@dataclass
class ModelSpace:
    """How a ComfyUI model's sampling space maps onto PeRFlow's time and variables.

    Args:
        kind: ``eps`` or ``v`` (discrete variance-exploding sigmas, one per training timestep) or
            ``flow`` (CONST: ``t = sigma``).
        sigmas: the discrete model's training sigmas, ``[T]`` (``sigmas[j]`` is timestep ``j + 1`` in
            PeRFlow's convention); unused for ``flow``.
        num_train_timesteps: T (the flow models' timestep multiplier).
    """

    kind: str
    sigmas: Optional[torch.Tensor] = None
    num_train_timesteps: int = 1000

    @classmethod
    def of(cls, model_sampling: Any) -> "ModelSpace":
        """Read a ComfyUI ``model_sampling`` object by duck typing (its class names and tables)."""
        names = {c.__name__ for c in type(model_sampling).__mro__}
        if "CONST" in names:
            # PeRFlow time is the flow's sigma; its grid is counted in 1000 steps whatever the model's timestep
            # multiplier (1000 for SD3/Flux, 1.0 for AuraFlow, Lumina2, ...): ComfyUI applies the multiplier itself.
            return cls("flow", None, FLOW_TIMESTEPS)
        kind = "v" if "V_PREDICTION" in names else "eps" if "EPS" in names else None
        if kind is None or "ModelSamplingDiscrete" not in names:
            raise ValueError(
                f"PeRFlow samples models with discrete EPS or V-prediction sampling, or flow (CONST) models; "
                f"this model samples with {type(model_sampling).__name__} ({', '.join(sorted(names - {'object', 'Module'}))})"
            )
        sigmas = model_sampling.sigmas.detach().double().cpu()
        return cls(kind, sigmas, len(sigmas))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """``alphas_cumprod`` of the training schedule (for flow: the VP level of ``sigma * n + (1 - sigma) x0``)."""
        if self.kind == "flow":
            t = torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float64) / self.num_train_timesteps
            return (1 - t) ** 2 / ((1 - t) ** 2 + t**2)
        return 1 / (1 + self.sigmas**2)

    def fingerprint(self) -> Optional[bytes]:
        """The training sigmas' bytes: equal exactly when two spaces place every sigma alike (None for flow)."""
        return None if self.sigmas is None else self.sigmas.numpy().tobytes()

    def timestep_of(self, sigma: float) -> float:
        """PeRFlow's model timestep for a ComfyUI sigma (training timestep ``j + 1`` for ``sigmas[j]``)."""
        return self.timesteps_of([sigma])[0]

    def timesteps_of(self, sigmas: Sequence[float]) -> List[float]:
        """`timestep_of` for every sigma of a schedule, in one search over the training sigmas."""
        if self.kind == "flow":
            return [sigma * self.num_train_timesteps if sigma > 0 else 0.0 for sigma in sigmas]
        positive = [sigma for sigma in sigmas if sigma > 0]
        found = iter(self._training_timesteps(positive))
        return [float(next(found)) if sigma > 0 else 0.0 for sigma in sigmas]

    def _training_timesteps(self, sigmas: List[float]) -> List[int]:
        """The training timestep (``j + 1``) whose sigma is nearest in log to each sigma; a far one is refused (`off_grid_error`)."""
        if not sigmas:
            return []
        targets = torch.tensor([math.log(sigma) for sigma in sigmas], dtype=torch.float64)
        nearest = (self.sigmas.log()[None, :] - targets[:, None]).abs().argmin(dim=1)
        indices = nearest.tolist()
        for sigma, index, training_sigma in zip(sigmas, indices, self.sigmas[nearest].tolist()):
            if abs(training_sigma / sigma - 1) > _SNAP_TOLERANCE:
                raise off_grid_error(sigma, training_sigma, index + 1)
        return [index + 1 for index in indices]

    def sigma_of(self, timestep: float) -> float:
        if timestep <= 0:
            return 0.0
        if self.kind == "flow":
            return timestep / self.num_train_timesteps
        return float(self.sigmas[int(timestep) - 1])

    def frame(self, sigma: float) -> Frame:
        """ComfyUI's sampling at ``sigma`` as a `Frame` of PeRFlow's: the latent ``x = sqrt(1 + sigma^2) z`` (flow:
        ``x = z``) and the denoised x0 ``d`` the wrapped model returns, from which the raw network output is
        ``(x - d) / sigma`` (V-prediction: ``x * factor - weight * d``; CFG mixes outputs linearly, so this holds after
        CFG too)."""
        if sigma <= 0:
            return Frame()
        scale = 1.0 if self.kind == "flow" else math.sqrt(1 + sigma**2)
        if self.kind == "v":
            weight = math.sqrt(sigma**2 + 1) / sigma
            return Frame(scale, weight / (sigma**2 + 1), -weight)
        return Frame(scale, 1 / sigma, -1 / sigma)

    def call(self, model: Callable[..., torch.Tensor], z: torch.Tensor, timestep: float, extra_args: Dict[str, Any]):
        """ComfyUI's wrapped ``model`` at PeRFlow's ``(z, timestep)``: ``(denoised, raw network output)``."""
        sigma = self.sigma_of(timestep)
        frame = self.frame(sigma)
        x = z * frame.scale
        denoised = model(x, z.new_full((z.shape[0],), sigma), **extra_args)
        return denoised, frame.raw_output(x, denoised)


def off_grid_error(sigma: float, nearest: float, timestep: int) -> ValueError:
    return ValueError(
        f"sigmas: {sigma:.5g} is not one of the model's training sigmas (the nearest is {nearest:.5g}, timestep {timestep}); "
        "PeRFlow steps from training timestep to training timestep: use the PeRFlow Scheduler's sigmas, or a schedule "
        "of training sigmas whose steps land on the segment boundaries (of the stock schedulers: simple at 4 or 8 steps "
        "for K = 4; karras, exponential and kl_optimal give other sigmas)"
    )


def model_sampling_of(model: Any) -> Any:
    """The model_sampling object behind the ``model`` a KSAMPLER function receives."""
    try:
        return model.inner_model.inner_model.model_sampling
    except AttributeError:
        raise ValueError("PeRFlow could not find the model's sampling settings (model.inner_model.inner_model.model_sampling)") from None


def sampling_timesteps(space: ModelSpace, sigmas: torch.Tensor) -> List[float]:
    """PeRFlow timesteps for a sigma schedule; they must strictly decrease."""
    timesteps = space.timesteps_of(sigmas.tolist())
    if any(later >= earlier for earlier, later in zip(timesteps, timesteps[1:])):
        raise ValueError(f"sigmas must map to strictly decreasing timesteps; these give {timesteps}")
    return timesteps


def start_in_frame(model: Any, x: torch.Tensor, space: ModelSpace, settings: PerflowSettings, step: Any, scale: float) -> torch.Tensor:
    """The first sample, in ComfyUI's frame (``x = scale * z``).

    ComfyUI's noised latent, read in PeRFlow's space, is the original's start: pure noise for txt2img, and for
    img2img the DDPM marginal at the start's timestep, the original's ``add_noise``. Only with
    ``img2img_start="straight_path"`` is a start inside a segment put on the segment's straight path (see
    ``path_noise_scales``), when ComfyUI's clean latent and noise are at hand.
    """
    latent, noise = getattr(model, "latent_image", None), getattr(model, "noise", None)
    inside_segment = step.t < step.t_start
    if settings.img2img_start != "straight_path" or space.kind == "flow" or not inside_segment or latent is None or noise is None:
        return x
    signal_scale, noise_scale = path_noise_scales(step)
    return (scale * signal_scale) * latent.to(x) + (scale * noise_scale) * noise.to(x)


@torch.no_grad()
def sample_perflow(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[Dict[str, Any]] = None,
    callback: Optional[Callable[[Dict[str, Any]], None]] = None,
    disable: Optional[bool] = None,
    settings: Optional[PerflowSettings] = None,
    space: Optional[ModelSpace] = None,
) -> torch.Tensor:
    """PeRFlow sampling in ComfyUI's k-diffusion calling convention.

    Args:
        model: ``model(x, sigma * ones[B], **extra_args) -> denoised`` (ComfyUI's wrapped model, CFG applied).
        x: the noised latent at ``sigmas[0]``, as ``KSAMPLER`` passes it.
        sigmas: the schedule, e.g. from the PeRFlow scheduler node; each sigma is read as the training
            timestep it belongs to.
        extra_args: passed through to the model unchanged.
        callback: called every step with ``x`` (the sample the model saw at ``sigma``, as k-diffusion's samplers
            pass it), ``i``, ``sigma``, ``sigma_hat`` and ``denoised`` (an x0 estimate) for the progress bar,
            previews and Cancel.
        disable: silences the console progress bar.
        settings: segments, theta and parameterisation (defaults: the original PeRFlow).
        space: the model's sampling space; read from the model when not given.
    """
    extra_args = {} if extra_args is None else extra_args
    settings = settings or PerflowSettings()
    space = space or ModelSpace.of(model_sampling_of(model))
    schedule = RunSchedule.of(space, settings, sigmas)
    if schedule is None:
        return x
    plan = schedule.plan
    batches = {t: x.new_full((x.shape[0],), schedule.sigma_at[t]) for t in plan.timesteps}

    def model_fn(x: torch.Tensor, timestep: float) -> torch.Tensor:
        return model(x, batches[timestep], **extra_args)

    def report(record: StepRecord) -> None:
        i = record.index
        sigma = sigmas[i]
        preview = record.output if space.kind == "flow" else record.result.pred_original_sample
        callback({"x": record.sample, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": preview})

    start = start_in_frame(model, x, space, settings, plan.steps[0], schedule.frames[0].scale)
    on_step = report if callback is not None else None
    return run_plan(model_fn, plan, start, indices=trange(len(plan), disable=disable), on_step=on_step, frames=schedule.frames)[0]


@dataclass(frozen=True)
class RunSchedule:
    """A sigma schedule read as PeRFlow's steps: the plan (its coefficients computed at the first run), every
    timestep's training sigma and ComfyUI's `Frame` at every timestep and at the end."""

    plan: SamplingPlan
    sigma_at: Dict[float, float]
    frames: Tuple[Frame, ...]

    @classmethod
    def of(cls, space: ModelSpace, settings: PerflowSettings, sigmas: torch.Tensor) -> Optional["RunSchedule"]:
        """The checked schedule (None: nothing to sample), kept for the next runs with the same model sigmas, settings
        and schedule (a queue of seeds or prompts), which then skip the search and the coefficients."""
        key = (space.kind, space.fingerprint(), settings, tuple(sigmas.tolist()))
        if key not in _SCHEDULES:
            _SCHEDULES[key] = cls._build(space, settings, sigmas)
            while len(_SCHEDULES) > _KEPT_SCHEDULES:
                _SCHEDULES.popitem(last=False)
        _SCHEDULES.move_to_end(key)
        return _SCHEDULES[key]

    @classmethod
    def _build(cls, space: ModelSpace, settings: PerflowSettings, sigmas: torch.Tensor) -> Optional["RunSchedule"]:
        check_num_train_timesteps(settings, space)
        timesteps = sampling_timesteps(space, sigmas)
        if len(timesteps) < 2:
            return None
        plan = SamplingPlan.for_timesteps(settings, timesteps[:-1], space.alphas_cumprod, end=timesteps[-1])
        check_steps_stay_in_their_segments(plan)
        sigma_at = {t: space.sigma_of(t) for t in timesteps}
        return cls(plan, sigma_at, tuple(space.frame(sigma_at[t]) for t in timesteps))


_KEPT_SCHEDULES = 8
_SCHEDULES: "OrderedDict[tuple, Optional[RunSchedule]]" = OrderedDict()


def check_steps_stay_in_their_segments(plan: SamplingPlan, name: str = "sigmas") -> None:
    """PeRFlow follows one segment's straight line per step: a step may end on its segment's end, not past it.

    As in the original, a step ends on a boundary's truncated training timestep (K = 3: 1000 -> 666, the boundary
    being 666.67), and the last segment's final step goes on to 0 past ``t_clean``.
    """
    scale = plan.settings.num_train_timesteps
    last = len(plan.settings.build_segments()) - 1
    for step, timestep in zip(plan.steps, plan.timesteps):
        landing = math.floor(step.t_end * scale + BOUNDARY_TOLERANCE)
        if step.index == last and step.t_next == 0:
            continue
        if step.t_next * scale < landing - BOUNDARY_TOLERANCE:
            raise ValueError(
                f"{name}: the step from timestep {timestep:g} to {step.t_next * scale:g} crosses the segment boundary "
                f"{step.t_end * scale:g}; PeRFlow steps within one segment at a time, so its steps must land on the "
                f"segment boundaries {plan.settings.build_segments().boundaries}: use the PeRFlow Scheduler's sigmas"
            )


def check_parameterisation(settings: PerflowSettings, space: ModelSpace, name: str = "parameterisation") -> None:
    """An eps parameterisation reads the output as DDPM noise: a flow (CONST) model's output is a velocity."""
    if space.kind == "flow" and settings.prediction_type != "velocity":
        raise ValueError(
            f"{name} {settings.prediction_type} cannot drive a flow (CONST) model: its output is a velocity, not DDPM "
            "noise; use velocity (or auto)"
        )


def check_num_train_timesteps(settings: PerflowSettings, space: ModelSpace) -> None:
    if settings.num_train_timesteps != space.num_train_timesteps:
        raise ValueError(
            f"the PeRFlow settings use num_train_timesteps={settings.num_train_timesteps} but the model has "
            f"{space.num_train_timesteps} training timesteps"
        )


def perflow_sigmas(space: ModelSpace, settings: PerflowSettings, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The sigma schedule of PeRFlow's timestep grid (ends with 0), for SamplerCustom(Advanced).

    ``denoise < 1`` works like ComfyUI's own schedulers: the grid of ``int(steps / denoise)`` steps is
    built and its last ``steps`` are kept, so the start lands on that finer grid (a segment start when
    ``steps / denoise`` is a multiple of K times ``steps / K``, e.g. 4 steps at denoise 0.5). Fewer steps
    than segments are raised to K (`PerflowSettings.steps_for`).
    """
    if not 0 < denoise <= 1:
        raise ValueError(f"denoise must be in (0, 1]; got {denoise}")
    check_num_train_timesteps(settings, space)
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1; got {steps!r}")
    if denoise < 1:
        total = settings.steps_for(int(steps / denoise), "steps / denoise")
    else:
        steps = total = settings.steps_for(steps)
    grid = settings.build_segments().timesteps(total, "steps / denoise" if denoise < 1 else "steps")[-steps:].tolist()
    return torch.tensor([space.sigma_of(float(t)) for t in grid] + [0.0], dtype=torch.float32)
