"""A loop in another frame (`solver.Frame`: state ``scale * z``, model return ``y`` with ``o = state_weight * state +
y_weight * y``) takes the same steps as PeRFlow's own loop, with the conversions folded into the coefficients."""

import pytest
import torch

from perflow_core.k_sampling import ModelSpace
from perflow_core.noise_schedule import alphas_cumprod_for
from perflow_core.sampling import SamplingPlan
from perflow_core.settings import PerflowSettings
from perflow_core.solver import PERFLOW_FRAME, Frame, StepResult, apply_step
from support.comfy_like import DiscreteEps

THETA = [[0.1, -0.05, 0.2], [0.0, 0.1, -0.1], [0.05, 0.0, 0.3], [-0.1, 0.02, 0.1]]
FRAMES = (Frame(14.6, 1 / 14.6, -1 / 14.6), Frame(4.2, 0.3, -1.7), Frame(1.9, 2.0, -0.5), Frame(1.3, 5.0, -5.0), Frame())


def plan(prediction_type, theta=None):
    return SamplingPlan.for_steps(PerflowSettings(prediction_type=prediction_type, theta=theta), 4, alphas_cumprod_for())


def tensor(seed):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def in_frame(z, frame):
    return z * frame.scale


def output_in_frame(o, z, frame):
    """The model return ``y`` that gives raw output ``o`` at ``z`` in ``frame``."""
    return (o - frame.state_weight * in_frame(z, frame)) / frame.y_weight


@pytest.mark.parametrize("prediction_type", ["diff_eps", "ddim_eps", "velocity"])
@pytest.mark.parametrize("theta", [None, THETA], ids=["theta=0", "theta"])
def test_every_step_in_a_frame_is_the_perflow_step_scaled_into_the_next_frame(prediction_type, theta):
    steps = plan(prediction_type, theta)
    own, framed = steps.coefficients(tensor(0)), steps.coefficients(tensor(0), frames=FRAMES)
    z, previous_z, previous_o = tensor(1), None, None
    for i in range(len(steps)):
        o = tensor(10 + i)
        k, k_framed = own[i][previous_o is not None], framed[i][previous_o is not None]
        expected, _ = apply_step(k, o, z, previous_o)
        previous_y = None if previous_o is None else output_in_frame(previous_o, previous_z, FRAMES[i - 1])
        previous_state = None if previous_z is None else in_frame(previous_z, FRAMES[i - 1])
        result, _ = apply_step(k_framed, output_in_frame(o, z, FRAMES[i]), in_frame(z, FRAMES[i]), previous_y, previous_state)
        torch.testing.assert_close(result, in_frame(expected, FRAMES[i + 1]), rtol=1e-12, atol=1e-12)
        previous_z, previous_o, z = z, o, expected


@pytest.mark.parametrize("quantity", ["velocity", "window_end", "pred_original_sample"])
def test_what_a_step_reports_in_a_frame_is_the_same_perflow_quantity(quantity):
    steps = plan("diff_eps", THETA)
    own, framed = steps.coefficients(tensor(0))[1][1], steps.coefficients(tensor(0), frames=FRAMES)[1][1]
    z, o = tensor(2), tensor(3)
    expected = getattr(StepResult(z, z, o, own), quantity)
    state, y = in_frame(z, FRAMES[1]), output_in_frame(o, z, FRAMES[1])
    torch.testing.assert_close(getattr(StepResult(state, state, y, framed), quantity), expected, rtol=1e-12, atol=1e-12)


def test_the_overflow_fallback_in_a_frame_is_the_plain_step_scaled_into_the_next_frame():
    steps = plan("velocity", [[0, 0, 1e3]] * 4)
    own, framed = steps.coefficients(tensor(0))[0][0], steps.coefficients(tensor(0), frames=FRAMES)[0][0]
    z, o = tensor(4), tensor(5)
    expected = own.original_step(z, o)
    torch.testing.assert_close(framed.original_step(in_frame(z, FRAMES[0]), output_in_frame(o, z, FRAMES[0])), in_frame(expected, FRAMES[1]))


def test_perflows_own_frame_keeps_the_coefficients_as_they_are():
    steps = plan("diff_eps", THETA)
    own = steps.coefficients(tensor(0))
    framed = steps.coefficients(tensor(0), frames=(PERFLOW_FRAME,) * (len(steps) + 1))
    assert all(a is b for pair, same in zip(own, framed) for a, b in zip(pair, same))


def test_a_plans_coefficients_in_a_frame_are_computed_once():
    steps = plan("ddim_eps", THETA)
    assert steps.coefficients(tensor(0), frames=FRAMES) is steps.coefficients(tensor(1), frames=FRAMES)


def test_a_theta_that_learns_is_refused_in_another_frame():
    steps = plan("ddim_eps")
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="learns"):
        steps.coefficients(tensor(0), theta, FRAMES)


def test_comfyuis_raw_output_at_a_small_sigma_keeps_the_exact_difference_of_x_and_x0():
    space = ModelSpace.of(DiscreteEps())
    sigma = float(space.sigmas[9])  # timestep 10, sigma about 0.04: x and the denoised x0 nearly cancel
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    denoised = x - sigma * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    expected = (x.double() - denoised.double()) / sigma
    got = space.frame(sigma).raw_output(x, denoised)
    assert ((got.double() - expected).abs().max() / expected.abs().max()).item() < 2e-7
