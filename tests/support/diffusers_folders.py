"""Tiny diffusers-format model folders in the structures of the PeRFlow releases, built at test time.

A folder as published: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/`` (+ ``text_encoder_2/`` for
SDXL), ``scheduler/scheduler_config.json``; each weights folder has its ``config.json``. No tokenizer: ComfyUI
uses its own.

ComfyUI detects a diffusers UNet only by matching it against a fixed list of layouts
(comfy/model_detection.py ``unet_config_from_diffusers_unet``), so each folder uses the smallest layout of its
family that ComfyUI knows, with diffusers' own UNet2DConditionModel naming (the model is built on the meta
device for its names and shapes; the values come from a seeded random pool):

* ``sd15``: the "SD_XS" layout (320/640/1280 channels, one res block per level, no middle block, attention on
  levels 1 and 2, context 768), 316M parameters; ComfyUI loads it as SD1.x (``SD15``).
* ``sd21v``: the "SD09_XS" layout (the same levels with attention on all three, linear projections, context
  1024, cross-attention only on level 0), 328M parameters; ComfyUI loads it as SD2.x (``SD20``), which it
  guesses to be eps (its v test reads an output block this layout has not); the scheduler config says
  ``v_prediction``, as SD2.1-768's does.
* ``sdxl``: the "KOALA_700M" layout (SDXL's levels with one res block each, 1/2/5 transformer blocks, no
  middle block, context 2048, text-time embedding of 2816), 783M parameters; ComfyUI loads it as SDXL.

Text encoders hold only the one tensor ComfyUI's detection looks for (CLIP-L, OpenCLIP-H or bigG); ComfyUI
builds each at its fixed size and leaves the rest uninitialised, so the tests pass conditioning tensors
directly. The VAE is a full-size random SD VAE (84M parameters), written once and hard-linked into every folder.
Everything is fp16: about 0.63, 0.66 and 1.57 GB of UNet weights, 0.17 GB of VAE.

Needs diffusers and transformers (ComfyUI's test environment has them), not ComfyUI.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

POOL_SIZE = 4_194_301  # random values reused, at a different offset, by every tensor
DIFFUSERS_VERSION = "0.27.2"

_LEVELS = dict(block_out_channels=(320, 640, 1280), layers_per_block=1, mid_block_type=None)
UNET_CONFIGS: Dict[str, Dict[str, Any]] = {
    "sd15": dict(
        _LEVELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    ),
    "sd21v": dict(
        _LEVELS,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        only_cross_attention=(True, False, False),
    ),
    "sdxl": dict(
        _LEVELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2, 5),
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}
# The ComfyUI model config class each layout is detected as.
COMFY_MODEL_CONFIGS = {"sd15": "SD15", "sd21v": "SD20", "sdxl": "KOALA_700M"}
PIPELINES = {"sd15": "StableDiffusionPipeline", "sd21v": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}

# Text encoders: (folder, hidden size, layers, intermediate size, projection, the layer whose MLP ComfyUI's
# detect_te_model looks for) of CLIP-L, OpenCLIP-H and bigG.
CLIP_L = ("text_encoder", 768, 12, 3072, False, 0)
OPEN_CLIP_H = ("text_encoder", 1024, 23, 4096, False, 22)
CLIP_BIG_G = ("text_encoder_2", 1280, 32, 5120, True, 30)
TEXT_ENCODERS = {"sd15": (CLIP_L,), "sd21v": (OPEN_CLIP_H,), "sdxl": (CLIP_L, CLIP_BIG_G)}
# What the conditioning of each family looks like (context width; SDXL's pooled width).
CONTEXT_WIDTH = {"sd15": 768, "sd21v": 1024, "sdxl": 2048}
SDXL_POOLED_WIDTH = 1280

SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
)

# Schedulers as the releases' folders may hold them.
ORIGINAL_PERFLOW_SCHEDULER = {
    "_class_name": "PeRFlowScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_time_windows": 4,
    "num_train_timesteps": 1000,
    "prediction_type": "ddim_eps",
    "set_alpha_to_one": False,
    "t_clean": 0,
    "t_noise": 1,
    "trained_betas": None,
}


def stock_scheduler(class_name: str, prediction_type: str) -> Dict[str, Any]:
    """A non-PeRFlow scheduler config (DDIM, Euler, ...) as diffusers writes it."""
    return {
        "_class_name": class_name,
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "prediction_type": prediction_type,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


@dataclass
class FolderSpec:
    """One folder to build: its family layout, scheduler config and weight-file variant (None: default names)."""

    family: str
    scheduler: Dict[str, Any]
    variant: Optional[str] = None


class RandomPool:
    """Seeded normal fp16 values reused by every tensor at a different offset (building the folders costs writing
    them, not drawing 1.4 billion random numbers)."""

    def __init__(self, seed: int):
        self.values = torch.randn(POOL_SIZE, generator=torch.Generator().manual_seed(seed)).to(torch.float16)
        self.offset = 0

    def take(self, count: int, scale: float) -> torch.Tensor:
        """``count`` values times ``scale``, as a new fp16 tensor."""
        start = self.offset % POOL_SIZE
        self.offset += 7919 * (count % 1000 + 1)
        repeats = -(-(start + count) // POOL_SIZE)
        source = self.values.repeat(repeats) if repeats > 1 else self.values
        return torch.mul(source[start : start + count], scale)


def random_weights(shapes: Dict[str, Tuple[int, ...]], pool: RandomPool, gains: Optional[Dict[str, float]] = None) -> Dict[str, torch.Tensor]:
    """fp16 tensors giving order-one outputs: weights normal / sqrt(fan_in), norm weights 1 and biases 0, other
    biases normal * 0.02."""
    tensors = {}
    for name, shape in shapes.items():
        count = 1
        for size in shape:
            count *= size
        module = name.rsplit(".", 2)[-2] if "." in name else ""
        gain = (gains or {}).get(name, 1.0)
        if len(shape) == 1 and "norm" in module:
            tensors[name] = (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=torch.float16)
        elif len(shape) <= 1:
            tensors[name] = pool.take(count, 0.02 * gain).reshape(shape)
        else:
            tensors[name] = pool.take(count, gain / (count // shape[0]) ** 0.5).reshape(shape)
    return tensors


def meta_model(model_class, config: Dict[str, Any]):
    with torch.device("meta"):
        return model_class(**config)


def _shapes(model) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def weights_name(stem: str, variant: Optional[str]) -> str:
    return f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors"


def _write_json(path: Path, value: Dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True))


def _save(tensors: Dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})


def write_unet(folder: Path, family: str, variant: Optional[str], pool: RandomPool) -> None:
    from diffusers import UNet2DConditionModel

    model = meta_model(UNet2DConditionModel, UNET_CONFIGS[family])
    model.save_config(str(folder / "unet"))
    # The final conv sees GroupNorm+SiLU outputs of unit scale; gain 1.5 gives outputs of about unit spread.
    _save(random_weights(_shapes(model), pool, {"conv_out.weight": 1.5}), folder / "unet" / weights_name("diffusion_pytorch_model", variant))


def write_vae(path: Path, pool: RandomPool) -> None:
    """The SD VAE (config.json and weights) into ``path`` (a vae/ folder)."""
    from diffusers import AutoencoderKL

    model = meta_model(AutoencoderKL, SD_VAE_CONFIG)
    model.save_config(str(path))
    _save(random_weights(_shapes(model), pool), path / "diffusion_pytorch_model.safetensors")


def write_text_encoder(folder: Path, encoder: Tuple, variant: Optional[str], pool: RandomPool) -> None:
    """config.json and a weights file holding the tensor ComfyUI detects the encoder by (one layer's MLP)."""
    from transformers import CLIPTextConfig

    name, width, layers, intermediate, projection, detected_layer = encoder
    config = CLIPTextConfig(hidden_size=width, num_hidden_layers=layers, intermediate_size=intermediate, num_attention_heads=width // 64, projection_dim=width)
    config.architectures = ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"]
    (folder / name).mkdir(parents=True, exist_ok=True)
    config.to_json_file(str(folder / name / "config.json"))
    key = f"text_model.encoder.layers.{detected_layer}.mlp.fc1.weight"
    _save(random_weights({key: (intermediate, width)}, pool), folder / name / weights_name("model", variant))


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def build_diffusers_folder(folder: Path, spec: FolderSpec, vae_folder: Path, seed: int = 0) -> Path:
    """Write one folder (see the module docstring); ``vae_folder`` is a vae/ written by ``write_vae``, linked in."""
    pool = RandomPool(seed)
    write_unet(folder, spec.family, spec.variant, pool)
    for encoder in TEXT_ENCODERS[spec.family]:
        write_text_encoder(folder, encoder, spec.variant, pool)
    for entry in sorted(vae_folder.iterdir()):
        target = entry.name if entry.suffix == ".json" else weights_name("diffusion_pytorch_model", spec.variant)
        link_or_copy(entry, folder / "vae" / target)
    _write_json(folder / "scheduler" / "scheduler_config.json", spec.scheduler)
    components = {encoder[0]: ["transformers", "CLIPTextModelWithProjection" if encoder[4] else "CLIPTextModel"] for encoder in TEXT_ENCODERS[spec.family]}
    index = {
        "_class_name": PIPELINES[spec.family],
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", spec.scheduler.get("_class_name", "DDIMScheduler")],
        "safety_checker": [None, None],
        **components,
    }
    _write_json(folder / "model_index.json", index)
    return folder


def conditioning(family: str, seed: int = 0):
    """A CONDITIONING value of the family's shape (77 tokens; SDXL with its pooled output), random."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.randn(1, 77, CONTEXT_WIDTH[family], generator=generator)
    extra = {"pooled_output": torch.randn(1, SDXL_POOLED_WIDTH, generator=generator)} if family == "sdxl" else {}
    return [[context, extra]]


def build_folders(root: Path, specs: Dict[str, FolderSpec]) -> Path:
    """Every folder of ``specs`` under ``root`` (``root/<name>``), sharing one VAE; returns ``root``."""
    vae_folder = root / "_shared_vae"
    write_vae(vae_folder, RandomPool(1))
    for seed, (name, spec) in enumerate(sorted(specs.items())):
        build_diffusers_folder(root / name, spec, vae_folder, seed=seed)
    shutil.rmtree(vae_folder)
    return root
