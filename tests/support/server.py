"""A headless ComfyUI server with this pack installed, shared by the ComfyUI end-to-end tests.

Not a test module: tests/comfyui/test_comfyui_server.py and test_comfyui_browser.py import `comfy_server` from here,
tools/build_example_workflows.py and tools/make_node_screenshots.py the server itself.
Both get the same server (one per pytest session): `acquire_server()` starts it on first use and
`release_server()` stops it when the last user is done.

Layout of the server's base directory (a fresh temporary folder):
    custom_nodes/comfyui-perflow -> this repository (symlink)
    custom_nodes/unet_timestep_probe -> tests/support/unet_timestep_probe (records the UNet's timesteps; test only)
    models/checkpoints/perflow_tiny_sd15.safetensors   tiny SD1.5-architecture checkpoint with perflow.* keys
    models/perflow_deltas/perflow_tiny_delta.safetensors   small random delta, diffusers UNet key names
    models/perflow_theta/perflow_tiny_theta.safetensors   standalone theta file (an option for Load PeRFlow Theta)
    models/diffusers/perflow-sd15-dreamshaper/model_index.json   a name in Load PeRFlow Diffusers Model's list (no weights)
    input/example.png   64x64 stand-in for the image every ComfyUI ships in input/ (the img2img workflows use it)
    user/default/comfy.settings.json   skips the frontend's first-visit template dialog
The server log is copied to test-artifacts/comfyui_server.log (git-ignored) when the server stops.

Frontends: the server serves the frontend ComfyUI pins (its venv's comfyui-frontend-package) unless started with
`front_end_root`; `newest_frontend_root()` finds the newest frontend that tools/run_tests.py installs beside it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

import pytest

from .models import EXAMPLE_MODELS, SD15_BASE, SD15_DELTA, ModelFile

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "test-artifacts"
EXAMPLE_WORKFLOWS = REPO_ROOT / "example_workflows"
TINY_WORKFLOWS = REPO_ROOT / "tests" / "comfyui" / "workflows"
API_WORKFLOWS = REPO_ROOT / "tests" / "comfyui" / "workflows_api"
PACK_NAME = "comfyui-perflow"
PROBE = Path(__file__).resolve().parent / "unet_timestep_probe"
# The newest comfyui-frontend-package the tests run; tools/run_tests.py installs it into .venv-comfy/frontend-<version>.
NEWEST_FRONTEND_VERSION = "1.58.1"

CHECKPOINT_NAME = "perflow_tiny_sd15.safetensors"
DELTA_NAME = "perflow_tiny_delta.safetensors"
THETA_NAME = "perflow_tiny_theta.safetensors"
THETA_FOLDER = "models/perflow_theta"
INPUT_IMAGE_NAME = "example.png"
DIFFUSERS_LISTED_NAME = "perflow-sd15-dreamshaper"

# The example workflows for users (example_workflows/<name>.json: the real release files, which no test server has).
EXAMPLE_NAMES = list(EXAMPLE_MODELS)
# Their tiny twins, which the tests run: the same graphs on the tiny models at 64x64, UI format in
# tests/comfyui/workflows/<name>.json, API format in tests/comfyui/workflows_api/<name>_api.json.
WORKFLOW_NAMES = ["perflow_sd15_delta", "perflow_txt2img", "perflow_img2img", "perflow_ksampler_settings"]
# Where the examples' download data points; the browser never reaches it in the tests (requests are aborted).
HUGGING_FACE_ROUTE = "https://huggingface.co/**"
PERFLOW_NODE_IDS = [
    "PerflowSettings",
    "PerflowScheduler",
    "PerflowSampler",
    "PerflowKSampler",
    "PerflowCheckpointLoader",
    "PerflowApplyDelta",
    "PerflowDiffusersLoader",
    "PerflowCalibrate",
    "PerflowSaveTheta",
    "PerflowLoadTheta",
    "PerflowSaveCheckpoint",
]
# What the frontend's node search shows for them (same order).
PERFLOW_DISPLAY_NAMES = [
    "PeRFlow Settings",
    "PeRFlow Scheduler",
    "PeRFlow Sampler",
    "PeRFlow KSampler",
    "Load PeRFlow Checkpoint",
    "Apply PeRFlow Delta Weights",
    "Load PeRFlow Diffusers Model",
    "PeRFlow Calibrate Theta",
    "Save PeRFlow Theta",
    "Load PeRFlow Theta",
    "Save PeRFlow Checkpoint",
]

SERVER_START_TIMEOUT_S = 180
PROMPT_TIMEOUT_S = float(os.environ.get("PERFLOW_COMFY_PROMPT_TIMEOUT", "600"))

try:  # tests/support/comfyui.py: where ComfyUI is and the tiny checkpoint builder
    from .comfyui import COMFYUI_PATH, build_tiny_sd15_checkpoint, pack_core, requires_comfyui
except ImportError as _error:  # pragma: no cover - the support module is missing or broken
    _SUPPORT_ERROR: Optional[str] = f"tests/support/comfyui.py could not be imported: {_error}"
    COMFYUI_PATH = os.environ.get("COMFYUI_PATH") or None
    build_tiny_sd15_checkpoint = pack_core = None  # type: ignore[assignment]
    requires_comfyui = pytest.mark.skipif(True, reason=_SUPPORT_ERROR)
else:
    _SUPPORT_ERROR = None


def comfyui_root() -> Path:
    return Path(str(COMFYUI_PATH))


def example_workflow(name: str) -> dict:
    """An example for users, UI format."""
    return json.loads((EXAMPLE_WORKFLOWS / f"{name}.json").read_text())


def tiny_workflow(name: str) -> dict:
    """The tests' tiny twin of an example, UI format."""
    return json.loads((TINY_WORKFLOWS / f"{name}.json").read_text())


def api_workflow(name: str) -> dict:
    return json.loads((API_WORKFLOWS / f"{name}_api.json").read_text())


def nodes_of_type(prompt: dict, class_type: str) -> list[str]:
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]


def _python() -> str:
    """The interpreter that runs ComfyUI (its venv): COMFYUI_PYTHON, else the one running the tests."""
    return os.environ.get("COMFYUI_PYTHON", sys.executable)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ComfyServer:
    """One ComfyUI server process and small HTTP helpers around its API."""

    def __init__(self, base: Path, port: int, log_path: Path, process: subprocess.Popen, log_file):
        self.base = base
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.process = process
        self._log_file = log_file

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    # HTTP ---------------------------------------------------------------------------------------------
    def request(self, path: str, data: Optional[dict] = None, timeout: float = 30) -> tuple[int, Any]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw.decode(errors="replace")

    def unet_timesteps(self) -> list[float]:
        """The timestep of each UNet call since the last clear, as the network received it (the probe pack)."""
        return self.get_json("/perflow_probe/unet_timesteps")["timesteps"]

    def clear_unet_timesteps(self) -> None:
        status, payload = self.request("/perflow_probe/unet_timesteps/clear", {})
        assert status == 200, f"clearing the recorded UNet timesteps: HTTP {status}: {payload}"

    def get_json(self, path: str, timeout: float = 30) -> Any:
        status, payload = self.request(path, timeout=timeout)
        assert status == 200, f"GET {path}: HTTP {status}: {payload}"
        return payload

    def alive(self) -> bool:
        if self.process.poll() is not None:
            return False
        try:
            return self.request("/system_stats", timeout=5)[0] == 200
        except OSError:
            return False

    def queue(self, prompt: dict) -> str:
        status, payload = self.request("/prompt", {"prompt": prompt, "client_id": "perflow-tests"})
        assert status == 200, f"POST /prompt was refused (HTTP {status}): {json.dumps(payload, indent=1)[:4000]}"
        return payload["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = PROMPT_TIMEOUT_S) -> dict:
        """Poll /history/<id> until the prompt finished (success or error); returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"ComfyUI exited (code {self.process.returncode}) while running {prompt_id}; log: {self.log_path}\n{self.log_tail()}")
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str") in ("success", "error"):
                return entry
            time.sleep(0.25)
        self.request("/interrupt", {})
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; log tail:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = PROMPT_TIMEOUT_S) -> dict:
        return self.wait(self.queue(prompt), timeout)

    # log ----------------------------------------------------------------------------------------------
    def log_text(self) -> str:
        self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # lifecycle ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=10)
        self._log_file.close()
        ARTIFACTS.mkdir(exist_ok=True)
        try:
            shutil.copyfile(self.log_path, ARTIFACTS / self.log_path.name)
        except OSError:
            pass


# fixtures of the base directory -----------------------------------------------------------------------------
def _write_input_image(path: Path) -> None:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 4, y * 4, ((x - 32) ** 2 + (y - 32) ** 2 < 400) * 200 + 40], axis=-1)
    Image.fromarray(rgb.clip(0, 255).astype("uint8")).save(path)


DELTA_SCRIPT = textwrap.dedent(
    """
    import sys
    comfy_path, tests, checkpoint, out = sys.argv[1:5]
    sys.path[:0] = [comfy_path, tests]
    from comfy.cli_args import args
    args.cpu = True
    from support.comfyui import write_tiny_delta
    write_tiny_delta(checkpoint, out)
    """
)


def write_delta(checkpoint: Path, out: Path) -> None:
    """support.comfyui.write_tiny_delta in ComfyUI's Python, for a test process that has not imported ComfyUI."""
    result = subprocess.run(
        [_python(), "-c", DELTA_SCRIPT, str(comfyui_root()), str(REPO_ROOT / "tests"), str(checkpoint), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"building the tiny delta failed:\n{result.stdout}\n{result.stderr[-3000:]}"


def prepare_base_directory(base: Path) -> None:
    PerflowSettings, save_theta_file = pack_core().PerflowSettings, pack_core("checkpoint").save_theta_file
    for folder in ("custom_nodes", "models/checkpoints", "models/perflow_deltas", THETA_FOLDER, "input", "output", "user/default"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    (base / "custom_nodes" / PROBE.name).symlink_to(PROBE, target_is_directory=True)
    # Skip the "Get started with a template" dialog of the first visit; no minimap over the screenshots.
    (base / "user/default/comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}))
    checkpoint = base / "models/checkpoints" / CHECKPOINT_NAME
    settings = PerflowSettings(segments=4, prediction_type="diff_eps", theta=[[0.05, 0.0, 0.0]] + [[0.0, 0.0, 0.0]] * 3)
    build_tiny_sd15_checkpoint(checkpoint, perflow=settings, seed=0)
    assert checkpoint.is_file(), f"build_tiny_sd15_checkpoint did not write {checkpoint}"
    write_delta(checkpoint, base / "models/perflow_deltas" / DELTA_NAME)
    _write_input_image(base / "input" / INPUT_IMAGE_NAME)
    listed = base / "models/diffusers" / DIFFUSERS_LISTED_NAME
    listed.mkdir(parents=True)
    (listed / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    theta = PerflowSettings(segments=4, prediction_type="diff_eps", theta=[[0.02, 0.0, 0.01], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.01, 0.0, 0.0]])
    save_theta_file(base / THETA_FOLDER / THETA_NAME, theta)


@contextlib.contextmanager
def release_files_in_place(server: ComfyServer, files: tuple[ModelFile, ...]):
    """The tiny models hard-linked into the server's model folders under the names of the release ``files``, where a
    user who followed the README has the real ones; removed again afterwards."""
    stand_ins = {SD15_BASE: ("checkpoints", CHECKPOINT_NAME), SD15_DELTA: ("perflow_deltas", DELTA_NAME)}
    links = []
    try:
        for file in files:
            folder, tiny = stand_ins[file]
            link = server.base / "models" / file.directory / file.name
            os.link(server.base / "models" / folder / tiny, link)
            links.append(link)
        yield
    finally:
        for link in links:
            link.unlink()


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def newest_frontend_root() -> Optional[Path]:
    """The static folder of the newest frontend (PERFLOW_NEWEST_FRONTEND_ROOT, else the one run_tests.py installs
    beside ComfyUI's venv); None when it is not there."""
    configured = os.environ.get("PERFLOW_NEWEST_FRONTEND_ROOT")
    venv = Path(_python()).parent.parent
    root = Path(configured) if configured else venv / f"frontend-{NEWEST_FRONTEND_VERSION}" / "comfyui_frontend_package" / "static"
    return root if (root / "index.html").is_file() else None


def separate_user_directory(base: Path, name: str) -> Path:
    """A user directory of its own (settings such as the node mode a test switches), seeded with the base's settings."""
    user = base / name
    shutil.copytree(base / "user", user, dirs_exist_ok=True)
    return user


def start_server(
    base: Path,
    extra_environment: Optional[dict] = None,
    front_end_root: Optional[Path] = None,
    user_directory: Optional[Path] = None,
    log_name: str = "comfyui_server.log",
) -> ComfyServer:
    """ComfyUI on `base` (a prepared base directory) on a free port; with `front_end_root`, serving that frontend."""
    port = _free_port()
    log_path = base / log_name
    log_file = open(log_path, "w")
    command = [
        _python(),
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-auto-launch",
        "--base-directory",
        str(base),
        "--database-url",
        "sqlite:///:memory:",
    ]
    if front_end_root is not None:
        command += ["--front-end-root", str(front_end_root)]
    if user_directory is not None:
        command += ["--user-directory", str(user_directory)]
    environment = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **(extra_environment or {}))
    process = subprocess.Popen(
        command, cwd=comfyui_root(), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=environment, start_new_session=True
    )
    server = ComfyServer(base, port, log_path, process, log_file)
    atexit.register(_kill_group, process)  # last resort if the session dies before the fixture's finalizer
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            server.stop()
            raise RuntimeError(f"ComfyUI exited with code {process.returncode} during start-up:\n{server.log_tail()}")
        if server.alive():
            return server
        time.sleep(0.5)
    tail = server.log_tail()
    server.stop()
    raise RuntimeError(f"ComfyUI did not answer within {SERVER_START_TIMEOUT_S} s:\n{tail}")


# one server per session, shared by the modules that use the fixture ---------------------------------------
_lock = threading.Lock()
_state: dict = {"server": None, "users": 0, "base": None, "error": None}


def acquire_server() -> ComfyServer:
    with _lock:
        if _state["error"] is not None:
            pytest.fail(f"the ComfyUI test server could not be started earlier in this session: {_state['error']}")
        if _state["server"] is None:
            base = Path(tempfile.mkdtemp(prefix="perflow_comfy_"))
            _state["base"] = base
            try:
                prepare_base_directory(base)
                _state["server"] = start_server(base)
            except Exception as error:
                _state["error"] = f"{type(error).__name__}: {error}"
                shutil.rmtree(base, ignore_errors=True)
                raise
        _state["users"] += 1
        return _state["server"]


def release_server() -> None:
    with _lock:
        _state["users"] -= 1
        if _state["users"] > 0 or _state["server"] is None:
            return
        server, base = _state["server"], _state["base"]
        _state["server"] = _state["base"] = None
    server.stop()
    if base is not None and not os.environ.get("PERFLOW_KEEP_COMFY_BASE"):
        shutil.rmtree(base, ignore_errors=True)


# browser (Playwright, sync API) ------------------------------------------------------------------------------
CHROMIUM = os.environ.get("PERFLOW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
APP_READY_JS = "() => !!(window.app && window.app.graph && window.LiteGraph && LiteGraph.registered_node_types['PerflowKSampler'])"
# Records the frontend's own list of missing node types of every graph it loads (afterConfigureGraph hook).
MISSING_HOOK_JS = """() => {
  if (window.__perflowHook) return;
  window.__perflowHook = true;
  window.__perflowMissing = null;
  app.registerExtension({name: 'perflow.tests.missing-nodes', afterConfigureGraph(missing) {
    window.__perflowMissing = (missing || []).map(m => typeof m === 'string' ? m : (m.type || m.class_type || JSON.stringify(m)));
  }});
}"""


# The missing-models dialog of frontend 1.27.10 (MissingModelsWarning): a list `.comfy-missing-models` with one row
# per missing file, labelled "<directory> / <name>", an error message where it cannot download the file, and a
# Download and a Copy URL button otherwise.
MISSING_MODELS_JS = """() => {
  const list = document.querySelector('.comfy-missing-models');
  if (!list) return {open: false, rows: [], errors: [], downloads: 0};
  return {
    open: true,
    rows: Array.from(list.querySelectorAll('li')).map(row => (row.querySelector('span[title]')?.innerText || '').trim()),
    errors: Array.from(list.querySelectorAll('.p-message')).map(message => message.innerText.trim()),
    downloads: Array.from(list.querySelectorAll('button')).filter(b => /download/i.test(b.innerText) && !b.disabled).length,
  };
}"""


def probe_recorder(page) -> list[str]:
    """Aborts every request of the page to Hugging Face (the missing-models dialog asks each file's size) and
    returns the list their URLs are appended to."""
    urls: list[str] = []

    def abort(route) -> None:
        urls.append(route.request.url)
        route.abort()

    page.route(HUGGING_FACE_ROUTE, abort)
    return urls


def expected_console_error(line: str) -> bool:
    """A console error (a line of page.perflow_log) of the missing-models dialog's aborted size probes."""
    return "@ https://huggingface.co/" in line or line.startswith("error: Error fetching file size")


def browser_unavailable_reason() -> Optional[str]:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright python package is not installed (pip install playwright; the browser tests use a system Chromium)"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (set PERFLOW_CHROMIUM)"
    return None


requires_browser = pytest.mark.skipif(browser_unavailable_reason() is not None, reason=str(browser_unavailable_reason()))


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium for one test module (Playwright, sync API)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        try:
            yield chromium
        finally:
            chromium.close()


def open_app(browser, url: str, viewport=(1600, 900)):
    """A new page with the ComfyUI frontend loaded and this pack's nodes registered; console errors are in page.perflow_log."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    log: list[str] = []
    page.on("console", lambda message: log.append(f"{message.type}: {message.text} @ {message.location.get('url', '')}"))
    page.on("pageerror", lambda error: log.append(f"pageerror: {error}"))
    page.perflow_log = log
    # Errors and warnings raised by this pack's own scripts (served under /extensions/<pack>/).
    pack_errors: list[str] = []
    page.on(
        "console",
        lambda message: message.type in ("error", "warning")
        and f"/extensions/{PACK_NAME}/" in (message.location or {}).get("url", "")
        and pack_errors.append(f"{message.type}: {message.text}"),
    )
    page.on("pageerror", lambda error: f"/extensions/{PACK_NAME}/" in (error.stack or "") and pack_errors.append(f"pageerror: {error}\n{error.stack}"))
    page.perflow_pack_errors = pack_errors
    page.goto(url, wait_until="domcontentloaded", timeout=60_000)
    page.wait_for_function(APP_READY_JS, timeout=90_000)
    page.evaluate(MISSING_HOOK_JS)
    close_dialogs(page)
    return page


def close_dialogs(page) -> None:
    for _ in range(3):
        if not page.locator(".p-dialog").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)


def load_workflow(page, ui_workflow: dict, name: Optional[str] = None) -> dict:
    """app.loadGraphData(workflow) (in a tab named `name`, as the template browser does); returns what the frontend reports: missing node types, unregistered types, dialogs."""
    page.evaluate("() => { window.__perflowMissing = null; }")
    page.evaluate("async ([graph, name]) => { await app.loadGraphData(graph, true, true, name); }", [ui_workflow, name])
    page.wait_for_function("() => window.__perflowMissing !== null", timeout=30_000)
    page.wait_for_timeout(500)
    return page.evaluate(
        """() => ({
      missing: window.__perflowMissing,
      unregistered: app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
      types: app.graph._nodes.map(n => n.type),
      dialogs: Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 300)),
    })"""
    )


def queue_and_wait_for_image(page, timeout_s: float = PROMPT_TIMEOUT_S, click_run_button: bool = False) -> dict:
    """Queue the loaded graph (the Run button, or app.queuePrompt(0) as the button does) and wait until every
    SaveImage / PreviewImage node got its `executed` message with images and shows them loaded.
    Returns {node id: [image file names]}."""
    page.evaluate(
        """() => {
      window.__perflowError = null;
      window.__perflowExecuted = {};
      if (!window.__perflowEventHooks) {
        window.__perflowEventHooks = true;
        app.api.addEventListener('execution_error', e => { window.__perflowError = e.detail; });
        app.api.addEventListener('executed', e => { window.__perflowExecuted[String(e.detail.display_node || e.detail.node)] = e.detail.output; });
      }
    }"""
    )
    if click_run_button:
        page.get_by_role("button", name="Run", exact=True).first.click()
    else:
        page.evaluate("async () => { await app.queuePrompt(0); }")
    page.wait_for_function(
        """() => {
      if (window.__perflowError) return true;
      const savers = app.graph._nodes.filter(n => n.type === 'SaveImage' || n.type === 'PreviewImage');
      return savers.length > 0 && savers.every(n => {
        const out = window.__perflowExecuted[String(n.id)];
        return out && out.images && out.images.length && n.imgs && n.imgs.length
          && n.imgs.every(i => i.complete && i.naturalWidth > 0);
      });
    }""",
        timeout=timeout_s * 1000,
        polling=250,
    )
    error = page.evaluate("() => window.__perflowError")
    assert not error, f"execution_error in the browser: {error.get('exception_message') if isinstance(error, dict) else error}"
    return page.evaluate(
        """() => Object.fromEntries(app.graph._nodes.filter(n => n.type === 'SaveImage' || n.type === 'PreviewImage')
        .map(n => [String(n.id), window.__perflowExecuted[String(n.id)].images.map(i => i.filename)]))"""
    )


@pytest.fixture(scope="session")
def comfy_server():
    """The running ComfyUI server (see the module docstring). Skips when COMFYUI_PATH is not set."""
    if _SUPPORT_ERROR is not None:
        pytest.skip(_SUPPORT_ERROR)
    if not COMFYUI_PATH:
        pytest.skip("COMFYUI_PATH is not set (it points at a ComfyUI checkout to run the end-to-end tests)")
    server = acquire_server()
    try:
        yield server
    finally:
        release_server()
