"""theta: its forms (vector, matrix, typed text), the step being linear in it, and its fallbacks."""

import math

import pytest
import torch

from perflow_core import PerflowScheduler, Segments, as_theta, parse_theta_text, perflow_step
from perflow_core.noise_schedule import alphas_cumprod_for
from perflow_core.solver import theta_features


def test_a_vector_is_the_gain_column():
    theta = as_theta([0.1, 0.2], 2)
    assert theta.tolist() == [[0.1, 0.0, 0.0], [0.2, 0.0, 0.0]]


def test_missing_columns_are_zero():
    assert as_theta([[0.1, 0.2], [0.3, 0.4]], 2)[:, 2].tolist() == [0.0, 0.0]


def test_none_is_zero():
    assert not as_theta(None, 3).any()


@pytest.mark.parametrize(
    "value, fragment",
    [
        ([0.1, 0.2, 0.3], "shape [3, 1]"),
        ([[0.0] * 4] * 2, "shape [2, 4]"),
        ([0.1, float("nan")], "NaN or Inf"),
        ([0.1, float("inf")], "NaN or Inf"),
        ("abc", "numbers"),
    ],
)
def test_bad_theta_is_refused_naming_theta(value, fragment):
    with pytest.raises(ValueError, match="theta") as error:
        as_theta(value, 2)
    assert fragment in str(error.value)


def test_theta_text_rows_and_columns():
    assert parse_theta_text("0.1, 0, 0.2; 0 0 0.5", 2).tolist() == [[0.1, 0.0, 0.2], [0.0, 0.0, 0.5]]


def test_theta_text_single_row_of_k_numbers_is_the_gain_column():
    assert parse_theta_text("0.1, 0.2, 0.3, 0.4", 4)[:, 0].tolist() == [0.1, 0.2, 0.3, 0.4]


def test_empty_theta_text_is_zero():
    assert not parse_theta_text("  ", 4).any()


def test_theta_text_that_is_not_numbers_is_refused():
    with pytest.raises(ValueError, match="theta text"):
        parse_theta_text("0.1, x", 2)


def _window():
    return Segments.uniform(4).step_at(750, 500, alphas_cumprod_for())


@pytest.mark.parametrize("prediction_type", ["ddim_eps", "diff_eps", "velocity"])
def test_step_is_linear_in_theta(prediction_type):
    torch.manual_seed(0)
    sample, output, previous = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    window = _window()
    base = perflow_step(prediction_type, output, sample, window).prev_sample
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64)
    stepped = perflow_step(prediction_type, output, sample, window, theta, previous)
    features = theta_features(prediction_type, sample, stepped.velocity, stepped.window_end, previous, window)
    expected = base + sum(theta[j] * features[j] for j in range(3))
    assert torch.allclose(stepped.prev_sample, expected, atol=1e-12)


def test_gain_column_scales_the_step():
    sample, output = torch.ones(1, 4), torch.full((1, 4), 0.5)
    window = _window()
    base = perflow_step("velocity", output, sample, window).prev_sample
    gained = perflow_step("velocity", output, sample, window, torch.tensor([1.0, 0.0, 0.0])).prev_sample
    assert torch.allclose(gained - sample, 2 * (base - sample))


def test_output_change_column_does_nothing_at_the_first_step():
    sample, output = torch.ones(1, 4), torch.full((1, 4), 0.5)
    window = _window()
    base = perflow_step("velocity", output, sample, window).prev_sample
    corrected = perflow_step("velocity", output, sample, window, torch.tensor([0.0, 0.0, 0.7])).prev_sample
    assert torch.equal(corrected, base)


def test_output_change_column_weights_the_change_in_the_model_output():
    sample, output, previous = torch.ones(1, 4), torch.full((1, 4), 0.5), torch.full((1, 4), 0.2)
    window = _window()
    base = perflow_step("velocity", output, sample, window).prev_sample
    corrected = perflow_step("velocity", output, sample, window, torch.tensor([0.0, 0.0, 0.5]), previous).prev_sample
    dt = window.t_next - window.t
    assert torch.allclose(corrected - base, 0.5 * dt * (output - previous))


def test_non_finite_correction_falls_back_to_the_plain_step_with_a_warning(caplog):
    sample = torch.ones(1, 4)
    output = torch.full((1, 4), 0.5)
    previous = torch.full((1, 4), -3.0e38)
    window = _window()
    base = perflow_step("velocity", output, sample, window).prev_sample
    with caplog.at_level("WARNING"):
        stepped = perflow_step("velocity", output, sample, window, torch.tensor([0.0, 0.0, 1.0e3]), previous, step_index=1, timestep=750)
    assert torch.equal(stepped.prev_sample, base)
    assert "theta correction gave NaN/Inf at step 1" in caplog.text


def test_non_finite_model_output_names_the_step_and_timestep():
    output = torch.tensor([[0.0, math.nan]])
    with pytest.raises(FloatingPointError, match="step 2 \\(timestep 500"):
        perflow_step("velocity", output, torch.zeros(1, 2), _window(), step_index=2, timestep=500)


def test_theta_changes_a_scheduler_run_and_zero_theta_does_not():
    def run(theta):
        scheduler = PerflowScheduler(prediction_type="diff_eps", theta_init=theta)
        scheduler.set_timesteps(8)
        x = torch.ones(1, 4, 2, 2)
        for t in scheduler.timesteps:
            x = scheduler.step(0.5 * x + 0.1, t, x).prev_sample
        return x

    assert torch.equal(run(None), run([[0.0, 0.0, 0.0]] * 4))
    assert not torch.allclose(run(None), run([[0.1, 0.05, 0.2]] * 4))


def test_learn_theta_makes_the_samples_differentiable_in_theta():
    scheduler = PerflowScheduler(prediction_type="ddim_eps", learn_theta=True)
    scheduler.set_timesteps(4)
    x = torch.ones(1, 4, 2, 2, dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(0.5 * x + 0.1, t, x).prev_sample
    x.sum().backward()
    assert scheduler.theta.grad is not None and scheduler.theta.grad.abs().sum() > 0


def test_theta_rows_for_a_run_are_none_where_zero_and_exact():
    from perflow_core.theta import theta_rows_like

    theta = torch.tensor([[0.0, 0.0, 0.0], [0.5, -0.25, 1e-9]], dtype=torch.float64)
    rows = theta_rows_like(theta, torch.zeros(2, dtype=torch.float16))
    assert rows[0] is None
    assert rows[1] == [0.5, -0.25, 1e-9]  # the float64 values as Python numbers


def test_theta_rows_of_a_learning_theta_keep_its_gradient():
    from perflow_core.theta import theta_rows_like

    theta = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    rows = theta_rows_like(theta, torch.zeros(2, dtype=torch.float32))
    sum(row.sum() for row in rows).backward()
    assert theta.grad is not None and theta.grad.shape == (2, 3)
