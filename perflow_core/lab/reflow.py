"""Piecewise reflow: training a PeRFlow student from a frozen diffusion teacher (notes, "Training").

One training step of the original PeRFlow (Yan et al. 2024, Sec. 3.2):

1. sample t uniformly in (0, 1] and find its window [t_s, t_e];
2. noise clean data x0 to ``z_s = sqrt(a_s) x0 + sqrt(1 - a_s) noise`` with ``a_s = alphas_cumprod[int(t_s*T) - 1]``;
3. the frozen teacher solves the probability-flow ODE from t_s to t_e: ``z_e = teacher(z_s, window)``;
4. the student sees ``z_t = lerp(z_s, z_e)`` at timestep ``t*T`` and regresses, with MSE, the velocity
   ``(z_e - z_s) / (t_e - t_s)`` or the eps target ``(z_e - lambda_s z_s) / eta_s``.

The trainer is generic over the network (any ``student(z_t, timesteps)`` returning a tensor or an object with
``.sample``), the data (any ``data_source(batch_size, generator)``) and the teacher (any ``teacher(z_s, window)``).
Two options go beyond the original, both off by default: a teacher pool (the teacher runs once on N samples per
window, and batches reuse those exact pairs) and ``window_start_share`` (a share of t moved to window starts,
where one-step-per-window sampling queries the student).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .analytic import DEFAULT_SMOOTHING, AnalyticDigitsDenoiser, noise_for_seeds, solve_probability_flow_ode
from ..calibration import rmse
from ..checkpoint import PERFLOW_PREFIXES, read_perflow_settings, write_perflow_checkpoint
from ..noise_schedule import alpha_at_timestep, alphas_cumprod_for, sigma_for_alpha
from ..parameterization import canonical_prediction_type, window_start_coefficients
from .pipeline import run_pipeline
from ..scheduler import PerflowScheduler
from ..segments import BOUNDARY_TOLERANCE, Segments, Window
from ..settings import PerflowSettings

DataSource = Callable[[int, torch.Generator], torch.Tensor]
# teacher(z_start, window) -> z_end: the teacher's ODE solution across one window (unlike calibration's
# Teacher, which maps noise to the targets of every step).
WindowTeacher = Callable[[torch.Tensor, Window], torch.Tensor]

STUDENT_CONFIG_KEY = "student_config"
STUDENT_CLASS_KEY = "student_class"
STUDENT_TRAINING_KEY = "student_training"
# Held-out evaluation noise: `noise_for_seeds` seeds far from anything the trainer's generator draws.
# Noise seeds students are judged on while training: neither theta's fit seeds (0-127) nor the benchmark's (10000-10255).
VALIDATION_SEEDS = tuple(range(20_000, 20_256))
# The analytic teacher's RK4 grid: 4 steps per unit of log(sigma) land within ~1e-4 RMSE of the exact
# window end in every window of SD1.5 with K = 4, far below what a student can fit.
ANALYTIC_TEACHER_STEPS_PER_LOG_SIGMA = 4.0
# The prototype memory starts at a farthest-point selection from this many data samples per prototype.
PROTOTYPE_CANDIDATES_PER_PROTOTYPE = 8


# ------------------------------------------------------------------------------------------ windows
def training_windows(segments: Segments, alphas_cumprod: torch.Tensor) -> List[Window]:
    """Each segment as a `Window` from its start to its end (``t = t_start``, ``t_next = t_end``)."""
    windows = []
    for k in range(len(segments)):
        i_start, i_end = segments.alpha_indices(k)
        t_s, t_e = segments.starts[k], segments.ends[k]
        alpha_start, alpha_end = float(alphas_cumprod[i_start]), float(alphas_cumprod[i_end])
        windows.append(Window(k, t_s, t_e, t_s, t_e, alpha_start, alpha_end))
    return windows


def window_indices(segments: Segments, t: torch.Tensor) -> torch.Tensor:
    """The window of each time in ``t`` (a boundary belongs to the later window, as in sampling)."""
    scale = segments.num_train_timesteps
    return torch.tensor([segments.index_of(float(value) * scale) for value in t], dtype=torch.long)


def noise_to_window_start(x0: torch.Tensor, window: Window, generator: torch.Generator) -> torch.Tensor:
    """The DDPM marginal at the window start: ``sqrt(a_s) x0 + sqrt(1 - a_s) noise``."""
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    return math.sqrt(window.alpha_start) * x0 + math.sqrt(1.0 - window.alpha_start) * noise


# ------------------------------------------------------------------------------------------ targets
def interpolate_in_window(z_start: torch.Tensor, z_end: torch.Tensor, t: torch.Tensor, window: Window) -> torch.Tensor:
    """The point at time ``t`` on the straight line from ``z_start`` (at t_s) to ``z_end`` (at t_e)."""
    share = ((window.t_start - t) / (window.t_start - window.t_end)).to(z_start.dtype)
    return torch.lerp(z_start, z_end, share.view(-1, *([1] * (z_start.ndim - 1))))


def reflow_target(prediction_type: str, z_start: torch.Tensor, z_end: torch.Tensor, window: Window) -> torch.Tensor:
    """The raw network output that makes the PeRFlow step land on ``z_end`` from anywhere in the window.

    ``velocity``: the straight-line slope ``(z_e - z_s) / (t_e - t_s)``. ``diff_eps`` / ``ddim_eps``: the
    ``o`` with ``z_e = lambda_s z_s + eta_s o`` at the window start; the in-window coefficients
    (``window_end_coefficients``) are built so that the same ``o`` predicts ``z_e`` from every point of the line.
    """
    prediction_type = canonical_prediction_type(prediction_type)
    if prediction_type == "velocity":
        return (z_end - z_start) / (window.t_end - window.t_start)
    lam, eta = window_start_coefficients(prediction_type, window.alpha_start, window.alpha_end)
    return (z_end - lam * z_start) / eta


# ------------------------------------------------------------------------------------- data, teachers
def smoothed_digits_source(smoothing: float = DEFAULT_SMOOTHING) -> DataSource:
    """Clean samples of the analytic model's distribution: a random digit in [-1, 1] plus ``smoothing`` noise."""
    means = AnalyticDigitsDenoiser(smoothing=smoothing).data_means.to(torch.float32)

    def draw(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        picks = torch.randint(0, means.shape[0], (batch_size,), generator=generator)
        return means[picks] + smoothing * torch.randn((batch_size, *means.shape[1:]), generator=generator)

    return draw


class DDIMTeacher:
    """A frozen eps model followed with N deterministic DDIM steps from a window's start to its end.

    The steps are uniform in model timestep between ``t_s * T`` and ``t_e * T``; a model timestep ``tau`` has
    the signal level ``alpha_at_timestep(alphas_cumprod, tau)`` (``alphas_cumprod[tau - 1]``, interpolated),
    so the first and last levels are exactly the window's ``alpha_start`` and ``alpha_end``.

    Args:
        eps_model: called as ``eps_model(x, timestep)`` with a float timestep tensor ``[B]``; returns eps as a
            tensor or an object with ``.sample``.
        alphas_cumprod: the schedule (SD1.5's by default).
        steps: DDIM steps per window (the original uses 8-10).
    """

    def __init__(self, eps_model: Callable, alphas_cumprod: Optional[torch.Tensor] = None, steps: int = 8):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.eps_model = eps_model
        self.alphas_cumprod = alphas_cumprod_for() if alphas_cumprod is None else alphas_cumprod
        self.steps = int(steps)

    @torch.no_grad()
    def __call__(self, z_start: torch.Tensor, window: Window) -> torch.Tensor:
        scale = len(self.alphas_cumprod)
        taus = torch.linspace(window.t_start * scale, window.t_end * scale, self.steps + 1, dtype=torch.float64)
        x = z_start
        for tau, tau_next in zip(taus[:-1], taus[1:]):
            eps = _raw_output(self.eps_model(x, tau.to(x.dtype).expand(x.shape[0])))
            x = ddim_step(x, eps.to(x.dtype), self._alpha(tau), self._alpha(tau_next))
        return x

    def _alpha(self, tau: torch.Tensor) -> float:
        return float(alpha_at_timestep(self.alphas_cumprod, tau))


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha: float, alpha_next: float) -> torch.Tensor:
    """Deterministic DDIM (Song et al. 2021, eq. 12): keep eps, move x0's estimate to the next level."""
    x0 = (x - math.sqrt(1.0 - alpha) * eps) / math.sqrt(alpha)
    return math.sqrt(alpha_next) * x0 + math.sqrt(1.0 - alpha_next) * eps


class AnalyticODETeacher:
    """The exact probability-flow ODE of an `AnalyticDigitsDenoiser` over a window (``solve_probability_flow_ode``).

    Args:
        denoiser: the analytic model.
        steps_per_log_sigma: RK4 steps per unit of ``log(sigma)``; None uses the solver's ~1e-6 default grid.
            The default 4 is within ~1e-4 RMSE of it on SD1.5's windows and about 5x cheaper.
    """

    def __init__(
        self, denoiser: AnalyticDigitsDenoiser, steps_per_log_sigma: Optional[float] = ANALYTIC_TEACHER_STEPS_PER_LOG_SIGMA
    ):
        self.denoiser = denoiser
        self.steps_per_log_sigma = steps_per_log_sigma

    @torch.no_grad()
    def __call__(self, z_start: torch.Tensor, window: Window) -> torch.Tensor:
        z_end = solve_probability_flow_ode(
            self.denoiser, z_start, window.alpha_start, window.alpha_end, steps=self._steps(window)
        )
        return z_end.to(z_start.dtype)

    def _steps(self, window: Window) -> Optional[int]:
        if self.steps_per_log_sigma is None:
            return None
        span = abs(math.log(sigma_for_alpha(window.alpha_start) / sigma_for_alpha(window.alpha_end)))
        return max(1, math.ceil(self.steps_per_log_sigma * span))


def _raw_output(output: Union[torch.Tensor, object]) -> torch.Tensor:
    return output if torch.is_tensor(output) else output.sample


# ------------------------------------------------------------------------------------------ trainer
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


# ------------------------------------------------------------------------------------------ student
class ReflowStudent(ModelMixin, ConfigMixin):
    """A small PeRFlow student for tiny images: a residual MLP on the flattened image, FiLM-conditioned on t,
    optionally fed by a learned prototype memory.

    Called like a `UNet2DModel` (``model(sample, timestep).sample``), so it runs in `UnconditionalPipeline`
    with `PerflowScheduler`.

    Args:
        sample_size (`int`, defaults to 8): image side.
        in_channels (`int`, defaults to 1): input channels.
        out_channels (`int`, defaults to 1): output channels.
        hidden_size (`int`, defaults to 256): width of the residual stream.
        num_blocks (`int`, defaults to 3): residual blocks.
        mlp_ratio (`int`, defaults to 2): inner width of a block relative to ``hidden_size``.
        time_embedding_size (`int`, defaults to 64): width of the timestep embedding.
        num_prototypes (`int`, defaults to 0): size of the [`PrototypeMemory`] (0: a plain MLP).
        num_prototype_heads (`int`, defaults to 4): memory readouts per stage, each with its own t-dependent sharpness.
        num_memory_stages (`int`, defaults to 1): query points of the memory; stage j + 1 reads it at a learned
            combination of the input and stage j's readouts (a DDIM-like step inside the network).
        num_train_timesteps (`int`, defaults to 1000): T (the range of the timesteps the model sees).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 1,
        out_channels: int = 1,
        hidden_size: int = 256,
        num_blocks: int = 3,
        mlp_ratio: int = 2,
        time_embedding_size: int = 64,
        num_prototypes: int = 0,
        num_prototype_heads: int = 4,
        num_memory_stages: int = 1,
        num_train_timesteps: int = 1000,
    ):
        super().__init__()
        pixels = in_channels * sample_size * sample_size
        self.time_embedding = nn.Sequential(
            SinusoidalEmbedding(time_embedding_size),
            nn.Linear(time_embedding_size, time_embedding_size),
            nn.SiLU(),
            nn.Linear(time_embedding_size, time_embedding_size),
            nn.SiLU(),
        )
        self.memory = None
        if num_prototypes:
            self.memory = PrototypeMemory(
                num_prototypes, pixels, num_prototype_heads, num_memory_stages, time_embedding_size
            )
        readouts = num_prototype_heads * num_memory_stages if num_prototypes else 0
        self.input = nn.Linear(pixels * (1 + readouts), hidden_size)
        self.blocks = nn.ModuleList(
            [ResidualFiLMBlock(hidden_size, hidden_size * mlp_ratio, time_embedding_size) for _ in range(num_blocks)]
        )
        self.output = nn.Sequential(
            nn.LayerNorm(hidden_size), nn.Linear(hidden_size, out_channels * sample_size * sample_size)
        )
        # t-dependent gains on the input and on the memory readouts, added to the output: where the
        # target is (close to) a combination of z and prototype averages, the MLP only fits the rest.
        self.skip_gains = nn.Linear(time_embedding_size, 1 + readouts) if in_channels == out_channels else None
        if self.skip_gains is not None:
            nn.init.zeros_(self.skip_gains.weight)
            nn.init.zeros_(self.skip_gains.bias)

    def forward(
        self, sample: torch.Tensor, timestep: Union[float, int, torch.Tensor], return_dict: bool = True, **unused
    ) -> Union[UNet2DOutput, Tuple[torch.Tensor]]:
        """The raw output for ``sample`` ``[B, C, H, W]`` at model timestep(s) ``timestep`` (number or ``[B]``)."""
        batch = sample.shape[0]
        timesteps = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device).reshape(-1).expand(batch)
        embedding = self.time_embedding(timesteps)
        flat = sample.reshape(batch, -1).to(self.input.weight.dtype)
        sources = [flat] if self.memory is None else [flat, *self.memory(flat, embedding).unbind(1)]
        hidden = self.input(torch.cat(sources, dim=1))
        for block in self.blocks:
            hidden = block(hidden, embedding)
        output = self.output(hidden)
        if self.skip_gains is not None:
            gains = self.skip_gains(embedding)
            output = output + sum(gains[:, j : j + 1] * source for j, source in enumerate(sources))
        shape = (batch, self.config.out_channels, self.config.sample_size, self.config.sample_size)
        output = output.reshape(shape).to(sample.dtype)
        return UNet2DOutput(sample=output) if return_dict else (output,)

    @torch.no_grad()
    def initialise_prototypes(self, samples: torch.Tensor) -> None:
        """Start the prototype memory at the given clean samples (one per prototype), like a k-means start."""
        if self.memory is None:
            raise ValueError("this student has no prototype memory (num_prototypes=0)")
        self.memory.prototypes.copy_(samples.reshape(self.memory.prototypes.shape))


class PrototypeMemory(nn.Module):
    """Learned prototypes ``p_i`` read by soft nearest-prototype attention, at one or more query points.

    A readout of a flattened query q with sharpness ``(a, b)`` is ``sum_i softmax_i(a q.p_i - b |p_i|^2 / 2) p_i``.
    With ``a = sqrt(alpha) / v`` and ``b = alpha / v`` it is the exact posterior mean of a Gaussian mixture with
    means ``p_i`` (see `AnalyticDigitsDenoiser`). Every stage has ``num_heads`` readouts whose sharpness is a
    function of t (starting log-spaced from ``e^-1`` to ``e^3``); stage 1 queries the input x, stage j + 1 the
    point ``c_0(t) x + sum_h c_h(t) r_h`` built from stage j's readouts ``r_h`` (starting at x).
    """

    def __init__(self, num_prototypes: int, size: int, num_heads: int, num_stages: int, embedding_size: int):
        super().__init__()
        self.prototypes = nn.Parameter(0.5 * torch.randn(num_prototypes, size))
        self.log_sharpness = nn.ModuleList([self._sharpness_layer(embedding_size, num_heads) for _ in range(num_stages)])
        self.query_gains = nn.ModuleList([self._query_layer(embedding_size, num_heads) for _ in range(num_stages - 1)])

    @staticmethod
    def _sharpness_layer(embedding_size: int, num_heads: int) -> nn.Linear:
        layer = nn.Linear(embedding_size, 2 * num_heads)
        nn.init.zeros_(layer.weight)
        with torch.no_grad():
            layer.bias.copy_(torch.linspace(-1.0, 3.0, num_heads).repeat(2))
        return layer

    @staticmethod
    def _query_layer(embedding_size: int, num_heads: int) -> nn.Linear:
        layer = nn.Linear(embedding_size, 1 + num_heads)
        nn.init.zeros_(layer.weight)
        with torch.no_grad():
            layer.bias.copy_(torch.eye(1, 1 + num_heads)[0])
        return layer

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """All readouts, ``[B, num_stages * num_heads, size]``."""
        query, readouts = x, []
        for stage, sharpness_layer in enumerate(self.log_sharpness):
            readout = self.read(query, sharpness_layer(embedding))
            readouts.append(readout)
            if stage < len(self.query_gains):
                gains = self.query_gains[stage](embedding)
                query = gains[:, :1] * x + (gains[:, 1:, None] * readout).sum(dim=1)
        return torch.cat(readouts, dim=1)

    def read(self, query: torch.Tensor, log_sharpness: torch.Tensor) -> torch.Tensor:
        """One readout per head, ``[B, H, size]``."""
        a, b = log_sharpness.clamp(-8.0, 8.0).exp().unsqueeze(-1).chunk(2, dim=1)  # [B, H, 1] each
        half_norms = 0.5 * self.prototypes.pow(2).sum(dim=1)
        logits = a * (query @ self.prototypes.T).unsqueeze(1) - b * half_norms
        return torch.softmax(logits, dim=-1) @ self.prototypes


def farthest_point_selection(samples: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows of ``samples`` chosen greedily, each the farthest from those chosen before (Gonzalez 1985).

    Every well-separated cluster of the samples gets a row before any cluster gets a second one.
    """
    flat = samples.reshape(samples.shape[0], -1)
    if count > flat.shape[0]:
        raise ValueError(f"cannot choose {count} rows from {flat.shape[0]} samples")
    chosen = [0]
    distances = (flat - flat[0]).pow(2).sum(dim=1)
    for _ in range(count - 1):
        index = int(distances.argmax())
        chosen.append(index)
        distances = torch.minimum(distances, (flat - flat[index]).pow(2).sum(dim=1))
    return samples[chosen]


class SinusoidalEmbedding(nn.Module):
    """The transformer / DDPM sinusoidal embedding of a (float) timestep."""

    def __init__(self, size: int, max_period: float = 10_000.0):
        super().__init__()
        half = size // 2
        self.register_buffer("frequencies", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        angles = timesteps.float()[:, None] * self.frequencies[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResidualFiLMBlock(nn.Module):
    """``h + MLP(LayerNorm(h) * (1 + scale) + shift)``, with scale and shift computed from the time embedding."""

    def __init__(self, size: int, inner_size: int, embedding_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(size, elementwise_affine=False)
        self.modulation = nn.Linear(embedding_size, 2 * size)
        self.mlp = nn.Sequential(nn.Linear(size, inner_size), nn.SiLU(), nn.Linear(inner_size, size))

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(embedding).chunk(2, dim=1)
        return hidden + self.mlp(self.norm(hidden) * (1 + scale) + shift)


STUDENT_CLASSES: Dict[str, type] = {"ReflowStudent": ReflowStudent}


# ------------------------------------------------------------------------------------------ files
def save_student(
    path: Union[str, Path],
    student: ModelMixin,
    settings: PerflowSettings,
    training: Optional[Dict[str, object]] = None,
) -> None:
    """One .safetensors file: the student's weights, its class and config (metadata) and the ``perflow.*`` settings.

    Args:
        path: the file to write.
        student: a network of a class in ``STUDENT_CLASSES``.
        settings: the PeRFlow sampling settings (prediction type, segments, theta).
        training: how it was trained (JSON-ready), kept in the ``student_training`` metadata.
    """
    class_name = type(student).__name__
    if class_name not in STUDENT_CLASSES:
        raise ValueError(f"unknown student class {class_name}; known: {', '.join(STUDENT_CLASSES)}")
    metadata = {
        "format": "pt",
        STUDENT_CLASS_KEY: class_name,
        STUDENT_CONFIG_KEY: json.dumps(_plain_config(student), sort_keys=True),
    }
    if training is not None:
        metadata[STUDENT_TRAINING_KEY] = json.dumps(training, sort_keys=True)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in student.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        weights_file = Path(folder) / "weights.safetensors"
        save_file(weights, str(weights_file), metadata=metadata)
        write_perflow_checkpoint(weights_file, path, settings)


def load_student(path: Union[str, Path]) -> Tuple[ModelMixin, PerflowSettings]:
    """Rebuild a student saved by `save_student` (or ``perflow train-student``).

    Returns:
        ``(model, settings)``: the network in eval mode and the file's [`PerflowSettings`]
        (``PerflowScheduler(**settings.scheduler_kwargs())`` samples it).
    """
    settings = read_perflow_settings(path)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        weights = {key: handle.get_tensor(key) for key in handle.keys() if not key.startswith(PERFLOW_PREFIXES)}
    if STUDENT_CONFIG_KEY not in metadata:
        raise ValueError(f"{path} has no {STUDENT_CONFIG_KEY!r} metadata; it was not written by save_student")
    class_name = metadata.get(STUDENT_CLASS_KEY, "ReflowStudent")
    if class_name not in STUDENT_CLASSES:
        raise ValueError(f"{path}: unknown student class {class_name!r}; known: {', '.join(STUDENT_CLASSES)}")
    model = STUDENT_CLASSES[class_name].from_config(json.loads(metadata[STUDENT_CONFIG_KEY]))
    model.load_state_dict(weights, strict=True)
    return model.eval(), settings


def student_training(path: Union[str, Path]) -> Optional[Dict[str, object]]:
    """How a student file was trained (its ``student_training`` metadata), or None if it does not say."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        text = (handle.metadata() or {}).get(STUDENT_TRAINING_KEY)
    return json.loads(text) if text else None


def student_smoothing(path: Union[str, Path]) -> float:
    """The smoothing of the analytic teacher a student file was trained from (its training metadata)."""
    smoothing = (student_training(path) or {}).get("smoothing")
    if smoothing is None:
        raise ValueError(f"{path} does not record its teacher's smoothing (student_training metadata); pass it explicitly")
    return float(smoothing)


def _plain_config(model: ModelMixin) -> Dict[str, object]:
    return {key: value for key, value in dict(model.config).items() if not key.startswith("_")}


# ------------------------------------------------------------------------------------------ evaluation
def perflow_pipeline_samples(
    model: nn.Module, settings: PerflowSettings, noise: torch.Tensor, num_inference_steps: int = 4
) -> torch.Tensor:
    """Samples of ``model`` from ``noise`` through ``PerflowScheduler(settings)`` in the pipeline (float32, data
    space, at ``alphas_cumprod[0]``)."""
    return run_pipeline(model, PerflowScheduler(**settings.scheduler_kwargs()), noise, num_inference_steps)


def exact_ode_samples(denoiser: AnalyticDigitsDenoiser, noise: torch.Tensor) -> torch.Tensor:
    """The exact probability-flow ODE solution from ``alphas_cumprod[-1]`` to ``alphas_cumprod[0]`` (float64)."""
    alphas = denoiser.alphas_cumprod
    return solve_probability_flow_ode(denoiser, noise.double(), float(alphas[-1]), float(alphas[0]))


@dataclass
class DigitsStudentReport:
    """4-step (and 8-step) RMSE of a student and of the teacher's own PeRFlow sampling against the exact ODE.

    Args:
        seeds: the noise seeds (`noise_for_seeds`; by default `VALIDATION_SEEDS`).
        student: ``{steps: RMSE}`` of the student's PeRFlow samples.
        teacher: ``{steps: RMSE}`` of PeRFlow (``ddim_eps``) applied to the analytic teacher itself.
    """

    seeds: List[int]
    student: Dict[int, float]
    teacher: Dict[int, float]


def default_digits_student(
    num_prototypes: int = 2048, num_memory_stages: int = 2, num_train_timesteps: int = 1000
) -> ReflowStudent:
    """The shipped student's architecture: width 256, 2 residual blocks, a prototype memory read with 4 heads
    per stage (about 0.9M parameters with the defaults)."""
    return ReflowStudent(
        hidden_size=256,
        num_blocks=2,
        num_prototypes=num_prototypes,
        num_prototype_heads=4,
        num_memory_stages=num_memory_stages,
        num_train_timesteps=num_train_timesteps,
    )


def train_digits_student(
    config: ReflowConfig,
    smoothing: float = DEFAULT_SMOOTHING,
    student: Optional[ReflowStudent] = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
    initialise_prototypes: bool = True,
) -> Tuple[ReflowStudent, ReflowHistory]:
    """Piecewise reflow of the analytic digits model (exact ODE teacher) into a student.

    A student built here (``student=None``: `default_digits_student`) is initialised from
    ``torch.manual_seed(config.seed)``; the prototypes of any student with a memory start at a
    `farthest_point_selection` of data drawn with seed ``config.seed + 1`` unless ``initialise_prototypes`` is
    False (to go on training a trained student). The run is then a function of
    ``config`` and the initial weights (on a fixed CPU thread count).

    Returns:
        ``(student, history)``.
    """
    if student is None:
        torch.manual_seed(config.seed)
        student = default_digits_student(num_train_timesteps=config.num_train_timesteps)
    data_source = smoothed_digits_source(smoothing)
    if initialise_prototypes and getattr(student, "memory", None) is not None:
        count = student.memory.prototypes.shape[0]
        candidates = data_source(PROTOTYPE_CANDIDATES_PER_PROTOTYPE * count, torch.Generator().manual_seed(config.seed + 1))
        student.initialise_prototypes(farthest_point_selection(candidates, count))
    teacher = AnalyticODETeacher(AnalyticDigitsDenoiser(smoothing=smoothing))
    history = PiecewiseReflowTrainer(config).train(student, data_source, teacher, log_every=log_every, log=log)
    return student, history


@torch.no_grad()
def evaluate_digits_student(
    student: nn.Module,
    settings: PerflowSettings,
    smoothing: float = DEFAULT_SMOOTHING,
    seeds: Sequence[int] = VALIDATION_SEEDS,
    steps: Sequence[int] = (4, 8),
) -> DigitsStudentReport:
    """RMSE against the exact probability-flow ODE solution of the analytic teacher (same noise, same end level)."""
    teacher = AnalyticDigitsDenoiser(smoothing=smoothing)
    noise = noise_for_seeds(seeds)
    exact = exact_ode_samples(teacher, noise)
    teacher_settings = PerflowSettings(segments=settings.segments, prediction_type="ddim_eps")
    return DigitsStudentReport(
        seeds=list(seeds),
        student={n: rmse(perflow_pipeline_samples(student, settings, noise, n), exact) for n in steps},
        teacher={n: rmse(perflow_pipeline_samples(teacher, teacher_settings, noise, n), exact) for n in steps},
    )
