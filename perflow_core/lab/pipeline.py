"""A small unconditional DiffusionPipeline (any `(sample, timestep) -> output` model plus a scheduler) and
`run_pipeline`, its samples from given noise."""

from __future__ import annotations

from typing import Callable, List, Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from PIL import Image


class UnconditionalPipeline(DiffusionPipeline):
    """Samples an unconditional model (e.g. `AnalyticDigitsDenoiser`) with any scheduler.

    Unlike `DDPMPipeline` it accepts the initial `latents`, so that several samplers can start from the
    same noise, and it returns the samples in data space (`output_type="pt"`) without clipping.

    Args:
        unet: a model whose `forward(sample, timestep)` returns an object with `.sample`.
        scheduler: a diffusers scheduler, e.g. `PerflowScheduler`.
    """

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 4,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        callback_on_step_end: Optional[Callable[[int, int, torch.Tensor], None]] = None,
        return_dict: bool = True,
    ) -> Union[ImagePipelineOutput, tuple]:
        """Run the sampling loop.

        Args:
            batch_size (`int`): number of samples when `latents` is not given.
            num_inference_steps (`int`): number of model calls (for first-order schedulers).
            generator: for drawing the initial noise.
            latents (`torch.Tensor`, *optional*): the initial noise, `[B, C, H, W]`.
            output_type (`str`): `"pt"` (data space, unclipped), `"np"` or `"pil"` (images in [0, 1]).
            callback_on_step_end: called as `fn(step_index, timestep, sample)` after each step.
        """
        if output_type not in ("pt", "np", "pil"):
            raise ValueError(f"output_type must be 'pt', 'np' or 'pil'; got {output_type!r}")
        config = self.unet.config
        if latents is None:
            shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
            latents = torch.randn(shape, generator=generator, dtype=self.unet.dtype).to(self.device)
        sample = latents.to(self.device, self.unet.dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = self.scheduler.scale_model_input(sample, t)
            output = self.unet(model_input, t).sample
            sample = self.scheduler.step(output, t, sample).prev_sample
            if callback_on_step_end is not None:
                callback_on_step_end(i, int(t), sample)
        images = sample if output_type == "pt" else to_images(sample, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def run_pipeline(model: torch.nn.Module, scheduler, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """``UnconditionalPipeline`` samples (data space, unclipped) from ``noise``."""
    pipeline = UnconditionalPipeline(unet=model, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(latents=noise, num_inference_steps=steps, output_type="pt").images


def to_images(sample: torch.Tensor, output_type: str = "np"):
    """Data in [-1, 1] -> images in [0, 1] (`np`, `[B, H, W, C]`) or PIL images."""
    array = (sample.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    pixels = (array * 255).round().astype(np.uint8)
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
