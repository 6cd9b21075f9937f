"""With theta = 0 and uniform segments, PerflowScheduler reproduces the original PeRFlow scheduler.

The oracle is ../shared/reference/perflow_reference.safetensors (288 cases run through the original
``PeRFlowScheduler``; its README states the tolerance: timesteps equal, max|ours - ref| <= 1e-5 max|ref|).
"""

import json

import pytest
import torch
from safetensors import safe_open

from perflow_core import PerflowScheduler

RELATIVE_TOLERANCE = 1e-5


def fake_model(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The reference's deterministic stand-in for a network."""
    return 0.8 * torch.tanh(x) + 0.1 * torch.sin(torch.tensor(float(tau) / 37.0)) * x


@pytest.fixture(scope="module")
def reference(reference_path):
    handle = safe_open(str(reference_path), "pt")
    return handle, json.loads(handle.metadata()["cases"])


def scheduler_for(case: dict) -> PerflowScheduler:
    return PerflowScheduler(
        num_train_timesteps=case["num_train_timesteps"],
        beta_schedule=case["beta_schedule"],
        beta_start=case["beta_start"],
        beta_end=case["beta_end"],
        prediction_type=case["prediction_type"],
        num_time_windows=case["num_time_windows"],
    )


def run_case(case: dict, initial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scheduler = scheduler_for(case)
    scheduler.set_timesteps(case["num_inference_steps"])
    x, trajectory = initial.clone(), [initial]
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t), t, x).prev_sample
        trajectory.append(x)
    return scheduler.timesteps, torch.stack(trajectory)


def test_reference_covers_all_parameterisations_schedules_and_window_counts(reference):
    _, cases = reference
    assert len(cases) == 288
    assert {c["prediction_type"] for c in cases} == {"ddim_eps", "diff_eps", "velocity"}
    assert {c["beta_schedule"] for c in cases} == {"scaled_linear", "linear", "squaredcos_cap_v2"}
    assert {c["num_time_windows"] for c in cases} == {1, 2, 3, 4, 5}


def test_every_reference_case_is_reproduced_with_theta_zero(reference):
    handle, cases = reference
    failures = []
    for case in cases:
        expected_timesteps = handle.get_tensor(f"{case['id']}.timesteps")
        expected = handle.get_tensor(f"{case['id']}.trajectory")
        timesteps, trajectory = run_case(case, expected[0])
        if not torch.equal(timesteps, expected_timesteps):
            failures.append(f"{case['id']}: timesteps {timesteps.tolist()} != {expected_timesteps.tolist()}")
            continue
        error = ((trajectory - expected).abs().max() / expected.abs().max()).item()
        if error > RELATIVE_TOLERANCE:
            failures.append(f"{case['id']}: relative error {error:.3g}")
    assert not failures, "\n".join(failures)


def test_segment_boundaries_999_equal_uniform_segments_on_the_reference(reference):
    handle, cases = reference
    case = next(c for c in cases if c["num_time_windows"] == 4 and c["num_inference_steps"] == 8)
    expected = handle.get_tensor(f"{case['id']}.trajectory")
    scheduler = scheduler_for({**case, "num_time_windows": None})
    scheduler = PerflowScheduler.from_config(scheduler.config, num_time_windows=None, segment_boundaries=[999, 750, 500, 250, 0])
    scheduler.set_timesteps(case["num_inference_steps"])
    x = expected[0].clone()
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(x, t), t, x).prev_sample
    assert torch.allclose(x, expected[-1], rtol=0, atol=RELATIVE_TOLERANCE * expected.abs().max().item())
