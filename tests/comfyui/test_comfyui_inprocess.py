"""The nodes inside a real ComfyUI, in-process on the CPU, with a tiny random SD1.5 checkpoint.

Run with ComfyUI's environment:
    COMFYUI_PATH=/path/to/ComfyUI .venv-comfy/bin/pytest tests/comfyui/test_comfyui_inprocess.py -q
(or all of tests/comfyui through ``python tools/run_tests.py``).
Without COMFYUI_PATH every test here is skipped.

Parity (``test_parity_with_original_step_loop``) compares, on the same tiny network and the same
initial noise, (a) ComfyUI's SamplerCustomAdvanced with our PeRFlow Sampler and Scheduler nodes and a
CFGGuider, and (b) ``PerflowScheduler``'s own step loop (the pack's copy, ``pack_core()``) calling the
same ComfyUI diffusion network as the original pipeline calls its UNet: the sample as it is (no c_in), ``timestep = t``
(1000, 875, ...) as a float tensor, the CLIPTextEncode conditioning tensors as context, CFG combined
by hand. The comparison is in the model's latent space: SamplerCustomAdvanced returns
``process_latent_out(samples)`` (SD1.5: divided by 0.18215), so its output goes through
``process_latent_in`` before it is compared with the loop's final sample. Txt2img starts from an
all-zero latent, which ComfyUI does not scale, and from noise scaled to ``sqrt(1 + sigma_max^2)``,
which our sampler divides out again, so both sides start from the same noise tensor.
"""

from __future__ import annotations

import importlib
import inspect
import math
from types import SimpleNamespace

import pytest
import torch

from support.comfyui import (  # noqa: F401  (fixtures are used by name)
    FixedNoise,
    PACK_NAME,
    build_tiny_sd15_checkpoint,
    comfy,
    flat,
    interrupted_after_calls,
    model_folder,
    node_text,
    pack_core,
    parameter_counts,
    perflow_pack,
    progress_bar_updates,
    recorded_timesteps,
    requires_comfyui,
    run_node,
    tiny_sd15,
    tiny_sd15_checkpoint,
)

pytestmark = requires_comfyui

LATENT_SHAPE = (1, 4, 8, 8)
THETA_TEXT = "0.10, -0.05, 0.20; -0.08, 0.03, -0.10; 0.05, 0.02, 0.15; -0.12, -0.04, 0.05"
THETA_ROWS = [[float(v) for v in row.split(",")] for row in THETA_TEXT.split(";")]
PARITY_TOLERANCE = 1e-4
GRIDS = {
    4: [1000, 750, 500, 250],
    6: [1000, 875, 750, 625, 500, 250],
    8: [1000, 875, 750, 625, 500, 375, 250, 125],
}


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def env(comfy, perflow_pack, tiny_sd15):
    """Everything the tests share: ComfyUI modules, our node classes, the tiny model and its conditioning."""
    import comfy_extras.nodes_custom_sampler as custom_sampler
    import comfy_extras.nodes_model_advanced as model_advanced
    import latent_preview
    import nodes as comfy_nodes

    model, clip, vae = tiny_sd15
    progress_bar_enabled = comfy.utils.PROGRESS_BAR_ENABLED
    comfy.utils.PROGRESS_BAR_ENABLED = False  # no console progress bars in the test output
    # 8x8 latents gain nothing from intra-op threads, and on a busy 2-core machine their spin-waiting
    # made this file 4x slower (measured: parity tests 80 s with 2 threads, 19 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    positive = run_node(comfy_nodes.CLIPTextEncode, clip=clip, text="a photograph of an astronaut riding a horse")[0]
    negative = run_node(comfy_nodes.CLIPTextEncode, clip=clip, text="blurry, low quality")[0]
    yield SimpleNamespace(
        comfy=comfy,
        nodes=perflow_pack,
        settings_node=importlib.import_module(PACK_NAME + ".nodes.settings_node"),
        glue=importlib.import_module(PACK_NAME + ".nodes.glue"),
        loader_nodes=importlib.import_module(PACK_NAME + ".nodes.loader_nodes"),
        dropdowns=importlib.import_module(PACK_NAME + ".nodes.dropdowns"),
        custom_sampler=custom_sampler,
        model_advanced=model_advanced,
        latent_preview=latent_preview,
        comfy_nodes=comfy_nodes,
        model=model,
        clip=clip,
        vae=vae,
        positive=positive,
        negative=negative,
    )
    comfy.utils.PROGRESS_BAR_ENABLED = progress_bar_enabled
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _unpatched_weights(request):
    """Tests that patch weights or model_sampling leave no patch loaded for the next test."""
    yield
    if "env" in request.fixturenames:
        import comfy.model_management

        comfy.model_management.unload_all_models()


def noise_tensor(seed: int, shape=LATENT_SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def comfy_sample(env, model, choice, steps, cfg, noise, latent=None, denoise=1.0, noise_mask=None):
    """SamplerCustomAdvanced with CFGGuider, the PeRFlow Sampler and Scheduler nodes; returns the node's
    LATENT samples (ComfyUI's process_latent_out space)."""
    sampler = run_node(env.nodes.PerflowSamplerNode, perflow=choice)[0]
    sigmas = run_node(env.nodes.PerflowSigmasNode, model=model, steps=steps, denoise=denoise, perflow=choice)[0]
    guider = env.comfy.samplers.CFGGuider(model)
    guider.set_conds(env.positive, env.negative)
    guider.set_cfg(cfg)
    latent_dict = {"samples": torch.zeros_like(noise) if latent is None else latent}
    if noise_mask is not None:
        latent_dict["noise_mask"] = noise_mask
    output = run_node(env.custom_sampler.SamplerCustomAdvanced, noise=FixedNoise(noise), guider=guider, sampler=sampler, sigmas=sigmas, latent_image=latent_dict)
    return output[0]["samples"]


def reference_sample(env, model, prediction_type, theta_rows, steps, cfg, noise):
    """The original PeRFlow loop: PerflowScheduler steps on the raw UNet output, UNet(z, t, context)."""
    network = model.model.diffusion_model
    scheduler = pack_core().PerflowScheduler(segments=4, theta_init=theta_rows, prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    cond, uncond = env.positive[0][0], env.negative[0][0]
    z = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            if cfg == 1.0:
                output = network(z, torch.full([z.shape[0]], float(t)), context=cond.expand(z.shape[0], -1, -1), transformer_options={})
            else:
                both = network(
                    torch.cat([z, z]), torch.full([2 * z.shape[0]], float(t)), context=torch.cat([cond, uncond]), transformer_options={}
                )
                output_cond, output_uncond = both.chunk(2)
                output = output_uncond + cfg * (output_cond - output_uncond)
            z = scheduler.step(output, t, z).prev_sample
    return z


def choice_for(env, parameterisation, theta_text=""):
    return env.settings_node.build_choice(parameterisation, 4, "", theta_text)


# ------------------------------------------------------------------------------------- the checkpoint
def test_tiny_checkpoint_loads_as_sd15(env, tiny_sd15_checkpoint):
    counts = parameter_counts()
    assert 12e6 < counts["unet"] < 16e6 and counts["clip"] == 123_060_480
    model = env.model
    assert type(model.model.model_config).__name__ == "SD15"
    assert model.model.model_config.unet_config["model_channels"] == 320
    assert type(env.vae.first_stage_model).__name__ == "TAESD"
    cond = env.positive[0][0]
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()
    assert (env.positive[0][0] - env.negative[0][0]).abs().max() > 0.1
    image = env.vae.decode(torch.randn(1, 4, 8, 8))
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


# ---------------------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("steps", [4, 6, 8])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_network_receives_the_original_timesteps(env, steps, cfg):
    with recorded_timesteps(env.model) as calls:
        out = comfy_sample(env, env.model, None, steps, cfg, noise_tensor(1))
    per_batch = 1 if cfg == 1.0 else 2  # with CFG each timestep is seen by the cond and the uncond batch
    assert flat(calls) == [float(t) for t in GRIDS[steps] for _ in range(per_batch)]
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------ parity
_PARITY_WORST: dict = {}


@pytest.fixture(scope="module")
def parity_report():
    yield _PARITY_WORST
    if _PARITY_WORST:
        lines = [f"  {name}: worst relative difference {value:.2e}" for name, value in sorted(_PARITY_WORST.items())]
        print("\nComfyUI vs original step loop:\n" + "\n".join(lines))


@pytest.mark.parametrize("theta", ["zero", "nonzero"])
@pytest.mark.parametrize("steps", [4, 6, 8])
@pytest.mark.parametrize("cfg", [1.0, 4.5])
@pytest.mark.parametrize("parameterisation", ["diff_eps", "ddim_eps", "velocity"])
def test_parity_with_original_step_loop(env, parity_report, parameterisation, cfg, steps, theta):
    theta_text, theta_rows = (THETA_TEXT, THETA_ROWS) if theta == "nonzero" else ("", None)
    noise = noise_tensor(100 + steps)
    choice = choice_for(env, parameterisation, theta_text)
    comfy_out = env.model.model.process_latent_in(comfy_sample(env, env.model, choice, steps, cfg, noise))
    reference = reference_sample(env, env.model, parameterisation, theta_rows, steps, cfg, noise)
    assert torch.isfinite(reference).all() and reference.abs().max() > 0.1
    difference = relative_difference(comfy_out, reference)
    parity_report[parameterisation] = max(parity_report.get(parameterisation, 0.0), difference)
    assert difference < PARITY_TOLERANCE, f"{parameterisation} cfg={cfg} steps={steps} theta={theta}: {difference:.3e}"


def test_auto_is_diff_eps_on_sd15(env):
    noise = noise_tensor(7)
    auto = comfy_sample(env, env.model, choice_for(env, "auto"), 4, 4.5, noise)
    diff_eps = comfy_sample(env, env.model, choice_for(env, "diff_eps"), 4, 4.5, noise)
    ddim_eps = comfy_sample(env, env.model, choice_for(env, "ddim_eps"), 4, 4.5, noise)
    assert torch.equal(auto, diff_eps)
    assert relative_difference(ddim_eps, diff_eps) > 1e-3


# ------------------------------------------------------------------------- through ComfyUI's wrapper
def test_batch_of_two_gives_two_different_results(env):
    noise = torch.cat([noise_tensor(11), noise_tensor(12)])
    out = comfy_sample(env, env.model, None, 4, 4.5, noise)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert relative_difference(out[0], out[1]) > 0.05
    single = comfy_sample(env, env.model, None, 4, 4.5, noise[:1])
    assert relative_difference(out[:1], single) < 1e-4


@pytest.mark.parametrize("img2img_start", ["original", "straight_path"])
@pytest.mark.parametrize("denoise, grid", [(0.5, [500, 375, 250, 125]), (0.75, [875, 750, 500, 250])])
def test_img2img_start_and_parity(env, denoise, grid, img2img_start):
    """denoise 0.5 at 4 steps starts at 500 (a segment start); 0.75 at 875, inside the first segment: by default
    ComfyUI's own noising, the original's add_noise; with straight_path the point on the segment's straight path.
    Either way the same as PerflowScheduler.add_noise with the same option."""
    latent = noise_tensor(21) * 4.0  # a VAE-encoded latent (process_latent_out space)
    noise = noise_tensor(22)
    choice = env.settings_node.build_choice("diff_eps", 4, "", THETA_TEXT, img2img_start)
    with recorded_timesteps(env.model) as calls:
        out = comfy_sample(env, env.model, choice, 4, 1.0, noise, latent=latent, denoise=denoise)
    assert flat(calls) == [float(t) for t in grid]
    scheduler = pack_core().PerflowScheduler(segments=4, theta_init=THETA_ROWS, prediction_type="diff_eps", img2img_start=img2img_start)
    total = int(4 / denoise)
    scheduler.set_timesteps(total)
    scheduler.set_begin_index(total - 4)
    assert scheduler.timesteps[total - 4 :].tolist() == grid
    cond = env.positive[0][0]
    z = scheduler.add_noise(env.model.model.process_latent_in(latent), noise, scheduler.timesteps[total - 4])
    network = env.model.model.diffusion_model
    with torch.no_grad():
        for t in scheduler.timesteps[total - 4 :]:
            z = scheduler.step(network(z, torch.full([1], float(t)), context=cond, transformer_options={}), t, z).prev_sample
    assert torch.isfinite(out).all()
    assert relative_difference(env.model.model.process_latent_in(out), z) < PARITY_TOLERANCE


def test_inpainting_mask_keeps_the_unmasked_region(env):
    """Default settings (auto: diff_eps on SD1.5). ComfyUI feeds the unmasked region as the input latent
    noised with the true noise; the last step then ends close to the input there (measured 4e-4
    relative). (With ddim_eps the original's last window ends at alphas_cumprod[0], sigma 0.029, not at
    a clean latent, so that region keeps about 3% noise, as in the original.)"""
    latent = noise_tensor(31) * 4.0
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 4:] = 1.0  # regenerate the right half
    out = comfy_sample(env, env.model, None, 4, 4.5, noise_tensor(32), latent=latent, noise_mask=mask)
    assert torch.isfinite(out).all()
    kept = (out[..., :4] - latent[..., :4]).abs().max() / latent.abs().max()
    regenerated = (out[..., 4:] - latent[..., 4:]).abs().max() / latent.abs().max()
    assert kept < 1e-2, f"unmasked region moved by {kept:.3e} (relative)"
    assert regenerated > 0.1


def _delta_files(env, folder):
    """A small delta (diffusers UNet names of the tiny UNet) and a zero delta with the same keys."""
    from safetensors.torch import save_file

    to_comfy = env.comfy.utils.unet_to_diffusers(env.model.model.model_config.unet_config)
    weights = env.model.model.state_dict()
    wanted = [
        "conv_in.weight",
        "down_blocks.0.resnets.0.conv1.weight",
        "down_blocks.0.attentions.0.proj_in.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "up_blocks.0.resnets.1.conv2.weight",
        "conv_out.weight",
    ]
    generator = torch.Generator().manual_seed(5)
    delta = {}
    for key in wanted:
        target = weights["diffusion_model." + to_comfy[key]]
        delta[key] = (torch.randn(target.shape, generator=generator) * target.std() * 0.3).contiguous()
    save_file(delta, str(folder / "delta.safetensors"))
    save_file({key: torch.zeros_like(value) for key, value in delta.items()}, str(folder / "zero_delta.safetensors"))
    return len(wanted)


def test_apply_delta_node_patches_the_model(env, tmp_path):
    with model_folder(env.loader_nodes.DELTA_FOLDER, tmp_path):
        _delta_files(env, tmp_path)
        noise = noise_tensor(41)
        base = comfy_sample(env, env.model, None, 4, 4.5, noise)
        patched_model = run_node(env.nodes.PerflowApplyDeltaNode, model=env.model, delta_name="delta.safetensors", strength=1.0)[0]
        zero_model = run_node(env.nodes.PerflowApplyDeltaNode, model=env.model, delta_name="zero_delta.safetensors", strength=1.0)[0]
        assert patched_model is not env.model and not env.model.patches
        assert len(patched_model.patches) == 6
        patched = comfy_sample(env, patched_model, None, 4, 4.5, noise)
        zero = comfy_sample(env, zero_model, None, 4, 4.5, noise)
        again = comfy_sample(env, env.model, None, 4, 4.5, noise)
    assert torch.isfinite(patched).all()
    assert relative_difference(patched, base) > 1e-2
    assert relative_difference(zero, base) < 1e-6
    assert relative_difference(again, base) < 1e-6  # the patch is gone when the base model samples again


def test_v_prediction_model_with_velocity(env):
    v_model = run_node(env.model_advanced.ModelSamplingDiscrete, model=env.model, sampling="v_prediction", zsnr=False)[0]
    noise = noise_tensor(51)
    choice = choice_for(env, "velocity", THETA_TEXT)
    with recorded_timesteps(env.model) as calls:
        out = comfy_sample(env, v_model, choice, 4, 4.5, noise)
    assert flat(calls) == [t for t in (1000.0, 750.0, 500.0, 250.0) for _ in range(2)]
    # The raw network output recovered from ComfyUI's V-prediction denoised is what the original loop steps on.
    reference = reference_sample(env, env.model, "velocity", THETA_ROWS, 4, 4.5, noise)
    assert relative_difference(v_model.model.process_latent_in(out), reference) < PARITY_TOLERANCE
    eps_out = comfy_sample(env, env.model, choice, 4, 4.5, noise)
    assert torch.equal(out, eps_out) or relative_difference(out, eps_out) < 1e-4
    auto = comfy_sample(env, v_model, None, 4, 4.5, noise)  # auto on a V model: velocity
    assert relative_difference(auto, comfy_sample(env, v_model, choice_for(env, "velocity"), 4, 4.5, noise)) < 1e-6


def test_flow_model_with_velocity(env):
    flow_model = run_node(env.model_advanced.ModelSamplingSD3, model=env.model, shift=3.0)[0]
    sigmas = run_node(env.nodes.PerflowSigmasNode, model=flow_model, steps=4, denoise=1.0, perflow=None)[0]
    assert sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with recorded_timesteps(env.model) as calls:
        out = comfy_sample(env, flow_model, choice_for(env, "velocity"), 4, 4.5, noise_tensor(61))
    assert flat(calls) == [t for t in (1000.0, 750.0, 500.0, 250.0) for _ in range(2)]
    assert torch.isfinite(out).all() and out.abs().max() > 0.1


def _tiny_sdxl_model(env):
    """A ComfyUI SDXL model (model_base.SDXL: EPS, adm from pooled output and sizes) with a reduced UNet.

    Not from a checkpoint file: ComfyUI detects SDXL only with its full transformer depth
    [0, 0, 2, 2, 10, 10] (2.6B parameters, plus the 0.8B CLIP-L + CLIP-G text encoders), far too
    large to build and run in a unit test. The model class, its sampling object and the wrapper are
    ComfyUI's own."""
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "num_classes": "sequential",
        "adm_in_channels": 2816,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 320,
        "num_res_blocks": [1],
        "transformer_depth": [1],
        "transformer_depth_output": [0, 0],
        "channel_mult": [1],
        "transformer_depth_middle": -2,
        "use_linear_in_transformer": True,
        "context_dim": 2048,
        "num_head_channels": 64,
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }
    config = comfy.supported_models.SDXL(unet_config)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in base.diffusion_model.modules():
            if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                module.weight.fill_(1.0)
                module.bias.zero_()
                continue
            for name, parameter in module.named_parameters(recurse=False):
                if parameter.ndim >= 2:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) / math.sqrt(parameter[0].numel()))
                else:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def test_sdxl_architecture_model(env):
    model = _tiny_sdxl_model(env)
    assert type(model.model).__name__ == "SDXL"
    generator = torch.Generator().manual_seed(4)
    positive = [[torch.randn(1, 77, 2048, generator=generator), {"pooled_output": torch.randn(1, 1280, generator=generator)}]]
    negative = [[torch.randn(1, 77, 2048, generator=generator), {"pooled_output": torch.randn(1, 1280, generator=generator)}]]
    sdxl_env = SimpleNamespace(**{**vars(env), "positive": positive, "negative": negative})
    noise = noise_tensor(71)
    with recorded_timesteps(model) as calls:
        auto = comfy_sample(sdxl_env, model, None, 4, 2.0, noise)
    assert flat(calls) == [t for t in (1000.0, 750.0, 500.0, 250.0) for _ in range(2)]
    assert torch.isfinite(auto).all() and auto.abs().max() > 0.1
    # auto on SDXL is ddim_eps (the released PeRFlow SDXL model's parameterisation)
    assert torch.equal(auto, comfy_sample(sdxl_env, model, choice_for(env, "ddim_eps"), 4, 2.0, noise))
    assert relative_difference(auto, comfy_sample(sdxl_env, model, choice_for(env, "diff_eps"), 4, 2.0, noise)) > 1e-3


# ----------------------------------------------------------------------------------- previews, Cancel
class RecordingPreviewer:
    def __init__(self):
        self.latents = []

    def decode_latent_to_preview_image(self, preview_format, x0):
        self.latents.append(x0.detach().clone())
        return (preview_format, None, 512)


def test_preview_callback_gets_every_step(env, monkeypatch):
    previewer = RecordingPreviewer()
    monkeypatch.setattr(env.latent_preview, "get_previewer", lambda device, latent_format: previewer)
    progress = []
    monkeypatch.setattr(env.comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: progress.append((value, total, preview)))
    out = comfy_sample(env, env.model, None, 6, 4.5, noise_tensor(81))
    assert [value for value, _, _ in progress] == [1, 2, 3, 4, 5, 6] and all(total == 6 for _, total, _ in progress)
    assert all(preview is not None for _, _, preview in progress)
    assert len(previewer.latents) == 6
    for x0 in previewer.latents:
        assert x0.shape == LATENT_SHAPE and torch.isfinite(x0).all() and x0.abs().max() > 0
    assert relative_difference(previewer.latents[0], previewer.latents[-1]) > 1e-3  # the preview evolves
    assert torch.isfinite(out).all()


def test_cancel_from_the_progress_hook_stops_sampling(env, monkeypatch):
    model_management = env.comfy.model_management

    def hook(value, total, preview, node_id=None):  # as main.py's hook: it throws when interrupted
        if value == 2:
            model_management.interrupt_current_processing()
        model_management.throw_exception_if_processing_interrupted()

    monkeypatch.setattr(env.comfy.utils, "PROGRESS_BAR_HOOK", hook)
    try:
        with recorded_timesteps(env.model) as calls:
            with pytest.raises(model_management.InterruptProcessingException):
                comfy_sample(env, env.model, None, 8, 1.0, noise_tensor(91))
    finally:
        model_management.interrupt_current_processing(False)
    assert flat(calls) == [1000.0, 875.0]  # stopped after the second step


# ------------------------------------------------------------------------------------------ errors
def test_theta_rows_must_match_segments(env):
    with pytest.raises(ValueError, match="theta"):
        env.settings_node.build_choice("diff_eps", 4, "", "0.1; 0.2")


def test_bad_boundaries_are_named(env):
    with pytest.raises(ValueError, match="boundaries"):
        env.settings_node.build_choice("diff_eps", 4, "1000, 500, 600, 0", "")
    with pytest.raises(ValueError, match="boundaries"):
        env.settings_node.build_choice("diff_eps", 4, "1000, 500, 0", "")


def test_nan_theta_is_refused(env):
    with pytest.raises(ValueError, match="theta"):
        env.settings_node.build_choice("diff_eps", 4, "", "nan; 0; 0; 0")


def test_steps_below_segments_are_raised_to_one_per_segment_with_a_warning(env, caplog):
    (sigmas,) = run_node(env.nodes.PerflowSigmasNode, model=env.model, steps=3, denoise=1.0, perflow=None)
    assert len(sigmas) == 4 + 1
    assert "steps=3 is below the number of segments K=4" in caplog.text


def test_edm_model_is_refused_naming_model(env):
    edm_model = run_node(env.model_advanced.ModelSamplingContinuousEDM, model=env.model, sampling="eps", sigma_max=120.0, sigma_min=0.002)[0]
    with pytest.raises(ValueError, match=r"^PeRFlow Scheduler: model"):
        run_node(env.nodes.PerflowSigmasNode, model=edm_model, steps=4, denoise=1.0, perflow=None)
    # The sampler refuses it as well, whatever sigmas it is given.
    sigmas = torch.tensor([14.6146, 4.0, 1.0, 0.3, 0.0])
    sampler = run_node(env.nodes.PerflowSamplerNode, perflow=None)[0]
    guider = env.comfy.samplers.CFGGuider(edm_model)
    guider.set_conds(env.positive, env.negative)
    guider.set_cfg(1.0)
    with pytest.raises(ValueError, match="EPS or V-prediction"):
        guider.sample(noise_tensor(1), torch.zeros(LATENT_SHAPE), sampler, sigmas)


# -------------------------------------------------------------------------------- checkpoint loader
@pytest.fixture
def checkpoints_folder(tmp_path):
    with model_folder("checkpoints", tmp_path) as folder:
        yield folder


def test_checkpoint_loader_reads_perflow_settings(env, checkpoints_folder):
    theta = torch.tensor(THETA_ROWS, dtype=torch.float32)
    path = checkpoints_folder / "tiny_perflow.safetensors"
    build_tiny_sd15_checkpoint(
        path,
        perflow={"theta": theta, "segments": 4, "segment_boundaries": [1000, 750, 500, 250, 0], "prediction_type": "velocity", "version": "0.1"},
        seed=0,
    )
    model, clip, vae, choice = run_node(env.loader_nodes.PerflowCheckpointLoaderNode, ckpt_name=path.name)
    assert type(model).__name__ == "ModelPatcher" and type(model.model.model_config).__name__ == "SD15"
    assert clip is not None and vae is not None
    assert choice.settings.prediction_type == "velocity" and not choice.auto_prediction_type
    assert choice.settings.segments == 4
    assert torch.allclose(choice.settings.theta.float(), theta)
    # The same weights as the stock loader: the perflow.* entries do not reach the model.
    assert torch.equal(model.model.diffusion_model.out[2].weight, env.model.model.diffusion_model.out[2].weight)
    cond = run_node(env.comfy_nodes.CLIPTextEncode, clip=clip, text="a photograph of an astronaut riding a horse")[0]
    assert torch.allclose(cond[0][0], env.positive[0][0])


def test_checkpoint_loader_without_perflow_entries_gives_defaults(env, checkpoints_folder, tiny_sd15_checkpoint):
    link = checkpoints_folder / "plain.safetensors"
    link.symlink_to(tiny_sd15_checkpoint)
    model, clip, vae, choice = run_node(env.loader_nodes.PerflowCheckpointLoaderNode, ckpt_name=link.name)
    assert choice.auto_prediction_type and choice.settings.theta_is_zero and choice.settings.segments == 4
    assert clip is not None and vae is not None and model is not None


class _RunsCode:
    def __reduce__(self):
        return (_mark_executed, (str(_MARKER["path"]),))


_MARKER: dict = {}


def _mark_executed(path):
    with open(path, "w") as handle:
        handle.write("unpickling ran code")
    return {}


def test_checkpoint_loader_refuses_pickle_that_needs_code(env, checkpoints_folder):
    marker = checkpoints_folder / "executed.txt"
    _MARKER["path"] = marker
    path = checkpoints_folder / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, "payload": _RunsCode()}, path)
    with pytest.raises(ValueError) as error:
        run_node(env.loader_nodes.PerflowCheckpointLoaderNode, ckpt_name=path.name)
    assert "evil.ckpt" in str(error.value) and "nothing in the file was executed" in str(error.value)
    assert not marker.exists()


# --------------------------------------------------------------------------------------- dropdowns
@pytest.fixture
def restored_dropdowns(env):
    samplers = env.comfy.samplers
    import comfy.k_diffusion.sampling as k_sampling

    saved = (list(samplers.KSAMPLER_NAMES), list(samplers.SAMPLER_NAMES), list(samplers.SCHEDULER_NAMES), dict(samplers.SCHEDULER_HANDLERS))
    had_function = hasattr(k_sampling, "sample_perflow")
    yield
    samplers.KSAMPLER_NAMES[:], samplers.SAMPLER_NAMES[:], samplers.SCHEDULER_NAMES[:] = saved[0], saved[1], saved[2]
    samplers.SCHEDULER_HANDLERS.clear()
    samplers.SCHEDULER_HANDLERS.update(saved[3])
    if not had_function and hasattr(k_sampling, "sample_perflow"):
        delattr(k_sampling, "sample_perflow")


def test_dropdowns_are_opt_in(env, monkeypatch, restored_dropdowns):
    samplers = env.comfy.samplers
    monkeypatch.delenv(env.dropdowns.ENVIRONMENT_VARIABLE, raising=False)
    before = (list(samplers.KSAMPLER_NAMES), list(samplers.SAMPLER_NAMES), list(samplers.SCHEDULER_NAMES))
    assert env.dropdowns.register_dropdowns() is False
    assert (samplers.KSAMPLER_NAMES, samplers.SAMPLER_NAMES, samplers.SCHEDULER_NAMES) == before
    assert "perflow" not in samplers.SCHEDULER_HANDLERS


def test_dropdowns_when_enabled_run_in_the_stock_ksampler(env, monkeypatch, restored_dropdowns):
    samplers = env.comfy.samplers
    monkeypatch.setenv(env.dropdowns.ENVIRONMENT_VARIABLE, "1")
    assert env.dropdowns.register_dropdowns() is True
    env.dropdowns.register_dropdowns()
    for names in (samplers.KSAMPLER_NAMES, samplers.SAMPLER_NAMES, samplers.SCHEDULER_NAMES):
        assert names.count("perflow") == 1
    assert samplers.KSampler.SAMPLERS.count("perflow") == 1 and samplers.KSampler.SCHEDULERS.count("perflow") == 1
    noise = noise_tensor(95)
    with recorded_timesteps(env.model) as calls:
        out = env.comfy.sample.sample(
            env.model, noise, 4, 4.5, "perflow", "perflow", env.positive, env.negative, torch.zeros(LATENT_SHAPE), denoise=1.0, disable_pbar=True, seed=0
        )
    assert flat(calls) == [t for t in (1000.0, 750.0, 500.0, 250.0) for _ in range(2)]
    # The defaults (K = 4, theta = 0, auto) through the stock KSampler equal the PeRFlow nodes' defaults.
    assert relative_difference(out, comfy_sample(env, env.model, None, 4, 4.5, noise)) < 1e-6


# ------------------------------------------------------------------------------ calibrate, save, load theta
@pytest.fixture
def theta_folder(tmp_path):
    with model_folder("perflow_theta", tmp_path / "perflow_theta", is_default=True) as folder:
        yield folder


def calibration_nodes(env):
    return importlib.import_module(PACK_NAME + ".nodes.calibration_nodes")


def calibrate(env, **overrides):
    arguments = dict(
        model=env.model, positive=env.positive, negative=env.negative, latent_image={"samples": torch.zeros(LATENT_SHAPE)},
        cfg=4.5, steps=4, teacher_multiplier=4, samples=8, holdout_samples=4, seed=0, perflow=choice_for(env, "diff_eps"),
    )
    arguments.update(overrides)
    return run_node(calibration_nodes(env).PerflowCalibrateNode, **arguments)


def test_calibrate_node_lowers_the_held_out_error_of_the_real_model(env):
    choice, chart, report = calibrate(env)
    assert choice.settings.theta.abs().sum() > 0 and not choice.auto_prediction_type
    assert chart.shape[0] == 1 and chart.shape[-1] == 3
    before, after = [float(v) for v in report.split("theta=0 ")[1].split(" (ratio")[0].split(" -> calibrated ")]
    assert after < before


def test_calibrate_reports_increasing_progress_to_comfyuis_progress_bar(env):
    with progress_bar_updates() as updates:
        calibrate(env)
    values = [value for value, _ in updates]
    assert len(values) > 10 and values == sorted(values) and values[-1] == updates[-1][1] > 0


def test_cancel_stops_calibration_within_one_model_call(env):
    import comfy.model_management

    with recorded_timesteps(env.model) as calls, interrupted_after_calls(calls, 5) as flag:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            calibrate(env)
    # CFG runs cond and uncond as one network call here: at most one model call once the flag is set.
    assert len(calls) - flag.calls_when_set <= 1


def test_calibrate_fits_the_time_grid_of_a_ddim_eps_model_when_asked(env):
    choice, _, report = calibrate(env, perflow=choice_for(env, "ddim_eps"), fit_time_grid=True)
    settings = choice.settings
    assert settings.segments == 4 and settings.build_segments().boundaries[0] == 1000 and settings.build_segments().boundaries[-1] == 0
    assert "boundaries: " + ", ".join(f"{b:g}" for b in settings.build_segments().boundaries) in report


def test_fit_time_grid_is_refused_for_a_model_trained_on_its_windows(env):
    with pytest.raises(ValueError, match="fit_time_grid needs prediction_type ddim_eps"):
        calibrate(env, perflow=choice_for(env, "diff_eps"), fit_time_grid=True)


def test_the_printed_settings_paste_into_the_settings_node(env):
    choice, _, report = calibrate(env, perflow=choice_for(env, "ddim_eps"), fit_time_grid=True)
    printed = dict(line.split(": ", 1) for line in report.splitlines() if line.startswith(("segments: ", "boundaries: ")))
    theta_text = report.split("per segment:\n", 1)[1]
    pasted = run_node(
        env.settings_node.PerflowSettingsNode, parameterisation="ddim_eps", segments=int(printed["segments"]), boundaries=printed["boundaries"], theta=theta_text
    )[0]
    assert pasted.settings.segment_boundaries == choice.settings.segment_boundaries
    assert torch.allclose(pasted.settings.theta, choice.settings.theta, atol=1e-4)


def test_calibrated_theta_is_what_the_sampler_then_uses(env):
    choice = calibrate(env)[0]
    noise = noise_tensor(5)
    with_theta = comfy_sample(env, env.model, choice, 4, 4.5, noise)
    without = comfy_sample(env, env.model, choice_for(env, "diff_eps"), 4, 4.5, noise)
    assert relative_difference(with_theta, without) > 1e-4


def test_saved_theta_file_loads_back(env, theta_folder):
    choice = calibrate(env)[0]
    path = run_node(calibration_nodes(env).PerflowSaveThetaNode, perflow=choice, filename="tiny_theta", ckpt_name=calibration_nodes(env).NO_CHECKPOINT)[0]
    assert path.endswith("tiny_theta.safetensors")
    loaded = run_node(calibration_nodes(env).PerflowLoadThetaNode, theta_name="tiny_theta.safetensors")[0]
    assert torch.allclose(loaded.settings.theta, choice.settings.theta.float().double(), atol=1e-7)
    assert loaded.settings.prediction_type == "diff_eps"


def test_theta_saved_into_a_checkpoint_copy_is_read_by_the_loader(env, checkpoints_folder, tiny_sd15_checkpoint):
    import shutil

    shutil.copy(tiny_sd15_checkpoint, checkpoints_folder / "tiny_base.safetensors")
    choice = calibrate(env)[0]
    path = run_node(calibration_nodes(env).PerflowSaveThetaNode, perflow=choice, filename="tiny_calibrated", ckpt_name="tiny_base.safetensors")[0]
    import folder_paths

    folder_paths.filename_list_cache.pop("checkpoints", None)
    loaded = run_node(env.loader_nodes.PerflowCheckpointLoaderNode, ckpt_name="tiny_calibrated.safetensors")[3]
    assert path.endswith("tiny_calibrated.safetensors")
    assert torch.allclose(loaded.settings.theta, choice.settings.theta.float().double(), atol=1e-7)


def test_saving_never_overwrites_an_existing_file(env, checkpoints_folder, tiny_sd15_checkpoint):
    import shutil

    shutil.copy(tiny_sd15_checkpoint, checkpoints_folder / "tiny_base.safetensors")
    before = (checkpoints_folder / "tiny_base.safetensors").stat().st_mtime_ns
    path = run_node(calibration_nodes(env).PerflowSaveThetaNode, perflow=choice_for(env, "diff_eps"), filename="tiny_base", ckpt_name="tiny_base.safetensors")[0]
    assert path.endswith("tiny_base_1.safetensors")
    assert (checkpoints_folder / "tiny_base.safetensors").stat().st_mtime_ns == before


# ------------------------------------------------------------------------------ flow models (issue 13)
@pytest.mark.parametrize("parameterisation", ["diff_eps", "ddim_eps"])
def test_an_eps_parameterisation_on_a_flow_model_is_refused_naming_it(env, parameterisation):
    flow_model = run_node(env.model_advanced.ModelSamplingSD3, model=env.model, shift=3.0)[0]
    with pytest.raises(ValueError, match=f"parameterisation {parameterisation} cannot drive a flow"):
        comfy_sample(env, flow_model, choice_for(env, parameterisation), 4, 4.5, noise_tensor(61))


def test_a_flow_model_with_multiplier_one_samples_on_the_perflow_grid(env):
    aura = run_node(env.model_advanced.ModelSamplingAuraFlow, model=env.model, shift=3.0)[0]
    sigmas = run_node(env.nodes.PerflowSigmasNode, model=aura, steps=4, denoise=1.0, perflow=None)[0]
    assert sigmas.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    with recorded_timesteps(env.model) as calls:
        out = comfy_sample(env, aura, None, 4, 4.5, noise_tensor(61))
    assert flat(calls) == [t for t in (1.0, 0.75, 0.5, 0.25) for _ in range(2)]  # the model's own timestep: sigma x 1.0
    assert torch.isfinite(out).all() and out.abs().max() > 0.1


# ------------------------------------------------------------------------- inputs an API prompt can send
@pytest.mark.parametrize("filename", ["x" * 300, "theta\x00name"], ids=["300 characters", "NUL"])
def test_a_save_file_name_that_cannot_be_a_file_is_refused_naming_filename(env, theta_folder, filename):
    choice = choice_for(env, "diff_eps")
    with pytest.raises(ValueError, match="^Save PeRFlow Theta: filename must be a file name of at most 200 characters"):
        run_node(calibration_nodes(env).PerflowSaveThetaNode, perflow=choice, filename=filename, ckpt_name=calibration_nodes(env).NO_CHECKPOINT)


@pytest.mark.parametrize(
    "node, inputs, name",
    [
        ("loader_nodes.PerflowCheckpointLoaderNode", {"ckpt_name": 7}, "ckpt_name"),
        ("loader_nodes.PerflowCheckpointLoaderNode", {"ckpt_name": "missing.safetensors"}, "ckpt_name"),
        ("nodes.PerflowApplyDeltaNode", {"delta_name": "missing.safetensors", "strength": 1.0}, "delta_name"),
        ("calibration.PerflowLoadThetaNode", {"theta_name": 7}, "theta_name"),
    ],
)
def test_a_combo_value_that_is_not_an_option_is_refused_naming_the_input(env, node, inputs, name):
    owner, node_class = node.split(".")
    module = calibration_nodes(env) if owner == "calibration" else getattr(env, owner)
    if "model" in inspect.signature(getattr(module, node_class).execute).parameters:
        inputs = {"model": env.model, **inputs}
    with pytest.raises(ValueError, match=f"^[^:]+: {name} .* is not a file in models/"):
        run_node(getattr(module, node_class), **inputs)


# ------------------------------------------------------------------------- what the nodes show (issue 11)
def shown_timesteps(text: str) -> list:
    (line,) = [line for line in text.splitlines() if line.startswith("timesteps the network sees")]
    return [float(t) for t in line.split(": ")[1].split(", ")]


def ksampler_run(env, steps, perflow=None):
    return env.nodes.PerflowKSamplerNode.execute(
        model=env.model, seed=0, steps=steps, cfg=1.0, positive=env.positive, negative=env.negative,
        latent_image={"samples": torch.zeros(LATENT_SHAPE)}, denoise=1.0, perflow=perflow,
    )


@pytest.mark.parametrize("steps", [4, 8])
def test_ksampler_shows_the_timesteps_the_network_sees(env, steps):
    with recorded_timesteps(env.model) as calls:
        text = node_text(ksampler_run(env, steps))
    assert shown_timesteps(text) == flat(calls) == [float(t) for t in GRIDS[steps]]


def test_scheduler_shows_its_timesteps_and_what_auto_resolved_to(env):
    text = node_text(env.nodes.PerflowSigmasNode.execute(model=env.model, steps=4, denoise=0.5, perflow=None))
    assert shown_timesteps(text) == [float(t) for t in GRIDS[8][4:]]
    assert "parameterisation: auto -> diff_eps for this model" in text


def test_auto_is_shown_for_the_sampling_a_patch_gives_the_model(env):
    v_model = run_node(env.model_advanced.ModelSamplingDiscrete, model=env.model, sampling="v_prediction", zsnr=False)[0]
    text = node_text(env.nodes.PerflowSigmasNode.execute(model=v_model, steps=4, denoise=1.0, perflow=None))
    assert "parameterisation: auto -> velocity for this model" in text


def test_sampler_shows_its_settings_and_where_the_timesteps_are(env):
    text = node_text(env.nodes.PerflowSamplerNode.execute(perflow=choice_for(env, "ddim_eps", THETA_TEXT)))
    assert "parameterisation: ddim_eps" in text
    assert "0.1, -0.05, 0.2\n-0.08, 0.03, -0.1\n0.05, 0.02, 0.15\n-0.12, -0.04, 0.05" in text
    assert "shown on the PeRFlow Scheduler" in text


def test_checkpoint_loader_shows_the_settings_read_from_the_file(env, checkpoints_folder):
    path = checkpoints_folder / "tiny_shown.safetensors"
    build_tiny_sd15_checkpoint(path, perflow={"theta": THETA_ROWS, "segment_boundaries": [1000, 700, 400, 150, 0], "prediction_type": "velocity"})
    text = node_text(env.loader_nodes.PerflowCheckpointLoaderNode.execute(ckpt_name=path.name))
    assert "parameterisation: velocity" in text
    assert "segments: K = 4, boundaries 1000, 700, 400, 150, 0 (custom)" in text
    assert "0.1, -0.05, 0.2" in text and "-0.12, -0.04, 0.05" in text


def test_a_checkpoint_without_a_parameterisation_shows_what_auto_picked(env, checkpoints_folder, tiny_sd15_checkpoint):
    link = checkpoints_folder / "plain_shown.safetensors"
    link.symlink_to(tiny_sd15_checkpoint)
    text = node_text(env.loader_nodes.PerflowCheckpointLoaderNode.execute(ckpt_name=link.name))
    assert "parameterisation: auto -> diff_eps for this model" in text


def test_preview_any_prints_a_perflow_value_as_readable_text(env):
    from comfy_extras.nodes_preview_any import PreviewAny

    choice = choice_for(env, "auto", THETA_TEXT)
    (text,) = PreviewAny().main(source=choice)["ui"]["text"]
    assert text.splitlines() == [
        "parameterisation: auto (per model family: SD1.x diff_eps, SDXL ddim_eps, SD2.x-v and flow models velocity)",
        "segments: K = 4, boundaries 1000, 750, 500, 250, 0 (uniform)",
        "theta (gain, window-end scale, output change), one row per segment:",
        "0.1, -0.05, 0.2",
        "-0.08, 0.03, -0.1",
        "0.05, 0.02, 0.15",
        "-0.12, -0.04, 0.05",
    ]


def test_the_printed_theta_rows_paste_back_into_perflow_settings(env):
    choice = choice_for(env, "diff_eps", THETA_TEXT)
    rows = str(choice).split("one row per segment:\n")[1]
    assert env.settings_node.build_choice("diff_eps", 4, "", rows).settings == choice.settings


def karras_sigmas(env, steps):
    return env.comfy.samplers.calculate_sigmas(env.model.get_model_object("model_sampling"), "karras", steps)


def sample_with_sigmas(env, sigmas, choice=None):
    sampler = run_node(env.nodes.PerflowSamplerNode, perflow=choice)[0]
    guider = env.comfy.samplers.CFGGuider(env.model)
    guider.set_conds(env.positive, env.negative)
    guider.set_cfg(1.0)
    return guider.sample(noise_tensor(1), torch.zeros(LATENT_SHAPE), sampler, sigmas)


@pytest.mark.parametrize("segments", [1, 4])
def test_sigmas_off_the_training_grid_stop_the_run_naming_sigmas(env, segments):
    # With one segment no step crosses a boundary: only the grid check stands between karras and a silent snap.
    choice = env.settings_node.build_choice("diff_eps", segments)
    with recorded_timesteps(env.model) as calls:
        with pytest.raises(ValueError, match=r"^sigmas: .* is not one of the model's training sigmas .* PeRFlow Scheduler's sigmas"):
            sample_with_sigmas(env, karras_sigmas(env, 8), choice)
    assert calls == []


def test_a_stock_schedule_of_training_sigmas_on_the_boundaries_runs(env):
    sigmas = env.comfy.samplers.calculate_sigmas(env.model.get_model_object("model_sampling"), "simple", 8)
    with recorded_timesteps(env.model) as calls:
        sample_with_sigmas(env, sigmas)
    assert flat(calls) == [float(t) for t in GRIDS[8]]


def test_errors_name_the_node_by_its_display_name(env):
    with pytest.raises(ValueError, match=r"^PeRFlow Settings: theta"):
        env.nodes.PerflowSettingsNode.execute(parameterisation="diff_eps", segments=4, boundaries="", theta="nan, 0, 0")
