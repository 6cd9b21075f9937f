"""Opt-in: 'perflow' in the stock KSampler's sampler and scheduler dropdowns.

Off by default: peer packs that change these lists unconditionally break other packs' saved workflows.
Set the environment variable PERFLOW_KSAMPLER_DROPDOWNS=1 before starting ComfyUI to enable it. The
lists are changed in place, once; the entries use the default settings (K = 4, theta = 0, auto).
"""

from __future__ import annotations

import logging
import os

import comfy.k_diffusion.sampling
import comfy.samplers

from ..perflow_core.k_sampling import ModelSpace, perflow_sigmas
from ..perflow_core.settings import PerflowSettings
from .glue import sample_perflow_comfy

ENVIRONMENT_VARIABLE = "PERFLOW_KSAMPLER_DROPDOWNS"
NAME = "perflow"
logger = logging.getLogger(__name__)


def dropdowns_requested() -> bool:
    return os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower() in ("1", "true", "yes", "on")


def perflow_scheduler(model_sampling, steps: int):
    return perflow_sigmas(ModelSpace.of(model_sampling), PerflowSettings(), steps)


def register_dropdowns() -> bool:
    """Add 'perflow' to the sampler and scheduler lists if asked to and not yet there. Returns whether it did."""
    if not dropdowns_requested() or NAME in comfy.samplers.KSAMPLER_NAMES:
        return False
    setattr(comfy.k_diffusion.sampling, f"sample_{NAME}", sample_perflow_comfy)
    for names in (comfy.samplers.KSAMPLER_NAMES, comfy.samplers.SAMPLER_NAMES):
        if NAME not in names:
            names.append(NAME)
    if NAME not in comfy.samplers.SCHEDULER_HANDLERS:
        comfy.samplers.SCHEDULER_HANDLERS[NAME] = comfy.samplers.SchedulerHandler(perflow_scheduler, use_ms=True)
        comfy.samplers.SCHEDULER_NAMES.append(NAME)
    logger.info("PeRFlow: added '%s' to the KSampler sampler and scheduler lists (%s=1)", NAME, ENVIRONMENT_VARIABLE)
    return True
