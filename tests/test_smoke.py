"""Smoke tests: what CI also runs against the newest JAX release (``pytest -m smoke``).

Every module imports, every kernel lowers for its platform (the kernel test files'
lowering tests carry the mark too), and the main job's command trains 3 steps. A
removal or an API change in a new JAX shows here as soon as its pin moves.
"""

import importlib
import os
import pkgutil
import subprocess
import sys

import pytest

import mhc_jax
import pallas_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.smoke


def _modules(package) -> list[str]:
    return [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]


@pytest.mark.parametrize("name", _modules(mhc_jax) + _modules(pallas_kernels))
def test_module_imports(name):
    importlib.import_module(name)


def test_main_job_trains_three_steps(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "experiments", "train.py"),
            "--config=experiments/configs/tiny.py:num_blocks=1,d_model=32,num_heads=2,d_ff=64",
            "--config.training.num_steps=3",
            "--config.training.sample_tokens=8",
            "--config.data.eval_max_batches=2",
            "--config.logging.progress=False",
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done: " in proc.stdout and "steps=3" in proc.stdout, proc.stdout[-2000:]
