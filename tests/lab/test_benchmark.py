"""The error-vs-NFE benchmark: a smoke run of `--quick`, and the mapping of final states to sigma = 0."""

import contextlib
import io
import json
import math

import pytest
import torch
from PIL import Image

from perflow_core.lab.analytic import AnalyticDigitsDenoiser, noise_for_seeds, solve_probability_flow_ode
from perflow_core.lab.benchmark import (
    COMFY_SCHEDULE_SAMPLERS,
    COMFY_SCHEDULES,
    DIFFUSERS_PEERS,
    LEARNED_GRID,
    QUICK_NFES,
    STUDENT_PATH,
    Endpoint,
    StudentEpsModel,
    SamplingPlan,
    _with_levels,
    analytic_eps,
    boundary_levels,
    build_workload,
    comfy_schedule_rows,
    diffusers_endpoint,
    exact_ode_teacher,
    exact_path,
    load_comfy,
    main,
    map_to_sigma_zero,
    network_eps,
    perflow_settings,
    run_comfy_sampler,
    run_diffusers_peer,
    run_perflow,
    student_levels,
)
from perflow_core.calibration import ode_teacher, rmse
from perflow_core.lab.reflow import load_student
from perflow_core.settings import PerflowSettings


@pytest.fixture(scope="module")
def model():
    return AnalyticDigitsDenoiser(smoothing=0.2)


@pytest.fixture(scope="module")
def noise():
    return noise_for_seeds(range(10_000, 10_004))


def peer(name):
    return next(p for p in DIFFUSERS_PEERS if p.name == name)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--quick`` run without ComfyUI: (exit code, output folder, what it printed)."""
    output, printed = tmp_path_factory.mktemp("benchmark"), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.delenv("COMFYUI_PATH", raising=False)
        code = main(["--quick", "--output-dir", str(output)])
    return code, output, printed.getvalue()


def test_quick_run_writes_the_json_and_the_plot(quick_run):
    code, tmp_path, printed = quick_run
    assert code == 0
    payload = json.loads((tmp_path / "benchmark.json").read_text())
    assert {"config", "models", "ratios", "overhead", "calibration_cost", "seconds"} <= set(payload)
    assert payload["config"]["nfes"] == list(QUICK_NFES)
    assert "COMFYUI_PATH is not set" in payload["config"]["comfyui"]
    analytic = [m for m in payload["models"] if m["title"].startswith("analytic")]
    assert [m["smoothing"] for m in analytic] == [0.05, 0.2]
    for result in analytic:
        samplers = {row["sampler"] for row in result["rows"]}
        assert {"PeRFlow theta=0", "PeRFlow cal. (PeRFlow 8x teacher)", "diffusers UniPC", "diffusers Heun"} <= samplers
        for row in result["rows"]:
            assert set(row["errors"]) == {str(n) for n in QUICK_NFES}
            assert all(math.isfinite(v) and v > 0 for v in row["errors"].values())
            assert all(row["calls"][str(n)] <= n for n in QUICK_NFES)
    assert {"ode", "x0"} == set(payload["ratios"])
    assert all({"name", "value", "target", "met"} <= set(r) for r in payload["ratios"]["ode"])
    assert payload["overhead"] and all(o["ratio"] > 0 for o in payload["overhead"])
    with Image.open(tmp_path / "benchmark.png") as image:
        assert image.width > 500 and image.height > 300
    assert "required ratios" in printed and "ComfyUI samplers: COMFYUI_PATH is not set" in printed


def test_overlapping_seed_sets_are_refused(tmp_path):
    assert main(["--quick", "--seeds", "0:8", "--fit-seeds", "4:12", "--output-dir", str(tmp_path)]) == 2


@pytest.mark.parametrize("name", ["diffusers Euler", "diffusers DDIM", "diffusers DPM++ 2M", "diffusers UniPC", "diffusers Heun"])
def test_samplers_that_end_at_sigma_zero_are_not_remapped(model, noise, name):
    run = run_diffusers_peer(peer(name), model, noise, 4)
    assert run.endpoint.at_sigma_zero
    for method in ("ode", "x0"):
        assert torch.equal(map_to_sigma_zero(model, run.final, run.endpoint, method), run.final.double())


def test_deis_ends_at_the_first_training_level():
    scheduler = peer("diffusers DEIS").build()
    scheduler.set_timesteps(4)
    endpoint = diffusers_endpoint(scheduler, variance_exploding=False)
    assert not endpoint.at_sigma_zero
    assert endpoint.alpha == pytest.approx(float(scheduler.alphas_cumprod[0]), abs=1e-6)


def test_perflow_state_at_the_first_training_level_is_mapped_by_x0_prediction(model, noise):
    run = run_perflow(model, perflow_settings(4), noise, 4)
    alpha = float(model.alphas_cumprod[0])
    assert run.endpoint == Endpoint(alpha, variance_exploding=False)
    expected = model.x0_prediction(run.final.double(), alpha)
    assert torch.equal(map_to_sigma_zero(model, run.final, run.endpoint, "x0"), expected)


def test_the_ode_map_takes_an_exact_state_to_the_exact_solution_and_x0_prediction_does_not(model, noise):
    alpha = float(model.alphas_cumprod[0])
    path = exact_path(model, noise, [alpha])
    state = path.states[alpha]
    assert rmse(map_to_sigma_zero(model, state, Endpoint(alpha), "ode"), path.endpoint) < 1e-6
    assert rmse(map_to_sigma_zero(model, state, Endpoint(alpha), "x0"), path.endpoint) > 1e-3


def test_variance_exploding_states_are_rescaled_before_mapping(model, noise):
    alpha = 0.9
    z = math.sqrt(alpha) * noise.double()
    mapped = map_to_sigma_zero(model, z / math.sqrt(alpha), Endpoint(alpha, variance_exploding=True), "x0")
    assert torch.allclose(mapped, model.x0_prediction(z, alpha), rtol=0, atol=1e-12)


def test_exact_teacher_targets_are_exact_at_window_ends_and_on_the_line_inside(model, noise):
    plan = SamplingPlan.for_steps(perflow_settings(8), 8, model.alphas_cumprod)
    path = exact_path(model, noise, boundary_levels(model.alphas_cumprod, [4]))
    targets = exact_ode_teacher(plan, [path])(noise.clone())
    for target, window in zip(targets, plan.steps):
        start, end = path.states[window.alpha_start], path.states[window.alpha_end]
        if window.t_next == window.t_end:
            assert torch.equal(target, end)
        else:
            share = (window.t_start - window.t_next) / (window.t_start - window.t_end)
            assert 0 < share < 1 and torch.allclose(target, start + share * (end - start), atol=1e-12)
    assert rmse(path.endpoint, solve_probability_flow_ode(model, noise.double(), float(model.alphas_cumprod[-1]), 1.0)) < 1e-5


@pytest.mark.parametrize("timestep", [1000.0, 750.0, 250.0])
def test_a_ddim_eps_model_read_as_a_student_gives_back_its_eps_at_window_starts(model, noise, timestep):
    settings = PerflowSettings(prediction_type="ddim_eps")
    eps_model = StudentEpsModel(model, settings)
    z = noise.double() if timestep == 1000.0 else 0.5 * noise.double()
    expected = model(z, timestep).sample
    assert torch.allclose(eps_model(z, torch.tensor(timestep)).sample, expected, atol=1e-9)


def test_the_calibration_ode_teacher_agrees_with_the_benchmarks_precomputed_one(model, noise):
    plan = SamplingPlan.for_steps(perflow_settings(6), 6, model.alphas_cumprod)
    path = exact_path(model, noise, boundary_levels(model.alphas_cumprod, [4]))
    solve = lambda z, a, b: solve_probability_flow_ode(model, z, a, b)  # noqa: E731
    computed = ode_teacher(solve, plan)(noise.double())
    precomputed = exact_ode_teacher(plan, [path])(noise.clone())
    assert all(rmse(a, b) < 1e-10 for a, b in zip(computed, precomputed))


def test_the_student_table_has_every_diffusers_peer_run_on_the_student(quick_run):
    payload = json.loads((quick_run[1] / "benchmark.json").read_text())
    student = next(m for m in payload["models"] if m["title"].startswith("PeRFlow student"))
    samplers = [row["sampler"] for row in student["rows"]]
    assert {"student theta=0", "student cal. (exact-ODE teacher)", "best peer on teacher"} <= set(samplers)
    assert {f"{p.name} on student" for p in DIFFUSERS_PEERS} <= set(samplers)


def test_the_student_table_says_how_much_error_each_window_adds(quick_run):
    payload = json.loads((quick_run[1] / "benchmark.json").read_text())
    student = next(m for m in payload["models"] if m["title"].startswith("PeRFlow student"))
    windows = [note for note in student["notes"] if note.startswith("window ")]
    assert [note.split(" (")[0] for note in windows] == ["window 0", "window 1", "window 2", "window 3"]
    assert all("RMSE off at the window end" in note and "at sigma 0" in note for note in windows)


@pytest.mark.comfyui
def test_comfyui_euler_on_the_student_takes_the_same_steps_as_diffusers_ddim(noise):
    comfy, why = load_comfy("simple")
    if comfy is None:
        pytest.skip(why)
    student, settings = load_student(STUDENT_PATH)
    eps_model = StudentEpsModel(student, settings)
    teacher = AnalyticDigitsDenoiser(smoothing=0.05)
    comfy_run = run_comfy_sampler(comfy, "euler", network_eps(eps_model, comfy.model_sampling), noise, 4)
    ddim_run = run_diffusers_peer(peer("diffusers DDIM"), eps_model, noise, 4)
    comfy_final = map_to_sigma_zero(teacher, comfy_run.final, comfy_run.endpoint)
    assert comfy_run.calls == 4 and rmse(comfy_final, ddim_run.final) < 1e-4


@pytest.mark.comfyui
def test_ays_and_gits_rows_take_comfyuis_own_sigmas_for_every_sampler():
    comfy, why = load_comfy("simple")
    if comfy is None:
        pytest.skip(why)
    import comfy_extras.nodes_align_your_steps as ays

    work = build_workload(0.2, range(10_000, 10_002), range(0, 2), [4])
    rows = comfy_schedule_rows(comfy, work, analytic_eps(work.model))
    assert [r.sampler for r in rows] == [f"ComfyUI {n} + {s}" for s in COMFY_SCHEDULES for n in COMFY_SCHEDULE_SAMPLERS]
    assert all(r.calls[4] == 4 and math.isfinite(r.errors[4]) for r in rows if "uni_pc" not in r.sampler)
    sigmas = comfy.schedule_nodes["AYS SD1"](4)
    assert len(sigmas) == 5 and float(sigmas[0]) == pytest.approx(14.6146, abs=1e-3) and float(sigmas[-1]) == 0.0
    assert torch.equal(sigmas, ays.AlignYourStepsScheduler.execute("SD1", 4, 1.0).result[0])


def test_the_quick_run_has_the_learned_grid_rows_and_the_second_model(quick_run):
    _, tmp_path, printed = quick_run
    payload = json.loads((tmp_path / "benchmark.json").read_text())
    second = [m for m in payload["models"] if m["model"] == "inverted"]
    assert [m["smoothing"] for m in second] == [0.05, 0.2]
    for result in payload["models"][:2] + second:
        grid = next(r for r in result["rows"] if r["sampler"] == LEARNED_GRID)
        assert all(b[0] == 1000 and b[-1] == 0 and len(b) == n + 1 for n, b in ((int(k), v) for k, v in grid["boundaries"].items()))
    assert "inverted s=0.05 grid[2M]@4 / best peer@4" in printed and "target <= 2" in printed


def test_a_student_with_other_segments_gets_exact_states_at_all_its_window_ends():
    settings = PerflowSettings(segments=3, prediction_type="velocity")
    work = build_workload(0.2, range(10_000, 10_002), range(0, 2), [4, 8])
    levels = student_levels(settings, [4, 8])
    assert not set(levels) <= set(work.held_out.states)
    extended = _with_levels(work, levels, range(10_000, 10_002), range(0, 2))
    assert set(levels) <= set(extended.held_out.states) and set(levels) <= set(extended.fit.states)
