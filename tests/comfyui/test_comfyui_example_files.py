"""The example workflows as files, without a server: each example names the real release files at the family's
size, with the frontend's download data where the frontend can use it (single .safetensors files on Hugging Face)
and none for diffusers folders; each tiny twin under tests/ is the same graph on the tests' tiny models, and its
API form is the same nodes; only the examples are in a folder ComfyUI lists as templates."""

from __future__ import annotations

import pytest

from support.models import EXAMPLE_MODELS, SIZES, ModelFile
from support.server import (
    API_WORKFLOWS,
    CHECKPOINT_NAME,
    DELTA_NAME,
    EXAMPLE_NAMES,
    EXAMPLE_WORKFLOWS,
    REPO_ROOT,
    TINY_WORKFLOWS,
    WORKFLOW_NAMES,
    api_workflow,
    example_workflow,
    nodes_of_type,
    tiny_workflow,
)

FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
# ComfyUI lists <pack>/{example_workflows,example,examples,workflow,workflows}/*.json as templates (the pack's root only).
TEMPLATE_FOLDERS = ("example_workflows", "example", "examples", "workflow", "workflows")
# What the frontend 1.27.10 downloads without an error (MissingModelsWarning: allowed sources and suffixes).
DOWNLOADABLE_SOURCE, DOWNLOADABLE_SUFFIX = "https://huggingface.co/", ".safetensors"


def nodes_by_type(ui: dict, node_type: str) -> list[dict]:
    return [node for node in ui["nodes"] if node["type"] == node_type]


def download_data(ui: dict) -> list[dict]:
    return [model for node in ui["nodes"] for model in node.get("properties", {}).get("models", [])]


def test_only_the_examples_are_in_a_template_folder():
    assert sorted(path.stem for path in EXAMPLE_WORKFLOWS.glob("*.json")) == sorted(EXAMPLE_NAMES)
    for folder in (TINY_WORKFLOWS, API_WORKFLOWS):
        assert not (folder.parent == REPO_ROOT and folder.name in TEMPLATE_FOLDERS), folder


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_every_example_has_a_thumbnail_and_a_note_that_says_what_it_does(name):
    assert (EXAMPLE_WORKFLOWS / f"{name}.jpg").stat().st_size > 5_000
    (note,) = nodes_by_type(example_workflow(name), "MarkdownNote")
    text = note["widgets_values"][0]
    assert text.startswith("### PeRFlow") and "models/" in text, text


@pytest.mark.parametrize("name", [name for name in EXAMPLE_NAMES if isinstance(EXAMPLE_MODELS[name], tuple)])
def test_a_single_file_example_names_each_release_file_with_its_download_data(name):
    ui = example_workflow(name)
    files: tuple[ModelFile, ...] = EXAMPLE_MODELS[name]
    assert sorted(download_data(ui), key=str) == sorted((file.metadata() for file in files), key=str)
    for node in ui["nodes"]:
        for model in node.get("properties", {}).get("models", []):
            assert model["name"] in node["widgets_values"], (node["type"], model)  # the frontend matches the widget value
            assert model["url"].startswith(DOWNLOADABLE_SOURCE) and model["name"].endswith(DOWNLOADABLE_SUFFIX)


@pytest.mark.parametrize("name", [name for name in EXAMPLE_NAMES if not isinstance(EXAMPLE_MODELS[name], tuple)])
def test_a_folder_example_names_the_release_folder_and_says_how_to_get_it(name):
    release = EXAMPLE_MODELS[name]
    ui = example_workflow(name)
    (loader,) = nodes_by_type(ui, "PerflowDiffusersLoader")
    assert loader["widgets_values"][0] == release.folder
    assert download_data(ui) == [], "the frontend cannot download a folder: no download data"
    (note,) = nodes_by_type(ui, "MarkdownNote")
    assert f"--local-dir ComfyUI/models/diffusers/{release.folder}" in note["widgets_values"][0]


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_an_example_samples_at_its_family_size(name):
    models = EXAMPLE_MODELS[name]
    side = SIZES["sd15"] if isinstance(models, tuple) else models.size
    ui = example_workflow(name)
    # EmptyLatentImage: width, height, batch; ImageScale: method, width, height, crop.
    sizes = [node["widgets_values"][:2] for node in nodes_by_type(ui, "EmptyLatentImage")]
    sizes += [node["widgets_values"][1:3] for node in nodes_by_type(ui, "ImageScale")]
    assert sizes and all(size == [side, side] for size in sizes), sizes


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_a_tiny_twin_is_its_example_on_the_tiny_models(name):
    """Same nodes, links and values; only the model files and the 64 px size differ."""
    real, tiny = example_workflow(name), tiny_workflow(name)
    tiny_value = {EXAMPLE_MODELS[name][0].name: CHECKPOINT_NAME, EXAMPLE_MODELS[name][1].name: DELTA_NAME, SIZES["sd15"]: 64}
    assert [(n["id"], n["type"]) for n in real["nodes"]] == [(n["id"], n["type"]) for n in tiny["nodes"]]
    assert real["links"] == tiny["links"]
    for real_node, tiny_node in zip(real["nodes"], tiny["nodes"]):
        if real_node["type"] == "MarkdownNote":
            continue
        expected = [tiny_value.get(value, value) for value in real_node.get("widgets_values") or []]
        assert (tiny_node.get("widgets_values") or []) == expected, real_node["type"]
    assert download_data(tiny) == []


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_a_tiny_twin_and_its_api_form_agree(name):
    ui, api = tiny_workflow(name), api_workflow(name)
    ui_nodes = {str(node["id"]): node["type"] for node in ui["nodes"] if node["type"] not in FRONTEND_ONLY_TYPES}
    assert ui_nodes == {node_id: node["class_type"] for node_id, node in api.items()}
    assert any(node_type.startswith("Perflow") for node_type in ui_nodes.values())
    assert nodes_of_type(api, "SaveImage"), "every workflow ends in a SaveImage"
