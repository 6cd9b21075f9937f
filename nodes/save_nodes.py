"""Save PeRFlow Checkpoint: MODEL, CLIP, VAE and PERFLOW as one .safetensors file for sharing."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Dict, Iterator, Optional

import comfy.sd
import folder_paths
import torch
from comfy.cli_args import args
from comfy_api.latest import io, ui

from ..perflow_core.checkpoint import write_once_under_free_name
from ..perflow_core.k_sampling import check_num_train_timesteps, check_parameterisation
from ..perflow_core.settings import PerflowSettings
from .glue import MAX_FILE_STEM, PerflowChoice, model_space
from .settings_node import Perflow

DEFAULT_PREFIX = "checkpoints/PeRFlow"


def saved_settings(model, perflow: PerflowChoice) -> PerflowSettings:
    """The settings the file will name: ``auto`` resolved for the model's family, checked against the model the file
    will hold (a file whose settings cannot drive its own model is refused)."""
    if "model_sampling" in model.object_patches:
        raise ValueError(
            "model: its sampling is patched (e.g. by ModelSamplingDiscrete or ModelSamplingSD3), which a checkpoint file "
            "does not store; save the model without that patch and apply it after loading"
        )
    space = model_space(model)
    settings = perflow.resolved_for(model.model)
    try:
        check_parameterisation(settings, space)
        check_num_train_timesteps(settings, space)
    except ValueError as error:
        raise ValueError(f"perflow: {error}") from None
    return settings


def output_names(filename_prefix: Any) -> Iterator[str]:
    """The file names ComfyUI's CheckpointSave would use for ``filename_prefix`` under the output folder,
    ``<prefix>_00001_.safetensors``, ``_00002_``, ... from the first number not in use."""
    if not isinstance(filename_prefix, str) or not filename_prefix.strip() or "\x00" in filename_prefix:
        raise ValueError(f"filename_prefix must be a relative path such as {DEFAULT_PREFIX!r}; got {str(filename_prefix)[:80]!r}")
    stem = os.path.basename(os.path.normpath(filename_prefix.strip()))
    if stem in ("", ".", "..") or len(stem) > MAX_FILE_STEM:
        raise ValueError(f"filename_prefix {filename_prefix[:80]!r} must end in a file name of at most {MAX_FILE_STEM} characters")
    try:
        folder, filename, counter, _, _ = folder_paths.get_save_image_path(filename_prefix.strip(), folder_paths.get_output_directory())
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].strip("* ")
        raise ValueError(
            f"filename_prefix {filename_prefix[:80]!r}: cannot save there ({reason}); give a path inside ComfyUI's output folder such as {DEFAULT_PREFIX!r}"
        ) from None
    return (os.path.join(folder, f"{filename}_{number:05}_.safetensors") for number in itertools.count(counter))


def workflow_metadata(prompt: Optional[dict], extra_pnginfo: Optional[dict]) -> Dict[str, str]:
    """The prompt and workflow, as CheckpointSave stores them (unless ComfyUI runs with --disable-metadata)."""
    if args.disable_metadata:
        return {}
    metadata = {"prompt": json.dumps(prompt) if prompt is not None else ""}
    metadata.update({key: json.dumps(value) for key, value in (extra_pnginfo or {}).items()})
    return metadata


def sampling_keys(model) -> Dict[str, torch.Tensor]:
    """Keys the stock loader reads to rebuild the model's sampling and that ComfyUI's state dict leaves out
    (``v_pred`` it adds itself)."""
    if getattr(model.model.model_sampling, "zsnr", False):
        return {"ztsnr": torch.tensor([])}
    return {}


class PerflowSaveCheckpointNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowSaveCheckpoint",
            display_name="Save PeRFlow Checkpoint",
            category="PeRFlow/save",
            description="Saves a piecewise rectified flow (PeRFlow) model as one .safetensors file to share: the model "
            "(with its patches, e.g. applied PeRFlow delta weights, merged in), text encoder, VAE and the PeRFlow settings "
            "in perflow.* keys. Load PeRFlow Checkpoint reads it all back; the stock Load Checkpoint loads the same weights.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model to save; weight patches (delta weights, LoRA) are merged into the file."),
                io.Clip.Input("clip", tooltip="The text encoder to save."),
                io.Vae.Input("vae", tooltip="The VAE to save."),
                Perflow.Input(
                    "perflow",
                    tooltip="The PeRFlow settings to store in the file's perflow.* keys. A parameterisation of auto is resolved "
                    "for this model's family before saving (SD1.x diff_eps, SDXL ddim_eps, SD2.x-v velocity), so the file names it.",
                ),
                io.String.Input(
                    "filename_prefix",
                    default=DEFAULT_PREFIX,
                    tooltip="Where in ComfyUI's output folder: checkpoints/PeRFlow gives output/checkpoints/PeRFlow_00001_.safetensors; "
                    "the number goes up, an existing file is never replaced.",
                ),
            ],
            outputs=[],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
        )

    @classmethod
    def execute(cls, model, clip, vae, perflow: PerflowChoice, filename_prefix: str) -> io.NodeOutput:
        settings = saved_settings(model, perflow)
        names = output_names(filename_prefix)
        tensors, perflow_metadata = settings.file_entries()
        metadata = {**workflow_metadata(cls.hidden.prompt, cls.hidden.extra_pnginfo), **perflow_metadata}
        extra_keys = {**sampling_keys(model), **tensors}
        path = write_once_under_free_name(
            names, lambda new: comfy.sd.save_checkpoint(new, model, clip, vae, metadata=metadata, extra_keys=extra_keys)
        )
        return io.NodeOutput(ui=ui.PreviewText(f"saved {os.path.relpath(path, folder_paths.get_output_directory())}"))
