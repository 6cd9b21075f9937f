"""PerflowScheduler as a diffusers scheduler: config, timesteps, step, add_noise, state dicts, loading."""

import json
import logging

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from perflow_core import PerflowScheduler

ORIGINAL_PERFLOW_CONFIG = {
    "_class_name": "PeRFlowScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_time_windows": 4,
    "num_train_timesteps": 1000,
    "prediction_type": "diff_eps",
    "set_alpha_to_one": False,
    "t_clean": 0,
    "t_noise": 1,
    "trained_betas": None,
}
SEED_CONFIG = {
    "class": "PerflowScheduler",
    "num_train_timesteps": 1000,
    "segments": 4,
    "segment_boundaries": [999, 750, 500, 250, 0],
    "theta_init": None,
    "learn_theta": False,
    "version": "0.1",
}


def sample_with(scheduler, steps=4, shape=(1, 4, 2, 2)):
    scheduler.set_timesteps(steps)
    x = torch.ones(shape)
    for t in scheduler.timesteps:
        x = scheduler.step(0.5 * x + 0.1, t, x).prev_sample
    return x


def test_defaults_are_the_original_four_uniform_segments_and_zero_theta():
    scheduler = PerflowScheduler()
    assert len(scheduler.segments) == 4
    assert not scheduler.theta.any()
    assert scheduler.config.segments == 4


def test_loads_an_original_perflow_config():
    scheduler = PerflowScheduler.from_config(ORIGINAL_PERFLOW_CONFIG)
    assert scheduler.prediction_type == "diff_eps"
    assert len(scheduler.segments) == 4


def test_loads_the_seed_example_config():
    scheduler = PerflowScheduler.from_config(SEED_CONFIG)
    assert scheduler.segments.boundaries == [1000.0, 750.0, 500.0, 250.0, 0.0]
    assert scheduler.config.version == "0.1"


def test_seed_config_naming_another_class_is_refused():
    with pytest.raises(ValueError, match="'class'"):
        PerflowScheduler.from_config({**SEED_CONFIG, "class": "DDIMScheduler"})


def test_legacy_epsilon_means_diff_eps():
    assert PerflowScheduler(prediction_type="epsilon").prediction_type == "diff_eps"


def test_loads_a_stable_diffusion_scheduler_config():
    sd_config = PNDMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True, prediction_type="epsilon"
    ).config
    scheduler = PerflowScheduler.from_config(sd_config)
    assert torch.allclose(scheduler.alphas_cumprod, DDIMScheduler.from_config(sd_config).alphas_cumprod)
    assert scheduler.prediction_type == "diff_eps"


def test_unknown_prediction_type_is_refused_with_the_accepted_values():
    with pytest.raises(ValueError, match="prediction_type must be one of diff_eps, ddim_eps, velocity"):
        PerflowScheduler(prediction_type="sample")


def test_disagreeing_segment_counts_are_refused():
    with pytest.raises(ValueError, match="disagrees"):
        PerflowScheduler(segments=3, num_time_windows=4)


def test_theta_with_the_wrong_number_of_rows_is_refused():
    with pytest.raises(ValueError, match="theta_init"):
        PerflowScheduler(segments=4, theta_init=[0.1, 0.2])


def test_fewer_steps_than_segments_are_raised_to_one_per_segment_with_a_warning(caplog):
    scheduler = PerflowScheduler()
    with caplog.at_level(logging.WARNING):
        scheduler.set_timesteps(2)
    assert scheduler.timesteps.tolist() == [1000, 750, 500, 250]
    assert "below the number of segments" in caplog.text


def test_sigmas_are_refused():
    with pytest.raises(ValueError, match="sigmas"):
        PerflowScheduler().set_timesteps(sigmas=[1.0, 0.5])


def test_custom_timesteps_are_used_as_given():
    scheduler = PerflowScheduler()
    scheduler.set_timesteps(timesteps=[1000, 800, 500, 100])
    assert scheduler.timesteps.tolist() == [1000, 800, 500, 100]
    assert sample_with_timesteps(scheduler).isfinite().all()


def sample_with_timesteps(scheduler):
    x = torch.ones(1, 4)
    for t in scheduler.timesteps:
        x = scheduler.step(0.5 * x, t, x).prev_sample
    return x


@pytest.mark.parametrize("timesteps", [[500, 800], [1000, 0], [1001, 10], [999.5, 10]])
def test_bad_custom_timesteps_are_refused(timesteps):
    with pytest.raises(ValueError, match="timesteps must be"):
        PerflowScheduler().set_timesteps(timesteps=timesteps)


def test_step_before_set_timesteps_is_refused():
    with pytest.raises(ValueError, match="set_timesteps"):
        PerflowScheduler().step(torch.zeros(1), 1000, torch.zeros(1))


def test_step_returns_a_tuple_without_return_dict():
    scheduler = PerflowScheduler()
    scheduler.set_timesteps(4)
    x = torch.ones(1, 4)
    output = scheduler.step(x, 1000, x, return_dict=False)
    assert isinstance(output, tuple) and torch.equal(output[0], scheduler_step_dict(x))


def scheduler_step_dict(x):
    scheduler = PerflowScheduler()
    scheduler.set_timesteps(4)
    return scheduler.step(x, 1000, x).prev_sample


def test_step_gives_a_clean_estimate_for_previews():
    scheduler = PerflowScheduler(prediction_type="ddim_eps")
    scheduler.set_timesteps(4)
    clean, noise = torch.full((1, 4), 0.5), torch.randn(1, 4, generator=torch.Generator().manual_seed(0))
    a = float(scheduler.alphas_cumprod[999])
    sample = a**0.5 * clean + (1 - a) ** 0.5 * noise
    output = scheduler.step(noise, 1000, sample)
    # With the true noise as model output, a DDIM-style model lands on the true x0.
    assert torch.allclose(output.pred_original_sample, clean, atol=1e-4)


def test_step_index_advances_and_begin_index_starts_img2img():
    scheduler = PerflowScheduler()
    scheduler.set_timesteps(8)
    scheduler.set_begin_index(4)
    x = torch.ones(1, 4)
    scheduler.step(x, scheduler.timesteps[4], x)
    assert scheduler.begin_index == 4 and scheduler.step_index == 5


def test_add_noise_at_a_segment_start_is_the_ddpm_marginal():
    scheduler = PerflowScheduler()
    clean, noise = torch.ones(2, 3), torch.full((2, 3), 2.0)
    a = scheduler.alphas_cumprod[499].double()
    noisy = scheduler.add_noise(clean, noise, torch.tensor([500]))
    assert torch.allclose(noisy, (a.sqrt() * clean + (1 - a).sqrt() * noise).float())


def test_add_noise_inside_a_segment_is_the_ddpm_marginal_by_default_as_in_the_original():
    scheduler = PerflowScheduler()
    clean, noise = torch.ones(1, 3), torch.full((1, 3), 2.0)
    alpha = scheduler.alphas_cumprod[874].double()
    expected = (alpha.sqrt() * clean + (1 - alpha).sqrt() * noise).float()
    assert torch.allclose(scheduler.add_noise(clean, noise, torch.tensor([875])), expected, atol=1e-6)


def test_add_noise_inside_a_segment_lies_on_the_straight_path_when_asked():
    scheduler = PerflowScheduler(img2img_start="straight_path")
    clean, noise = torch.ones(1, 3), torch.full((1, 3), 2.0)
    start = scheduler.add_noise(clean, noise, torch.tensor([1000]))
    end = scheduler.add_noise(clean, noise, torch.tensor([750]))
    end_of_first_window = scheduler.alphas_cumprod[749].double()
    end = (end_of_first_window.sqrt() * clean + (1 - end_of_first_window).sqrt() * noise).float()
    middle = scheduler.add_noise(clean, noise, torch.tensor([875]))
    assert torch.allclose(middle, (start + end) / 2, atol=1e-6)


def test_add_noise_takes_one_timestep_per_sample():
    scheduler = PerflowScheduler()
    noisy = scheduler.add_noise(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([1000, 250]))
    assert noisy[0, 0] < noisy[1, 0]


def test_scale_model_input_is_the_identity_and_init_noise_sigma_is_one():
    scheduler = PerflowScheduler()
    x = torch.randn(1, 4)
    assert scheduler.scale_model_input(x, 1000) is x
    assert scheduler.init_noise_sigma == 1.0


def test_length_order_and_compatibles():
    scheduler = PerflowScheduler()
    assert len(scheduler) == 1000 and scheduler.order == 1
    assert "DDIMScheduler" in scheduler.compatibles[0].__name__ or any(c.__name__ == "DDIMScheduler" for c in scheduler.compatibles)


def test_save_pretrained_round_trips_theta_and_segments(tmp_path):
    theta = [[0.1, -0.2, 0.3], [0.0, 0.1, 0.0], [0.2, 0.0, -0.1]]
    scheduler = PerflowScheduler(segment_boundaries=[999, 700, 300, 0], theta_init=theta, prediction_type="velocity")
    scheduler.save_pretrained(tmp_path / "scheduler")
    stored = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert stored["theta_init"] == theta
    loaded = PerflowScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert torch.equal(loaded.theta, scheduler.theta)
    assert loaded.segments == scheduler.segments and loaded.prediction_type == "velocity"
    assert torch.equal(sample_with(loaded), sample_with(scheduler))


def test_set_theta_is_saved(tmp_path):
    scheduler = PerflowScheduler()
    scheduler.set_theta([0.1, 0.2, 0.3, 0.4])
    scheduler.save_pretrained(tmp_path)
    assert PerflowScheduler.from_pretrained(tmp_path).theta[:, 0].tolist() == [0.1, 0.2, 0.3, 0.4]


def test_legacy_theta_file_beside_the_config_is_read(tmp_path):
    from safetensors.torch import save_file

    PerflowScheduler().save_pretrained(tmp_path)
    save_file({"perflow.theta": torch.tensor([0.1, 0.2, 0.3, 0.4])}, str(tmp_path / "scheduler_state.safetensors"))
    assert PerflowScheduler.from_pretrained(tmp_path).theta[:, 0].tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])


def test_state_dict_has_the_seed_layout():
    state = PerflowScheduler(theta_init=[0.1, 0, 0, 0]).state_dict()
    assert set(state) == {"perflow", "config"}
    assert {"theta", "segments", "segment_boundaries", "version"} <= set(state["perflow"])
    assert state["perflow"]["theta"].shape == (4, 3)


def test_load_state_dict_round_trips():
    source = PerflowScheduler(segment_boundaries=[1000, 600, 200, 0], theta_init=[0.1, 0.2, 0.3], prediction_type="velocity")
    target = PerflowScheduler()
    target.load_state_dict(source.state_dict())
    assert target.segments == source.segments
    assert torch.equal(target.theta, source.theta)
    assert torch.equal(sample_with(target, steps=6), sample_with(source, steps=6))


def test_load_state_dict_strict_refuses_unknown_keys():
    state = PerflowScheduler().state_dict()
    state["perflow"]["gamma"] = 1
    with pytest.raises(KeyError, match="perflow.gamma"):
        PerflowScheduler().load_state_dict(state)


def test_load_state_dict_not_strict_loads_what_matches_and_logs_the_rest(caplog):
    state = PerflowScheduler(theta_init=[0.5, 0, 0, 0]).state_dict()
    state["optimizer"] = {}
    state["config"]["unknown_option"] = 3
    target = PerflowScheduler()
    with caplog.at_level(logging.WARNING):
        target.load_state_dict(state, strict=False)
    assert target.theta[0, 0] == 0.5
    assert "'optimizer'" in caplog.text and "config.unknown_option" in caplog.text


def test_t_clean_must_lie_below_t_noise():
    with pytest.raises(ValueError, match="t_clean must be below t_noise"):
        PerflowScheduler(t_noise=0.5, t_clean=0.6)


def test_perflow_settings_keep_the_schedulers_format_version():
    assert PerflowScheduler(version="0.2").perflow_settings().version == "0.2"


def test_settings_take_their_segment_count_from_the_boundaries_alone():
    from perflow_core.settings import PerflowSettings

    assert PerflowSettings(segment_boundaries=[1000, 500, 0]).segments == 2
    assert PerflowSettings().segments == 4
