"""The test command: every stage, then one line `N passed, N failed, N skipped` (exit 1 if any stage failed).

    python -m pip install "torch==2.13.0" -e ".[test]" && python tools/run_tests.py

1. core: pytest on tests/core tests/diffusers_api tests/lab with this interpreter (lab tests marked `comfyui` wait
   for stage 2).
2. comfyui: when COMFYUI_PATH is set, or ../shared/comfyui exists beside the repository (then COMFYUI_PATH is
   set to it), pytest on tests/comfyui in ComfyUI's own venv, .venv-comfy/ (git-ignored). The first run makes
   it: ComfyUI's requirements less their torch lines, torch==2.14.1 torchvision==0.29.1 (a CPU pair whose
   torchvision works; ComfyUI imports it), the pack's requirements and the test tools, and the newest frontend
   (comfyui-frontend-package 1.58.1, into .venv-comfy/frontend-1.58.1/, served by a second test server with
   --front-end-root). Later runs reuse it while those requirements are the same. The browser tests need a
   Chromium at /usr/bin/chromium. Then the lab tests marked `comfyui` (the benchmark's ComfyUI samplers) run
   there too, with the repository on sys.path.
Under CI (CI=true) a skipped ComfyUI test, or a ComfyUI stage that cannot run, is a failure.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_VENV = ROOT / ".venv-comfy"
COMFY_EXTRAS = ["torch==2.14.1", "torchvision==0.29.1", "pytest", "playwright", "requests", "diffusers", "transformers"]
# The newest frontend the browser tests also run (tests/support/server.py NEWEST_FRONTEND_VERSION finds it here).
NEWEST_FRONTEND_VERSION = "1.58.1"
NEWEST_FRONTEND = f"comfyui-frontend-package=={NEWEST_FRONTEND_VERSION}"
NEWEST_FRONTEND_FOLDER = COMFY_VENV / f"frontend-{NEWEST_FRONTEND_VERSION}"
CI = os.environ.get("CI", "").lower() == "true"
REPORTS = Path(tempfile.mkdtemp(prefix="perflow-test-reports-"))


def stage(name: str, seconds: float = 0.0, problem: str | None = None) -> dict:
    return {"name": name, "seconds": seconds, "passed": 0, "failed": 0, "skipped": [], "problem": problem}


def run_pytest(name: str, command: list[str], env: dict | None = None) -> dict:
    """One pytest run, its output shown as it comes; the counts are read from its JUnit report."""
    report = REPORTS / f"{name}.xml"
    started = time.monotonic()
    code = subprocess.call([*command, f"--junitxml={report}"], cwd=ROOT, env=env)
    result = stage(name, time.monotonic() - started)
    if not report.is_file():
        result["problem"] = f"pytest exited {code} and wrote no report"
        return result
    for case in ElementTree.parse(report).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            result["failed"] += 1
        elif (skipped := case.find("skipped")) is not None:
            result["skipped"].append(f"{case.get('classname')}::{case.get('name')}: {skipped.get('message')}")
        else:
            result["passed"] += 1
    if code == 5:
        result["problem"] = "no tests ran (pytest exit 5)"
    elif code != 0 and not result["failed"]:
        result["problem"] = f"pytest exited {code}"
    return result


def make_comfy_venv(comfyui: Path) -> None:
    """.venv-comfy/ as the module docstring says; kept when it was completed for the same requirements."""
    comfy_requirements = [
        line
        for line in (comfyui / "requirements.txt").read_text().splitlines()
        if re.split(r"[<>=!~;\[ ]", line.strip())[0] not in ("torch", "torchvision", "torchaudio")
    ]
    wanted = "\n".join([sys.version, *comfy_requirements, (ROOT / "requirements.txt").read_text(), *COMFY_EXTRAS, NEWEST_FRONTEND])
    stamp = COMFY_VENV / "complete.sha256"
    digest = hashlib.sha256(wanted.encode()).hexdigest()
    if (COMFY_VENV / "bin" / "python").is_file() and stamp.is_file() and stamp.read_text() == digest:
        print(f"[run_tests] reusing {COMFY_VENV.name}/", flush=True)
        return
    print(f"[run_tests] installing ComfyUI's requirements into {COMFY_VENV.name}/", flush=True)
    subprocess.check_call([sys.executable, "-m", "venv", "--clear", str(COMFY_VENV)])
    (COMFY_VENV / "comfyui-requirements.txt").write_text("\n".join(comfy_requirements) + "\n")
    pip = [str(COMFY_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.check_call([*pip, "-r", str(COMFY_VENV / "comfyui-requirements.txt"), "-r", str(ROOT / "requirements.txt"), *COMFY_EXTRAS])
    subprocess.check_call([*pip, "--no-deps", "--target", str(NEWEST_FRONTEND_FOLDER), NEWEST_FRONTEND])
    stamp.write_text(digest)


def comfyui_stage() -> dict:
    if not os.environ.get("COMFYUI_PATH") and (ROOT.parent / "shared" / "comfyui").is_dir():
        os.environ["COMFYUI_PATH"] = str(ROOT.parent / "shared" / "comfyui")
    if not os.environ.get("COMFYUI_PATH"):
        return stage("comfyui", problem="not run: COMFYUI_PATH is not set and there is no ../shared/comfyui")
    started = time.monotonic()
    try:
        make_comfy_venv(Path(os.environ["COMFYUI_PATH"]))
    except subprocess.CalledProcessError as error:
        return stage("comfyui", time.monotonic() - started, f"making {COMFY_VENV.name}/ failed: {error}")
    install_seconds = time.monotonic() - started
    print(f"[run_tests] {COMFY_VENV.name}/ ready after {install_seconds:.0f} s; COMFYUI_PATH={os.environ['COMFYUI_PATH']}", flush=True)
    # The pytest script rather than `python -m pytest`: the repository root stays off sys.path, so the tests reach
    # the code only as ComfyUI does, through the pack (tests/support/comfyui.py).
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    result = run_pytest("comfyui", [str(COMFY_VENV / "bin" / "pytest"), "tests/comfyui", "-rs"], env)
    lab = run_pytest("comfyui-lab", [str(COMFY_VENV / "bin" / "pytest"), "tests/lab", "-m", "comfyui", "-rs"], dict(env, PYTHONPATH=str(ROOT)))
    for key in ("passed", "failed", "skipped"):
        result[key] += lab[key]
    result["problem"] = result["problem"] or lab["problem"]
    result["seconds"] += install_seconds + lab["seconds"]
    result["install_seconds"] = install_seconds
    return result


def main() -> int:
    core = [sys.executable, "-m", "pytest", "tests/core", "tests/diffusers_api", "tests/lab", "-m", "not comfyui", "-rs"]
    stages = [run_pytest("core", core), comfyui_stage()]
    failed = False
    print()
    for result in stages:
        install = f", {result['install_seconds']:.0f} s of it for {COMFY_VENV.name}/" if "install_seconds" in result else ""
        print(f"[run_tests] {result['name']}: {result['passed']} passed, {result['failed']} failed, {len(result['skipped'])} skipped ({result['seconds']:.0f} s{install})")
        problems = [result["problem"]] if result["problem"] else []
        if result["name"] == "comfyui" and CI and result["skipped"]:
            problems.append("under CI no ComfyUI test may be skipped:\n    " + "\n    ".join(result["skipped"]))
        if problems == [result["problem"]] and result["problem"].startswith("not run") and not CI:
            print(f"[run_tests] {result['name']}: {result['problem']}")
            problems = []
        for problem in problems:
            print(f"[run_tests] {result['name']} FAILED: {problem}")
        failed = failed or bool(result["failed"] or problems)
    totals = [sum(result[key] for result in stages) for key in ("passed", "failed")] + [sum(len(result["skipped"]) for result in stages)]
    print("{} passed, {} failed, {} skipped".format(*totals))
    shutil.rmtree(REPORTS, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
