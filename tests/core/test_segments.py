"""Segments: the original's uniform windows and timestep grid, explicit boundaries, and where a step lies."""

import numpy as np
import pytest

from perflow_core import Segments
from perflow_core.noise_schedule import alphas_cumprod_for


def test_uniform_segments_start_at_one_and_end_at_zero():
    segments = Segments.uniform(4)
    assert segments.starts == (1.0, 0.75, 0.5, 0.25)
    assert segments.ends == (0.75, 0.5, 0.25, 0.0)
    assert segments.boundaries == [1000.0, 750.0, 500.0, 250.0, 0.0]


@pytest.mark.parametrize(
    "steps, expected",
    [
        (4, [1000, 750, 500, 250]),
        (6, [1000, 875, 750, 625, 500, 250]),
        (8, [1000, 875, 750, 625, 500, 375, 250, 125]),
    ],
)
def test_timestep_grid_matches_the_original(steps, expected):
    assert Segments.uniform(4).timesteps(steps).tolist() == expected


def test_extra_steps_go_to_the_earliest_segments():
    assert Segments.uniform(4).steps_per_segment(7) == [2, 2, 2, 1]


def test_timesteps_are_truncated_not_rounded():
    assert Segments.uniform(3).timesteps(3).tolist() == [1000, 666, 333]


def test_a_boundary_timestep_belongs_to_the_later_segment():
    segments = Segments.uniform(4)
    assert segments.index_of(1000) == 0
    assert segments.index_of(750) == 1
    assert segments.index_of(751) == 0
    assert segments.index_of(1) == 3


def test_first_boundary_999_means_pure_noise_like_1000():
    assert Segments.from_boundaries([999, 750, 500, 250, 0]) == Segments.uniform(4)
    assert Segments.from_boundaries([1000, 750, 500, 250, 0]) == Segments.uniform(4)


def test_custom_boundaries_give_unequal_segments():
    segments = Segments.from_boundaries([1000, 900, 600, 0])
    assert segments.timesteps(3).tolist() == [1000, 900, 600]
    assert segments.timesteps(6).tolist() == [1000, 950, 900, 750, 600, 300]


def test_window_alpha_indices_follow_the_original_convention():
    segments = Segments.uniform(4)
    assert segments.alpha_indices(0) == (999, 749)
    assert segments.alpha_indices(3) == (249, 0)


def test_integer_boundary_keeps_its_intended_alpha_index():
    assert Segments.from_boundaries([1000, 700, 0]).alpha_indices(1) == (699, 0)


def test_window_geometry_of_a_step():
    alphas = alphas_cumprod_for()
    window = Segments.uniform(4).step_at(875, 750, alphas)
    assert (window.index, window.t, window.t_next, window.t_start, window.t_end) == (0, 0.875, 0.75, 1.0, 0.75)
    assert window.alpha_start == pytest.approx(float(alphas[999]))
    assert window.alpha_end == pytest.approx(float(alphas[749]))


@pytest.mark.parametrize(
    "boundaries, fragment",
    [
        ([1000, 750, 750, 0], "strictly decreasing"),
        ([1000, 250, 500, 0], "strictly decreasing"),
        ([800, 500, 0], "start at the noise end"),
        ([1000, 500, 10], "end at 0"),
        ([1000], "at least 2"),
        ([1000, float("nan"), 0], "finite"),
        (["a", 0], "segment_boundaries must be"),
    ],
)
def test_bad_boundaries_are_refused_with_the_rule(boundaries, fragment):
    with pytest.raises(ValueError, match="segment_boundaries") as error:
        Segments.from_boundaries(boundaries)
    assert fragment in str(error.value)


@pytest.mark.parametrize("count", [0, -1, 2.5, True, "4"])
def test_bad_segment_counts_are_refused(count):
    with pytest.raises(ValueError, match="segments"):
        Segments.uniform(count)


def test_too_many_steps_for_a_narrow_segment_is_refused():
    with pytest.raises(ValueError, match="same training timestep"):
        Segments.from_boundaries([1000, 999, 0]).timesteps(4)


def test_fewer_steps_than_segments_is_refused_by_the_grid():
    with pytest.raises(ValueError, match="below the number of segments"):
        Segments.uniform(4).timesteps(3)


def test_grid_is_int64():
    assert Segments.uniform(2).timesteps(5).dtype == np.int64


@pytest.mark.parametrize("steps", [997, 1000])
def test_a_step_count_too_fine_for_the_grid_names_the_input_and_the_most_that_fit(steps):
    with pytest.raises(ValueError, match=f"steps={steps} puts two steps .* at most 996 steps fit"):
        Segments.uniform(4).timesteps(steps, "steps")
