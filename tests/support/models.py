"""The released PeRFlow models as the example workflows name them (example_workflows/, built by
tools/build_example_workflows.py) and the browser test expects the frontend to report them when missing.

Single files carry the frontend's download data (name, url, directory); the full releases are diffusers-format
folders, which the frontend cannot download, so they carry only the folder name under models/diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass

HUGGING_FACE = "https://huggingface.co"
# The image side each family was trained for.
SIZES = {"sd15": 512, "sd21": 768, "sdxl": 1024}


@dataclass(frozen=True)
class ModelFile:
    """One file in a Hugging Face repository, and the ComfyUI models folder it belongs in."""

    repo: str
    path: str  # in the repository, also the file's name in `directory`
    directory: str

    @property
    def name(self) -> str:
        return self.path

    @property
    def url(self) -> str:
        return f"{HUGGING_FACE}/{self.repo}/resolve/main/{self.path}"

    @property
    def page(self) -> str:
        return f"{HUGGING_FACE}/{self.repo}"

    def metadata(self) -> dict:
        """The entry of a node's `properties.models` from which the frontend offers the download."""
        return {"name": self.name, "url": self.url, "directory": self.directory}


@dataclass(frozen=True)
class Release:
    """A PeRFlow release published as a diffusers-format folder, placed as models/diffusers/<folder>."""

    repo: str
    family: str

    @property
    def folder(self) -> str:
        return self.repo.split("/")[1]

    @property
    def page(self) -> str:
        return f"{HUGGING_FACE}/{self.repo}"

    @property
    def size(self) -> int:
        return SIZES[self.family]


# Stable Diffusion 1.5 as one file (the copy ComfyUI's own templates download) and the PeRFlow delta for it.
SD15_BASE = ModelFile("Comfy-Org/stable-diffusion-v1-5-archive", "v1-5-pruned-emaonly-fp16.safetensors", "checkpoints")
SD15_DELTA = ModelFile("hansyan/perflow-sd15-delta-weights", "diffusion_pytorch_model.v0-1.safetensors", "perflow_deltas")
SD21 = Release("hansyan/perflow-sd21-artius", "sd21")
SDXL = Release("hansyan/perflow-sdxl-dreamshaper", "sdxl")
SDXL_BASE = Release("hansyan/perflow-sdxl-base", "sdxl")

SD15_FILES = (SD15_BASE, SD15_DELTA)
# Each example workflow (example_workflows/<name>.json) and what it loads: the single files it names with download
# data, or the release folder its Load PeRFlow Diffusers Model names.
EXAMPLE_MODELS = {
    "perflow_sd15_delta": SD15_FILES,
    "perflow_txt2img": SD15_FILES,
    "perflow_img2img": SD15_FILES,
    "perflow_ksampler_settings": SD15_FILES,
    "perflow_sd21_txt2img": SD21,
    "perflow_sdxl_txt2img": SDXL,
}
