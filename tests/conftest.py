"""Shared by every test group: offline Hugging Face, and the reference trajectories of ../shared/reference."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _reference_path() -> Path:
    configured = os.environ.get("PERFLOW_REFERENCE")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "reference" / "perflow_reference.safetensors"


@pytest.fixture(scope="session")
def reference_path() -> Path:
    path = _reference_path()
    if not path.is_file():
        pytest.skip(f"PeRFlow reference trajectories not found at {path} (set PERFLOW_REFERENCE)")
    return path
