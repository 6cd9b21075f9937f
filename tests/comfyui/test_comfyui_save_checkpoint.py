"""Save PeRFlow Checkpoint in a real ComfyUI (in-process, CPU): one .safetensors file with the model (delta weights
merged), text encoder, VAE and the PeRFlow settings, read back by the stock Load Checkpoint and by ours.

The tiny SD1.5 checkpoint (tests/support/comfyui.py) gets a random delta for every UNet weight (diffusers key names,
write_tiny_delta) applied by Apply PeRFlow Delta Weights at strength 0.5, and is saved with K = 3, non-zero theta and
ddim_eps. What the loaders give back is compared tensor by tensor, exactly.
"""

from __future__ import annotations

import importlib
import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from support.comfyui import (  # noqa: F401  (fixtures are used by name)
    PACK_NAME,
    UNET_PREFIX,
    comfy,
    model_folder,
    node_text,
    output_directory,
    pack_core,
    perflow_pack,
    requires_comfyui,
    run_node,
    run_output_node,
    state_dict_differences,
    tiny_sd15,
    tiny_sd15_checkpoint,
    write_tiny_delta,
)

pytestmark = requires_comfyui

PREFIX = "checkpoints/PeRFlow"
DELTA_NAME = "tiny_delta.safetensors"
STRENGTH = 0.5
THETA_TEXT = "0.10, -0.05, 0.20; -0.08, 0.03, -0.10; 0.05, 0.02, 0.15"
HIDDEN = {"prompt": {"1": {"class_type": "PerflowSaveCheckpoint", "inputs": {}}}, "extra_pnginfo": {"workflow": {"nodes": []}}}


def pack_module(name: str):
    return importlib.import_module(f"{PACK_NAME}.nodes.{name}")


def save(model, clip, vae, choice, prefix=PREFIX):
    return run_output_node(pack_module("save_nodes").PerflowSaveCheckpointNode, HIDDEN, model=model, clip=clip, vae=vae, perflow=choice, filename_prefix=prefix)


def unload_models():
    """Saving patches the weights of the loaded model in place; unloading restores the shared tiny model."""
    import comfy.model_management

    comfy.model_management.unload_all_models()


@pytest.fixture(scope="module")
def saved(comfy, perflow_pack, tiny_sd15, tiny_sd15_checkpoint, tmp_path_factory):
    """The tiny model with the delta applied, saved once with non-default settings (output folder kept for the module)."""
    folder = tmp_path_factory.mktemp("save_checkpoint")
    (folder / "deltas").mkdir()
    write_tiny_delta(tiny_sd15_checkpoint, folder / "deltas" / DELTA_NAME)
    model, clip, vae = tiny_sd15
    choice = pack_module("settings_node").build_choice("ddim_eps", 3, "", THETA_TEXT)
    loader_nodes = pack_module("loader_nodes")
    with model_folder(loader_nodes.DELTA_FOLDER, folder / "deltas"), output_directory(folder / "output") as output:
        patched = run_node(loader_nodes.PerflowApplyDeltaNode, model=model, delta_name=DELTA_NAME, strength=STRENGTH)[0]
        result = save(patched, clip, vae, choice)
        unload_models()
        yield SimpleNamespace(
            path=output / "checkpoints" / "PeRFlow_00001_.safetensors",
            message=node_text(result),
            output=output,
            choice=choice,
            clip=clip,
            vae=vae,
            delta_path=folder / "deltas" / DELTA_NAME,
        )


STOCK, OURS = "stock Load Checkpoint", "Load PeRFlow Checkpoint"
LOADERS = [STOCK, OURS]


@pytest.fixture(scope="module")
def loaded(saved) -> dict:
    """Loader name -> its outputs from the saved file: (MODEL, CLIP, VAE) from the stock loader, and with PERFLOW from ours."""
    import nodes as comfy_nodes

    with model_folder("checkpoints", saved.path.parent):
        return {
            STOCK: run_node(comfy_nodes.CheckpointLoaderSimple, ckpt_name=saved.path.name),
            OURS: run_node(pack_module("loader_nodes").PerflowCheckpointLoaderNode, ckpt_name=saved.path.name),
        }


def expected_unet(comfy, tiny_sd15_checkpoint, delta_path, unet_config) -> dict:
    """The base checkpoint's UNet with strength * delta added (delta keys are diffusers names: ComfyUI's key map)."""
    to_comfy = comfy.utils.unet_to_diffusers(unet_config)
    with safe_open(str(tiny_sd15_checkpoint), framework="pt") as handle:
        unet = {key[len(UNET_PREFIX):]: handle.get_tensor(key) for key in handle.keys() if key.startswith(UNET_PREFIX)}
    with safe_open(str(delta_path), framework="pt") as handle:
        for key in handle.keys():
            weight = unet[to_comfy[key]]
            unet[to_comfy[key]] = weight + STRENGTH * handle.get_tensor(key).to(weight.dtype)
    return unet


def as_in_files(model_config, clip=None, vae=None) -> dict:
    """A text encoder's or VAE's weights as a checkpoint file holds them (SD1.x files leave out CLIP's unused
    text_projection, which ComfyUI builds uninitialised)."""
    if clip is not None:
        return model_config.process_clip_state_dict_for_saving(clip.get_sd())
    return model_config.process_vae_state_dict_for_saving(vae.get_sd())


# ----------------------------------------------------------------------------------------------- the file
def test_the_file_is_written_under_the_output_folder_with_comfyuis_counter(saved):
    assert saved.path.is_file()
    assert saved.message == "saved " + os.path.join("checkpoints", "PeRFlow_00001_.safetensors")


def test_the_file_stores_the_settings_table_entries(saved):
    tensors, metadata = saved.choice.settings.file_entries()
    with safe_open(str(saved.path), framework="pt") as handle:
        stored = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith("perflow.")}
        stored_metadata = {key: value for key, value in handle.metadata().items() if key.startswith("perflow.")}
    assert state_dict_differences(stored, tensors) == {}
    assert stored_metadata == metadata


def test_the_file_stores_the_prompt_and_workflow_as_checkpointsave_does(saved):
    with safe_open(str(saved.path), framework="pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["prompt"]) == HIDDEN["prompt"]
    assert json.loads(metadata["workflow"]) == HIDDEN["extra_pnginfo"]["workflow"]


# ---------------------------------------------------------------------------------------------- read back
@pytest.mark.parametrize("loader", LOADERS)
def test_the_unet_read_back_is_the_base_plus_strength_times_delta(comfy, saved, loaded, loader, tiny_sd15_checkpoint):
    model = loaded[loader][0]
    expected = expected_unet(comfy, tiny_sd15_checkpoint, saved.delta_path, model.model.model_config.unet_config)
    assert state_dict_differences(model.model.diffusion_model.state_dict(), expected) == {}
    assert not model.patches


@pytest.mark.parametrize("loader", LOADERS)
def test_the_text_encoder_read_back_is_the_one_saved(saved, loaded, loader):
    model, clip = loaded[loader][:2]
    config = model.model.model_config
    assert state_dict_differences(as_in_files(config, clip=clip), as_in_files(config, clip=saved.clip)) == {}


@pytest.mark.parametrize("loader", LOADERS)
def test_the_vae_read_back_is_the_one_saved(saved, loaded, loader):
    model, vae = loaded[loader][0], loaded[loader][2]
    config = model.model.model_config
    assert state_dict_differences(as_in_files(config, vae=vae), as_in_files(config, vae=saved.vae)) == {}


def test_our_loader_returns_the_saved_settings(saved, loaded):
    choice = loaded[OURS][3]
    settings = saved.choice.settings
    assert choice.settings == settings.replace(theta=settings.theta.float())  # files store theta as float32
    assert not choice.auto_prediction_type


# ------------------------------------------------------------------------------------------ a second save
@pytest.fixture(scope="module")
def second_save(saved, tiny_sd15):
    """The base model saved with the same prefix and the default settings (parameterisation auto)."""
    first = saved.path.stat()
    model, clip, vae = tiny_sd15
    save(model, clip, vae, pack_module("glue").default_choice())
    unload_models()
    return SimpleNamespace(path=saved.output / "checkpoints" / "PeRFlow_00002_.safetensors", first_before=first)


def test_a_second_save_with_the_same_prefix_writes_a_new_file(saved, second_save):
    after = saved.path.stat()
    assert second_save.path.is_file()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (second_save.first_before.st_ino, second_save.first_before.st_size, second_save.first_before.st_mtime_ns)
    assert sorted(p.name for p in second_save.path.parent.iterdir()) == ["PeRFlow_00001_.safetensors", "PeRFlow_00002_.safetensors"]


def test_auto_parameterisation_is_saved_as_the_model_familys(second_save):
    settings = pack_core("checkpoint").read_perflow_settings(second_save.path)
    assert settings.prediction_type == "diff_eps"
    assert "perflow.prediction_type" in pack_core("checkpoint").perflow_keys_present(second_save.path)


# ----------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "prefix",
    ["../outside/PeRFlow", "/tmp/elsewhere/PeRFlow", "", "checkpoints/" + "x" * 300, "check\x00points/PeRFlow"],
    ids=["parent folder", "absolute path", "empty", "300 characters", "NUL"],
)
def test_a_bad_filename_prefix_is_refused_naming_it(saved, tiny_sd15, prefix):
    model, clip, vae = tiny_sd15
    before = sorted(saved.output.rglob("*"))
    with pytest.raises(ValueError, match="^Save PeRFlow Checkpoint: filename_prefix"):
        save(model, clip, vae, saved.choice, prefix=prefix)
    assert sorted(saved.output.rglob("*")) == before


def test_a_model_with_patched_sampling_is_refused_naming_model(saved, tiny_sd15):
    import comfy_extras.nodes_model_advanced as model_advanced

    model, clip, vae = tiny_sd15
    v_model = run_node(model_advanced.ModelSamplingDiscrete, model=model, sampling="v_prediction", zsnr=False)[0]
    with pytest.raises(ValueError, match="^Save PeRFlow Checkpoint: model: its sampling is patched"):
        save(v_model, clip, vae, saved.choice)
