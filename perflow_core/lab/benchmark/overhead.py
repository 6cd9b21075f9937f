"""Sampler overhead: time per step of PeRFlow against Euler at equal NFE, measured side by side (diffusers
pipeline on the analytic model, a free constant network and a tiny UNet; ComfyUI's convention when it imports)."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ...scheduler import PerflowScheduler
from ..analytic import AnalyticDigitsDenoiser
from ..pipeline import run_pipeline
from .models import ConstantOutputModel, CountingModel, tiny_unet
from .peers import SD15_SCHEDULE, ComfyDenoiser, ComfyEnvironment, analytic_eps
from .perflow_rows import perflow_segments_for, perflow_settings
from .rows import TimeRatio

FREE_MODEL_REPEAT_FACTOR = 20


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
class Overhead(TimeRatio):
    """Time per step of two samplers at equal NFE, measured side by side; ``ratio`` is ours over theirs."""

    RATIO_OF = ("ours_seconds_per_step", "theirs_seconds_per_step")
    setting: str
    nfe: int
    ours: str
    theirs: str
    ours_seconds_per_step: float
    theirs_seconds_per_step: float


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


def comfy_overheads(comfy: ComfyEnvironment, model: AnalyticDigitsDenoiser, noise: torch.Tensor, nfes: Sequence[int], repeats: int) -> List[Overhead]:
    """ComfyUI's sample_euler vs our sample_perflow, both on the same ComfyUI-style stand-in model."""
    from ...k_sampling import ModelSpace, perflow_sigmas, sample_perflow

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
