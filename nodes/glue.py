"""ComfyUI-side glue: the KSAMPLER function and what it needs from ComfyUI's model objects."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import comfy.patcher_extension
import comfy.samplers

from ..perflow_core.k_sampling import ModelSpace, check_parameterisation, model_sampling_of, sample_perflow
from ..perflow_core.settings import PerflowSettings
from .display import settings_text

logger = logging.getLogger(__name__)

TIMESTEP_WRAPPER_KEY = "perflow_timesteps"


@dataclass
class PerflowChoice:
    """The PERFLOW value passed between nodes: settings, with the parameterisation possibly 'auto'."""

    settings: PerflowSettings
    auto_prediction_type: bool = False

    def resolved_for(self, base_model: Any, model_sampling: Any = None) -> PerflowSettings:
        if not self.auto_prediction_type:
            return self.settings
        return _with_prediction_type(self.settings, default_prediction_type(base_model, model_sampling))

    def __str__(self) -> str:  # what Preview Any prints
        return settings_text(self)


@lru_cache(maxsize=64)
def _with_prediction_type(settings: PerflowSettings, prediction_type: str) -> PerflowSettings:
    """Kept: every run of an auto choice resolves it, and a validated copy costs more than the sampler's own steps."""
    return settings.replace(prediction_type=prediction_type)


def default_choice() -> PerflowChoice:
    """The original PeRFlow (K = 4 uniform, theta = 0) with the parameterisation picked per model family."""
    return PerflowChoice(PerflowSettings(), auto_prediction_type=True)


def choice_or_default(choice: Optional[PerflowChoice]) -> PerflowChoice:
    """A PERFLOW input that may be unconnected: the default choice when it is."""
    return choice if choice is not None else default_choice()


def model_space(model: Any) -> ModelSpace:
    """The sampling space of a MODEL as it samples (its patched model_sampling, if any), errors naming ``model``."""
    try:
        return ModelSpace.of(model.get_model_object("model_sampling"))
    except ValueError as error:
        raise ValueError(f"model: {error}") from None


def default_prediction_type(base_model: Any, model_sampling: Any = None) -> str:
    """The released PeRFlow models' parameterisation for a model family: SDXL ddim_eps, SD2.x-v and flow
    models velocity, other eps models (SD1.x) diff_eps. ``model_sampling``: the one the model samples with when
    a patch replaces the base model's (a MODEL's ``get_model_object("model_sampling")``; applied while sampling)."""
    space = ModelSpace.of(base_model.model_sampling if model_sampling is None else model_sampling)
    if space.kind in ("v", "flow"):
        return "velocity"
    return "ddim_eps" if "SDXL" in type(base_model).__name__ else "diff_eps"


def _shift_timesteps(executor, x, timesteps, *args, **kwargs):
    # ComfyUI hands the UNet the index j of the training sigma (at most 999); PeRFlow feeds j + 1 (1000, 875, ...).
    return executor(x, timesteps + 1, *args, **kwargs)


def with_perflow_timesteps(extra_args: Optional[dict], space: ModelSpace) -> dict:
    """A copy of extra_args whose model_options make the diffusion model see PeRFlow's timesteps (a flow
    model's timestep already is PeRFlow's t * T, so it is left as it is)."""
    extra_args = dict(extra_args or {})
    if space.kind == "flow":
        return extra_args
    model_options = comfy.patcher_extension.copy_nested_dicts(extra_args.get("model_options", {}))
    comfy.patcher_extension.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, TIMESTEP_WRAPPER_KEY, _shift_timesteps, model_options, is_model_options=True
    )
    extra_args["model_options"] = model_options
    return extra_args


def sample_perflow_comfy(model, x, sigmas, extra_args=None, callback=None, disable=None, choice: Optional[PerflowChoice] = None):
    """KSAMPLER function: PeRFlow with the original's timesteps on any ComfyUI guider."""
    base_model = model.inner_model.inner_model
    space = ModelSpace.of(model_sampling_of(model))
    settings = choice_or_default(choice).resolved_for(base_model)
    check_parameterisation(settings, space)
    extra_args = with_perflow_timesteps(extra_args, space)
    return sample_perflow(model, x, sigmas, extra_args, callback, disable, settings=settings, space=space)


def perflow_ksampler(choice: Optional[PerflowChoice]) -> comfy.samplers.KSAMPLER:
    return comfy.samplers.KSAMPLER(sample_perflow_comfy, extra_options={"choice": choice})


MAX_FILE_STEM = 200


def file_stem(value: Any, input_name: str, default: str) -> str:
    """A new file's name typed by a user: its last path part, without NUL, at most MAX_FILE_STEM characters."""
    if not isinstance(value, str):
        raise ValueError(f"{input_name} must be text; got {type(value).__name__}")
    stem = os.path.basename(value.strip()) or default
    if "\x00" in stem or len(stem) > MAX_FILE_STEM or stem in (".", ".."):
        raise ValueError(f"{input_name} must be a file name of at most {MAX_FILE_STEM} characters without NUL; got {value[:40]!r}... ({len(value)} characters)")
    return stem
