"""The models a benchmark pipeline runs: call-counting and free stand-ins, a tiny random UNet, and a student read as an eps model."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Tuple

import torch

from ...noise_schedule import alphas_cumprod_for
from ..analytic import AnalyticDigitsDenoiser, load_digits
from ...solver import StepCoefficients
from ...settings import PerflowSettings


class ModelWrapper(torch.nn.Module):
    """A module around ``self.model`` that a pipeline takes for the model (its config, dtype and device)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device


class CountingModel(ModelWrapper):
    """Wraps a ``model(sample, timestep)`` for a pipeline: counts calls and shifts the timestep.

    The analytic model reads model timestep ``tau`` at ``alphas_cumprod[tau - 1]`` (PeRFlow's
    convention); diffusers' schedulers mean ``alphas_cumprod[t]``, so they need ``timestep_offset=1``.
    """

    def __init__(self, model: torch.nn.Module, timestep_offset: float = 0.0):
        super().__init__(model)
        self.timestep_offset = timestep_offset
        self.calls = 0

    def forward(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.model(sample, timestep + self.timestep_offset, **kwargs)


def tiny_unet(sample_size: int = 32, block_out_channels: Tuple[int, int] = (32, 64), norm_num_groups: int = 8, attention: bool = True) -> torch.nn.Module:
    """A small random-weight ``UNet2DModel`` standing in for a real network: RGB, two levels of one layer each,
    attention at the lower level if ``attention``, weights from seed 0, in eval mode."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    lower_down, lower_up = ("AttnDownBlock2D", "AttnUpBlock2D") if attention else ("DownBlock2D", "UpBlock2D")
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D", lower_down),
        up_block_types=(lower_up, "UpBlock2D"),
        norm_num_groups=norm_num_groups,
    )
    return unet.eval()


class ConstantOutputModel(torch.nn.Module):
    """A free 'network' returning a fixed tensor: what is left of a sampling loop is the sampler's own cost."""

    def __init__(self, output: torch.Tensor, config: Any):
        super().__init__()
        self.output, self.config = output, config
        self.dtype, self.device = output.dtype, output.device

    def forward(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> Any:
        return SimpleNamespace(sample=self.output)


class StudentEpsModel(ModelWrapper):
    """A PeRFlow student read as an eps model, so any diffusers solver can sample it.

    At ``(z, t)`` the student predicts its window's straight line; the line's two ends ``z_s``, ``z_e`` are put
    on one deterministic DDIM trajectory, ``z = sqrt(a) x0 + sqrt(1 - a) eps`` with the same x0 and eps
    (`perflow_core.solver.StepCoefficients`' preview coefficients solve it for x0), and that eps is returned. Timesteps are PeRFlow's (use
    ``CountingModel(..., timestep_offset=1)`` under a diffusers scheduler).
    """

    def __init__(self, student: torch.nn.Module, settings: PerflowSettings):
        super().__init__(student)
        self.prediction_type = settings.prediction_type
        self.segments = settings.build_segments()
        self.alphas_cumprod = alphas_cumprod_for(num_train_timesteps=settings.num_train_timesteps)

    def forward(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> Any:
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        window = self.segments.step_at(t, t, self.alphas_cumprod)
        k = StepCoefficients.of(self.prediction_type, window)
        output = self.model(sample, t).sample
        velocity, x0 = torch.add(sample * k.vz, output, alpha=k.vo), torch.add(sample * k.p, output, alpha=k.q)
        z_start = sample + (window.t_start - window.t) * velocity
        eps = (z_start - math.sqrt(window.alpha_start) * x0) / math.sqrt(1 - window.alpha_start)
        return SimpleNamespace(sample=eps)


# The analytic models the benchmark measures: the digits (what the calibration was developed on) and a second data
# set it never saw while being developed.
MODEL_TITLES = {"digits": "analytic digits", "inverted": "second model: inverted transposed digits"}


def analytic_model(name: str, smoothing: float) -> AnalyticDigitsDenoiser:
    """``digits``: the smoothed 8x8 digits; ``inverted``: the same images transposed, pixels inverted (white
    background, dark strokes), so other means, modes and a mean far from 0; the same exact epsilon of a mixture."""
    model = AnalyticDigitsDenoiser(smoothing=smoothing)
    if name == "inverted":
        images, _ = load_digits()
        flipped = torch.from_numpy(images.max() - images).transpose(-1, -2).contiguous().unsqueeze(1)
        model.digit_pixels = flipped.to(model.digit_pixels)
    elif name != "digits":
        raise ValueError(f"analytic model must be one of {', '.join(MODEL_TITLES)}; got {name!r}")
    return model
