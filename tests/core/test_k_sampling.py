"""The ComfyUI-convention sampler (no ComfyUI needed): stand-ins mimic ComfyUI's model wrapper by class name."""

import math

import pytest
import torch

from perflow_core import PerflowScheduler
from perflow_core.k_sampling import ModelSpace, RunSchedule, perflow_sigmas, sample_perflow
from perflow_core.noise_schedule import alphas_cumprod_for
from perflow_core.settings import PerflowSettings
from support.comfy_like import ComfyLikeModel, DiscreteEps, DiscreteV, Flow, ModelSamplingContinuousEDM, network


def scheduler_loop(prediction_type, steps, noise, theta=None):
    scheduler = PerflowScheduler(prediction_type=prediction_type, theta_init=theta)
    scheduler.set_timesteps(steps)
    z = noise.clone()
    for t in scheduler.timesteps:
        z = scheduler.step(network(z, float(t)), t, z).prev_sample
    return z


@pytest.mark.parametrize("prediction_type", ["diff_eps", "ddim_eps", "velocity"])
@pytest.mark.parametrize("steps", [4, 6, 8])
@pytest.mark.parametrize("theta", [None, [[0.1, -0.05, 0.2], [0.0, 0.1, -0.1], [0.05, 0.0, 0.3], [-0.1, 0.02, 0.1]]])
def test_comfy_convention_matches_the_scheduler_on_an_eps_model(prediction_type, steps, theta):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = ComfyLikeModel(DiscreteEps())
    settings = PerflowSettings(prediction_type=prediction_type, theta=theta)
    sigmas = perflow_sigmas(model.space, settings, steps)
    x = noise * math.sqrt(1 + float(sigmas[0]) ** 2)  # KSAMPLER's full-denoise noise scaling
    ours = sample_perflow(model, x, sigmas, settings=settings, disable=True)
    expected = scheduler_loop(prediction_type, steps, noise, theta)
    assert ((ours - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize("settings", [PerflowSettings(segments=3), PerflowSettings(segments=3, t_clean=0.05), PerflowSettings(t_clean=0.05)])
def test_the_original_grids_whose_steps_end_on_truncated_boundaries_or_past_t_clean_are_sampled(settings):
    # K = 3 steps 1000 -> 666 -> 333 (boundaries 666.67, 333.33) and the last step goes to 0 past t_clean, as the original does.
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = ComfyLikeModel(DiscreteEps())
    sigmas = perflow_sigmas(model.space, settings, 6)
    ours = sample_perflow(model, noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, settings=settings, disable=True)
    scheduler = PerflowScheduler(**settings.to_config())
    scheduler.set_timesteps(6)
    expected = noise.clone()
    for t in scheduler.timesteps:
        expected = scheduler.step(network(expected, float(t)), t, expected).prev_sample
    assert ((ours - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_the_network_sees_the_original_timesteps():
    model = ComfyLikeModel(DiscreteEps())
    sigmas = perflow_sigmas(model.space, PerflowSettings(), 8)
    sample_perflow(model, torch.randn(1, 4, 8, 8), sigmas, disable=True)
    assert model.seen_timesteps == [1000, 875, 750, 625, 500, 375, 250, 125]


def test_v_prediction_models_give_the_same_raw_outputs():
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    model = ComfyLikeModel(DiscreteV())
    settings = PerflowSettings(prediction_type="velocity")
    sigmas = perflow_sigmas(model.space, settings, 8)
    ours = sample_perflow(model, noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, settings=settings, disable=True)
    expected = scheduler_loop("velocity", 8, noise)
    assert torch.allclose(ours, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_flow_models_step_in_sigma_with_velocity():
    model = ComfyLikeModel(Flow())
    settings = PerflowSettings(prediction_type="velocity")
    sigmas = perflow_sigmas(model.space, settings, 4)
    assert sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    expected = x.clone()
    for t, t_next in zip([1.0, 0.75, 0.5, 0.25], [0.75, 0.5, 0.25, 0.0]):
        expected = expected + (t_next - t) * network(expected, t * 1000)
    assert torch.allclose(sample_perflow(model, x, sigmas, settings=settings, disable=True), expected, atol=1e-5)


def test_callback_gets_every_step_with_a_denoised_estimate():
    model = ComfyLikeModel(DiscreteEps())
    sigmas = perflow_sigmas(model.space, PerflowSettings(), 4)
    calls = []
    sample_perflow(model, torch.randn(1, 4, 8, 8), sigmas, callback=calls.append, disable=True)
    assert [c["i"] for c in calls] == [0, 1, 2, 3]
    assert all(c["denoised"].shape == (1, 4, 8, 8) and torch.isfinite(c["denoised"]).all() for c in calls)


def test_the_callback_gets_the_sample_the_model_saw_at_that_step():
    model = ComfyLikeModel(DiscreteEps())
    sigmas = perflow_sigmas(model.space, PerflowSettings(), 4)
    inputs, calls = [], []

    def recording_model(x, sigma, **extra_args):
        inputs.append(x)
        return model(x, sigma, **extra_args)

    sample_perflow(recording_model, torch.randn(1, 4, 8, 8) * float(sigmas[0]), sigmas, callback=calls.append, disable=True, space=model.space)
    assert len(calls) == len(inputs) == 4
    assert all(call["x"] is seen and call["sigma"] == sigma for call, seen, sigma in zip(calls, inputs, sigmas))


def test_a_schedule_is_read_once_per_model_sigmas_settings_and_sigma_schedule(monkeypatch):
    builds = []
    build = RunSchedule._build.__func__
    monkeypatch.setattr(RunSchedule, "_build", classmethod(lambda cls, *args: builds.append(args) or build(cls, *args)))
    model = ComfyLikeModel(DiscreteEps())
    settings = PerflowSettings(theta=[[0.125, 0.0, 0.0]] * 4)
    sigmas = perflow_sigmas(model.space, settings, 6)
    other_model = ModelSpace("eps", model.space.sigmas.clone().index_fill_(0, torch.tensor([3]), 0.1), 1000)

    def builds_for(settings=settings, space=model.space, sigmas=sigmas):
        before = len(builds)
        sample_perflow(model, torch.ones(1, 4, 4, 4) * float(sigmas[0]), sigmas, disable=True, settings=settings, space=space)
        return len(builds) - before

    builds_for()
    assert builds_for() == 0  # the same run again
    assert builds_for(settings=settings.replace(theta=[[0.25, 0.0, 0.0]] * 4)) == 1
    assert builds_for(space=other_model) == 1
    assert builds_for(sigmas=perflow_sigmas(model.space, settings, 8)) == 1


def test_denoise_below_one_keeps_the_end_of_a_finer_grid():
    space = ModelSpace.of(DiscreteEps())
    sigmas = perflow_sigmas(space, PerflowSettings(), 4, denoise=0.5)
    assert [space.timestep_of(float(s)) for s in sigmas] == [500, 375, 250, 125, 0]


@pytest.mark.parametrize("img2img_start", ["original", "straight_path"])
def test_img2img_start_inside_a_segment_matches_the_scheduler_add_noise(img2img_start):
    settings = PerflowSettings(img2img_start=img2img_start)
    model = ComfyLikeModel(DiscreteEps())
    sigmas = perflow_sigmas(model.space, settings, 3, denoise=0.5)  # starts at 625, inside [750, 500]
    model.latent_image, model.noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 0.5)
    x = model.latent_image + float(sigmas[0]) * model.noise  # KSAMPLER's img2img noise scaling
    sample_perflow(model, x, sigmas, disable=True, settings=settings)
    expected = PerflowScheduler(img2img_start=img2img_start).add_noise(model.latent_image, model.noise, torch.tensor([625]))
    assert model.seen_timesteps[0] == 625
    assert torch.allclose(model.seen_inputs[0], expected, atol=1e-6)


def test_fewer_steps_than_segments_are_raised_to_one_per_segment_with_a_warning(caplog):
    sigmas = perflow_sigmas(ModelSpace.of(DiscreteEps()), PerflowSettings(), 3)
    assert len(sigmas) == 4 + 1
    assert "steps=3 is below the number of segments K=4" in caplog.text


@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_a_step_count_that_is_no_whole_number_is_refused_naming_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        perflow_sigmas(ModelSpace.of(DiscreteEps()), PerflowSettings(), steps)


def test_a_model_family_that_cannot_work_is_refused():
    with pytest.raises(ValueError, match="ModelSamplingContinuousEDM"):
        ModelSpace.of(ModelSamplingContinuousEDM())


def test_sigmas_that_do_not_decrease_are_refused():
    model = ComfyLikeModel(DiscreteEps())
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_perflow(model, torch.zeros(1, 4, 2, 2), torch.tensor([1.0, 1.0, 0.0]), disable=True)


def test_a_sigma_between_training_sigmas_is_refused_naming_sigmas():
    model = ComfyLikeModel(DiscreteEps())
    between = math.sqrt(model.space.sigma_of(700) * model.space.sigma_of(701))
    sigmas = torch.tensor([model.space.sigma_of(1000), between, 0.0])
    with pytest.raises(ValueError, match=r"^sigmas: .* is not one of the model's training sigmas \(the nearest is .*, timestep 70[01]\)"):
        sample_perflow(model, torch.zeros(1, 4, 2, 2), sigmas, settings=PerflowSettings(segments=1), disable=True)


def test_training_sigmas_rounded_to_half_precision_are_still_on_the_grid():
    model = ComfyLikeModel(DiscreteEps())
    sigmas = perflow_sigmas(model.space, PerflowSettings(), 4).half().float()
    assert [model.space.timestep_of(float(s)) for s in sigmas] == [1000.0, 750.0, 500.0, 250.0, 0.0]


def test_a_schedule_whose_steps_cross_segment_boundaries_is_refused_naming_sigmas():
    model = ComfyLikeModel(DiscreteEps())
    karras_like = torch.tensor([float(model.space.sigma_of(t)) for t in (1000, 812, 640, 300)] + [0.0])
    with pytest.raises(ValueError, match=r"^sigmas: the step from timestep 812 to 640 crosses the segment boundary 750"):
        sample_perflow(model, torch.zeros(1, 4, 2, 2), karras_like, disable=True)
