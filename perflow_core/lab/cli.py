"""The `perflow` command line: `demo` (the embedded student against its teacher), `train-student`, `calibrate`,
`write-theta`, and `bench` (handed to `perflow_core.lab.benchmark`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from PIL import Image, ImageDraw

from .analytic import DEFAULT_SMOOTHING, AnalyticDigitsDenoiser, noise_for_seeds, solve_probability_flow_ode
from .pipeline import to_images
from ..time_grid import GRID_SOLVERS


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
    """The embedded PeRFlow student at 4 steps vs its teacher with the best solver vs the exact ODE."""
    from .demo import format_demo_table, run_demo_comparison

    if args.samples < 1 or args.grid < 1:
        raise ValueError(f"--samples and --grid must be at least 1; got {args.samples} and {args.grid}")
    seeds = list(range(args.seed, args.seed + args.samples))
    result = run_demo_comparison(seeds, args.steps, args.student)
    student, best = result.student, result.best_on_teacher
    shown = slice(0, min(args.grid, len(seeds)))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = [student.samples[shown].float(), best.samples[shown].float(), result.exact[shown].float()]
    labels = [f"student, PeRFlow {args.steps} steps", f"teacher, {best.sampler} {args.steps} steps", "teacher, exact ODE"]
    image_grid(rows, labels).save(output)
    print(f"student: {result.student_path.name}; teacher: the analytic 8x8 digits model (smoothing {result.smoothing:g}), SD1.5 schedule")
    print(f"{len(seeds)} noise seeds from {args.seed}; every sample compared at sigma = 0 (RMSE, data in [-1, 1])")
    print(format_demo_table(result))
    print(
        f"student {args.steps} steps / best solver on the teacher at {args.steps} steps ({best.sampler}): "
        f"{student.error / best.error:.3f}x the error"
    )
    print(f"wrote {output} (rows: student, teacher with {best.sampler}, exact ODE; first {shown.stop} seeds)")
    return 0


def analytic_model_fn(smoothing: float):
    model = AnalyticDigitsDenoiser(smoothing=smoothing)
    return lambda z, timestep: model(z, float(timestep)).sample


def run_calibrate(args: argparse.Namespace) -> int:
    """Fit theta for the analytic model or a trained student; write a theta file (and optionally a checkpoint copy)."""
    from ..calibration import calibrate_theta, ode_teacher
    from ..sampling import SamplingPlan
    from ..checkpoint import save_theta_file, write_perflow_checkpoint
    from ..noise_schedule import alphas_cumprod_for

    if args.samples < 1 or args.holdout < 1:
        raise ValueError("--samples and --holdout must be at least 1")
    if args.checkpoint and not args.output_checkpoint:
        raise ValueError("--checkpoint needs --output-checkpoint (the new file; the checkpoint itself is never changed)")
    model_fn, settings, smoothing, described = _calibration_model(args)
    alphas = alphas_cumprod_for()
    fit = noise_for_seeds(range(args.seed, args.seed + args.samples)).double()
    holdout_start = args.seed + 1_000_000
    held_out = noise_for_seeds(range(holdout_start, holdout_start + args.holdout)).double()
    teacher = None
    if args.teacher == "exact":
        denoiser = AnalyticDigitsDenoiser(smoothing=smoothing)
        solve = lambda z, alpha_from, alpha_to: solve_probability_flow_ode(denoiser, z, alpha_from, alpha_to)  # noqa: E731
        teacher = ode_teacher(solve, SamplingPlan.for_steps(settings, args.steps, alphas))
    if args.fit_boundaries and args.teacher == "exact":
        raise ValueError("--fit-boundaries learns the grid from its own grid teacher; use --teacher-solver, not --teacher exact")
    report = calibrate_theta(
        model_fn, settings, args.steps, alphas, fit, held_out, teacher, args.teacher_multiplier, fit_boundaries=args.fit_boundaries, teacher_solver=args.teacher_solver
    )
    learned = report.settings
    save_theta_file(args.output, learned, overwrite=args.overwrite)
    teacher_name = (
        f"the exact probability-flow ODE of the analytic model (smoothing {smoothing})"
        if args.teacher == "exact"
        else f"{args.teacher_solver} on the same model at {args.teacher_multiplier}x the steps"
    )
    print(f"model: {described}; {args.steps} steps, K={learned.segments}, {settings.prediction_type}; teacher: {teacher_name}")
    print(report.summary())
    print("segment boundaries: " + ", ".join(f"{b:g}" for b in learned.build_segments().boundaries) + (" (learned)" if args.fit_boundaries else ""))
    print("theta (gain, window-end scale, output change):")
    for k, row in enumerate(report.theta.tolist()):
        print(f"  segment {k}: " + ", ".join(f"{v:+.4f}" for v in row))
    print(f"wrote {args.output}")
    if args.checkpoint:
        record = {
            **{name: getattr(args, name) for name in CALIBRATION_RECORD},
            "teacher_description": teacher_name,
            "smoothing": smoothing,
            "held_out_rmse_theta_zero": round(report.error_before, 6),
            "held_out_rmse_calibrated": round(report.error_after, 6),
        }
        metadata = {"perflow_theta_calibration": json.dumps(record, sort_keys=True)}
        write_perflow_checkpoint(args.checkpoint, args.output_checkpoint, learned, extra_metadata=metadata, overwrite=args.overwrite)
        print(f"wrote {args.output_checkpoint}")
    return 0


OVERWRITE_HELP = "replace an existing output file (without it, an existing file is refused and left as it is)"
# The perflow calibrate arguments recorded in a checkpoint written with --output-checkpoint.
CALIBRATION_RECORD = ("teacher", "steps", "samples", "holdout", "seed", "teacher_multiplier", "teacher_solver", "fit_boundaries")


def _calibration_model(args: argparse.Namespace):
    """``(model_fn, settings, smoothing of the analytic model, description)`` for ``perflow calibrate``."""
    from ..settings import PerflowSettings

    if not args.student:
        smoothing = DEFAULT_SMOOTHING if args.smoothing is None else args.smoothing
        settings = PerflowSettings(segments=args.segments, prediction_type=args.parameterisation)
        return analytic_model_fn(smoothing), settings, smoothing, f"analytic 8x8 digits (smoothing {smoothing})"
    from .reflow import load_student, student_smoothing

    student, settings = load_student(args.student)
    smoothing = student_smoothing(args.student) if args.smoothing is None else args.smoothing

    def model_fn(z: torch.Tensor, timestep: float) -> torch.Tensor:
        with torch.no_grad():
            return student(z.float(), timestep).sample.to(z.dtype)

    described = f"student {args.student} (its teacher: analytic digits, smoothing {smoothing})"
    return model_fn, settings.replace(theta=None), smoothing, described


def run_write_theta(args: argparse.Namespace) -> int:
    """Copy a checkpoint with the PeRFlow settings of a theta file added."""
    from ..checkpoint import read_perflow_settings, write_perflow_checkpoint

    write_perflow_checkpoint(args.checkpoint, args.output, read_perflow_settings(args.theta), overwrite=args.overwrite)
    print(f"wrote {args.output}")
    return 0


def add_theta_commands(commands) -> None:
    calibrate = commands.add_parser("calibrate", help="fit theta for the analytic model or a student against a teacher")
    calibrate.add_argument("--student", help="calibrate this trained student file (segments, parameterisation from it)")
    calibrate.add_argument(
        "--teacher",
        choices=("perflow", "exact"),
        default="perflow",
        help="perflow: the model's own PeRFlow flow at --teacher-multiplier x steps (default); "
        "exact: the analytic model's exact ODE (a student's own teacher)",
    )
    calibrate.add_argument("--steps", type=int, default=4, help="network calls to calibrate for (default 4)")
    calibrate.add_argument("--segments", type=int, default=4, help="segments K of the analytic model (default 4)")
    calibrate.add_argument("--parameterisation", default="ddim_eps", help="analytic model: ddim_eps (default), diff_eps or velocity")
    calibrate.add_argument(
        "--smoothing", type=float, default=None, help=f"data smoothing of the analytic model (default {DEFAULT_SMOOTHING}, or the student's)"
    )
    calibrate.add_argument("--samples", type=int, default=128, help="fit seeds (default 128)")
    calibrate.add_argument("--holdout", type=int, default=256, help="held-out seeds for the report (default 256)")
    calibrate.add_argument("--seed", type=int, default=0, help="first fit seed; held-out seeds start 1,000,000 later")
    calibrate.add_argument("--teacher-multiplier", type=int, default=8, help="the teacher takes this many times the steps")
    calibrate.add_argument(
        "--teacher-solver", choices=GRID_SOLVERS, default="perflow", help="perflow (default) or dpmpp_2m: second order, same calls (ddim_eps only)"
    )
    calibrate.add_argument(
        "--fit-boundaries", action="store_true", help="also learn the time grid: one segment per step, boundaries fitted with theta (ddim_eps only)"
    )
    calibrate.add_argument("--output", default="outputs/perflow_theta.safetensors", help="theta file to write")
    calibrate.add_argument("--checkpoint", help="also write a copy of this single-file checkpoint with the theta added")
    calibrate.add_argument("--output-checkpoint", help="where that copy goes (required with --checkpoint)")
    calibrate.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    calibrate.set_defaults(run=run_calibrate)
    write = commands.add_parser("write-theta", help="copy a checkpoint with the settings of a theta file added (perflow.* keys)")
    write.add_argument("--theta", required=True, help="a theta file (perflow calibrate's output)")
    write.add_argument("--checkpoint", required=True, help="the single-file checkpoint to copy")
    write.add_argument("--output", required=True, help="the new file")
    write.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    write.set_defaults(run=run_write_theta)
    # `perflow bench ...` hands its arguments to perflow_core.lab.benchmark (see main); listed here for --help.
    commands.add_parser("bench", help="benchmark PeRFlow against diffusers (and ComfyUI) samplers; see perflow bench --help")


def _float_list(text: str) -> List[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,1,4,2, got {text!r}") from None


def run_train_student(args: argparse.Namespace) -> int:
    """Train a PeRFlow student of the analytic digits model by piecewise reflow and write it as one .safetensors."""
    from dataclasses import asdict

    from .reflow import (
        ReflowConfig,
        default_digits_student,
        evaluate_digits_student,
        load_student,
        save_student,
        student_training,
        train_digits_student,
    )
    from ..settings import PerflowSettings

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
        window_weights=args.window_weights,
    )
    print(f"piecewise reflow of the analytic digits model (smoothing {args.smoothing}): {config}")
    if args.init:
        student, settings = load_student(args.init)
        if (settings.segments, settings.prediction_type) != (config.segments, config.parameterisation):
            raise ValueError(
                f"--init {args.init} samples with K = {settings.segments}, {settings.prediction_type}; "
                f"this run trains K = {config.segments}, {config.parameterisation}"
            )
    else:
        torch.manual_seed(config.seed)
        student = default_digits_student(num_prototypes=args.prototypes, num_memory_stages=args.memory_stages)
    student, history = train_digits_student(
        config, args.smoothing, student, log_every=max(args.steps // 10, 1), initialise_prototypes=not args.init
    )
    settings = PerflowSettings(segments=config.segments, prediction_type=config.parameterisation)
    training = {
        "command": "perflow train-student",
        "smoothing": args.smoothing,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "init": Path(args.init).name if args.init else None,
        "init_training": student_training(args.init) if args.init else None,
        **asdict(config),
    }
    save_student(args.output, student, settings, training=training)
    report = evaluate_digits_student(student, settings, smoothing=args.smoothing)
    print(f"loss curve: {history.summary()}")
    print(f"time: {history.seconds:.1f} s ({history.teacher_seconds:.1f} s teacher pool), {torch.get_num_threads()} CPU threads")
    for steps in report.student:
        print(
            f"{steps}-step RMSE to the exact ODE on the {len(report.seeds)} validation seeds {report.seeds[0]}-{report.seeds[-1]}: student {report.student[steps]:.4f}, "
            f"PeRFlow on the teacher {report.teacher[steps]:.4f}"
        )
    print(f"wrote {args.output} ({Path(args.output).stat().st_size / 1e6:.2f} MB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perflow", description="PeRFlow sampling tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the embedded PeRFlow student at 4 steps vs its teacher with the best solver vs the exact ODE")
    demo.add_argument("--steps", type=int, default=4, help="network calls (default 4)")
    demo.add_argument("--samples", type=int, default=256, help="noise seeds measured (default 256)")
    demo.add_argument("--seed", type=int, default=10_000, help="first seed (default 10000; theta was fitted on 0-127)")
    demo.add_argument("--grid", type=int, default=16, help="seeds shown in the PNG (default 16)")
    demo.add_argument("--student", help="a student file (default: the embedded perflow_student_digits.safetensors)")
    demo.add_argument("--output", default="outputs/perflow_demo.png", help="PNG grid to write")
    demo.set_defaults(run=run_demo)
    train = commands.add_parser("train-student", help="train a PeRFlow student of the analytic digits model (reflow)")
    train.add_argument("--output", default="perflow_core/lab/data/perflow_student_digits.safetensors", help="file to write")
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
    train.add_argument(
        "--window-weights", type=_float_list, help="share of samples per window, e.g. 1,1,4,2 (default: t uniform)"
    )
    train.add_argument("--init", help="go on training this student file (its prototypes are kept)")
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
    try:
        return args.run(args)
    except (ValueError, FileExistsError) as error:
        print(f"perflow: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
