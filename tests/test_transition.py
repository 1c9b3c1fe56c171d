"""The transition between two mHC layers (``api.transition``, ``transition_mosaic``):
post-res of layer l, then mapping + pre of layer l+1, against the two reference ops in
turn, forward and backward. The Mosaic GPU kernel runs in the interpreter with race
detection on a CPU host and is lowered for CUDA; on a GPU the same tests run it
compiled."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import _rel, _rng, _value_and_grads
from test_mosaic_kernels import (
    BF16,
    CPU,
    F32,
    MAPPING_TOL,
    PLATFORM,
    STATIC,
    T,
    _mapping_inputs,
    _races_recorded,
)

from pallas_kernels.mhc import _mosaic_io, api, reference, transition_mosaic
from pallas_kernels.mhc._common import Static
from pallas_kernels.mhc.backends import UnsupportedInput
from pallas_kernels.mhc.context import Context, MappingConfig, MappingWeights


def _transition_inputs(rng, n, c, t=T):
    x = jnp.asarray(rng.standard_normal((t, n, c)), BF16)
    f = jnp.asarray(rng.standard_normal((t, c)), BF16)
    h_res = jnp.asarray(rng.uniform(0, 1, (t, n, n)) / n, F32)
    h_post = jnp.asarray(rng.uniform(0, 2, (t, n)), F32)
    _, phi, bias, alpha = _mapping_inputs(rng, n, c, t)
    return h_res, h_post, x, f, phi, bias, alpha


def _composed(h_res, h_post, x, f, phi, bias, alpha):
    x_next = reference.apply_post_res(h_res, h_post, x, f)
    return (*reference.mhc_mappings_and_pre(x_next, phi, bias, alpha), x_next)


# The cotangents of h_res and h_post are fp32 sums over x_next's bf16 cotangent, which
# the kernels round once (mapping dx plus x_next's own, in fp32) and autodiff of the
# references rounds per term: they agree to bf16's rounding, measured up to 4e-3.
POST_RES_GRAD_TOL = 1e-2


def _check_against_composed(kernel, args, key):
    got = _value_and_grads(kernel, args, _rng("cot", *key))
    assert not _races_recorded()
    want = _value_and_grads(_composed, args, _rng("cot", *key), device=CPU)
    (outs, grads), (want_outs, want_grads) = got, want
    for g, w in zip((*outs, *grads[2:]), (*want_outs, *want_grads[2:]), strict=True):
        assert g.dtype == w.dtype
        assert _rel(g, w) <= MAPPING_TOL[g.dtype]
    for g, w in zip(grads[:2], want_grads[:2], strict=True):
        assert g.dtype == w.dtype == F32
        assert _rel(g, w) <= POST_RES_GRAD_TOL


# (n, C): kp = 16 with one stream and with the widest span of 192 columns (3 spans of
# one chunk), kp = 32 at the paper's n; n = 5 (kp = 64) does not fit and runs unfused
@pytest.mark.parametrize(
    "n, c, fused", [(1, 64, True), (2, 192, True), (4, 128, True), (5, 64, False)]
)
def test_transition_matches_the_two_ops(n, c, fused):
    """(layer_input, h_pre, h_post, h_res, x_next) and the cotangents of h_res, h_post,
    x, f, phi, bias and alpha."""
    assert transition_mosaic.fuses(n, c, BF16, BF16) == fused
    args = _transition_inputs(_rng("transition", n, c), n, c)

    def kernel(*a):
        return transition_mosaic.transition(*a, STATIC)

    jax.block_until_ready(jax.jit(kernel)(*args))
    assert not _races_recorded()
    _check_against_composed(kernel, args, ("transition", n, c))


def test_transition_pipelines_chunks_through_reused_stages(monkeypatch):
    """Spans of 3 chunks at n = 4 (2 stages): the third chunk reuses the first's input
    stage and output slot; 2 spans, T = 150 ends on a partial token block."""
    monkeypatch.setattr(_mosaic_io, "MIN_STEPS", 3)
    assert _mosaic_io.span_columns(150, 384, 64) == 192
    assert transition_mosaic.stages(4, 384, 32, 2, 2) == 2
    args = _transition_inputs(_rng("transition", "stages"), 4, 384, t=150)
    _check_against_composed(
        lambda *a: transition_mosaic.transition(*a, STATIC), args, ("transition", "stages")
    )


def test_transition_backward_is_bitwise_repeatable():
    """The fused backward sums its span partials in a fixed order, and dphi is one
    matmul: two backward passes are bitwise equal."""
    args = _transition_inputs(_rng("transition", "repeat"), 4, 128)

    def kernel(*a):
        return transition_mosaic.transition(*a, STATIC)

    key = _rng("cot", "transition", "repeat")
    first, second = _value_and_grads(kernel, args, key, repeat=2)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_fp32_streams_raise_a_typed_error():
    args = _transition_inputs(_rng("transition", "fp32"), 2, 64)
    h_res, h_post, x, f, *w = args
    with pytest.raises(UnsupportedInput, match="16-bit streams"):
        transition_mosaic.transition(h_res, h_post, x.astype(F32), f, *w, STATIC)


@pytest.mark.parametrize("backend", ["xla", "triton", "tpu", "mosaic_gpu"])
def test_api_transition_is_post_res_then_pre(backend):
    """``api.transition`` on (B, T, n, C) streams equals ``api.post_res`` then
    ``api.pre``, every backend (fused on Mosaic GPU, the two ops in turn elsewhere):
    compiled on its own platform, interpreted on a CPU host."""
    native = {"triton": "gpu", "mosaic_gpu": "gpu", "tpu": "tpu"}.get(backend, PLATFORM)
    if PLATFORM not in ("cpu", native):
        pytest.skip(f"{backend} runs compiled on {native}, interpreted on a CPU host")
    impl = backend if PLATFORM == native else f"{backend}_interpret"
    h_res, h_post, x, f, phi, bias, alpha = _transition_inputs(_rng("api", "transition"), 4, 128)
    batch = lambda a: a.reshape(1, *a.shape)  # noqa: E731
    ctx = Context(batch(h_res[..., 0]), batch(h_post), batch(h_res), batch(x))
    weights, config = MappingWeights(phi, bias, alpha), MappingConfig(num_iters=20)
    with jax.default_matmul_precision("highest"):  # XLA's fp32 default on a GPU is TF32
        li, nxt = api.transition(ctx, batch(f), weights, config, impl=impl)
        x_next = api.post_res(ctx, batch(f), impl="xla")
        want_li, want = api.pre(x_next, weights, config, impl="xla")
    assert isinstance(nxt, Context) and nxt.streams.shape == (1, *x.shape)
    for g, w in zip((li, *nxt), (want_li, *want), strict=True):
        assert g.dtype == w.dtype
        assert _rel(g, w) <= MAPPING_TOL[g.dtype]


def test_api_transition_checks_shapes():
    h_res, h_post, x, f, phi, bias, alpha = _transition_inputs(_rng("api", "shapes"), 2, 64)
    ctx = Context(h_post, h_post, h_res, x)
    with pytest.raises(ValueError, match=r"transition: f must have shape \(83, 64\)"):
        api.transition(ctx, f[:, :32], MappingWeights(phi, bias, alpha))


@pytest.mark.parametrize("n", [pytest.param(4, marks=pytest.mark.smoke), 2])
def test_transition_lowers_for_cuda(n, lowered_text):
    """Forward: the fused kernel, the coefficient epilogue and the pre (no projection);
    backward adds the epilogue's VJP, the pre's weight gradient and the fused backward
    (no dx kernel, no post-res backward)."""
    args = _transition_inputs(_rng("lower", "transition", n), n, 2048)
    compiled = Static(interpret=False)

    def fwd(*a):
        return transition_mosaic.transition(*a, compiled)

    def loss(*a):
        return sum(jnp.sum(o.astype(F32)) for o in fwd(*a))

    grad = jax.value_and_grad(loss, argnums=tuple(range(7)))
    for fn, calls in ((fwd, 3), (grad, 6)):
        text = lowered_text(fn, *args, platform="cuda")
        assert len(re.findall(r"custom_call @mosaic_gpu", text)) == calls
    assert "mhc_transition_fwd_mgpu" in text and "mhc_mapping_proj_mgpu" not in text
    assert "mhc_transition_bwd_mgpu" in text
    assert "mhc_post_res_bwd_mgpu" not in text and "mhc_mapping_dx_mgpu" not in text
