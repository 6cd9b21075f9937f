"""PeRFlow Scheduler (SIGMAS), Sampler (SAMPLER) and an all-in-one KSampler."""

from __future__ import annotations

import comfy.sample
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io, ui

from ..perflow_core.k_sampling import perflow_sigmas
from .display import settings_text, timesteps_text
from .glue import PerflowChoice, choice_or_default, model_space, perflow_ksampler
from .settings_node import optional_perflow_input

SAMPLER_TIMESTEPS_NOTE = "timesteps: shown on the PeRFlow Scheduler (they depend on the model, steps and denoise)"


def sigmas_for(model, steps: int, denoise: float, perflow: PerflowChoice | None):
    return perflow_sigmas(model_space(model), choice_or_default(perflow).settings, steps, denoise)


def sampling_text(model, sigmas, perflow: PerflowChoice | None) -> ui.PreviewText:
    """What a node that knows the model shows: the timesteps the network sees and the settings, with an ``auto``
    parameterisation resolved for this model."""
    return ui.PreviewText(timesteps_text(model_space(model), sigmas) + "\n" + settings_text(choice_or_default(perflow), model))


class PerflowSigmasNode(io.ComfyNode):
    """The SIGMAS node. Its id stays "PerflowScheduler" (saved workflows name it); it is not the diffusers class."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowScheduler",
            display_name="PeRFlow Scheduler",
            category="PeRFlow",
            description="The sigmas of the piecewise rectified flow (PeRFlow) timestep grid (1000, 875, 750, ... for K = 4), for SamplerCustom / "
            "SamplerCustomAdvanced with the PeRFlow Sampler. Shows the timesteps the network sees.",
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
        sigmas = torch.FloatTensor([]) if denoise <= 0 else sigmas_for(model, steps, denoise, perflow)
        return io.NodeOutput(sigmas, ui=sampling_text(model, sigmas, perflow))


class PerflowSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowSampler",
            display_name="PeRFlow Sampler",
            category="PeRFlow",
            description="The piecewise rectified flow (PeRFlow) sampler: piecewise linear Euler steps with theta, for SamplerCustom / SamplerCustomAdvanced "
            "and any guider. Use it with the PeRFlow Scheduler's sigmas.",
            inputs=[optional_perflow_input()],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, perflow=None) -> io.NodeOutput:
        choice = choice_or_default(perflow)
        return io.NodeOutput(perflow_ksampler(choice), ui=ui.PreviewText(settings_text(choice) + "\n" + SAMPLER_TIMESTEPS_NOTE))


class PerflowKSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowKSampler",
            display_name="PeRFlow KSampler",
            category="PeRFlow",
            description="All in one: piecewise rectified flow (PeRFlow) sampling with CFG, like the stock KSampler. "
            "Shows the timesteps the network sees.",
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
            return io.NodeOutput(latent, ui=sampling_text(model, torch.FloatTensor([]), perflow))
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
        return io.NodeOutput(latent, ui=sampling_text(model, sigmas, perflow))
