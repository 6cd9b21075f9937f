"""Spec: Load PeRFlow Checkpoint and Apply PeRFlow Delta Weights refuse a damaged or foreign file with a ValueError
naming the node input and the file, whatever library error reading it raised (real ComfyUI, in-process)."""

from __future__ import annotations

import importlib

import pytest
import torch

from support.comfyui import PACK_NAME, comfy, perflow_pack, requires_comfyui, run_node, tiny_sd15, tiny_sd15_checkpoint  # noqa: F401
from support.comfyui import model_folder as registered_model_folder
from support.hostile import damaged_copies, pickle_file, safetensors_file

pytestmark = requires_comfyui
DAMAGE_KINDS = ["empty", "four_bytes", "header_only", "cut_in_the_header", "cut_in_the_data", "random_bytes", "zeroed_header", "huge_header_length"]


@pytest.fixture(scope="module")
def loader_nodes(perflow_pack):
    return importlib.import_module(PACK_NAME + ".nodes.loader_nodes")


@pytest.fixture
def model_folder(tmp_path):
    """A temporary folder registered for checkpoints and deltas."""
    with registered_model_folder("checkpoints", tmp_path), registered_model_folder("perflow_deltas", tmp_path):
        yield tmp_path


def _refused_naming(node, input_name, file_name, **inputs):
    with pytest.raises(ValueError) as raised:
        run_node(node, **{input_name: file_name}, **inputs)
    assert f"{input_name} {file_name!r}" in str(raised.value), str(raised.value)


@pytest.mark.parametrize("damage", DAMAGE_KINDS)
def test_a_damaged_safetensors_checkpoint_is_refused_naming_ckpt_name(loader_nodes, model_folder, damage):
    source = safetensors_file(model_folder / "source.safetensors", {"perflow.segments": torch.tensor(4), "weight": torch.zeros(64)})
    name = damaged_copies(source, model_folder)[damage]
    _refused_naming(loader_nodes.PerflowCheckpointLoaderNode, "ckpt_name", name)


@pytest.mark.parametrize("damage", ["empty", "cut_in_the_data", "random_bytes"])
def test_a_damaged_pickle_checkpoint_is_refused_naming_ckpt_name(loader_nodes, model_folder, damage):
    source = pickle_file(model_folder / "source.ckpt", {"state_dict": {"weight": torch.zeros(64)}})
    name = damaged_copies(source, model_folder)[damage]
    _refused_naming(loader_nodes.PerflowCheckpointLoaderNode, "ckpt_name", name)


@pytest.mark.parametrize("damage", DAMAGE_KINDS)
def test_a_damaged_safetensors_delta_is_refused_naming_delta_name(loader_nodes, model_folder, tiny_sd15, damage):
    source = safetensors_file(model_folder / "source.safetensors", {"conv_in.weight": torch.zeros(64)})
    name = damaged_copies(source, model_folder)[damage]
    _refused_naming(loader_nodes.PerflowApplyDeltaNode, "delta_name", name, model=tiny_sd15[0], strength=1.0)


@pytest.mark.parametrize("damage", ["empty", "cut_in_the_data", "random_bytes"])
def test_a_damaged_pickle_delta_is_refused_naming_delta_name(loader_nodes, model_folder, tiny_sd15, damage):
    source = pickle_file(model_folder / "source.ckpt", {"conv_in.weight": torch.zeros(64)})
    name = damaged_copies(source, model_folder)[damage]
    _refused_naming(loader_nodes.PerflowApplyDeltaNode, "delta_name", name, model=tiny_sd15[0], strength=1.0)


def test_a_pickled_delta_that_is_not_a_dict_is_refused_naming_delta_name(loader_nodes, model_folder, tiny_sd15):
    pickle_file(model_folder / "list.ckpt", [torch.zeros(4)])
    _refused_naming(loader_nodes.PerflowApplyDeltaNode, "delta_name", "list.ckpt", model=tiny_sd15[0], strength=1.0)
