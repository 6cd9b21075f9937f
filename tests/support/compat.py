"""The compatibility files in tests/compat_files/: which settings files there are and what is compared of the
settings read from each. tools/make_compat_files.py writes the expectations with these, tests/core/test_compat_files.py
checks today's code against them."""

from pathlib import Path

COMPAT_FILES = Path(__file__).resolve().parents[1] / "compat_files"
# The files read with read_perflow_settings (the scheduler folder and state dict are read through PerflowScheduler).
SETTINGS_FILES = ("theta_file.safetensors", "checkpoint.safetensors", "checkpoint_nested.ckpt", "checkpoint_flat.pt")


def described(settings) -> dict:
    """What is compared of a ``PerflowSettings``: its fields as plain JSON values, the boundaries it builds included."""
    return {
        "segments": settings.segments,
        "boundaries": [float(b) for b in settings.build_segments().boundaries],
        "theta": settings.theta.tolist(),
        "prediction_type": settings.prediction_type,
        "version": settings.version,
        "num_train_timesteps": settings.num_train_timesteps,
    }
