"""The implementation choice (``pallas_kernels.mhc.backends``) and the api's dispatch:
each platform's chain, explicit names that cannot run, and ``auto`` falling back on
``UnsupportedInput``, including a refusal only the backward raises."""

from __future__ import annotations

import logging
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mhc import api, backends, pre_mosaic, reference
from pallas_kernels.mhc.backends import Impl, UnsupportedInput

F32 = jnp.float32


@pytest.fixture
def on(monkeypatch):
    """``on(where)`` makes the library see platform ``where`` ("hopper", "gpu", "tpu", "cpu")."""

    def set_platform(where):
        backend = {"hopper": "gpu", "gpu": "gpu"}.get(where, where)
        monkeypatch.setattr(backends, "platform", lambda: where)
        monkeypatch.setattr(backends.jax, "default_backend", lambda: backend)

    backends.note_fallback.cache_clear()
    yield set_platform
    backends.note_fallback.cache_clear()


CHAINS = {
    ("hopper", "auto", "mapping"): ("mosaic_gpu", "triton", "xla"),
    ("hopper", "auto", "post_res"): ("triton", "mosaic_gpu", "xla"),
    ("hopper", "pallas", "pre"): ("mosaic_gpu", "triton"),
    ("gpu", "auto", "mapping"): ("triton", "xla"),
    ("gpu", "pallas_interpret", "pre"): ("triton_interpret",),
    ("tpu", "auto", "post_res"): ("tpu", "xla"),
    ("tpu", "pallas_interpret", "mapping"): ("tpu_interpret",),
    ("cpu", "auto", "mapping"): ("xla",),
    ("cpu", "mosaic_gpu_interpret", "pre"): ("mosaic_gpu_interpret",),
    ("cpu", "tpu_interpret", "pre"): ("tpu_interpret",),
}


@pytest.mark.parametrize("where, impl, op", list(CHAINS))
def test_each_platform_tries_its_kernels_fastest_first(on, where, impl, op):
    on(where)
    assert tuple(b.value for b in backends.chain(impl, op)) == CHAINS[where, impl, op]


@pytest.mark.parametrize(
    "where, impl, match",
    [
        ("cpu", "pallas", r"impl='pallas' is invalid on the 'cpu' backend"),
        ("gpu", "mosaic_gpu", r"impl='mosaic_gpu' is invalid on the 'gpu' backend \(gpu\)"),
        ("tpu", "triton", r"impl='triton' is invalid on the 'tpu' backend .*need a GPU"),
        ("hopper", "tpu", r"impl='tpu' is invalid on the 'gpu' backend .*need a TPU"),
        ("cpu", "cuda", r"impl must be one of \(.*'mosaic_gpu'.*\), got 'cuda'"),
    ],
)
def test_explicit_names_this_host_cannot_run_are_errors(on, where, impl, match):
    on(where)
    with pytest.raises(ValueError, match=match):
        backends.chain(impl, "pre")


def test_describe_names_what_runs(on):
    on("hopper")
    assert backends.describe("xla") == "xla"
    assert backends.describe("auto") == (
        "auto (mapping: mosaic_gpu > triton > xla; pre: mosaic_gpu > triton > xla; "
        "post_res: triton > mosaic_gpu > xla; transition: mosaic_gpu > triton > xla)"
    )
    on("tpu")
    assert backends.describe("pallas") == "pallas (tpu)"


@pytest.fixture
def without(monkeypatch):
    """``without(family)`` makes the library see a JAX lacking that family's Pallas
    module, as a JAX that has removed the deprecated Pallas Triton would."""

    def remove(kernels):
        monkeypatch.setitem(sys.modules, backends._PALLAS_MODULES[kernels], None)
        backends.missing.cache_clear()
        backends._note_once.cache_clear()

    yield remove
    backends.missing.cache_clear()
    backends._note_once.cache_clear()


def test_a_jax_without_a_pallas_backend_leaves_its_family_out(on, without, caplog):
    on("hopper")
    without("triton")
    with caplog.at_level(logging.WARNING):
        assert backends.chain("auto", "post_res") == (Impl.MOSAIC_GPU, Impl.XLA)
        assert backends.chain("pallas", "mapping") == (Impl.MOSAIC_GPU,)
    notes = {r.getMessage() for r in caplog.records}
    assert any("triton is left out of 'auto' and 'pallas'" in m for m in notes), notes
    assert "jax.experimental.pallas.triton" in backends.missing("triton")
    assert backends.missing("mosaic_gpu") is None
    for impl in ("triton", "triton_interpret", "pallas_interpret"):
        with pytest.raises(ValueError, match=rf"impl='{impl}' is unavailable: JAX"):
            backends.chain(impl, "pre")
    on("gpu")  # Triton is a non-Hopper GPU's only family
    assert backends.chain("auto", "pre") == (Impl.XLA,)
    with pytest.raises(ValueError, match=r"impl='pallas' is unavailable for 'pre': JAX .*triton"):
        backends.chain("pallas", "pre")


def test_the_kernel_families_load_on_first_use():
    """With every Pallas module unimportable, as on a JAX that has removed them, the
    api and the model still import and load no Pallas module."""
    code = (
        "import sys\n"
        "for m in ('triton', 'mosaic_gpu', 'tpu'):\n"
        "    sys.modules['jax.experimental.pallas.' + m] = None\n"
        "from pallas_kernels.mhc import api, backends\n"
        "import mhc_jax.model\n"
        "assert backends.chain('xla', 'pre') == (backends.Impl.XLA,)\n"
        "print(sorted(m for m in sys.modules if m.startswith('jax.experimental.pallas.')"
        " and sys.modules[m] is not None))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_xla_checks_no_kernel_family(on, without, caplog):
    on("gpu")
    without("triton")
    with caplog.at_level(logging.WARNING):
        assert backends.chain("xla", "post_res") == (Impl.XLA,)
        assert backends.resolve("xla", 4) == "xla"
    assert not caplog.records


def test_the_hopper_check_reads_the_compute_capability(monkeypatch):
    monkeypatch.setattr(backends.jax, "default_backend", lambda: "gpu")
    for capability, where in (("9.0", "hopper"), ("8.0", "gpu"), ("10.0", "gpu")):
        device = types.SimpleNamespace(compute_capability=capability)
        monkeypatch.setattr(backends.jax, "devices", lambda d=device: [d])
        assert backends.platform() == where


def _pre_inputs(c, n=4, t=16):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((t, n, c)), jnp.bfloat16)
    return jnp.asarray(rng.uniform(0, 1, (t, n)), F32), x


def _with_chain(monkeypatch, *names):
    monkeypatch.setattr(api, "chain", lambda impl, op: tuple(Impl(b) for b in names))
    monkeypatch.setattr(api, "_SUPPORT", {})
    backends.note_fallback.cache_clear()


def _grads(impl, h, x):
    def loss(h, x):
        return jnp.sum(api.apply_pre(h, x, impl=impl).astype(F32) ** 2)

    return jax.value_and_grad(loss, argnums=(0, 1))(h, x)


def test_auto_runs_the_first_backend_that_takes_the_input(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(
        pre_mosaic, "apply_pre", lambda *a, _run=pre_mosaic.apply_pre: calls.append(1) or _run(*a)
    )
    _with_chain(monkeypatch, "mosaic_gpu_interpret", "xla")
    h, x = _pre_inputs(64)
    with caplog.at_level(logging.WARNING):
        got = _grads("auto", h, x)
    assert len(calls) == 2 and not caplog.records  # the kernel's probe, then its real trace
    want = _grads("xla", h, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g, F32), np.asarray(w, F32), rtol=2e-2, atol=2e-2)

    h, x = _pre_inputs(40)  # Mosaic GPU's pre needs C a multiple of 32
    with caplog.at_level(logging.WARNING):
        got = [_grads("auto", h, x) for _ in range(2)]
    want = _grads("xla", h, x)
    for g, w in zip(jax.tree.leaves(got[0]), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 1, notes  # once per (op, backend, reason)
    assert "apply_pre: mosaic_gpu_interpret does not take this input" in notes[0]
    assert "C=40" in notes[0] and notes[0].endswith("running xla")


def test_an_explicit_backend_raises_its_refusal():
    h, x = _pre_inputs(40)
    with pytest.raises(UnsupportedInput, match=r"apply_pre: C=40 .* multiple of 32"):
        api.apply_pre(h, x, impl="mosaic_gpu_interpret")


def _refusing_backward_pre():
    """A kernel family whose pre takes any forward but refuses its backward."""

    @jax.custom_vjp
    def pre(h, x):
        return reference.apply_pre(h, x)

    def bwd(res, g):
        raise UnsupportedInput("apply_pre backward: this test's kernel has none")

    pre.defvjp(lambda h, x: (pre(h, x), None), bwd)
    return types.SimpleNamespace(apply_pre=lambda h, x, static: pre(h, x))


def test_a_refusal_in_the_backward_is_found_before_the_forward_commits(monkeypatch, caplog):
    refusing = (None, _refusing_backward_pre(), None)
    monkeypatch.setattr(api, "_family", lambda kernels: refusing)
    _with_chain(monkeypatch, "triton", "xla")
    h, x = _pre_inputs(64)
    with caplog.at_level(logging.WARNING):
        got = _grads("auto", h, x)
    want = _grads("xla", h, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert "this test's kernel has none" in caplog.records[0].getMessage()
    with pytest.raises(UnsupportedInput, match="has none"):
        _with_chain(monkeypatch, "triton")
        _grads("triton", h, x)
