"""Loading the node pack in ComfyUI imports no research module (``perflow_core.lab``) and no diffusers.

A fresh interpreter (ComfyUI's, the one running these tests) imports ComfyUI as main.py does (its folder first
on sys.path, ``args.cpu``, its own ``--base-directory``), then loads ``custom_nodes/comfyui-perflow`` (a link to this repository) with
ComfyUI's own ``nodes.load_custom_node`` and reports what it registered and which modules were imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from support.comfyui import COMFYUI_PATH, PACK_NAME as TEST_PACK_NAME, REPO_ROOT, pack_core, requires_comfyui
from support.server import PACK_NAME, PERFLOW_NODE_IDS

pytestmark = requires_comfyui

LOAD_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    comfy_path, pack_folder, base_directory = sys.argv[1:4]
    sys.path.insert(0, comfy_path)
    from comfy.cli_args import args
    args.cpu = True
    args.base_directory = base_directory
    import nodes
    loaded = asyncio.run(nodes.load_custom_node(pack_folder))
    print(json.dumps({
        "loaded": loaded,
        "modules": sorted(sys.modules),
        "python_module": {name: getattr(cls, "RELATIVE_PYTHON_MODULE", None) for name, cls in nodes.NODE_CLASS_MAPPINGS.items()},
    }))
    """
)


def test_loading_the_pack_imports_no_research_code_and_no_diffusers(tmp_path):
    (tmp_path / "custom_nodes").mkdir()
    pack_folder = tmp_path / "custom_nodes" / PACK_NAME
    pack_folder.symlink_to(REPO_ROOT, target_is_directory=True)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, os.path.abspath(COMFYUI_PATH), str(pack_folder), str(tmp_path)],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"loading the pack failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Cannot import" not in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] is True, result.stderr[-3000:]
    registered = {name: module for name, module in report["python_module"].items() if name in PERFLOW_NODE_IDS}
    assert registered == {name: f"custom_nodes.{PACK_NAME}" for name in PERFLOW_NODE_IDS}
    modules = report["modules"]
    pack_modules = [name for name in modules if name.endswith(f"custom_nodes/{PACK_NAME}") or f"custom_nodes/{PACK_NAME}." in name]
    assert any(name.endswith(".perflow_core") for name in pack_modules), pack_modules  # the pack's own runtime
    assert not [name for name in modules if name == "diffusers" or name.startswith("diffusers.")]
    assert not [name for name in modules if ".perflow_core.lab" in name or name.startswith("perflow_core")]


def test_this_session_uses_the_packs_own_core():
    """The tests take core objects from the pack (``pack_core()``), never from a top-level ``perflow_core``."""
    core = pack_core()
    assert core.__name__ == f"{TEST_PACK_NAME}.perflow_core"
    assert os.path.dirname(core.__file__) == str(REPO_ROOT / "perflow_core")
    assert not [name for name in sys.modules if name == "perflow_core" or name.startswith("perflow_core.")]
