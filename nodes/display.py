"""What the PeRFlow nodes show a person: the settings and timesteps as text on the node, and errors that name the node."""

from __future__ import annotations

import functools
from typing import Any

from comfy_api.latest import io

from ..perflow_core.k_sampling import ModelSpace, sampling_timesteps

AUTO_RULE = "auto (per model family: SD1.x diff_eps, SDXL ddim_eps, SD2.x-v and flow models velocity)"


def settings_text(choice: Any, model: Any = None) -> str:
    """A PERFLOW value (``PerflowChoice``) as plain lines: with ``model`` (a MODEL) an ``auto`` parameterisation is
    shown with what it resolves to for that model as it samples (its patched model_sampling, if any)."""
    if not choice.auto_prediction_type:
        return choice.settings.describe()
    if model is None:
        return choice.settings.describe(AUTO_RULE)
    resolved = choice.resolved_for(model.model, model.get_model_object("model_sampling"))
    return choice.settings.describe(f"auto -> {resolved.prediction_type} for this model")


def timesteps_text(space: ModelSpace, sigmas: Any) -> str:
    """The timesteps the network is called at for a sigma schedule (the last sigma is where sampling ends)."""
    if len(sigmas) < 2:
        return "timesteps the network sees: none (no steps)"
    timesteps = sampling_timesteps(space, sigmas)[:-1]
    return f"timesteps the network sees ({len(timesteps)} steps): " + ", ".join(f"{t:g}" for t in timesteps)


def with_named_errors(node: type[io.ComfyNode]) -> type[io.ComfyNode]:
    """Prefix the node's display name to the ValueErrors its execute raises: ComfyUI's error dialog titles an
    error with the node id (PerflowScheduler), so the message says which node it is (PeRFlow Scheduler)."""
    execute = node.execute.__func__
    if getattr(execute, "names_errors", False):
        return node

    @functools.wraps(execute)
    def named(cls, *args, **kwargs):
        try:
            return execute(cls, *args, **kwargs)
        except ValueError as error:
            raise ValueError(f"{cls.define_schema().display_name}: {error}") from error

    named.names_errors = True
    node.execute = classmethod(named)
    return node
