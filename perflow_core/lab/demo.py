"""The README's main job: the embedded PeRFlow student at 4 steps against its teacher with the best solver
at the same number of steps, both measured against the teacher's exact probability-flow ODE solution.

Everything is compared at one endpoint, sigma = 0: a sampler that stops short of it (PeRFlow stops at
``alphas_cumprod[0]``, DDIM and DEIS too) is carried there by the teacher's exact flow map (see
`perflow_core.lab.benchmark.map_to_sigma_zero`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

from .analytic import AnalyticDigitsDenoiser, noise_for_seeds
from .benchmark import (
    DIFFUSERS_PEERS,
    STUDENT_PATH,
    SamplerRun,
    exact_path,
    map_to_sigma_zero,
    perflow_settings,
    rmse,
    run_diffusers_peer,
    run_perflow,
)
from .reflow import load_student, student_smoothing

STUDENT = "student"
TEACHER = "teacher"


@dataclass
class DemoRow:
    """One sampler on one model: its samples at sigma 0, RMSE to the exact solution and wall time."""

    sampler: str
    model: str
    calls: int
    samples: torch.Tensor
    error: float
    seconds: float


@dataclass
class DemoResult:
    """The rows (student first, then every solver on the teacher) and the exact solution."""

    rows: List[DemoRow]
    exact: torch.Tensor
    exact_seconds: float
    smoothing: float
    student_path: Path

    @property
    def student(self) -> DemoRow:
        return next(row for row in self.rows if row.model == STUDENT)

    @property
    def best_on_teacher(self) -> DemoRow:
        """The solver with the lowest error on the teacher (ties: the first listed)."""
        return min((row for row in self.rows if row.model == TEACHER), key=lambda row: row.error)


def run_demo_comparison(
    seeds: Sequence[int], steps: int = 4, student_path: Optional[Union[str, Path]] = None
) -> DemoResult:
    """Sample the student (its stored settings and theta) and its analytic teacher with PeRFlow and every
    diffusers peer at ``steps`` network calls, from the noise of ``seeds``."""
    student_path = Path(student_path or STUDENT_PATH)
    student, settings = load_student(student_path)
    if steps < settings.segments:
        raise ValueError(f"steps must be at least the student's K = {settings.segments} segments; got {steps}")
    smoothing = student_smoothing(student_path)
    teacher = AnalyticDigitsDenoiser(smoothing=smoothing)
    noise = noise_for_seeds(seeds)
    exact = exact_path(teacher, noise, [])

    def row(sampler: str, model: str, run: Callable[[], SamplerRun]) -> DemoRow:
        run()  # warm-up: the first call of a network pays one-off costs
        started = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - started
        samples = map_to_sigma_zero(teacher, result.final, result.endpoint)
        return DemoRow(sampler, model, result.calls, samples, rmse(samples, exact.endpoint), seconds)

    theta = "theta = 0" if settings.theta_is_zero else "stored theta"
    rows = [row(f"PeRFlow ({settings.prediction_type}, K={settings.segments}, {theta})", STUDENT, lambda: run_perflow(student, settings, noise, steps))]
    rows.append(row("PeRFlow (ddim_eps, K=4, theta = 0)", TEACHER, lambda: run_perflow(teacher, perflow_settings(steps), noise, steps)))
    for peer in DIFFUSERS_PEERS:
        rows.append(row(peer.name, TEACHER, lambda peer=peer: run_diffusers_peer(peer, teacher, noise, steps)))
    return DemoResult(rows, exact.endpoint, exact.seconds, smoothing, student_path)


def format_demo_table(result: DemoResult) -> str:
    """A Markdown table: one line per sampler, the best on the teacher marked."""
    best = result.best_on_teacher
    lines = ["| model | sampler | network calls | RMSE to exact ODE | time (ms) |", "|---|---|---|---|---|"]
    for row in result.rows:
        mark = " (best on the teacher)" if row is best else ""
        lines.append(f"| {row.model} | {row.sampler}{mark} | {row.calls} | {row.error:.4f} | {row.seconds * 1000:.1f} |")
    lines.append(f"| teacher | exact probability-flow ODE (RK4, ~1e-6) | - | 0 | {result.exact_seconds * 1000:.1f} |")
    return "\n".join(lines)
