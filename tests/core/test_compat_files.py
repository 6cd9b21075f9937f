"""Files written before the settings refactor (main at 6e3c248, tools/make_compat_files.py) read as they did then."""

import json

import pytest
import torch

from perflow_core import PerflowScheduler
from perflow_core.checkpoint import read_perflow_settings
from support.compat import COMPAT_FILES, SETTINGS_FILES, described

EXPECTED = json.loads((COMPAT_FILES / "expected.json").read_text())


@pytest.mark.parametrize("name", SETTINGS_FILES)
def test_a_settings_file_reads_as_it_did(name):
    assert described(read_perflow_settings(COMPAT_FILES / name)) == EXPECTED[name]


def test_a_saved_scheduler_folder_loads_as_it_did():
    scheduler = PerflowScheduler.from_pretrained(COMPAT_FILES / "scheduler")
    scheduler.set_timesteps(6)
    expected = dict(EXPECTED["scheduler"])
    assert scheduler.timesteps.tolist() == expected.pop("timesteps_6")
    assert described(scheduler.perflow_settings()) == expected


def test_a_saved_scheduler_state_dict_loads_as_it_did():
    scheduler = PerflowScheduler()
    scheduler.load_state_dict(torch.load(COMPAT_FILES / "scheduler_state_dict.pt", weights_only=True))
    assert described(scheduler.perflow_settings()) == EXPECTED["scheduler_state_dict.pt"]
