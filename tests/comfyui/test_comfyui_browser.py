"""The real ComfyUI frontend in headless Chromium (Playwright, sync API) against the test server of
tests/support/server.py: node search finds the PeRFlow nodes; opening an example workflow, whose release files
the server does not have, names them in the frontend's missing-models dialog with their downloads (single files)
or shows the release folder and how to get it (diffusers folders), with no error from the page; with tiny stand-ins
under the release names (as after the README's downloads) an example runs to a 512 px image; every tiny twin
loads without missing nodes, and queueing the txt2img twin shows the generated image.

Needs COMFYUI_PATH, the playwright python package and a Chromium (default /usr/bin/chromium, or
PERFLOW_CHROMIUM); skipped otherwise. Playwright is not a dependency of the pack.
Artifacts: test-artifacts/comfyui_perflow.png (txt2img with its image). With PERFLOW_UPDATE_DOCS_SCREENSHOT=1
the same screenshot is also written to docs/comfyui_workflow.png (under 500 KB) for the README.
"""

from __future__ import annotations

import io
import os

import pytest

from support.server import (
    ARTIFACTS,
    PACK_NAME,
    PERFLOW_DISPLAY_NAMES,
    PERFLOW_NODE_IDS,
    REPO_ROOT,
    EXAMPLE_NAMES,
    HUGGING_FACE_ROUTE,
    MISSING_MODELS_JS,
    WORKFLOW_NAMES,
    browser,  # noqa: F401  (module fixture)
    close_dialogs,
    comfy_server,  # noqa: F401  (session fixture)
    example_workflow,
    expected_console_error,
    load_workflow,
    open_app,
    newest_frontend_root,
    probe_recorder,
    queue_and_wait_for_image,
    release_files_in_place,
    requires_browser,
    requires_comfyui,
    separate_user_directory,
    start_server,
    tiny_workflow,
)
from support.models import EXAMPLE_MODELS, SIZES

pytestmark = [requires_comfyui, requires_browser]

SEARCH_DISPLAY_NAMES = PERFLOW_DISPLAY_NAMES
SCREENSHOT = ARTIFACTS / "comfyui_perflow.png"
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "comfyui_workflow.png"
DOCS_MAX_BYTES = 500_000


@pytest.fixture(scope="module")
def page(browser, comfy_server):
    page = open_app(browser, comfy_server.url)
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "comfyui_browser_console.log").write_text("\n".join(page.perflow_log) + "\n")
    page.close()


def test_frontend_version_and_nodes_registered(page):
    info = page.evaluate(
        """() => ({version: window.__COMFYUI_FRONTEND_VERSION__ || null,
                   types: Object.keys(LiteGraph.registered_node_types).filter(t => t.startsWith('Perflow'))})"""
    )
    print(f"ComfyUI frontend {info['version']}")
    missing = set(PERFLOW_NODE_IDS) - set(info["types"])
    assert not missing, f"not registered in the frontend: {sorted(missing)}"


def open_node_search(page, attempts: int = 3) -> None:
    """Double click on the empty canvas until the search box has the focus (a first-run dialog or a slow first paint
    can take the first click on a loaded machine)."""
    for attempt in range(attempts):
        close_dialogs(page)
        canvas = page.locator("#graph-canvas").bounding_box()
        page.mouse.dblclick(canvas["x"] + canvas["width"] / 2, canvas["y"] + canvas["height"] / 2)
        try:
            page.wait_for_function("() => document.activeElement && document.activeElement.tagName === 'INPUT'", timeout=10_000)
            return
        except Exception:
            if attempt == attempts - 1:
                raise


def search_nodes(page, query: str, result_selector: str = "li.p-autocomplete-option") -> list:
    """Type ``query`` into the node search (double click on an empty canvas); returns the results' texts (each
    frontend draws them differently: ``result_selector``)."""
    page.evaluate("() => app.graph.clear()")
    open_node_search(page)
    page.keyboard.type(query, delay=30)
    # The results come in as the search runs: wait for at least as many as there are PeRFlow nodes.
    page.wait_for_function(
        "([selector, count]) => document.querySelectorAll(selector).length >= count", arg=[result_selector, len(SEARCH_DISPLAY_NAMES)], timeout=30_000
    )
    page.wait_for_timeout(500)
    return page.locator(result_selector).all_inner_texts()


def listed_names(texts: list) -> list:
    return [text.split("\n")[0].replace("\xa0", " ").strip() for text in texts]


def test_node_search_lists_the_perflow_nodes(page):
    texts = search_nodes(page, "PeRFlow")
    listed = listed_names(texts)
    for name in SEARCH_DISPLAY_NAMES:
        assert name in listed, f"{name!r} not in the search results {listed}"
    assert all(PACK_NAME in text for text in texts[: len(SEARCH_DISPLAY_NAMES)]), texts
    # Enter adds the highlighted result to the graph.
    page.keyboard.press("Enter")
    page.wait_for_function("() => app.graph._nodes.length === 1", timeout=10_000)
    added = page.evaluate("() => app.graph._nodes[0].type")
    assert added.startswith("Perflow"), added
    page.evaluate("() => app.graph.clear()")


def test_templates_of_the_pack_reach_the_frontend(page):
    templates = page.evaluate("async () => await app.api.getWorkflowTemplates()")
    assert sorted(templates.get(PACK_NAME, [])) == sorted(EXAMPLE_NAMES)


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_tiny_twin_loads_without_missing_nodes_or_models(page, name):
    result = load_workflow(page, tiny_workflow(name), name)
    assert result["missing"] == [], f"the frontend reports missing node types: {result['missing']}"
    assert result["unregistered"] == []
    assert not [text for text in result["dialogs"] if "missing" in text.lower() or "invalid" in text.lower()], result["dialogs"]
    assert any(node_type.startswith("Perflow") for node_type in result["types"])
    assert len(result["types"]) == len(tiny_workflow(name)["nodes"])
    close_dialogs(page)


@pytest.fixture()
def probes(page):
    """The Hugging Face URLs the page asks for (the dialog's file-size probes), each aborted: no network in tests."""
    urls = probe_recorder(page)
    yield urls
    page.unroute(HUGGING_FACE_ROUTE)
    close_dialogs(page)


def _open_example(page, name: str) -> tuple[dict, dict, list[str]]:
    """Loads the example as the template browser does; returns load_workflow's report, the missing-models dialog
    (its rows, error messages and enabled Download buttons) and the console errors it caused."""
    already = len(page.perflow_log)
    result = load_workflow(page, example_workflow(name), name)
    page.wait_for_timeout(1000)  # the dialog's size probes
    dialog = page.evaluate(MISSING_MODELS_JS)
    errors = [line for line in page.perflow_log[already:] if line.startswith(("error", "pageerror"))]
    return result, dialog, errors


@pytest.mark.parametrize("name", [name for name in EXAMPLE_NAMES if isinstance(EXAMPLE_MODELS[name], tuple)])
def test_opening_a_single_file_example_without_its_files_offers_their_downloads(page, probes, name):
    result, dialog, errors = _open_example(page, name)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"missing_models_{name}.png"))
    assert result["missing"] == [], f"the frontend reports missing node types: {result['missing']}"
    files = EXAMPLE_MODELS[name]
    assert dialog["open"], "no missing-models dialog"
    assert sorted(dialog["rows"]) == sorted(f"{file.directory} / {file.name}" for file in files), dialog
    assert dialog["errors"] == [] and dialog["downloads"] == len(files), dialog
    assert sorted(set(probes)) == sorted(file.url for file in files)
    assert [line for line in errors if not expected_console_error(line)] == []


@pytest.mark.parametrize("name", [name for name in EXAMPLE_NAMES if not isinstance(EXAMPLE_MODELS[name], tuple)])
def test_opening_a_folder_example_without_its_folder_shows_the_folder_and_how_to_get_it(page, probes, name):
    release = EXAMPLE_MODELS[name]
    result, dialog, errors = _open_example(page, name)
    assert result["missing"] == [], f"the frontend reports missing node types: {result['missing']}"
    assert not dialog["open"], f"a dialog the user cannot act on: {dialog}"
    shown = page.evaluate(
        """() => ({loader: app.graph._nodes.filter(n => n.type === 'PerflowDiffusersLoader').map(n => n.widgets[0].value),
                   text: document.body.innerText})"""
    )
    assert shown["loader"] == [release.folder]
    assert f"hf download {release.repo} --local-dir ComfyUI/models/diffusers/{release.folder}" in shown["text"]
    assert probes == [] and errors == []


def test_an_example_runs_once_its_files_are_in_place(page, comfy_server):
    """As after the README's download steps (tiny stand-ins under the release names): no dialog, Run gives a 512 px
    image. One example (the fastest, 4 steps): at 512 px the tiny model takes about a minute per example on CPU; the
    twins show that the others are the same graphs."""
    from PIL import Image

    name = "perflow_txt2img"
    with release_files_in_place(comfy_server, EXAMPLE_MODELS[name]):
        result = load_workflow(page, example_workflow(name), name)
        assert not page.evaluate(MISSING_MODELS_JS)["open"] and result["missing"] == []
        images = queue_and_wait_for_image(page)
    (files,) = images.values()
    with Image.open(comfy_server.output_dir / files[0]) as image:
        assert image.size == (SIZES["sd15"], SIZES["sd15"])


def _write_docs_screenshot(png: bytes) -> None:
    from PIL import Image

    DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    DOCS_SCREENSHOT.write_bytes(png)
    if DOCS_SCREENSHOT.stat().st_size > DOCS_MAX_BYTES:  # a palette PNG keeps the UI sharp and small
        image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(DOCS_SCREENSHOT, optimize=True)
    assert DOCS_SCREENSHOT.stat().st_size < DOCS_MAX_BYTES


def test_run_txt2img_shows_the_generated_image(page):
    result = load_workflow(page, tiny_workflow("perflow_txt2img"), "PeRFlow txt2img")
    assert result["missing"] == []
    close_dialogs(page)
    images = queue_and_wait_for_image(page, click_run_button=True)
    assert images and all(files and files[0].startswith("perflow_txt2img") for files in images.values()), images
    page.wait_for_timeout(500)  # let the canvas draw the image preview
    ARTIFACTS.mkdir(exist_ok=True)
    png = page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000
    if os.environ.get("PERFLOW_UPDATE_DOCS_SCREENSHOT"):
        _write_docs_screenshot(png)


NODE_TEXT_SCREENSHOT = ARTIFACTS / "comfyui_perflow_node_text.png"


def twelve_step_txt2img() -> dict:
    """The txt2img example at a step count no other test queues (ComfyUI sends no `executed` for a cached node)."""
    workflow = tiny_workflow("perflow_txt2img")
    (scheduler,) = [node for node in workflow["nodes"] if node["type"] == "PerflowScheduler"]
    scheduler["widgets_values"][0] = 12
    return workflow


def run_and_read_node_texts(page, workflow: dict, name: str) -> dict:
    """Queue ``workflow``; returns {node type: its text} of the Scheduler and Sampler once both show one."""
    load_workflow(page, workflow, name)
    close_dialogs(page)
    queue_and_wait_for_image(page)
    texts = """() => Object.fromEntries(app.graph._nodes.filter(n => ['PerflowScheduler', 'PerflowSampler'].includes(n.type))
        .map(n => [n.type, (n.widgets || []).find(w => w.name === 'perflow_text')?.value ?? null]))"""
    page.wait_for_function(f"() => Object.values(({texts})()).every(text => text)", timeout=10_000)
    return page.evaluate(texts)


def test_the_scheduler_shows_the_timesteps_on_the_node_after_a_run(page):
    shown = run_and_read_node_texts(page, twelve_step_txt2img(), "PeRFlow txt2img, 12 steps")
    assert shown["PerflowScheduler"].startswith("timesteps the network sees (12 steps): 1000, 916, 833, 750, 666, 583, 500, 416, 333, 250, 166, 83\n")
    assert "parameterisation: auto -> diff_eps for this model" in shown["PerflowScheduler"]
    assert page.locator("textarea.perflow-node-text").first.is_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(NODE_TEXT_SCREENSHOT))
    assert not [line for line in page.perflow_log if "perflow_node_text" in line and line.startswith(("error", "pageerror"))]


def test_nodes_served_from_the_cache_show_their_text_too(page):
    # The same graph again, in a new tab: every node comes from ComfyUI's cache; the text comes from the history.
    shown = run_and_read_node_texts(page, twelve_step_txt2img(), "PeRFlow txt2img, 12 steps, again")
    assert shown["PerflowScheduler"].startswith("timesteps the network sees (12 steps): 1000, 916,")
    assert "timesteps: shown on the PeRFlow Scheduler" in shown["PerflowSampler"]


def test_the_newest_frontend_finds_the_nodes_by_piecewise_rectified_flow(browser, comfy_server):
    # Node search matches names and search aliases, never descriptions: the pack's script adds the alias. The pinned
    # frontend (1.27.10) searches no aliases.
    root = newest_frontend_root()
    if root is None:
        pytest.fail("the newest frontend is not installed beside ComfyUI's venv (tools/run_tests.py installs it)")
    user = separate_user_directory(comfy_server.base, "user-search-alias")
    server = start_server(comfy_server.base, front_end_root=root, user_directory=user, log_name="comfyui_server_search_alias.log")
    try:
        page = open_app(browser, server.url)
        listed = listed_names(search_nodes(page, "piecewise", "[role=option]"))
        page.close()
    finally:
        server.stop()
    assert set(SEARCH_DISPLAY_NAMES) <= set(listed), listed
