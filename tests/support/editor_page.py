"""Driving the PeRFlow Settings segment editor (web/perflow_editor.js) in a real frontend page (Playwright, sync API),
for tests/comfyui/test_comfyui_editor.py: the node mode setting, the workflow with the editor, the editor's drawn state
and real mouse drags and typing on it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .server import PROMPT_TIMEOUT_S, ComfyServer, load_workflow, tiny_workflow

VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"
# The tiny twin of the example (it runs on the test server's models): PeRFlow Settings -> PeRFlow KSampler -> Save Image.
EDITOR_WORKFLOW = "perflow_ksampler_settings"
EDITOR_WORKFLOW_STEPS = 8  # its PeRFlow KSampler's steps
NODE_SCREEN_POSITION = (140, 130)  # where the settings node is put, in canvas pixels at ZOOM
ZOOM = 1.2  # not 1: the editor is under the canvas zoom's CSS transform, as users see it


def set_node_mode(server: ComfyServer, vue: bool) -> None:
    """The frontend's node mode for the next page load (the setting the menu toggle and the first-run tour set)."""
    status, payload = server.request(f"/settings/{VUE_NODES_SETTING}", vue)
    assert status == 200, f"setting {VUE_NODES_SETTING}: HTTP {status}: {payload}"


def open_editor_workflow(page) -> int:
    """Load the settings workflow and put the PeRFlow Settings node at a fixed place at ZOOM; returns its node id."""
    result = load_workflow(page, tiny_workflow(EDITOR_WORKFLOW), EDITOR_WORKFLOW)
    assert result["missing"] == [], result
    node_id = page.evaluate(
        """([x, y, zoom]) => {
      const node = app.graph._nodes.find(n => n.type === 'PerflowSettings');
      app.canvas.ds.scale = zoom;
      app.canvas.ds.offset = [x / zoom - node.pos[0], y / zoom - node.pos[1]];
      app.canvas.setDirty(true, true);
      if (node.perflowEditor) node.perflowEditor.root.dataset.perflowNode = String(node.id);
      return node.id;
    }""",
        [*NODE_SCREEN_POSITION, ZOOM],
    )
    page.wait_for_timeout(800)  # let the canvas (or the Vue nodes) follow the new view
    return node_id


def editor_state(page, node_id: int) -> dict[str, Any]:
    """The node's widget values, its position, and what the editor drew (null entries when there is no editor)."""
    return page.evaluate(
        """(id) => {
      const node = app.graph.getNodeById(id);
      const value = (name) => node.widgets.find(w => w.name === name).value;
      const plot = document.querySelector(`[data-perflow-node="${id}"] [data-perflow=plot]`);
      const data = plot ? plot.dataset : null;
      return {
        segments: value('segments'), boundaries: value('boundaries'), theta: value('theta'), pos: [...node.pos],
        shown: !!(plot && plot.getBoundingClientRect().width > 0),
        drawn: data && {k: Number(data.k), boundaries: JSON.parse(data.boundaries), theta: JSON.parse(data.theta),
                        grid: JSON.parse(data.grid), error: data.error,
                        bars: Object.fromEntries([...plot.querySelectorAll('[data-theta-bar]')].map(b => [b.dataset.thetaBar, {
                          value: Number(b.dataset.value), y: Number(b.getAttribute('y')), height: Number(b.getAttribute('height'))}]))},
      };
    }""",
        node_id,
    )


def set_preview_steps(page, node_id: int, steps: int) -> None:
    field = page.locator(f'[data-perflow-node="{node_id}"] .perflow-preview-steps')
    field.fill(str(steps))
    field.press("Enter")
    field.dispatch_event("change")


def tracked_preview_steps(page, node_id: int):
    """The node's preview step count in the workflow state the change tracker last recorded (undo, the unsaved mark)."""
    return page.evaluate(
        """(id) => app.extensionManager.workflow.activeWorkflow.changeTracker.activeState.nodes
          .find(n => n.id === id).properties['preview steps']""",
        node_id,
    )


def _client_point(page, node_id: int, timestep: float, y: float) -> tuple[float, float]:
    """Screen coordinates of a timestep on the editor's axis at height y, in the plot's units (its viewBox)."""
    return tuple(
        page.evaluate(
            """([id, timestep, y]) => {
      const plot = document.querySelector(`[data-perflow-node="${id}"] [data-perflow=plot]`);
      const width = plot.viewBox.baseVal.width, margin = 14;
      const point = new DOMPoint(margin + (1000 - timestep) / 1000 * (width - 2 * margin), y).matrixTransform(plot.getScreenCTM());
      return [point.x, point.y];
    }""",
            [node_id, timestep, y],
        )
    )


def drag_boundary(page, node_id: int, index: int, to_timestep: float) -> None:
    """Press on boundary `index`'s handle, move the mouse to `to_timestep` in a few steps, release."""
    grip = page.locator(f'[data-perflow-node="{node_id}"] [data-boundary="{index}"]')
    box = grip.bounding_box()
    assert box, f"boundary {index} has no handle on the page"
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    target_x, target_y = _client_point(page, node_id, to_timestep, 40)
    page.mouse.move(target_x, target_y, steps=8)
    page.mouse.up()
    page.wait_for_timeout(200)


def drag_theta_bar(page, node_id: int, window: int, column: int, pixels_up: float) -> None:
    """Press on theta bar (window, column) and move the mouse up (negative: down) by `pixels_up` screen pixels."""
    bar = page.locator(f'[data-perflow-node="{node_id}"] [data-theta-window="{window}"][data-theta-column="{column}"]')
    box = bar.bounding_box()
    assert box, f"theta bar {window},{column} is not on the page"
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x, y - pixels_up, steps=6)
    page.mouse.up()
    page.wait_for_timeout(200)


def click_timestep(page, node_id: int, timestep: float) -> None:
    """A click inside the windows' band (picks the window there)."""
    x, y = _client_point(page, node_id, timestep, 60)
    page.mouse.click(x, y)
    page.wait_for_timeout(500)  # no double-click with a next click


def double_click_timestep(page, node_id: int, timestep: float) -> None:
    """A double-click inside the windows' band (splits the window there)."""
    x, y = _client_point(page, node_id, timestep, 60)
    page.mouse.dblclick(x, y)
    page.wait_for_timeout(200)


def double_click_boundary(page, node_id: int, index: int) -> None:
    page.locator(f'[data-perflow-node="{node_id}"] [data-boundary="{index}"]').dblclick()
    page.wait_for_timeout(200)


def toggle_collapsed(page, node_id: int) -> None:
    """Collapse the node, or expand it when collapsed (LiteGraph's collapse, which the canvas and Vue nodes follow)."""
    page.evaluate("(id) => app.graph.getNodeById(id).collapse()", node_id)
    page.wait_for_timeout(300)


def vue_field_values(page, node_id: int) -> list[str]:
    """The texts shown in a Vue node's own input fields (the editor's fields left out), in their order."""
    return page.evaluate(
        """(id) => [...document.querySelector(`[data-node-id="${id}"]`).querySelectorAll('input, textarea')]
          .filter(field => !field.closest('.perflow-segment-editor')).map(field => field.value)""",
        node_id,
    )


def theta_text_field(page, node_id: int):
    """The `theta` widget's text area as the user sees it (the canvas' DOM widget, or the Vue node's field)."""
    marked = page.evaluate(
        """(id) => {
      const node = app.graph.getNodeById(id);
      const widget = node.widgets.find(w => w.name === 'theta');
      let field = widget.element || widget.inputEl;
      if (!field || !field.isConnected || !field.getBoundingClientRect().width) {
        const nodeElement = document.querySelector(`[data-node-id="${id}"]`);
        field = nodeElement && [...nodeElement.querySelectorAll('textarea')].find(t => !t.closest('.perflow-segment-editor'));
      }
      if (!field) return false;
      field.dataset.perflowTheta = String(id);
      return true;
    }""",
        node_id,
    )
    assert marked, "the theta text field is not on the page"
    return page.locator(f'[data-perflow-theta="{node_id}"]')


def node_screenshot(page, node_id: int, path: Path) -> bytes:
    """A picture of the settings node alone (with a margin)."""
    box = page.evaluate(
        """(id) => {
      const node = app.graph.getNodeById(id);
      const vue = document.querySelector(`[data-node-id="${id}"]`);
      if (vue && vue.getBoundingClientRect().width) { const r = vue.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; }
      const canvas = app.canvas.canvas.getBoundingClientRect();
      const [ox, oy] = app.canvas.ds.offset, s = app.canvas.ds.scale, title = LiteGraph.NODE_TITLE_HEIGHT;
      return [canvas.left + (node.pos[0] + ox) * s, canvas.top + (node.pos[1] - title + oy) * s, node.size[0] * s, (node.size[1] + title) * s];
    }""",
        node_id,
    )
    margin = 12
    clip = {"x": max(box[0] - margin, 0), "y": max(box[1] - margin, 0), "width": box[2] + 2 * margin, "height": box[3] + 2 * margin}
    return page.screenshot(path=str(path), clip=clip)


def queue_from_page(page, server: ComfyServer, timeout_s: float = PROMPT_TIMEOUT_S) -> dict:
    """Queue the page's graph as the Run button does (app.queuePrompt) and wait for the server to finish that
    prompt (the history entry; the canvas need not draw the result). Returns the history entry."""
    before = set(server.get_json("/history"))
    page.evaluate("async () => { await app.queuePrompt(0); }")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = {key: entry for key, entry in server.get_json("/history").items() if key not in before}
        if new:
            (prompt_id,) = new
            return server.wait(prompt_id, timeout=max(deadline - time.monotonic(), 1))
        time.sleep(0.25)
    raise AssertionError(f"the page queued no prompt within {timeout_s:.0f} s")
