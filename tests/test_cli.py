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
