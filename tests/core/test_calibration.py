"""Calibrating theta: per-segment least squares along the sampler's own states, against a teacher."""

import pytest
import torch

from perflow_core.lab.analytic import AnalyticDigitsDenoiser, noise_for_seeds
from perflow_core.calibration import calibrate_theta, fit_theta, perflow_teacher, run_student
from perflow_core.sampling import SamplingPlan
from perflow_core.noise_schedule import alphas_cumprod_for
from perflow_core.settings import PerflowSettings

ALPHAS = alphas_cumprod_for()


@pytest.fixture(scope="module")
def model_fn():
    model = AnalyticDigitsDenoiser(smoothing=0.2)
    return lambda z, timestep: model(z, float(timestep)).sample


def test_teacher_passes_through_every_student_timestep(model_fn):
    plan = SamplingPlan.for_steps(PerflowSettings(prediction_type="ddim_eps"), 6, ALPHAS)
    teacher = perflow_teacher(model_fn, plan, multiplier=4)
    assert teacher.calls_per_sample == 24
    targets = teacher(noise_for_seeds(range(2)).double())
    assert len(targets) == 6 and targets[0].shape == (2, 1, 8, 8)


def test_a_teacher_with_one_step_per_student_step_is_the_student(model_fn):
    plan = SamplingPlan.for_steps(PerflowSettings(prediction_type="ddim_eps"), 4, ALPHAS)
    noise = noise_for_seeds(range(3)).double()
    assert torch.allclose(perflow_teacher(model_fn, plan, multiplier=1)(noise)[-1], run_student(model_fn, plan, noise)[-1])


def test_fitting_the_student_to_itself_gives_zero_theta(model_fn):
    plan = SamplingPlan.for_steps(PerflowSettings(prediction_type="ddim_eps"), 4, ALPHAS)
    noise = noise_for_seeds(range(8)).double()
    theta = fit_theta(model_fn, plan, noise, run_student(model_fn, plan, noise))
    assert theta.abs().max() < 1e-6


@pytest.mark.parametrize("steps", [4, 6])
def test_calibration_improves_the_held_out_error_on_the_analytic_model(model_fn, steps):
    report = calibrate_theta(
        model_fn,
        PerflowSettings(prediction_type="ddim_eps"),
        steps,
        ALPHAS,
        fit_noise=noise_for_seeds(range(64)).double(),
        holdout_noise=noise_for_seeds(range(1000, 1064)).double(),
        teacher_multiplier=8,
    )
    assert report.error_after < 0.8 * report.error_before
    assert report.theta.shape == (4, 3) and torch.isfinite(report.theta).all()
    assert "held-out RMSE to the teacher" in report.summary()


def test_calibration_is_deterministic(model_fn):
    def fit():
        return calibrate_theta(
            model_fn, PerflowSettings(prediction_type="ddim_eps"), 4, ALPHAS, noise_for_seeds(range(16)).double(), noise_for_seeds(range(100, 108)).double()
        ).theta

    assert torch.equal(fit(), fit())


def test_scheduler_calibrate_keeps_theta_and_saves_it(model_fn, tmp_path):
    from perflow_core import PerflowScheduler

    scheduler = PerflowScheduler(prediction_type="ddim_eps", learn_theta=True)
    report = scheduler.calibrate(model_fn, noise_for_seeds(range(32)).double(), noise_for_seeds(range(500, 516)).double())
    assert torch.allclose(scheduler.theta.detach(), report.theta)
    scheduler.save_pretrained(tmp_path)
    assert torch.allclose(PerflowScheduler.from_pretrained(tmp_path).theta, report.theta)


def test_diffusers_model_fn_combines_guidance_by_hand():
    from perflow_core.calibration import diffusers_model_fn
    from support.tiny_diffusers import tiny_sd_unet

    torch.manual_seed(0)
    unet = tiny_sd_unet(sample_size=8)
    cond, uncond, z = torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8, 8)
    guided = diffusers_model_fn(unet, cond, uncond, guidance_scale=3.0)(z, 750)
    with torch.no_grad():
        c = unet(z, torch.tensor([750.0]), encoder_hidden_states=cond).sample
        u = unet(z, torch.tensor([750.0]), encoder_hidden_states=uncond).sample
    assert torch.allclose(guided, u + 3.0 * (c - u), atol=1e-6)
