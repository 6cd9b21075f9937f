"""Regenerate the example workflows and their tests' tiny twins in the real ComfyUI frontend (maintainer tool, not a test).

Each graph is built in headless Chromium with the frontend's own LiteGraph (createNode, connect, widget values)
twice, from one spec:
    example_workflows/<name>.json   for users (template browser): the real release files, with the frontend's
                                    download data (each model's name, url, directory in the node's
                                    properties.models), real sizes; a thumbnail of the graph as <name>.jpg
    tests/comfyui/workflows/<name>.json and tests/comfyui/workflows_api/<name>_api.json
                                    the tiny twin: the same graph with the tests' tiny models at 64x64, saved as
                                    app.graph.serialize() and (await app.graphToPrompt()).output; it is queued in
                                    the page and must produce an image
Examples on a diffusers-format folder (SD2.1, SDXL) have no twin yet: the test server has no tiny folders.

Usage (starts its own headless server with the tiny test models, like the tests):
    COMFYUI_PATH=/path/to/ComfyUI .venv-comfy/bin/python tools/build_example_workflows.py [name ...]
or against a running server that has the test models: ... build_example_workflows.py --url http://127.0.0.1:8188
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' support package

from support import server as cs  # noqa: E402
from support.models import SD15_BASE, SD15_DELTA, SD21, SDXL, SDXL_BASE, SIZES  # noqa: E402

POSITIVE = "a watercolor painting of a lighthouse on a cliff at sunset, soft light"
NEGATIVE = "blurry, low quality, watermark"
TWIN_NOTE = "\n\n*The tests' tiny twin of this example: the tests' tiny models at 64x64 px in place of the files above.*"


@dataclass(frozen=True)
class Setup:
    """What a graph loads and how large it samples: the real release files, or the tests' tiny stand-ins."""

    checkpoint: str
    delta: str
    sizes: dict  # model family -> image side in px
    download_data: bool  # the frontend's properties.models on the loaders

    def models(self, *files) -> list:
        return [file.metadata() for file in files] if self.download_data else []


REAL = Setup(SD15_BASE.name, SD15_DELTA.name, SIZES, True)
TINY = Setup(cs.CHECKPOINT_NAME, cs.DELTA_NAME, {family: 64 for family in SIZES}, False)

# Each node: key, type, [x, y], widget values by name, optional title, optional download data.
# Links: (from key, output, to key, input). The order of the nodes and links sets their ids in the saved files.
# Every graph has the note (top left), a loader ("loader") with its own nodes below it, the two prompts, a latent
# source at [380, 520], its sampling nodes, then VAE decode and save.
LEFT, BELOW = [20, 500], [[20, 680], [20, 860]]
PROMPTS = [
    ("pos", "CLIPTextEncode", [380, 20], {"text": POSITIVE}, "Positive"),
    ("neg", "CLIPTextEncode", [380, 260], {"text": NEGATIVE}, "Negative"),
]


def empty_latent(side: int) -> tuple:
    return ("latent", "EmptyLatentImage", [380, 520], {"width": side, "height": side, "batch_size": 1})


def prompts_to(key: str) -> list:
    """The links of the two prompts' conditioning into ``key``."""
    return [("pos", "CONDITIONING", key, "positive"), ("neg", "CONDITIONING", key, "negative")]


def sd15_loader(setup: Setup) -> tuple:
    return ("loader", "CheckpointLoaderSimple", LEFT, {"ckpt_name": setup.checkpoint}, None, setup.models(SD15_BASE))


def sd15_delta(setup: Setup) -> tuple:
    return ("delta", "PerflowApplyDelta", BELOW[0], {"delta_name": setup.delta, "strength": 1.0}, None, setup.models(SD15_DELTA))


def diffusers_loader(release) -> tuple:
    return ("loader", "PerflowDiffusersLoader", LEFT, {"model_path": release.folder})


def workflow(name, note, loader, *, below=(), middle, model_to=(), vae_to=("decode",), perflow_to=(), links, sampled, decode_at=(1180, 20)):
    """``(name, spec)``. Nodes: the note, the ``loader`` node, the nodes ``below`` it, the prompts, ``middle`` (the
    latent source first), decode and save. Links: the loader's, in the order of its outputs (MODEL to ``model_to``,
    CLIP to the prompts, VAE to ``vae_to``, perflow to ``perflow_to``), then ``links``, then the ``sampled``
    (key, output) into decode and the image into save."""
    nodes = [
        ("note", "MarkdownNote", [20, 20], {}, "About this workflow"),
        loader,
        *below,
        *PROMPTS,
        *middle,
        ("decode", "VAEDecode", list(decode_at), {}),
        ("save", "SaveImage", [1430, 20], {"filename_prefix": name}),
    ]
    from_loader = [("loader", "MODEL", key, "model") for key in model_to]
    from_loader += [("loader", "CLIP", "pos", "clip"), ("loader", "CLIP", "neg", "clip")]
    from_loader += [("loader", "VAE", key, "vae") for key in vae_to] + [("loader", "perflow", key, "perflow") for key in perflow_to]
    decoded = [(*sampled, "decode", "samples"), ("decode", "IMAGE", "save", "images")]
    return name, {"note": note, "nodes": nodes, "links": from_loader + links + decoded}


def ksampler(steps: int, cfg: float, denoise: float = 1.0) -> tuple:
    widgets = {"seed": 42, "control_after_generate": "fixed", "steps": steps, "cfg": cfg, "denoise": denoise}
    return ("ksampler", "PerflowKSampler", [870, 20], widgets)


def ksampler_workflow(name, note, loader, *, latent, steps, cfg, denoise=1.0, below=(), below_links=(), **loader_links):
    """A graph sampled by one PeRFlow KSampler (seed 42) from ``latent``; ``below_links`` are the links out of the
    nodes ``below`` the loader; ``loader_links`` are workflow()'s model_to, vae_to, perflow_to."""
    links = [*below_links, *prompts_to("ksampler"), (latent[0], "LATENT", "ksampler", "latent_image")]
    middle = [latent, ksampler(steps, cfg, denoise)]
    return workflow(name, note, loader, below=below, middle=middle, links=links, sampled=("ksampler", "LATENT"), **loader_links)


SD15_FILES_NOTE = (
    f"- `models/{SD15_BASE.directory}/{SD15_BASE.name}`: Stable Diffusion 1.5 ([{SD15_BASE.repo}]({SD15_BASE.page})); "
    "any SD1.5 fine-tune works instead.\n"
    f"- `models/{SD15_DELTA.directory}/{SD15_DELTA.name}`: the PeRFlow delta weights ([{SD15_DELTA.repo}]({SD15_DELTA.page})).\n\n"
    "When they are missing, ComfyUI lists them with a Download button as the workflow opens (the desktop app saves them "
    "in place; in a browser, move the downloaded files into those folders and press R to refresh)."
)


def sd15_delta_txt2img(setup: Setup):
    note = (
        "### PeRFlow SD1.5: txt2img with the delta weights\n"
        "**Apply PeRFlow Delta Weights** turns a Stable Diffusion 1.5 model into PeRFlow (W + strength x dW, a model "
        "patch) and **PeRFlow KSampler** samples it in a few steps with the original PeRFlow settings (K = 4 "
        "windows, `diff_eps` for SD1.5). 512x512, 6 steps, CFG 7.5 (PeRFlow SD1.5: 4-8 steps, CFG 4.5-7.5).\n\n"
        "Files:\n" + SD15_FILES_NOTE
    )
    return ksampler_workflow(
        "perflow_sd15_delta", note, sd15_loader(setup),
        below=[sd15_delta(setup)], below_links=[("delta", "MODEL", "ksampler", "model")],
        latent=empty_latent(setup.sizes["sd15"]), steps=6, cfg=7.5, model_to=("delta",),
    )


def sd15_custom_sampling(setup: Setup):
    note = (
        "### PeRFlow SD1.5: txt2img with custom sampling\n"
        "The same model as *perflow_sd15_delta* (SD1.5 + **Apply PeRFlow Delta Weights**), sampled with "
        "**SamplerCustomAdvanced**: **PeRFlow Sampler** and **PeRFlow Scheduler** (K = 4 windows; 4 steps = one per "
        "window) with any guider (CFGGuider here). 512x512, 4 steps, CFG 7.5.\n\n"
        "Files:\n" + SD15_FILES_NOTE
    )
    middle = [
        empty_latent(setup.sizes["sd15"]),
        ("noise", "RandomNoise", [870, 20], {"noise_seed": 42, "control_after_generate": "fixed"}),
        ("guider", "CFGGuider", [870, 150], {"cfg": 7.5}),
        ("sampler", "PerflowSampler", [870, 300], {}),
        ("sigmas", "PerflowScheduler", [870, 380], {"steps": 4, "denoise": 1.0}),
        ("sample", "SamplerCustomAdvanced", [1180, 20], {}),
    ]
    links = [
        ("delta", "MODEL", "guider", "model"),
        ("delta", "MODEL", "sigmas", "model"),
        *prompts_to("guider"),
        ("noise", "NOISE", "sample", "noise"),
        ("guider", "GUIDER", "sample", "guider"),
        ("sampler", "SAMPLER", "sample", "sampler"),
        ("sigmas", "SIGMAS", "sample", "sigmas"),
        ("latent", "LATENT", "sample", "latent_image"),
    ]
    return workflow(
        "perflow_txt2img", note, sd15_loader(setup), below=[sd15_delta(setup)], middle=middle, model_to=("delta",),
        links=links, sampled=("sample", "output"), decode_at=(1180, 190),
    )


def sd15_img2img(setup: Setup):
    side = setup.sizes["sd15"]
    note = (
        "### PeRFlow SD1.5: img2img\n"
        "`example.png` (ComfyUI ships it in `ComfyUI/input`; upload your own with the Load Image node) is scaled to "
        f"{side}x{side}, encoded, re-noised to `denoise` and sampled back by **PeRFlow KSampler**: 8 steps at denoise "
        "0.5 build a 16-step grid and run its last 8, starting on a window boundary.\n\n"
        "Files:\n" + SD15_FILES_NOTE
    )
    scale = {"upscale_method": "lanczos", "width": side, "height": side, "crop": "center"}
    return ksampler_workflow(
        "perflow_img2img", note, sd15_loader(setup),
        below=[sd15_delta(setup), ("image", "LoadImage", [380, 680], {"image": cs.INPUT_IMAGE_NAME}), ("scale", "ImageScale", BELOW[1], scale)],
        below_links=[("delta", "MODEL", "ksampler", "model"), ("image", "IMAGE", "scale", "image"), ("scale", "IMAGE", "encode", "pixels")],
        latent=("encode", "VAEEncode", [380, 520], {}), steps=8, cfg=7.5, denoise=0.5,
        model_to=("delta",), vae_to=("encode", "decode"),
    )


def sd15_settings(setup: Setup):
    note = (
        "### PeRFlow SD1.5: PeRFlow KSampler + PeRFlow Settings\n"
        "**PeRFlow Settings** sets the windows K, optional boundaries (e.g. `999, 700, 400, 150, 0`), the per-segment "
        "correction theta (rows separated by `;`) and the parameterisation (auto: SD1.x `diff_eps`, SDXL `ddim_eps`, "
        "SD2.x-v and flow models `velocity`). Use at least one step per window. 512x512, 8 steps, CFG 7.5.\n\n"
        "Files:\n" + SD15_FILES_NOTE
    )
    settings = ("settings", "PerflowSettings", BELOW[1], {"parameterisation": "auto", "segments": 4, "boundaries": "", "theta": ""})
    return ksampler_workflow(
        "perflow_ksampler_settings", note, sd15_loader(setup),
        below=[sd15_delta(setup), settings],
        below_links=[("delta", "MODEL", "ksampler", "model"), ("settings", "perflow", "ksampler", "perflow")],
        latent=empty_latent(setup.sizes["sd15"]), steps=8, cfg=7.5, model_to=("delta",),
    )


def folder_note(title: str, release, steps: int, cfg: float, parameterisation: str) -> str:
    side = release.size
    return (
        f"### {title}\n"
        f"**Load PeRFlow Diffusers Model** loads the released diffusers-format folder `{release.folder}` "
        f"([{release.repo}]({release.page})) with its PeRFlow settings ({parameterisation}, K = 4 windows) and "
        f"**PeRFlow KSampler** samples it: {side}x{side}, {steps} steps, CFG {cfg}.\n\n"
        f"The release is a folder, not one file, so ComfyUI cannot offer it for download: put it in "
        f"`ComfyUI/models/diffusers/{release.folder}` (it holds `model_index.json`), e.g.\n\n"
        f"`hf download {release.repo} --local-dir ComfyUI/models/diffusers/{release.folder}`\n\n"
        "then press R to refresh the list."
    )


def sd21_txt2img(setup: Setup):
    note = folder_note("PeRFlow SD2.1 (768-v): txt2img", SD21, 8, 7.5, "`velocity`")
    return ksampler_workflow(
        "perflow_sd21_txt2img", note, diffusers_loader(SD21), latent=empty_latent(setup.sizes["sd21"]),
        steps=8, cfg=7.5, model_to=("ksampler",), perflow_to=("ksampler",),
    )


def sdxl_txt2img(setup: Setup):
    note = folder_note("PeRFlow SDXL: txt2img", SDXL, 6, 2.0, "`ddim_eps`") + f"\n\n`{SDXL_BASE.repo}` (on SDXL base) loads the same way."
    return ksampler_workflow(
        "perflow_sdxl_txt2img", note, diffusers_loader(SDXL), latent=empty_latent(setup.sizes["sdxl"]),
        steps=6, cfg=2.0, model_to=("ksampler",), perflow_to=("ksampler",),
    )


# name -> (spec builder, whether the tests have a tiny twin of it)
WORKFLOWS = {
    "perflow_sd15_delta": (sd15_delta_txt2img, True),
    "perflow_txt2img": (sd15_custom_sampling, True),
    "perflow_img2img": (sd15_img2img, True),
    "perflow_ksampler_settings": (sd15_settings, True),
    "perflow_sd21_txt2img": (sd21_txt2img, False),
    "perflow_sdxl_txt2img": (sdxl_txt2img, False),
}


def spec(name: str, setup: Setup) -> dict:
    built_name, built = WORKFLOWS[name][0](setup)
    assert built_name == name, (built_name, name)
    return built


BUILD_JS = """async (spec) => {
  app.graph.clear();
  const byKey = {};
  for (const [key, type, pos, widgets, title, models] of spec.nodes) {
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
    if (models && models.length) node.properties.models = models;
    byKey[key] = node;
  }
  byKey['note'].widgets[0].value = spec.note;
  for (const [from, output, to, input] of spec.links) {
    const a = byKey[from], b = byKey[to];
    const o = a.findOutputSlot(output), i = b.findInputSlot(input);
    if (o < 0 || i < 0) throw new Error(`no slot ${from}.${output} (${o}) -> ${to}.${input} (${i})`);
    if (!a.connect(o, b, i)) throw new Error(`connect failed ${from}.${output} -> ${to}.${input}`);
  }
  for (const node of app.graph._nodes) {
    node.size = [Math.max(node.size[0], /Loader|Delta|ImageScale/.test(node.type) ? 330 : 240), node.size[1]];
    if (node.type === 'MarkdownNote') node.size = [330, 440];
    if (node.type === 'SaveImage') node.size = [300, 300];
    if (node.type === 'LoadImage') node.size = [300, 320];
    if (node.type === 'CLIPTextEncode') node.size = [430, 200];
  }
  await new Promise(r => setTimeout(r, 300));  // nodes that draw more (the PeRFlow Settings editor) grow first
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


def build_graph(page, name: str, setup: Setup) -> dict:
    """The graph of ``name`` for ``setup``, built in the page; returns app.graph.serialize() with a stable id."""
    built = spec(name, setup)
    nodes = [list(node) + [None] * (6 - len(node)) for node in built["nodes"]]
    note = built["note"] + ("" if setup.download_data else TWIN_NOTE)
    page.evaluate(BUILD_JS, {"nodes": nodes, "links": built["links"], "note": note})
    ui = page.evaluate("() => JSON.parse(JSON.stringify(app.graph.serialize()))")
    folder = "example_workflows" if setup is REAL else "tests"
    ui["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-perflow/{folder}/{name}"))
    return ui


def save_thumbnail(page, path: Path) -> None:
    from PIL import Image

    png = page.locator("#graph-canvas").screenshot()
    thumbnail = Image.open(io.BytesIO(png)).convert("RGB")
    thumbnail.thumbnail((640, 400))
    thumbnail.save(path, quality=85)


def build_example(page, name: str) -> None:
    """example_workflows/<name>.json and its thumbnail (the graph as the template browser opens it)."""
    ui = build_graph(page, name, REAL)
    (cs.EXAMPLE_WORKFLOWS / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
    cs.close_dialogs(page)
    save_thumbnail(page, cs.EXAMPLE_WORKFLOWS / f"{name}.jpg")
    print("built example", name, len(ui["nodes"]), "nodes")


def build_twin(page, name: str) -> None:
    """The tiny twin in UI and API format; reloaded from what was written and run in the page."""
    ui = build_graph(page, name, TINY)
    api = page.evaluate("async () => JSON.parse(JSON.stringify((await app.graphToPrompt()).output))")
    (cs.TINY_WORKFLOWS / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
    (cs.API_WORKFLOWS / f"{name}_api.json").write_text(json.dumps(api, indent=2) + "\n")
    cs.load_workflow(page, ui, name)
    cs.queue_and_wait_for_image(page)
    print("built twin", name, len(ui["nodes"]), "nodes;", len(api), "API nodes; it ran")


def build_all(url: str, names: list[str]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = cs.launch_chromium(playwright)
        try:
            page = cs.open_app(browser, url)
            for name in names:
                build_example(page, name)
                if WORKFLOWS[name][1]:
                    build_twin(page, name)
        finally:
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running ComfyUI with this pack and the tiny test models (default: start one)")
    parser.add_argument("names", nargs="*", default=list(WORKFLOWS))
    args = parser.parse_args()
    for folder in (cs.EXAMPLE_WORKFLOWS, cs.TINY_WORKFLOWS, cs.API_WORKFLOWS):
        folder.mkdir(exist_ok=True)
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
