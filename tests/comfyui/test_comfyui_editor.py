"""Spec: the segment and theta editor on PeRFlow Settings (web/perflow_editor.js) in a real browser, in the frontend
ComfyUI 0.3.64 pins (1.27.10) and the newest one (1.58.1, served with --front-end-root), in the classic canvas and
in the Vue node mode. Dragging a boundary writes the `boundaries` widget and the queued prompt's network sees the new
timesteps; typed theta redraws; windows split, merge and reset; the editor's step grid is perflow_core's. The pack's
scripts log no errors.

1.27.10 has the Vue node mode only as an experiment whose nodes draw the built-in widget types alone: there the
pack puts the editor into the node's element itself, and puts it back when Vue redraws the node (collapse, expand).
That frontend's Vue fields redraw a value changed other than by typing only when the node is redrawn, so its test of
the fields collapses and expands the node first.

One server per frontend (the session's server for 1.27.10, a second one for 1.58.1 on the same base directory);
one page per frontend and node mode. With PERFLOW_UPDATE_DOCS_SCREENSHOT=1 the node's pictures are also written to
docs/perflow_editor_classic.png (1.27.10) and docs/perflow_editor_vue.png (1.58.1).
"""

from __future__ import annotations

import os

import pytest

from support.editor_page import (
    click_timestep,
    EDITOR_WORKFLOW_STEPS,
    double_click_boundary,
    double_click_timestep,
    drag_boundary,
    drag_theta_bar,
    editor_state,
    node_screenshot,
    open_editor_workflow,
    queue_from_page,
    set_node_mode,
    set_preview_steps,
    theta_text_field,
    toggle_collapsed,
    tracked_preview_steps,
    vue_field_values,
)
from support.server import (
    ARTIFACTS,
    NEWEST_FRONTEND_VERSION,
    REPO_ROOT,
    browser,  # noqa: F401  (module fixture)
    close_dialogs,
    comfy_server,  # noqa: F401  (session fixture)
    newest_frontend_root,
    open_app,
    pack_core,
    requires_browser,
    requires_comfyui,
    separate_user_directory,
    start_server,
)

pytestmark = [requires_comfyui, requires_browser]

PINNED, NEWEST = "1.27.10", NEWEST_FRONTEND_VERSION
WITH_EDITOR = [(PINNED, "classic"), (PINNED, "vue"), (NEWEST, "classic"), (NEWEST, "vue")]
DOCS_PICTURES = {(PINNED, "classic"): "perflow_editor_classic.png", (NEWEST, "vue"): "perflow_editor_vue.png"}


def _id(combination) -> str:
    return "-".join(combination)


@pytest.fixture(scope="module")
def servers(comfy_server):
    """{frontend version: server}; the newest frontend's server starts when first asked for."""
    started = {}

    def server_for(version):
        if version == PINNED:
            return comfy_server
        if version not in started:
            root = newest_frontend_root()
            if root is None:
                pytest.fail(f"frontend {NEWEST} is not installed beside ComfyUI's venv (tools/run_tests.py installs it; or set PERFLOW_NEWEST_FRONTEND_ROOT)")
            user = separate_user_directory(comfy_server.base, "user-newest-frontend")
            started[version] = start_server(comfy_server.base, front_end_root=root, user_directory=user, log_name="comfyui_server_newest_frontend.log")
        return started[version]

    yield server_for
    for server in started.values():
        server.stop()
    set_node_mode(comfy_server, False)  # the session's server goes back to the default mode for other modules


@pytest.fixture(scope="module")
def app_page(request, browser, servers):
    """A page of the given (frontend, node mode) with the settings workflow loaded; yields (page, node id, server)."""
    version, mode = request.param
    server = servers(version)
    set_node_mode(server, mode == "vue")
    page = open_app(browser, server.url)
    frontend = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
    assert frontend == version, f"the server serves frontend {frontend}, not {version}"
    node_id = open_editor_workflow(page)
    yield page, node_id, server
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"comfyui_editor_console_{_id(request.param)}.log").write_text("\n".join(page.perflow_log) + "\n")
    page.close()


def _restore(page, node_id, segments=4, boundaries="", theta=""):
    page.evaluate(
        """([id, values]) => { const node = app.graph.getNodeById(id);
         for (const [name, value] of Object.entries(values)) node.widgets.find(w => w.name === name).value = value;
         node.perflowEditor?.render(true); node.setDirtyCanvas(true, true); }""",
        [node_id, {"segments": segments, "boundaries": boundaries, "theta": theta}],
    )


def _new_seed(page):
    page.evaluate(
        """() => { const node = app.graph._nodes.find(n => n.type === 'PerflowKSampler');
         node.widgets.find(w => w.name === 'seed').value = Math.floor(Math.random() * 2 ** 40); }"""
    )


def _python_grid(boundaries: list, steps: int) -> list:
    Segments = pack_core("segments").Segments
    return Segments.from_boundaries(boundaries).timesteps(steps).tolist()


@pytest.mark.parametrize("app_page", WITH_EDITOR, indirect=True, ids=_id)
def test_dragging_a_boundary_writes_the_widget_and_the_network_sees_the_new_timesteps(app_page):
    page, node_id, server = app_page
    close_dialogs(page)
    before = editor_state(page, node_id)
    assert before["shown"] and before["boundaries"] == "" and before["drawn"]["boundaries"] == [1000, 750, 500, 250, 0]
    drag_boundary(page, node_id, 1, 600)
    after = editor_state(page, node_id)
    written = [float(v) for v in after["boundaries"].split(",")]
    assert written[0] == 1000 and written[2:] == [500, 250, 0] and abs(written[1] - 600) <= 3, after["boundaries"]
    assert after["segments"] == 4 and after["drawn"]["boundaries"] == written
    assert after["pos"] == before["pos"], "the drag moved the node"
    set_preview_steps(page, node_id, EDITOR_WORKFLOW_STEPS)
    drawn_grid = editor_state(page, node_id)["drawn"]["grid"]

    _new_seed(page)  # a prompt ComfyUI has not cached, so the network runs
    server.clear_unet_timesteps()
    entry = queue_from_page(page, server)
    assert entry["status"]["status_str"] == "success", entry["status"]
    seen = server.unet_timesteps()
    steps = [t for i, t in enumerate(seen) if i == 0 or t != seen[i - 1]]  # one entry per step (CFG may batch or not)
    expected = _python_grid(written, EDITOR_WORKFLOW_STEPS)
    assert steps == pytest.approx(expected, abs=1e-3), f"the network saw {seen}"
    assert drawn_grid == expected
    _restore(page, node_id)


@pytest.mark.parametrize("app_page", WITH_EDITOR, indirect=True, ids=_id)
def test_typing_theta_into_the_widget_redraws_the_bars(app_page):
    page, node_id, _ = app_page
    _restore(page, node_id)
    field = theta_text_field(page, node_id)
    field.fill("0.2, 0, 0; 0, -0.1, 0; 0, 0, 0.3; 0, 0, 0")
    page.wait_for_timeout(300)
    state = editor_state(page, node_id)
    assert state["theta"] == "0.2, 0, 0; 0, -0.1, 0; 0, 0, 0.3; 0, 0, 0"
    drawn = state["drawn"]
    assert drawn["theta"] == [[0.2, 0, 0], [0, -0.1, 0], [0, 0, 0.3], [0, 0, 0]]
    assert drawn["bars"]["0,0"]["height"] > drawn["bars"]["1,1"]["height"] > drawn["bars"]["3,0"]["height"]
    assert drawn["bars"]["1,1"]["y"] >= drawn["bars"]["0,0"]["y"] + drawn["bars"]["0,0"]["height"], "a negative value is drawn below zero"
    _restore(page, node_id)


@pytest.mark.parametrize("app_page", WITH_EDITOR, indirect=True, ids=_id)
def test_dragging_a_theta_bar_writes_the_widget(app_page):
    page, node_id, _ = app_page
    _restore(page, node_id)
    drag_theta_bar(page, node_id, 2, 1, 11)  # up: a positive window-end scale for window 3
    up = editor_state(page, node_id)
    row = [float(v) for v in up["theta"].split(";")[2].split(",")]
    assert row[0] == 0 and row[1] > 0 and row[2] == 0, up["theta"]
    assert up["drawn"]["theta"][2][1] == row[1] and up["drawn"]["bars"]["2,1"]["value"] == row[1]
    assert [r for i, r in enumerate(up["theta"].split(";")) if i != 2] == ["0, 0, 0", " 0, 0, 0", " 0, 0, 0"]
    drag_theta_bar(page, node_id, 2, 1, -30)  # down, past zero
    assert float(editor_state(page, node_id)["theta"].split(";")[2].split(",")[1]) < 0
    _restore(page, node_id)


@pytest.mark.parametrize("app_page", WITH_EDITOR, indirect=True, ids=_id)
def test_theta_typed_into_the_editor_is_written_to_the_widget(app_page):
    page, node_id, _ = app_page
    _restore(page, node_id)
    click_timestep(page, node_id, 900)  # window 1
    gain = page.locator(f'[data-perflow-node="{node_id}"] .perflow-theta-input[data-column="0"]')
    gain.fill("0.15")
    gain.press("Enter")
    gain.dispatch_event("change")
    state = editor_state(page, node_id)
    assert state["theta"] == "0.15, 0, 0; 0, 0, 0; 0, 0, 0; 0, 0, 0"
    assert state["drawn"]["bars"]["0,0"]["value"] == 0.15
    _restore(page, node_id)


@pytest.mark.parametrize("app_page", [(PINNED, "classic")], indirect=True, ids=_id)
def test_a_new_preview_step_count_is_recorded_for_undo_and_saving(app_page):
    page, node_id, _ = app_page
    set_preview_steps(page, node_id, 13)
    assert tracked_preview_steps(page, node_id) == 13
    set_preview_steps(page, node_id, EDITOR_WORKFLOW_STEPS)
    assert tracked_preview_steps(page, node_id) == EDITOR_WORKFLOW_STEPS


@pytest.mark.parametrize("app_page", WITH_EDITOR, indirect=True, ids=_id)
def test_split_merge_and_reset_keep_segments_boundaries_and_theta_in_agreement(app_page):
    page, node_id, _ = app_page
    _restore(page, node_id, theta="0.1, 0, 0; 0.2, 0, 0; 0.3, 0, 0; 0.4, 0, 0")
    double_click_timestep(page, node_id, 400)
    split = editor_state(page, node_id)
    values = [float(v) for v in split["boundaries"].split(",")]
    assert split["segments"] == 5 and len(values) == 6 and abs(values[3] - 400) <= 3, split
    assert split["theta"] == "0.1, 0, 0; 0.2, 0, 0; 0.3, 0, 0; 0.3, 0, 0; 0.4, 0, 0"  # both halves keep the window's theta
    double_click_boundary(page, node_id, 3)
    merged = editor_state(page, node_id)
    assert (merged["segments"], merged["boundaries"]) == (4, "")  # back to 4 equal windows: written as empty
    assert merged["theta"] == "0.1, 0, 0; 0.2, 0, 0; 0.3, 0, 0; 0.4, 0, 0"
    drag_boundary(page, node_id, 2, 300)
    page.locator(f'[data-perflow-node="{node_id}"] .perflow-reset').click()
    reset = editor_state(page, node_id)
    assert (reset["segments"], reset["boundaries"], reset["theta"]) == (4, "", "")
    assert reset["drawn"]["boundaries"] == [1000, 750, 500, 250, 0]


@pytest.mark.parametrize("app_page", WITH_EDITOR, indirect=True, ids=_id)
def test_a_new_segment_count_resets_the_boundaries_to_equal_windows(app_page):
    page, node_id, _ = app_page
    _restore(page, node_id, boundaries="1000, 600, 500, 250, 0", theta="0.1, 0, 0; 0, 0, 0; 0, 0, 0; 0, 0, 0")
    page.evaluate("(id) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === 'segments'); w.value = 3; w.callback(3); }", node_id)
    state = editor_state(page, node_id)
    assert (state["segments"], state["boundaries"], state["theta"]) == (3, "", "0.1, 0, 0; 0, 0, 0; 0, 0, 0")
    assert state["drawn"]["k"] == 3
    _restore(page, node_id)


@pytest.mark.parametrize("app_page", WITH_EDITOR, indirect=True, ids=_id)
def test_typed_boundaries_of_another_count_set_the_segment_count(app_page):
    page, node_id, _ = app_page
    _restore(page, node_id, theta="0.1, 0, 0; 0, 0, 0; 0, 0, 0; 0.2, 0, 0")
    page.evaluate(
        """(id) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === 'boundaries');
         w.value = '1000, 500, 0'; w.callback(w.value); }""",
        node_id,
    )
    state = editor_state(page, node_id)
    assert (state["segments"], state["boundaries"], state["theta"]) == (2, "1000, 500, 0", "0.1, 0, 0; 0, 0, 0")
    assert state["drawn"]["boundaries"] == [1000, 500, 0]
    _restore(page, node_id)


@pytest.mark.parametrize("app_page", WITH_EDITOR, indirect=True, ids=_id)
def test_the_editor_comes_back_working_when_the_node_is_collapsed_and_expanded(app_page):
    page, node_id, _ = app_page
    _restore(page, node_id)
    toggle_collapsed(page, node_id)
    assert not editor_state(page, node_id)["shown"]
    toggle_collapsed(page, node_id)
    assert editor_state(page, node_id)["shown"]
    drag_boundary(page, node_id, 1, 600)
    state = editor_state(page, node_id)
    assert abs(float(state["boundaries"].split(",")[1]) - 600) <= 3 and state["drawn"]["boundaries"][1] == float(state["boundaries"].split(",")[1])
    _restore(page, node_id)


@pytest.mark.parametrize("app_page", [(PINNED, "vue"), (NEWEST, "vue")], indirect=True, ids=_id)
def test_the_vue_node_fields_show_what_the_editor_wrote(app_page):
    page, node_id, _ = app_page
    _restore(page, node_id)
    double_click_timestep(page, node_id, 400)
    written = editor_state(page, node_id)
    assert written["segments"] == 5
    if page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__") == PINNED:
        toggle_collapsed(page, node_id)
        toggle_collapsed(page, node_id)
    fields = vue_field_values(page, node_id)
    assert "5" in fields and written["boundaries"] in fields, fields
    _restore(page, node_id)


@pytest.mark.parametrize("app_page", WITH_EDITOR, indirect=True, ids=_id)
def test_the_pack_scripts_log_no_errors_and_the_node_is_pictured(app_page):
    page, node_id, _ = app_page
    version, mode = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__"), "vue" if page.evaluate("() => app.extensionManager.setting.get('Comfy.VueNodes.Enabled')") else "classic"
    _restore(page, node_id, boundaries="1000, 820, 560, 300, 120, 0", segments=5, theta="0.12, 0, 0.05; 0, 0.08, 0; -0.06, 0, 0; 0, 0, 0.1; 0.04, 0, 0")
    set_preview_steps(page, node_id, 10)
    page.wait_for_timeout(300)
    ARTIFACTS.mkdir(exist_ok=True)
    picture = ARTIFACTS / f"comfyui_editor_{version}_{mode}.png"
    node_screenshot(page, node_id, picture)
    name = DOCS_PICTURES.get((version, mode))
    if name and os.environ.get("PERFLOW_UPDATE_DOCS_SCREENSHOT"):
        (REPO_ROOT / "docs" / name).write_bytes(picture.read_bytes())
    assert page.perflow_pack_errors == []
    _restore(page, node_id)


def test_the_editor_grid_and_text_rules_are_perflow_cores(browser, comfy_server):
    cases = [(None, 4, 4), (None, 4, 9), (None, 3, 7), (None, 3, 10), (None, 7, 23), (None, 1, 5), (None, 100, 250),
             ([1000, 700, 400, 150, 0], 4, 9), ([1000, 333, 1, 0], 3, 5), ([1000, 999, 0], 2, 2), ([1000, 512, 0], 2, 31)]
    boundary_texts = ["1000, 700, 0", "999 500 0", "[1000, 300, 0]", "1000, 700, 700, 0", "900, 0", "1000, 0.5, 0", "abc", "1000; 10; 0"]
    theta_texts = [("0.1, 0, 0.2; 0 0 0", 2), ("0.1 0.2", 2), ("[0.1, 0.2]", 2), ("[[0.1, 0], [0, 0.3]]", 2), ("0.1; 0.2; 0.3", 2),
                   ("0.1, 0; 0.2", 2), ("1 2 3 4; 1 2 3 4", 2), ("x", 2), ("0.5", 1)]
    page = open_app(browser, comfy_server.url)
    try:
        result = page.evaluate(
            """async ([cases, boundaryTexts, thetaTexts]) => {
          const m = await import('/extensions/comfyui-perflow/perflow_segments.js');
          return {
            grids: cases.map(([b, k, n]) => m.timestepGrid(m.windowTimes(b, k), n)),
            boundaries: boundaryTexts.map(t => m.parseBoundaries(t)),
            theta: thetaTexts.map(([t, k]) => m.parseTheta(t, k)),
          };
        }""",
            [cases, boundary_texts, theta_texts],
        )
    finally:
        page.close()
    Segments = pack_core("segments").Segments
    PerflowSettings = pack_core().PerflowSettings
    for (boundaries, k, steps), grid in zip(cases, result["grids"]):
        segments = Segments.uniform(k) if boundaries is None else Segments.from_boundaries(boundaries)
        assert grid == segments.timesteps(steps).tolist(), (boundaries, k, steps)
    for text, parsed in zip(boundary_texts, result["boundaries"]):
        try:
            expected = PerflowSettings(segment_boundaries=text).build_segments().boundaries
        except ValueError:
            assert "error" in parsed, text
        else:
            assert parsed.get("values") == expected, text
    for (text, k), parsed in zip(theta_texts, result["theta"]):
        try:
            expected = PerflowSettings(segments=k, theta=text).theta.tolist()
        except ValueError:
            assert "error" in parsed, text
        else:
            assert parsed.get("rows") == expected, text
