"""Spec: reading a diffusers-format model folder without diffusers or ComfyUI (perflow_core.diffusers_folder):
which weight files each component uses (default names, fp16, the releases' variants, shards), which folders are
model folders, and the PeRFlow settings a scheduler config states."""

import json

import pytest

from perflow_core import PerflowScheduler
from perflow_core.diffusers_folder import model_folders, read_json, scheduler_config, scheduler_settings, states_v_prediction, weight_files
from perflow_core.settings import PerflowSettings
from support.diffusers_folders import ORIGINAL_PERFLOW_SCHEDULER as ORIGINAL_CONFIG



def _files(folder, *names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _names(paths):
    return [path.name for path in paths]


# ------------------------------------------------------------------------------------------------ weight files
def test_default_names_are_taken_in_comfyuis_order(tmp_path):
    _files(tmp_path, "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors")
    assert _names(weight_files(tmp_path, "unet")) == ["diffusion_pytorch_model.fp16.safetensors"]


def test_the_sdxl_releases_variant_names_are_found(tmp_path):
    _files(tmp_path, "unet/diffusion_pytorch_model.v0-fix.safetensors", "text_encoder_2/model.v0-fix.safetensors", "unet/config.json")
    assert _names(weight_files(tmp_path, "unet")) == ["diffusion_pytorch_model.v0-fix.safetensors"]
    assert _names(weight_files(tmp_path, "text_encoder_2")) == ["model.v0-fix.safetensors"]


def test_default_names_come_before_other_variants_and_safetensors_before_pickles(tmp_path):
    _files(tmp_path, "vae/diffusion_pytorch_model.non_ema.safetensors", "vae/diffusion_pytorch_model.bin")
    assert _names(weight_files(tmp_path, "vae")) == ["diffusion_pytorch_model.bin"]
    _files(tmp_path, "unet/diffusion_pytorch_model.v0-fix.bin", "unet/diffusion_pytorch_model.v0-fix.safetensors")
    assert _names(weight_files(tmp_path, "unet")) == ["diffusion_pytorch_model.v0-fix.safetensors"]


def test_text_encoders_use_transformers_names(tmp_path):
    _files(tmp_path, "text_encoder/pytorch_model.fp16.bin", "text_encoder/diffusion_pytorch_model.safetensors")
    assert _names(weight_files(tmp_path, "text_encoder")) == ["pytorch_model.fp16.bin"]


def test_a_sharded_set_is_every_shard_of_its_index(tmp_path):
    shards = ["diffusion_pytorch_model.v0-fix-00001-of-00002.safetensors", "diffusion_pytorch_model.v0-fix-00002-of-00002.safetensors"]
    _files(tmp_path, *(f"unet/{name}" for name in shards))
    index = {"metadata": {}, "weight_map": {"conv_in.weight": shards[0], "conv_out.weight": shards[1], "conv_out.bias": shards[1]}}
    (tmp_path / "unet/diffusion_pytorch_model.safetensors.index.v0-fix.json").write_text(json.dumps(index))
    assert _names(weight_files(tmp_path, "unet")) == shards


def test_an_index_naming_a_missing_or_outside_shard_is_refused(tmp_path):
    (tmp_path / "unet").mkdir()
    for shard in ("missing.safetensors", "../elsewhere.safetensors"):
        (tmp_path / "unet/diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
        with pytest.raises(ValueError, match=r"^unet/diffusion_pytorch_model.safetensors.index.json names the shard"):
            weight_files(tmp_path, "unet")


def test_a_component_without_weights_is_refused_naming_it(tmp_path):
    _files(tmp_path, "unet/config.json")
    with pytest.raises(ValueError, match=r"^unet/ has no weights: expected unet/diffusion_pytorch_model\[.<variant>\].safetensors"):
        weight_files(tmp_path, "unet")
    with pytest.raises(ValueError, match=r"^text_encoder_2/ has no weights"):
        weight_files(tmp_path, "text_encoder_2")


# ----------------------------------------------------------------------------------------------- model folders
def test_model_folders_are_those_holding_a_model_index(tmp_path):
    _files(tmp_path, "perflow-sd15-dreamshaper/model_index.json", "hub/perflow-sdxl-base/model_index.json", "loose/unet/config.json")
    assert model_folders(tmp_path) == ["hub/perflow-sdxl-base", "perflow-sd15-dreamshaper"]
    assert model_folders(tmp_path / "absent") == []


def test_json_that_cannot_be_read_is_refused_naming_the_file(tmp_path):
    (tmp_path / "a.json").write_text("[1, 2]")
    (tmp_path / "b.json").write_text("{broken")
    with pytest.raises(ValueError, match="^model_index.json must hold a JSON object; it holds a list"):
        read_json(tmp_path / "a.json", "model_index.json")
    with pytest.raises(ValueError, match="^model_index.json is not readable JSON"):
        read_json(tmp_path / "b.json", "model_index.json")
    with pytest.raises(ValueError, match="^model_index.json is missing"):
        read_json(tmp_path / "c.json", "model_index.json")


# -------------------------------------------------------------------------------------------- scheduler config
def test_the_originals_config_gives_its_settings():
    assert scheduler_settings(ORIGINAL_CONFIG) == PerflowSettings(segments=4, prediction_type="ddim_eps")
    config = dict(ORIGINAL_CONFIG, prediction_type="epsilon", num_time_windows=3, t_clean=0.05)
    assert scheduler_settings(config) == PerflowSettings(segments=3, prediction_type="diff_eps", t_clean=0.05)


def test_our_schedulers_saved_config_gives_its_settings(tmp_path):
    scheduler = PerflowScheduler(segment_boundaries=[1000, 700, 400, 150, 0], theta_init=[[0.1, 0, 0]] * 4, prediction_type="velocity")
    scheduler.save_pretrained(tmp_path / "scheduler")
    assert scheduler_settings(scheduler_config(tmp_path)) == scheduler.perflow_settings()


def test_another_schedulers_config_states_no_perflow_settings():
    for class_name, prediction_type in (("PNDMScheduler", "epsilon"), ("DDIMScheduler", "v_prediction"), ("EulerDiscreteScheduler", "epsilon")):
        assert scheduler_settings({"_class_name": class_name, "prediction_type": prediction_type, "num_train_timesteps": 1000}) is None
    assert scheduler_settings(None) is None


def test_bad_settings_are_refused_naming_the_file_and_key():
    with pytest.raises(ValueError, match=r"^scheduler/scheduler_config.json \(PeRFlowScheduler\): num_time_windows"):
        scheduler_settings(dict(ORIGINAL_CONFIG, num_time_windows=0))
    with pytest.raises(ValueError, match=r"^scheduler/scheduler_config.json \(PeRFlowScheduler\): prediction_type"):
        scheduler_settings(dict(ORIGINAL_CONFIG, prediction_type="sample"))


def test_v_prediction_is_read_from_another_schedulers_config_only():
    assert states_v_prediction({"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"})
    assert not states_v_prediction({"_class_name": "DDIMScheduler", "prediction_type": "epsilon"})
    assert not states_v_prediction({"_class_name": "PeRFlowScheduler", "prediction_type": "v_prediction"})
    assert not states_v_prediction(None)


def test_a_folder_without_a_scheduler_config_has_none(tmp_path):
    assert scheduler_config(tmp_path) is None
    _files(tmp_path, "scheduler/scheduler_config.json")
    (tmp_path / "scheduler/scheduler_config.json").write_text(json.dumps(ORIGINAL_CONFIG))
    assert scheduler_config(tmp_path) == ORIGINAL_CONFIG
