"""Spec of `PerflowSettings`: one immutable value, one table of fields, every check in one place."""

import pytest
import torch

from perflow_core.settings import CONFIG_KEYS, FIELD_NAMES, FIELDS, PerflowSettings

THETA = [[0.1, 0.0, 0.2], [0.0, 0.0, 0.0], [0.0, -0.1, 0.0]]


# ------------------------------------------------------------------------------------- a value
def test_equal_settings_compare_equal_and_hash_alike():
    assert PerflowSettings() == PerflowSettings()
    assert hash(PerflowSettings(theta=[0.1] * 4)) == hash(PerflowSettings(theta=[[0.1, 0, 0]] * 4))


def test_settings_that_differ_compare_unequal():
    assert PerflowSettings() != PerflowSettings(theta=[0.1, 0, 0, 0])
    assert PerflowSettings() != PerflowSettings(prediction_type="velocity")


def test_settings_cannot_be_changed_in_place():
    settings = PerflowSettings()
    with pytest.raises(AttributeError, match="replace"):
        settings.segments = 3
    settings.theta.add_(1.0)
    assert settings.theta_is_zero


def test_replace_gives_a_checked_copy():
    settings = PerflowSettings(segments=3, theta=THETA, prediction_type="diff_eps")
    assert settings.replace(prediction_type="velocity").theta.tolist() == THETA
    assert settings.replace(segments=2).theta_is_zero
    with pytest.raises(ValueError, match="theta"):
        settings.replace(theta=[0.1, 0.2])


def test_the_repr_shows_plain_numbers():
    text = repr(PerflowSettings(segments=2, theta=[0.5, 0]))
    assert "theta=[[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]" in text and "tensor" not in text


def test_uniform_boundaries_are_the_uniform_segments():
    assert PerflowSettings(segment_boundaries=[999, 750, 500, 250, 0]) == PerflowSettings(segments=4)
    assert PerflowSettings(segment_boundaries=[1000, 700, 0]).segment_boundaries == [1000.0, 700.0, 0.0]


# ----------------------------------------------------------------------------------- mappings
def test_the_config_round_trip_keeps_every_setting():
    settings = PerflowSettings(segment_boundaries=[1000, 700, 300, 0], theta=THETA, prediction_type="diff_eps")
    config = settings.to_config()
    assert set(config) == set(CONFIG_KEYS.values())
    assert PerflowSettings.from_config(config) == settings


def test_the_originals_num_time_windows_gives_the_segment_count():
    assert PerflowSettings.from_config({"num_time_windows": 3}).segments == 3


def test_segments_and_num_time_windows_must_agree():
    with pytest.raises(ValueError, match="segments=3 disagrees with num_time_windows=4"):
        PerflowSettings.from_config({"segments": 3, "num_time_windows": 4})


def test_config_errors_name_the_config_key():
    with pytest.raises(ValueError, match="theta_init"):
        PerflowSettings.from_config({"theta_init": [[float("nan"), 0, 0]] * 4})


def test_file_entries_follow_the_table():
    tensors, metadata = PerflowSettings(segments=2, theta=[0.5, 0]).file_entries()
    assert set(tensors) | set(metadata) == {f"perflow.{f.name}" for f in FIELDS if f.stored_as != "config"}
    assert tensors["perflow.theta"].dtype == torch.float32 and tensors["perflow.segments"].dtype == torch.int64
    assert metadata == {"perflow.prediction_type": "ddim_eps", "perflow.version": "0.1", "perflow.num_train_timesteps": "1000"}


def test_file_entries_read_back_as_the_same_settings():
    settings = PerflowSettings(segment_boundaries=[1000, 600, 0], theta=[[0.25, 0, 0.5], [0, 0, 0]], prediction_type="velocity")
    tensors, metadata = settings.file_entries()
    entries = {key[len("perflow.") :]: value for key, value in {**tensors, **metadata}.items()}
    assert PerflowSettings.from_entries(entries) == settings


def test_values_are_the_state_dict_entries():
    values = PerflowSettings(segments=2).values()
    assert set(values) == set(FIELD_NAMES)
    assert values["segment_boundaries"] == [1000.0, 500.0, 0.0] and values["theta"].shape == (2, 3)


def test_typed_text_is_read_like_numbers():
    typed = PerflowSettings.from_entries({"segment_boundaries": "1000, 700; 0", "theta": "0.1, 0, 0.2; 0 0 0"})
    assert typed == PerflowSettings(segment_boundaries=[1000, 700, 0], theta=[[0.1, 0, 0.2], [0, 0, 0]])


# ------------------------------------------------------------------------------------- checks
def test_an_unknown_setting_is_refused_naming_it():
    with pytest.raises(ValueError, match="perflow.thetas"):
        PerflowSettings.from_entries({"thetas": [0.1]}, names={"thetas": "perflow.thetas"})


def test_a_disagreeing_segment_count_names_both_inputs():
    with pytest.raises(ValueError, match="segments is 4 but boundaries"):
        PerflowSettings.from_entries({"segments": 4, "segment_boundaries": "1000, 500, 0"}, names={"segment_boundaries": "boundaries"})


def test_theta_rows_must_match_the_segments_naming_where_k_came_from():
    with pytest.raises(ValueError, match=r"theta has 2 rows but there are 3 segments \(from segment_boundaries\)"):
        PerflowSettings(segment_boundaries=[1000, 600, 300, 0], theta=[0.1, 0.2])


@pytest.mark.parametrize("segments", [0, 2.0, True, "four", 1001])
def test_a_bad_segment_count_is_refused(segments):
    with pytest.raises(ValueError, match="segments"):
        PerflowSettings(segments=segments)


def test_an_integer_theta_tensor_is_refused():
    with pytest.raises(ValueError, match="float32 or float64"):
        PerflowSettings(theta=torch.zeros(4, dtype=torch.int64))


def test_a_legacy_parameterisation_name_is_read_as_the_original_meant():
    assert PerflowSettings(prediction_type="epsilon").prediction_type == "diff_eps"


# --------------------------------------------------------------------------- steps per segment
def test_enough_steps_are_kept():
    assert PerflowSettings().steps_for(6) == 6


def test_fewer_steps_than_segments_are_raised_to_k_with_a_warning(caplog):
    assert PerflowSettings().steps_for(2, "num_inference_steps") == 4
    assert "num_inference_steps=2 is below the number of segments K=4" in caplog.text


@pytest.mark.parametrize("steps", [0, 1.5, False])
def test_a_step_count_that_is_no_whole_number_is_refused(steps):
    with pytest.raises(ValueError, match="steps must be a whole number"):
        PerflowSettings().steps_for(steps)


def test_ragged_theta_rows_are_refused_naming_theta():
    with pytest.raises(ValueError, match="theta must be numbers"):
        PerflowSettings(theta=[[0.1, 0], [0.2], [0], [0]])


# ------------------------------------------------------------------------------ hostile values
def test_train_timesteps_are_bounded_to_a_sane_range():
    assert PerflowSettings(num_train_timesteps=100_000, segments=4).num_train_timesteps == 100_000
    for value in (1, 100_001, 2**62):
        with pytest.raises(ValueError, match=r"num_train_timesteps must be a whole number in \[2, 100000\]"):
            PerflowSettings(num_train_timesteps=value)


def test_bools_are_not_theta():
    with pytest.raises(ValueError, match="theta must hold numbers"):
        PerflowSettings(theta=[True, False, True, False])


def test_text_inside_a_boundary_list_is_refused():
    with pytest.raises(ValueError, match="segment_boundaries must hold numbers"):
        PerflowSettings(segment_boundaries=["1000", "500", "0"])


def test_typed_boundary_text_is_still_read():
    assert PerflowSettings(segment_boundaries="999, 700; 400 150, 0").segment_boundaries == [1000.0, 700.0, 400.0, 150.0, 0.0]


def test_typed_boundary_text_that_is_not_numbers_names_the_input():
    with pytest.raises(ValueError, match="boundaries must be numbers separated by commas"):
        PerflowSettings(segment_boundaries="1000, half, 0", names={"segment_boundaries": "boundaries"})


def test_segments_narrower_than_one_training_timestep_are_refused():
    with pytest.raises(ValueError, match="boundaries: each segment must be at least one training timestep wide; 0.5 to 0"):
        PerflowSettings(segment_boundaries="1000, 0.5, 0", names={"segment_boundaries": "boundaries"})


def test_more_steps_than_training_timesteps_are_refused_naming_the_input():
    with pytest.raises(ValueError, match="steps=1001 is above num_train_timesteps=1000"):
        PerflowSettings().steps_for(1001)


def test_settings_print_as_lines_a_person_reads():
    settings = PerflowSettings(segment_boundaries=[999, 700, 400, 0], theta=[[0.1, 0, -0.25], [0, 0, 0], [1e-7, 2, 0]], t_clean=0.01)
    assert str(settings).splitlines() == [
        "parameterisation: ddim_eps",
        "segments: K = 3, boundaries 1000, 700, 400, 0 (custom)",
        "theta (gain, window-end scale, output change), one row per segment:",
        "0.1, 0, -0.25",
        "0, 0, 0",
        "1e-07, 2, 0",
        "t_clean: 0.01",
    ]


def test_the_parameterisation_line_can_say_how_it_was_chosen():
    assert PerflowSettings().describe("auto -> velocity").splitlines()[0] == "parameterisation: auto -> velocity"
