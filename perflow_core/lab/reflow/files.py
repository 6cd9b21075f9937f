"""A student as one .safetensors file: its weights, its class and config and how it was trained (metadata), and
the ``perflow.*`` settings a `PerflowScheduler` reads."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

from diffusers.models.modeling_utils import ModelMixin
from safetensors import safe_open
from safetensors.torch import save_file

from ...checkpoint import PERFLOW_PREFIXES, read_perflow_settings, write_perflow_checkpoint
from ...settings import PerflowSettings
from .student import STUDENT_CLASSES

STUDENT_CONFIG_KEY = "student_config"
STUDENT_CLASS_KEY = "student_class"
STUDENT_TRAINING_KEY = "student_training"


def save_student(
    path: Union[str, Path],
    student: ModelMixin,
    settings: PerflowSettings,
    training: Optional[Dict[str, object]] = None,
) -> None:
    """One .safetensors file: the student's weights, its class and config (metadata) and the ``perflow.*`` settings.

    Args:
        path: the file to write.
        student: a network of a class in ``STUDENT_CLASSES``.
        settings: the PeRFlow sampling settings (prediction type, segments, theta).
        training: how it was trained (JSON-ready), kept in the ``student_training`` metadata.
    """
    class_name = type(student).__name__
    if class_name not in STUDENT_CLASSES:
        raise ValueError(f"unknown student class {class_name}; known: {', '.join(STUDENT_CLASSES)}")
    metadata = {
        "format": "pt",
        STUDENT_CLASS_KEY: class_name,
        STUDENT_CONFIG_KEY: json.dumps(_plain_config(student), sort_keys=True),
    }
    if training is not None:
        metadata[STUDENT_TRAINING_KEY] = json.dumps(training, sort_keys=True)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in student.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        weights_file = Path(folder) / "weights.safetensors"
        save_file(weights, str(weights_file), metadata=metadata)
        write_perflow_checkpoint(weights_file, path, settings, overwrite=True)


def load_student(path: Union[str, Path]) -> Tuple[ModelMixin, PerflowSettings]:
    """Rebuild a student saved by `save_student` (or ``perflow train-student``).

    Returns:
        ``(model, settings)``: the network in eval mode and the file's [`PerflowSettings`]
        (``PerflowScheduler(**settings.to_config())`` samples it).
    """
    settings = read_perflow_settings(path)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        weights = {key: handle.get_tensor(key) for key in handle.keys() if not key.startswith(PERFLOW_PREFIXES)}
    if STUDENT_CONFIG_KEY not in metadata:
        raise ValueError(f"{path} has no {STUDENT_CONFIG_KEY!r} metadata; it was not written by save_student")
    class_name = metadata.get(STUDENT_CLASS_KEY, "ReflowStudent")
    if class_name not in STUDENT_CLASSES:
        raise ValueError(f"{path}: unknown student class {class_name!r}; known: {', '.join(STUDENT_CLASSES)}")
    model = STUDENT_CLASSES[class_name].from_config(json.loads(metadata[STUDENT_CONFIG_KEY]))
    model.load_state_dict(weights, strict=True)
    return model.eval(), settings


def student_training(path: Union[str, Path]) -> Optional[Dict[str, object]]:
    """How a student file was trained (its ``student_training`` metadata), or None if it does not say."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        text = (handle.metadata() or {}).get(STUDENT_TRAINING_KEY)
    return json.loads(text) if text else None


def student_smoothing(path: Union[str, Path]) -> float:
    """The smoothing of the analytic teacher a student file was trained from (its training metadata)."""
    smoothing = (student_training(path) or {}).get("smoothing")
    if smoothing is None:
        raise ValueError(f"{path} does not record its teacher's smoothing (student_training metadata); pass it explicitly")
    return float(smoothing)


def _plain_config(model: ModelMixin) -> Dict[str, object]:
    return {key: value for key, value in dict(model.config).items() if not key.startswith("_")}
