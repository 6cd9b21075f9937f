"""Shared helpers for the tests that run against a real ComfyUI checkout (``COMFYUI_PATH``).

* ``requires_comfyui``: skip marker for every such test (CI has no ComfyUI).
* ``build_tiny_sd15_checkpoint(path, perflow=None, seed=0)``: a small single-file checkpoint with the
  SD1.5 (LDM) key layout that ComfyUI's ``load_state_dict_guess_config`` / CheckpointLoaderSimple
  detects as SD1.x. It does not import ComfyUI, so server tests can build it in the test process.
* ``import_comfy()`` / ``import_pack()``: ComfyUI in-process on the CPU and this repository as the
  package ``comfyui_perflow_pack`` (as ComfyUI imports it from ``custom_nodes/``).
* ``pack_core(submodule="")``: the pack's own ``perflow_core`` (``comfyui_perflow_pack.perflow_core``), also in
  a process without ComfyUI (the server tests). The ComfyUI tests never import the top-level ``perflow_core``:
  the code is loaded once, as the pack.
* ``recorded_timesteps(model)`` / ``flat(calls)``: the timesteps the diffusion network itself receives.
* ``run_node(node, **inputs)`` / ``node_text(node.execute(...))``: a node's outputs / the text it shows on the node.
* session fixtures ``tiny_sd15_checkpoint`` (built once per session), ``comfy``, ``perflow_pack`` and
  ``tiny_sd15`` (MODEL, CLIP, VAE loaded from the tiny checkpoint). Import them into a test module.
* ``model_folder(name, path)`` / ``output_directory(path)``: a ComfyUI model folder or the output folder pointed at a
  test's folder while a ``with`` block runs; ``state_dict_differences(actual, expected)``: what differs, tensor by tensor;
  ``run_output_node(node_class, hidden, **inputs)``: an output node called with its hidden inputs (prompt, workflow).
* ``write_tiny_delta(checkpoint, out)``: a small random delta for every UNet weight, diffusers key names.

The tiny checkpoint
-------------------
UNet (``model.diffusion_model.*``): model_channels 320, context_dim 768, in/out channels 4, one level
(channel_mult [1], num_res_blocks [1], no downsampling), one SpatialTransformer (conv proj_in, as
SD1.x) after the first res block, no middle block, two output res blocks, about 13.6M parameters.
ComfyUI's detection reads model_channels, context_dim, use_linear_in_transformer=False,
adm_in_channels=None and no temporal layers, which is all that ``supported_models.SD15`` matches on
(comfy/supported_models.py:30-37, comfy/model_detection.py:513-637). Without downsampling it runs on
latents of any size.

Text encoder (``cond_stage_model.transformer.text_model.*``): the full CLIP ViT-L/14 text model
(12 layers, width 768, 123M parameters; CheckpointLoaderSimple builds it at this fixed size), random,
stored as fp16 (about 246 MB).

VAE (``first_stage_model.taesd_encoder.* / taesd_decoder.*``): TAESD, which comfy/sd.py VAE.__init__
detects by ``taesd_decoder.1.weight`` (about 2.4M parameters).

Weights are seeded normal draws scaled by 1/sqrt(fan_in) (norm layers: weight 1, bias 0), so every
output is finite and of order one.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, Optional, Tuple

import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
requires_comfyui = pytest.mark.skipif(
    not COMFYUI_PATH, reason="COMFYUI_PATH is not set: real-ComfyUI tests skipped (point it at a ComfyUI checkout)"
)

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui_perflow_pack"

# ----------------------------------------------------------------------------- checkpoint layout
UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
VAE_PREFIX = "first_stage_model."
MODEL_CHANNELS = 320
CONTEXT_DIM = 768
TIME_EMBED_DIM = 4 * MODEL_CHANNELS
LATENT_CHANNELS = 4

# kinds: "w" weight (normal / sqrt(fan_in)), "b" bias, "one"/"zero" norm weight/bias, "emb" embedding table
Shapes = Dict[str, Tuple[Tuple[int, ...], str]]


def _norm(shapes: Shapes, prefix: str, channels: int) -> None:
    shapes[prefix + "weight"] = ((channels,), "one")
    shapes[prefix + "bias"] = ((channels,), "zero")


def _dense(shapes: Shapes, prefix: str, shape: Tuple[int, ...], bias: bool = True) -> None:
    shapes[prefix + "weight"] = (shape, "w")
    if bias:
        shapes[prefix + "bias"] = ((shape[0],), "b")


def _res_block(shapes: Shapes, prefix: str, channels_in: int, channels_out: int) -> None:
    _norm(shapes, prefix + "in_layers.0.", channels_in)
    _dense(shapes, prefix + "in_layers.2.", (channels_out, channels_in, 3, 3))
    _dense(shapes, prefix + "emb_layers.1.", (channels_out, TIME_EMBED_DIM))
    _norm(shapes, prefix + "out_layers.0.", channels_out)
    _dense(shapes, prefix + "out_layers.3.", (channels_out, channels_out, 3, 3))
    if channels_in != channels_out:
        _dense(shapes, prefix + "skip_connection.", (channels_out, channels_in, 1, 1))


def _spatial_transformer(shapes: Shapes, prefix: str, channels: int) -> None:
    _norm(shapes, prefix + "norm.", channels)
    _dense(shapes, prefix + "proj_in.", (channels, channels, 1, 1))  # conv: use_linear_in_transformer False (SD1.x)
    block = prefix + "transformer_blocks.0."
    for attention, context in (("attn1", channels), ("attn2", CONTEXT_DIM)):
        _dense(shapes, f"{block}{attention}.to_q.", (channels, channels), bias=False)
        _dense(shapes, f"{block}{attention}.to_k.", (channels, context), bias=False)
        _dense(shapes, f"{block}{attention}.to_v.", (channels, context), bias=False)
        _dense(shapes, f"{block}{attention}.to_out.0.", (channels, channels))
    _dense(shapes, block + "ff.net.0.proj.", (8 * channels, channels))  # GEGLU: 2 x (4 x channels)
    _dense(shapes, block + "ff.net.2.", (channels, 4 * channels))
    for norm in ("norm1.", "norm2.", "norm3."):
        _norm(shapes, block + norm, channels)
    _dense(shapes, prefix + "proj_out.", (channels, channels, 1, 1))


def tiny_sd15_unet_shapes() -> Shapes:
    """LDM key -> (shape, kind) of the reduced SD1.5 UNet, without the ``model.diffusion_model.`` prefix."""
    c = MODEL_CHANNELS
    shapes: Shapes = {}
    _dense(shapes, "time_embed.0.", (TIME_EMBED_DIM, c))
    _dense(shapes, "time_embed.2.", (TIME_EMBED_DIM, TIME_EMBED_DIM))
    _dense(shapes, "input_blocks.0.0.", (c, LATENT_CHANNELS, 3, 3))
    _res_block(shapes, "input_blocks.1.0.", c, c)
    _spatial_transformer(shapes, "input_blocks.1.1.", c)
    _res_block(shapes, "output_blocks.0.0.", 2 * c, c)  # concatenated skip from input_blocks.1
    _res_block(shapes, "output_blocks.1.0.", 2 * c, c)  # concatenated skip from input_blocks.0
    _norm(shapes, "out.0.", c)
    _dense(shapes, "out.2.", (LATENT_CHANNELS, c, 3, 3))
    return shapes


def tiny_sd15_unet_config() -> Dict[str, Any]:
    """What ComfyUI's model detection reads from the tiny UNet (for reference and checks)."""
    return {
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "model_channels": MODEL_CHANNELS,
        "num_res_blocks": [1],
        "channel_mult": [1],
        "transformer_depth": [1],
        "transformer_depth_output": [0, 0],
        "transformer_depth_middle": -2,
        "context_dim": CONTEXT_DIM,
        "use_linear_in_transformer": False,
        "adm_in_channels": None,
    }


def clip_l_shapes() -> Shapes:
    """The CLIP ViT-L/14 text model (HF names under ``text_model.``), without the checkpoint prefix."""
    width, layers, vocab, positions = 768, 12, 49408, 77
    shapes: Shapes = {
        "embeddings.token_embedding.weight": ((vocab, width), "emb"),
        "embeddings.position_embedding.weight": ((positions, width), "emb"),
    }
    for i in range(layers):
        layer = f"encoder.layers.{i}."
        for projection in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _dense(shapes, f"{layer}self_attn.{projection}.", (width, width))
        _norm(shapes, layer + "layer_norm1.", width)
        _norm(shapes, layer + "layer_norm2.", width)
        _dense(shapes, layer + "mlp.fc1.", (4 * width, width))
        _dense(shapes, layer + "mlp.fc2.", (width, 4 * width))
    _norm(shapes, "final_layer_norm.", width)
    return shapes


def taesd_shapes() -> Shapes:
    """TAESD (comfy/taesd/taesd.py), the keys ComfyUI's VAE loader detects, without the checkpoint prefix."""
    shapes: Shapes = {}
    w = 64

    def conv(prefix: str, channels_in: int, channels_out: int, bias: bool = True) -> None:
        _dense(shapes, prefix, (channels_out, channels_in, 3, 3), bias=bias)

    def block(prefix: str) -> None:  # Block(64, 64): three convs, identity skip
        for index in (0, 2, 4):
            conv(f"{prefix}conv.{index}.", w, w)

    encoder = "taesd_encoder."
    conv(encoder + "0.", 3, w)
    block(encoder + "1.")
    for start in (2, 6, 10):
        conv(f"{encoder}{start}.", w, w, bias=False)  # stride 2
        for offset in (1, 2, 3):
            block(f"{encoder}{start + offset}.")
    conv(encoder + "14.", w, LATENT_CHANNELS)

    decoder = "taesd_decoder."
    conv(decoder + "1.", LATENT_CHANNELS, w)
    for start in (3, 8, 13):
        for offset in (0, 1, 2):
            block(f"{decoder}{start + offset}.")
        conv(f"{decoder}{start + 4}.", w, w, bias=False)  # after the Upsample at start + 3
    block(decoder + "18.")
    conv(decoder + "19.", w, 3)
    shapes["vae_scale"] = ((), "one")
    shapes["vae_shift"] = ((), "zero")
    return shapes


def _random_tensors(shapes: Shapes, prefix: str, generator: torch.Generator, dtype: torch.dtype, gains: Optional[Dict[str, float]] = None) -> Dict[str, torch.Tensor]:
    tensors = {}
    for name, (shape, kind) in shapes.items():
        if kind == "one":
            value = torch.ones(shape)
        elif kind == "zero":
            value = torch.zeros(shape)
        elif kind == "emb":
            value = torch.randn(shape, generator=generator) * 0.02
        elif kind == "b":
            value = torch.randn(shape, generator=generator) * 0.02
        else:
            fan_in = 1
            for size in shape[1:]:
                fan_in *= size
            value = torch.randn(shape, generator=generator) / fan_in**0.5
        if gains and name in gains:
            value = value * gains[name]
        tensors[prefix + name] = value.to(dtype).contiguous()
    return tensors


# The final UNet conv sees a GroupNorm+SiLU output of roughly unit scale; gain 1.5 gives eps outputs of
# standard deviation about 1, like a trained model's.
_UNET_GAINS = {"out.2.weight": 1.5}


def build_tiny_sd15_checkpoint(path, perflow=None, seed: int = 0):
    """Write a tiny random SD1.5-layout checkpoint (.safetensors) that ComfyUI loads as SD1.x; returns ``path``.

    Args:
        path: destination file (its folder must exist); a ``str`` or ``os.PathLike``.
        perflow: optional PeRFlow settings to store in ``perflow.*`` entries: the pack's
            ``PerflowSettings`` (``pack_core().PerflowSettings``, written by the pack's own writer),
            or a dict with any of ``theta`` ([K, 3] or [K]), ``segments`` (int), ``segment_boundaries``
            (list), ``prediction_type`` (str), ``version`` (str), stored as given.
        seed: seed of the random weights (same seed, same file contents).

    UNet fp32 (13.6M parameters), CLIP-L fp16 (123M), TAESD fp32 (2.4M): about 310 MB, 2-3 s on a CPU.
    Needs only torch and safetensors (no ComfyUI import).
    """
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors: Dict[str, torch.Tensor] = {}
    tensors.update(_random_tensors(tiny_sd15_unet_shapes(), UNET_PREFIX, generator, torch.float32, _UNET_GAINS))
    tensors.update(_random_tensors(clip_l_shapes(), CLIP_PREFIX, generator, torch.float16))
    tensors.update(_random_tensors(taesd_shapes(), VAE_PREFIX, generator, torch.float32))
    metadata = {"format": "pt"}
    if perflow is not None:
        perflow_tensors, perflow_metadata = _perflow_entries(perflow)
        tensors.update(perflow_tensors)
        metadata.update(perflow_metadata)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _perflow_entries(perflow: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    if not isinstance(perflow, dict):  # a PerflowSettings: the project's own writer decides the layout
        return _perflow_entries_of_settings(perflow)
    tensors, metadata = {}, {}
    if "theta" in perflow:
        tensors["perflow.theta"] = torch.as_tensor(perflow["theta"], dtype=torch.float32).contiguous()
    if "segment_boundaries" in perflow:
        tensors["perflow.segment_boundaries"] = torch.as_tensor(perflow["segment_boundaries"], dtype=torch.float32)
    if "segments" in perflow:
        tensors["perflow.segments"] = torch.tensor(int(perflow["segments"]), dtype=torch.int64)
    for field in ("prediction_type", "version"):
        if field in perflow:
            metadata[f"perflow.{field}"] = str(perflow[field])
    return tensors, metadata


def _perflow_entries_of_settings(settings: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """The perflow.* tensors and metadata that the pack's writer stores for ``settings`` (the pack's
    ``PerflowSettings``), read back from a small theta file (the writer's public API)."""
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as folder:
        theta_path = Path(folder) / "theta.safetensors"
        pack_core("checkpoint").save_theta_file(theta_path, settings)
        with safe_open(str(theta_path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            metadata = {key: value for key, value in (handle.metadata() or {}).items() if key.startswith("perflow.")}
    return tensors, metadata


def parameter_counts() -> Dict[str, int]:
    """Parameters per part of the tiny checkpoint (without building it)."""

    def count(shapes: Shapes) -> int:
        total = 0
        for shape, _ in shapes.values():
            n = 1
            for size in shape:
                n *= size
            total += n
        return total

    return {"unet": count(tiny_sd15_unet_shapes()), "clip": count(clip_l_shapes()), "vae": count(taesd_shapes())}


BUILD_SECONDS: list = []  # how long each session build of the tiny checkpoint took


@pytest.fixture(scope="session")
def tiny_sd15_checkpoint(tmp_path_factory) -> Path:
    """The tiny SD1.5 checkpoint (no perflow.* entries), built once per test session."""
    path = tmp_path_factory.mktemp("tiny_sd15") / "tiny_sd15.safetensors"
    started = time.perf_counter()
    build_tiny_sd15_checkpoint(path)
    BUILD_SECONDS.append(time.perf_counter() - started)
    return path


# ------------------------------------------------------------------------------ ComfyUI in-process
def import_comfy():
    """Put COMFYUI_PATH on sys.path, force the CPU, import the comfy modules the tests use; returns ``comfy``.

    ``args.cpu`` must be set before anything imports comfy.model_management (which probes CUDA on import), and
    ``args.base_directory`` (a temporary folder, as the server's --base-directory) before folder_paths is imported:
    ComfyUI writes input/, temp/ and output/ there, never into COMFYUI_PATH (read-only in CI).
    """
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is not set: real-ComfyUI tests skipped (point it at a ComfyUI checkout)")
    path = str(Path(COMFYUI_PATH).resolve())
    if not sys.path or sys.path[0] != path:
        # First on the path, as when main.py runs: ComfyUI's `nodes`, `utils`, ... are top-level modules.
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args

        args.cpu = True
        if "folder_paths" not in sys.modules:
            args.base_directory = tempfile.mkdtemp(prefix="perflow_comfy_inprocess_")
            atexit.register(shutil.rmtree, args.base_directory, ignore_errors=True)
    import comfy
    import comfy.model_management
    import comfy.model_sampling
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils

    comfy_nodes = sys.modules.get("nodes")
    if comfy_nodes is not None and not str(getattr(comfy_nodes, "__file__", "")).startswith(path):
        raise RuntimeError(f"`nodes` was imported from {comfy_nodes.__file__}, not from ComfyUI at {path}")
    return comfy


def load_pack():
    """This repository as the package ``comfyui_perflow_pack``, loaded once, as ComfyUI's
    ``nodes.load_custom_node`` loads a custom node folder: ``spec_from_file_location(<name>, <folder>/__init__.py)``,
    which makes the folder the package path. Its ``__init__`` registers the nodes only when ``comfy_api`` is
    importable, so in a process without ComfyUI (the server tests) this gives the pack's ``perflow_core`` alone."""
    pack = sys.modules.get(PACK_NAME)
    if pack is None:
        spec = importlib.util.spec_from_file_location(PACK_NAME, REPO_ROOT / "__init__.py")
        pack = importlib.util.module_from_spec(spec)
        sys.modules[PACK_NAME] = pack
        try:
            spec.loader.exec_module(pack)
        except BaseException:
            del sys.modules[PACK_NAME]
            raise
    return pack


def pack_core(submodule: str = ""):
    """The pack's own ``perflow_core`` (or one of its modules, e.g. ``pack_core("checkpoint")``)."""
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.perflow_core" + (f".{submodule}" if submodule else ""))


def import_pack():
    """The pack loaded in ComfyUI (see ``load_pack``); returns its ``nodes`` subpackage."""
    import_comfy()
    pack = load_pack()
    if not hasattr(pack, "comfy_entrypoint"):
        # Loaded earlier in this process without ComfyUI (pack_core() for the server's files): its __init__ runs
        # again now that comfy_api is importable; the modules it already loaded are not loaded again.
        pack.__spec__.loader.exec_module(pack)
    return importlib.import_module(PACK_NAME + ".nodes")


def load_checkpoint(path) -> Tuple[Any, Any, Any]:
    """MODEL, CLIP, VAE from a checkpoint, as CheckpointLoaderSimple does."""
    comfy = import_comfy()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True, embedding_directory=None)
    return model, clip, vae


def node_output(result) -> tuple:
    """The outputs of a node's execute: a V3 ``io.NodeOutput`` (``.result``) or a V1 tuple."""
    return tuple(result.result) if hasattr(result, "result") else tuple(result)


def node_text(result) -> str:
    """The text a V3 node's ``io.NodeOutput`` shows on the node (its ``ui`` ``text`` entries), as ComfyUI sends it."""
    assert result.ui is not None, "the node returned no ui output"
    ui = result.ui if isinstance(result.ui, dict) else result.ui.as_dict()
    return "".join(ui["text"])


def run_node(node_class, *args, **kwargs) -> tuple:
    """Call a V3 node (classmethod ``execute``) or a V1 node (its ``FUNCTION``) and return its outputs."""
    if hasattr(node_class, "define_schema"):
        return node_output(node_class.execute(*args, **kwargs))
    return node_output(getattr(node_class(), node_class.FUNCTION)(*args, **kwargs))


def run_output_node(node_class, hidden: Optional[Dict[str, Any]] = None, **inputs):
    """Call a V3 output node as ComfyUI's executor does: on a clone of its class that carries the hidden inputs
    (``{"prompt": ..., "extra_pnginfo": ...}``); returns its ``io.NodeOutput``."""
    from comfy_api.latest import io

    values = {getattr(io.Hidden, name): value for name, value in (hidden or {}).items()}
    return node_class.PREPARE_CLASS_CLONE(values).execute(**inputs)


@pytest.fixture(scope="session")
def comfy():
    return import_comfy()


@pytest.fixture(scope="session")
def perflow_pack():
    return import_pack()


@pytest.fixture(scope="session")
def tiny_sd15(tiny_sd15_checkpoint):
    """(MODEL, CLIP, VAE) of the tiny checkpoint, loaded once per session. Clone before patching."""
    return load_checkpoint(tiny_sd15_checkpoint)


class FixedNoise:
    """A NOISE object (like RandomNoise) that returns a given tensor."""

    seed = 0

    def __init__(self, noise: torch.Tensor):
        self.noise = noise

    def generate_noise(self, input_latent):
        return self.noise.clone()


def write_tiny_delta(checkpoint, out) -> None:
    """A small random delta (seed 0, scale 1e-3, fp16) with diffusers UNet key names for every weight of the UNet in
    ``checkpoint`` (ComfyUI's own key map) written to ``out``. Needs ComfyUI imported (``import_comfy``; the test
    server's support runs it in a ComfyUI subprocess)."""
    import comfy.model_detection
    import comfy.utils
    from safetensors.torch import load_file, save_file

    state_dict = load_file(str(checkpoint))
    config = comfy.model_detection.model_config_from_unet(state_dict, UNET_PREFIX)
    assert config is not None, f"ComfyUI does not detect the UNet of {checkpoint}"
    generator = torch.Generator().manual_seed(0)
    delta = {}
    for diffusers_key, comfy_key in sorted(comfy.utils.unet_to_diffusers(config.unet_config).items()):
        weight = state_dict.get(UNET_PREFIX + comfy_key)
        if weight is not None:
            delta[diffusers_key] = (torch.randn(weight.shape, generator=generator) * 1e-3).to(torch.float16)
    assert len(delta) > 10, f"only {len(delta)} UNet keys mapped"
    save_file(delta, str(out))


# ------------------------------------------------------------------------------ folders and state dicts
@contextlib.contextmanager
def model_folder(folder_name: str, path, is_default: bool = False) -> Iterator[Path]:
    """``path`` added to ComfyUI's model folder ``folder_name`` (checkpoints, perflow_deltas, ...) while the block runs;
    with ``is_default``, first (where a node that saves into the kind writes)."""
    import folder_paths

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path(folder_name, str(path), is_default=is_default)
    try:
        yield path
    finally:
        folder_paths.folder_names_and_paths[folder_name][0].remove(str(path))
        folder_paths.filename_list_cache.pop(folder_name, None)


@contextlib.contextmanager
def only_model_folder(folder_name: str, path) -> Iterator[Path]:
    """``path`` as the only folder of ComfyUI's model folder kind ``folder_name`` while the block runs."""
    import folder_paths

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    paths = folder_paths.folder_names_and_paths[folder_name][0]
    saved = list(paths)
    paths[:] = [str(path)]
    folder_paths.filename_list_cache.pop(folder_name, None)
    try:
        yield path
    finally:
        paths[:] = saved
        folder_paths.filename_list_cache.pop(folder_name, None)


@contextlib.contextmanager
def output_directory(path) -> Iterator[Path]:
    """ComfyUI's output folder set to ``path`` while the block runs."""
    import folder_paths

    previous = folder_paths.get_output_directory()
    Path(path).mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(path))
    try:
        yield Path(path)
    finally:
        folder_paths.set_output_directory(previous)


def state_dict_differences(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """Key -> what differs (missing, unexpected, dtype, shape or values), compared tensor by tensor, exactly."""
    differences = {key: "missing" for key in expected.keys() - actual.keys()}
    differences.update({key: "unexpected" for key in actual.keys() - expected.keys()})
    for key in expected.keys() & actual.keys():
        a, e = actual[key], expected[key]
        if a.dtype != e.dtype or a.shape != e.shape:
            differences[key] = f"{a.dtype} {list(a.shape)} instead of {e.dtype} {list(e.shape)}"
        elif not torch.equal(a.cpu(), e.cpu()):
            differences[key] = f"values differ by up to {float((a.cpu().double() - e.cpu().double()).abs().max()):.3g}"
    return differences


# ------------------------------------------------------------------------------ progress bar and Cancel
@contextlib.contextmanager
def progress_bar_updates():
    """Record ``(value, total)`` of every ComfyUI progress-bar update (the hook the server installs)."""
    import comfy.utils

    updates = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        yield updates
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)


@contextlib.contextmanager
def interrupted_after_calls(calls: list, count: int):
    """Press ComfyUI's Cancel (its interrupt flag) from the progress bar once ``calls`` holds ``count`` network calls;
    yields a record whose ``calls_when_set`` is how many there were then. The flag is cleared on exit."""
    import comfy.model_management
    import comfy.utils

    record = SimpleNamespace(calls_when_set=None)

    def hook(value, total, preview, node_id=None):
        if record.calls_when_set is None and len(calls) >= count:
            record.calls_when_set = len(calls)
            comfy.model_management.interrupt_current_processing(True)

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield record
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)


@contextlib.contextmanager
def recorded_timesteps(model):
    """Record the ``timesteps`` argument of every call of the UNet's ``_forward`` (after ComfyUI's
    DIFFUSION_MODEL wrappers, so what the network itself receives). Yields the list of per-call lists."""
    network = model.model.diffusion_model
    original = network._forward
    calls = []

    def recording(x, timesteps=None, *args, **kwargs):
        calls.append([float(t) for t in timesteps.flatten()])
        return original(x, timesteps, *args, **kwargs)

    network._forward = recording
    try:
        yield calls
    finally:
        del network._forward


def flat(calls):
    return [t for call in calls for t in call]
