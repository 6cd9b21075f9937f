"""Single-file checkpoints that carry PeRFlow settings beside the model weights.

On-disk format (format version ``0.1``)
---------------------------------------

PeRFlow settings live in entries whose names start with ``perflow.`` (``perflow/`` is accepted as an
alternative spelling when reading). A loader that ignores unknown keys still loads the model.

**safetensors** (``.safetensors``, ``.sft``)

=================================  ============  ==============================================================
key                                where         value
=================================  ============  ==============================================================
``perflow.theta``                  tensor        float32 or float64, ``[K]`` (gain column) or ``[K, P]``, P <= 3
``perflow.segment_boundaries``     tensor        1-D float (or int), training timesteps, strictly decreasing
                                                 from T (or T - 1) to 0, e.g. ``[1000, 750, 500, 250, 0]``
``perflow.segments``               tensor        0-d or 1-element integer (int64), the number of segments K
``perflow.prediction_type``        metadata      ``diff_eps``, ``ddim_eps`` or ``velocity`` (legacy ``epsilon``
                                                 means ``diff_eps``; ``v_prediction`` means ``velocity``)
``perflow.version``                metadata      format version, e.g. ``"0.1"``
``perflow.num_train_timesteps``    metadata      T as a string, e.g. ``"1000"``
=================================  ============  ==============================================================

Metadata may also give ``perflow.segments``, ``perflow.segment_boundaries``, ``perflow.theta`` and
``perflow.num_train_timesteps`` as JSON strings (``"4"``, ``"[1000, 500, 0]"``). A field given twice
(tensor and metadata, or both spellings) must have the same value in both places.

The writers store ``perflow.theta`` as float32 ``[K, 3]``, ``perflow.segment_boundaries`` as float32
``[K + 1]`` (the K uniform boundaries when the settings have none), ``perflow.segments`` as a 0-d
int64 tensor, and ``perflow.prediction_type``, ``perflow.version`` and ``perflow.num_train_timesteps``
as metadata. On reading, boundaries equal (in float32) to the K uniform ones mean uniform segments
(``segment_boundaries=None``), which are computed exactly as the original PeRFlow does.

**torch pickles** (``.ckpt``, ``.pt``, ``.pth``, ``.bin``), read only with ``torch.load(...,
weights_only=True)``; a file that needs arbitrary code to load is refused and nothing in it runs.

* flat: the same ``perflow.*`` keys beside the weights; ``perflow.prediction_type`` and
  ``perflow.version`` are strings, numbers may be tensors, ints or lists;
* nested: ``{"perflow": {"theta": ..., "segments": ..., "segment_boundaries": ..., "prediction_type": ...,
  "version": ..., "num_train_timesteps": ...}, "state_dict": {...model weights...}}``. The writer uses
  this layout for every checkpoint whose weights sit under ``state_dict``.

Every field is optional; a missing one takes the :class:`PerflowSettings` default (K = 4 uniform
segments, theta = 0, ``ddim_eps``, T = 1000). theta must have one row per segment.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import pickle
import re
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .settings import FIELD_NAMES, PerflowSettings, check_stored_size

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

PERFLOW_PREFIXES = ("perflow.", "perflow/")
PERFLOW_FIELDS = FIELD_NAMES
TEXT_FIELDS = ("prediction_type", "version")
NESTED_SETTINGS_KEY = "perflow"
NESTED_WEIGHTS_KEY = "state_dict"
SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")

# field -> (the key as found in the file, its value)
Entries = Dict[str, Tuple[str, Any]]


# ------------------------------------------------------------------------------------ public API
def read_perflow_settings(path: PathLike) -> PerflowSettings:
    """Read the PeRFlow settings of a checkpoint without loading its model tensors.

    Args:
        path: a ``.safetensors``/``.sft`` file or a torch pickle (``.ckpt``, ``.pt``, ``.pth``, ``.bin``).

    Returns:
        [`PerflowSettings`]; fields the file does not give take their defaults (see
        [`perflow_keys_present`] for which ones it gives).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: unknown extension, unreadable file, or a bad ``perflow.*`` entry (the message
            names the file and the key).
    """
    path = _existing_file(path)
    entries = _safetensors_entries(path) if _file_kind(path) == "safetensors" else _pickle_entries(path)
    with _naming(path):
        return _settings_from_entries(entries)


def perflow_keys_present(path: PathLike) -> List[str]:
    """The PeRFlow entries a checkpoint gives, as sorted canonical names (``["perflow.theta", ...]``)."""
    path = _existing_file(path)
    if _file_kind(path) == "safetensors":
        with _open_safetensors(path) as handle:
            keys = list(handle.keys()) + list((handle.metadata() or {}).keys())
    else:
        checkpoint = _load_pickle(path)
        keys = list(checkpoint.keys())
        if isinstance(checkpoint.get(NESTED_WEIGHTS_KEY), Mapping):
            keys += list(checkpoint[NESTED_WEIGHTS_KEY].keys())
        with _naming(path):
            keys += [f"perflow.{field}" for field in _nested_settings(checkpoint) or {}]
    return sorted({f"perflow.{_perflow_field(key)}" for key in keys if _is_perflow_key(key)})


def has_perflow_settings(path: PathLike) -> bool:
    """Whether a checkpoint gives any PeRFlow setting."""
    return bool(perflow_keys_present(path))


def split_perflow_state_dict(
    state_dict: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None
) -> Tuple[PerflowSettings, Dict[str, Any]]:
    """Separate the PeRFlow settings from the model weights of an already loaded checkpoint.

    For callers that load the whole file anyway (e.g. a ComfyUI loader). ``state_dict`` is left unchanged.

    Args:
        state_dict: the loaded checkpoint, flat (``perflow.*`` keys beside the weights) or nested
            (``{"perflow": {...}, "state_dict": {...}}``).
        metadata: the safetensors metadata, if any.

    Returns:
        ``(settings, weights)``: the [`PerflowSettings`] and the model weights without PeRFlow entries
        (``state_dict["state_dict"]``'s for the nested layout).
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"state_dict must be a dict of tensors; got {type(state_dict).__name__}")
    with _naming("state dict"):
        entries = _dict_entries(state_dict)
        _collect_metadata(metadata, entries)
        settings = _settings_from_entries(entries)
    return settings, _model_weights(state_dict)


def perflow_fields_in(state_dict: Mapping[str, Any], metadata: Optional[Mapping[str, str]] = None) -> List[str]:
    """The PeRFlow fields (``theta``, ``prediction_type``, ...) an already loaded checkpoint gives."""
    entries = _dict_entries(state_dict)
    _collect_metadata(metadata, entries)
    return sorted(entries)


def checkpoint_format(path: PathLike) -> str:
    """``"safetensors"`` or ``"pickle"`` by extension; other extensions raise ValueError listing the accepted ones."""
    return _file_kind(Path(path))


def load_pickle_checkpoint(path: PathLike) -> Mapping[str, Any]:
    """A legacy ``.ckpt/.pt/.pth/.bin`` file, read only with ``torch.load(weights_only=True, mmap=True)``.

    The whole mapping is returned (the nested ``{"perflow", "state_dict"}`` layout intact) so that
    ``split_perflow_state_dict`` can take settings and weights from one read.
    """
    return _load_pickle(_existing_file(path))


def write_perflow_checkpoint(
    source: PathLike,
    destination: PathLike,
    settings: PerflowSettings,
    extra_metadata: Optional[Mapping[str, str]] = None,
    overwrite: bool = False,
) -> None:
    """Write a new checkpoint: ``source``'s weights (and metadata) with its PeRFlow entries replaced by ``settings``.

    Args:
        source: the checkpoint to copy; it is never modified.
        destination: the new file; must differ from ``source``. A safetensors source needs a
            safetensors destination; a pickle source may go to either (a pickle keeps its layout).
        settings: the PeRFlow settings to store.
        extra_metadata: further safetensors metadata (string to string, no ``perflow.*`` keys).
        overwrite: replace an existing ``destination``; without it the file is created exclusively and an
            existing one raises FileExistsError.
    """
    source, destination = _existing_file(source), Path(destination)
    if not overwrite and os.path.lexists(destination):
        raise _exists(destination)
    _refuse_same_file(source, destination)
    settings = _revalidated(settings)
    extra = _checked_extra_metadata(extra_metadata)
    if _file_kind(source) == "safetensors":
        _rewrite_safetensors(source, destination, settings, extra, overwrite)
    else:
        _rewrite_pickle(source, destination, settings, extra, overwrite)


def save_theta_file(path: PathLike, settings: PerflowSettings, overwrite: bool = False) -> None:
    """Write a small safetensors file holding only the ``perflow.*`` tensors and metadata.

    The file is created exclusively: an existing ``path`` raises FileExistsError unless ``overwrite``."""
    path = Path(path)
    if _file_kind(path) != "safetensors":
        raise ValueError(f"{path}: a theta file is safetensors; give it a {' or '.join(SAFETENSORS_EXTENSIONS)} name")
    settings = _revalidated(settings)
    _save_safetensors(path, _perflow_tensors(settings), _perflow_metadata(settings), overwrite)


def write_under_free_name(folder: PathLike, name: str, suffix: str, write: Callable[[Path], None]) -> Path:
    """``write(path)`` to ``folder/name<suffix>``, or ``name_1``, ``name_2``, ... when taken: ``write`` creates
    its file exclusively (FileExistsError when it exists, as `save_theta_file` and `write_perflow_checkpoint`),
    so two writers racing for one name each get their own file. Returns the path written."""
    for count in itertools.count():
        path = Path(folder) / (f"{name}{suffix}" if count == 0 else f"{name}_{count}{suffix}")
        try:
            write(path)
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def write_once_under_free_name(paths: Iterable[PathLike], write: Callable[[str], None]) -> Path:
    """``write(temporary)`` once, into a temporary file beside the first of ``paths`` (names in one folder), then
    give the file the first of ``paths`` that is free: it is hard-linked there, which fails on a taken name, so an
    existing file is never replaced and two writers racing for one name each keep their own file. For writers too
    costly to run again per name (a whole model checkpoint). Returns the path written."""
    names = iter(paths)
    first = Path(next(names))
    with _written_temporary(first, write) as temporary:
        for path in itertools.chain([first], map(Path, names)):
            try:
                _link_new(temporary, path)
                return path
            except FileExistsError:
                continue
    raise FileExistsError(f"every name offered for the new file beside {first} is taken")


# -------------------------------------------------------------------------------------- entries
def _perflow_field(key: Any) -> Optional[str]:
    if not isinstance(key, str):
        return None
    for prefix in PERFLOW_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None


def _is_perflow_key(key: Any) -> bool:
    return _perflow_field(key) is not None


def _add_entry(entries: Entries, key: str, value: Any, field: Optional[str] = None) -> None:
    field = field if field is not None else _perflow_field(key)
    if field not in PERFLOW_FIELDS:
        accepted = ", ".join(f"perflow.{name}" for name in PERFLOW_FIELDS)
        raise ValueError(f"unknown PeRFlow key {key!r}; accepted keys are {accepted} (or spelled perflow/...)")
    if field in entries and not _same_value(entries[field][1], value):
        raise ValueError(f"{entries[field][0]} and {key} give different values; give the setting once")
    entries.setdefault(field, (key, value))


def _same_value(first: Any, second: Any) -> bool:
    if isinstance(first, str) or isinstance(second, str):
        return first == second
    try:
        a, b = (np.asarray(_plain(v), dtype=np.float64).ravel() for v in (first, second))
    except (TypeError, ValueError):
        return False
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-6, atol=1e-6))


def _plain(value: Any) -> Any:
    return value.detach().cpu().to(torch.float64).numpy() if isinstance(value, torch.Tensor) else value


def _collect_flat(mapping: Mapping[str, Any], entries: Entries) -> None:
    for key, value in mapping.items():
        if _is_perflow_key(key):
            _add_entry(entries, key, value)


def _collect_metadata(metadata: Optional[Mapping[str, str]], entries: Entries) -> None:
    for key, text in (metadata or {}).items():
        field = _perflow_field(key)
        if field is not None:
            _add_entry(entries, key, _metadata_value(key, field, text))


def _metadata_value(key: str, field: str, text: str) -> Any:
    if field in TEXT_FIELDS or field not in PERFLOW_FIELDS:
        return text
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{key} in the metadata is nested too deeply; expected JSON such as '4' or '[1000, 500, 0]'") from None
    except (TypeError, ValueError):
        raise ValueError(f"{key} in the metadata must be JSON, e.g. '4' or '[1000, 500, 0]'; got {text[:80]!r}") from None


def _safetensors_entries(path: Path) -> Entries:
    """The perflow entries of a safetensors file; only the ``perflow.*`` tensors are read."""
    entries: Entries = {}
    with _open_safetensors(path) as handle, _naming(path):
        for key in handle.keys():
            if _is_perflow_key(key):
                check_stored_size(tuple(handle.get_slice(key).get_shape()), key)
                _add_entry(entries, key, handle.get_tensor(key))
        _collect_metadata(handle.metadata(), entries)
    return entries


def _pickle_entries(path: Path) -> Entries:
    checkpoint = _load_pickle(path)
    with _naming(path):
        return _dict_entries(checkpoint)


def _dict_entries(checkpoint: Mapping[str, Any]) -> Entries:
    entries: Entries = {}
    nested = _nested_settings(checkpoint)
    if nested is not None:
        for field, value in nested.items():
            _add_entry(entries, f"perflow.{field}", value, field=str(field))
    _collect_flat(checkpoint, entries)
    weights = checkpoint.get(NESTED_WEIGHTS_KEY)
    if isinstance(weights, Mapping):
        _collect_flat(weights, entries)
    return entries


def _nested_settings(checkpoint: Mapping[str, Any]) -> Optional[Mapping[str, Any]]:
    """The ``{"perflow": {...}}`` entry, if any; anything else under that key would drop the settings silently."""
    nested = checkpoint.get(NESTED_SETTINGS_KEY)
    if nested is not None and not isinstance(nested, Mapping):
        raise ValueError(
            f"the {NESTED_SETTINGS_KEY!r} entry must be a dict of settings ({', '.join(PERFLOW_FIELDS)}); got a {type(nested).__name__}"
        )
    return nested


def _model_weights(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    weights = checkpoint.get(NESTED_WEIGHTS_KEY)
    if not isinstance(weights, Mapping):
        weights = {k: v for k, v in checkpoint.items() if not (k == NESTED_SETTINGS_KEY and isinstance(v, Mapping))}
    return _without_perflow(weights)


def _without_perflow(mapping: Mapping[str, Any]) -> Dict[str, Any]:
    return {key: value for key, value in mapping.items() if not _is_perflow_key(key)}


# -------------------------------------------------------------------------------------- parsing
def _settings_from_entries(entries: Entries) -> PerflowSettings:
    """The settings the entries give (checked by PerflowSettings, errors naming the key as found in the file)."""
    values = {field: value for field, (_, value) in entries.items()}
    return PerflowSettings.from_entries(values, names={field: key for field, (key, _) in entries.items()})


# ------------------------------------------------------------------------------------ file I/O
@contextmanager
def _naming(source: Any) -> Iterator[None]:
    """Prefix ValueErrors with the file (or object) they are about."""
    try:
        yield
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def _existing_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    return path


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_EXTENSIONS:
        return "safetensors"
    if suffix in PICKLE_EXTENSIONS:
        return "pickle"
    raise ValueError(
        f"{path}: unknown checkpoint extension {suffix!r}; accepted are {', '.join(SAFETENSORS_EXTENSIONS)} "
        f"(safetensors) and {', '.join(PICKLE_EXTENSIONS)} (torch pickles)"
    )


def _open_safetensors(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as error:
        raise ValueError(f"{path} is truncated or not a safetensors file ({error})") from None


def _load_safetensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    with _open_safetensors(path) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def _load_pickle(path: Path) -> Mapping[str, Any]:
    """``torch.load`` with ``weights_only=True`` only; errors become ValueErrors naming the file."""
    try:
        checkpoint = _torch_load_weights_only(path)
    except pickle.UnpicklingError as error:
        raise _refused(path, error) from None
    except OSError:
        raise
    except Exception as error:  # a damaged pickle can fail in the unpickler in many ways
        reason = str(error).strip().split(". ")[0] or type(error).__name__
        raise ValueError(f"{path} is truncated or not a torch file ({reason})") from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}; expected a dict of tensors")
    return checkpoint


def _torch_load_weights_only(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        # Legacy (non-zip) torch files cannot be memory-mapped.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)


def _refused(path: Path, error: pickle.UnpicklingError) -> ValueError:
    text = str(error)
    needed = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    # torch's own names are allowed when complete; a cut-off one means a damaged file.
    if needed and not needed.group(1).startswith("torch."):
        return ValueError(
            f"{path} needs arbitrary code to load: it refers to {needed.group(1)}, which is neither a tensor "
            "nor a plain container. Loading it with torch.load(weights_only=True) was refused and nothing in "
            "the file was executed."
        )
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    reason = (detail.group(1) if detail else text).strip().split(". ")[0]
    return ValueError(
        f"{path} is truncated, not a torch file, or needs arbitrary code to load; torch.load(weights_only=True) "
        f"refused it and nothing in the file was executed ({reason})"
    )


def _refuse_same_file(source: Path, destination: Path) -> None:
    same = os.path.realpath(source) == os.path.realpath(destination)
    if same or (destination.exists() and os.path.samefile(source, destination)):
        raise ValueError(f"destination {destination} is the source file; write the new checkpoint to another path")


def _write_new_file(destination: Path, write: Callable[[str], None], overwrite: bool) -> None:
    """Write through a temporary file in the same folder, then put it in place at once: as a new file (a hard
    link, which fails if ``destination`` exists, so two writers never replace each other's file) or, with
    ``overwrite``, replacing what is there. The file gets the process umask's mode, as ``open`` gives."""
    with _written_temporary(destination, write) as temporary:
        if overwrite:
            os.replace(temporary, destination)
        else:
            _link_new(temporary, destination)


@contextmanager
def _written_temporary(destination: Path, write: Callable[[str], None]) -> Iterator[Path]:
    """``write`` into a new temporary file beside ``destination``; the temporary file is removed on leaving."""
    temporary = _new_temporary(destination)
    mode = stat.S_IMODE(os.stat(temporary).st_mode)
    try:
        write(str(temporary))
        os.chmod(temporary, mode)  # a writer that replaces the file (safetensors does) leaves its own 0600
        yield temporary
    finally:
        if temporary.exists():
            temporary.unlink()


def _new_temporary(destination: Path) -> Path:
    """An empty file beside ``destination``, created exclusively with mode 0o666 less the umask."""
    while True:
        candidate = destination.with_name(f".{destination.name}.{os.urandom(6).hex()}.tmp")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue


def _link_new(temporary: Path, destination: Path) -> None:
    try:
        os.link(temporary, destination)
    except FileExistsError:
        raise _exists(destination) from None


def _exists(destination: Path) -> FileExistsError:
    return FileExistsError(f"{destination} exists; it is never replaced (pass overwrite=True to replace it)")


def _save_safetensors(destination: Path, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str], overwrite: bool) -> None:
    storable = _unshared(tensors)
    _write_new_file(destination, lambda temporary: save_file(storable, temporary, metadata=metadata), overwrite)


def _unshared(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """safetensors stores neither shared nor non-contiguous tensors: give those their own memory."""
    seen, result = set(), {}
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        shared = pointer in seen and tensor.numel() > 0
        result[key] = tensor.clone() if shared or not tensor.is_contiguous() else tensor
        seen.add(pointer)
    return result


def _only_tensors(weights: Mapping[str, Any], source: Path) -> Dict[str, torch.Tensor]:
    dropped = [key for key, value in weights.items() if not isinstance(value, torch.Tensor)]
    if dropped:
        logger.warning("%s: safetensors holds tensors only; left out %s", source, ", ".join(map(str, dropped)))
    return {key: value for key, value in weights.items() if isinstance(value, torch.Tensor)}


# --------------------------------------------------------------------------------------- writing
def _rewrite_safetensors(source: Path, destination: Path, settings: PerflowSettings, extra: Dict[str, str], overwrite: bool) -> None:
    if _file_kind(destination) != "safetensors":
        raise ValueError(f"{destination}: a safetensors source is written to a .safetensors destination only")
    tensors, metadata = _load_safetensors(source)
    metadata = {**_without_perflow(metadata), **extra, **_perflow_metadata(settings)}
    _save_safetensors(destination, {**_without_perflow(tensors), **_perflow_tensors(settings)}, metadata, overwrite)


def _rewrite_pickle(source: Path, destination: Path, settings: PerflowSettings, extra: Dict[str, str], overwrite: bool) -> None:
    checkpoint = _load_pickle(source)
    if _file_kind(destination) == "safetensors":
        weights = _only_tensors(_model_weights(checkpoint), source)
        metadata = {"format": "pt", **extra, **_perflow_metadata(settings)}
        _save_safetensors(destination, {**weights, **_perflow_tensors(settings)}, metadata, overwrite)
        return
    if extra:
        raise ValueError(f"{destination}: extra_metadata needs a .safetensors destination (torch pickles have no metadata)")
    updated = _with_perflow_entries(checkpoint, settings)
    _write_new_file(destination, lambda temporary: torch.save(updated, temporary), overwrite)


def _revalidated(settings: PerflowSettings) -> PerflowSettings:
    if not isinstance(settings, PerflowSettings):
        raise ValueError(f"settings must be a PerflowSettings; got {type(settings).__name__}")
    return settings


def _checked_extra_metadata(extra_metadata: Optional[Mapping[str, str]]) -> Dict[str, str]:
    extra = dict(extra_metadata or {})
    for key, value in extra.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"extra_metadata maps strings to strings; got {key!r}: {value!r}")
        if _is_perflow_key(key):
            raise ValueError(f"extra_metadata key {key!r}: perflow.* entries come from `settings`")
    return extra


def _perflow_tensors(settings: PerflowSettings) -> Dict[str, torch.Tensor]:
    return settings.file_entries()[0]


def _perflow_metadata(settings: PerflowSettings) -> Dict[str, str]:
    return settings.file_entries()[1]


def _with_perflow_entries(checkpoint: Mapping[str, Any], settings: PerflowSettings) -> Dict[str, Any]:
    values = settings.values(model_file=True)
    weights = checkpoint.get(NESTED_WEIGHTS_KEY)
    if isinstance(weights, Mapping):
        updated = _without_perflow(checkpoint)
        updated[NESTED_WEIGHTS_KEY] = _without_perflow(weights)
        updated[NESTED_SETTINGS_KEY] = values
        return updated
    updated = _model_weights(checkpoint)
    updated.update({f"perflow.{field}": value for field, value in values.items()})
    return updated
