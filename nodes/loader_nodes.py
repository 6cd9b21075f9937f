"""PeRFlow checkpoint loader and the SD1.5 delta-weights merge."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping

import comfy.model_sampling
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..perflow_core.checkpoint import checkpoint_format, load_pickle_checkpoint, perflow_fields_in, split_perflow_state_dict
from ..perflow_core.diffusers_folder import MODEL_INDEX, read_json, scheduler_config, scheduler_settings, states_v_prediction, weight_files
from .display import settings_text
from .glue import PerflowChoice, default_choice, default_prediction_type
from .model_files import CHECKPOINTS, DIFFUSERS, pack_model_files
from .settings_node import Perflow

logger = logging.getLogger(__name__)

DELTA_FOLDER = "perflow_deltas"
DELTAS = pack_model_files(DELTA_FOLDER)


def read_named(input_name: str, value: str, read: Callable[[], Any]) -> Any:
    """``read()``, with any failure to read the file (a damaged or foreign file raises SafetensorError,
    UnpicklingError, RuntimeError, ... depending on the library) as a ValueError naming the node input."""
    try:
        return read()
    except ValueError as error:
        raise ValueError(f"{input_name} {value!r}: {error}") from None
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0][:200] or type(error).__name__
        raise ValueError(f"{input_name} {value!r} is damaged or not a model file ({type(error).__name__}: {reason})") from None


def load_weights_and_settings(path: str):
    """One read of the file: the model weights, its metadata, the PeRFlow settings from its perflow.*
    entries, and whether the file names a parameterisation."""
    if checkpoint_format(path) == "safetensors":
        state_dict, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    else:
        state_dict, metadata = load_pickle_checkpoint(path), None
    settings, weights = split_perflow_state_dict(state_dict, metadata)
    return weights, metadata, settings, "prediction_type" in perflow_fields_in(state_dict, metadata)


class PerflowCheckpointLoaderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowCheckpointLoader",
            display_name="Load PeRFlow Checkpoint",
            category="PeRFlow/loaders",
            description="Loads a checkpoint like Load Checkpoint and reads the piecewise rectified flow (PeRFlow) settings stored in its perflow.* keys "
            "(segments, boundaries, theta, parameterisation); files without them give the original PeRFlow settings.",
            inputs=[
                io.Combo.Input(
                    "ckpt_name",
                    options=CHECKPOINTS.options(),
                    tooltip="A checkpoint from models/checkpoints (.safetensors, or a legacy pickle read with weights_only).",
                )
            ],
            outputs=[
                io.Model.Output(tooltip="The diffusion model."),
                io.Clip.Output(tooltip="The text encoder."),
                io.Vae.Output(tooltip="The VAE."),
                Perflow.Output(display_name="perflow", tooltip="PeRFlow settings read from the file."),
            ],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name) -> bool | str:
        return CHECKPOINTS.check(ckpt_name)

    @classmethod
    def execute(cls, ckpt_name: str) -> io.NodeOutput:
        path = CHECKPOINTS.path(ckpt_name, "ckpt_name")
        weights, metadata, settings, has_prediction_type = read_named("ckpt_name", ckpt_name, lambda: load_weights_and_settings(path))
        loaded = comfy.sd.load_state_dict_guess_config(
            weights,
            output_vae=True,
            output_clip=True,
            embedding_directory=folder_paths.get_folder_paths("embeddings"),
            metadata=metadata,
        )
        if loaded is None:
            raise ValueError(f"ckpt_name {ckpt_name!r}: ComfyUI could not detect the model type of this checkpoint")
        model, clip, vae = loaded[:3]
        choice = PerflowChoice(settings, auto_prediction_type=not has_prediction_type)
        if not has_prediction_type:
            logger.info("PeRFlow: %s has no perflow.prediction_type; using %s for this model family", ckpt_name, default_prediction_type(model.model))
        return io.NodeOutput(model, clip, vae, choice, ui=ui.PreviewText(settings_text(choice, model)))


def diffusers_to_comfy_keys(model) -> dict[str, str]:
    """diffusers UNet key -> ComfyUI state-dict key (with the diffusion_model. prefix)."""
    mapping = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {diffusers_key: "diffusion_model." + comfy_key for diffusers_key, comfy_key in mapping.items()}


def tensors_only(delta: Any) -> Mapping[str, torch.Tensor]:
    """A delta must be a dict of tensors (a pickle may hold anything)."""
    if not isinstance(delta, Mapping) or not all(isinstance(value, torch.Tensor) for value in delta.values()):
        raise ValueError(f"expected a dict of weight tensors; the file holds a {type(delta).__name__} that is not one")
    return delta


def delta_patches(model, delta: dict) -> tuple[dict, list[str]]:
    """Map delta keys (diffusers UNet names, optionally prefixed 'unet.', or ComfyUI names) onto the model's weights."""
    to_comfy = diffusers_to_comfy_keys(model)
    model_keys = model.model.state_dict()
    patches, unknown = {}, []
    for key, value in delta.items():
        name = key[len("unet."):] if key.startswith("unet.") else key
        target = to_comfy.get(name) or (name if name in model_keys else "diffusion_model." + name)
        if target not in model_keys:
            unknown.append(key)
            continue
        if tuple(model_keys[target].shape) != tuple(value.shape):
            raise ValueError(f"delta key {key} has shape {list(value.shape)} but the model's {target} is {list(model_keys[target].shape)}")
        patches[target] = (value,)
    return patches, unknown


class PerflowApplyDeltaNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowApplyDelta",
            display_name="Apply PeRFlow Delta Weights",
            category="PeRFlow/loaders",
            description="Turns an SD1.5 model into PeRFlow (piecewise rectified flow) by adding the released delta weights (W = W_base + strength * dW, "
            "hansyan/perflow-sd15-delta-weights), as a model patch: no full copy of the weights.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 model (any fine-tune)."),
                io.Combo.Input(
                    "delta_name",
                    options=DELTAS.options(),
                    tooltip="A diffusers-format UNet delta in models/perflow_deltas (e.g. the release's diffusion_pytorch_model.v0-1.safetensors, under its own name).",
                ),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip="Scale of the delta; 1 is the release."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model.")],
        )

    @classmethod
    def validate_inputs(cls, delta_name) -> bool | str:
        return DELTAS.check(delta_name)

    @classmethod
    def execute(cls, model, delta_name: str, strength: float) -> io.NodeOutput:
        path = DELTAS.path(delta_name, "delta_name")
        delta = read_named("delta_name", delta_name, lambda: tensors_only(comfy.utils.load_torch_file(path, safe_load=True)))
        try:
            patches, unknown = delta_patches(model, delta)
        except ValueError as error:
            raise ValueError(f"delta_name {delta_name!r}: {error}") from None
        if not patches:
            raise ValueError(f"delta_name {delta_name!r}: none of its {len(delta)} keys matches this model's UNet; expected an SD1.5 diffusers UNet delta")
        if unknown:
            logger.warning("PeRFlow delta %s: %d of %d keys match no UNet weight and were skipped, e.g. %s", delta_name, len(unknown), len(delta), unknown[:3])
        patched = model.clone()
        patched.add_patches(patches, strength)
        return io.NodeOutput(patched)


def folder_weights(folder: str, component: str, model_path: str) -> Dict[str, torch.Tensor]:
    """One component's weights (every shard of a sharded set), read as ComfyUI reads model files (pickles only
    with weights_only)."""
    files = read_named("model_path", model_path, lambda: weight_files(folder, component))
    weights: Dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(read_named("model_path", f"{model_path}/{component}/{file.name}", lambda: comfy.utils.load_torch_file(str(file), safe_load=True)))
    return weights


def text_encoders(folder: str, index: Mapping[str, Any]) -> List[str]:
    """text_encoder, and text_encoder_2 where the folder has one (SDXL), as ComfyUI's load_diffusers takes them."""
    second = "text_encoder_2" in index or (Path(folder) / "text_encoder_2").is_dir()
    return ["text_encoder", "text_encoder_2"] if second else ["text_encoder"]


def load_unet(folder: str, model_path: str, config: Any):
    """unet/ as ComfyUI's diffusers loader loads it (its layout detected among the ones ComfyUI knows), v-prediction
    when the folder's (non-PeRFlow) scheduler config says so."""
    weights = folder_weights(folder, "unet", model_path)
    model = read_named("model_path", f"{model_path}/unet", lambda: comfy.sd.load_diffusion_model_state_dict(weights))
    if model is None:
        raise ValueError(
            f"model_path {model_path!r}: ComfyUI does not recognise the UNet in unet/ (its layout is none of the diffusers "
            "UNets ComfyUI detects: SD1.x, SD2.x, SDXL and their distilled variants)"
        )
    return with_v_prediction(model) if states_v_prediction(config) else model


def with_v_prediction(model):
    """The model sampling v, as the stock ModelSamplingDiscrete node sets it, for a folder whose scheduler config
    says v_prediction where ComfyUI's weight-based guess said eps."""
    if isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.V_PREDICTION):
        return model

    class VPredictionSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
        pass

    patched = model.clone()
    patched.add_object_patch("model_sampling", VPredictionSampling(model.model.model_config))
    return patched


class PerflowDiffusersLoaderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowDiffusersLoader",
            display_name="Load PeRFlow Diffusers Model",
            category="PeRFlow/loaders",
            description="Loads a piecewise rectified flow (PeRFlow) model published as a diffusers folder (the hansyan/perflow-* "
            "releases) with ComfyUI's own loaders, including variant weight files such as the SDXL releases' v0-fix, and reads "
            "the PeRFlow settings from its scheduler config (else the released models' settings for the model family).",
            inputs=[
                io.Combo.Input(
                    "model_path",
                    options=DIFFUSERS.options(),
                    tooltip="A folder under models/diffusers holding model_index.json, unet/, vae/, text_encoder/ (+ text_encoder_2/ for SDXL) and scheduler/.",
                )
            ],
            outputs=[
                io.Model.Output(tooltip="The diffusion model (unet/)."),
                io.Clip.Output(tooltip="The text encoders (text_encoder/, text_encoder_2/)."),
                io.Vae.Output(tooltip="The VAE (vae/)."),
                Perflow.Output(
                    display_name="perflow",
                    tooltip="PeRFlow settings from scheduler/scheduler_config.json when it is a PeRFlow scheduler's; otherwise "
                    "K = 4 and the released models' parameterisation for the family (SD1.5 diff_eps, SD2.x-v velocity, SDXL ddim_eps).",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, model_path) -> bool | str:
        return DIFFUSERS.check(model_path)

    @classmethod
    def execute(cls, model_path: str) -> io.NodeOutput:
        folder = DIFFUSERS.path(model_path, "model_path")
        index = read_named("model_path", model_path, lambda: read_json(Path(folder) / MODEL_INDEX, MODEL_INDEX))
        config = read_named("model_path", model_path, lambda: scheduler_config(folder))
        settings = read_named("model_path", model_path, lambda: scheduler_settings(config))
        model = load_unet(folder, model_path, config)
        encoders = [folder_weights(folder, name, model_path) for name in text_encoders(folder, index)]
        embeddings = folder_paths.get_folder_paths("embeddings")
        clip = read_named("model_path", f"{model_path}/text_encoder", lambda: comfy.sd.load_text_encoder_state_dicts(encoders, embedding_directory=embeddings))
        vae_weights = folder_weights(folder, "vae", model_path)
        vae = read_named("model_path", f"{model_path}/vae", lambda: comfy.sd.VAE(sd=vae_weights))
        if settings is None:
            logger.info("PeRFlow: %s has no PeRFlow scheduler config; using K = 4 and the released models' parameterisation for its family", model_path)
        choice = default_choice() if settings is None else PerflowChoice(settings)
        return io.NodeOutput(model, clip, vae, choice, ui=ui.PreviewText(settings_text(choice, model)))
