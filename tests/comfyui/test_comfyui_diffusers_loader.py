"""Spec: Load PeRFlow Diffusers Model (issue 10, point 1) in a real ComfyUI, in-process on the CPU.

Tiny diffusers-format folders in the structures of the PeRFlow releases (tests/support/diffusers_folders.py:
SD1.5, SD2.1-v and SDXL layouts that ComfyUI's own detection recognises, fp16, built once per session in a
temporary folder) are offered by the node, loaded by ComfyUI's loaders (the SDXL one with the releases' v0-fix
weight names, which ComfyUI's own diffusers loader does not find), and sampled with the network seeing the
timesteps of the settings the folder's scheduler config gives, or the family's defaults. Bad folders are refused
naming model_path.
"""

from __future__ import annotations

import gc
import importlib
import json
import shutil

import pytest
import torch

from support.comfyui import PACK_NAME, comfy, flat, model_folder, node_output, node_text, pack_core, perflow_pack, recorded_timesteps, requires_comfyui, run_node  # noqa: F401
from support.diffusers_folders import (
    COMFY_MODEL_CONFIGS,
    ORIGINAL_PERFLOW_SCHEDULER,
    FolderSpec,
    build_folders,
    conditioning,
    stock_scheduler,
)

pytestmark = requires_comfyui

FOLDERS = {
    # The original's scheduler config with its legacy name of diff_eps and three windows (boundaries 666.67, 333.33).
    "sd15_perflow_scheduler": FolderSpec("sd15", dict(ORIGINAL_PERFLOW_SCHEDULER, prediction_type="epsilon", num_time_windows=3)),
    # SD2.1-768's DDIM config: v_prediction, not a PeRFlow config.
    "sd21v_ddim_scheduler": FolderSpec("sd21v", stock_scheduler("DDIMScheduler", "v_prediction")),
    # SDXL's Euler config (its "epsilon" is not PeRFlow's) and the SDXL releases' variant file names.
    "sdxl_v0_fix": FolderSpec("sdxl", stock_scheduler("EulerDiscreteScheduler", "epsilon"), variant="v0-fix"),
}
# folder: (model sampling ComfyUI ends with, the settings the loader's PERFLOW gives on it, steps, network timesteps)
EXPECTED = {
    "sd15_perflow_scheduler": ("eps", dict(segments=3, prediction_type="diff_eps"), 3, [1000.0, 666.0, 333.0]),
    "sd21v_ddim_scheduler": ("v", dict(segments=4, prediction_type="velocity"), 4, [1000.0, 750.0, 500.0, 250.0]),
    "sdxl_v0_fix": ("eps", dict(segments=4, prediction_type="ddim_eps"), 4, [1000.0, 750.0, 500.0, 250.0]),
}
LATENT_SHAPE = (1, 4, 8, 8)


@pytest.fixture(scope="session")
def diffusers_root(tmp_path_factory, perflow_pack):
    """The folders, built once per session and registered as a models/diffusers folder; deleted at the end (about
    2.9 GB, more than pytest's kept temporary folders should hold)."""
    root = tmp_path_factory.mktemp("diffusers_models")
    try:
        with model_folder("diffusers", build_folders(root, FOLDERS)):
            yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def loader(perflow_pack):
    return importlib.import_module(PACK_NAME + ".nodes.loader_nodes").PerflowDiffusersLoaderNode


@pytest.fixture(scope="module", params=sorted(FOLDERS))
def loaded(request, diffusers_root, loader):
    """(folder name, MODEL, CLIP, VAE, PERFLOW, the text on the node) of one folder, loaded once for the tests that use it."""
    import comfy.model_management

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result = loader.execute(model_path=request.param)
    outputs = node_output(result)
    yield (request.param, *outputs, node_text(result))
    del outputs
    comfy.model_management.unload_all_models()
    gc.collect()
    torch.set_num_threads(threads)


def perflow_ksampler(model, family, choice, steps):
    nodes = importlib.import_module(PACK_NAME + ".nodes")
    latent = {"samples": torch.zeros(LATENT_SHAPE)}
    return run_node(
        nodes.PerflowKSamplerNode, model=model, seed=5, steps=steps, cfg=1.0, positive=conditioning(family, 1),
        negative=conditioning(family, 2), latent_image=latent, denoise=1.0, perflow=choice,
    )[0]["samples"]


def test_the_node_offers_every_folder_holding_a_model_index(diffusers_root, loader):
    (model_path,) = loader.define_schema().inputs
    assert set(FOLDERS) <= set(model_path.options)


def test_comfyui_detects_each_family(loaded):
    name, model, clip, vae, _, _ = loaded
    assert type(model.model.model_config).__name__ == COMFY_MODEL_CONFIGS[FOLDERS[name].family]
    ModelSpace = pack_core("k_sampling").ModelSpace
    assert ModelSpace.of(model.get_model_object("model_sampling")).kind == EXPECTED[name][0]
    assert clip is not None and vae is not None


def test_perflow_output_is_the_scheduler_config_or_the_family_default(loaded):
    name, _, _, _, choice, _ = loaded
    settings = pack_core().PerflowSettings(**EXPECTED[name][1])
    if FOLDERS[name].scheduler["_class_name"] == "PeRFlowScheduler":
        assert choice.settings == settings and not choice.auto_prediction_type
    else:  # the parameterisation is picked for the model when it samples (the next test: it is the family's)
        assert choice.auto_prediction_type and choice.settings.replace(prediction_type=settings.prediction_type) == settings


def test_the_network_sees_the_settings_timesteps(loaded):
    name, model, _, _, choice, _ = loaded
    _, settings, steps, timesteps = EXPECTED[name]
    with recorded_timesteps(model) as calls:
        samples = perflow_ksampler(model, FOLDERS[name].family, choice, steps)
    assert flat(calls) == timesteps
    assert torch.isfinite(samples).all()
    explicit = importlib.import_module(PACK_NAME + ".nodes.glue").PerflowChoice(pack_core().PerflowSettings(**settings))
    assert torch.equal(samples, perflow_ksampler(model, FOLDERS[name].family, explicit, steps))


def test_the_node_shows_the_settings_it_read(loaded):
    name, _, _, _, choice, text = loaded
    settings = pack_core().PerflowSettings(**EXPECTED[name][1])
    parameterisation = f"auto -> {settings.prediction_type} for this model" if choice.auto_prediction_type else None
    assert text == settings.describe(parameterisation)


def test_the_vae_decodes(loaded):
    vae = loaded[3]
    image = vae.decode(torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(0)))
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


# ----------------------------------------------------------------------------------------------- bad folders
@pytest.fixture
def bad_folders(tmp_path, perflow_pack):
    """An empty models/diffusers folder registered for one test."""
    with model_folder("diffusers", tmp_path) as root:
        yield root


def _folder(root, name, files):
    for relative, content in {"model_index.json": json.dumps({"_class_name": "StableDiffusionPipeline"}), **files}.items():
        path = root / name / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)


def _refused(loader, name):
    with pytest.raises(ValueError) as raised:
        run_node(loader, model_path=name)
    message = str(raised.value)
    assert message.startswith(f"Load PeRFlow Diffusers Model: model_path {name!r}"), message
    return message


def test_a_folder_without_unet_weights_is_refused_naming_model_path(bad_folders, loader):
    _folder(bad_folders, "no_unet", {"unet/config.json": "{}"})
    assert "unet/ has no weights" in _refused(loader, "no_unet")


def test_an_unreadable_scheduler_config_is_refused_naming_it(bad_folders, loader):
    _folder(bad_folders, "bad_scheduler", {"scheduler/scheduler_config.json": "{not json"})
    assert "scheduler/scheduler_config.json is not readable JSON" in _refused(loader, "bad_scheduler")


def test_an_unreadable_model_index_is_refused_naming_it(bad_folders, loader):
    _folder(bad_folders, "bad_index", {"model_index.json": b"\xff\xfe"})
    assert "model_index.json is not readable JSON" in _refused(loader, "bad_index")


def test_bad_perflow_settings_in_the_scheduler_config_are_refused_naming_the_key(bad_folders, loader):
    config = dict(ORIGINAL_PERFLOW_SCHEDULER, num_time_windows=0)
    _folder(bad_folders, "bad_windows", {"scheduler/scheduler_config.json": json.dumps(config)})
    message = _refused(loader, "bad_windows")
    assert "scheduler/scheduler_config.json (PeRFlowScheduler): num_time_windows" in message


def test_a_unet_layout_comfyui_does_not_know_is_refused_naming_model_path(bad_folders, loader):
    from safetensors.torch import save_file

    _folder(bad_folders, "odd_unet", {"unet/config.json": "{}"})
    save_file({"conv_in.weight": torch.zeros(96, 4, 3, 3)}, str(bad_folders / "odd_unet" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert "ComfyUI does not recognise the UNet in unet/" in _refused(loader, "odd_unet")


def test_a_name_that_is_not_a_listed_folder_is_refused_listing_the_folders(bad_folders, loader):
    _folder(bad_folders, "present", {})
    message = _refused(loader, "absent")
    assert "is not a folder with a model_index.json in models/diffusers; available: " in message and "present" in message
