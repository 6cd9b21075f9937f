"""The piecewise-reflow trainer: its config, the loss history it records, and the training loop."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ...noise_schedule import alphas_cumprod_for
from ...parameterization import canonical_prediction_type
from ...segments import BOUNDARY_TOLERANCE, Segments
from ...settings import PerflowSettings
from .windows import (
    DataSource,
    DDIMTeacher,
    WindowTeacher,
    _raw_output,
    interpolate_in_window,
    noise_to_window_start,
    reflow_target,
    training_windows,
    window_indices,
)


@dataclass
class ReflowConfig:
    """Settings of piecewise reflow training.

    Args:
        segments: number of uniform windows K.
        parameterisation: what the student outputs: ``velocity``, ``diff_eps`` or ``ddim_eps``.
        batch_size: samples per step.
        learning_rate: AdamW's peak learning rate (cosine decay to 0 after a linear warm-up).
        steps: optimiser steps.
        seed: seeds every draw of the trainer (t, data, noise, pool picks).
        teacher_steps: solver steps per window of a DDIM teacher built with `PiecewiseReflowTrainer.ddim_teacher`.
        teacher_pool_size: 0 runs the teacher on fresh data at every step, as the original does. N > 0 runs it
            once on N fresh samples per window and draws every batch's (z_s, z_e) pairs from that pool (each
            with a fresh t), which is exact for a deterministic teacher and much cheaper when it is slow.
        window_start_share: share of the samples whose t is moved to the start of its window (0: t uniform, as
            in the original). One sampling step per window queries the student only at window starts.
        window_weights: relative share of the samples drawn from each window, t then uniform inside it (None:
            t uniform in (0, 1], as in the original). A window of weight 0 is not trained and gets no teacher pool.
        warmup_steps: linear learning-rate warm-up.
        weight_decay: AdamW's weight decay.
        max_grad_norm: gradient clipping (None: no clipping).
        num_train_timesteps: T; the student sees ``t * T``.
    """

    segments: int = 4
    parameterisation: str = "velocity"
    batch_size: int = 256
    learning_rate: float = 1e-3
    steps: int = 1000
    seed: int = 0
    teacher_steps: int = 8
    teacher_pool_size: int = 0
    window_start_share: float = 0.0
    window_weights: Optional[Tuple[float, ...]] = None
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        self.parameterisation = canonical_prediction_type(self.parameterisation)
        for name in ("segments", "batch_size", "steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.teacher_pool_size < 0:
            raise ValueError(f"teacher_pool_size must be >= 0, got {self.teacher_pool_size}")
        if not 0.0 <= self.window_start_share <= 1.0:
            raise ValueError(f"window_start_share must lie in [0, 1], got {self.window_start_share}")
        if self.window_weights is not None:
            self.window_weights = tuple(float(w) for w in self.window_weights)
            if len(self.window_weights) != self.segments:
                raise ValueError(
                    f"window_weights needs one weight per window ({self.segments}), got {len(self.window_weights)}"
                )
            if min(self.window_weights) < 0 or not math.isfinite(sum(self.window_weights)) or sum(self.window_weights) <= 0:
                raise ValueError(f"window_weights must be finite, >= 0 and not all 0, got {list(self.window_weights)}")


@dataclass
class ReflowHistory:
    """What `PiecewiseReflowTrainer.train` records.

    Args:
        losses: the MSE of every step.
        teacher_seconds: time spent building the teacher pool (0 without a pool).
        seconds: total wall time of `train`.
    """

    losses: List[float] = field(default_factory=list)
    teacher_seconds: float = 0.0
    seconds: float = 0.0

    def mean_loss(self, first: int, last: int) -> float:
        """Mean loss over steps ``first`` to ``last - 1``."""
        window = self.losses[first:last]
        return sum(window) / max(len(window), 1)

    def summary(self, points: int = 5) -> str:
        """The loss curve as a few running means, one per equal share of the steps."""
        count = len(self.losses)
        edges = [round(i * count / points) for i in range(points + 1)]
        parts = [f"steps {a + 1}-{b}: {self.mean_loss(a, b):.3e}" for a, b in zip(edges, edges[1:]) if b > a]
        return "; ".join(parts)


@dataclass
class _Pool:
    starts: List[Optional[torch.Tensor]]  # None for a window of weight 0
    ends: List[Optional[torch.Tensor]]


class PiecewiseReflowTrainer:
    """Piecewise reflow of a teacher's probability-flow ODE into a PeRFlow student (the original algorithm).

    Args:
        config: [`ReflowConfig`].
        alphas_cumprod: the teacher's noise schedule (SD1.5's by default), ``len == config.num_train_timesteps``.

    Example:
        >>> teacher = AnalyticODETeacher(AnalyticDigitsDenoiser())
        >>> trainer = PiecewiseReflowTrainer(ReflowConfig(steps=2000, teacher_pool_size=8192))
        >>> history = trainer.train(ReflowStudent(), smoothed_digits_source(), teacher)
    """

    def __init__(self, config: ReflowConfig, alphas_cumprod: Optional[torch.Tensor] = None):
        self.config = config
        if alphas_cumprod is None:
            alphas_cumprod = alphas_cumprod_for(num_train_timesteps=config.num_train_timesteps)
        self.alphas_cumprod = alphas_cumprod
        if len(self.alphas_cumprod) != config.num_train_timesteps:
            raise ValueError(f"alphas_cumprod has {len(self.alphas_cumprod)} entries, expected {config.num_train_timesteps}")
        self.segments = Segments.uniform(config.segments, config.num_train_timesteps)
        self.windows = training_windows(self.segments, self.alphas_cumprod)

    def ddim_teacher(self, eps_model: Callable) -> DDIMTeacher:
        """A `DDIMTeacher` over this trainer's schedule with ``config.teacher_steps`` steps per window."""
        return DDIMTeacher(eps_model, self.alphas_cumprod, self.config.teacher_steps)

    def settings(self) -> PerflowSettings:
        """The PeRFlow sampling settings of a student trained with this config (theta = 0)."""
        return PerflowSettings(
            segments=self.config.segments,
            prediction_type=self.config.parameterisation,
            num_train_timesteps=self.config.num_train_timesteps,
        )

    def train(
        self,
        student: nn.Module,
        data_source: DataSource,
        teacher: WindowTeacher,
        log_every: int = 0,
        log: Callable[[str], None] = print,
    ) -> ReflowHistory:
        """Train ``student`` in place; deterministic on CPU for a given ``config.seed`` and initial weights.

        Args:
            student: called as ``student(z_t, timesteps)`` with float timesteps ``t * T`` of shape ``[B]``.
            data_source: ``data_source(batch_size, generator)`` -> clean samples ``[B, ...]``.
            teacher: ``teacher(z_s, window)`` -> the ODE solution ``z_e`` at the window end.
            log_every: print the running loss every this many steps (0: never).
            log: where progress lines go.

        Returns:
            [`ReflowHistory`] with the loss of every step.
        """
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(self.config.seed)
        history = ReflowHistory()
        pool = None
        if self.config.teacher_pool_size:
            pool = self._teacher_pool(data_source, teacher, generator)
            history.teacher_seconds = time.perf_counter() - started
        optimizer = torch.optim.AdamW(
            student.parameters(), lr=self.config.learning_rate, weight_decay=self.config.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self._learning_rate_factor)
        student.train()
        for step in range(self.config.steps):
            z_t, timesteps, target = self._batch(data_source, teacher, generator, pool)
            loss = self.loss(student, z_t, timesteps, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(student.parameters(), self.config.max_grad_norm)
            optimizer.step()
            schedule.step()
            history.losses.append(float(loss.detach()))
            if log_every and (step + 1) % log_every == 0:
                log(f"step {step + 1}/{self.config.steps}: loss {history.mean_loss(step + 1 - log_every, step + 1):.3e}")
        student.eval()
        history.seconds = time.perf_counter() - started
        return history

    @staticmethod
    def loss(student: nn.Module, z_t: torch.Tensor, timesteps: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """MSE between the student's raw output at ``(z_t, timesteps)`` and the reflow target."""
        return nn.functional.mse_loss(_raw_output(student(z_t, timesteps)), target)

    def _learning_rate_factor(self, step: int) -> float:
        warmup = max(self.config.warmup_steps, 1)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(self.config.steps - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    def _batch(
        self, data_source: DataSource, teacher: WindowTeacher, generator: torch.Generator, pool: Optional[_Pool]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_t, t * T, target)`` for one step, grouped by window."""
        t, k_of_sample = self._draw_times(generator)
        if self.config.window_start_share:
            at_start = torch.rand(len(t), generator=generator) < self.config.window_start_share
            starts = torch.tensor(self.segments.starts, dtype=torch.float64)[k_of_sample]
            t = torch.where(at_start, starts, t)
        inputs, timesteps, targets = [], [], []
        for k, window in enumerate(self.windows):
            t_k = t[k_of_sample == k]
            if len(t_k) == 0:
                continue
            z_start, z_end = self._window_pairs(k, len(t_k), data_source, teacher, generator, pool)
            inputs.append(interpolate_in_window(z_start, z_end, t_k, window))
            targets.append(reflow_target(self.config.parameterisation, z_start, z_end, window))
            timesteps.append(t_k * self.config.num_train_timesteps)
        return torch.cat(inputs).float(), torch.cat(timesteps).float(), torch.cat(targets).float()

    def _draw_times(self, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(t, window of each t)`` for one batch."""
        if self.config.window_weights is None:
            t = 1.0 - torch.rand(self.config.batch_size, generator=generator, dtype=torch.float64)  # in (0, 1]
            return t, window_indices(self.segments, t)
        weights = torch.tensor(self.config.window_weights, dtype=torch.float64)
        k_of_sample = torch.multinomial(weights, self.config.batch_size, replacement=True, generator=generator)
        starts = torch.tensor(self.segments.starts, dtype=torch.float64)[k_of_sample]
        ends = torch.tensor(self.segments.ends, dtype=torch.float64)[k_of_sample]
        share = torch.rand(self.config.batch_size, generator=generator, dtype=torch.float64)  # in [0, 1)
        # t in [t_start, t_end + 2e-4): sampling reads a t within 1e-4 of t_end as the next window's start
        margin = 2 * BOUNDARY_TOLERANCE / self.config.num_train_timesteps
        return starts - share * (starts - ends - margin), k_of_sample

    def _window_pairs(
        self,
        k: int,
        count: int,
        data_source: DataSource,
        teacher: WindowTeacher,
        generator: torch.Generator,
        pool: Optional[_Pool],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        if pool is not None:
            picks = torch.randint(0, pool.starts[k].shape[0], (count,), generator=generator)
            return pool.starts[k][picks], pool.ends[k][picks]
        z_start = noise_to_window_start(data_source(count, generator), self.windows[k], generator)
        return z_start, teacher(z_start, self.windows[k]).detach()

    def _teacher_pool(self, data_source: DataSource, teacher: WindowTeacher, generator: torch.Generator, chunk: int = 1024) -> _Pool:
        starts, ends = [], []
        for k, window in enumerate(self.windows):
            if self.config.window_weights is not None and self.config.window_weights[k] == 0:
                starts.append(None)
                ends.append(None)
                continue
            z_start = noise_to_window_start(data_source(self.config.teacher_pool_size, generator), window, generator)
            z_end = torch.cat([teacher(part, window).detach() for part in z_start.split(chunk)])
            starts.append(z_start)
            ends.append(z_end)
        return _Pool(starts, ends)
