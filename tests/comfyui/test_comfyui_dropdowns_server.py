"""Spec: with PERFLOW_KSAMPLER_DROPDOWNS=1 in its environment, a real ComfyUI server (0.3.64 never calls
ComfyExtension.on_load) lists 'perflow' in the stock KSampler's sampler and scheduler inputs and runs a prompt
that names it, over HTTP."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from support.server import CHECKPOINT_NAME, COMFYUI_PATH, prepare_base_directory, start_server

pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set")
VARIABLE = "PERFLOW_KSAMPLER_DROPDOWNS"


@pytest.fixture(scope="module")
def server_with_dropdowns():
    base = Path(tempfile.mkdtemp(prefix="perflow_comfy_dropdowns_"))
    prepare_base_directory(base)
    server = start_server(base, {VARIABLE: "1"})
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


def stock_ksampler_prompt(sampler_name: str, scheduler: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1, "steps": 4,
                "cfg": 4.5, "sampler_name": sampler_name, "scheduler": scheduler, "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "perflow_dropdowns"}},
    }


def test_the_stock_ksampler_lists_perflow_as_sampler_and_scheduler(server_with_dropdowns):
    inputs = server_with_dropdowns.get_json("/object_info/KSampler")["KSampler"]["input"]["required"]
    assert inputs["sampler_name"][0].count("perflow") == 1
    assert inputs["scheduler"][0].count("perflow") == 1


def test_a_stock_ksampler_prompt_naming_perflow_runs(server_with_dropdowns):
    entry = server_with_dropdowns.run(stock_ksampler_prompt("perflow", "perflow"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["7"]["images"]
