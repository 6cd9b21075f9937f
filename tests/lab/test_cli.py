"""The `perflow` command line: calibrate and write-theta on the analytic model."""

from perflow_core.lab.cli import main


from PIL import Image


def test_demo_compares_the_student_with_every_solver_on_its_teacher(tmp_path, capsys):
    output = tmp_path / "grid.png"
    assert main(["demo", "--samples", "6", "--grid", "4", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "| student | PeRFlow (velocity, K=4" in printed
    for solver in ("PeRFlow (ddim_eps", "diffusers Euler", "diffusers DDIM", "diffusers DPM++ 2M", "diffusers UniPC", "diffusers DEIS", "diffusers Heun"):
        assert f"| teacher | {solver}" in printed
    assert "(best on the teacher)" in printed and "exact probability-flow ODE" in printed
    assert "student 4 steps / best solver on the teacher at 4 steps" in printed


def test_demo_grid_has_a_row_each_for_student_best_solver_and_exact_ode(tmp_path, capsys):
    output = tmp_path / "grid.png"
    assert main(["demo", "--samples", "5", "--grid", "3", "--output", str(output)]) == 0
    capsys.readouterr()
    width, height = Image.open(output).size
    assert 3 * 48 <= height < 4 * 48 and width > 3 * 48


def test_demo_with_fewer_steps_than_segments_names_the_input(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--samples", "1", "--output", str(tmp_path / "x.png")]) == 2
    assert "steps must be at least the student's K = 4 segments" in capsys.readouterr().err


def test_calibrate_a_student_against_its_teachers_exact_ode_into_a_copy_of_its_file(tmp_path, capsys):
    from perflow_core.lab.benchmark import STUDENT_PATH
    from perflow_core.lab.reflow import load_student

    copy = tmp_path / "student.safetensors"
    arguments = ["--student", str(STUDENT_PATH), "--teacher", "exact", "--samples", "8", "--holdout", "4"]
    paths = ["--output", str(tmp_path / "theta.safetensors"), "--checkpoint", str(STUDENT_PATH), "--output-checkpoint", str(copy)]
    assert main(["calibrate", *arguments, *paths]) == 0
    printed = capsys.readouterr().out
    assert "exact probability-flow ODE of the analytic model (smoothing 0.05)" in printed
    model, settings = load_student(copy)
    assert settings.prediction_type == "velocity" and not settings.theta_is_zero


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


def test_calibrate_can_learn_the_time_grid_into_the_theta_file(tmp_path, capsys):
    from perflow_core.checkpoint import read_perflow_settings

    output = tmp_path / "grid.safetensors"
    arguments = ["--steps", "6", "--samples", "16", "--holdout", "8", "--fit-boundaries", "--teacher-solver", "dpmpp_2m", "--output", str(output)]
    assert main(["calibrate", *arguments]) == 0
    printed = capsys.readouterr().out
    settings = read_perflow_settings(str(output))
    assert settings.segments == 6
    assert "segment boundaries: " + ", ".join(f"{b:g}" for b in settings.build_segments().boundaries) + " (learned)" in printed
