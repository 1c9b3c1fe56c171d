"""Test setup: 8 fake CPU devices (for mesh tests) before JAX's backend starts; the
``cpu_devices`` fixture, which runs a mesh test on them on any host (a GPU host has one
GPU); ``lowered_text``, which lowers a jitted function for another platform; and
``run_experiment``, which runs a script of experiments/ as a user would; and for the
training tests a tiny run's config (``micro_config``), the bundled corpus prepared once
(``data_dir``) and ``run_cli`` (experiments/train.py in a subprocess)."""

import contextlib
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from mhc_jax import config as config_lib
from mhc_jax import data_cache

jax.config.update("jax_num_cpu_devices", 8)

# Triton and Mosaic GPU lowerings read the target GPU from the device; without one (a CPU
# host) they take it from an abstract mesh's device. Hopper: what the kernels are built for.
_TARGETS = {"cuda": AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")}


def lower_text(fn, *args, platform: str) -> str:
    """StableHLO text of ``jax.jit(fn)`` lowered for ``platform`` ("cuda", "tpu", ...)."""
    target = _TARGETS.get(platform)
    on_device = target is None or jax.default_backend() == "gpu"
    mesh = AbstractMesh((1,), ("_target",), (AxisType.Auto,), abstract_device=target)
    with contextlib.nullcontext() if on_device else use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.fixture
def cpu_devices():
    """The 8 CPU devices, made the default device for the test."""
    devices = jax.devices("cpu")
    with jax.default_device(devices[0]):
        yield devices


@pytest.fixture
def lowered_text():
    return lower_text


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_experiment(script: str, *args: str) -> subprocess.CompletedProcess:
    """Runs ``experiments/<script>`` with ``args`` from the repository root; output captured."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.fixture
def run_experiment():
    return _run_experiment


def _micro_config(**training):
    """A model and run small enough for a few seconds on 2 CPU cores."""
    cfg = config_lib.load_config_file(os.path.join(ROOT, "experiments", "configs", "tiny.py"))
    m = cfg.model
    m.num_blocks, m.d_model, m.num_heads, m.d_ff = 2, 32, 2, 64
    cfg.data.seq_len, cfg.data.batch_size = 32, 8
    cfg.data.eval_batch_size, cfg.data.eval_max_batches = 8, 4
    cfg.optimizer.warmup_steps = 5
    cfg.training.update(num_steps=12, eval_every=6, checkpoint_every=6, sample_tokens=16)
    cfg.training.update(training)
    cfg.logging.update(log_every=1, diagnostics_every=6, progress=False)
    return cfg


@pytest.fixture
def micro_config():
    return _micro_config


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The bundled corpus, prepared once per test process."""
    return data_cache.ensure_prepared("", str(tmp_path_factory.mktemp("data")))


def _run_cli(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """experiments/train.py with ``args`` on the CPU; asserts success unless check=False."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "train.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        **kw,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def run_cli():
    return _run_cli
