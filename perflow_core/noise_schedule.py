"""Noise schedules shared by the analytic model and the samplers.

The cumulative products are computed exactly as `diffusers.DDPMScheduler` computes them, so that a model built here
and a diffusers scheduler built from the same config agree bit for bit on every training noise level.
"""

from __future__ import annotations

import math
from typing import Sequence, Union, overload

import numpy as np
import torch

SUPPORTED_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The Glide cosine schedule (``squaredcos_cap_v2``), computed as diffusers' ``betas_for_alpha_bar``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = range(num_train_timesteps)
    betas = [min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta) for i in steps]
    return torch.tensor(betas, dtype=torch.float32)


def _betas_for(
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    num_train_timesteps: int,
    trained_betas: Union[Sequence[float], np.ndarray, torch.Tensor, None],
) -> torch.Tensor:
    if trained_betas is not None:
        betas = torch.as_tensor(np.asarray(trained_betas), dtype=torch.float32)
        if betas.ndim != 1 or betas.shape[0] != num_train_timesteps:
            raise ValueError(
                f"`trained_betas` must be a 1-D sequence of length `num_train_timesteps`={num_train_timesteps}, "
                f"got shape {tuple(betas.shape)}."
            )
        return betas
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)
    raise ValueError(
        f"Unknown `beta_schedule`={beta_schedule!r}; accepted values are {', '.join(SUPPORTED_BETA_SCHEDULES)} "
        "(or pass `trained_betas`)."
    )


def alphas_cumprod_for(
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
    trained_betas: Union[Sequence[float], np.ndarray, torch.Tensor, None] = None,
) -> torch.Tensor:
    """
    Cumulative signal levels `alphas_cumprod[t] = prod_{s<=t} (1 - beta_s)` of a DDPM noise schedule.

    The defaults are those of Stable Diffusion 1.5.

    Args:
        beta_schedule (`str`, defaults to `"scaled_linear"`):
            One of `"linear"`, `"scaled_linear"` (linear in `sqrt(beta)`) or `"squaredcos_cap_v2"` (Glide cosine).
            Ignored when `trained_betas` is given.
        beta_start (`float`, defaults to 0.00085):
            First beta of the (scaled) linear schedules.
        beta_end (`float`, defaults to 0.012):
            Last beta of the (scaled) linear schedules.
        num_train_timesteps (`int`, defaults to 1000):
            Number of discrete training timesteps `T`.
        trained_betas (sequence of `float`, *optional*):
            Explicit betas; must have length `num_train_timesteps`.

    Returns:
        `torch.Tensor`: float32 tensor of shape `[num_train_timesteps]`, identical to `DDPMScheduler.alphas_cumprod`.

    Raises:
        `ValueError`: for an unknown `beta_schedule` or a `trained_betas` of the wrong length.
    """
    betas = _betas_for(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas)
    return torch.cumprod(1.0 - betas, dim=0)


@overload
def alpha_at_timestep(alphas_cumprod: torch.Tensor, timestep: float) -> float: ...


@overload
def alpha_at_timestep(alphas_cumprod: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor: ...


def alpha_at_timestep(
    alphas_cumprod: torch.Tensor, timestep: Union[float, torch.Tensor]
) -> Union[float, torch.Tensor]:
    """
    Signal level `alpha` that the PeRFlow convention assigns to a (possibly fractional) model timestep.

    A model timestep `tau` in `[0, T]` reads `alphas_cumprod` at index `tau - 1`, linearly interpolated between the
    neighbouring integer indices and clamped to `[0, T - 1]`: `tau = T` gives `alphas_cumprod[T - 1]`, while
    `tau = 1` and `tau = 0` both give `alphas_cumprod[0]`.

    Args:
        alphas_cumprod (`torch.Tensor`):
            The schedule's cumulative signal levels, shape `[T]`.
        timestep (`float` or `torch.Tensor`):
            A Python number, or a 0-d / 1-d tensor of timesteps.

    Returns:
        `float` for a Python number, otherwise a float64 tensor shaped like `timestep` (on its device).
    """
    if not torch.is_tensor(timestep):
        return float(alpha_at_timestep(alphas_cumprod, torch.tensor(float(timestep), dtype=torch.float64)))
    table = alphas_cumprod.to(device=timestep.device, dtype=torch.float64)
    last_index = table.shape[0] - 1
    index = (timestep.to(torch.float64) - 1.0).clamp(0.0, float(last_index))
    lower = index.floor().long()
    upper = (lower + 1).clamp(max=last_index)
    fraction = index - lower.to(torch.float64)
    return (1.0 - fraction) * table[lower] + fraction * table[upper]


def sigma_for_alpha(alpha: float) -> float:
    """Noise-to-signal ratio `sigma = sqrt((1 - alpha) / alpha)` of a signal level `alpha` in `(0, 1]`."""
    return math.sqrt((1.0 - alpha) / alpha)
