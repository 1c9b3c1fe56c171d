"""Test setup: 8 fake CPU devices (for mesh tests) before JAX's backend starts; the
``cpu_devices`` fixture, which runs a mesh test on them on any host (a GPU host has one
GPU); ``lowered_text``, which lowers a jitted function for another platform; and
``run_experiment``, which runs a script of experiments/ as a user would."""

import contextlib
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

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
