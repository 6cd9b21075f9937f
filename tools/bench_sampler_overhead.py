"""Maintainer script: the sampler's own per-step cost with a nearly free model (issue 14, point 4).

    cd /path/to/repo && COMFYUI_PATH=/path/to/ComfyUI PYTHONPATH=. PYTHONDONTWRITEBYTECODE=1 \
        .venv-comfy/bin/python tools/bench_sampler_overhead.py [--quick] [--repeats N]

ComfyUI side: ComfyUI's real sampling path, exactly what a SamplerCustomAdvanced node runs (the node's own
``sample``: CFGGuider, cfg 4.5, CLIPTextEncode positive and negative conditioning, the latent preview
callback, ``guider.sample(noise, latent, sampler, sigmas)``). The MODEL is the tiny SD1.5 checkpoint of
tests/support/comfyui.py loaded by ComfyUI, with its UNet's ``_forward`` (the network body, which ComfyUI's
DIFFUSION_MODEL wrappers call, the pack's timestep shift among them) replaced by ``0.1 * x``: everything
around the network (calc_cond_batch, CFG, calculate_input/denoised, the wrappers) runs as in a real
generation; only the network itself costs ~0. Samplers on the SAME sigmas (the PeRFlow Scheduler node's):
the PeRFlow Sampler node with theta = 0 and with a non-zero theta, ComfyUI's ``euler`` and ``dpmpp_2m``.
A timing covers one whole node call, so ComfyUI's fixed per-call cost (model loading check, conds) is in
every sampler's time: the ratios are of whole calls, the extra microseconds per step are what remains.

diffusers side: ``PerflowScheduler`` (the pack's perflow_core, the same code) with theta = 0 and non-zero,
vs diffusers' ``EulerDiscreteScheduler`` and ``DDIMScheduler``, in a hand-written pipeline loop
(``set_timesteps``, ``init_noise_sigma``, ``scale_model_input``, ``step``) with ``model = 0.1 * x``.

One thread (torch.set_num_threads(1)), CPU, no progress bars; each row's samplers are run interleaved
(the order rotated every repetition) and the medians reported. The clock is the process's CPU time by
default (``--clock wall`` for perf_counter): on a quiet machine the two agree, on a busy one the wall
clock also counts the time other processes held the core. Never used by the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the tests' support package

from support.comfyui import FixedNoise, build_tiny_sd15_checkpoint, import_pack, load_checkpoint, pack_core, run_node  # noqa: E402

THETA_TEXT = "0.1, 0.05, 0.2; 0.1, 0, 0.1; 0, 0.02, 0; 0.05, 0, 0"
THETA_ROWS = [[0.1, 0.05, 0.2], [0.1, 0.0, 0.1], [0.0, 0.02, 0.0], [0.05, 0.0, 0.0]]
SIZES = (64, 128)  # latent side: 1x4xSxS
STEPS = (4, 8)
CFG = 4.5
TARGETS = {"theta=0": 1.15, "theta on": 1.30}  # ours / euler, ComfyUI path, CPU (issue 14)
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def interleaved_medians(runs: Dict[str, Callable[[], object]], args) -> Dict[str, float]:
    """Median seconds of each run; every repetition runs all of them, starting with a different one."""
    names, clock = list(runs), CLOCKS[args.clock]
    for _ in range(args.warmup):
        for name in names:
            runs[name]()
    times = {name: [] for name in names}
    for repeat in range(args.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            started = clock()
            runs[name]()
            times[name].append(clock() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def free_forward(x, *args, **kwargs):
    return 0.1 * x


def comfy_rows(args) -> list:
    pack_nodes = import_pack()
    import comfy.samplers
    import comfy.utils
    import comfy_extras.nodes_custom_sampler as custom_sampler
    import nodes as comfy_nodes
    from comfyui_perflow_pack.nodes.settings_node import build_choice

    comfy.utils.PROGRESS_BAR_ENABLED = False
    with tempfile.TemporaryDirectory(prefix="perflow_bench_") as folder:
        model, clip, _ = load_checkpoint(build_tiny_sd15_checkpoint(Path(folder) / "tiny_sd15.safetensors"))
    model.model.diffusion_model._forward = free_forward  # the network body costs ~0; its wrappers still run
    positive = run_node(comfy_nodes.CLIPTextEncode, clip=clip, text="a photograph of an astronaut riding a horse")[0]
    negative = run_node(comfy_nodes.CLIPTextEncode, clip=clip, text="blurry, low quality")[0]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(CFG)
    node = custom_sampler.SamplerCustomAdvanced()
    choices = {"theta=0": build_choice("diff_eps", 4, "", ""), "theta on": build_choice("diff_eps", 4, "", THETA_TEXT)}
    samplers = {f"ours {name}": run_node(pack_nodes.PerflowSamplerNode, perflow=choice)[0] for name, choice in choices.items()}
    samplers.update({name: comfy.samplers.sampler_object(name) for name in ("euler", "dpmpp_2m")})

    rows = []
    for size in SIZES:
        latent = {"samples": torch.zeros(1, 4, size, size)}
        noise = FixedNoise(torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(size)))
        for steps in STEPS:
            sigmas = [run_node(pack_nodes.PerflowSigmasNode, model=model, steps=steps, denoise=1.0, perflow=c)[0] for c in choices.values()]
            assert torch.equal(sigmas[0], sigmas[1]), "theta changed the sigmas"

            def run(sampler, sigmas=sigmas[0], latent=latent, noise=noise):
                return node.sample(noise, guider, sampler, sigmas, latent)[0]["samples"]

            for name, sampler in samplers.items():
                assert torch.isfinite(run(sampler)).all(), f"{name}: non-finite output"
            medians = interleaved_medians({name: (lambda s=s: run(s)) for name, s in samplers.items()}, args)
            rows.append((size, steps, medians))
    return rows


def diffusers_rows(args) -> list:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    PerflowScheduler = pack_core().PerflowScheduler
    schedulers = {
        "ours theta=0": PerflowScheduler(segments=4, prediction_type="diff_eps", **SD_BETAS),
        "ours theta on": PerflowScheduler(segments=4, prediction_type="diff_eps", theta_init=THETA_ROWS, **SD_BETAS),
        "Euler": EulerDiscreteScheduler(**SD_BETAS),
        "DDIM": DDIMScheduler(**SD_BETAS),
    }

    def model(x, t):
        return 0.1 * x

    def loop(scheduler, noise, steps):
        scheduler.set_timesteps(steps)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
        return x

    rows = []
    for size in SIZES:
        noise = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(size))
        for steps in STEPS:
            for name, scheduler in schedulers.items():
                assert torch.isfinite(loop(scheduler, noise, steps)).all(), f"{name}: non-finite output"
            runs = {name: (lambda s=s: loop(s, noise, steps)) for name, s in schedulers.items()}
            rows.append((size, steps, interleaved_medians(runs, args)))
    return rows


def print_table(title: str, rows: list, base: str, other: str, targets: Dict[str, float]) -> None:
    print(f"\n{title}")
    header = f"{'latent':<12}{'steps':>5}  {'variant':<9}{'ours ms':>9}{base + ' ms':>12}{other + ' ms':>13}"
    header += f"{'extra us/step':>15}{'ours/' + base:>12}{'ours/' + other:>15}"
    print(header + ("   target /" + base if targets else ""))
    for size, steps, medians in rows:
        for variant in ("theta=0", "theta on"):
            ours, reference, second = medians[f"ours {variant}"], medians[base], medians[other]
            ratio = ours / reference
            line = f"{f'1x4x{size}x{size}':<12}{steps:>5}  {variant:<9}{ours * 1e3:>9.3f}{reference * 1e3:>12.3f}{second * 1e3:>13.3f}"
            line += f"{(ours - reference) / steps * 1e6:>15.1f}{ratio:>11.2f}x{ours / second:>14.2f}x"
            if targets:
                target = targets[variant]
                line += f"   <= {target:.2f}x {'ok' if ratio <= target else 'OVER'}"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run; the numbers are rough)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per sampler (default 51, --quick 3)")
    parser.add_argument("--clock", choices=CLOCKS, default="cpu", help="cpu: this process's CPU time (default; steady on a "
                        "busy machine, the same as wall time on a quiet one with one thread), wall: perf_counter")
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 51)
    args.warmup = 1 if args.quick else 3
    started = time.perf_counter()
    torch.set_num_threads(1)
    comfy = comfy_rows(args)
    torch.set_num_threads(1)  # in case an import changed it
    diffusers = diffusers_rows(args)
    import comfyui_version

    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"ComfyUI {comfyui_version.__version__}, torch {torch.__version__}, {torch.get_num_threads()} thread, CPU "
          f"(load average at the end {load} on {os.cpu_count()} cores)")
    print(f"{args.clock} time, medians of {args.repeats} interleaved runs ({args.warmup} warm-up); "
          "extra us/step = (ours - euler or Euler) / steps")
    print_table(
        f"ComfyUI: SamplerCustomAdvanced (CFGGuider, cfg {CFG}, CLIPTextEncode conds), free UNet body (0.1 * x), "
        "PeRFlow Scheduler sigmas, ms per node call",
        comfy, "euler", "dpmpp_2m", TARGETS,
    )
    print_table("diffusers: set_timesteps + loop of scale_model_input / model (0.1 * x) / step, ms per loop", diffusers, "Euler", "DDIM", {})
    print(f"\nwall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
