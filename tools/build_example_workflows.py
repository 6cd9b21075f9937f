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
# Every workflow has a checkpoint loader ("loader") with its own inputs below it, the two prompts, a latent
# source at [350, 460], its sampling nodes, then VAE decode, save and the note: workflow() builds that frame
# around what is a workflow's own, ksampler_workflow() the three that sample with the PeRFlow KSampler.
# The order of the nodes and links sets their ids in the saved files.
PROMPTS = [
    ("pos", "CLIPTextEncode", [350, 20], {"text": POSITIVE}, "Positive"),
    ("neg", "CLIPTextEncode", [350, 240], {"text": NEGATIVE}, "Negative"),
]
EMPTY_LATENT = ("latent", "EmptyLatentImage", [350, 460], {"width": 64, "height": 64, "batch_size": 1})


def below_loader(key: str, node_type: str, widgets: dict) -> tuple:
    """A node in the left column under the loader."""
    return (key, node_type, [20, 440], widgets)


def prompts_to(key: str) -> list:
    """The links of the two prompts' conditioning into ``key``."""
    return [("pos", "CONDITIONING", key, "positive"), ("neg", "CONDITIONING", key, "negative")]


def workflow(name, note, loader, *, below=(), middle, model_to=(), vae_to=("decode",), perflow_to=(), links, sampled, decode_at=(1110, 20)):
    """``(name, spec)``. Nodes: the loader (type ``loader``), the nodes ``below`` it, the prompts, ``middle``
    (the latent source first), decode, save and note. Links: the loader's, in the order of its outputs
    (MODEL to ``model_to``, CLIP to the prompts, VAE to ``vae_to``, perflow to ``perflow_to``), then ``links``,
    then the ``sampled`` (key, output) into decode and the image into save."""
    nodes = [
        ("loader", loader, [20, 270], {"ckpt_name": cs.CHECKPOINT_NAME}),
        *below,
        *PROMPTS,
        *middle,
        ("decode", "VAEDecode", list(decode_at), {}),
        ("save", "SaveImage", [1360, 20], {"filename_prefix": name}),
        ("note", "MarkdownNote", [20, 20], {}),
    ]
    from_loader = [("loader", "MODEL", key, "model") for key in model_to]
    from_loader += [("loader", "CLIP", "pos", "clip"), ("loader", "CLIP", "neg", "clip")]
    from_loader += [("loader", "VAE", key, "vae") for key in vae_to] + [("loader", "perflow", key, "perflow") for key in perflow_to]
    decoded = [(*sampled, "decode", "samples"), ("decode", "IMAGE", "save", "images")]
    return name, {"note": note, "nodes": nodes, "links": from_loader + links + decoded}


def ksampler_workflow(name, note, loader, *, below, below_link, latent=EMPTY_LATENT, denoise=1.0, **loader_links):
    """A workflow sampled by one PeRFlow KSampler (seed 42, 4 steps, cfg 4.5) from ``latent``; ``below_link`` is
    the link out of the node ``below`` the loader; ``loader_links`` are workflow()'s model_to, vae_to, perflow_to."""
    ksampler = ("ksampler", "PerflowKSampler", [800, 20], {"seed": 42, "control_after_generate": "fixed", "steps": 4, "cfg": 4.5, "denoise": denoise})
    links = [below_link, *prompts_to("ksampler"), (latent[0], "LATENT", "ksampler", "latent_image")]
    return workflow(name, note, loader, below=[below], middle=[latent, ksampler], links=links, sampled=("ksampler", "LATENT"), **loader_links)


WORKFLOWS = dict(
    [
        workflow(
            "perflow_txt2img",
            "### PeRFlow txt2img (custom sampling)\n"
            "**Load PeRFlow Checkpoint** reads the model and the PeRFlow settings stored in the file's `perflow.*` keys "
            "(segments, theta, parameterisation) and hands them to the **PeRFlow Sampler** and **PeRFlow Scheduler**. "
            "4 steps = one per segment. Any guider works (CFGGuider here; PeRFlow SD1.5 likes cfg 4.5-7.5).",
            "PerflowCheckpointLoader",
            middle=[
                EMPTY_LATENT,
                ("noise", "RandomNoise", [800, 20], {"noise_seed": 42, "control_after_generate": "fixed"}),
                ("guider", "CFGGuider", [800, 150], {"cfg": 4.5}),
                ("sampler", "PerflowSampler", [800, 300], {}),
                ("sigmas", "PerflowScheduler", [800, 380], {"steps": 4, "denoise": 1.0}),
                ("sample", "SamplerCustomAdvanced", [1110, 20], {}),
            ],
            model_to=("guider", "sigmas"),
            perflow_to=("sampler", "sigmas"),
            links=[
                *prompts_to("guider"),
                ("noise", "NOISE", "sample", "noise"),
                ("guider", "GUIDER", "sample", "guider"),
                ("sampler", "SAMPLER", "sample", "sampler"),
                ("sigmas", "SIGMAS", "sample", "sigmas"),
                ("latent", "LATENT", "sample", "latent_image"),
            ],
            sampled=("sample", "output"),
            decode_at=(1110, 190),
        ),
        ksampler_workflow(
            "perflow_sd15_delta",
            "### SD1.5 + PeRFlow delta weights\n"
            "**Apply PeRFlow Delta Weights** turns an SD1.5 model (any fine-tune) into PeRFlow: W + strength x dW, "
            "as a model patch. Put the released delta (diffusers UNet, e.g. `hansyan/perflow-sd15-delta-weights`) "
            "in `models/perflow_deltas`. Without a PeRFlow Settings input the KSampler uses the original PeRFlow "
            "(K = 4, theta = 0, auto).",
            "CheckpointLoaderSimple",
            below=below_loader("delta", "PerflowApplyDelta", {"delta_name": cs.DELTA_NAME, "strength": 1.0}),
            below_link=("delta", "MODEL", "ksampler", "model"),
            model_to=("delta",),
        ),
        ksampler_workflow(
            "perflow_img2img",
            "### PeRFlow img2img\n"
            "The image is encoded and **PeRFlow KSampler** re-noises it to `denoise` and samples back: with "
            "4 steps at denoise 0.5 the grid has 8 steps and the last 4 run, starting on a segment boundary.",
            "PerflowCheckpointLoader",
            below=below_loader("image", "LoadImage", {"image": cs.INPUT_IMAGE_NAME}),
            below_link=("image", "IMAGE", "encode", "pixels"),
            latent=("encode", "VAEEncode", [350, 460], {}),
            denoise=0.5,
            model_to=("ksampler",),
            vae_to=("encode", "decode"),
            perflow_to=("ksampler",),
        ),
        ksampler_workflow(
            "perflow_ksampler_settings",
            "### PeRFlow KSampler + PeRFlow Settings\n"
            "All in one sampler node. **PeRFlow Settings** sets the segments K, optional boundaries "
            "(e.g. `999, 700, 400, 150, 0`), the per-segment correction theta (rows separated by `;`) and the "
            "parameterisation (auto: SD1.x diff_eps, SDXL ddim_eps, v / flow models velocity). "
            "Use at least one step per segment.",
            "CheckpointLoaderSimple",
            below=below_loader("settings", "PerflowSettings", {"parameterisation": "auto", "segments": 4, "boundaries": "", "theta": ""}),
            below_link=("settings", "perflow", "ksampler", "perflow"),
            model_to=("ksampler",),
        ),
    ]
)

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
