"""Packaging for ComfyUI users: pyproject.toml's dependencies are requirements.txt's (what ComfyUI-Manager
installs) and leave torch to ComfyUI; diffusers is an extra; the Comfy registry's metadata is complete and the
README installs from the repository that pyproject names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
# docs.comfy.org/registry/specifications: under 100 characters of letters, digits, "-", "_" and ".", no two
# special characters in a row, starting with a letter.
REGISTRY_NAME = re.compile(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?=[A-Za-z0-9]))*")


def requirement_name(line: str) -> str:
    return re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0].lower()


def requirements_txt() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_pyproject_dependencies_are_the_lines_of_requirements_txt():
    assert PROJECT["dependencies"] == requirements_txt()


def test_torch_is_never_installed_for_comfyui_users():
    names = {requirement_name(line) for line in PROJECT["dependencies"] + requirements_txt()}
    assert not names & {"torch", "torchvision", "torchaudio"}, names


def test_diffusers_is_an_extra_not_a_dependency():
    assert "diffusers" not in {requirement_name(line) for line in PROJECT["dependencies"]}
    assert [requirement_name(line) for line in PROJECT["optional-dependencies"]["diffusers"]] == ["diffusers"]


def test_the_name_is_one_the_comfy_registry_accepts():
    name = PROJECT["name"]
    assert len(name) < 100 and REGISTRY_NAME.fullmatch(name), name
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"]), PROJECT["version"]


def test_registry_metadata_is_complete():
    assert {"PublisherId", "DisplayName", "Icon", "includes", "requires-comfyui"} <= set(COMFY)
    assert COMFY["PublisherId"] and COMFY["DisplayName"] and isinstance(COMFY["includes"], list)
    assert re.fullmatch(r">=\d+\.\d+\.\d+", COMFY["requires-comfyui"]), COMFY["requires-comfyui"]
    repository = PROJECT["urls"]["Repository"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repository), repository
    for key in ("Documentation", "Bug Tracker", "Issues"):
        assert PROJECT["urls"][key].startswith(repository + "/") or PROJECT["urls"][key].startswith(repository + "#"), key


def test_the_icon_is_the_repository_file_within_the_registry_limits():
    from PIL import Image

    owner_repo = PROJECT["urls"]["Repository"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert COMFY["Icon"].startswith(prefix), COMFY["Icon"]
    width, height = Image.open(ROOT / COMFY["Icon"].removeprefix(prefix)).size
    assert width <= 800 and height <= 400


def test_the_readme_clones_the_repository_that_pyproject_names():
    readme = (ROOT / "README.md").read_text()
    assert f"git clone {PROJECT['urls']['Repository']}" in readme
    assert f"comfy node install {PROJECT['name']}" in readme
