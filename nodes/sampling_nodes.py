"""PeRFlow Scheduler (SIGMAS), Sampler (SAMPLER) and an all-in-one KSampler."""

from __future__ import annotations

import comfy.sample
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..perflow_core.k_sampling import ModelSpace, perflow_sigmas
from .glue import PerflowChoice, choice_or_default, perflow_ksampler
from .settings_node import optional_perflow_input

def sigmas_for(model, steps: int, denoise: float, perflow: PerflowChoice | None):
    try:
        space = ModelSpace.of(model.get_model_object("model_sampling"))
    except ValueError as error:
        raise ValueError(f"model: {error}") from None
    return perflow_sigmas(space, choice_or_default(perflow).settings, steps, denoise)


class PerflowSigmasNode(io.ComfyNode):
    """The SIGMAS node. Its id stays "PerflowScheduler" (saved workflows name it); it is not the diffusers class."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowScheduler",
            display_name="PeRFlow Scheduler",
            category="sampling/custom_sampling/schedulers",
            description="The sigmas of PeRFlow's timestep grid (1000, 875, 750, ... for K = 4), for SamplerCustom / "
            "SamplerCustomAdvanced with the PeRFlow Sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample; its noise schedule sets the sigmas."),
                io.Int.Input("steps", default=4, min=1, max=1000, tooltip="Network calls; at least one per segment (4-8 for the released models)."),
                io.Float.Input(
                    "denoise",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Below 1 for img2img: the last `steps` of a grid of steps/denoise steps, as ComfyUI's schedulers do.",
                ),
                optional_perflow_input(),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps: int, denoise: float, perflow=None) -> io.NodeOutput:
        if denoise <= 0:
            return io.NodeOutput(torch.FloatTensor([]))
        return io.NodeOutput(sigmas_for(model, steps, denoise, perflow))


class PerflowSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowSampler",
            display_name="PeRFlow Sampler",
            category="sampling/custom_sampling/samplers",
            description="PeRFlow's piecewise linear Euler sampler with theta, for SamplerCustom / SamplerCustomAdvanced "
            "and any guider. Use it with the PeRFlow Scheduler's sigmas.",
            inputs=[optional_perflow_input()],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, perflow=None) -> io.NodeOutput:
        return io.NodeOutput(perflow_ksampler(choice_or_default(perflow)))


class PerflowKSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowKSampler",
            display_name="PeRFlow KSampler",
            category="sampling/custom_sampling/perflow",
            description="All in one: PeRFlow sampling with CFG, like the stock KSampler.",
            inputs=[
                io.Model.Input("model", tooltip="The PeRFlow model."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True, tooltip="Noise seed."),
                io.Int.Input("steps", default=4, min=1, max=1000, tooltip="Network calls; at least one per segment."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance scale (SD1.5 PeRFlow: 4.5-7.5, SDXL: 1.5-2.5)."),
                io.Conditioning.Input("positive", tooltip="What the image should show."),
                io.Conditioning.Input("negative", tooltip="What the image should not show."),
                io.Latent.Input("latent_image", tooltip="The latent to start from (empty for txt2img)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Below 1 for img2img."),
                optional_perflow_input(),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, positive, negative, latent_image, denoise, perflow=None) -> io.NodeOutput:
        latent = latent_image.copy()
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        if denoise <= 0:
            return io.NodeOutput(latent)
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        sigmas = sigmas_for(model, steps, denoise, perflow)
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
        latent["samples"] = comfy.sample.sample_custom(
            model,
            noise,
            cfg,
            perflow_ksampler(choice_or_default(perflow)),
            sigmas,
            positive,
            negative,
            samples,
            noise_mask=latent.get("noise_mask"),
            callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=seed,
        )
        return io.NodeOutput(latent)
