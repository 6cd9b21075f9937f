"""Faithful by default: PerflowScheduler against outputs of the original PeRFlowScheduler (original_reference/README.md).

img2img starts inside a segment, t_noise / t_clean, the original's public attributes and its config rules.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from perflow_core import PerflowScheduler

REFERENCE = Path(__file__).resolve().parent / "original_reference" / "original_cases.safetensors"
with safe_open(str(REFERENCE), "pt") as _file:
    METADATA = {key: json.loads(value) for key, value in _file.metadata().items() if key != "fake_model"}
ATTRIBUTES = METADATA["attributes"]
CONFIGS = METADATA["config_behaviour"]["inputs"]


def tensor(name: str) -> torch.Tensor:
    with safe_open(str(REFERENCE), "pt") as handle:
        return handle.get_tensor(name)


def fake_model(x: torch.Tensor, tau) -> torch.Tensor:
    return 0.8 * torch.tanh(x) + 0.1 * torch.sin(torch.as_tensor(float(tau)) / 37.0) * x


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()


# ------------------------------------------------------------------------------------------ img2img
@pytest.mark.parametrize("case", METADATA["img2img_cases"], ids=lambda case: case["id"])
def test_img2img_matches_the_original_including_starts_inside_a_segment(case):
    name = case["id"]
    scheduler = PerflowScheduler(prediction_type=case["prediction_type"], num_time_windows=case["num_time_windows"])
    scheduler.set_timesteps(case["num_inference_steps"])
    scheduler.set_begin_index(case["t_start"])
    timesteps = scheduler.timesteps[case["t_start"] :]
    latents = scheduler.add_noise(tensor(f"{name}.x0"), tensor(f"{name}.noise"), timesteps[:1].repeat(2))
    trajectory = [latents]
    for t in timesteps:
        latents = scheduler.step(fake_model(latents, t), t, latents).prev_sample
        trajectory.append(latents)
    assert timesteps.tolist() == case["timesteps"]
    assert_close(trajectory[0], tensor(f"{name}.noised"))
    assert_close(torch.stack(trajectory), tensor(f"{name}.trajectory"))


def test_add_noise_is_the_originals_at_every_timestep():
    scheduler = PerflowScheduler(num_time_windows=4)
    for t in range(1, 1001):
        signal = scheduler.add_noise(torch.ones(1), torch.zeros(1), torch.tensor([t]))
        noise = scheduler.add_noise(torch.zeros(1), torch.ones(1), torch.tensor([t]))
        assert_close(torch.cat([signal, noise]), torch.stack([tensor("add_noise_probe.signal_coef")[t], tensor("add_noise_probe.noise_coef")[t]]).flatten())


# ------------------------------------------------------------------------------------- t_noise, t_clean
@pytest.mark.parametrize("case", METADATA["t_noise_cases"], ids=lambda case: case["id"])
def test_t_noise_and_t_clean_behave_as_in_the_original(case):
    scheduler = PerflowScheduler(
        prediction_type=case["prediction_type"], num_time_windows=case["num_time_windows"], t_noise=case["t_noise"], t_clean=case["t_clean"]
    )
    scheduler.set_timesteps(case["num_inference_steps"])
    x = tensor(f"{case['id']}.trajectory")[0]
    trajectory = [x]
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t), t, x).prev_sample
        trajectory.append(x)
    assert scheduler.timesteps.tolist() == case["timesteps"]
    assert scheduler.time_windows.window_ends == pytest.approx(case["window_ends"])
    assert_close(torch.stack(trajectory), tensor(f"{case['id']}.trajectory"))


# ------------------------------------------------------------------------------------------- attributes
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_the_originals_attributes_exist_with_its_values(k):
    expected = ATTRIBUTES[f"K{k}"]
    scheduler = PerflowScheduler(num_time_windows=k)
    windows = expected["time_windows"]["vars"]
    assert (scheduler.time_windows.window_starts, scheduler.time_windows.window_ends) == (windows["window_starts"], windows["window_ends"])
    assert scheduler.time_windows.precision == windows["precision"]
    for name in ("alphas", "alphas_cumprod", "betas"):
        assert torch.equal(getattr(scheduler, name), tensor(f"attr_K{k}.{name}"))
    assert torch.equal(scheduler.final_alpha_cumprod.reshape(1), tensor(f"attr_K{k}.final_alpha_cumprod"))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_get_window_alpha_gives_the_originals_window_geometry(k):
    scheduler = PerflowScheduler(num_time_windows=k)
    for probe in ATTRIBUTES[f"K{k}"]["get_window_alpha_scalar"]:
        if "raised" in probe:
            continue
        outputs = scheduler.get_window_alpha(torch.tensor(probe["input"], dtype=torch.float32))
        assert [float(v) for v in outputs] == pytest.approx(list(probe["output"].values()), rel=1e-6, abs=1e-7), probe["label"]
    batch = scheduler.get_window_alpha(tensor(f"attr_K{k}.gwa_batch_input"))
    names = ("t_win_start", "t_win_end", "t_win_len", "t_interval", "gamma_s_e", "alphas_cumprod_start", "alphas_cumprod_end")
    for name, ours in zip(names, batch):
        assert torch.allclose(ours, tensor(f"attr_K{k}.gwa_batch.{name}"), rtol=1e-6, atol=1e-7), name


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("source", ["SD15_DDIM", "SD21_V", "SDXL_EULER"])
def test_a_prediction_type_from_another_scheduler_class_is_refused_naming_the_choices(source):
    with pytest.raises(ValueError, match="prediction_type") as error:
        PerflowScheduler.from_config(CONFIGS[source])
    assert all(name in str(error.value) for name in ("diff_eps", "ddim_eps", "velocity", "perflow-sdxl"))


@pytest.mark.parametrize("source", ["SD15_DDIM_NOPT", "SD15_PNDM", "SD15_DDIM_INMEM"])
def test_a_config_without_a_stated_prediction_type_gives_the_originals_default(source):
    assert PerflowScheduler.from_config(CONFIGS[source]).prediction_type == "ddim_eps"


@pytest.mark.parametrize("prediction_type", ["ddim_eps", "diff_eps", "velocity"])
def test_the_original_readme_pattern_loads(prediction_type):
    scheduler = PerflowScheduler.from_config(CONFIGS["SD15_DDIM"], prediction_type=prediction_type, num_time_windows=4)
    assert (scheduler.prediction_type, len(scheduler.segments)) == (prediction_type, 4)


def test_a_perflow_config_with_the_legacy_epsilon_is_diff_eps():
    config = {"_class_name": "PeRFlowScheduler", "prediction_type": "epsilon", "num_time_windows": 4}
    assert PerflowScheduler.from_config(config).prediction_type == "diff_eps"


def test_a_saved_config_holds_everything_the_original_saves_with_its_values(tmp_path):
    PerflowScheduler(prediction_type="diff_eps", num_time_windows=4).save_config(tmp_path)
    ours = json.loads((tmp_path / "scheduler_config.json").read_text())
    original = json.loads(METADATA["config_behaviour"]["save_config_K4_diff_eps"]["scheduler_config.json"])
    for key, value in original.items():
        if not key.startswith("_"):
            assert ours[key] == value, key


@pytest.mark.parametrize("override", ["from_config", "from_pretrained"])
def test_num_time_windows_passed_wins_over_a_stored_segment_count(tmp_path, override):
    PerflowScheduler(prediction_type="diff_eps", segments=4, theta_init=[0.1, 0, 0, 0]).save_config(tmp_path)
    if override == "from_config":
        scheduler = PerflowScheduler.from_config(PerflowScheduler.load_config(tmp_path), num_time_windows=8)
    else:
        scheduler = PerflowScheduler.from_pretrained(tmp_path, num_time_windows=8)
    assert scheduler.time_windows.window_starts == [1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    assert scheduler.config.num_time_windows == 8 and scheduler.settings.theta_is_zero


def test_a_saved_config_round_trips(tmp_path):
    scheduler = PerflowScheduler(prediction_type="diff_eps", segment_boundaries=[1000, 600, 200, 0], theta_init=[0.1, 0, 0.2])
    scheduler.save_config(tmp_path)
    assert PerflowScheduler.from_pretrained(tmp_path).settings == scheduler.settings
