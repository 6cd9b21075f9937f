"""Spec of the embedded analytic model: the smoothed digits mixture, its exact denoiser and its exact ODE solution."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from perflow_core.lab.analytic import (
    DEFAULT_SMOOTHING,
    AnalyticDigitsDenoiser,
    default_ode_steps,
    load_digits,
    noise_for_seeds,
    solve_probability_flow_ode,
)
from perflow_core.noise_schedule import alpha_at_timestep, alphas_cumprod_for

ODE_BATCH = 8


@pytest.fixture(scope="module")
def model() -> AnalyticDigitsDenoiser:
    return AnalyticDigitsDenoiser()


@pytest.fixture(scope="module")
def sd15_alpha_range(model):
    """Signal levels of the first and last SD 1.5 model timesteps, 1000 and 1."""
    return alpha_at_timestep(model.alphas_cumprod, 1000), alpha_at_timestep(model.alphas_cumprod, 1)


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).pow(2).mean().sqrt().item()


def three_component_model() -> AnalyticDigitsDenoiser:
    tiny = AnalyticDigitsDenoiser(smoothing=0.3)
    tiny.digit_pixels = tiny.digit_pixels[:3].clone()
    return tiny


def brute_force_eps(means: np.ndarray, smoothing: float, x: np.ndarray, alpha: float) -> np.ndarray:
    """E[eps | x_t = x] for an equal-weight mixture of N(mu_i, s^2 I), one component at a time."""
    variance = alpha * smoothing**2 + 1.0 - alpha
    log_likelihoods, x0_means = [], []
    for mu in means:
        residual = x - math.sqrt(alpha) * mu
        log_likelihoods.append(-0.5 * residual @ residual / variance - 0.5 * x.size * math.log(2 * math.pi * variance))
        x0_means.append(mu + smoothing**2 * math.sqrt(alpha) / variance * residual)
    log_likelihoods = np.array(log_likelihoods)
    weights = np.exp(log_likelihoods - log_likelihoods.max())
    weights /= weights.sum()
    x0_mean = sum(w * m for w, m in zip(weights, x0_means))
    return (x - math.sqrt(alpha) * x0_mean) / math.sqrt(1.0 - alpha)


# --- embedded data -----------------------------------------------------------------------------------------------


def test_digits_npz_holds_1797_uint8_images_of_8x8_pixels_in_0_to_16():
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 16
    assert labels.shape == (1797,) and set(np.unique(labels)) == set(range(10))


def test_data_means_are_the_digits_scaled_to_minus_one_one(model):
    images, _ = load_digits()
    expected = torch.from_numpy(images).double().unsqueeze(1) / 8.0 - 1.0
    assert torch.equal(model.data_means, expected)


# --- noise schedule ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule", [("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 0.0001, 0.02)]
)
def test_alphas_cumprod_equals_ddpm_scheduler_exactly(schedule):
    beta_schedule, beta_start, beta_end = schedule
    reference = DDPMScheduler(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end).alphas_cumprod
    ours = alphas_cumprod_for(beta_schedule, beta_start, beta_end)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, reference)


def test_alphas_cumprod_from_trained_betas_equals_ddpm_scheduler_exactly():
    betas = np.linspace(1e-4, 0.03, 50)
    reference = DDPMScheduler(num_train_timesteps=50, trained_betas=betas).alphas_cumprod
    assert torch.equal(alphas_cumprod_for(num_train_timesteps=50, trained_betas=betas), reference)


def test_unknown_beta_schedule_raises_value_error_listing_accepted_values():
    with pytest.raises(ValueError, match="beta_schedule.*scaled_linear"):
        alphas_cumprod_for("cosine")


def test_trained_betas_of_wrong_length_raises_value_error_naming_num_train_timesteps():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        alphas_cumprod_for(num_train_timesteps=1000, trained_betas=[0.01] * 999)


def test_timestep_t_reads_the_last_alphas_cumprod(model):
    assert alpha_at_timestep(model.alphas_cumprod, 1000) == model.alphas_cumprod[999].item()


def test_timesteps_one_and_zero_read_the_first_alphas_cumprod(model):
    first = model.alphas_cumprod[0].item()
    assert alpha_at_timestep(model.alphas_cumprod, 1) == first
    assert alpha_at_timestep(model.alphas_cumprod, 0) == first


def test_fractional_timestep_interpolates_linearly_at_index_timestep_minus_one(model):
    table = model.alphas_cumprod.double()
    expected = 0.75 * table[499] + 0.25 * table[500]
    assert alpha_at_timestep(model.alphas_cumprod, 500.25) == pytest.approx(expected.item(), rel=1e-15)


def test_timesteps_outside_zero_to_t_are_clamped(model):
    table = model.alphas_cumprod
    assert alpha_at_timestep(table, -5.0) == table[0].item()
    assert alpha_at_timestep(table, 1500.0) == table[999].item()


def test_tensor_timesteps_give_a_float64_tensor_of_the_same_shape(model):
    timesteps = torch.tensor([1000, 500.5, 1])
    alphas = alpha_at_timestep(model.alphas_cumprod, timesteps)
    assert alphas.dtype == torch.float64 and alphas.shape == (3,)
    expected = [alpha_at_timestep(model.alphas_cumprod, float(t)) for t in timesteps]
    assert alphas.tolist() == expected


# --- exact denoiser ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.002, 0.3, 0.97, 0.9995])
def test_eps_prediction_equals_brute_force_posterior_mean_of_a_three_component_mixture(alpha):
    tiny = three_component_model()
    means = tiny.data_means.reshape(3, -1).numpy()
    noise = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    samples = math.sqrt(alpha) * tiny.data_means[[0, 2]] + math.sqrt(1 - alpha) * noise
    expected = np.stack([brute_force_eps(means, 0.3, s.reshape(-1).numpy(), alpha) for s in samples])
    ours = tiny.eps_prediction(samples, alpha).reshape(2, -1).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-12)


def test_eps_prediction_is_minus_sqrt_one_minus_alpha_times_the_score_of_the_noisy_marginal(model):
    alpha = 0.4
    x = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x.requires_grad_(True)
    means = model.data_means.reshape(model.num_components, -1)
    variance = alpha * DEFAULT_SMOOTHING**2 + 1 - alpha
    squared_distances = torch.cdist(x.reshape(3, -1), math.sqrt(alpha) * means).pow(2)
    log_density = torch.logsumexp(-0.5 * squared_distances / variance, dim=1).sum()
    (score,) = torch.autograd.grad(log_density, x)
    torch.testing.assert_close(model.eps_prediction(x.detach(), alpha), -math.sqrt(1 - alpha) * score)


def test_eps_prediction_accepts_one_noise_level_per_sample(model):
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    together = model.eps_prediction(x, torch.tensor([0.1, 0.8], dtype=torch.float64))
    torch.testing.assert_close(together[0], model.eps_prediction(x[:1], 0.1)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(together[1], model.eps_prediction(x[1:], 0.8)[0], rtol=1e-12, atol=1e-12)


def test_x0_prediction_is_consistent_with_eps_prediction(model):
    alpha = 0.6
    x = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reconstruction = math.sqrt(alpha) * model.x0_prediction(x, alpha) + math.sqrt(1 - alpha) * model.eps_prediction(
        x, alpha
    )
    torch.testing.assert_close(reconstruction, x, rtol=1e-12, atol=1e-12)


def test_x0_prediction_at_tiny_noise_and_smoothing_is_the_nearest_data_mean():
    sharp = AnalyticDigitsDenoiser(smoothing=1e-4)
    alpha = 1 - 1e-4
    noise = torch.randn((5, 1, 8, 8), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    noisy = math.sqrt(alpha) * sharp.data_means[[0, 400, 800, 1200, 1600]] + math.sqrt(1 - alpha) * noise
    scaled_means = math.sqrt(alpha) * sharp.data_means.reshape(sharp.num_components, -1)
    nearest = torch.cdist(noisy.reshape(5, -1), scaled_means).argmin(dim=1)
    torch.testing.assert_close(sharp.x0_prediction(noisy, alpha), sharp.data_means[nearest], rtol=0, atol=1e-5)


def test_forward_returns_eps_prediction_at_the_timesteps_noise_level_in_the_input_dtype(model):
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    timesteps = torch.tensor([999.5, 20.0])
    output = model(x, timesteps).sample
    assert output.dtype == torch.float32 and output.shape == x.shape
    expected = model.eps_prediction(x, alpha_at_timestep(model.alphas_cumprod, timesteps)).float()
    torch.testing.assert_close(output, expected)


def test_forward_accepts_a_number_a_0d_tensor_or_a_1d_tensor_as_timestep(model):
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(6))
    from_number = model(x, 250).sample
    torch.testing.assert_close(model(x, torch.tensor(250)).sample, from_number, rtol=0, atol=0)
    torch.testing.assert_close(model(x, torch.tensor([250, 250])).sample, from_number, rtol=0, atol=0)


def test_forward_without_return_dict_returns_a_tuple(model):
    x = torch.zeros((1, 1, 8, 8))
    (eps,) = model(x, 500, return_dict=False)
    torch.testing.assert_close(eps, model(x, 500).sample, rtol=0, atol=0)


@pytest.mark.parametrize("smoothing", [0.0, -0.05, float("nan"), float("inf")])
def test_invalid_smoothing_raises_value_error_naming_smoothing(smoothing):
    with pytest.raises(ValueError, match="smoothing"):
        AnalyticDigitsDenoiser(smoothing=smoothing)


# --- diffusers integration ---------------------------------------------------------------------------------------


def test_model_registers_as_a_pipeline_component_and_moves_to_cpu(model):
    class MinimalPipeline(DiffusionPipeline):
        def __init__(self, unet: AnalyticDigitsDenoiser):
            super().__init__()
            self.register_modules(unet=unet)

    pipeline = MinimalPipeline(unet=model).to("cpu")
    assert pipeline.unet is model
    assert pipeline.device == torch.device("cpu") and model.dtype == torch.float32


def test_save_pretrained_stores_only_the_config_and_from_pretrained_restores_the_model(tmp_path):
    original = AnalyticDigitsDenoiser(smoothing=0.2)
    assert "digit_pixels" not in original.state_dict()
    original.save_pretrained(tmp_path)
    restored = AnalyticDigitsDenoiser.from_pretrained(tmp_path)
    assert restored.config.smoothing == 0.2
    assert torch.equal(restored.digit_pixels, original.digit_pixels)


# --- exact ODE solution ------------------------------------------------------------------------------------------


def test_noise_for_seeds_draws_each_sample_from_its_own_seeded_generator():
    noise = noise_for_seeds([11, 3])
    assert noise.shape == (2, 1, 8, 8) and noise.dtype == torch.float32
    assert torch.equal(noise[1], torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(3)))
    assert torch.equal(noise_for_seeds([3])[0], noise[1])


def test_ode_solution_at_default_steps_changes_by_less_than_1e_6_when_steps_double(model, sd15_alpha_range):
    alpha_start, alpha_end = sd15_alpha_range
    noise = noise_for_seeds(range(ODE_BATCH))
    default = solve_probability_flow_ode(model, noise, alpha_start, alpha_end)
    doubled = solve_probability_flow_ode(
        model, noise, alpha_start, alpha_end, steps=2 * default_ode_steps(alpha_start, alpha_end)
    )
    assert default.dtype == torch.float64
    assert rmse(default, doubled) < 1e-6


def test_ode_solution_is_the_same_when_solved_in_two_halves(model, sd15_alpha_range):
    alpha_start, alpha_end = sd15_alpha_range
    noise = noise_for_seeds(range(ODE_BATCH))
    whole = solve_probability_flow_ode(model, noise, alpha_start, alpha_end)
    halfway = solve_probability_flow_ode(model, noise, alpha_start, 0.5)
    assert rmse(solve_probability_flow_ode(model, halfway, 0.5, alpha_end), whole) < 1e-6


def test_ode_solution_to_alpha_one_continues_the_solution_past_the_last_timestep(model, sd15_alpha_range):
    alpha_start, alpha_end = sd15_alpha_range
    noise = noise_for_seeds(range(ODE_BATCH))
    direct = solve_probability_flow_ode(model, noise, alpha_start, 1.0)
    via_last_timestep = solve_probability_flow_ode(model, noise, alpha_start, alpha_end)
    assert rmse(solve_probability_flow_ode(model, via_last_timestep, alpha_end, 1.0), direct) < 1e-6


def test_ode_solution_run_backwards_returns_to_the_start(model):
    x = noise_for_seeds(range(ODE_BATCH)) * math.sqrt(1 - 0.3)
    there = solve_probability_flow_ode(model, x, 0.3, 0.9)
    assert rmse(solve_probability_flow_ode(model, there, 0.9, 0.3), x.double()) < 1e-6
