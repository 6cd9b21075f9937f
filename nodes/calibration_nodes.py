"""Calibrate theta on the user's own model, save it, and load it back."""

from __future__ import annotations

import os

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..perflow_core.calibration import calibrate_theta
from ..perflow_core.checkpoint import read_perflow_settings, save_theta_file, write_perflow_checkpoint, write_under_free_name
from ..perflow_core.k_sampling import ModelSpace, check_parameterisation, model_sampling_of, perflow_sigmas
from ..perflow_core.report_plot import calibration_chart
from ..perflow_core.time_grid import GRID_SOLVERS, check_grid_fit, check_solver
from .glue import PerflowChoice, choice_or_default, file_stem, with_perflow_timesteps
from .model_files import CHECKPOINTS, pack_model_files
from .settings_node import Perflow, optional_perflow_input

THETA_FOLDER = "perflow_theta"
THETAS = pack_model_files(THETA_FOLDER)
NO_CHECKPOINT = "(standalone theta file)"
HOLDOUT_SEED_OFFSET = 1_000_000


def seeded_noise(shape, seeds) -> torch.Tensor:
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def comfy_model_fn(model, extra_args, space: ModelSpace):
    """model_fn(z, timestep) -> raw output, through ComfyUI's wrapped model (CFG and patches applied)."""
    extra_args = with_perflow_timesteps(extra_args, space)
    return lambda z, timestep: space.call(model, z, timestep, extra_args)[1]


def progress_bar_and_cancel():
    """A calibration's ``progress``: ComfyUI's progress bar, and Cancel honoured before every model call."""
    bar = comfy.utils.ProgressBar(1)

    def progress(done: int, planned: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, planned)

    return progress


def check_teacher_options(settings, fit_time_grid: bool, teacher_solver: str) -> None:
    """The core's checks, with the messages naming this node's inputs."""
    if fit_time_grid:
        check_grid_fit(settings, teacher_solver, "fit_time_grid")
    else:
        check_solver(teacher_solver, settings)


def run_calibration(model, positive, negative, cfg, latent, choice: PerflowChoice, steps, teacher_multiplier, samples, holdout, seed, fit_time_grid=False, teacher_solver="perflow"):
    """Calibrate inside a ComfyUI sampling call, so the model is loaded and the conditioning prepared."""
    found = {}
    shape = latent["samples"].shape[1:]

    def calibration_function(wrapped, x, sigmas, extra_args=None, callback=None, disable=None):
        space = ModelSpace.of(model_sampling_of(wrapped))
        settings = choice.resolved_for(wrapped.inner_model.inner_model)
        check_parameterisation(settings, space)
        check_teacher_options(settings, fit_time_grid, teacher_solver)
        fit = seeded_noise(shape, range(seed, seed + samples)).to(x)
        held_out = seeded_noise(shape, range(seed + HOLDOUT_SEED_OFFSET, seed + HOLDOUT_SEED_OFFSET + holdout)).to(x)
        model_fn = comfy_model_fn(wrapped, extra_args, space)
        found["report"] = calibrate_theta(
            model_fn, settings, steps, space.alphas_cumprod, fit, held_out, teacher_multiplier=teacher_multiplier,
            fit_boundaries=fit_time_grid, teacher_solver=teacher_solver, progress=progress_bar_and_cancel(),
        )
        return x

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    space = ModelSpace.of(model.get_model_object("model_sampling"))
    sigmas = perflow_sigmas(space, choice.settings, steps)
    empty = torch.zeros((1,) + tuple(shape))
    guider.sample(empty, empty, comfy.samplers.KSAMPLER(calibration_function), sigmas, seed=seed)
    return found["report"]


def report_text(report) -> str:
    """The numbers, then the calibrated settings as PeRFlow Settings takes them (segments, boundaries, theta)."""
    settings = report.settings
    boundaries = ", ".join(f"{b:g}" for b in settings.build_segments().boundaries)
    theta = "\n".join(", ".join(f"{v:.4f}" for v in row) for row in settings.theta.tolist())
    return (
        f"{report.summary()}\nsegments: {settings.segments}\nboundaries: {boundaries}\n"
        f"theta (gain, window-end scale, output change) per segment:\n{theta}"
    )


def chart_tensor(report) -> torch.Tensor:
    image = calibration_chart(report.segment_errors_before, report.segment_errors_after, "held-out RMSE to the teacher after each step")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


class PerflowCalibrateNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowCalibrate",
            display_name="PeRFlow Calibrate Theta",
            category="PeRFlow/theta",
            description="Learns theta for this model, prompt and step count: the K-step piecewise rectified flow (PeRFlow) sampler is fitted by least squares "
            "to a many-step teacher (the same PeRFlow flow at teacher_multiplier x the steps). Reports the error on held-out seeds.",
            inputs=[
                io.Model.Input("model", tooltip="The model to calibrate for."),
                io.Conditioning.Input("positive", tooltip="Conditioning used while calibrating."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning used while calibrating."),
                io.Latent.Input("latent_image", tooltip="Sets the latent size (an Empty Latent Image)."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Guidance scale to calibrate for."),
                io.Int.Input("steps", default=4, min=1, max=1000, tooltip="Step count to calibrate for."),
                io.Int.Input("teacher_multiplier", default=8, min=2, max=64, tooltip="The teacher takes this many times the steps."),
                io.Combo.Input(
                    "teacher_solver",
                    options=list(GRID_SOLVERS),
                    default="perflow",
                    optional=True,
                    tooltip="perflow: the PeRFlow flow itself; dpmpp_2m: DPM-Solver++ 2M on the same grid, the same calls, second order (ddim_eps only).",
                ),
                io.Boolean.Input(
                    "fit_time_grid",
                    default=False,
                    optional=True,
                    tooltip="Also learn the time grid: one window per step, boundaries fitted with theta (ddim_eps only). "
                    "Off keeps the windows, as a PeRFlow-trained model needs.",
                ),
                io.Int.Input("samples", default=16, min=1, max=4096, tooltip="Noise seeds theta is fitted on."),
                io.Int.Input("holdout_samples", default=8, min=1, max=4096, tooltip="Other seeds, only to report the error before and after."),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=False,
                    tooltip="First fit seed; held-out seeds start 1,000,000 later. Fixed, so a re-run gives the same theta.",
                ),
                optional_perflow_input(),
            ],
            outputs=[
                Perflow.Output(display_name="perflow", tooltip="The settings with the learned theta."),
                io.Image.Output(display_name="report_chart", tooltip="Held-out error after each step, before and after."),
                io.String.Output(display_name="report", tooltip="The numbers."),
            ],
        )

    @classmethod
    def execute(
        cls, model, positive, negative, latent_image, cfg, steps, teacher_multiplier, samples, holdout_samples, seed, perflow=None, teacher_solver="perflow", fit_time_grid=False
    ) -> io.NodeOutput:
        choice = choice_or_default(perflow)
        report = run_calibration(model, positive, negative, cfg, latent_image, choice, steps, teacher_multiplier, samples, holdout_samples, seed, fit_time_grid, teacher_solver)
        learned = PerflowChoice(report.settings, auto_prediction_type=False)
        text = report_text(report)
        chart = chart_tensor(report)
        return io.NodeOutput(learned, chart, text, ui={**ui.PreviewImage(chart, cls=cls).as_dict(), **ui.PreviewText(text).as_dict()})


class PerflowSaveThetaNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowSaveTheta",
            display_name="Save PeRFlow Theta",
            category="PeRFlow/theta",
            description="Writes the piecewise rectified flow (PeRFlow) settings (theta, segments, parameterisation) into a new copy of a checkpoint "
            "(models/checkpoints, perflow.* keys) or into a small standalone theta file (models/perflow_theta).",
            is_output_node=True,
            inputs=[
                Perflow.Input("perflow", tooltip="Settings to save, e.g. from PeRFlow Calibrate Theta."),
                io.String.Input(
                    "filename", default="perflow_theta", tooltip="Name of the new file (without extension); _1, _2, ... is added if it exists."
                ),
                io.Combo.Input(
                    "ckpt_name",
                    options=[NO_CHECKPOINT] + CHECKPOINTS.files(),
                    default=NO_CHECKPOINT,
                    tooltip="A checkpoint to copy with the settings added, or a standalone theta file.",
                ),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written.")],
        )

    @classmethod
    def validate_inputs(cls, ckpt_name) -> bool | str:
        return ckpt_name == NO_CHECKPOINT or CHECKPOINTS.check(ckpt_name)

    @classmethod
    def execute(cls, perflow, filename: str, ckpt_name: str) -> io.NodeOutput:
        name = file_stem(filename, "filename", "perflow_theta")
        if ckpt_name == NO_CHECKPOINT:
            folder = folder_paths.get_folder_paths(THETA_FOLDER)[0]
            os.makedirs(folder, exist_ok=True)
            path = write_under_free_name(folder, name, ".safetensors", lambda new: save_theta_file(new, perflow.settings))
        else:
            source = CHECKPOINTS.path(ckpt_name, "ckpt_name")
            path = write_under_free_name(os.path.dirname(source), name, ".safetensors", lambda new: write_perflow_checkpoint(source, new, perflow.settings))
        return io.NodeOutput(str(path), ui=ui.PreviewText(f"wrote {path}"))


class PerflowLoadThetaNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowLoadTheta",
            display_name="Load PeRFlow Theta",
            category="PeRFlow/loaders",
            description="Reads piecewise rectified flow (PeRFlow) settings from a standalone theta file (models/perflow_theta).",
            inputs=[
                io.Combo.Input("theta_name", options=THETAS.options(), tooltip="A file written by Save PeRFlow Theta or `perflow calibrate`."),
            ],
            outputs=[Perflow.Output(display_name="perflow", tooltip="The settings in the file.")],
        )

    @classmethod
    def validate_inputs(cls, theta_name) -> bool | str:
        return THETAS.check(theta_name)

    @classmethod
    def execute(cls, theta_name: str) -> io.NodeOutput:
        path = THETAS.path(theta_name, "theta_name")
        try:
            settings = read_perflow_settings(path)
        except ValueError as error:
            raise ValueError(f"theta_name {theta_name!r}: {error}") from None
        return io.NodeOutput(PerflowChoice(settings))
