"""PeRFlow settings: segments, boundaries, theta, parameterisation -> PERFLOW."""

from __future__ import annotations

from comfy_api.latest import io

from ..perflow_core.settings import IMG2IMG_STARTS, PerflowSettings
from .glue import PerflowChoice

Perflow = io.Custom("PERFLOW")
SETTINGS_TOOLTIP = "PeRFlow settings (PeRFlow Settings or the PeRFlow checkpoint loader). Not connected: the original PeRFlow (K = 4, theta = 0, auto)."
PARAMETERISATIONS = ["auto", "diff_eps", "ddim_eps", "velocity"]


def optional_perflow_input():
    """The optional ``perflow`` input of the sampling nodes (unconnected: the default choice)."""
    return Perflow.Input("perflow", optional=True, tooltip=SETTINGS_TOOLTIP)


# The node's inputs, by the setting each one gives: errors name the input.
INPUT_NAMES = {
    "segments": "segments",
    "segment_boundaries": "boundaries",
    "theta": "theta",
    "prediction_type": "parameterisation",
    "img2img_start": "img2img_start",
}


def build_choice(parameterisation: str, segments: int, boundaries: str = "", theta: str = "", img2img_start: str = "original") -> PerflowChoice:
    """Validate the widgets' values (PerflowSettings does every check; errors name the input)."""
    if parameterisation not in PARAMETERISATIONS:
        raise ValueError(f"parameterisation must be one of {', '.join(PARAMETERISATIONS)}; got {parameterisation!r}")
    auto = parameterisation == "auto"
    values = {
        "segments": segments,
        "segment_boundaries": boundaries if boundaries.strip() else None,
        "theta": theta,
        "prediction_type": "diff_eps" if auto else parameterisation,
        "img2img_start": img2img_start,
    }
    return PerflowChoice(PerflowSettings.from_entries(values, names=INPUT_NAMES), auto_prediction_type=auto)


class PerflowSettingsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PerflowSettings",
            display_name="PeRFlow Settings",
            category="PeRFlow",
            description="Piecewise rectified flow (PeRFlow) settings: the segments (time windows), the learned correction theta and the parameterisation, "
            "for the PeRFlow Scheduler, Sampler and KSampler. The defaults are the original PeRFlow.",
            inputs=[
                io.Combo.Input(
                    "parameterisation",
                    options=PARAMETERISATIONS,
                    default="auto",
                    tooltip="How the model's output is read. auto: SD1.x diff_eps, SDXL ddim_eps, SD2.x-v and flow models velocity "
                    "(the released PeRFlow models).",
                ),
                io.Int.Input("segments", default=4, min=1, max=100, tooltip="Number of segments K (time windows). The released models use 4."),
                io.String.Input(
                    "boundaries",
                    default="",
                    tooltip="Optional segment boundaries in training timesteps, strictly decreasing from 1000 (or 999) to 0, "
                    "e.g. '999, 700, 400, 150, 0'. Empty: K equal segments.",
                ),
                io.String.Input(
                    "theta",
                    default="",
                    multiline=True,
                    placeholder="theta: one row per segment, ';' between rows: gain, window-end scale, output change "
                    "(e.g. 0.1, 0, 0; 0, 0, 0; 0, 0, 0; 0, 0, 0). Empty: 0, the original.",
                    tooltip="Optional per-segment correction: one row per segment separated by ';', up to 3 numbers each "
                    "(gain, window-end scale, model-output change), e.g. '0.1, 0, 0.2; 0, 0, 0; ...'. Empty: theta = 0 (the original).",
                ),
                io.Combo.Input(
                    "img2img_start",
                    options=list(IMG2IMG_STARTS),
                    default="original",
                    optional=True,
                    tooltip="Img2img (denoise < 1) starting inside a segment. original: ComfyUI's noised latent, the original "
                    "PeRFlow's start. straight_path: the point on the segment's straight path between its noised ends.",
                ),
            ],
            outputs=[Perflow.Output(display_name="perflow", tooltip="PeRFlow settings for the PeRFlow nodes.")],
        )

    @classmethod
    def execute(cls, parameterisation: str, segments: int, boundaries: str, theta: str, img2img_start: str = "original") -> io.NodeOutput:
        return io.NodeOutput(build_choice(parameterisation, segments, boundaries, theta, img2img_start))
