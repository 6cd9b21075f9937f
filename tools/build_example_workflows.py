"""Regenerate the example workflows in the real ComfyUI frontend (maintainer tool, not a test).

Each graph is built in headless Chromium with the frontend's own LiteGraph (createNode, connect,
widget values), then saved twice:
    example_workflows/<name>.json          app.graph.serialize()            (UI format, template browser)
    tests/comfyui/workflows_api/<name>_api.json    (await app.graphToPrompt()).output  (API format, POST /prompt)
Each workflow is then queued in the page and must produce an image; a thumbnail of the canvas is saved
as example_workflows/<name>.jpg (the template browser shows <name>.jpg next to <name>.json).

Usage (starts its own headless server with the tiny test models, like the tests):
    COMFYUI_PATH=/path/to/ComfyUI .venv-comfy/bin/python tools/build_example_workflows.py
or against a running server that has the test models: ... build_example_workflows.py --url http://127.0.0.1:8188
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' support package

from support import server as cs  # noqa: E402

POSITIVE = "a watercolor painting of a lighthouse on a cliff at sunset, soft light"
NEGATIVE = "blurry, low quality, watermark"
TINY_NOTE = (
    "\n\n*Sizes and names are those of the tests' tiny CPU model ({ckpt}, 64x64 px). "
    "For a real PeRFlow SD1.5 model use 512x512 (SDXL: 1024x1024).*"
)

# Each node: key, type, [x, y], widget values by name, optional title. Links: (from key, output, to key, input).
WORKFLOWS = {
    "perflow_txt2img": {
        "note": "### PeRFlow txt2img (custom sampling)\n"
        "**Load PeRFlow Checkpoint** reads the model and the PeRFlow settings stored in the file's `perflow.*` keys "
        "(segments, theta, parameterisation) and hands them to the **PeRFlow Sampler** and **PeRFlow Scheduler**. "
        "4 steps = one per segment. Any guider works (CFGGuider here; PeRFlow SD1.5 likes cfg 4.5-7.5).",
        "nodes": [
            ("loader", "PerflowCheckpointLoader", [20, 270], {"ckpt_name": cs.CHECKPOINT_NAME}),
            ("pos", "CLIPTextEncode", [350, 20], {"text": POSITIVE}, "Positive"),
            ("neg", "CLIPTextEncode", [350, 240], {"text": NEGATIVE}, "Negative"),
            ("latent", "EmptyLatentImage", [350, 460], {"width": 64, "height": 64, "batch_size": 1}),
            ("noise", "RandomNoise", [800, 20], {"noise_seed": 42, "control_after_generate": "fixed"}),
            ("guider", "CFGGuider", [800, 150], {"cfg": 4.5}),
            ("sampler", "PerflowSampler", [800, 300], {}),
            ("sigmas", "PerflowScheduler", [800, 380], {"steps": 4, "denoise": 1.0}),
            ("sample", "SamplerCustomAdvanced", [1110, 20], {}),
            ("decode", "VAEDecode", [1110, 190], {}),
            ("save", "SaveImage", [1360, 20], {"filename_prefix": "perflow_txt2img"}),
            ("note", "MarkdownNote", [20, 20], {}),
        ],
        "links": [
            ("loader", "MODEL", "guider", "model"),
            ("loader", "MODEL", "sigmas", "model"),
            ("loader", "CLIP", "pos", "clip"),
            ("loader", "CLIP", "neg", "clip"),
            ("loader", "VAE", "decode", "vae"),
            ("loader", "perflow", "sampler", "perflow"),
            ("loader", "perflow", "sigmas", "perflow"),
            ("pos", "CONDITIONING", "guider", "positive"),
            ("neg", "CONDITIONING", "guider", "negative"),
            ("noise", "NOISE", "sample", "noise"),
            ("guider", "GUIDER", "sample", "guider"),
            ("sampler", "SAMPLER", "sample", "sampler"),
            ("sigmas", "SIGMAS", "sample", "sigmas"),
            ("latent", "LATENT", "sample", "latent_image"),
            ("sample", "output", "decode", "samples"),
            ("decode", "IMAGE", "save", "images"),
        ],
    },
    "perflow_sd15_delta": {
        "note": "### SD1.5 + PeRFlow delta weights\n"
        "**Apply PeRFlow Delta Weights** turns an SD1.5 model (any fine-tune) into PeRFlow: W + strength x dW, "
        "as a model patch. Put the released delta (diffusers UNet, e.g. `hansyan/perflow-sd15-delta-weights`) "
        "in `models/perflow_deltas`. Without a PeRFlow Settings input the KSampler uses the original PeRFlow "
        "(K = 4, theta = 0, auto).",
        "nodes": [
            ("loader", "CheckpointLoaderSimple", [20, 270], {"ckpt_name": cs.CHECKPOINT_NAME}),
            ("delta", "PerflowApplyDelta", [20, 440], {"delta_name": cs.DELTA_NAME, "strength": 1.0}),
            ("pos", "CLIPTextEncode", [350, 20], {"text": POSITIVE}, "Positive"),
            ("neg", "CLIPTextEncode", [350, 240], {"text": NEGATIVE}, "Negative"),
            ("latent", "EmptyLatentImage", [350, 460], {"width": 64, "height": 64, "batch_size": 1}),
            ("ksampler", "PerflowKSampler", [800, 20], {"seed": 42, "control_after_generate": "fixed", "steps": 4, "cfg": 4.5, "denoise": 1.0}),
            ("decode", "VAEDecode", [1110, 20], {}),
            ("save", "SaveImage", [1360, 20], {"filename_prefix": "perflow_sd15_delta"}),
            ("note", "MarkdownNote", [20, 20], {}),
        ],
        "links": [
            ("loader", "MODEL", "delta", "model"),
            ("loader", "CLIP", "pos", "clip"),
            ("loader", "CLIP", "neg", "clip"),
            ("loader", "VAE", "decode", "vae"),
            ("delta", "MODEL", "ksampler", "model"),
            ("pos", "CONDITIONING", "ksampler", "positive"),
            ("neg", "CONDITIONING", "ksampler", "negative"),
            ("latent", "LATENT", "ksampler", "latent_image"),
            ("ksampler", "LATENT", "decode", "samples"),
            ("decode", "IMAGE", "save", "images"),
        ],
    },
    "perflow_img2img": {
        "note": "### PeRFlow img2img\n"
        "The image is encoded and **PeRFlow KSampler** re-noises it to `denoise` and samples back: with "
        "4 steps at denoise 0.5 the grid has 8 steps and the last 4 run, starting on a segment boundary.",
        "nodes": [
            ("loader", "PerflowCheckpointLoader", [20, 270], {"ckpt_name": cs.CHECKPOINT_NAME}),
            ("image", "LoadImage", [20, 440], {"image": cs.INPUT_IMAGE_NAME}),
            ("pos", "CLIPTextEncode", [350, 20], {"text": POSITIVE}, "Positive"),
            ("neg", "CLIPTextEncode", [350, 240], {"text": NEGATIVE}, "Negative"),
            ("encode", "VAEEncode", [350, 460], {}),
            ("ksampler", "PerflowKSampler", [800, 20], {"seed": 42, "control_after_generate": "fixed", "steps": 4, "cfg": 4.5, "denoise": 0.5}),
            ("decode", "VAEDecode", [1110, 20], {}),
            ("save", "SaveImage", [1360, 20], {"filename_prefix": "perflow_img2img"}),
            ("note", "MarkdownNote", [20, 20], {}),
        ],
        "links": [
            ("loader", "MODEL", "ksampler", "model"),
            ("loader", "CLIP", "pos", "clip"),
            ("loader", "CLIP", "neg", "clip"),
            ("loader", "VAE", "encode", "vae"),
            ("loader", "VAE", "decode", "vae"),
            ("loader", "perflow", "ksampler", "perflow"),
            ("image", "IMAGE", "encode", "pixels"),
            ("pos", "CONDITIONING", "ksampler", "positive"),
            ("neg", "CONDITIONING", "ksampler", "negative"),
            ("encode", "LATENT", "ksampler", "latent_image"),
            ("ksampler", "LATENT", "decode", "samples"),
            ("decode", "IMAGE", "save", "images"),
        ],
    },
    "perflow_ksampler_settings": {
        "note": "### PeRFlow KSampler + PeRFlow Settings\n"
        "All in one sampler node. **PeRFlow Settings** sets the segments K, optional boundaries "
        "(e.g. `999, 700, 400, 150, 0`), the per-segment correction theta (rows separated by `;`) and the "
        "parameterisation (auto: SD1.x diff_eps, SDXL ddim_eps, v / flow models velocity). "
        "Use at least one step per segment.",
        "nodes": [
            ("loader", "CheckpointLoaderSimple", [20, 270], {"ckpt_name": cs.CHECKPOINT_NAME}),
            ("settings", "PerflowSettings", [20, 440], {"parameterisation": "auto", "segments": 4, "boundaries": "", "theta": ""}),
            ("pos", "CLIPTextEncode", [350, 20], {"text": POSITIVE}, "Positive"),
            ("neg", "CLIPTextEncode", [350, 240], {"text": NEGATIVE}, "Negative"),
            ("latent", "EmptyLatentImage", [350, 460], {"width": 64, "height": 64, "batch_size": 1}),
            ("ksampler", "PerflowKSampler", [800, 20], {"seed": 42, "control_after_generate": "fixed", "steps": 4, "cfg": 4.5, "denoise": 1.0}),
            ("decode", "VAEDecode", [1110, 20], {}),
            ("save", "SaveImage", [1360, 20], {"filename_prefix": "perflow_ksampler_settings"}),
            ("note", "MarkdownNote", [20, 20], {}),
        ],
        "links": [
            ("loader", "MODEL", "ksampler", "model"),
            ("loader", "CLIP", "pos", "clip"),
            ("loader", "CLIP", "neg", "clip"),
            ("loader", "VAE", "decode", "vae"),
            ("settings", "perflow", "ksampler", "perflow"),
            ("pos", "CONDITIONING", "ksampler", "positive"),
            ("neg", "CONDITIONING", "ksampler", "negative"),
            ("latent", "LATENT", "ksampler", "latent_image"),
            ("ksampler", "LATENT", "decode", "samples"),
            ("decode", "IMAGE", "save", "images"),
        ],
    },
}

BUILD_JS = """async (spec) => {
  app.graph.clear();
  const byKey = {};
  for (const [key, type, pos, widgets, title] of spec.nodes) {
    const node = LiteGraph.createNode(type);
    if (!node) throw new Error('node type not registered: ' + type);
    if (title) node.title = title;
    app.graph.add(node);
    node.pos = pos;
    for (const [name, value] of Object.entries(widgets)) {
      const widget = (node.widgets || []).find(w => w.name === name);
      if (!widget) throw new Error(type + ' has no widget ' + name);
      widget.value = value;
    }
    byKey[key] = node;
  }
  const note = byKey['note'];
  note.widgets[0].value = spec.note;
  note.size = [300, 200];
  note.title = 'About this workflow';
  for (const [from, output, to, input] of spec.links) {
    const a = byKey[from], b = byKey[to];
    const o = a.findOutputSlot(output), i = b.findInputSlot(input);
    if (o < 0 || i < 0) throw new Error(`no slot ${from}.${output} (${o}) -> ${to}.${input} (${i})`);
    if (!a.connect(o, b, i)) throw new Error(`connect failed ${from}.${output} -> ${to}.${input}`);
  }
  for (const node of app.graph._nodes) {
    node.size = [Math.max(node.size[0], /Loader|Delta/.test(node.type) ? 300 : 240), node.size[1]];
    if (node.type === 'SaveImage') node.size = [260, 240];
    if (node.type === 'LoadImage') node.size = [300, 300];
    if (node.type === 'CLIPTextEncode') node.size = [400, 180];
    if (node.type === 'PerflowSettings') node.size = [300, 200];
  }
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const node of app.graph._nodes) {
    x0 = Math.min(x0, node.pos[0]); y0 = Math.min(y0, node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT);
    x1 = Math.max(x1, node.pos[0] + node.size[0]); y1 = Math.max(y1, node.pos[1] + node.size[1]);
  }
  app.canvas.deselectAll?.();
  app.canvas.ds.fitToBounds([x0 - 20, y0 - 20, x1 - x0 + 40, y1 - y0 + 40], {zoom: 0.98});
  await new Promise(r => setTimeout(r, 300));
  app.graph.setDirtyCanvas(true, true);
  return true;
}"""


def build_all(url: str, names: list[str]) -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = cs.launch_chromium(playwright)
        try:
            page = cs.open_app(browser, url)
            for name in names:
                spec = WORKFLOWS[name]
                spec_js = {"nodes": [list(n) + [None] * (5 - len(n)) for n in spec["nodes"]], "links": spec["links"]}
                spec_js["note"] = spec["note"] + TINY_NOTE.format(ckpt=cs.CHECKPOINT_NAME)
                page.evaluate(BUILD_JS, spec_js)
                ui = page.evaluate("() => JSON.parse(JSON.stringify(app.graph.serialize()))")
                ui["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-perflow/example_workflows/{name}"))
                api = page.evaluate("async () => JSON.parse(JSON.stringify((await app.graphToPrompt()).output))")
                (cs.EXAMPLE_WORKFLOWS / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
                (cs.API_WORKFLOWS / f"{name}_api.json").write_text(json.dumps(api, indent=2) + "\n")
                # Reload what was written, run it in the page, and keep a thumbnail of the result.
                cs.load_workflow(page, ui, name)
                cs.queue_and_wait_for_image(page)
                png = page.locator("#graph-canvas").screenshot()
                thumbnail = Image.open(io.BytesIO(png)).convert("RGB")
                thumbnail.thumbnail((640, 400))
                thumbnail.save(cs.EXAMPLE_WORKFLOWS / f"{name}.jpg", quality=85)
                print("built", name, len(ui["nodes"]), "nodes;", len(api), "API nodes")
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running ComfyUI with this pack and the tiny test models (default: start one)")
    parser.add_argument("names", nargs="*", default=list(WORKFLOWS))
    args = parser.parse_args()
    cs.EXAMPLE_WORKFLOWS.mkdir(exist_ok=True)
    cs.API_WORKFLOWS.mkdir(exist_ok=True)
    if args.url:
        build_all(args.url, args.names)
        return
    server = cs.acquire_server()
    try:
        build_all(server.url, args.names)
    finally:
        cs.release_server()


if __name__ == "__main__":
    main()
