"""Calibrating theta: per-segment least squares along the sampler's own states, against a teacher."""

import pytest
import torch

from perflow_core.lab.analytic import AnalyticDigitsDenoiser, noise_for_seeds
from perflow_core.calibration import calibrate_theta, fit_theta, perflow_teacher, rmse, run_student
from perflow_core.sampling import SamplingPlan, run_plan
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


def calibrate_small(model_fn, steps=4, **options):
    return calibrate_theta(
        model_fn, PerflowSettings(prediction_type="ddim_eps"), steps, ALPHAS, noise_for_seeds(range(16)).double(), noise_for_seeds(range(100, 108)).double(), **options
    )


def test_progress_is_told_before_every_model_call_with_increasing_counts(model_fn):
    seen = []
    report = calibrate_small(model_fn, progress=lambda done, planned: seen.append((done, planned)))
    done = [d for d, _ in seen]
    assert done[:-1] == list(range(report.model_calls)) and done[-1] == report.model_calls
    assert all(d <= planned for d, planned in seen) and seen[-1] == (report.model_calls, report.model_calls)


def test_raising_from_progress_stops_the_calibration_before_the_next_model_call(model_fn):
    calls = []

    def counting(z, timestep):
        calls.append(timestep)
        return model_fn(z, timestep)

    def cancel_after_five(done, planned):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate_theta(counting, PerflowSettings(prediction_type="ddim_eps"), 4, ALPHAS, noise_for_seeds(range(4)).double(), noise_for_seeds(range(100, 102)).double(), progress=cancel_after_five)
    assert len(calls) == 5


def test_a_first_order_grid_teacher_is_the_perflow_flow_with_a_window_per_step(model_fn):
    from perflow_core.time_grid import solve_on_grid

    grid = [1000.0, 800.0, 450.0, 200.0, 60.0, 0.0]
    noise = noise_for_seeds(range(3)).double()
    plan = SamplingPlan.for_steps(PerflowSettings(segment_boundaries=grid, prediction_type="ddim_eps"), 5, ALPHAS)
    assert torch.allclose(torch.stack(solve_on_grid(model_fn, grid, ALPHAS, noise).states[1:]), torch.stack(run_student(model_fn, plan, noise)), atol=1e-10)


@pytest.mark.parametrize("steps", [6, 8])
def test_fitting_the_time_grid_beats_theta_alone_on_held_out_seeds(model_fn, steps):
    options = dict(teacher_solver="dpmpp_2m", teacher_multiplier=8)
    fit, held_out = noise_for_seeds(range(64)).double(), noise_for_seeds(range(1000, 1064)).double()
    settings = PerflowSettings(prediction_type="ddim_eps")
    theta_only = calibrate_theta(model_fn, settings, steps, ALPHAS, fit, held_out, **options)
    with_grid = calibrate_theta(model_fn, settings, steps, ALPHAS, fit, held_out, fit_boundaries=True, **options)
    assert with_grid.error_after < theta_only.error_after
    boundaries = with_grid.settings.segment_boundaries
    assert with_grid.settings.segments == steps and boundaries[0] == 1000 and boundaries[-1] == 0 and boundaries != settings.build_segments().boundaries


def test_the_learned_grid_is_deterministic_and_an_ordinary_setting(model_fn):
    first, second = (calibrate_small(model_fn, steps=6, fit_boundaries=True).settings for _ in range(2))
    assert first == second
    assert PerflowSettings.from_config(first.to_config()) == first


@pytest.mark.parametrize("prediction_type", ["diff_eps", "velocity"])
def test_the_grid_of_a_model_trained_on_its_windows_is_not_fitted(model_fn, prediction_type):
    with pytest.raises(ValueError, match=f"fit_boundaries needs prediction_type ddim_eps .*got {prediction_type}"):
        calibrate_theta(model_fn, PerflowSettings(prediction_type=prediction_type), 4, ALPHAS, noise_for_seeds(range(2)), noise_for_seeds(range(10, 12)), fit_boundaries=True)


def test_scheduler_calibrate_can_learn_the_segments_and_saves_them(model_fn, tmp_path):
    from perflow_core import PerflowScheduler

    scheduler = PerflowScheduler(prediction_type="ddim_eps")
    report = scheduler.calibrate(model_fn, noise_for_seeds(range(32)).double(), noise_for_seeds(range(500, 516)).double(), num_inference_steps=6, fit_boundaries=True)
    scheduler.save_pretrained(tmp_path)
    loaded = PerflowScheduler.from_pretrained(tmp_path)
    assert loaded.perflow_settings() == report.settings == scheduler.perflow_settings()
    loaded.set_timesteps(6)
    assert [float(t) for t in loaded.timesteps] == report.settings.build_segments().boundaries[:-1]



BOUNDARIES = [1000.0, 594.0, 375.0, 188.0, 0.0]


def greedy_grid_fit(model_fn, seeds=16):
    """A 4-step one-window-per-step grid on a DPM++ 2M teacher path: its search (outputs kept), plan, noise, theta
    fitted step by step (no refit) and the teacher's final state."""
    from perflow_core.calibration import GridSearch
    from perflow_core.time_grid import fine_grid, solve_on_grid

    settings = PerflowSettings(prediction_type="ddim_eps")
    noise = noise_for_seeds(range(seeds)).double()
    path = solve_on_grid(model_fn, fine_grid(SamplingPlan.for_steps(settings, 4, ALPHAS), 8), ALPHAS, noise, "dpmpp_2m")
    search = GridSearch(model_fn, settings, ALPHAS, noise, path)
    return search, search.plan(BOUNDARIES), noise, search.theta(BOUNDARIES), path.states[-1]


def test_refitting_the_last_steps_against_the_final_target_lowers_the_fit_error_and_keeps_the_earlier_rows(model_fn):
    from perflow_core.calibration import refine_to_endpoint

    _, plan, noise, theta, target = greedy_grid_fit(model_fn)
    refined = refine_to_endpoint(model_fn, plan, noise, theta, target, last=2)
    final = lambda t: run_student(model_fn, plan, noise, t)[-1]  # noqa: E731
    assert rmse(final(refined), target) < rmse(final(theta), target)
    assert torch.equal(refined[:2], theta[:2]) and not torch.equal(refined[2:], theta[2:])


def test_an_endpoint_refit_that_cannot_lower_the_fit_error_keeps_theta(model_fn):
    from perflow_core.calibration import refine_to_endpoint

    _, plan, noise, theta, _ = greedy_grid_fit(model_fn)
    own_end = run_student(model_fn, plan, noise, theta)[-1]
    assert torch.equal(refine_to_endpoint(model_fn, plan, noise, theta, own_end, last=3), theta)


def test_the_grid_searchs_known_outputs_are_the_model_outputs_of_its_fitted_run(model_fn):
    search, plan, noise, theta, _ = greedy_grid_fit(model_fn)
    known = search.known_outputs(BOUNDARIES)
    records = []
    run_plan(model_fn, plan, noise, theta, on_step=records.append)
    assert all(torch.equal(known(r.sample, plan.timesteps[r.index]), r.output) for r in records)


def test_the_endpoint_refit_with_known_outputs_stays_within_its_call_budget(model_fn):
    from perflow_core.calibration import refine_to_endpoint, refinement_calls

    search, plan, noise, theta, target = greedy_grid_fit(model_fn)
    calls = []
    counting = lambda z, t: calls.append(t) or model_fn(z, t)  # noqa: E731
    refine_to_endpoint(counting, plan, noise, theta, target, last=3, known=search.known_outputs(BOUNDARIES))
    assert 0 < len(calls) <= refinement_calls(3)


def test_the_endpoint_refit_takes_the_most_last_steps_its_budget_allows_and_at_least_two():
    from perflow_core.calibration import endpoint_steps, refinement_calls

    assert endpoint_steps(4, 16) == 3 and refinement_calls(3) <= 16 < refinement_calls(4)
    assert endpoint_steps(4, refinement_calls(2) - 1) == 0
