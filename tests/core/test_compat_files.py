"""Files written before the settings refactor (main at 6e3c248, tools/make_compat_files.py) read as they did then."""

import json
from pathlib import Path

import pytest
import torch

from perflow_core import PerflowScheduler
from perflow_core.checkpoint import read_perflow_settings

FILES = Path(__file__).resolve().parents[1] / "compat_files"
EXPECTED = json.loads((FILES / "expected.json").read_text())


def described(settings) -> dict:
    return {
        "segments": settings.segments,
        "boundaries": [float(b) for b in settings.build_segments().boundaries],
        "theta": settings.theta.tolist(),
        "prediction_type": settings.prediction_type,
        "version": settings.version,
        "num_train_timesteps": settings.num_train_timesteps,
    }


@pytest.mark.parametrize("name", ["theta_file.safetensors", "checkpoint.safetensors", "checkpoint_nested.ckpt", "checkpoint_flat.pt"])
def test_a_settings_file_reads_as_it_did(name):
    assert described(read_perflow_settings(FILES / name)) == EXPECTED[name]


def test_a_saved_scheduler_folder_loads_as_it_did():
    scheduler = PerflowScheduler.from_pretrained(FILES / "scheduler")
    scheduler.set_timesteps(6)
    expected = dict(EXPECTED["scheduler"])
    assert scheduler.timesteps.tolist() == expected.pop("timesteps_6")
    assert described(scheduler.perflow_settings()) == expected


def test_a_saved_scheduler_state_dict_loads_as_it_did():
    scheduler = PerflowScheduler()
    scheduler.load_state_dict(torch.load(FILES / "scheduler_state_dict.pt", weights_only=True))
    assert described(scheduler.perflow_settings()) == EXPECTED["scheduler_state_dict.pt"]
