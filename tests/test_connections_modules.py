"""mhc_jax/connections/modules.py: each Linen module computes the functional math with its
own parameters, sows its coefficients, names its parameters' axes and refuses bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import connections as C
from pallas_kernels.mhc.context import Pending

B, T, CH = 2, 5, 16


def _streams(n, seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), (B, T, n, CH), jnp.float32).astype(dtype)


class _Branch(nn.Module):
    """A sub-layer F: (..., C) -> (..., C) with its own parameter."""

    @nn.compact
    def __call__(self, h):
        return jnp.tanh(nn.Dense(CH, use_bias=False, name="dense")(h))


class _Wrapped(nn.Module):
    """One connection around one sub-layer, as a transformer block uses it."""

    connection: nn.Module

    @nn.compact
    def __call__(self, x):
        return self.connection(x, _Branch(name="branch"))


def _init_and_apply(connection, x, perturb=0.0):
    model = _Wrapped(connection)
    variables = model.init(jax.random.key(1), x)
    params = nn.unbox(variables["params"])
    if perturb:  # move every parameter off its init so the math is exercised
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        noise = [perturb * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)]
        params = jax.tree.unflatten(tree, [p + e for p, e in zip(leaves, noise)])
    out, state = model.apply({"params": params}, x, mutable=["diagnostics"])
    return params, out, state


def _branch_fn(params):
    w = params["branch"]["dense"]["kernel"]
    return lambda h: jnp.tanh(h @ w)


def test_residual_is_x_plus_f():
    x = _streams(1)
    params, out, _ = _init_and_apply(C.Residual(), x)
    expected = x + _branch_fn(params)(x[..., 0, :])[..., None, :]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="expects n = 1 stream"):
        _init_and_apply(C.Residual(), _streams(2))


@pytest.mark.parametrize("dynamic", [False, True])
def test_hyper_connection_is_the_functional_math_with_its_parameters(dynamic):
    n = 3
    x = _streams(n)
    params, out, state = _init_and_apply(C.HyperConnection(layer_index=4, dynamic=dynamic), x, 0.1)
    p = params["connection"]
    dyn = None
    if dynamic:
        names = ("norm_scale", "w_pre", "w_post", "w_res", "s_alpha", "s_beta")
        dyn = C.HCDynamicParams(*(p[k] for k in names))
    h_pre, h_post, h_res = C.hc_mappings(x, p["b_pre"], p["b_post"], p["b_res"], dyn)
    f = _branch_fn(params)(C.apply_pre(h_pre, x))
    np.testing.assert_allclose(out, C.apply_post_res(h_res, h_post, x, f), rtol=1e-5, atol=1e-5)
    (sown,) = state["diagnostics"]["connection"]["coefficients"]
    np.testing.assert_allclose(sown["h_res"], jnp.mean(h_res, axis=(0, 1)), rtol=1e-5, atol=1e-6)


def test_hyper_connection_static_init_reads_stream_k_mod_n():
    params, _, _ = _init_and_apply(C.HyperConnection(layer_index=5, dynamic=False), _streams(3))
    np.testing.assert_array_equal(params["connection"]["b_pre"], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(params["connection"]["b_res"], np.eye(3))


@pytest.mark.parametrize("variant", ["paper", "deepseek_v4", "lite"])
def test_manifold_hyper_connection_is_the_functional_math_with_its_parameters(variant):
    n = 3
    x = _streams(n)
    mhc = C.ManifoldHyperConnection(layer_index=1, variant=variant, impl="xla")
    params, out, state = _init_and_apply(mhc, x, 0.1)
    p = params["connection"]
    phi = p["phi"].reshape(n * CH, -1)  # stored (n, C, K): SPEC's (n*C, K) row-major
    h_pre, h_post, h_res = C.mhc_mappings(x, phi, p["bias"], p["alpha"], variant=variant)
    f = _branch_fn(params)(C.apply_pre(h_pre, x))
    np.testing.assert_allclose(out, C.apply_post_res(h_res, h_post, x, f), rtol=1e-5, atol=1e-5)
    (sown,) = state["diagnostics"]["connection"]["coefficients"]
    np.testing.assert_allclose(sown["h_res"], jnp.mean(h_res, axis=(0, 1)), rtol=1e-5, atol=1e-6)
    # Doubly stochastic: iterations end on rows (exact but for V4's eps), columns converge.
    assert sown["res_row_err"] < 1e-5 and sown["res_col_err"] < 1e-3


def test_manifold_hyper_connection_parameter_axes_and_residual_init():
    n = 4
    variables = _Wrapped(C.ManifoldHyperConnection(layer_index=2)).init(
        jax.random.key(0), _streams(n)
    )
    boxed = variables["params"]["connection"]
    assert boxed["phi"].names == ("streams", "embed", "coeffs")
    assert boxed["phi"].value.shape == (n, CH, n * n + 2 * n)
    np.testing.assert_array_equal(boxed["bias"].value, C.residual_init_bias(n, 2))


def test_deferred_post_res_hands_the_next_layer_a_pending_it_completes():
    n = 2
    x = _streams(n)
    first = C.ManifoldHyperConnection(layer_index=0, impl="xla", defer_post_res=True)
    params, pending, _ = _init_and_apply(first, x, 0.1)
    assert isinstance(pending, Pending)
    expected = C.apply_post_res(
        pending.ctx.h_res, pending.ctx.h_post, pending.ctx.streams, pending.f
    )
    undeferred = C.ManifoldHyperConnection(layer_index=0, impl="xla")
    out = _Wrapped(undeferred).apply({"params": params}, x, mutable=["diagnostics"])[0]
    np.testing.assert_allclose(expected, out, rtol=1e-6, atol=1e-6)


def test_manifold_hyper_connection_refuses_bad_fields():
    with pytest.raises(ValueError, match="init_scheme must be one of"):
        bad = C.ManifoldHyperConnection(layer_index=0, init_scheme="zeros")
        _init_and_apply(bad, _streams(2))
    with pytest.raises(ValueError, match="variant"):
        _init_and_apply(C.ManifoldHyperConnection(layer_index=0, variant="v5"), _streams(2))


def test_stream_head_is_the_functional_head_and_starts_as_half_the_sum():
    n = 3
    x = _streams(n)
    head = C.StreamHead()
    params = nn.unbox(head.init(jax.random.key(0), x)["params"])
    np.testing.assert_allclose(
        head.apply({"params": params}, x), (0.5 + 1e-6) * x.sum(-2), rtol=1e-6, atol=1e-6
    )
    moved = jax.tree.map(lambda p: p + 0.1, params)
    expected = C.stream_head(x, moved["phi"].reshape(n * CH, n), moved["bias"], moved["scale"])
    np.testing.assert_allclose(head.apply({"params": moved}, x), expected, rtol=1e-6)
