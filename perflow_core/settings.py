"""`PerflowSettings`: what a PeRFlow sampler needs besides the model, as one immutable, validated value.

`FIELDS` names every setting once: its attribute (also its ``perflow.<name>`` key in a checkpoint), its key in a
diffusers scheduler config, how a safetensors file stores it and its default. Every mapping (scheduler config,
state dict, checkpoint tensors and metadata, theta files, node values) is derived from that table, and every
check of a setting lives here: an error names the input the value came from (a config key, a checkpoint key, a
node input).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from .parameterization import canonical_prediction_type
from .segments import Segments, short_repr, validate_boundaries, validate_num_segments
from .theta import as_theta, parse_theta_text

logger = logging.getLogger(__name__)

FORMAT_VERSION = "0.1"
DEFAULT_SEGMENTS = 4
DEFAULT_PREDICTION_TYPE = "ddim_eps"
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
# T (and so K <= T) is bounded before anything sized by it is allocated: theta [K, 3], the [T] noise schedule.
# Released models use 1000; 100000 leaves a wide margin and keeps every such table below a few MB.
NUM_TRAIN_TIMESTEPS_RANGE = (2, 100_000)
# The most numbers a stored setting may hold (theta [K, 3] with K <= T), checked before it is read or converted.
MAX_STORED_NUMBERS = 3 * NUM_TRAIN_TIMESTEPS_RANGE[1]
# Where an img2img start inside a segment is put: the original's DDPM marginal at that timestep (its add_noise),
# or the point on the segment's straight path between its noised ends (an option of this project).
IMG2IMG_STARTS = ("original", "straight_path")
CHECKPOINT_PREFIX = "perflow."


@dataclass(frozen=True)
class Field:
    """One setting: ``name`` (attribute, ``perflow.<name>`` in files, state-dict key), ``config_key`` (diffusers
    config), ``stored_as`` (``tensor`` or ``metadata`` in safetensors files; ``config`` for sampler options that
    live in a scheduler config and a state dict but not in model files)."""

    name: str
    config_key: str
    stored_as: str


FIELDS = (
    Field("segments", "segments", "tensor"),
    Field("segment_boundaries", "segment_boundaries", "tensor"),
    Field("theta", "theta_init", "tensor"),
    Field("prediction_type", "prediction_type", "metadata"),
    Field("version", "version", "metadata"),
    Field("num_train_timesteps", "num_train_timesteps", "metadata"),
    Field("t_clean", "t_clean", "config"),
    Field("img2img_start", "img2img_start", "config"),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)
CONFIG_KEYS = {f.name: f.config_key for f in FIELDS}
# The original PeRFlowScheduler's name for the number of segments.
CONFIG_ALIASES = {"num_time_windows": "segments"}
# Scheduler classes whose configs state PeRFlow settings (``_class_name``): ours and the original's.
SCHEDULER_CLASS_NAMES = ("PerflowScheduler", "PeRFlowScheduler")


class PerflowSettings:
    """PeRFlow sampling settings: immutable, comparable, validated on construction.

    Args:
        segments: number of segments K (default: as many as ``segment_boundaries`` give, else 4).
        segment_boundaries: boundaries in training timesteps (``[T, ..., 0]``), or None for K uniform ones.
            Boundaries equal to the K uniform ones are stored as None (the original's uniform windows).
        theta: ``[K]`` or ``[K, P <= 3]`` correction (None or zeros = the original PeRFlow); read back as a
            float64 ``[K, 3]`` tensor.
        t_clean: where the last segment ends, in [0, its start) (the original's ``t_clean``; the last step
            still goes to t = 0, as in the original).
        img2img_start: ``original`` (a start inside a segment is the DDPM marginal at its timestep, as the
            original's ``add_noise``) or ``straight_path`` (the point between the segment's noised ends).
        prediction_type: ``diff_eps``, ``ddim_eps`` or ``velocity`` (``epsilon`` and ``v_prediction`` are
            read as ``diff_eps`` and ``velocity``).
        version: format version of the PeRFlow settings.
        num_train_timesteps: T.
    """

    __slots__ = ("segments", "_boundaries", "_theta", "prediction_type", "version", "num_train_timesteps", "t_clean", "img2img_start")

    def __init__(
        self,
        segments: Any = None,
        segment_boundaries: Any = None,
        theta: Any = None,
        prediction_type: Any = DEFAULT_PREDICTION_TYPE,
        version: Any = FORMAT_VERSION,
        num_train_timesteps: Any = DEFAULT_NUM_TRAIN_TIMESTEPS,
        t_clean: Any = 0.0,
        img2img_start: Any = "original",
        *,
        names: Optional[Mapping[str, str]] = None,
    ):
        name = {**{f: f for f in FIELD_NAMES}, **(names or {})}
        steps = _train_timesteps(num_train_timesteps, name["num_train_timesteps"])
        boundaries = _boundaries(segment_boundaries, steps, name["segment_boundaries"])
        count = _segment_count(segments, boundaries, theta, steps, name)
        theta_value = _theta(theta, count, name["theta"], name["segments"] if boundaries is None else name["segment_boundaries"])
        _set = object.__setattr__
        _set(self, "num_train_timesteps", steps)
        _set(self, "segments", count)
        _set(self, "_boundaries", None if boundaries is None or _is_uniform(boundaries, steps) else tuple(boundaries))
        _set(self, "_theta", tuple(tuple(row) for row in theta_value.tolist()))
        _set(self, "prediction_type", canonical_prediction_type(prediction_type, name["prediction_type"]))
        _set(self, "version", _version(version, name["version"]))
        _set(self, "t_clean", _t_clean(t_clean, boundaries, count, steps, name["t_clean"]))
        _set(self, "img2img_start", _choice(img2img_start, IMG2IMG_STARTS, name["img2img_start"]))

    # ------------------------------------------------------------------------------------- value type
    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"PerflowSettings is immutable; use .replace({key}=...)")

    def _key(self) -> Tuple:
        hidden = {"theta": "_theta", "segment_boundaries": "_boundaries"}
        return tuple(getattr(self, hidden.get(f, f)) for f in FIELD_NAMES)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PerflowSettings) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        values = ", ".join(f"{f}={self._plain(f)!r}" for f in FIELD_NAMES)
        return f"PerflowSettings({values})"

    def __str__(self) -> str:
        return self.describe()

    def describe(self, parameterisation: Optional[str] = None) -> str:
        """The settings as plain lines for a person (a node's text, Preview Any): parameterisation (or the text
        given for it), K and the boundaries, one theta row per segment in the form the theta input accepts."""
        segments = self.build_segments()
        layout = "uniform" if self.segment_boundaries is None else "custom"
        lines = [
            f"parameterisation: {parameterisation or self.prediction_type}",
            f"segments: K = {self.segments}, boundaries {_number_text(segments.boundaries)} ({layout})",
            "theta (gain, window-end scale, output change), one row per segment:",
            *(_number_text(row) for row in self._theta),
        ]
        if self.t_clean:
            lines.append(f"t_clean: {self.t_clean:g}")
        if self.img2img_start != "original":
            lines.append(f"img2img_start: {self.img2img_start}")
        if self.num_train_timesteps != DEFAULT_NUM_TRAIN_TIMESTEPS:
            lines.append(f"num_train_timesteps: {self.num_train_timesteps}")
        return "\n".join(lines)

    def replace(self, **changes: Any) -> "PerflowSettings":
        """A copy with some settings changed (validated like the constructor)."""
        unknown = sorted(set(changes) - set(FIELD_NAMES))
        if unknown:
            raise TypeError(f"PerflowSettings has no setting {', '.join(unknown)}; settings are {', '.join(FIELD_NAMES)}")
        values = {f: self._plain(f) for f in FIELD_NAMES}
        if "segment_boundaries" in changes and "segments" not in changes:
            values["segments"] = None
        if ("segments" in changes or "segment_boundaries" in changes) and "theta" not in changes:
            values["theta"] = None
        return PerflowSettings(**{**values, **changes})

    @property
    def segment_boundaries(self) -> Optional[list]:
        """The boundaries in training timesteps (``[T, ..., 0]``), or None for K uniform segments."""
        return None if self._boundaries is None else list(self._boundaries)

    @property
    def theta(self) -> torch.Tensor:
        """The ``[K, 3]`` float64 correction (a new tensor each time: the settings stay unchanged)."""
        return torch.tensor(self._theta, dtype=torch.float64)

    @property
    def theta_is_zero(self) -> bool:
        return not any(v for row in self._theta for v in row)

    def build_segments(self) -> Segments:
        if self.segment_boundaries is None:
            return Segments.uniform(self.segments, self.num_train_timesteps, self.t_clean)
        return Segments.from_boundaries(self.segment_boundaries, self.num_train_timesteps, self.t_clean)

    def steps_for(self, requested: int, name: str = "steps") -> int:
        """The step count to sample with: at least one step per segment. Fewer are raised to K with a warning,
        as the original PeRFlow does."""
        steps = _whole_number(requested, name, minimum=1)
        if steps > self.num_train_timesteps:
            raise ValueError(
                f"{name}={steps} is above num_train_timesteps={self.num_train_timesteps}: each step needs its own training timestep"
            )
        if steps < self.segments:
            logger.warning("%s=%d is below the number of segments K=%d; using %d (one step per segment)", name, steps, self.segments, self.segments)
            return self.segments
        return steps

    # ---------------------------------------------------------------------------------- mappings
    def _plain(self, field: str) -> Any:
        """A field as plain Python data (theta as nested lists, boundaries as a list)."""
        if field == "theta":
            return [list(row) for row in self._theta]
        return getattr(self, field)

    def values(self, model_file: bool = False) -> Dict[str, Any]:
        """Every field by name, theta as a float64 tensor and boundaries as a list (always given, uniform too): the
        ``perflow`` entries of a scheduler state dict, or with ``model_file`` those of a torch checkpoint (without
        the sampler options, which model files do not carry)."""
        names = [f.name for f in FIELDS if not (model_file and f.stored_as == "config")]
        values = {f: self._plain(f) for f in names}
        values["theta"] = self.theta
        values["segment_boundaries"] = list(self.build_segments().boundaries)
        return values

    def to_config(self) -> Dict[str, Any]:
        """Keyword arguments for ``PerflowScheduler(...)`` (its config keys; theta None when zero)."""
        values = {f: self._plain(f) for f in FIELD_NAMES}
        if self.theta_is_zero:
            values["theta"] = None
        return {CONFIG_KEYS[f]: value for f, value in values.items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "PerflowSettings":
        """Settings from a scheduler config (config keys, plus the original's ``num_time_windows``); other keys
        are not settings and are left alone. Errors name the config key."""
        values: Dict[str, Any] = {}
        names: Dict[str, str] = {}
        for field in FIELD_NAMES:
            if config.get(CONFIG_KEYS[field]) is not None:
                values[field], names[field] = config[CONFIG_KEYS[field]], CONFIG_KEYS[field]
        for alias, field in CONFIG_ALIASES.items():
            if config.get(alias) is None:
                continue
            if field in values:
                first = _whole_number(values[field], names[field], minimum=1)
                if _whole_number(config[alias], alias, minimum=1) != first:
                    raise ValueError(f"{names[field]}={values[field]!r} disagrees with {alias}={config[alias]!r}; give one of them")
            values[field], names[field] = config[alias], alias
        return cls(**values, names=names)

    def file_entries(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        """``perflow.*`` tensors and metadata of a safetensors file: theta float32 ``[K, 3]``, boundaries float32
        ``[K + 1]`` (the uniform ones too), segments 0-d int64; the rest as metadata strings."""
        stored = {
            "theta": self.theta.to(torch.float32),
            "segment_boundaries": torch.tensor(self.build_segments().boundaries, dtype=torch.float32),
            "segments": torch.tensor(self.segments, dtype=torch.int64),
        }
        tensors = {CHECKPOINT_PREFIX + f.name: stored[f.name] for f in FIELDS if f.stored_as == "tensor"}
        # Sampler options (stored_as "config") are not model settings: model files do not carry them.
        metadata = {CHECKPOINT_PREFIX + f.name: str(getattr(self, f.name)) for f in FIELDS if f.stored_as == "metadata"}
        return tensors, metadata

    @classmethod
    def from_entries(cls, entries: Mapping[str, Any], names: Optional[Mapping[str, str]] = None) -> "PerflowSettings":
        """Settings from values by field name, as found in a file, a state dict or a node (tensors, numbers,
        lists, JSON or typed text); missing fields take their defaults. ``names`` says where each came from."""
        unknown = sorted(set(entries) - set(FIELD_NAMES))
        if unknown:
            accepted = ", ".join(CHECKPOINT_PREFIX + f for f in FIELD_NAMES)
            raise ValueError(f"unknown PeRFlow setting {', '.join((names or {}).get(k, k) for k in unknown)}; accepted are {accepted}")
        return cls(**{f: v for f, v in entries.items() if v is not None}, names=names)


def _number_text(values: Any) -> str:
    """Numbers as short text, comma separated (1000, 750, 0.05; no float64 repr)."""
    return ", ".join(f"{float(v):g}" for v in values)


# ------------------------------------------------------------------------------------- field checks
def check_stored_size(shape: Tuple[int, ...], name: str) -> None:
    """Refuse a stored setting holding more numbers than any valid one can (read from a file's header, before
    its data is read)."""
    count = int(np.prod(shape, dtype=object)) if len(shape) else 1
    if count > MAX_STORED_NUMBERS:
        raise ValueError(f"{name} holds {count} numbers (shape {list(shape)}); a PeRFlow setting holds at most {MAX_STORED_NUMBERS}")


def _train_timesteps(value: Any, name: str) -> int:
    low, high = NUM_TRAIN_TIMESTEPS_RANGE
    number = _as_whole_number(value)
    if number is None or not low <= number <= high:
        raise ValueError(f"{name} must be a whole number in [{low}, {high}]; got {short_repr(value)}")
    return number


def _whole_number(value: Any, name: str, minimum: int) -> int:
    number = _as_whole_number(value)
    if number is None or number < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}; got {value!r}")
    return number


def _as_whole_number(value: Any) -> Optional[int]:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            return None
        return int(value.item())
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return None


def _numbers(value: Any, name: str) -> Any:
    """Tensors, arrays, lists and JSON text as a float64 tensor of real numbers (bools, text inside a list, None
    and numbers beyond float64 are refused, as are more numbers than any setting holds); other text is left for
    the caller to parse."""
    if isinstance(value, str):
        value = _json_or_text(value, name)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        check_stored_size(tuple(value.shape), name)
    if isinstance(value, np.ndarray) and value.dtype.kind in "iuf":
        value = torch.from_numpy(value.astype(np.float64))
    elif isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must hold real numbers; got dtype {value.dtype}")
        return value.detach().cpu().to(torch.float64)
    if isinstance(value, (list, tuple)):
        return _number_table(value, name)
    return value


def _json_or_text(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{name} is nested too deeply to be a list of numbers") from None
    except ValueError:
        return text


def _number_table(rows: Any, name: str) -> torch.Tensor:
    """A list of numbers, or of rows of numbers, as a float64 tensor; each entry must be an int or a float."""
    check_stored_size((sum(len(row) if isinstance(row, (list, tuple)) else 1 for row in rows),), name)
    values = [[_real_number(v, name) for v in row] if isinstance(row, (list, tuple)) else _real_number(row, name) for row in rows]
    try:
        return torch.tensor(values, dtype=torch.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numbers: a list, or equally long rows; got {short_repr(rows)}") from None


def _real_number(value: Any, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must hold numbers (not text, bools, None or lists nested deeper than rows); got {short_repr(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} holds a number too large for float64") from None


def _boundaries(value: Any, num_train_timesteps: int, name: str) -> Optional[list]:
    if value is None:
        return None
    value = _numbers(value, name)
    if isinstance(value, str):
        value = _typed_numbers(value, name)
        if not value:
            return None
    if isinstance(value, torch.Tensor) and value.ndim != 1:
        raise ValueError(f"{name} must be a 1-D list of timesteps; got shape {list(value.shape)}")
    return validate_boundaries(value, num_train_timesteps, name)


def _typed_numbers(text: str, name: str) -> list:
    """Numbers typed by a person, separated by commas, semicolons or spaces."""
    try:
        return [float(token) for token in text.replace(";", ",").replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"{name} must be numbers separated by commas, e.g. '999, 700, 400, 150, 0'; got {short_repr(text)}") from None


def _segment_count(segments: Any, boundaries: Optional[list], theta: Any, num_train_timesteps: int, name: Mapping[str, str]) -> int:
    """K from ``segments``, the boundaries, or (a theta file alone) theta's rows; they must agree."""
    count = None if segments is None else validate_num_segments(_as_whole_number(segments) or segments, num_train_timesteps, name["segments"])
    if boundaries is not None:
        if count is not None and count != len(boundaries) - 1:
            raise ValueError(
                f"{name['segments']} is {count} but {name['segment_boundaries']} {boundaries} make "
                f"{len(boundaries) - 1} segments; make them agree"
            )
        return len(boundaries) - 1
    if count is not None:
        return count
    rows = _row_count(theta, name["theta"])
    return validate_num_segments(rows, num_train_timesteps, name["theta"] + " rows") if rows else DEFAULT_SEGMENTS


def _row_count(theta: Any, name: str) -> Optional[int]:
    theta = _numbers(theta, name)
    if isinstance(theta, str):
        theta = parse_theta_text(theta, None, name)
    if isinstance(theta, (list, tuple)):
        return len(theta) or None
    shape = tuple(getattr(theta, "shape", ()))
    return shape[0] if len(shape) in (1, 2) and shape[0] else None


def _theta(value: Any, count: int, name: str, count_name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and not value.is_floating_point():
        raise ValueError(f"{name} must be a float32 or float64 tensor; got {value.dtype}")
    rows = _row_count(value, name)
    if rows is not None and rows != count and not (rows == 1 and isinstance(value, str)):
        raise ValueError(f"{name} has {rows} rows but there are {count} segments (from {count_name}); give one row per segment")
    value = _numbers(value, name)
    if isinstance(value, str):
        return parse_theta_text(value, count, name)
    return as_theta(value, count, name)


def _is_uniform(boundaries: list, num_train_timesteps: int) -> bool:
    uniform = Segments.uniform(len(boundaries) - 1, num_train_timesteps).boundaries
    return bool(np.array_equal(np.float32(boundaries), np.float32(uniform)))


def _t_clean(value: Any, boundaries: Optional[list], count: int, num_train_timesteps: int, name: str) -> float:
    last_start = (boundaries[-2] / num_train_timesteps) if boundaries is not None else 1.0 / count
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not 0 <= value < last_start:
        raise ValueError(f"{name} must be a number in [0, {last_start:g}) (where the last segment starts); got {value!r}")
    return float(value)


def _choice(value: Any, choices: Tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _version(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a version string such as '0.1'; got {value!r}")
    return value
