"""Single-file checkpoints with `perflow.*` entries: reading, splitting, writing, refusing bad files."""

import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from perflow_core import PerflowScheduler, checkpoint
from perflow_core.checkpoint import (
    has_perflow_settings,
    perflow_keys_present,
    read_perflow_settings,
    save_theta_file,
    split_perflow_state_dict,
    write_perflow_checkpoint,
)
from perflow_core.settings import PerflowSettings

# Values exact in float32, so a round trip through the float32 on-disk theta compares equal.
THETA = [[0.5, -0.25, 0.125], [0.0, 0.75, 0.0], [0.25, 0.0, -0.5]]
PERFLOW_TENSOR_KEYS = ["perflow.segment_boundaries", "perflow.segments", "perflow.theta"]


def _settings(**changes) -> PerflowSettings:
    values = dict(segments=3, theta=THETA, prediction_type="diff_eps", version="0.1")
    values.update(changes)
    return PerflowSettings(**values)


def _weights() -> dict:
    return {"weight": torch.arange(6.0).reshape(2, 3), "bias": torch.tensor([1.0, -1.0])}


def _model_file(tmp_path: Path, name: str = "model.safetensors", **extra_tensors) -> Path:
    path = tmp_path / name
    tensors = {**_weights(), **extra_tensors}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata={"modelspec.title": "tiny"})
    else:
        torch.save(tensors, path)
    return path


def _safetensors(tmp_path: Path, tensors: dict, metadata: dict = None, name: str = "hand.safetensors") -> Path:
    path = tmp_path / name
    save_file({**_weights(), **tensors}, str(path), metadata=metadata)
    return path


def _pickle(tmp_path: Path, content: dict, name: str = "hand.ckpt") -> Path:
    path = tmp_path / name
    torch.save(content, path)
    return path


def _assert_same_settings(actual: PerflowSettings, expected: PerflowSettings) -> None:
    assert actual.segments == expected.segments
    assert actual.segment_boundaries == expected.segment_boundaries
    assert torch.equal(actual.theta, expected.theta)
    assert actual.prediction_type == expected.prediction_type
    assert actual.version == expected.version
    assert actual.num_train_timesteps == expected.num_train_timesteps


# ----------------------------------------------------------------------------------- round trips
def test_safetensors_round_trip_keeps_every_setting(tmp_path):
    written = tmp_path / "perflow.safetensors"
    write_perflow_checkpoint(_model_file(tmp_path), written, _settings())
    _assert_same_settings(read_perflow_settings(written), _settings())


def test_explicit_boundaries_round_trip(tmp_path):
    settings = _settings(segments=None, segment_boundaries=[999, 700, 300, 0])
    written = tmp_path / "perflow.safetensors"
    write_perflow_checkpoint(_model_file(tmp_path), written, settings)
    assert read_perflow_settings(written).segment_boundaries == [1000.0, 700.0, 300.0, 0.0]


def test_uniform_segments_are_stored_as_boundaries_and_read_back_as_uniform(tmp_path):
    written = tmp_path / "perflow.safetensors"
    write_perflow_checkpoint(_model_file(tmp_path), written, _settings())
    stored = load_file(str(written))["perflow.segment_boundaries"]
    assert stored.dtype == torch.float32 and stored.tolist() == pytest.approx([1000, 2000 / 3, 1000 / 3, 0])
    assert read_perflow_settings(written).segment_boundaries is None


def test_written_tensors_have_the_documented_dtypes_and_shapes(tmp_path):
    written = tmp_path / "perflow.safetensors"
    write_perflow_checkpoint(_model_file(tmp_path), written, _settings())
    tensors = load_file(str(written))
    assert (tensors["perflow.theta"].dtype, tuple(tensors["perflow.theta"].shape)) == (torch.float32, (3, 3))
    assert (tensors["perflow.segments"].dtype, tensors["perflow.segments"].ndim) == (torch.int64, 0)


def test_written_metadata_holds_the_text_settings(tmp_path):
    written = tmp_path / "perflow.safetensors"
    write_perflow_checkpoint(_model_file(tmp_path), written, _settings())
    with safe_open(str(written), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["perflow.prediction_type"] == "diff_eps"
    assert metadata["perflow.version"] == "0.1"
    assert metadata["perflow.num_train_timesteps"] == "1000"


def test_flat_pickle_round_trip(tmp_path):
    written = tmp_path / "perflow.ckpt"
    write_perflow_checkpoint(_model_file(tmp_path, "model.ckpt"), written, _settings())
    content = torch.load(written, weights_only=True)
    assert "perflow.theta" in content and "weight" in content
    _assert_same_settings(read_perflow_settings(written), _settings())


def test_nested_pickle_round_trip_stays_nested(tmp_path):
    source = _pickle(tmp_path, {"state_dict": _weights(), "global_step": 7}, name="model.ckpt")
    written = tmp_path / "perflow.ckpt"
    write_perflow_checkpoint(source, written, _settings())
    content = torch.load(written, weights_only=True)
    assert set(content) == {"state_dict", "global_step", "perflow"}
    assert set(content["state_dict"]) == {"weight", "bias"}
    _assert_same_settings(read_perflow_settings(written), _settings())


def test_pickle_converts_to_safetensors(tmp_path):
    written = tmp_path / "perflow.safetensors"
    write_perflow_checkpoint(_model_file(tmp_path, "model.pt"), written, _settings())
    assert torch.equal(load_file(str(written))["weight"], _weights()["weight"])
    _assert_same_settings(read_perflow_settings(written), _settings())


def test_legacy_non_zip_pickle_is_read(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({**_weights(), "perflow.segments": 2}, path, _use_new_zipfile_serialization=False)
    assert read_perflow_settings(path).segments == 2


# --------------------------------------------------------------------------- hand-written files
def test_hand_written_safetensors_with_a_theta_vector_and_float64(tmp_path):
    path = _safetensors(
        tmp_path,
        {
            "perflow.theta": torch.tensor([0.1, 0.2], dtype=torch.float64),
            "perflow.segment_boundaries": torch.tensor([999.0, 400.0, 0.0]),
            "perflow.segments": torch.tensor([2]),
        },
        {"perflow.prediction_type": "velocity", "perflow.version": "0.1"},
    )
    settings = read_perflow_settings(path)
    assert settings.theta.tolist() == [[0.1, 0.0, 0.0], [0.2, 0.0, 0.0]]
    assert (settings.segments, settings.segment_boundaries) == (2, [1000.0, 400.0, 0.0])
    assert settings.prediction_type == "velocity"


def test_slash_spelling_is_accepted(tmp_path):
    path = _safetensors(
        tmp_path,
        {"perflow/theta": torch.tensor(THETA), "perflow/segments": torch.tensor(3)},
        {"perflow/prediction_type": "ddim_eps"},
    )
    settings = read_perflow_settings(path)
    assert torch.equal(settings.theta, torch.tensor(THETA, dtype=torch.float64))
    assert settings.prediction_type == "ddim_eps"


def test_metadata_may_give_segments_and_boundaries_as_json(tmp_path):
    path = _safetensors(tmp_path, {}, {"perflow.segments": "2", "perflow.segment_boundaries": "[1000, 600, 0]"})
    assert read_perflow_settings(path).segment_boundaries == [1000.0, 600.0, 0.0]


def test_legacy_epsilon_means_diff_eps(tmp_path):
    path = _safetensors(tmp_path, {}, {"perflow.prediction_type": "epsilon"})
    assert read_perflow_settings(path).prediction_type == "diff_eps"


def test_a_setting_given_twice_with_the_same_value_is_accepted(tmp_path):
    path = _safetensors(tmp_path, {"perflow.segments": torch.tensor(5)}, {"perflow.segments": "5"})
    assert read_perflow_settings(path).segments == 5


def test_hand_written_flat_pickle_with_plain_values(tmp_path):
    entries = {"perflow.theta": [0.5, 0.25], "perflow.segments": 2, "perflow.prediction_type": "velocity"}
    path = _pickle(tmp_path, {**_weights(), **entries})
    settings = read_perflow_settings(path)
    assert settings.theta[:, 0].tolist() == [0.5, 0.25]
    assert settings.prediction_type == "velocity"


def test_hand_written_nested_pickle(tmp_path):
    nested = {"theta": torch.tensor(THETA), "segments": 3, "segment_boundaries": [1000, 500, 250, 0], "version": "0.1"}
    path = _pickle(tmp_path, {"perflow": nested, "state_dict": _weights()})
    settings = read_perflow_settings(path)
    assert settings.segment_boundaries == [1000.0, 500.0, 250.0, 0.0]
    assert torch.equal(settings.theta, torch.tensor(THETA, dtype=torch.float64))


# -------------------------------------------------------------------------------- what is read
def test_reading_safetensors_fetches_only_the_perflow_tensors(tmp_path, monkeypatch):
    written = tmp_path / "perflow.safetensors"
    write_perflow_checkpoint(_model_file(tmp_path), written, _settings())
    fetched = []

    class SpyingSafeOpen:
        def __init__(self, *args, **kwargs):
            self._handle = safe_open(*args, **kwargs)

        def __enter__(self):
            self._open = self._handle.__enter__()
            return self

        def __exit__(self, *exc_info):
            return self._handle.__exit__(*exc_info)

        def __getattr__(self, name):
            return getattr(self._open, name)

        def get_tensor(self, key):
            fetched.append(key)
            return self._open.get_tensor(key)

    monkeypatch.setattr(checkpoint, "safe_open", SpyingSafeOpen)
    read_perflow_settings(written)
    assert sorted(fetched) == PERFLOW_TENSOR_KEYS


def test_a_file_without_perflow_keys_gives_the_defaults(tmp_path):
    settings = read_perflow_settings(_model_file(tmp_path))
    assert (settings.segments, settings.segment_boundaries, settings.prediction_type) == (4, None, "ddim_eps")
    assert settings.theta.shape == (4, 3) and settings.theta_is_zero


def test_missing_fields_take_defaults_sized_to_the_segments(tmp_path):
    path = _safetensors(tmp_path, {"perflow.segments": torch.tensor(6)})
    assert read_perflow_settings(path).theta.shape == (6, 3)


def test_perflow_keys_present_lists_the_fields_the_file_gives(tmp_path):
    path = _safetensors(tmp_path, {"perflow/theta": torch.zeros(4)}, {"perflow.version": "0.1"})
    assert perflow_keys_present(path) == ["perflow.theta", "perflow.version"]


def test_perflow_keys_present_sees_the_nested_layout(tmp_path):
    path = _pickle(tmp_path, {"perflow": {"segments": 2}, "state_dict": _weights()})
    assert perflow_keys_present(path) == ["perflow.segments"]


def test_has_perflow_settings(tmp_path):
    written = tmp_path / "perflow.safetensors"
    write_perflow_checkpoint(_model_file(tmp_path), written, _settings())
    assert has_perflow_settings(written)
    assert not has_perflow_settings(_model_file(tmp_path, "plain.safetensors"))


# ------------------------------------------------------------------------------------ splitting
def test_split_removes_perflow_entries_and_keeps_the_weights():
    state_dict = {**_weights(), "perflow.theta": torch.tensor(THETA), "perflow/segments": torch.tensor(3)}
    settings, weights = split_perflow_state_dict(state_dict, {"perflow.prediction_type": "velocity", "other": "x"})
    assert set(weights) == {"weight", "bias"}
    assert (settings.segments, settings.prediction_type) == (3, "velocity")


def test_split_of_the_nested_layout_returns_the_inner_weights():
    state_dict = {"perflow": {"segments": 2}, "state_dict": {**_weights(), "perflow.version": "0.1"}, "epoch": 3}
    settings, weights = split_perflow_state_dict(state_dict)
    assert set(weights) == {"weight", "bias"}
    assert settings.segments == 2


def test_split_leaves_its_input_unchanged():
    state_dict = {**_weights(), "perflow.segments": torch.tensor(2)}
    split_perflow_state_dict(state_dict)
    assert "perflow.segments" in state_dict


def test_split_names_the_bad_key():
    with pytest.raises(ValueError, match="perflow.theta"):
        split_perflow_state_dict({"perflow.theta": torch.full((4,), float("nan"))})


# -------------------------------------------------------------------------------------- writing
def test_writer_keeps_other_tensors_and_metadata(tmp_path):
    written = tmp_path / "perflow.safetensors"
    write_perflow_checkpoint(_model_file(tmp_path), written, _settings())
    tensors = load_file(str(written))
    assert torch.equal(tensors["weight"], _weights()["weight"]) and torch.equal(tensors["bias"], _weights()["bias"])
    with safe_open(str(written), framework="pt") as handle:
        assert handle.metadata()["modelspec.title"] == "tiny"


def test_writer_replaces_the_source_perflow_entries(tmp_path):
    old_entries = {"perflow/theta": torch.ones(2), "perflow/segments": torch.tensor(2)}
    source = _safetensors(tmp_path, old_entries, {"perflow/version": "0.0"})
    written = tmp_path / "perflow.safetensors"
    write_perflow_checkpoint(source, written, _settings())
    fields = ["theta", "segments", "segment_boundaries", "prediction_type", "version", "num_train_timesteps"]
    assert perflow_keys_present(written) == sorted(f"perflow.{field}" for field in fields)
    assert not any(key.startswith("perflow/") for key in load_file(str(written)))
    _assert_same_settings(read_perflow_settings(written), _settings())


def test_writer_leaves_the_source_untouched(tmp_path):
    source = _model_file(tmp_path)
    before = source.read_bytes()
    write_perflow_checkpoint(source, tmp_path / "perflow.safetensors", _settings())
    assert source.read_bytes() == before


def test_writer_adds_extra_metadata(tmp_path):
    written = tmp_path / "perflow.safetensors"
    write_perflow_checkpoint(_model_file(tmp_path), written, _settings(), extra_metadata={"note": "fitted"})
    with safe_open(str(written), framework="pt") as handle:
        assert handle.metadata()["note"] == "fitted"


def test_writer_refuses_perflow_keys_in_extra_metadata(tmp_path):
    with pytest.raises(ValueError, match="perflow.version"):
        write_perflow_checkpoint(_model_file(tmp_path), tmp_path / "out.safetensors", _settings(), {"perflow.version": "9"})


def test_writer_refuses_the_source_as_destination(tmp_path):
    source = _model_file(tmp_path)
    with pytest.raises(FileExistsError):
        write_perflow_checkpoint(source, tmp_path / "." / source.name, _settings())


def test_writer_refuses_the_source_as_destination_even_with_overwrite(tmp_path):
    source = _model_file(tmp_path)
    with pytest.raises(ValueError, match="source"):
        write_perflow_checkpoint(source, tmp_path / "." / source.name, _settings(), overwrite=True)


def test_writer_refuses_a_safetensors_source_with_a_pickle_destination(tmp_path):
    with pytest.raises(ValueError, match=".safetensors"):
        write_perflow_checkpoint(_model_file(tmp_path), tmp_path / "out.ckpt", _settings())


def test_a_loader_that_ignores_perflow_keys_still_loads_the_model(tmp_path):
    written = tmp_path / "perflow.safetensors"
    write_perflow_checkpoint(_model_file(tmp_path), written, _settings())
    model = torch.nn.Linear(3, 2)
    result = model.load_state_dict(load_file(str(written)), strict=False)
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == PERFLOW_TENSOR_KEYS
    assert torch.equal(model.weight.detach(), _weights()["weight"])


def test_theta_file_round_trip(tmp_path):
    path = tmp_path / "theta.safetensors"
    save_theta_file(path, _settings())
    _assert_same_settings(read_perflow_settings(path), _settings())


def test_theta_file_holds_only_perflow_entries(tmp_path):
    path = tmp_path / "theta.safetensors"
    save_theta_file(path, _settings())
    assert sorted(load_file(str(path))) == PERFLOW_TENSOR_KEYS


def test_theta_file_needs_a_safetensors_name(tmp_path):
    with pytest.raises(ValueError, match=".safetensors"):
        save_theta_file(tmp_path / "theta.pt", _settings())


# ----------------------------------------------------------------------------- hostile pickles
class _CreatesMarkerWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_hostile_fixture_runs_code_under_a_plain_unpickler(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_CreatesMarkerWhenUnpickled(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_pickle_that_needs_code_is_refused_and_not_run(tmp_path, zip_format):
    marker = tmp_path / "marker"
    path = tmp_path / "hostile.ckpt"
    torch.save({**_weights(), "payload": _CreatesMarkerWhenUnpickled(marker)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match="arbitrary code") as error:
        read_perflow_settings(path)
    assert "refused" in str(error.value) and "nothing" in str(error.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------- bad inputs
def test_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        read_perflow_settings(tmp_path / "absent.safetensors")


def test_an_unknown_extension_lists_the_accepted_ones(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.safetensors.*\.ckpt"):
        read_perflow_settings(path)


@pytest.mark.parametrize("name", ["model.safetensors", "model.ckpt", "legacy.pt"])
def test_a_truncated_file_is_reported_as_truncated(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(_weights(), str(path))
    else:
        torch.save(_weights(), path, _use_new_zipfile_serialization=name.endswith(".ckpt"))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated") as error:
        read_perflow_settings(path)
    assert name in str(error.value)


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.pt", "empty.pt"])
def test_a_file_of_another_kind_is_reported(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else b"this is not a checkpoint at all")
    with pytest.raises(ValueError, match="not a (safetensors|torch) file"):
        read_perflow_settings(path)


NAN = float("nan")


@pytest.mark.parametrize(
    "tensors, metadata, keys",
    [
        ({"perflow.theta": torch.tensor([0.1, NAN, 0.0, 0.0])}, {}, ["perflow.theta"]),
        ({"perflow.theta": torch.tensor([0.1, float("inf"), 0.0, 0.0])}, {}, ["perflow.theta"]),
        ({"perflow.theta": torch.zeros(3, 3), "perflow.segments": torch.tensor(4)}, {}, ["perflow.theta", "perflow.segments"]),
        ({"perflow.theta": torch.zeros(4, 5)}, {}, ["perflow.theta"]),
        ({"perflow.theta": torch.zeros(4, dtype=torch.int64)}, {}, ["perflow.theta"]),
        ({"perflow.segment_boundaries": torch.tensor([1000.0, 300.0, 600.0, 0.0])}, {}, ["perflow.segment_boundaries"]),
        ({"perflow.segment_boundaries": torch.tensor([1200.0, 500.0, 0.0])}, {}, ["perflow.segment_boundaries"]),
        ({"perflow.segment_boundaries": torch.tensor([1000.0, 500.0, 10.0])}, {}, ["perflow.segment_boundaries"]),
        ({"perflow.segment_boundaries": torch.zeros(2, 2)}, {}, ["perflow.segment_boundaries"]),
        (
            {"perflow.segment_boundaries": torch.tensor([1000.0, 500.0, 0.0]), "perflow.segments": torch.tensor(3)},
            {},
            ["perflow.segments", "perflow.segment_boundaries"],
        ),
        ({"perflow.segments": torch.tensor(0)}, {}, ["perflow.segments"]),
        ({"perflow.segments": torch.tensor(2.0)}, {}, ["perflow.segments"]),
        ({"perflow.segments": torch.tensor([2, 3])}, {}, ["perflow.segments"]),
        ({}, {"perflow.segments": "four"}, ["perflow.segments"]),
        ({}, {"perflow.prediction_type": "sample"}, ["perflow.prediction_type"]),
        ({}, {"perflow.version": " "}, ["perflow.version"]),
        ({}, {"perflow.num_train_timesteps": "1"}, ["perflow.num_train_timesteps"]),
        ({"perflow.thetas": torch.zeros(4)}, {}, ["perflow.thetas"]),
        ({"perflow.theta": torch.zeros(4), "perflow/theta": torch.ones(4)}, {}, ["perflow.theta", "perflow/theta"]),
        ({"perflow.segments": torch.tensor(4)}, {"perflow.segments": "3"}, ["perflow.segments"]),
    ],
)
def test_a_bad_safetensors_entry_names_its_key_and_the_file(tmp_path, tensors, metadata, keys):
    path = _safetensors(tmp_path, tensors, metadata)
    with pytest.raises(ValueError) as error:
        read_perflow_settings(path)
    assert all(key in str(error.value) for key in keys) and path.name in str(error.value)


@pytest.mark.parametrize(
    "content, key",
    [
        ({"perflow": {"theta": [NAN, 0.0, 0.0, 0.0]}, "state_dict": {}}, "perflow.theta"),
        ({"perflow": {"prediction_type": torch.tensor(1)}, "state_dict": {}}, "perflow.prediction_type"),
        ({"perflow.version": 1, "weight": torch.ones(1)}, "perflow.version"),
        ({"perflow.segment_boundaries": [999, 999, 0]}, "perflow.segment_boundaries"),
    ],
)
def test_a_bad_pickle_entry_names_its_key_and_the_file(tmp_path, content, key):
    path = _pickle(tmp_path, content)
    with pytest.raises(ValueError, match=key) as error:
        read_perflow_settings(path)
    assert path.name in str(error.value)


# ------------------------------------------------------------------------------------ scheduler
def _scheduler_file(tmp_path: Path) -> Path:
    written = tmp_path / "perflow.safetensors"
    write_perflow_checkpoint(_model_file(tmp_path), written, _settings(segments=None, segment_boundaries=[1000, 600, 300, 0]))
    return written


def test_from_single_file_uses_the_file_settings(tmp_path):
    scheduler = PerflowScheduler.from_single_file(_scheduler_file(tmp_path))
    assert scheduler.segments.boundaries == [1000.0, 600.0, 300.0, 0.0]
    assert torch.equal(scheduler.theta, torch.tensor(THETA, dtype=torch.float64))
    assert scheduler.prediction_type == "diff_eps"


def test_from_single_file_overrides_win(tmp_path):
    scheduler = PerflowScheduler.from_single_file(_scheduler_file(tmp_path), prediction_type="velocity", theta_init=None)
    assert scheduler.prediction_type == "velocity"
    assert not scheduler.theta.any()


def test_from_single_file_without_perflow_keys_gives_the_default_scheduler(tmp_path):
    scheduler = PerflowScheduler.from_single_file(_model_file(tmp_path))
    assert len(scheduler.segments) == 4 and not scheduler.theta.any()


def test_a_file_with_theta_alone_has_one_uniform_segment_per_theta_row(tmp_path):
    path = tmp_path / "theta_only.safetensors"
    save_file({"perflow.theta": torch.zeros(6, 3)}, str(path))
    settings = read_perflow_settings(path)
    assert settings.segments == 6 and settings.segment_boundaries is None


@pytest.mark.parametrize("name", ["weights.pt", "nested.ckpt"])
def test_a_torch_checkpoint_carries_the_model_settings_but_not_the_sampler_options(tmp_path, name):
    source = tmp_path / name
    torch.save({"state_dict": {"w": torch.ones(1)}} if name.endswith(".ckpt") else {"w": torch.ones(1)}, source)
    write_perflow_checkpoint(source, tmp_path / f"out_{name}", PerflowSettings(img2img_start="straight_path"))
    assert perflow_keys_present(tmp_path / f"out_{name}") == sorted(
        f"perflow.{f}" for f in ("num_train_timesteps", "prediction_type", "segment_boundaries", "segments", "theta", "version")
    )
