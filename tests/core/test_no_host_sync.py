"""No host synchronisation inside a sampling loop: nothing in the loop's own code converts a tensor to Python
(on an accelerator that waits for the device). Checks that need the device's answer run after the loop."""

import math

import pytest
import torch

from perflow_core import PerflowScheduler, PerflowSettings, SamplingPlan, run_plan
from perflow_core.k_sampling import perflow_sigmas, sample_perflow
from perflow_core.noise_schedule import alphas_cumprod_for
from support.comfy_like import ComfyLikeModel, DiscreteEps, network
from support.host_sync import host_sync_guard

THETA = [[0.1, 0.05, 0.2], [0.1, 0.0, 0.1], [0.0, 0.02, 0.0], [0.05, 0.0, 0.0]]


@pytest.mark.parametrize("theta", [None, THETA], ids=["theta=0", "theta"])
def test_the_comfyui_sampler_loop_converts_nothing(theta):
    settings = PerflowSettings(theta=theta, prediction_type="diff_eps")
    model = ComfyLikeModel(DiscreteEps())
    sigmas = perflow_sigmas(model.space, settings, 8)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * float(sigmas[0])
    with host_sync_guard() as guard:
        last = len(sigmas) - 2

        def callback(info):  # ComfyUI's: it may convert; the loop ends with the last step's callback
            guard.armed = info["i"] != last

        def unguarded_callback(info):
            guard.armed = False
            callback(info)

        for _ in range(2):  # the second run samples from the kept schedule (its coefficients computed once)
            sample_perflow(guard.model(model), x, sigmas, callback=unguarded_callback, disable=True, settings=settings, space=model.space)


@pytest.mark.parametrize("theta", [None, THETA], ids=["theta=0", "theta"])
def test_the_calibration_loop_converts_nothing(theta):
    plan = SamplingPlan.for_steps(PerflowSettings(theta=theta, prediction_type="ddim_eps"), 8, alphas_cumprod_for())
    with host_sync_guard() as guard:
        run_plan(guard.model(network), plan, torch.randn(2, 4, 4, 4), on_step=lambda record: setattr(guard, "armed", record.index != len(plan) - 1))


@pytest.mark.parametrize("theta", [None, THETA], ids=["theta=0", "theta"])
def test_the_diffusers_scheduler_step_converts_nothing(theta):
    scheduler = PerflowScheduler(prediction_type="diff_eps", theta_init=theta)
    scheduler.set_timesteps(8)
    timesteps = [int(t) for t in scheduler.timesteps]  # as an accelerator's pipeline would: the step never reads them
    z = torch.randn(1, 4, 8, 8)
    with host_sync_guard() as guard:
        for i, t in enumerate(timesteps):
            guard.armed = i < len(timesteps) - 1  # the last step reads the loop's checks, after the loop
            z = scheduler.step(network(z, float(t)), t, z).prev_sample
            guard.armed = False


def test_a_non_finite_model_output_is_reported_after_the_loop_naming_its_first_step():
    plan = SamplingPlan.for_steps(PerflowSettings(prediction_type="velocity"), 8, alphas_cumprod_for())
    calls = []

    def broken(z, timestep):
        calls.append(timestep)
        return torch.full_like(z, math.nan) if len(calls) >= 3 else network(z, timestep)

    with pytest.raises(FloatingPointError, match=r"step 2 \(timestep 750"):
        run_plan(broken, plan, torch.randn(1, 4, 4, 4))
    assert len(calls) == 8


def test_an_overflowing_theta_falls_back_to_the_plain_step_and_warns_once_after_the_loop(caplog):
    settings = PerflowSettings(theta=[[0, 0, 1e3]] * 4, prediction_type="velocity")
    plan = SamplingPlan.for_steps(settings, 8, alphas_cumprod_for())
    plain = SamplingPlan.for_steps(settings.replace(theta=None), 8, alphas_cumprod_for())
    huge = iter([torch.full((1, 4), 3e38 * (-1) ** i) for i in range(8)])
    outputs = [next(huge) for _ in range(8)]
    z, _ = run_plan(lambda z, t: outputs[plan.timesteps.index(t)], plan, torch.zeros(1, 4))
    expected, _ = run_plan(lambda z, t: outputs[plain.timesteps.index(t)], plain, torch.zeros(1, 4))
    assert torch.equal(z, expected)
    assert caplog.text.count("theta correction gave NaN/Inf") == 1


def test_the_calibration_progress_hook_converts_nothing():
    from perflow_core.calibration import CountedModel

    plan = SamplingPlan.for_steps(PerflowSettings(theta=THETA, prediction_type="ddim_eps"), 8, alphas_cumprod_for())
    seen = []
    with host_sync_guard() as guard:
        counted = CountedModel(guard.model(network), 8, lambda done, planned: seen.append(done))
        run_plan(counted, plan, torch.randn(2, 4, 4, 4), on_step=lambda record: setattr(guard, "armed", record.index != len(plan) - 1))
    assert seen == list(range(8))
