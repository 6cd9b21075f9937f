"""Maintainer script: one PNG per PeRFlow node, for the README (docs/nodes/<NodeId>.png).

Starts the test server of tests/support/server.py (tiny checkpoint, theta file, this pack installed) and the
real ComfyUI frontend in headless Chromium, then for each node: clears the canvas, creates the node alone
(LiteGraph.createNode + app.graph.add), zooms in so it is legible, and saves a tight crop of the node (title
bar included, a small margin) taken from its bounding box converted to screen coordinates.

    COMFYUI_PATH=/path/to/ComfyUI .venv-comfy/bin/python tools/make_node_screenshots.py [--scale 1.4] [NodeId ...]

Needs the playwright python package and a Chromium (default /usr/bin/chromium, or PERFLOW_CHROMIUM); it never
downloads a browser. Each PNG is kept under 150 KB (palette-quantised if the plain PNG is larger).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the tests' support package

OUT_DIR = REPO_ROOT / "docs" / "nodes"
MAX_BYTES = 150_000
MARGIN_PX = 10
DEFAULT_SCALE = 1.4
VIEWPORT = (1600, 1000)
# Top-left of the node's title bar on screen, relative to the canvas element: clear of the side bar and menus.
NODE_SCREEN_ORIGIN = (360, 160)

PLACE_NODE_JS = """([type, scale, origin]) => {
  app.graph.clear();
  const node = LiteGraph.createNode(type);
  if (!node) throw new Error('LiteGraph.createNode(' + type + ') returned nothing');
  app.graph.add(node);
  node.pos = [0, 0];
  const titleHeight = LiteGraph.NODE_TITLE_HEIGHT;
  // A new node's width comes from its slots and widgets, not its title, which the frontend then cuts
  // ("PeRFlow Sa..."): widen it so the whole title shows.
  const ctx = app.canvas.ctx;
  ctx.save();
  ctx.font = node.titleFontStyle || app.canvas.title_text_font;
  const titleWidth = Math.ceil(ctx.measureText(node.title).width + 2 * titleHeight);
  ctx.restore();
  const widened = node.size[0] < titleWidth;
  if (widened) node.setSize([titleWidth, node.size[1]]);
  const ds = app.canvas.ds;
  ds.scale = scale;
  // screen = (graph + offset) * scale: put the title bar's top-left corner at `origin`.
  ds.offset[0] = origin[0] / scale - node.pos[0];
  ds.offset[1] = origin[1] / scale - (node.pos[1] - titleHeight);
  app.canvas.deselectAll && app.canvas.deselectAll();
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  return {id: node.id, title: node.title, widened, widgets: (node.widgets || []).map(w => w.name)};
}"""

HIDE_BADGES_JS = """async () => {
  for (const id of ['Comfy.NodeBadge.NodeSourceBadgeMode', 'Comfy.NodeBadge.NodeIdBadgeMode']) {
    await app.extensionManager.setting.set(id, 'None');
  }
}"""

# The node's box in page (CSS) pixels: its bounding rectangle in graph space (title bar included) through
# ds.convertOffsetToCanvas, plus where the canvas element is on the page.
NODE_BOX_JS = """() => {
  const node = app.graph._nodes[0];
  const titleHeight = LiteGraph.NODE_TITLE_HEIGHT;
  const r = node.boundingRect
    ? Array.from(node.boundingRect)
    : [node.pos[0], node.pos[1] - titleHeight, node.size[0], node.size[1] + titleHeight];
  const ds = app.canvas.ds;
  const topLeft = ds.convertOffsetToCanvas([r[0], r[1]]);
  const bottomRight = ds.convertOffsetToCanvas([r[0] + r[2], r[1] + r[3]]);
  const element = app.canvas.canvas.getBoundingClientRect();
  return {x: element.left + topLeft[0], y: element.top + topLeft[1],
          width: bottomRight[0] - topLeft[0], height: bottomRight[1] - topLeft[1],
          scale: ds.scale, size: Array.from(node.size)};
}"""


def _small_png(png: bytes) -> bytes:
    if len(png) < MAX_BYTES:
        return png
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    for colors in (256, 128, 64):
        buffer = io.BytesIO()
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
        if buffer.tell() < MAX_BYTES:
            return buffer.getvalue()
    raise RuntimeError(f"could not get the screenshot under {MAX_BYTES} bytes")


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def shoot(page, node_id: str, scale: float, out_dir: Path) -> Path:
    info = page.evaluate(PLACE_NODE_JS, [node_id, scale, list(NODE_SCREEN_ORIGIN)])
    page.wait_for_timeout(400)  # DOM widgets (multiline text) follow the canvas on the next frames
    page.evaluate("() => { app.canvas.setDirty(true, true); app.canvas.draw(true, true); }")
    page.wait_for_timeout(200)
    box = page.evaluate(NODE_BOX_JS)
    viewport = page.viewport_size
    clip = {
        "x": max(0.0, box["x"] - MARGIN_PX),
        "y": max(0.0, box["y"] - MARGIN_PX),
        "width": box["width"] + 2 * MARGIN_PX,
        "height": box["height"] + 2 * MARGIN_PX,
    }
    if clip["x"] + clip["width"] > viewport["width"] or clip["y"] + clip["height"] > viewport["height"]:
        raise RuntimeError(f"{node_id} does not fit the viewport at scale {scale}: {box}; use a smaller --scale")
    png = _small_png(page.screenshot(clip=clip))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{node_id}.png"
    path.write_bytes(png)
    print(f"{_shown(path)}: {info['title']!r}{' (widened to show the title)' if info['widened'] else ''} widgets {info['widgets']}, {round(clip['width'])}x{round(clip['height'])} px, {len(png)} bytes")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("nodes", nargs="*", help="node ids (default: all PeRFlow nodes)")
    parser.add_argument("--scale", type=float, default=DEFAULT_SCALE, help=f"canvas zoom (default {DEFAULT_SCALE})")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default docs/nodes)")
    args = parser.parse_args(argv)

    if not os.environ.get("COMFYUI_PATH"):
        parser.error("set COMFYUI_PATH to a ComfyUI checkout (and run this with its python)")
    from support.server import PERFLOW_NODE_IDS, acquire_server, browser_unavailable_reason, close_dialogs, launch_chromium, open_app, release_server

    reason = browser_unavailable_reason()
    if reason:
        parser.error(reason)
    node_ids = args.nodes or PERFLOW_NODE_IDS
    unknown = sorted(set(node_ids) - set(PERFLOW_NODE_IDS))
    if unknown:
        parser.error(f"not PeRFlow nodes: {unknown}")

    from playwright.sync_api import sync_playwright

    server = acquire_server()
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = open_app(browser, server.url, viewport=VIEWPORT)
                close_dialogs(page)
                # No "comfyui-perflow" source badge above the title (it would be cut by the crop); the
                # setting is saved in the test server's temporary user folder only.
                page.evaluate(HIDE_BADGES_JS)
                for node_id in node_ids:
                    shoot(page, node_id, args.scale, args.out)
                page.evaluate("() => app.graph.clear()")
            finally:
                browser.close()
    finally:
        release_server()
    return 0


if __name__ == "__main__":
    sys.exit(main())
