"""Spec (issue 10, point 5): the pack creates its model folders when it loads, and a prompt naming a file or folder
that is not there is refused while ComfyUI validates it, before any node runs, naming the input and listing what
exists, for every file input of the pack: Load PeRFlow Checkpoint's ckpt_name, Apply PeRFlow Delta Weights'
delta_name, Load PeRFlow Theta's theta_name, Save PeRFlow Theta's ckpt_name and Load PeRFlow Diffusers Model's
model_path.

In-process through ComfyUI's own execution.validate_prompt, and through the HTTP server (POST /prompt answers 400
with node_errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os

import pytest

from support.comfyui import PACK_NAME, comfy, model_folder, only_model_folder, perflow_pack, requires_comfyui  # noqa: F401
from support.server import CHECKPOINT_NAME, DELTA_NAME, DIFFUSERS_LISTED_NAME, THETA_NAME, comfy_server  # noqa: F401

pytestmark = requires_comfyui

PRESENT = "present.safetensors"
PRESENT_MODEL = "present_model"
MISSING = "missing.safetensors"
# input -> (node, the folder kind its files come from)
FILE_INPUTS = {
    "ckpt_name": ("PerflowCheckpointLoader", "checkpoints"),
    "delta_name": ("PerflowApplyDelta", "perflow_deltas"),
    "theta_name": ("PerflowLoadTheta", "perflow_theta"),
    "save_ckpt_name": ("PerflowSaveTheta", "checkpoints"),
    "model_path": ("PerflowDiffusersLoader", "diffusers"),
}


def prompt_naming(case: str, value: str, checkpoint: str, theta: str) -> dict:
    """A small API prompt whose node under test gets ``value``; the other file inputs get ``checkpoint`` / ``theta``."""
    preview = lambda source: {"class_type": "PreviewAny", "inputs": {"source": source}}  # noqa: E731
    loader = {"class_type": "PerflowCheckpointLoader", "inputs": {"ckpt_name": checkpoint}}
    if case == "ckpt_name":
        return {"1": {"class_type": "PerflowCheckpointLoader", "inputs": {"ckpt_name": value}}, "2": preview(["1", 3])}
    if case == "delta_name":
        delta = {"class_type": "PerflowApplyDelta", "inputs": {"model": ["1", 0], "delta_name": value, "strength": 1.0}}
        return {"1": loader, "2": delta, "3": preview(["2", 0])}
    if case == "theta_name":
        return {"1": {"class_type": "PerflowLoadTheta", "inputs": {"theta_name": value}}, "2": preview(["1", 0])}
    if case == "save_ckpt_name":
        load = {"class_type": "PerflowLoadTheta", "inputs": {"theta_name": theta}}
        return {"1": load, "2": {"class_type": "PerflowSaveTheta", "inputs": {"perflow": ["1", 0], "filename": "never_written", "ckpt_name": value}}}
    return {"1": {"class_type": "PerflowDiffusersLoader", "inputs": {"model_path": value}}, "2": preview(["1", 3])}


def node_under_test(case: str, prompt: dict) -> str:
    (node_id,) = [key for key, node in prompt.items() if node["class_type"] == FILE_INPUTS[case][0]]
    return node_id


def input_name(case: str) -> str:
    return "ckpt_name" if case == "save_ckpt_name" else case


# ----------------------------------------------------------------------------------------------- in-process
def test_the_pack_creates_its_model_folders(perflow_pack):
    import folder_paths

    for folder in ("perflow_deltas", "perflow_theta"):
        path = os.path.join(folder_paths.models_dir, folder)
        assert os.path.isdir(path) and path in folder_paths.get_folder_paths(folder)


@pytest.fixture
def registered(tmp_path, perflow_pack, monkeypatch):
    """The pack's nodes and PreviewAny as ComfyUI registers them, and one present file (or model folder) per kind."""
    import nodes as comfy_nodes
    from comfy_extras.nodes_preview_any import PreviewAny

    for node in importlib.import_module(PACK_NAME + ".nodes").NODES:
        monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, node.define_schema().node_id, node)
    monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, "PreviewAny", PreviewAny)
    with contextlib.ExitStack() as folders:
        for kind in {kind for _, kind in FILE_INPUTS.values()}:
            folder = folders.enter_context(model_folder(kind, tmp_path / kind))
            (folder / PRESENT).write_bytes(b"")
        (tmp_path / "diffusers" / PRESENT_MODEL).mkdir()
        (tmp_path / "diffusers" / PRESENT_MODEL / "model_index.json").write_text("{}")
        yield


def validate(prompt: dict):
    import execution

    return asyncio.run(execution.validate_prompt("perflow-test", prompt, None))


@pytest.mark.parametrize("case", sorted(FILE_INPUTS))
def test_a_missing_file_is_refused_at_validation_listing_what_exists(registered, case):
    prompt = prompt_naming(case, MISSING, PRESENT, PRESENT)
    valid, _, _, node_errors = validate(prompt)
    assert valid is False
    node_id = node_under_test(case, prompt)
    assert list(node_errors) == [node_id], node_errors
    (error,) = node_errors[node_id]["errors"]
    assert error["extra_info"]["input_name"] == input_name(case)
    present = PRESENT_MODEL if case == "model_path" else PRESENT
    assert error["details"].startswith(f"{input_name(case)} - {MISSING!r} is not ") and f"available: {present}" in error["details"], error


@pytest.mark.parametrize("case", sorted(FILE_INPUTS))
def test_a_present_file_passes_validation(registered, case):
    present = PRESENT_MODEL if case == "model_path" else PRESENT
    valid, error, _, node_errors = validate(prompt_naming(case, present, PRESENT, PRESENT))
    assert valid is True and node_errors == {}, (error, node_errors)


@pytest.mark.parametrize("node_id, input_name, folder", [("PerflowApplyDelta", "delta_name", "perflow_deltas"), ("PerflowLoadTheta", "theta_name", "perflow_theta"), ("PerflowDiffusersLoader", "model_path", "diffusers")])
def test_an_empty_folder_offers_one_entry_saying_where_files_go_and_it_is_refused(tmp_path, perflow_pack, node_id, input_name, folder):
    node = {n.define_schema().node_id: n for n in importlib.import_module(PACK_NAME + ".nodes").NODES}[node_id]
    with only_model_folder(folder, tmp_path / "empty"):
        (combo,) = [item for item in node.define_schema().inputs if item.id == input_name]
        (entry,) = combo.options
        assert entry.startswith("(none yet: put ") and f"models/{folder}" in entry
        problem = node.validate_inputs(**{input_name: entry})
        assert isinstance(problem, str) and problem.startswith(f"{entry!r} is not ") and problem.endswith(f"available: none: put them in models/{folder}")


# ------------------------------------------------------------------------------------------------ the server
SERVER_FILES = {"ckpt_name": CHECKPOINT_NAME, "delta_name": DELTA_NAME, "theta_name": THETA_NAME, "save_ckpt_name": CHECKPOINT_NAME, "model_path": DIFFUSERS_LISTED_NAME}


@pytest.mark.parametrize("case", sorted(FILE_INPUTS))
def test_post_prompt_with_a_missing_file_is_answered_400_and_runs_nothing(comfy_server, case):
    history_before = comfy_server.get_json("/history")
    prompt = prompt_naming(case, MISSING, CHECKPOINT_NAME, THETA_NAME)
    status, payload = comfy_server.request("/prompt", {"prompt": prompt, "client_id": "perflow-tests"})
    assert status == 400 and "prompt_id" not in payload, payload
    node_id = node_under_test(case, prompt)
    assert list(payload["node_errors"]) == [node_id], json.dumps(payload, indent=1)
    (error,) = payload["node_errors"][node_id]["errors"]
    assert error["details"].startswith(f"{input_name(case)} - {MISSING!r} is not ") and f"available: {SERVER_FILES[case]}" in error["details"], error
    assert comfy_server.get_json("/queue") == {"queue_running": [], "queue_pending": []}
    assert comfy_server.get_json("/history") == history_before
