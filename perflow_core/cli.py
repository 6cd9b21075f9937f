"""`perflow` command line."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from PIL import Image, ImageDraw

from .analytic import DEFAULT_SMOOTHING, AnalyticDigitsDenoiser, noise_for_seeds, solve_probability_flow_ode
from .pipeline import UnconditionalPipeline, to_images
from .scheduler import PerflowScheduler


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def image_grid(rows: Sequence[torch.Tensor], labels: Sequence[str], scale: int = 6, gap: int = 2) -> Image.Image:
    """Rows of `[N, 1, H, W]` samples in [-1, 1] as one PNG-ready image, a label left of each row."""
    label_width = 120
    count, _, height, width = rows[0].shape
    cell_h, cell_w = height * scale, width * scale
    canvas = Image.new("L", (label_width + count * (cell_w + gap), len(rows) * (cell_h + gap)), color=255)
    draw = ImageDraw.Draw(canvas)
    for r, (row, label) in enumerate(zip(rows, labels)):
        top = r * (cell_h + gap)
        draw.text((4, top + cell_h // 2 - 5), label, fill=0)
        for c, image in enumerate(to_images(row, "pil")):
            canvas.paste(image.resize((cell_w, cell_h), Image.NEAREST), (label_width + c * (cell_w + gap), top))
    return canvas


def run_demo(args: argparse.Namespace) -> int:
    """Sample the embedded analytic model with PeRFlow and compare with the exact ODE solution."""
    seeds = list(range(args.seed, args.seed + args.samples))
    model = AnalyticDigitsDenoiser(smoothing=args.smoothing)
    scheduler = PerflowScheduler(prediction_type="ddim_eps", segments=args.segments)
    pipeline = UnconditionalPipeline(unet=model, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    noise = noise_for_seeds(seeds)

    started = time.perf_counter()
    perflow = pipeline(latents=noise, num_inference_steps=args.steps, output_type="pt").images
    perflow_seconds = time.perf_counter() - started

    alphas = scheduler.alphas_cumprod
    started = time.perf_counter()
    exact = solve_probability_flow_ode(model, noise.double(), float(alphas[-1]), float(alphas[0]))
    exact_seconds = time.perf_counter() - started

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    image_grid([perflow, exact.float()], [f"PeRFlow {args.steps} steps", "exact ODE"]).save(output)
    print(f"model: analytic 8x8 digits denoiser (smoothing {args.smoothing}), SD1.5 noise schedule")
    print(f"PeRFlow: K={args.segments} segments, ddim_eps, {args.steps} steps, theta = 0, {len(seeds)} seeds")
    print(f"RMSE to the exact probability-flow ODE solution (same noise, same end level): {rmse(perflow, exact):.5f}")
    print(f"data RMS for scale: {float(exact.pow(2).mean().sqrt()):.3f}")
    print(f"time: PeRFlow {perflow_seconds * 1000:.1f} ms, exact ODE {exact_seconds * 1000:.1f} ms")
    print(f"wrote {output}")
    return 0


def analytic_model_fn(smoothing: float):
    model = AnalyticDigitsDenoiser(smoothing=smoothing)
    return lambda z, timestep: model(z, float(timestep)).sample


def run_calibrate(args: argparse.Namespace) -> int:
    """Fit theta for the analytic model and write it to a theta file (and optionally a checkpoint copy)."""
    from .calibration import calibrate_theta
    from .checkpoint import save_theta_file, write_perflow_checkpoint
    from .noise_schedule import alphas_cumprod_for
    from .settings import PerflowSettings

    if args.samples < 1 or args.holdout < 1:
        raise ValueError("--samples and --holdout must be at least 1")
    settings = PerflowSettings(segments=args.segments, prediction_type=args.parameterisation)
    fit = noise_for_seeds(range(args.seed, args.seed + args.samples)).double()
    holdout_start = args.seed + 1_000_000
    held_out = noise_for_seeds(range(holdout_start, holdout_start + args.holdout)).double()
    report = calibrate_theta(
        analytic_model_fn(args.smoothing), settings, args.steps, alphas_cumprod_for(), fit, held_out, teacher_multiplier=args.teacher_multiplier
    )
    learned = PerflowSettings(segments=args.segments, theta=report.theta, prediction_type=args.parameterisation)
    save_theta_file(args.output, learned)
    print(f"model: analytic 8x8 digits (smoothing {args.smoothing}); {args.steps} steps, K={args.segments}, {args.parameterisation}")
    print(report.summary())
    print("theta (gain, window-end scale, output change):")
    for k, row in enumerate(report.theta.tolist()):
        print(f"  segment {k}: " + ", ".join(f"{v:+.4f}" for v in row))
    print(f"wrote {args.output}")
    if args.checkpoint:
        write_perflow_checkpoint(args.checkpoint, args.output_checkpoint, learned)
        print(f"wrote {args.output_checkpoint}")
    return 0


def run_write_theta(args: argparse.Namespace) -> int:
    """Copy a checkpoint with the PeRFlow settings of a theta file added."""
    from .checkpoint import read_perflow_settings, write_perflow_checkpoint

    write_perflow_checkpoint(args.checkpoint, args.output, read_perflow_settings(args.theta))
    print(f"wrote {args.output}")
    return 0


def add_theta_commands(commands) -> None:
    calibrate = commands.add_parser("calibrate", help="fit theta for the analytic model against a many-step teacher")
    calibrate.add_argument("--steps", type=int, default=4, help="network calls to calibrate for (default 4)")
    calibrate.add_argument("--segments", type=int, default=4, help="segments K (default 4)")
    calibrate.add_argument("--parameterisation", default="ddim_eps", help="ddim_eps (default), diff_eps or velocity")
    calibrate.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING, help="data smoothing of the analytic model")
    calibrate.add_argument("--samples", type=int, default=128, help="fit seeds (default 128)")
    calibrate.add_argument("--holdout", type=int, default=256, help="held-out seeds for the report (default 256)")
    calibrate.add_argument("--seed", type=int, default=0, help="first fit seed; held-out seeds start 1,000,000 later")
    calibrate.add_argument("--teacher-multiplier", type=int, default=8, help="the teacher takes this many times the steps")
    calibrate.add_argument("--output", default="outputs/perflow_theta.safetensors", help="theta file to write")
    calibrate.add_argument("--checkpoint", help="also write a copy of this single-file checkpoint with the theta added")
    calibrate.add_argument("--output-checkpoint", help="where that copy goes (required with --checkpoint)")
    calibrate.set_defaults(run=run_calibrate)
    write = commands.add_parser("write-theta", help="copy a checkpoint with the settings of a theta file added (perflow.* keys)")
    write.add_argument("--theta", required=True, help="a theta file (perflow calibrate's output)")
    write.add_argument("--checkpoint", required=True, help="the single-file checkpoint to copy")
    write.add_argument("--output", required=True, help="the new file")
    write.set_defaults(run=run_write_theta)
    # `perflow bench ...` hands its arguments to perflow_core.benchmark (see main); listed here for --help.
    commands.add_parser("bench", help="benchmark PeRFlow against diffusers (and ComfyUI) samplers; see perflow bench --help")


def run_train_student(args: argparse.Namespace) -> int:
    """Train a PeRFlow student of the analytic digits model by piecewise reflow and write it as one .safetensors."""
    from dataclasses import asdict

    from .reflow import ReflowConfig, default_digits_student, evaluate_digits_student, save_student, train_digits_student
    from .settings import PerflowSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    config = ReflowConfig(
        segments=args.segments,
        parameterisation=args.parameterisation,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        steps=args.steps,
        seed=args.seed,
        teacher_pool_size=args.teacher_pool,
        window_start_share=args.window_start_share,
    )
    print(f"piecewise reflow of the analytic digits model (smoothing {args.smoothing}): {config}")
    torch.manual_seed(config.seed)
    student = default_digits_student(num_prototypes=args.prototypes, num_memory_stages=args.memory_stages)
    student, history = train_digits_student(config, args.smoothing, student, log_every=max(args.steps // 10, 1))
    settings = PerflowSettings(segments=config.segments, prediction_type=config.parameterisation)
    training = {
        "command": "perflow train-student",
        "smoothing": args.smoothing,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        **asdict(config),
    }
    save_student(args.output, student, settings, training=training)
    report = evaluate_digits_student(student, settings, smoothing=args.smoothing)
    print(f"loss curve: {history.summary()}")
    print(f"time: {history.seconds:.1f} s ({history.teacher_seconds:.1f} s teacher pool), {torch.get_num_threads()} CPU threads")
    for steps in report.student:
        print(
            f"{steps}-step RMSE to the exact ODE on {len(report.seeds)} held-out seeds: student {report.student[steps]:.4f}, "
            f"PeRFlow on the teacher {report.teacher[steps]:.4f}"
        )
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 1e6:.2f} MB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perflow", description="PeRFlow sampling tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="sample the embedded analytic model and compare with the exact ODE")
    demo.add_argument("--steps", type=int, default=4, help="network calls (default 4)")
    demo.add_argument("--segments", type=int, default=4, help="segments K (default 4)")
    demo.add_argument("--samples", type=int, default=16, help="number of seeds (default 16)")
    demo.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    demo.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING, help="data smoothing in [-1, 1] units")
    demo.add_argument("--output", default="outputs/perflow_demo.png", help="PNG grid to write")
    demo.set_defaults(run=run_demo)
    train = commands.add_parser("train-student", help="train a PeRFlow student of the analytic digits model (reflow)")
    train.add_argument("--output", default="perflow_core/data/perflow_student_digits.safetensors", help="file to write")
    train.add_argument("--steps", type=int, default=6000, help="optimiser steps (default 6000)")
    train.add_argument("--seed", type=int, default=0, help="seed of the whole run (default 0)")
    train.add_argument("--segments", type=int, default=4, help="segments K (default 4)")
    train.add_argument("--parameterisation", default="velocity", choices=["velocity", "ddim_eps", "diff_eps"])
    train.add_argument("--batch-size", type=int, default=256, help="samples per step (default 256)")
    train.add_argument("--learning-rate", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    train.add_argument("--teacher-pool", type=int, default=65536, help="teacher pairs per window, 0: fresh every step")
    train.add_argument("--window-start-share", type=float, default=0.5, help="share of t moved to window starts (0: uniform t)")
    train.add_argument("--prototypes", type=int, default=2048, help="size of the student's prototype memory")
    train.add_argument("--memory-stages", type=int, default=2, help="query points of the prototype memory")
    train.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING, help="data smoothing in [-1, 1] units")
    train.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, reproducible; 0: torch's default)")
    train.set_defaults(run=run_train_student)
    add_theta_commands(commands)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .benchmark import main as benchmark_main

        return benchmark_main(argv[1:])
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) == "calibrate" and args.checkpoint and not args.output_checkpoint:
        print("perflow: error: --checkpoint needs --output-checkpoint", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except ValueError as error:
        print(f"perflow: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
