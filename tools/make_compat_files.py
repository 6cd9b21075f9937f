"""Write the files in tests/compat_files/: settings files as a given version of perflow_core writes them.

The committed files were written by main at 6e3c248 (before the settings refactor); the tests in
tests/core/test_compat_files.py read them with today's code. Both describe the settings read back with
tests/support/compat.py. Run from the repository root:

    python tools/make_compat_files.py tests/compat_files
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from perflow_core import PerflowScheduler, PerflowSettings
from perflow_core.checkpoint import read_perflow_settings, save_theta_file, write_perflow_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' support package

from support.compat import SETTINGS_FILES, described  # noqa: E402

THETA = [[0.05, -0.01, 0.02], [0.0, 0.0, 0.0], [0.1, 0.0, -0.03]]
BOUNDARIES = [1000, 700, 300, 0]


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    settings = PerflowSettings(segment_boundaries=BOUNDARIES, theta=THETA, prediction_type="diff_eps")
    save_theta_file(folder / "theta_file.safetensors", settings, overwrite=True)
    weights = {"model.diffusion_model.w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_file(weights, str(folder / "weights.safetensors"), metadata={"format": "pt"})
    write_perflow_checkpoint(folder / "weights.safetensors", folder / "checkpoint.safetensors", settings, overwrite=True)
    torch.save({"state_dict": weights}, folder / "weights_nested.ckpt")
    write_perflow_checkpoint(folder / "weights_nested.ckpt", folder / "checkpoint_nested.ckpt", settings, overwrite=True)
    torch.save(weights, folder / "weights_flat.pt")
    write_perflow_checkpoint(folder / "weights_flat.pt", folder / "checkpoint_flat.pt", PerflowSettings(segments=2, theta=[0.1, 0.2], prediction_type="velocity"), overwrite=True)
    scheduler = PerflowScheduler(segment_boundaries=BOUNDARIES, theta_init=THETA, prediction_type="diff_eps", beta_schedule="linear")
    scheduler.save_pretrained(folder / "scheduler")
    torch.save(scheduler.state_dict(), folder / "scheduler_state_dict.pt")
    for name in ("weights.safetensors", "weights_nested.ckpt", "weights_flat.pt"):
        (folder / name).unlink()
    (folder / "expected.json").write_text(json.dumps(what_this_version_reads(folder), indent=1) + "\n")


def what_this_version_reads(folder: Path) -> dict:
    """What the writing version itself reads back: the expectations the compat tests hold today's code to."""
    expected = {name: described(read_perflow_settings(folder / name)) for name in SETTINGS_FILES}
    scheduler = PerflowScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(6)
    expected["scheduler"] = {**described(scheduler.perflow_settings()), "timesteps_6": scheduler.timesteps.tolist()}
    restored = PerflowScheduler()
    restored.load_state_dict(torch.load(folder / "scheduler_state_dict.pt", weights_only=True))
    expected["scheduler_state_dict.pt"] = described(restored.perflow_settings())
    return expected


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/compat_files"))
