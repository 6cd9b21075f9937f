"""Hostile inputs for the refusal tests: small files that declare huge sizes, and a subprocess that runs code under
a memory cap (a memory bomb must never run uncapped in a test)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[2]
# Far below the 4-24 GB the bombs asked for, far above what reading a small file needs (torch itself maps ~1 GB).
MEMORY_CAP_BYTES = 3 * 2**30


def safetensors_file(path: Path, tensors: dict = None, metadata: dict = None) -> Path:
    """A safetensors file holding ``tensors`` (a one-number weight when none) and string ``metadata``."""
    save_file(tensors or {"weight": torch.zeros(1)}, str(path), metadata=metadata)
    return path


def pickle_file(path: Path, content) -> Path:
    torch.save(content, path)
    return path


def run_capped(code: str, cap_bytes: int = MEMORY_CAP_BYTES, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run Python ``code`` in a subprocess whose address space is capped at ``cap_bytes``, the repository
    importable; returns the finished process (stdout, stderr, returncode)."""
    return subprocess.run(_capped_command(code, cap_bytes), capture_output=True, text=True, timeout=timeout, env=_environment())


def start_capped(code: str, cap_bytes: int = MEMORY_CAP_BYTES) -> subprocess.Popen:
    """Start ``code`` as `run_capped` does, without waiting (for races between processes)."""
    return subprocess.Popen(_capped_command(code, cap_bytes), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment())


def _capped_command(code: str, cap_bytes: int) -> list:
    prelude = f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({cap_bytes}, {cap_bytes}))\n"
    return [sys.executable, "-c", prelude + textwrap.dedent(code)]


def _environment() -> dict:
    paths = [str(REPO_ROOT), str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def damaged_copies(source: Path, folder: Path) -> dict:
    """Damaged versions of ``source`` in ``folder`` (same extension), by kind of damage: name -> file name."""
    data = source.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little") if source.suffix == ".safetensors" else len(data) // 2
    damages = {
        "empty": b"",
        "four_bytes": data[:4],
        "header_only": data[:header_end],
        "cut_in_the_header": data[: header_end // 2],
        "cut_in_the_data": data[: (header_end + len(data)) // 2],
        "random_bytes": bytes(range(256)) * 4,
        "zeroed_header": bytes(min(header_end, 64)) + data[min(header_end, 64) :],
        "huge_header_length": (2**62).to_bytes(8, "little") + data[8:],
    }
    files = {}
    for name, content in damages.items():
        files[name] = f"damaged_{name}{source.suffix}"
        (folder / files[name]).write_bytes(content)
    return files
