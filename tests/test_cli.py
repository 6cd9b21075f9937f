from perflow_core.cli import main


def test_demo_writes_a_grid_and_prints_the_error_and_time(tmp_path, capsys):
    output = tmp_path / "grid.png"
    assert main(["demo", "--samples", "3", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert output.stat().st_size > 0
    assert "RMSE to the exact probability-flow ODE solution" in printed and "time: PeRFlow" in printed


def test_demo_error_is_reported_without_a_traceback(tmp_path, capsys):
    assert main(["demo", "--steps", "0", "--samples", "1", "--output", str(tmp_path / "x.png")]) == 2
    assert "num_inference_steps must be a whole number >= 1" in capsys.readouterr().err


def test_calibrate_writes_a_theta_file_the_reader_loads(tmp_path, capsys):
    from perflow_core.checkpoint import read_perflow_settings

    output = tmp_path / "theta.safetensors"
    assert main(["calibrate", "--samples", "16", "--holdout", "8", "--smoothing", "0.2", "--output", str(output)]) == 0
    assert "held-out RMSE to the teacher" in capsys.readouterr().out
    assert read_perflow_settings(output).theta.abs().sum() > 0


def test_write_theta_copies_a_checkpoint_with_the_theta(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from perflow_core.checkpoint import read_perflow_settings, save_theta_file
    from perflow_core.settings import PerflowSettings

    save_file({"weight": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    save_theta_file(tmp_path / "theta.safetensors", PerflowSettings(theta=[0.5, 0.0, 0.0, 0.25]))
    arguments = ["--theta", str(tmp_path / "theta.safetensors"), "--checkpoint", str(tmp_path / "model.safetensors")]
    assert main(["write-theta", *arguments, "--output", str(tmp_path / "out.safetensors")]) == 0
    assert read_perflow_settings(tmp_path / "out.safetensors").theta[:, 0].tolist() == [0.5, 0.0, 0.0, 0.25]
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["weight"], torch.ones(2))


def test_calibrate_with_a_checkpoint_but_no_output_checkpoint_is_refused(tmp_path, capsys):
    assert main(["calibrate", "--checkpoint", str(tmp_path / "m.safetensors")]) == 2
    assert "--output-checkpoint" in capsys.readouterr().err
