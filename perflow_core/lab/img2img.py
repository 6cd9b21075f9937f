"""Img2img on the shipped student: which start, ``img2img_start="original"`` or ``"straight_path"``, lands closer
to its teacher's exact answer (issue 9).

Clean images: for each held-out seed (10000-10255, the benchmark's held-out seeds, not theta's fit seeds) one generator
``torch.Generator().manual_seed(seed)`` draws x0 from the teacher's own data distribution (a random digit of the
data set plus ``smoothing`` noise, `smoothed_digits_source`) and then the img2img noise. Both starts get the same
x0 and the same noise.

Student: the shipped file with its stored settings (velocity, K = 4, stored theta), run as diffusers' img2img
pipelines do: ``set_timesteps(n)``, ``t_start = n - int(n * strength)``, ``set_begin_index(t_start)``,
``latents = add_noise(x0, noise, timesteps[t_start:t_start + 1])``, then the steps from ``timesteps[t_start]``.
Its last state (at ``alphas_cumprod[0]``) is carried to sigma 0 by the teacher's exact flow map
(`map_to_sigma_zero`).

References, the teacher's exact probability-flow ODE to sigma 0 from a noised input ``s x0 + n noise``, read at
its signal-to-noise ratio (the VP state ``input / sqrt(s^2 + n^2)`` at ``alpha = s^2 / (s^2 + n^2)``; ``s`` and
``n`` are read from the scheduler's own ``add_noise``):

- *exact img2img* (both starts are measured against it): from the ``original`` input, the DDPM marginal at
  ``alphas_cumprod[t - 1]``. This is what the strength means in diffusers and in the original PeRFlow, so it is
  the answer a user asks for with (image, strength, noise).
- *own input* (``straight_path`` only): from the ``straight_path`` input itself. A point on the line between the
  segment's noised ends lies on no marginal (``s^2 + n^2 < 1``); rescaled, it is the marginal at a level between
  the ends. This measures only how well the student carries what it was given, not what strength it realises.

At a segment start (every strength at 4 or 8 steps with K = 4) both starts give the same input, so the same
numbers; the table marks where the start lies. Run ``python -m perflow_core.lab.img2img``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..calibration import rmse
from ..scheduler import PerflowScheduler
from ..settings import PerflowSettings
from .analytic import AnalyticDigitsDenoiser, solve_probability_flow_ode
from .benchmark import STUDENT_PATH, Endpoint, map_to_sigma_zero, perflow_endpoint
from .reflow import load_student, smoothed_digits_source, student_smoothing

HELD_OUT_SEEDS = tuple(range(10_000, 10_256))
STRENGTHS = (0.3, 0.5, 0.75)
# 4 and 8 steps start every strength on a segment boundary (K = 4); 6 steps starts 0.5 inside one (at 625),
# 7 steps 0.3 (at 375), 10 steps 0.3 and 0.5 (375, 583). 0.75 starts at 750, a boundary, at every count up to 20.
STEPS = (4, 6, 7, 8, 10)
STARTS = ("original", "straight_path")


@dataclass
class Img2ImgRow:
    """One (steps, strength): where it starts and the RMSE at sigma 0 of the student's result.

    ``original`` and ``straight`` are measured against the exact img2img (the ODE from the ``original`` input);
    ``straight_own`` against the ODE from the ``straight_path`` input itself. ``difference`` is straight's mean
    squared error less original's (exact img2img), with ``difference_se`` its standard error over the seeds (paired).
    """

    steps: int
    strength: float
    start_timestep: int
    segment: Tuple[int, int]
    inside_segment: bool
    original: float
    straight: float
    straight_own: float
    difference: float
    difference_se: float

    @property
    def ratio(self) -> float:
        """straight / original, both against the exact img2img."""
        return self.straight / self.original

    @property
    def ratio_own(self) -> float:
        """straight (against its own input's ODE) / original."""
        return self.straight_own / self.original


@dataclass
class Img2ImgResult:
    rows: List[Img2ImgRow]
    seeds: List[int]
    smoothing: float
    settings: PerflowSettings
    student_path: Path


def clean_images_and_noise(seeds: Sequence[int], smoothing: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per seed, one generator draws x0 (a data-set digit plus ``smoothing`` noise) and then the img2img noise."""
    draw = smoothed_digits_source(smoothing)
    pairs = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        x0 = draw(1, generator)
        pairs.append((x0, torch.randn(x0.shape, generator=generator)))
    return torch.cat([x0 for x0, _ in pairs]), torch.cat([noise for _, noise in pairs])


def img2img_begin_index(steps: int, strength: float) -> int:
    """diffusers' ``get_timesteps``: the index of the first timestep an img2img run takes."""
    return max(steps - min(int(steps * strength), steps), 0)


def noised_level(scheduler: PerflowScheduler, timestep: torch.Tensor) -> Tuple[float, float]:
    """``(signal, noise)`` scales of ``scheduler.add_noise`` at ``timestep`` (it is linear in x0 and noise)."""
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    return float(scheduler.add_noise(one, zero, timestep)), float(scheduler.add_noise(zero, one, timestep))


def exact_from_noised(teacher: AnalyticDigitsDenoiser, latents: torch.Tensor, signal: float, noise: float) -> torch.Tensor:
    """The teacher's exact ODE to sigma 0 from ``latents = signal x0 + noise eps``, read at its signal-to-noise ratio:
    solved to ``alphas_cumprod[0]``, then carried on by `map_to_sigma_zero` (as the student's result is)."""
    norm = math.hypot(signal, noise)
    last = float(teacher.alphas_cumprod[0])
    state = solve_probability_flow_ode(teacher, latents.double() / norm, (signal / norm) ** 2, last)
    return map_to_sigma_zero(teacher, state, Endpoint(last))


@torch.no_grad()
def student_img2img(
    student: torch.nn.Module, scheduler: PerflowScheduler, teacher: AnalyticDigitsDenoiser, x0: torch.Tensor, noise: torch.Tensor, steps: int, strength: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(latents, timestep, result at sigma 0)`` of the student's img2img, step for step as diffusers' pipelines."""
    scheduler.set_timesteps(steps)
    begin = img2img_begin_index(steps, strength)
    timesteps = scheduler.timesteps[begin:]
    scheduler.set_begin_index(begin)
    latents = scheduler.add_noise(x0, noise, timesteps[:1].repeat(x0.shape[0]))
    sample = latents
    for t in timesteps:
        output = student(scheduler.scale_model_input(sample, t), t).sample
        sample = scheduler.step(output, t, sample).prev_sample
    return latents, timesteps[0], map_to_sigma_zero(teacher, sample, perflow_endpoint(scheduler))


def run_img2img_comparison(
    seeds: Sequence[int] = HELD_OUT_SEEDS,
    steps: Sequence[int] = STEPS,
    strengths: Sequence[float] = STRENGTHS,
    student_path: Optional[Union[str, Path]] = None,
) -> Img2ImgResult:
    """Both img2img starts of the student against its teacher's exact ODE, for every (steps, strength)."""
    student_path = Path(student_path or STUDENT_PATH)
    student, settings = load_student(student_path)
    smoothing = student_smoothing(student_path)
    teacher = AnalyticDigitsDenoiser(smoothing=smoothing)
    x0, noise = clean_images_and_noise(seeds, smoothing)
    schedulers = {start: PerflowScheduler(**settings.replace(img2img_start=start).to_config()) for start in STARTS}
    references: Dict[Tuple[int, str], torch.Tensor] = {}  # the input at a timestep depends on nothing else
    rows = []
    for n in steps:
        for strength in strengths:
            runs = {start: student_img2img(student, schedulers[start], teacher, x0, noise, n, strength) for start in STARTS}
            t = runs["original"][1]
            for start, (latents, _, _) in runs.items():
                if (int(t), start) in references:
                    continue
                if start != "original" and torch.equal(latents, runs["original"][0]):  # a segment start
                    references[int(t), start] = references[int(t), "original"]
                else:
                    references[int(t), start] = exact_from_noised(teacher, latents, *noised_level(schedulers[start], t))
            exact = references[int(t), "original"]
            paired = _squared_errors(runs["straight_path"][2], exact) - _squared_errors(runs["original"][2], exact)
            segments = schedulers["original"].segments
            k = segments.index_of(float(t))
            T = settings.num_train_timesteps
            rows.append(
                Img2ImgRow(
                    steps=n,
                    strength=strength,
                    start_timestep=int(t),
                    segment=(round(segments.starts[k] * T), round(segments.ends[k] * T)),
                    inside_segment=abs(float(t) - segments.starts[k] * T) > 1e-6,
                    original=rmse(runs["original"][2], exact),
                    straight=rmse(runs["straight_path"][2], exact),
                    straight_own=rmse(runs["straight_path"][2], references[int(t), "straight_path"]),
                    difference=float(paired.mean()),
                    difference_se=float(paired.std() / math.sqrt(len(paired))) if len(paired) > 1 else math.nan,
                )
            )
    return Img2ImgResult(rows, [int(s) for s in seeds], smoothing, settings, student_path)


def _squared_errors(samples: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample (float64)."""
    return (samples.double() - reference.double()).pow(2).flatten(1).mean(1)


def format_img2img_table(result: Img2ImgResult) -> str:
    """A Markdown table, one line per (steps, strength)."""
    lines = [
        "| steps | strength | start t | where | original | straight_path | straight / original | MSE straight - original (± s.e.) "
        "| straight_path vs. its own input's ODE | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        where = f"inside {row.segment[0]}->{row.segment[1]}" if row.inside_segment else "segment start"
        lines.append(
            f"| {row.steps} | {row.strength:g} | {row.start_timestep} | {where} | {row.original:.4f} | {row.straight:.4f} "
            f"| {row.ratio:.3f} | {row.difference:+.1e} ± {row.difference_se:.1e} | {row.straight_own:.4f} | {row.ratio_own:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    started = time.perf_counter()
    result = run_img2img_comparison()
    s = result.settings
    theta = "theta = 0" if s.theta_is_zero else "stored theta"
    print(
        f"Img2img of the shipped student ({s.prediction_type}, K={s.segments}, {theta}) on {len(result.seeds)} held-out "
        f"seeds ({result.seeds[0]}-{result.seeds[-1]}): RMSE at sigma 0 to the teacher's exact ODE (smoothing {result.smoothing:g}) "
        "from the original (DDPM-marginal) input; the last two columns measure straight_path against the exact ODE from "
        "its own input instead. The MSE difference is paired over the seeds.\n"
    )
    print(format_img2img_table(result))
    print(f"\n({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
