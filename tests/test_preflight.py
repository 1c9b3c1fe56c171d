"""What a run is checked against before anything is written: the mesh against the devices,
and which mHC implementation runs (kernels where they support the input, else XLA)."""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import config as config_lib
from mhc_jax import loop, preflight
from mhc_jax.connections import partitioned
from mhc_jax.model import LM, ModelConfig, init_params
from pallas_kernels.mhc import backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def on_gpu(monkeypatch):
    """Makes the library believe the default backend is a GPU (the kernels are never
    reached here: only the implementation choice is)."""
    monkeypatch.setattr(partitioned.jax, "default_backend", lambda: "gpu")
    backends._note_once.cache_clear()
    yield
    backends._note_once.cache_clear()


def test_auto_takes_the_kernels_where_they_fit(on_gpu, caplog):
    with caplog.at_level(logging.WARNING):
        assert backends.resolve("auto", 4, "model.impl") == "auto"
        assert backends.resolve("auto", 8, "model.impl") == "auto"
        assert not caplog.records
        assert backends.resolve("auto", 12, "model.impl") == "xla"
        assert backends.resolve("auto", 12, "model.impl") == "xla"
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1 and "n=12 runs on the XLA path" in notes[0]


def test_auto_follows_the_backend():
    native = jax.default_backend() in ("gpu", "tpu")
    assert backends.resolve("auto", 4, "model.impl") == ("auto" if native else "xla")


@pytest.mark.parametrize(
    "impl, n, match",
    [
        ("pallas", 12, r"model.impl='pallas' is invalid for n=12: .* 1 <= n <= 8"),
        ("pallas_interpret", 9, r"model.impl='pallas_interpret' is invalid for n=9"),
        ("pallas", 4, r"model.impl='pallas' is invalid on the 'cpu' backend"),
        ("cuda", 4, r"model.impl='cuda' is invalid: must be one of"),
        ("triton", 4, r"model.impl='triton' is invalid on the 'cpu' backend .*need a GPU"),
        ("tpu", 4, r"model.impl='tpu' is invalid on the 'cpu' backend .*need a TPU"),
        ("mosaic_gpu", 4, r"model.impl='mosaic_gpu' is invalid on the 'cpu' backend"),
        ("triton_interpret", 9, r"model.impl='triton_interpret' is invalid for n=9"),
        ("mosaic_gpu_interpret", 9, r"model.impl='mosaic_gpu_interpret' is invalid for n=9"),
    ],
)
def test_explicit_kernels_fail_loudly(impl, n, match, monkeypatch):
    monkeypatch.setattr(partitioned.jax, "default_backend", lambda: "cpu")
    with pytest.raises(ValueError, match=match):
        backends.resolve(impl, n, "model.impl")


def test_auto_model_with_many_streams_runs_the_xla_path(on_gpu):
    """n = 10 on a "GPU": the model under impl="auto" equals impl="xla" exactly."""
    base = dict(vocab_size=32, num_blocks=1, d_model=16, num_heads=2, d_ff=32, n=10)
    params = init_params(ModelConfig(impl="xla", **base), jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, 32)
    want = LM(ModelConfig(impl="xla", **base)).apply({"params": params}, tokens)
    got = LM(ModelConfig(impl="auto", **base)).apply({"params": params}, tokens)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert jnp.all(jnp.isfinite(got))


def _tiny(batch_size=8, **sharding):
    cfg = config_lib.default_config()
    cfg.data.batch_size = batch_size
    cfg.data.eval_batch_size = 8
    cfg.sharding.update(sharding)
    return cfg


def test_preflight_checks_the_mesh_against_the_devices(cpu_devices):
    run = preflight.preflight(_tiny(data=2, fsdp=2, tensor=2), cpu_devices)
    assert dict(run.layout.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert run.mhc_impl == "xla"  # a CPU host
    assert "data 2 x fsdp 2 x tensor 2 over 8 cpu device(s)" in preflight.describe(run)
    with pytest.raises(ValueError, match=r"the product 16 must equal the 8 devices"):
        preflight.preflight(_tiny(data=4, fsdp=2, tensor=2), cpu_devices)
    with pytest.raises(ValueError, match=r"data.batch_size=12 is invalid"):
        preflight.preflight(_tiny(12, data=-1, fsdp=1, tensor=1), cpu_devices)


def _dry_run(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "experiments/train.py", "--config=experiments/configs/tiny.py"]
    return subprocess.run(
        [*cmd, *args, "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_dry_run_validates_the_mesh_and_the_kernels():
    ok = _dry_run()
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "mesh: data 1 x fsdp 1 x tensor 1 over 1 cpu device(s); mHC impl: xla" in ok.stdout
    bad_mesh = _dry_run("--config.sharding.data=2")
    assert bad_mesh.returncode == 2
    assert "error: sharding.(data, fsdp, tensor)=(2, 1, 1) is invalid" in bad_mesh.stderr
    bad_impl = _dry_run("--config.model.n=12", "--config.model.impl=pallas")
    assert bad_impl.returncode == 2 and "model.impl='pallas' is invalid for n=12" in bad_impl.stderr


def test_training_with_unsupported_kernels_stops_before_anything_is_written(tmp_path):
    cfg = _tiny()
    cfg.model.impl = "pallas"  # a CPU host here (or n = 12 on any host) cannot run them
    cfg.model.n = 12
    cfg.data.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"model.impl='pallas' is invalid for n=12"):
        loop.train_and_evaluate(cfg, str(tmp_path / "run"))
    assert not any(tmp_path.iterdir())
