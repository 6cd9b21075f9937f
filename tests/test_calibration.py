import pytest
import torch

from perflow_core.analytic import AnalyticDigitsDenoiser, noise_for_seeds
from perflow_core.calibration import StudentPlan, calibrate_theta, fit_theta, perflow_teacher, run_student
from perflow_core.noise_schedule import alphas_cumprod_for
from perflow_core.settings import PerflowSettings

ALPHAS = alphas_cumprod_for()


@pytest.fixture(scope="module")
def model_fn():
    model = AnalyticDigitsDenoiser(smoothing=0.2)
    return lambda z, timestep: model(z, float(timestep)).sample


def test_teacher_passes_through_every_student_timestep(model_fn):
    plan = StudentPlan.build(PerflowSettings(prediction_type="ddim_eps"), 6, ALPHAS)
    teacher = perflow_teacher(model_fn, plan, multiplier=4)
    assert teacher.calls_per_sample == 24
    targets = teacher(noise_for_seeds(range(2)).double())
    assert len(targets) == 6 and targets[0].shape == (2, 1, 8, 8)


def test_a_teacher_with_one_step_per_student_step_is_the_student(model_fn):
    plan = StudentPlan.build(PerflowSettings(prediction_type="ddim_eps"), 4, ALPHAS)
    noise = noise_for_seeds(range(3)).double()
    assert torch.allclose(perflow_teacher(model_fn, plan, multiplier=1)(noise)[-1], run_student(model_fn, plan, noise)[-1])


def test_fitting_the_student_to_itself_gives_zero_theta(model_fn):
    plan = StudentPlan.build(PerflowSettings(prediction_type="ddim_eps"), 4, ALPHAS)
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
