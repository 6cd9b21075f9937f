"""The peer samplers: diffusers' schedulers in the pipeline and ComfyUI's k-diffusion samplers (when
``COMFYUI_PATH`` imports), each run from the held-out noise into a row of errors."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, List, Optional, Tuple

import torch

from ..analytic import AnalyticDigitsDenoiser
from ..pipeline import run_pipeline
from .endpoints import Endpoint, SamplerRun, endpoint_from_sigma
from .models import CountingModel
from .rows import Row, Workload

SD15_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
COMFY_SAMPLERS = ("euler", "dpmpp_2m", "uni_pc", "ipndm", "deis")
COMFY_UNI_PC_LAST_SIGMA = 0.001  # sample_unipc replaces a final sigma of 0 by this and stops there
# ComfyUI's optimised few-step schedules (AlignYourSteps' SD1 table, GITS at its default coeff 1.20), each with these
# samplers, through SamplerCustom: the schedule's sigmas go to the sampler as they are.
COMFY_SCHEDULES = ("AYS SD1", "GITS 1.20")
COMFY_SCHEDULE_SAMPLERS = ("euler", "dpmpp_2m", "ipndm", "uni_pc")


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
    # Tuned: the defaults drop to first order on the last steps (lower_order_final, meant for < 15 steps); kept at
    # full order they are often the best few-step peers. A last step to sigma 0 is always first order in DPM++ and
    # divides by zero in UniPC's corrector, so these stop at the last training level (mapped to sigma 0 like DEIS).
    DiffusersPeer(
        "diffusers DPM++ 2M tuned", "DPMSolverMultistepScheduler", overrides=(("lower_order_final", False), ("final_sigmas_type", "sigma_min")),
        note="lower_order_final=False, final_sigmas_type=sigma_min",
    ),
    DiffusersPeer(
        "diffusers UniPC tuned", "UniPCMultistepScheduler", overrides=(("lower_order_final", False), ("final_sigmas_type", "sigma_min")),
        note="lower_order_final=False, final_sigmas_type=sigma_min",
    ),
    DiffusersPeer("diffusers DEIS tuned", "DEISMultistepScheduler", overrides=(("lower_order_final", False),), note="lower_order_final=False"),
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


@dataclass
class ComfyEnvironment:
    """ComfyUI's sampling modules and an SD1.5 EPS ``model_sampling``."""

    sampling: Any
    uni_pc: Any
    samplers: Any
    model_sampling: Any
    scheduler: str
    schedule_nodes: Any = None  # {"AYS SD1": steps -> sigmas, ...}: ComfyUI's own scheduler nodes

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
    environment = ComfyEnvironment(sampling, uni_pc, samplers, eps_class(), scheduler, _schedule_nodes())
    return environment, f"ComfyUI from {path}, '{scheduler}' sigmas" + ("" if environment.schedule_nodes else "; AYS/GITS nodes did not import")


def _schedule_nodes() -> Optional[dict]:
    """AlignYourSteps (SD1 table, log-linearly interpolated to the step count) and GITS, as ComfyUI's nodes compute them."""
    try:
        import comfy_extras.nodes_align_your_steps as ays
        import comfy_extras.nodes_gits as gits
    except Exception:  # an older ComfyUI without them: the rows are skipped and the status says so
        return None
    return {
        "AYS SD1": lambda steps: ays.AlignYourStepsScheduler.execute("SD1", steps, 1.0).result[0],
        "GITS 1.20": lambda steps: gits.GITSScheduler.execute(1.20, steps, 1.0).result[0],
    }


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


def run_comfy_sampler(comfy: ComfyEnvironment, name: str, eps_fn: EpsFn, noise: torch.Tensor, nfe: int, sigmas: Optional[torch.Tensor] = None) -> SamplerRun:
    """A ComfyUI sampler from ``x = noise * sqrt(1 + sigma_max^2)`` (KSAMPLER's full-denoise scaling), on its
    KSampler sigmas or on given ones."""
    sigmas = comfy.sigmas(name, nfe) if sigmas is None else sigmas.float()
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
    return rows + comfy_schedule_rows(comfy, work, eps_fn, suffix, family)


def comfy_schedule_rows(comfy: ComfyEnvironment, work: Workload, eps_fn: EpsFn, suffix: str = "", family: str = "comfyui") -> List[Row]:
    """ComfyUI's samplers on the AYS and GITS schedules (steps = NFE; GITS has no 1-step table)."""
    rows = []
    for schedule in COMFY_SCHEDULES if comfy.schedule_nodes else ():
        for name in COMFY_SCHEDULE_SAMPLERS:
            row = Row(f"ComfyUI {name} + {schedule}{suffix}", family, f"{schedule} sigmas (ComfyUI's node), steps = NFE")
            for nfe in work.nfes:
                sigmas = comfy.schedule_nodes[schedule](nfe)
                run = run_comfy_sampler(comfy, name, eps_fn, work.held_out.noise.float(), nfe, sigmas)
                row.record(nfe, run, nfe, work.held_out.endpoint, work.model)
            rows.append(row)
    return rows
