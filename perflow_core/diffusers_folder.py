"""A diffusers-format model folder as published (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``text_encoder_2/``, ``scheduler/``): which weight files each component has, and the PeRFlow settings its
scheduler config states. Plain file reading: no diffusers and no ComfyUI needed.

Weight files: the default names, their ``fp16`` variant, or any other variant: the SDXL PeRFlow releases are
published as ``diffusion_pytorch_model.v0-fix.safetensors`` / ``model.v0-fix.safetensors`` (the original README
loads them with ``variant="v0-fix"``). Sharded weights (``<name>.safetensors.index.json`` and its shards) are
read as one set.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from .settings import SCHEDULER_CLASS_NAMES, PerflowSettings

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
# Weight file stems of each component: (safetensors, pickle), as diffusers and transformers name them.
WEIGHT_STEMS = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": ("model", "pytorch_model"),
    "text_encoder_2": ("model", "pytorch_model"),
}
# ComfyUI's own order (comfy/diffusers_load.py): fp16 safetensors, safetensors, fp16 pickle, pickle; other
# variants come after those, safetensors first.
PREFERRED_VARIANTS = ("fp16", None)
_WEIGHT_NAME = re.compile(r"^(?P<stem>[A-Za-z_]+)(?:\.(?P<variant>[^.]+))?\.(?P<ext>safetensors|bin)$")
# diffusers and transformers put the variant of an index before ".json": <stem>.safetensors.index[.<variant>].json
_INDEX_NAME = re.compile(r"^(?P<stem>[A-Za-z_]+)\.(?P<ext>safetensors|bin)\.index(?:\.(?P<variant>[^.]+))?\.json$")


def model_folders(root: PathLike) -> List[str]:
    """Folders under ``root`` (followed through links) that hold a model_index.json, relative to ``root``, sorted:
    what ComfyUI's stock DiffusersLoader offers."""
    if not os.path.isdir(root):
        return []
    found = [os.path.relpath(folder, start=root) for folder, _, files in os.walk(root, followlinks=True) if MODEL_INDEX in files]
    return sorted(found)


def read_json(path: PathLike, name: str) -> Dict[str, Any]:
    """A JSON object from a file; a missing, unreadable or non-object file is a ValueError naming ``name``."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except FileNotFoundError:
        raise ValueError(f"{name} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ValueError(f"{name} is not readable JSON ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must hold a JSON object; it holds a {type(value).__name__}")
    return value


def weight_files(folder: PathLike, component: str) -> List[Path]:
    """The weight files of ``folder/component`` to load (one file, or every shard of a sharded set), chosen by
    ``_preference``; a ValueError naming the component when it has none, or when a shard is missing."""
    directory = Path(folder) / component
    safetensors_stem, pickle_stem = WEIGHT_STEMS[component]
    candidates = _weight_candidates(directory, {"safetensors": safetensors_stem, "bin": pickle_stem})
    if not candidates:
        raise ValueError(
            f"{component}/ has no weights: expected {component}/{safetensors_stem}[.<variant>].safetensors "
            f"(or .bin, or a sharded .safetensors.index.json)"
        )
    chosen = min(candidates, key=lambda name: _preference(*candidates[name]))
    if len(candidates) > 1:
        logger.info("PeRFlow: %s/%s chosen among %s", component, chosen, ", ".join(sorted(candidates)))
    is_index = candidates[chosen][2]
    return _shards(directory, chosen, component) if is_index else [directory / chosen]


def _weight_candidates(directory: Path, stems: Mapping[str, str]) -> Dict[str, Tuple[str, Optional[str], bool]]:
    """File name -> (extension, variant, is an index) of the weight files in ``directory``."""
    if not directory.is_dir():
        return {}
    found = {}
    for entry in os.listdir(directory):
        for pattern, is_index in ((_WEIGHT_NAME, False), (_INDEX_NAME, True)):
            match = pattern.match(entry)
            if match and match["stem"] == stems[match["ext"]] and (directory / entry).is_file():
                found[entry] = (match["ext"], match["variant"], is_index)
    return found


def _preference(ext: str, variant: Optional[str], is_index: bool) -> Tuple:
    known = PREFERRED_VARIANTS.index(variant) if variant in PREFERRED_VARIANTS else len(PREFERRED_VARIANTS)
    return (known == len(PREFERRED_VARIANTS), ext != "safetensors", known, variant or "", is_index)


def _shards(directory: Path, index_name: str, component: str) -> List[Path]:
    index = read_json(directory / index_name, f"{component}/{index_name}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{component}/{index_name} has no weight_map of tensor name -> shard file")
    names = sorted(set(weight_map.values()))
    for name in names:
        if name != os.path.basename(name) or name in (".", "..") or not (directory / name).is_file():
            raise ValueError(f"{component}/{index_name} names the shard {name!r}, which is not a file in {component}/")
    return [directory / name for name in names]


def scheduler_config(folder: PathLike) -> Optional[Dict[str, Any]]:
    """``scheduler/scheduler_config.json`` as a dict; None when the folder has none; a ValueError naming the file
    when it is not readable JSON."""
    path = Path(folder) / SCHEDULER_CONFIG
    if not path.exists():
        return None
    return read_json(path, SCHEDULER_CONFIG)


def scheduler_settings(config: Optional[Mapping[str, Any]]) -> Optional[PerflowSettings]:
    """The PeRFlow settings a PeRFlow scheduler config states (the original's ``PeRFlowScheduler`` or our
    ``PerflowScheduler``: ``prediction_type`` with the legacy ``epsilon`` = ``diff_eps``, ``num_time_windows`` /
    ``segments``, ``t_clean``, ...; what it leaves out takes that scheduler's default); None for another
    scheduler's config, whose ``prediction_type`` (``epsilon``, ``v_prediction``) is not a PeRFlow one."""
    if not config or config.get("_class_name") not in SCHEDULER_CLASS_NAMES:
        return None
    try:
        return PerflowSettings.from_config(config)
    except ValueError as error:
        raise ValueError(f"{SCHEDULER_CONFIG} ({config['_class_name']}): {error}") from None


def states_v_prediction(config: Optional[Mapping[str, Any]]) -> bool:
    """Whether a non-PeRFlow scheduler config says the network predicts v (diffusers' ``v_prediction``, as the
    SD2.x 768 models' configs do)."""
    return bool(config) and config.get("_class_name") not in SCHEDULER_CLASS_NAMES and config.get("prediction_type") == "v_prediction"
