"""`PerflowScheduler`: the PeRFlow sampler as a diffusers scheduler."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from .noise_schedule import _betas_for
from .parameterization import PREDICTION_TYPES, path_noise_scales
from .sampling import LoopChecks, SamplingPlan
from .segments import SegmentStep
from .segments import Segments
from .settings import CONFIG_KEYS, FIELD_NAMES, FORMAT_VERSION, SCHEDULER_CLASS_NAMES, PerflowSettings
from .solver import StepCoefficients, StepResult, apply_step
from .theta import theta_rows_like, theta_to_list

logger = logging.getLogger(__name__)

LEGACY_THETA_FILES = ("scheduler_state.safetensors", "pytorch_model.bin")


@dataclass
class PerflowSchedulerOutput(BaseOutput):
    """Output of [`PerflowScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`):
            The sample at the next timestep; feed it to the model next.
        pred_original_sample (`torch.Tensor`):
            An estimate of the clean sample, for previews: the x0 of the DDIM trajectory through the
            current window's predicted start and end (the original PeRFlow returns `None` here).
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class PerflowScheduler(SchedulerMixin, ConfigMixin):
    """Piecewise Rectified Flow (Yan et al., NeurIPS 2024) sampling, with a learned per-segment correction.

    The probability-flow path from noise (t = 1) to data (t = 0) is cut into K segments (time windows);
    inside each the model's prediction defines a straight line that is followed with Euler steps. With
    `theta = 0` and uniform segments this reproduces the original `PeRFlowScheduler` step for step.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            Number of training timesteps T; the model sees timesteps `t * T`.
        segments (`int`, *optional*, defaults to 4):
            Number of uniform segments K (ignored in favour of `segment_boundaries` when those are given).
        segment_boundaries (`List[float]`, *optional*):
            Strictly decreasing training timesteps from T (or T - 1, which means the same) to 0, e.g.
            `[999, 750, 500, 250, 0]`.
        theta_init (`List[List[float]]`, *optional*):
            The per-segment correction theta, `[K]` or `[K, P]` with P <= 3 (see `perflow_core.theta`). None means 0.
        learn_theta (`bool`, defaults to `False`):
            Make `theta` a tensor that requires grad, so that losses on the samples can be back-propagated
            into it.
        prediction_type (`str`, defaults to `"ddim_eps"`):
            `ddim_eps`, `diff_eps` or `velocity`; `epsilon` is the original's pre-2024 name of `diff_eps`
            and `v_prediction` maps to `velocity`.
        beta_start (`float`, defaults to 0.00085), beta_end (`float`, defaults to 0.012),
        beta_schedule (`str`, defaults to `"scaled_linear"`), trained_betas (*optional*):
            The training noise schedule, as in diffusers' DDPM scheduler.
        num_time_windows (`int`, *optional*):
            The original's name for `segments` (kept so original configs load).
        t_noise (`float`, defaults to 1), t_clean (`float`, defaults to 0):
            The original's path ends; only 1 and 0 are supported.
        set_alpha_to_one (`bool`, defaults to `False`):
            Accepted for compatibility with the original's config; like the original, PeRFlow does not use it.
        version (`str`, defaults to `"0.1"`):
            Format version of the PeRFlow settings.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        segments: Optional[int] = None,
        segment_boundaries: Optional[List[float]] = None,
        theta_init: Optional[Union[List[float], List[List[float]]]] = None,
        learn_theta: bool = False,
        prediction_type: str = "ddim_eps",
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        num_time_windows: Optional[int] = None,
        t_noise: float = 1.0,
        t_clean: float = 0.0,
        set_alpha_to_one: bool = False,
        version: str = FORMAT_VERSION,
        img2img_start: str = "original",
    ):
        if not t_clean < t_noise:
            raise ValueError(f"t_clean must be below t_noise (the original's path ends); got t_noise={t_noise}, t_clean={t_clean}")
        self.settings = PerflowSettings.from_config(
            {
                "num_train_timesteps": num_train_timesteps,
                "segments": segments,
                "segment_boundaries": segment_boundaries,
                "theta_init": theta_init,
                "prediction_type": prediction_type,
                "version": version,
                "num_time_windows": num_time_windows,
                "t_clean": t_clean,
                "img2img_start": img2img_start,
            }
        )
        self.prediction_type = self.settings.prediction_type
        self.betas = _betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.theta = self.settings.theta
        if learn_theta:
            self.theta.requires_grad_(True)
        if trained_betas is not None:
            self.register_to_config(trained_betas=[float(b) for b in np.asarray(trained_betas).ravel()])
        # A canonical prediction_type: the original class reads saved configs.
        self.register_to_config(theta_init=None if theta_init is None else theta_to_list(self.theta), prediction_type=self.prediction_type)
        self._take_segments(self.settings)
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        self._previous: Optional[Tuple[int, torch.Tensor]] = None
        self._run_coefficients: Optional[List[Tuple[StepCoefficients, StepCoefficients]]] = None
        self._checks = LoopChecks()

    @classmethod
    def from_config(cls, config: Union[Dict[str, Any], Any] = None, return_unused_kwargs: bool = False, **kwargs):
        """Like [`ConfigMixin.from_config`], with the original's rules for what a config may carry over:

        - `prediction_type` written in another scheduler class's config (`epsilon`, `v_prediction`, ...) is not a
          PeRFlow parameterisation: pass one (`prediction_type="diff_eps"` etc.) or a ValueError says which. A
          PeRFlow config's legacy `epsilon` is `diff_eps`.
        - A number of segments passed here (`num_time_windows=` or `segments=`) wins over the stored one; stored
          boundaries and theta that do not fit it are dropped with a warning.
        - The seed format's `{"class": "PerflowScheduler", ...}` is read too.
        """
        config = dict(config or {})
        if "class" in config:
            named = config.pop("class")
            if named != cls.__name__:
                raise ValueError(f"config 'class' is {named!r}; this loader reads {cls.__name__!r} configs")
        _check_foreign_prediction_type(config, kwargs)
        _let_passed_segment_count_win(config, kwargs)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    # ----------------------------------------------------------------------------------------- theta
    def set_theta(self, theta: Any) -> None:
        """Replace theta (validated: `[K]` or `[K, P]`, finite) and record it in the config."""
        self.settings = self.settings.replace(theta=theta)
        self.theta = self.settings.theta
        if self.config.learn_theta:
            self.theta.requires_grad_(True)
        self._run_coefficients = None
        self._checks = LoopChecks()
        self.register_to_config(theta_init=theta_to_list(self.theta))

    def perflow_settings(self) -> PerflowSettings:
        """This scheduler's segments, parameterisation and theta (as learned so far) as [`PerflowSettings`]."""
        return self.settings.replace(theta=self.theta.detach())

    def calibrate(
        self,
        model_fn: Callable[[torch.Tensor, float], torch.Tensor],
        fit_noise: torch.Tensor,
        holdout_noise: torch.Tensor,
        num_inference_steps: int = 4,
        teacher_multiplier: int = 8,
        teacher: Optional[Callable[[torch.Tensor], List[torch.Tensor]]] = None,
        fit_boundaries: bool = False,
        teacher_solver: str = "perflow",
        progress: Optional[Callable[[int, int], None]] = None,
    ):
        """Fit theta (and with `fit_boundaries` the segment boundaries) for a model and keep it (see
        `perflow_core.calibration`).

        Args:
            model_fn (`Callable`): `model_fn(sample, timestep) -> raw model output`, with conditioning and
                classifier-free guidance folded in (see `perflow_core.calibration.diffusers_model_fn`).
            fit_noise (`torch.Tensor`): initial noise of the samples theta is fitted on.
            holdout_noise (`torch.Tensor`): other noise, only for the before/after report.
            num_inference_steps (`int`): the step count theta is fitted for.
            teacher_multiplier (`int`): the default teacher is this scheduler's own flow at this many times the steps.
            teacher: or any `teacher(noise) -> states at every step end`.
            fit_boundaries (`bool`): also learn the time grid, one segment per step (`ddim_eps` only; a
                PeRFlow-trained model keeps its trained segments unless this is asked for).
            teacher_solver (`str`): `perflow` or `dpmpp_2m` (a second-order teacher at the same calls, `ddim_eps`).
            progress: `progress(calls_done, calls_planned)` before every model call; raise from it to stop.

        Returns:
            `CalibrationReport` with theta and the held-out errors before and after.
        """
        from .calibration import calibrate_theta

        report = calibrate_theta(
            model_fn, self.perflow_settings(), num_inference_steps, self.alphas_cumprod, fit_noise, holdout_noise, teacher, teacher_multiplier,
            fit_boundaries=fit_boundaries, teacher_solver=teacher_solver, progress=progress,
        )
        if report.settings.segment_boundaries != self.settings.segment_boundaries:
            self._take_segments(report.settings.replace(theta=None))
        self.set_theta(report.theta)
        return report

    def _take_segments(self, settings: PerflowSettings) -> None:
        """Use the segments of ``settings`` (at construction, or learned by calibration) and record them in the config,
        ``num_time_windows`` as an integer as the original class reads it; any grid set before is dropped."""
        self.settings = settings
        self.segments = settings.build_segments()
        self.time_windows = TimeWindows(self.segments)
        self.timesteps: Optional[torch.Tensor] = None
        self.num_inference_steps: Optional[int] = None
        self._plan: Optional[SamplingPlan] = None
        config = settings.to_config()
        self.register_to_config(segments=config["segments"], num_time_windows=config["segments"], segment_boundaries=config["segment_boundaries"])

    # ----------------------------------------------------------------------------------- time steps
    @property
    def step_index(self) -> Optional[int]:
        """Index of the next step in `timesteps` (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """First step index, set by img2img pipelines through `set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start sampling at `timesteps[begin_index]` (diffusers' img2img pipelines call this)."""
        self._begin_index = begin_index

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        timesteps: Optional[List[int]] = None,
        sigmas: Optional[List[float]] = None,
    ) -> None:
        """Set the timesteps of the sampling loop.

        Args:
            num_inference_steps (`int`, *optional*):
                Number of model calls. Raised to the number of segments K (with a warning) if smaller;
                segment k gets `n // K` steps and the first `n % K` segments one more, spaced like the original.
            device (`str` or `torch.device`, *optional*):
                Where to put `timesteps`.
            timesteps (`List[int]`, *optional*):
                Explicit strictly decreasing integer timesteps in (0, T] instead of `num_inference_steps`.
            sigmas:
                Not supported: PeRFlow steps in time windows, not on a sigma grid.
        """
        if sigmas is not None:
            raise ValueError("PerflowScheduler does not take `sigmas`; pass `num_inference_steps` or `timesteps`")
        self._check_schedule_length()
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of `num_inference_steps` or `timesteps`")
        if timesteps is not None:
            grid = _validate_timesteps(timesteps, self.config.num_train_timesteps)
            self._plan = SamplingPlan.for_timesteps(self.settings, grid.tolist(), self.alphas_cumprod)
        else:
            self._plan = SamplingPlan.for_steps(self.settings, num_inference_steps, self.alphas_cumprod, "num_inference_steps")
            grid = np.asarray(self._plan.timesteps, dtype=np.int64)
        self.timesteps = torch.from_numpy(grid).to(device)
        self.num_inference_steps = len(grid)
        self._step_index = None
        self._begin_index = None
        self._previous = None
        self._run_coefficients = None if self.theta.requires_grad else self._plan.coefficients(self.theta, self.theta)
        self._checks = LoopChecks()

    def _check_schedule_length(self) -> None:
        if len(self.alphas_cumprod) != self.config.num_train_timesteps:
            raise ValueError(
                f"trained_betas has {len(self.alphas_cumprod)} entries; it needs num_train_timesteps="
                f"{self.config.num_train_timesteps} to sample"
            )

    def _step_at(self, timestep: float, next_timestep: float) -> SegmentStep:
        return self.segments.step_at(float(timestep), float(next_timestep), self.alphas_cumprod)

    def index_for_timestep(self, timestep: Union[int, torch.Tensor], schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """Position of `timestep` in the schedule; -1 when it is not on it."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        matches = (schedule == _as_number(timestep)).nonzero()
        return int(matches[0]) if len(matches) else -1

    def _locate(self, timestep: Union[int, float, torch.Tensor]) -> Tuple[int, SegmentStep]:
        """The step index and `SegmentStep` for `timestep`: the expected next step, else looked up by value.

        A timestep on an accelerator is not read (that would wait for the device every step): once the first
        step has placed the run, the expected next step is taken, as diffusers' own schedulers do."""
        steps = self._plan.steps
        if self._step_index is not None and self._step_index < len(steps) and _on_accelerator(timestep):
            return self._step_index, steps[self._step_index]
        t = _as_number(timestep)
        on_schedule = self._plan.timesteps.index(t) if t in self._plan.timesteps else -1
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else max(on_schedule, 0)
        index = self._step_index
        if index < len(steps) and self._plan.timesteps[index] == t:
            return index, steps[index]
        if on_schedule >= 0:
            return on_schedule, steps[on_schedule]
        later = self.timesteps[self.timesteps < t]
        return -1, self._step_at(t, float(later[0]) if len(later) else 0.0)

    # ------------------------------------------------------------------------------------------ step
    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        """PeRFlow feeds the sample as it is."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
        eta: float = 0.0,
        use_clipped_model_output: Optional[bool] = None,
    ) -> Union[PerflowSchedulerOutput, Tuple]:
        """Advance the sample from `timestep` to the next timestep of the schedule (0 after the last).

        Args:
            model_output (`torch.Tensor`): the raw output of the model at (`sample`, `timestep`).
            timestep (`int` or `torch.Tensor`): the current timestep, normally `timesteps[step_index]`.
            sample (`torch.Tensor`): the current sample.
            generator: unused (the step is deterministic); accepted for pipeline compatibility.
            return_dict (`bool`, defaults to `True`): return a [`PerflowSchedulerOutput`] rather than a tuple.
            eta (`float`, defaults to 0): DDIM's stochasticity, passed by `DDIMPipeline`; PeRFlow is
                deterministic, so only 0 is accepted.
            use_clipped_model_output: passed by `DDIMPipeline`; PeRFlow does not clip, so it has no effect.

        Returns:
            [`PerflowSchedulerOutput`] or `tuple` `(prev_sample, pred_original_sample)`.
        """
        if self.timesteps is None:
            raise ValueError("call `set_timesteps` before `step`")
        if eta:
            raise ValueError(f"eta must be 0 (PeRFlow sampling is deterministic); got eta={eta}")
        index, place = self._locate(timestep)
        previous_output = self._previous[1] if self._previous is not None and self._previous[0] == index - 1 >= 0 else None
        coefficients = self._coefficients(index, place, sample, previous_output is not None)
        next_sample, fell_back = apply_step(coefficients, model_output, sample, previous_output)
        if index < 0:  # off the schedule: checked on the spot
            LoopChecks.check_now(index, model_output, fell_back, place, _as_number(timestep))
        self._checks.record(index, model_output, fell_back)
        if index == len(self._plan) - 1:
            checks, self._checks = self._checks, LoopChecks()
            checks.raise_or_warn(self._plan)
        self._previous = (index, model_output)
        self._step_index = index + 1 if index >= 0 else self._step_index
        prev_sample = next_sample.to(sample.dtype)
        pred_original = StepResult(next_sample, sample, model_output, coefficients).pred_original_sample.to(sample.dtype)
        if not return_dict:
            return (prev_sample, pred_original)
        return PerflowSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original)

    def _coefficients(self, index: int, place: SegmentStep, sample: torch.Tensor, has_previous: bool) -> StepCoefficients:
        """The step's coefficients, computed once per run for the schedule's steps; a theta that learns is taken
        fresh every step, so each run builds its own graph."""
        if index < 0 or self.theta.requires_grad:
            row = theta_rows_like(self.theta, sample)[place.index]
            return StepCoefficients.of(self.prediction_type, place, row, has_previous)
        if self._run_coefficients is None:
            self._run_coefficients = self._plan.coefficients(sample, self.theta)
        return self._run_coefficients[index][has_previous]

    # ------------------------------------------------------------------------------------- add_noise
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Noise clean samples for a start at `timesteps` (img2img).

        By default (`img2img_start="original"`) this is the original's: the DDPM marginal
        `sqrt(a) x0 + sqrt(1 - a) noise` with `a = alphas_cumprod[timestep - 1]`, inside a segment too. With
        `img2img_start="straight_path"` a start inside a segment is put on the straight line between the
        segment's start and end, both noised with the same x0 and noise (the line a PeRFlow model was trained
        on); at a segment start both are the same.
        """
        steps = torch.as_tensor(timesteps).flatten().tolist()
        if len(steps) == 1:
            steps = steps * original_samples.shape[0]
        if len(steps) != original_samples.shape[0]:
            raise ValueError(f"timesteps has {len(steps)} entries for a batch of {original_samples.shape[0]}")
        scales = [self._path_scales(float(t)) for t in steps]
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        signal = torch.tensor([s for s, _ in scales], dtype=original_samples.dtype, device=original_samples.device)
        noise_scale = torch.tensor([n for _, n in scales], dtype=original_samples.dtype, device=original_samples.device)
        return signal.view(shape) * original_samples + noise_scale.view(shape) * noise

    def _path_scales(self, timestep: float) -> Tuple[float, float]:
        if self.settings.img2img_start == "straight_path":
            return path_noise_scales(self._step_at(timestep, 0))
        alpha = float(self.alphas_cumprod[max(int(timestep) - 1, 0)])
        return alpha**0.5, (1 - alpha) ** 0.5

    # ----------------------------------------------------------------------------------- state dict
    def state_dict(self) -> Dict[str, Any]:
        """PeRFlow settings and config: `{"perflow": {theta, segments, segment_boundaries, version, prediction_type}, "config": {...}}`."""
        return {"perflow": self.perflow_settings().values(), "config": {k: v for k, v in self.config.items() if not k.startswith("_")}}

    def load_state_dict(self, state_dict: Dict[str, Any], strict: bool = True) -> None:
        """Load settings from [`state_dict`]'s format.

        With `strict=True` anything unexpected raises; with `strict=False` what matches is loaded and
        the rest is logged. The schedule is rebuilt, so call `set_timesteps` again afterwards.
        """
        unexpected = [f"'{k}'" for k in state_dict if k not in ("perflow", "config")]
        config = dict(self.config)
        known = {k for k in config if not k.startswith("_")}
        for key, value in state_dict.get("config", {}).items():
            if key in known:
                config[key] = value
            else:
                unexpected.append(f"config.{key}")
        perflow = state_dict.get("perflow", {})
        unexpected += [f"perflow.{k}" for k in perflow if k not in FIELD_NAMES]
        if unexpected:
            if strict:
                raise KeyError(f"unexpected keys in the PerflowScheduler state dict: {', '.join(unexpected)}")
            logger.warning("PerflowScheduler.load_state_dict ignored: %s", ", ".join(unexpected))
        config.update(_config_entries(perflow))
        self.__init__(**{k: v for k, v in config.items() if k in known})

    # ------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike, None] = None, subfolder: Optional[str] = None, **kwargs):
        """Like [`SchedulerMixin.from_pretrained`]; also reads theta from a legacy
        `scheduler_state.safetensors` / `pytorch_model.bin` beside a local `scheduler_config.json`
        when the config has none (pickles only with `weights_only=True`)."""
        scheduler = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        if scheduler.config.theta_init is None and os.path.isdir(folder):
            scheduler._load_legacy_theta(folder)
        return scheduler

    def _load_legacy_theta(self, folder: str) -> None:
        from .checkpoint import perflow_keys_present, read_perflow_settings

        for name in LEGACY_THETA_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and "perflow.theta" in perflow_keys_present(path):
                self.set_theta(read_perflow_settings(path).theta)
                logger.info("PerflowScheduler: theta read from legacy file %s", path)
                return

    @classmethod
    def from_single_file(cls, path: Union[str, os.PathLike], **overrides) -> "PerflowScheduler":
        """A scheduler configured from a single-file checkpoint's `perflow.*` keys and metadata
        (see `perflow_core.checkpoint`); `overrides` are config values that take precedence."""
        from .checkpoint import read_perflow_settings

        settings = read_perflow_settings(path)
        return cls(**{**settings.to_config(), **overrides})

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ the original's public attributes
    def get_window_alpha(self, timepoints: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The original's window geometry at times ``timepoints`` (t in [0, 1], a 0-d or 1-D tensor), as its training
        scripts use it: ``(t_win_start, t_win_end, t_win_len, t_interval, gamma_s_e, alphas_cumprod_start,
        alphas_cumprod_end)``, each shaped like ``timepoints``."""
        t_start, t_end = self.time_windows.lookup_window(timepoints)
        scale = self.config.num_train_timesteps
        alpha_start = self.alphas_cumprod[(t_start * scale - 1).long()]
        alpha_end = self.alphas_cumprod[torch.clamp((t_end * scale - 1).long(), min=0)]
        return t_start, t_end, t_end - t_start, timepoints - t_start, (alpha_start / alpha_end) ** 0.5, alpha_start, alpha_end


class TimeWindows:
    """The original's ``time_windows`` attribute (its ``Time_Windows``), over this scheduler's segments: its training
    scripts call ``lookup_window``."""

    def __init__(self, segments: Segments):
        self.window_starts = list(segments.starts)
        self.window_ends = list(segments.ends)
        self.precision = 1.0 / segments.num_train_timesteps

    def get_window(self, timepoint: Any) -> Tuple[float, float]:
        """The segment of a time t (a point on a boundary, or within a tenth of a timestep above it, is in the later one)."""
        index = 0
        while timepoint - 0.1 * self.precision <= self.window_ends[index]:
            index += 1
        return self.window_starts[index], self.window_ends[index]

    def lookup_window(self, timepoint: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(t_start, t_end)`` of the segments of a 0-d or 1-D tensor of times, shaped like it."""
        if timepoint.dim() == 0:
            start, end = self.get_window(timepoint)
            return torch.ones_like(timepoint) * start, torch.ones_like(timepoint) * end
        pairs = [self.get_window(t) for t in timepoint]
        return timepoint.new_tensor([p[0] for p in pairs]), timepoint.new_tensor([p[1] for p in pairs])


RELEASED_PREDICTION_TYPES = (
    "the SD1.5 releases (hansyan/perflow-sd15-*) use diff_eps, SD2.1-v (hansyan/perflow-sd21-artius) velocity, "
    "SDXL (hansyan/perflow-sdxl-*) ddim_eps"
)


def _check_foreign_prediction_type(config: Dict[str, Any], kwargs: Dict[str, Any]) -> None:
    """Refuse a prediction_type that another scheduler class's config states (not one diffusers filled in)."""
    named = config.get("_class_name")
    stated = config.get("prediction_type") is not None and "prediction_type" not in config.get("_use_default_values", [])
    if named in (None, *SCHEDULER_CLASS_NAMES) or not stated or kwargs.get("prediction_type") is not None:
        return
    raise ValueError(
        f"prediction_type {config['prediction_type']!r} comes from a {named} config and is not a PeRFlow "
        f"parameterisation; pass prediction_type= one of {', '.join(PREDICTION_TYPES)} ({RELEASED_PREDICTION_TYPES})"
    )


def _let_passed_segment_count_win(config: Dict[str, Any], kwargs: Dict[str, Any]) -> None:
    """A segment count passed to from_config/from_pretrained replaces the stored one, and what no longer fits it."""
    passed = [kwargs[key] for key in ("num_time_windows", "segments") if kwargs.get(key) is not None]
    if not passed:
        return
    for key in ("num_time_windows", "segments"):
        if key not in kwargs:
            config.pop(key, None)
    for key in ("segment_boundaries", "theta_init"):
        stored = config.get(key)
        rows = None if stored is None else len(stored) - (key == "segment_boundaries")
        if key not in kwargs and rows is not None and rows != passed[0]:
            logger.warning("PerflowScheduler: the stored %s (%d segments) does not fit the %s segments passed; dropped", key, rows, passed[0])
            config.pop(key)


def _betas(beta_schedule: str, beta_start: float, beta_end: float, num_train_timesteps: int, trained_betas: Any) -> torch.Tensor:
    # trained_betas of another length are kept (diffusers' configs allow it) and refused at set_timesteps.
    if trained_betas is not None:
        return torch.tensor(np.asarray(trained_betas), dtype=torch.float32).flatten()
    return _betas_for(beta_schedule, beta_start, beta_end, num_train_timesteps, None)


def _config_entries(perflow: Dict[str, Any]) -> Dict[str, Any]:
    """A state dict's ``perflow`` entries as config values (checked when the scheduler is rebuilt from them)."""
    entries = {CONFIG_KEYS[field]: _plain(value) for field, value in perflow.items() if field in CONFIG_KEYS}
    if "segments" in perflow:
        entries["num_time_windows"] = None
    return entries


def _plain(value: Any) -> Any:
    return value.detach().cpu().tolist() if isinstance(value, torch.Tensor) else value


def _validate_timesteps(timesteps: Any, num_train_timesteps: int) -> np.ndarray:
    values = np.asarray(torch.as_tensor(timesteps).cpu() if isinstance(timesteps, torch.Tensor) else timesteps, dtype=np.float64).ravel()
    accepted = f"strictly decreasing whole numbers in (0, {num_train_timesteps}]"
    if values.size == 0 or np.any(values != np.round(values)) or np.any(values <= 0) or np.any(values > num_train_timesteps):
        raise ValueError(f"timesteps must be {accepted}; got {values.tolist()}")
    if np.any(np.diff(values) >= 0):
        raise ValueError(f"timesteps must be {accepted}; got {values.tolist()}")
    return values.astype(np.int64)


def _on_accelerator(timestep: Any) -> bool:
    return isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu"


def _as_number(timestep: Union[int, float, torch.Tensor]) -> float:
    return float(timestep.item() if isinstance(timestep, torch.Tensor) else timestep)


# diffusers records a pipeline component's class under its __module__ and, on loading, finds it only in modules the
# process has imported: the package (`import perflow_core`) rather than this submodule.
PerflowScheduler.__module__ = __name__.rpartition(".")[0]
