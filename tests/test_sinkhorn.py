"""Sinkhorn-Knopp: constraints, extreme inputs, custom-VJP gradient (SPEC §5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mhc_jax.sinkhorn import sinkhorn_knopp

# Column-sum error after 20 iterations, measured on 2000 random N(0, scale^2)
# logit matrices per n in {2, 4, 8} (float32): scale 0.01 -> 2.4e-7; 1 -> 6.1e-3
# (n = 2 converges slowest); 3 -> 4.9e-2; 10 -> 4.8e-1; 30 -> 1.0 (near-permutation
# matrices need far more than 20 iterations). Bounds below leave ~2x headroom.
COLUMN_TOL = {0.01: 1e-6, 1.0: 2e-2, 3.0: 0.1, 10.0: 1.0}
ROW_TOL = 5e-7  # rows are normalised last: float32 rounding of n terms


def _unrolled(t, num_iters):
    """The SPEC §5 loop in plain Python, differentiated by ordinary autodiff."""
    m = jnp.exp(t - jnp.max(t, axis=(-2, -1), keepdims=True))
    for _ in range(num_iters):
        m = m / m.sum(-2, keepdims=True)
        m = m / m.sum(-1, keepdims=True)
    return m


@pytest.mark.parametrize("scale", [0.01, 1.0, 3.0, 10.0, 30.0])
@pytest.mark.parametrize("batch", [(), (7,), (3, 5)])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_rows_and_columns(scale, batch, n):
    rng = np.random.default_rng(hash((scale, batch, n)) % 2**32)
    t = jnp.asarray(rng.normal(size=(*batch, n, n)) * scale, jnp.float32)
    m = sinkhorn_knopp(t, num_iters=20)
    assert m.shape == t.shape and m.dtype == jnp.float32
    assert bool(jnp.all(m >= 0)) and bool(jnp.all(jnp.isfinite(m)))
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=ROW_TOL)
    if scale in COLUMN_TOL:
        np.testing.assert_allclose(m.sum(-2), 1.0, atol=COLUMN_TOL[scale])


def test_smooth_logits_converge_to_doubly_stochastic():
    t = jnp.asarray(np.random.default_rng(0).normal(size=(64, 4, 4)) * 0.5, jnp.float32)
    m = sinkhorn_knopp(t, num_iters=50)
    np.testing.assert_allclose(m.sum(-2), 1.0, atol=1e-5)


def test_extreme_logits_stay_finite():
    rng = np.random.default_rng(1)
    t = jnp.asarray(rng.choice([-1e4, 1e4], size=(50, 4, 4)), jnp.float32)
    t = t.at[0].set(-1e4).at[1, :, 0].set(1e4)  # all-equal and one dominant column
    m = sinkhorn_knopp(t)
    assert bool(jnp.all(jnp.isfinite(m)))
    np.testing.assert_allclose(m.sum(-1), 1.0, atol=ROW_TOL)
    g = jax.grad(lambda t: jnp.sum(sinkhorn_knopp(t) ** 2))(t)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_bf16_input_computes_in_fp32():
    t = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, 4)), jnp.bfloat16)
    m = sinkhorn_knopp(t)
    assert m.dtype == jnp.float32
    np.testing.assert_allclose(m, sinkhorn_knopp(t.astype(jnp.float32)), rtol=1e-6)


@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_custom_vjp_matches_unrolled_autodiff_float64(scale, n):
    with jax.enable_x64(True):
        rng = np.random.default_rng(n)
        t = jnp.asarray(rng.normal(size=(3, n, n)) * scale, jnp.float64)
        w = jnp.asarray(rng.normal(size=(3, n, n)), jnp.float64)
        got = jax.grad(lambda t: jnp.sum(w * sinkhorn_knopp(t, 20)))(t)
        want = jax.grad(lambda t: jnp.sum(w * _unrolled(t, 20)))(t)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(sinkhorn_knopp(t, 20), _unrolled(t, 20), rtol=1e-12)
        rel = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        assert rel <= 1e-6, rel


def test_check_grads_reverse_mode():
    with jax.enable_x64(True):
        t = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 4)), jnp.float64)
        check_grads(lambda t: sinkhorn_knopp(t, 20), (t,), order=1, modes=("rev",))


def test_jit_vmap_and_grad_compose():
    t = jnp.asarray(np.random.default_rng(4).normal(size=(6, 4, 4)), jnp.float32)
    f = jax.jit(jax.vmap(lambda t: sinkhorn_knopp(t, 10)))
    np.testing.assert_allclose(f(t), sinkhorn_knopp(t, 10), rtol=1e-6, atol=1e-7)
    g = jax.jit(jax.grad(lambda t: jnp.sum(jax.vmap(sinkhorn_knopp)(t)[:, 0])))(t)
    assert g.shape == t.shape and bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(logits=jnp.zeros((3, 4))), r"shape \(\.\.\., n, n\)"),
        (dict(logits=jnp.zeros((4,))), r"shape \(\.\.\., n, n\)"),
        (dict(logits=jnp.zeros((4, 4)), num_iters=0), "num_iters must be an integer >= 1"),
        (dict(logits=jnp.zeros((4, 4)), eps=-1.0), "eps must be >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn_knopp(**kwargs)
