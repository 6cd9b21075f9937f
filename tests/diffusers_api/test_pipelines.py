"""PerflowScheduler inside diffusers pipelines, offline, with tiny random models built here."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, DiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

from perflow_core import PerflowScheduler
from perflow_core.lab.benchmark.models import tiny_unet as lab_tiny_unet
from support.tiny_diffusers import NO_TEXT_MODELS, tiny_sd_unet, tiny_vae


@pytest.fixture(scope="module")
def tiny_unet():
    return lab_tiny_unet(sample_size=8, block_out_channels=(4, 8), norm_num_groups=2, attention=False)


@pytest.fixture(scope="module")
def tiny_sd_components():
    torch.manual_seed(0)
    unet, vae = tiny_sd_unet(sample_size=16), tiny_vae()
    return dict(unet=unet, vae=vae, scheduler=PerflowScheduler(prediction_type="diff_eps"), requires_safety_checker=False, **NO_TEXT_MODELS)


def prompt_embeds(batch=1):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, 8, generator=generator), torch.randn(batch, 4, 8, generator=generator)


def run_sd(pipeline, **overrides):
    """The pipeline's final latents on ``prompt_embeds()``: CFG 5 with the negative, 6 steps, seed 0, unless overridden."""
    positive, negative = prompt_embeds()
    arguments = dict(prompt_embeds=positive, negative_prompt_embeds=negative, guidance_scale=5.0, num_inference_steps=6)
    arguments.update(generator=torch.Generator().manual_seed(0), output_type="latent")
    return pipeline(**{**arguments, **overrides}).images


@pytest.mark.parametrize("pipeline_class", [DDPMPipeline, DDIMPipeline])
def test_unconditional_pipeline_samples_with_the_swapped_scheduler(pipeline_class, tiny_unet):
    pipeline = pipeline_class(unet=tiny_unet, scheduler=PerflowScheduler(prediction_type="ddim_eps"))
    pipeline.scheduler = PerflowScheduler.from_config(pipeline.scheduler.config)
    images = pipeline(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 8, 8, 3)
    assert images.std() > 0


def test_stable_diffusion_txt2img_with_cfg(tiny_sd_components):
    pipeline = StableDiffusionPipeline(**tiny_sd_components)
    result = run_sd(pipeline, height=32, width=32)
    assert result.shape == (1, 4, 16, 16) and torch.isfinite(result).all()
    assert pipeline.scheduler.timesteps.tolist() == [1000, 875, 750, 625, 500, 250]


def test_stable_diffusion_txt2img_matches_a_hand_written_loop(tiny_sd_components):
    pipeline = StableDiffusionPipeline(**tiny_sd_components)
    positive, _ = prompt_embeds()
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    result = run_sd(pipeline, negative_prompt_embeds=None, guidance_scale=1.0, num_inference_steps=4, latents=latents)
    scheduler = PerflowScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(4)
    x = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipeline.unet(x, t, encoder_hidden_states=positive).sample, t, x).prev_sample
    assert torch.allclose(result, x, atol=1e-6)


def test_stable_diffusion_img2img_strength_half_starts_at_the_middle_segment(tiny_sd_components):
    pipeline = StableDiffusionImg2ImgPipeline(**tiny_sd_components)
    image = torch.rand(1, 3, 32, 32)
    seen = []
    pipeline.unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1])) if len(args) > 1 else None)
    result = run_sd(pipeline, image=image, strength=0.5, guidance_scale=3.0, num_inference_steps=4)
    assert result.shape == (1, 4, 16, 16) and torch.isfinite(result).all()
    assert pipeline.scheduler.begin_index == 2
    assert pipeline.scheduler.step_index == 4


def test_pipeline_saved_and_reloaded_names_and_restores_our_scheduler(tiny_sd_components, tmp_path):
    components = dict(tiny_sd_components, scheduler=PerflowScheduler(prediction_type="diff_eps", theta_init=[0.1, 0.0, 0.0, 0.2]))
    StableDiffusionPipeline(**components).save_pretrained(tmp_path)
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["scheduler"] == ["perflow_core", "PerflowScheduler"]
    reloaded = DiffusionPipeline.from_pretrained(tmp_path, **NO_TEXT_MODELS)
    assert isinstance(reloaded.scheduler, PerflowScheduler)
    assert reloaded.scheduler.theta[:, 0].tolist() == [0.1, 0.0, 0.0, 0.2]


FRESH_PROCESS_LOAD = """
import sys
import perflow_core
from diffusers import DiffusionPipeline
pipeline = DiffusionPipeline.from_pretrained(sys.argv[1], text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None)
print(type(pipeline.scheduler).__name__, pipeline.scheduler.theta[:, 0].tolist())
"""


def test_a_fresh_process_loads_a_saved_pipeline_after_import_perflow_core(tiny_sd_components, tmp_path):
    components = dict(tiny_sd_components, scheduler=PerflowScheduler(prediction_type="diff_eps", theta_init=[0.1, 0.0, 0.0, 0.2]))
    StableDiffusionPipeline(**components).save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_LOAD, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "PerflowScheduler [0.1, 0.0, 0.0, 0.2]"
