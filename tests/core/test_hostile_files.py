"""Spec: a hostile or careless settings file is refused before anything sized by it is allocated, with a
ValueError naming the file and the key."""

import json
import time

import pytest
import torch

from perflow_core import PerflowScheduler
from perflow_core.checkpoint import read_perflow_settings, split_perflow_state_dict
from perflow_core.settings import MAX_STORED_NUMBERS, NUM_TRAIN_TIMESTEPS_RANGE
from support.hostile import pickle_file, run_capped, safetensors_file

BILLION = 10**9
NOT_NUMBERS = "must hold numbers"


def _refusal(path, *words):
    with pytest.raises(ValueError) as raised:
        read_perflow_settings(path)
    message = str(raised.value)
    assert str(path) in message and all(word in message for word in words), message
    return message


# ----------------------------------------------------------------------------------- sizes
def test_segments_of_a_billion_in_a_tensor_are_refused(tmp_path):
    path = safetensors_file(tmp_path / "bomb.safetensors", {"perflow.segments": torch.tensor(BILLION)})
    _refusal(path, "perflow.segments", "at most num_train_timesteps=1000")


def test_segments_and_train_timesteps_of_a_billion_in_metadata_are_refused(tmp_path):
    metadata = {"perflow.segments": str(BILLION), "perflow.num_train_timesteps": str(BILLION)}
    path = safetensors_file(tmp_path / "bomb.safetensors", metadata=metadata)
    _refusal(path, "perflow.num_train_timesteps", f"[2, {NUM_TRAIN_TIMESTEPS_RANGE[1]}]")


def test_train_timesteps_written_as_a_float_are_refused(tmp_path):
    path = safetensors_file(tmp_path / "bomb.safetensors", metadata={"perflow.num_train_timesteps": "1e9"})
    _refusal(path, "perflow.num_train_timesteps", "whole number")


def test_segments_of_2_to_the_62_are_a_value_error(tmp_path):
    path = pickle_file(tmp_path / "bomb.ckpt", {"perflow.segments": 2**62, "perflow.num_train_timesteps": 2**62})
    _refusal(path, "perflow.num_train_timesteps")


def test_theta_rows_that_disagree_with_segments_are_refused(tmp_path):
    path = safetensors_file(tmp_path / "ragged.safetensors", {"perflow.theta": torch.zeros(7, 3), "perflow.segments": torch.tensor(4)})
    _refusal(path, "perflow.theta", "7 rows", "4 segments")


def test_a_stored_tensor_larger_than_any_setting_is_refused_from_its_header(tmp_path):
    path = safetensors_file(tmp_path / "big.safetensors", {"perflow.theta": torch.zeros(MAX_STORED_NUMBERS + 1)})
    _refusal(path, "perflow.theta", f"holds {MAX_STORED_NUMBERS + 1} numbers")


def test_the_scheduler_refuses_a_billion_train_timesteps_before_building_its_schedule():
    with pytest.raises(ValueError, match=r"num_train_timesteps must be a whole number in \[2, 100000\]"):
        PerflowScheduler(num_train_timesteps=BILLION)


def test_the_88_byte_bomb_is_refused_under_a_memory_cap_quickly(tmp_path):
    metadata = {"perflow.segments": str(BILLION), "perflow.num_train_timesteps": str(BILLION)}
    path = safetensors_file(tmp_path / "bomb.safetensors", {"perflow.segments": torch.tensor(BILLION)}, metadata)
    code = f"""
        import time
        from perflow_core.checkpoint import read_perflow_settings
        start = time.perf_counter()
        try:
            read_perflow_settings({str(path)!r})
        except ValueError as error:
            print("REFUSED", round(1000 * (time.perf_counter() - start), 2), error)
    """
    finished = run_capped(code)
    assert finished.returncode == 0, finished.stderr
    assert "REFUSED" in finished.stdout and "perflow.num_train_timesteps" in finished.stdout, finished.stdout


# ----------------------------------------------------------------------------------- types
def test_metadata_nested_5000_deep_is_a_value_error(tmp_path):
    path = safetensors_file(tmp_path / "deep.safetensors", metadata={"perflow.theta": "[" * 5000 + "]" * 5000})
    _refusal(path, "perflow.theta", "nested too deeply")


def test_theta_of_10_to_the_400_is_a_value_error(tmp_path):
    path = pickle_file(tmp_path / "huge.ckpt", {"perflow.theta": [10**400, 0, 0, 0]})
    _refusal(path, "perflow.theta", "too large for float64")


def test_theta_entries_of_none_are_refused_as_not_numbers(tmp_path):
    path = pickle_file(tmp_path / "none.ckpt", {"perflow": {"theta": [None] * 4}})
    _refusal(path, "perflow.theta", NOT_NUMBERS)


def test_bool_theta_is_not_read_as_gains(tmp_path):
    path = pickle_file(tmp_path / "bool.ckpt", {"perflow.theta": [True, False, True, False]})
    _refusal(path, "perflow.theta", NOT_NUMBERS)


def test_bool_theta_in_json_metadata_is_refused(tmp_path):
    path = safetensors_file(tmp_path / "bool.safetensors", metadata={"perflow.theta": json.dumps([True, False, True, False])})
    _refusal(path, "perflow.theta", NOT_NUMBERS)


def test_text_inside_a_stored_theta_list_is_refused(tmp_path):
    path = safetensors_file(tmp_path / "text.safetensors", metadata={"perflow.theta": json.dumps(["1", "0", "0", "0"])})
    _refusal(path, "perflow.theta", NOT_NUMBERS)


def test_text_inside_stored_boundaries_is_refused(tmp_path):
    path = pickle_file(tmp_path / "text.ckpt", {"perflow.segment_boundaries": ["1000", "500", "0"]})
    _refusal(path, "perflow.segment_boundaries", NOT_NUMBERS)


def test_a_perflow_entry_that_is_not_a_dict_is_refused(tmp_path):
    path = pickle_file(tmp_path / "list.ckpt", {"perflow": [1, 2], "weight": torch.zeros(1)})
    _refusal(path, "'perflow' entry must be a dict")


def test_splitting_a_state_dict_refuses_a_perflow_list_too():
    with pytest.raises(ValueError, match="'perflow' entry must be a dict"):
        split_perflow_state_dict({"perflow": [1, 2], "weight": torch.zeros(1)})


def test_a_refusal_takes_milliseconds(tmp_path):
    path = safetensors_file(tmp_path / "bomb.safetensors", {"perflow.segments": torch.tensor(BILLION)})
    start = time.perf_counter()
    with pytest.raises(ValueError):
        read_perflow_settings(path)
    assert time.perf_counter() - start < 1.0
