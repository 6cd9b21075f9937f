"""Spec: writing a settings file never replaces an existing one unless asked to, two writers racing for one name
each get their own file, and written files get the process umask's mode."""

import os
import stat
import time
from pathlib import Path

import pytest
import torch

from perflow_core.checkpoint import read_perflow_settings, save_theta_file, write_once_under_free_name, write_perflow_checkpoint, write_under_free_name
from perflow_core.lab.cli import main
from perflow_core.settings import PerflowSettings
from support.hostile import pickle_file, safetensors_file, start_capped

SETTINGS = PerflowSettings(theta=[0.5, 0.0, 0.0, 0.25])
SAVES_PER_PROCESS = 25


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_saving_a_theta_file_over_an_existing_file_is_refused_and_leaves_it(tmp_path):
    path = tmp_path / "theta.safetensors"
    path.write_bytes(b"someone else's file")
    with pytest.raises(FileExistsError, match="never replaced"):
        save_theta_file(path, SETTINGS)
    assert path.read_bytes() == b"someone else's file"


def test_overwrite_replaces_an_existing_file(tmp_path):
    path = tmp_path / "theta.safetensors"
    path.write_bytes(b"old")
    save_theta_file(path, SETTINGS, overwrite=True)
    assert read_perflow_settings(path) == SETTINGS


def test_writing_a_checkpoint_over_an_existing_file_is_refused(tmp_path):
    source = safetensors_file(tmp_path / "model.safetensors")
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        write_perflow_checkpoint(source, taken, SETTINGS)
    assert taken.read_bytes() == b"keep me"


def test_a_refused_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "theta.safetensors").write_bytes(b"x")
    with pytest.raises(FileExistsError):
        save_theta_file(tmp_path / "theta.safetensors", SETTINGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theta.safetensors"]


def test_theta_files_get_the_umask_mode(tmp_path, umask_022):
    save_theta_file(tmp_path / "theta.safetensors", SETTINGS)
    assert _mode(tmp_path / "theta.safetensors") == 0o644


def test_pickle_checkpoints_get_the_umask_mode(tmp_path, umask_022):
    source = pickle_file(tmp_path / "model.ckpt", {"weight": torch.zeros(1)})
    write_perflow_checkpoint(source, tmp_path / "out.ckpt", SETTINGS)
    assert _mode(tmp_path / "out.ckpt") == 0o644


def test_a_free_name_is_found_after_taken_ones(tmp_path):
    for name in ("theta.safetensors", "theta_1.safetensors"):
        (tmp_path / name).write_bytes(b"taken")
    path = write_under_free_name(tmp_path, "theta", ".safetensors", lambda new: save_theta_file(new, SETTINGS))
    assert path.name == "theta_2.safetensors"


def test_a_file_written_once_takes_the_first_free_name_and_leaves_taken_ones(tmp_path):
    names = [tmp_path / f"model_{number:05}_.safetensors" for number in range(1, 5)]
    for taken in names[:2]:
        taken.write_bytes(b"keep me")
    writes = []
    path = write_once_under_free_name(iter(names), lambda new: writes.append(new) or Path(new).write_bytes(b"new model"))
    assert path == names[2] and len(writes) == 1
    assert path.read_bytes() == b"new model"
    assert [name.read_bytes() for name in names[:2]] == [b"keep me", b"keep me"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name.name for name in names[:3]]


def test_a_failed_write_once_leaves_no_file(tmp_path):
    def failing(new):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_once_under_free_name([tmp_path / "model.safetensors"], failing)
    assert list(tmp_path.iterdir()) == []


def test_two_processes_racing_for_one_name_each_keep_every_file(tmp_path):
    start_at = time.time() + 3.0
    code = f"""
        import time
        from perflow_core.checkpoint import save_theta_file, write_under_free_name
        from perflow_core.settings import PerflowSettings
        settings = PerflowSettings(theta=[0.5, 0.0, 0.0, 0.25])
        time.sleep(max({start_at} - time.time(), 0))
        for _ in range({SAVES_PER_PROCESS}):
            write_under_free_name({str(tmp_path)!r}, "theta", ".safetensors", lambda new: save_theta_file(new, settings))
    """
    processes = [start_capped(code) for _ in range(2)]
    for process in processes:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    files = sorted(tmp_path.glob("theta*.safetensors"))
    assert len(files) == 2 * SAVES_PER_PROCESS
    assert all(read_perflow_settings(path) == SETTINGS for path in files)
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_cli_refuses_to_replace_an_existing_output(tmp_path, capsys):
    safetensors_file(tmp_path / "model.safetensors")
    save_theta_file(tmp_path / "theta.safetensors", SETTINGS)
    existing = tmp_path / "unrelated.safetensors"
    existing.write_bytes(b"unrelated")
    arguments = ["write-theta", "--theta", str(tmp_path / "theta.safetensors"), "--checkpoint", str(tmp_path / "model.safetensors"), "--output", str(existing)]
    assert main(arguments) == 2
    assert "exists" in capsys.readouterr().err and existing.read_bytes() == b"unrelated"
    assert main(arguments + ["--overwrite"]) == 0
    assert read_perflow_settings(existing) == SETTINGS
