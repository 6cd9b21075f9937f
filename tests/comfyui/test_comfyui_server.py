"""End to end against a real ComfyUI server (COMFYUI_PATH): the pack loads, its nodes are described, the
example workflows are served as templates, their tiny twins, a small calibrate-and-save graph and a
save-checkpoint graph run through the HTTP API, and bad inputs give a readable execution error.

The server (headless, --cpu, tiny SD1.5-architecture checkpoint) comes from tests/support/server.py; its
log is kept in test-artifacts/comfyui_server.log. Skipped when COMFYUI_PATH is not set (CI has no ComfyUI).
"""

from __future__ import annotations

import copy
import json
import time

import pytest

from support.server import (
    ARTIFACTS,
    CHECKPOINT_NAME,
    DELTA_NAME,
    EXAMPLE_NAMES,
    PACK_NAME,
    PERFLOW_DISPLAY_NAMES,
    PERFLOW_NODE_IDS,
    THETA_FOLDER,
    THETA_NAME,
    WORKFLOW_NAMES,
    api_workflow,
    comfy_server,  # noqa: F401  (session fixture)
    example_workflow,
    nodes_of_type,
    pack_core,
    requires_comfyui,
)

# node id -> (inputs that must be there, number of outputs)
EXPECTED_INPUTS = {
    "PerflowSettings": (["parameterisation", "segments", "boundaries", "theta", "img2img_start"], 1),
    "PerflowScheduler": (["model", "steps", "denoise", "perflow"], 1),
    "PerflowSampler": (["perflow"], 1),
    "PerflowKSampler": (["model", "seed", "steps", "cfg", "positive", "negative", "latent_image", "denoise", "perflow"], 1),
    "PerflowCheckpointLoader": (["ckpt_name"], 4),
    "PerflowApplyDelta": (["model", "delta_name", "strength"], 1),
    "PerflowDiffusersLoader": (["model_path"], 4),
    "PerflowCalibrate": (
        ["model", "positive", "negative", "latent_image", "cfg", "steps", "teacher_multiplier", "teacher_solver", "fit_time_grid", "samples", "holdout_samples", "seed", "perflow"],
        3,
    ),
    "PerflowSaveTheta": (["perflow", "filename", "ckpt_name"], 1),
    "PerflowLoadTheta": (["theta_name"], 1),
    "PerflowSaveCheckpoint": (["model", "clip", "vae", "perflow", "filename_prefix"], 0),
}
# The Save node's choice for "no checkpoint: a standalone theta file" (nodes/calibration_nodes.py NO_CHECKPOINT).
STANDALONE_THETA = "(standalone theta file)"

_wall_times: dict[str, float] = {}


def _record_time(label: str, seconds: float) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    with open(ARTIFACTS / "comfyui_workflow_times.txt", "a") as handle:
        handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {label}: {seconds:.2f} s (CPU)\n")


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


def test_every_node_has_expected_inputs_and_a_display_name():
    assert sorted(EXPECTED_INPUTS) == sorted(PERFLOW_NODE_IDS)
    assert len(PERFLOW_DISPLAY_NAMES) == len(PERFLOW_NODE_IDS) == len(set(PERFLOW_DISPLAY_NAMES))


@requires_comfyui
def test_all_nodes_are_in_the_full_object_info(comfy_server):
    info = comfy_server.get_json("/object_info", timeout=60)
    ours = sorted(node_id for node_id, node in info.items() if PACK_NAME in node.get("python_module", ""))
    assert ours == sorted(PERFLOW_NODE_IDS)
    assert [info[node_id]["display_name"] for node_id in PERFLOW_NODE_IDS] == PERFLOW_DISPLAY_NAMES


@requires_comfyui
@pytest.mark.parametrize("node_id", PERFLOW_NODE_IDS)
def test_node_is_described_in_object_info(comfy_server, node_id):
    info = comfy_server.get_json(f"/object_info/{node_id}")
    assert node_id in info, f"{node_id} is not registered"
    node = info[node_id]
    assert PACK_NAME in node["python_module"]
    assert node["display_name"] and "PeRFlow" in node["display_name"]
    assert node["category"], node_id
    assert node["description"]
    inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
    expected_inputs, outputs = EXPECTED_INPUTS[node_id]
    assert sorted(inputs) == sorted(expected_inputs)
    for name, (_, options) in inputs.items():
        assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert len(node["output"]) == outputs
    if "perflow" in inputs and node_id not in ("PerflowSaveTheta", "PerflowSaveCheckpoint"):  # saving needs settings to save
        assert "perflow" in node["input"].get("optional", {}), "the PERFLOW input is optional"


@requires_comfyui
def test_theta_and_checkpoint_dropdowns_list_the_files(comfy_server):
    load = comfy_server.get_json("/object_info/PerflowLoadTheta")["PerflowLoadTheta"]
    assert THETA_NAME in _combo_options(load["input"]["required"]["theta_name"])
    save = comfy_server.get_json("/object_info/PerflowSaveTheta")["PerflowSaveTheta"]
    options = _combo_options(save["input"]["required"]["ckpt_name"])
    assert options[0] == STANDALONE_THETA and CHECKPOINT_NAME in options, options


def _combo_options(spec) -> list:
    """A combo input's options: V1 lists them first (`[[a, b], {...}]`), V3 as `["COMBO", {"options": [...]}]`."""
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    return list(kind) if isinstance(kind, list) else list(options.get("options", []))


def calibration_prompt(filename: str) -> dict:
    """Tiny checkpoint -> PeRFlow Calibrate Theta (4 steps, 4 + 2 seeds, teacher 8 steps, 8x8 latent) -> Save PeRFlow Theta (standalone)."""
    text = lambda words: {"class_type": "CLIPTextEncode", "inputs": {"text": words, "clip": ["1", 1]}}  # noqa: E731
    return {
        "1": {"class_type": "PerflowCheckpointLoader", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": text("a lighthouse on a cliff"),
        "3": text("blurry"),
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "PerflowCalibrate",
            "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "perflow": ["1", 3],
                "cfg": 4.5, "steps": 4, "teacher_multiplier": 2, "samples": 4, "holdout_samples": 2, "seed": 0,
            },
        },
        "6": {"class_type": "PerflowSaveTheta", "inputs": {"perflow": ["5", 0], "filename": filename, "ckpt_name": STANDALONE_THETA}},
    }


@requires_comfyui
def test_calibrate_and_save_theta_through_the_api(comfy_server):
    filename = f"perflow_api_calibrated_{int(time.time() * 1000)}"
    target = comfy_server.base / THETA_FOLDER / f"{filename}.safetensors"
    started = time.perf_counter()
    entry = comfy_server.run(calibration_prompt(filename))
    seconds = time.perf_counter() - started
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"], indent=1)[:4000]
    _record_time("PerflowCalibrate -> PerflowSaveTheta (steps 4, samples 4+2, teacher x2, 64x64)", seconds)
    calibrate_ui = entry["outputs"]["5"]
    report = "".join(calibrate_ui.get("text", []))
    assert "theta" in report and "per segment" in report, calibrate_ui
    (image,) = calibrate_ui["images"]
    folder = comfy_server.base / image.get("type", "temp") / image.get("subfolder", "")
    assert (folder / image["filename"]).is_file(), image
    assert target.is_file() and target.stat().st_size > 0, target
    assert str(target) in "".join(entry["outputs"]["6"].get("text", [])), entry["outputs"]["6"]
    # The new file is offered by Load PeRFlow Theta (the dropdown is re-read per /object_info call).
    load = comfy_server.get_json("/object_info/PerflowLoadTheta")["PerflowLoadTheta"]
    assert target.name in _combo_options(load["input"]["required"]["theta_name"])


def save_checkpoint_prompt(filename_prefix: str) -> dict:
    """Tiny checkpoint -> Apply PeRFlow Delta Weights -> Save PeRFlow Checkpoint with PeRFlow Settings' defaults (auto)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": {"class_type": "PerflowApplyDelta", "inputs": {"model": ["1", 0], "delta_name": DELTA_NAME, "strength": 1.0}},
        "3": {"class_type": "PerflowSettings", "inputs": {"parameterisation": "auto", "segments": 4, "boundaries": "", "theta": ""}},
        "4": {
            "class_type": "PerflowSaveCheckpoint",
            "inputs": {"model": ["2", 0], "clip": ["1", 1], "vae": ["1", 2], "perflow": ["3", 0], "filename_prefix": filename_prefix},
        },
    }


@requires_comfyui
def test_save_checkpoint_through_the_api_writes_one_file_with_the_settings(comfy_server):
    name = f"perflow_api_saved_{int(time.time() * 1000)}"
    target = comfy_server.output_dir / "checkpoints" / f"{name}_00001_.safetensors"
    entry = comfy_server.run(save_checkpoint_prompt(f"checkpoints/{name}"))
    try:
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"]["messages"], indent=1)[:4000]
        assert target.is_file(), sorted(target.parent.iterdir())
        assert "".join(entry["outputs"]["4"].get("text", [])) == f"saved checkpoints/{target.name}"
        settings = pack_core("checkpoint").read_perflow_settings(target)
        assert settings.prediction_type == "diff_eps" and settings.segments == 4  # auto resolved for SD1.5
    finally:
        target.unlink(missing_ok=True)


@requires_comfyui
def test_save_checkpoint_outside_the_output_folder_gives_an_error_naming_filename_prefix(comfy_server):
    entry = comfy_server.run(save_checkpoint_prompt("../outside/perflow"))
    assert entry["status"]["status_str"] == "error"
    error = _execution_error(entry)
    assert error["node_type"] == "PerflowSaveCheckpoint", error
    assert error["exception_message"].startswith("Save PeRFlow Checkpoint: filename_prefix '../outside/perflow'"), error["exception_message"]
    assert not (comfy_server.output_dir.parent / "outside").exists()


@requires_comfyui
def test_templates_are_listed_and_served(comfy_server):
    templates = comfy_server.get_json("/workflow_templates")
    assert sorted(templates.get(PACK_NAME, [])) == sorted(EXAMPLE_NAMES), templates
    for name in EXAMPLE_NAMES:
        served = comfy_server.get_json(f"/api/workflow_templates/{PACK_NAME}/{name}.json")
        assert served == example_workflow(name)
        status, _ = comfy_server.request(f"/api/workflow_templates/{PACK_NAME}/{name}.jpg")
        assert status == 200, f"no thumbnail {name}.jpg"


@requires_comfyui
@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_example_workflow_runs(comfy_server, name):
    prompt = api_workflow(name)
    log_before = len(comfy_server.log_text())
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
    log = comfy_server.log_text()[log_before:]  # this run's lines: other tests provoke exceptions on purpose
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
    "boundaries_not_decreasing": ("PerflowSettings", "boundaries", "1000, 500, 600, 0", ["boundaries", "strictly decreasing"]),
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
