"""Run diffusers' own SchedulerCommonTest (tests/schedulers/test_schedulers.py) against PerflowScheduler.

That test file is not shipped in the diffusers wheel, so get a source checkout, ideally of the tag
of the installed version (`python -c "import diffusers; print(diffusers.__version__)"`), else main:

    git clone --depth 1 --branch v<version> https://github.com/huggingface/diffusers /tmp/diffusers-src
    python tools/run_diffusers_scheduler_suite.py /tmp/diffusers-src [extra pytest args, e.g. -k from_pretrained]

The checkout only supplies the tests; `diffusers` itself is the installed package, and `perflow_core`
is this tree's. The suite runs offline (HF_HUB_OFFLINE=1) from a temporary folder, outside the
checkout and without its conftest (which would put the checkout's src/ first). Exit code = pytest's.
test_compatibles builds every scheduler in `_compatibles`, so scipy and torchsde must be importable
(else LMSDiscreteScheduler / DPMSolverSDEScheduler are dummies that raise ImportError).
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

TEST_MODULE = '''
import tests.schedulers.test_schedulers as ts
from perflow_core import PerflowScheduler


class TestPerflowSchedulerCommon(ts.SchedulerCommonTest):
    scheduler_classes = (PerflowScheduler,)
    forward_default_kwargs = (("num_inference_steps", 8),)

    def get_scheduler_config(self, **kwargs):
        # Not every parameter: test_from_pretrained needs some defaults left to `_use_default_values`.
        config = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
        config.update(kwargs)
        return config
'''


def main(checkout: str, pytest_args: list) -> int:
    checkout = Path(checkout).resolve()
    if not (checkout / "tests" / "schedulers" / "test_schedulers.py").is_file():
        sys.exit(f"{checkout} is not a diffusers checkout (no tests/schedulers/test_schedulers.py)")
    repo = Path(__file__).resolve().parents[1]
    path = [str(checkout), str(repo)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", "import diffusers, perflow_core; print('diffusers', diffusers.__version__, "
                    "diffusers.__file__); print('perflow_core', perflow_core.__file__)"], env=env, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "test_perflow_scheduler_common.py").write_text(TEST_MODULE)
        command = [sys.executable, "-m", "pytest", "test_perflow_scheduler_common.py", "-p", "no:cacheprovider",
                   "--noconftest", "-rfEs", "-v", *pytest_args]
        return subprocess.run(command, cwd=tmp, env=env).returncode


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
