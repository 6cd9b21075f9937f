"""The img2img start comparison (issue 9): where the two starts coincide, and that it measures something finite."""

import math

import pytest
import torch

from perflow_core.lab.img2img import clean_images_and_noise, img2img_begin_index, noised_level, run_img2img_comparison
from perflow_core.scheduler import PerflowScheduler

SEEDS = range(10_000, 10_004)


def test_starts_on_segment_boundaries_coincide():
    """K = 4 at 4 steps: every strength starts at a segment start, where both starts give the same input and result."""
    result = run_img2img_comparison(seeds=SEEDS, steps=(4,))
    assert [row.start_timestep for row in result.rows] == [250, 500, 750]
    for row in result.rows:
        assert not row.inside_segment
        assert row.straight == row.original and row.straight_own == row.original and row.difference == 0


def test_start_inside_a_segment_differs_and_is_finite():
    """6 steps at strength 0.5 start at 625, inside 750 -> 500: the starts differ, every number is finite."""
    result = run_img2img_comparison(seeds=SEEDS, steps=(6,))
    assert [(row.start_timestep, row.inside_segment) for row in result.rows] == [(250, False), (625, True), (750, False)]
    inside = result.rows[1]
    assert inside.segment == (750, 500)
    for row in result.rows:
        assert all(math.isfinite(v) and v > 0 for v in (row.original, row.straight, row.straight_own, row.ratio))
        assert math.isfinite(row.difference) and math.isfinite(row.difference_se)
    assert inside.straight != inside.original


def test_noised_levels_of_the_two_starts():
    """``original`` noises at the DDPM marginal alphas_cumprod[t - 1]; ``straight_path`` puts the input on the chord
    between the segment's noised ends (inside the unit circle, so on no marginal) at a level between theirs."""
    assert img2img_begin_index(6, 0.5) == 3
    original, straight = (PerflowScheduler(segments=4, img2img_start=start) for start in ("original", "straight_path"))
    alphas = original.alphas_cumprod.double()
    t = torch.tensor([625])
    signal, noise = noised_level(original, t)
    assert signal == pytest.approx(math.sqrt(alphas[624])) and signal**2 + noise**2 == pytest.approx(1.0)
    signal, noise = noised_level(straight, t)
    assert signal**2 + noise**2 < 1.0
    assert float(alphas[749]) < signal**2 / (signal**2 + noise**2) < float(alphas[499])
    x0, noise = clean_images_and_noise(SEEDS, 0.05)
    assert torch.equal(x0, clean_images_and_noise(SEEDS, 0.05)[0]) and x0.shape == noise.shape == (4, 1, 8, 8)
