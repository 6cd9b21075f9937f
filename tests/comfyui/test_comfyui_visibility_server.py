"""What the PeRFlow nodes show, through a real ComfyUI server's HTTP API (issue 11, points 3, 4, 6): the text on the
nodes in a prompt's result, Preview Any on a PERFLOW value, sigmas off PeRFlow's grid stopping the run, the node
categories and descriptions in /object_info, and errors that name the node. Skipped when COMFYUI_PATH is not set.
"""

from __future__ import annotations

import copy

import pytest

from support.server import (
    CHECKPOINT_NAME,
    PACK_NAME,
    api_workflow,
    comfy_server,  # noqa: F401  (session fixture)
    nodes_of_type,
    requires_comfyui,
)

pytestmark = requires_comfyui

# The decided categories (issue 11, point 6); nodes other helpers add are checked when the server has them.
CATEGORIES = {
    "PerflowSettings": "PeRFlow",
    "PerflowScheduler": "PeRFlow",
    "PerflowSampler": "PeRFlow",
    "PerflowKSampler": "PeRFlow",
    "PerflowCheckpointLoader": "PeRFlow/loaders",
    "PerflowDiffusersLoader": "PeRFlow/loaders",
    "PerflowApplyDelta": "PeRFlow/loaders",
    "PerflowLoadTheta": "PeRFlow/loaders",
    "PerflowCalibrate": "PeRFlow/theta",
    "PerflowSaveTheta": "PeRFlow/theta",
    "PerflowSaveCheckpoint": "PeRFlow/save",
}
# The settings stored in the server's tiny checkpoint (tests/support/server.py prepare_base_directory).
CHECKPOINT_SETTINGS_TEXT = [
    "parameterisation: diff_eps",
    "segments: K = 4, boundaries 1000, 750, 500, 250, 0 (uniform)",
    "theta (gain, window-end scale, output change), one row per segment:",
    "0.05, 0, 0",
    "0, 0, 0",
    "0, 0, 0",
    "0, 0, 0",
]


def shown_text(entry: dict, node_id: str) -> str:
    return "\n".join(entry["outputs"][node_id]["text"])


def execution_error(entry: dict) -> dict:
    (error,) = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    return error


def txt2img(seed: int) -> dict:
    prompt = copy.deepcopy(api_workflow("perflow_txt2img"))
    (noise,) = nodes_of_type(prompt, "RandomNoise")
    prompt[noise]["inputs"]["noise_seed"] = seed
    return prompt


def with_perflow_loader(prompt: dict) -> dict:
    """The prompt's stock checkpoint loader replaced by Load PeRFlow Checkpoint, its settings fed to the Scheduler and Sampler."""
    (loader,) = nodes_of_type(prompt, "CheckpointLoaderSimple")
    prompt[loader]["class_type"] = "PerflowCheckpointLoader"
    for node_id in nodes_of_type(prompt, "PerflowScheduler") + nodes_of_type(prompt, "PerflowSampler"):
        prompt[node_id]["inputs"]["perflow"] = [loader, 3]
    return prompt


def with_stock_scheduler(prompt: dict, scheduler: str, steps: int) -> dict:
    (node_id,) = nodes_of_type(prompt, "PerflowScheduler")
    model = prompt[node_id]["inputs"]["model"]
    prompt[node_id] = {"class_type": "BasicScheduler", "inputs": {"model": model, "scheduler": scheduler, "steps": steps, "denoise": 1.0}}
    return prompt


def test_the_result_of_a_prompt_carries_the_text_each_node_shows(comfy_server):
    prompt = with_perflow_loader(txt2img(seed=101))
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success"
    (loader,), (scheduler,), (sampler,) = (nodes_of_type(prompt, t) for t in ("PerflowCheckpointLoader", "PerflowScheduler", "PerflowSampler"))
    assert shown_text(entry, loader).splitlines() == CHECKPOINT_SETTINGS_TEXT
    assert shown_text(entry, scheduler).splitlines() == ["timesteps the network sees (4 steps): 1000, 750, 500, 250"] + CHECKPOINT_SETTINGS_TEXT
    assert shown_text(entry, sampler).splitlines()[:-1] == CHECKPOINT_SETTINGS_TEXT
    assert "timesteps: shown on the PeRFlow Scheduler" in shown_text(entry, sampler)


def test_the_ksampler_shows_what_auto_resolved_to(comfy_server):
    prompt = copy.deepcopy(api_workflow("perflow_ksampler_settings"))
    (ksampler,) = nodes_of_type(prompt, "PerflowKSampler")
    prompt[ksampler]["inputs"].update(seed=102, steps=8)
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success"
    text = shown_text(entry, ksampler)
    assert "timesteps the network sees (8 steps): 1000, 875, 750, 625, 500, 375, 250, 125" in text
    assert "parameterisation: auto -> diff_eps for this model" in text


def test_preview_any_prints_a_perflow_value_as_readable_text(comfy_server):
    prompt = {
        "1": {"class_type": "PerflowCheckpointLoader", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}},
    }
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "success"
    assert shown_text(entry, "2").splitlines() == CHECKPOINT_SETTINGS_TEXT


def test_karras_sigmas_stop_the_run_naming_sigmas(comfy_server):
    entry = comfy_server.run(with_stock_scheduler(txt2img(seed=103), "karras", 8))
    assert entry["status"]["status_str"] == "error"
    error = execution_error(entry)
    assert error["node_type"] == "SamplerCustomAdvanced"
    message = error["exception_message"]
    assert message.startswith("sigmas: ") and "is not one of the model's training sigmas" in message
    assert "PeRFlow Scheduler's sigmas" in message and "Traceback" not in message


def test_a_stock_schedule_on_perflows_grid_still_runs(comfy_server):
    # simple at 8 steps gives the training sigmas of timesteps 1000, 875, ..., 125: the PeRFlow Scheduler's grid.
    entry = comfy_server.run(with_stock_scheduler(txt2img(seed=104), "simple", 8))
    assert entry["status"]["status_str"] == "success"


def test_errors_from_a_node_start_with_its_display_name(comfy_server):
    prompt = copy.deepcopy(api_workflow("perflow_ksampler_settings"))
    (settings,) = nodes_of_type(prompt, "PerflowSettings")
    prompt[settings]["inputs"]["theta"] = "nan, 0, 0, 0"
    error = execution_error(comfy_server.run(prompt))
    assert error["node_type"] == "PerflowSettings"
    assert error["exception_message"].startswith("PeRFlow Settings: theta")


def test_every_pack_node_is_under_perflow_and_described_as_piecewise_rectified_flow(comfy_server):
    info = comfy_server.get_json("/object_info", timeout=60)
    ours = {node_id: node for node_id, node in info.items() if PACK_NAME in node.get("python_module", "")}
    assert set(ours) <= set(CATEGORIES), sorted(set(ours) - set(CATEGORIES))
    assert {node_id: node["category"] for node_id, node in ours.items()} == {node_id: CATEGORIES[node_id] for node_id in ours}
    undescribed = [node_id for node_id, node in ours.items() if "piecewise rectified flow" not in node["description"].lower()]
    assert undescribed == []


def test_the_frontend_script_is_served(comfy_server):
    assert f"/extensions/{PACK_NAME}/perflow_node_text.js" in comfy_server.get_json("/extensions")
    status, _ = comfy_server.request(f"/extensions/{PACK_NAME}/perflow_node_text.js")
    assert status == 200
