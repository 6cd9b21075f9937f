"""End to end against a real ComfyUI server (COMFYUI_PATH): the pack loads, its nodes are described, the
example workflows run through the HTTP API, and bad inputs give a readable execution error.

The server (headless, --cpu, tiny SD1.5-architecture checkpoint) comes from tests/comfyui_server.py; its
log is kept in test-artifacts/comfyui_server.log. Skipped when COMFYUI_PATH is not set (CI has no ComfyUI).
"""

from __future__ import annotations

import copy
import json
import time

import pytest

from comfyui_server import (
    API_WORKFLOWS,
    ARTIFACTS,
    CHECKPOINT_NAME,
    EXAMPLE_WORKFLOWS,
    PACK_NAME,
    PERFLOW_NODE_IDS,
    WORKFLOW_NAMES,
    api_workflow,
    comfy_server,  # noqa: F401  (session fixture)
    example_workflow,
    nodes_of_type,
    requires_comfyui,
)

FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}

# node id -> (inputs that must be there, number of outputs)
EXPECTED_INPUTS = {
    "PerflowSettings": (["parameterisation", "segments", "boundaries", "theta"], 1),
    "PerflowScheduler": (["model", "steps", "denoise", "perflow"], 1),
    "PerflowSampler": (["perflow"], 1),
    "PerflowKSampler": (["model", "seed", "steps", "cfg", "positive", "negative", "latent_image", "denoise", "perflow"], 1),
    "PerflowCheckpointLoader": (["ckpt_name"], 4),
    "PerflowApplyDelta": (["model", "delta_name", "strength"], 1),
}

_wall_times: dict[str, float] = {}


def _record_time(label: str, seconds: float) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "comfyui_workflow_times.txt", "a") as handle:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {label}: {seconds:.2f} s (CPU)\n")


# Without a server: the example files themselves --------------------------------------------------------------
@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_example_workflow_and_its_api_twin_agree(name):
    ui, api = example_workflow(name), api_workflow(name)
    ui_nodes = {str(node["id"]): node["type"] for node in ui["nodes"] if node["type"] not in FRONTEND_ONLY_TYPES}
    assert ui_nodes == {node_id: node["class_type"] for node_id, node in api.items()}
    assert any(node_type.startswith("Perflow") for node_type in ui_nodes.values())
    assert nodes_of_type(api, "SaveImage"), "every example ends in a SaveImage"


def test_api_twins_are_not_in_a_template_folder():
    # ComfyUI lists <pack>/{example_workflows,example,examples,workflow,workflows}/*.json as templates.
    assert sorted(p.stem for p in EXAMPLE_WORKFLOWS.glob("*.json")) == sorted(WORKFLOW_NAMES)
    assert API_WORKFLOWS.name not in ("example_workflows", "example", "examples", "workflow", "workflows")


# With the server ---------------------------------------------------------------------------------------------
@requires_comfyui
def test_pack_imports_cleanly(comfy_server):
    log = comfy_server.log_text()
    import_lines = [line for line in log.splitlines() if line.rstrip().endswith(f"custom_nodes/{PACK_NAME}")]
    assert import_lines, f"the pack is not in the 'Import times for custom nodes' list:\n{comfy_server.log_tail()}"
    assert not any("IMPORT FAILED" in line for line in import_lines), import_lines
    assert not [line for line in log.splitlines() if "Cannot import" in line and PACK_NAME in line]
    stats = comfy_server.get_json("/system_stats")
    print(f"ComfyUI {stats['system'].get('comfyui_version')}, python {stats['system'].get('python_version', '').split()[0]}")


@requires_comfyui
@pytest.mark.parametrize("node_id", PERFLOW_NODE_IDS)
def test_node_is_described_in_object_info(comfy_server, node_id):
    info = comfy_server.get_json(f"/object_info/{node_id}")
    assert node_id in info, f"{node_id} is not registered"
    node = info[node_id]
    assert PACK_NAME in node["python_module"]
    assert node["display_name"] and "PeRFlow" in node["display_name"]
    assert node["description"]
    inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
    expected_inputs, outputs = EXPECTED_INPUTS[node_id]
    assert sorted(inputs) == sorted(expected_inputs)
    for name, (_, options) in inputs.items():
        assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert len(node["output"]) == outputs
    if "perflow" in inputs:
        assert "perflow" in node["input"].get("optional", {}), "the PERFLOW input is optional"


@requires_comfyui
def test_templates_are_listed_and_served(comfy_server):
    templates = comfy_server.get_json("/workflow_templates")
    assert sorted(templates.get(PACK_NAME, [])) == sorted(WORKFLOW_NAMES), templates
    for name in WORKFLOW_NAMES:
        served = comfy_server.get_json(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert served == example_workflow(name)
        status, _ = comfy_server.request(f"/api/workflow_templates/{PACK_NAME}/{name}.jpg")
        assert status == 200, f"no thumbnail {name}.jpg"


@requires_comfyui
@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_example_workflow_runs(comfy_server, name):
    prompt = api_workflow(name)
    started = time.perf_counter()
    entry = comfy_server.run(prompt)
    seconds = time.perf_counter() - started
    status = entry["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"], indent=1)[:4000]
    (save_id,) = nodes_of_type(prompt, "SaveImage")
    images = entry["outputs"][save_id]["images"]
    assert images, entry["outputs"]
    for image in images:
        path = comfy_server.output_dir / image.get("subfolder", "") / image["filename"]
        assert path.is_file() and path.stat().st_size > 0, path
        assert image["filename"].startswith(prompt[save_id]["inputs"]["filename_prefix"])
    _wall_times[name] = seconds
    _record_time(f"{name} (first run in this server)", seconds)
    log = comfy_server.log_text()
    assert "!!! Exception during processing" not in log
    # The loader read perflow.prediction_type (and the rest) from the checkpoint's perflow.* entries.
    assert f"{CHECKPOINT_NAME} has no perflow.prediction_type" not in log


@requires_comfyui
def test_delta_keys_all_matched_the_unet(comfy_server):
    """The tiny delta (diffusers UNet names from ComfyUI's own key map) patches weights; no key is skipped."""
    entry = comfy_server.run(api_workflow("perflow_sd15_delta"))
    assert entry["status"]["status_str"] == "success"
    log = comfy_server.log_text()
    assert "match no UNet weight" not in log
    assert "none of its" not in log


def _execution_error(entry: dict) -> dict:
    for kind, data in entry["status"]["messages"]:
        if kind == "execution_error":
            return data
    raise AssertionError(f"no execution_error in {entry['status']}")


BAD_INPUTS = {
    # id: (node type, input, value, words the message must contain)
    "theta_nan": ("PerflowSettings", "theta", "nan, 0, 0, 0", ["theta", "NaN"]),
    "theta_text": ("PerflowSettings", "theta", "one; two", ["theta"]),
    "steps_below_segments": ("PerflowKSampler", "steps", 3, ["steps", "K=4"]),
    "boundaries_disagree": ("PerflowSettings", "boundaries", "999, 500, 0", ["boundaries", "segments"]),
}


@requires_comfyui
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_execution_error_naming_the_input(comfy_server, case):
    node_type, input_name, value, words = BAD_INPUTS[case]
    prompt = copy.deepcopy(api_workflow("perflow_ksampler_settings"))
    (node_id,) = nodes_of_type(prompt, node_type)
    prompt[node_id]["inputs"][input_name] = value
    entry = comfy_server.run(prompt)
    assert entry["status"]["status_str"] == "error"
    error = _execution_error(entry)
    assert error["node_type"] == node_type, error
    message = error["exception_message"]
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "Traceback" not in message
    # The server keeps answering and still runs prompts.
    assert comfy_server.alive()
    assert comfy_server.get_json("/queue") == {"queue_running": [], "queue_pending": []}


@requires_comfyui
def test_server_still_runs_a_good_prompt_after_errors(comfy_server):
    prompt = copy.deepcopy(api_workflow("perflow_ksampler_settings"))
    (ksampler,) = nodes_of_type(prompt, "PerflowKSampler")
    prompt[ksampler]["inputs"]["seed"] = 7
    assert comfy_server.run(prompt)["status"]["status_str"] == "success"


@requires_comfyui
def test_wall_time_of_txt2img_on_cpu(comfy_server, capsys):
    """Wall time of the txt2img example from POST /prompt to success (models already loaded; a new seed, so
    the sampler, decoder and saver run again). Reported, never asserted."""
    prompt = copy.deepcopy(api_workflow("perflow_txt2img"))
    (noise,) = nodes_of_type(prompt, "RandomNoise")
    prompt[noise]["inputs"]["noise_seed"] = 1234
    started = time.perf_counter()
    entry = comfy_server.run(prompt)
    seconds = time.perf_counter() - started
    assert entry["status"]["status_str"] == "success"
    _record_time("perflow_txt2img (models loaded, new seed)", seconds)
    first = _wall_times.get("perflow_txt2img")
    with capsys.disabled():
        first_text = f"; first run incl. model load {first:.2f} s" if first is not None else ""
        print(f"\n[perflow] txt2img example (64x64, 4 steps) on CPU: {seconds:.2f} s wall{first_text}")
