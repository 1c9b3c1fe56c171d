"""The typed mHC interface (``pallas_kernels.mhc.context``): ``api.pre`` hands
``api.post_res`` a Context, equal to the tuple-returning ops it is built on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mhc import api
from pallas_kernels.mhc.context import Context, MappingConfig, MappingWeights

F32 = jnp.float32


def _inputs(n=4, c=64, t=12):
    rng = np.random.default_rng(3)
    k = n * n + 2 * n
    x = jnp.asarray(rng.standard_normal((2, t // 2, n, c)), jnp.bfloat16)
    weights = MappingWeights(
        jnp.asarray(rng.standard_normal((n * c, k)) * 0.05, F32),
        jnp.asarray(rng.standard_normal(k), F32),
        jnp.asarray([0.5, 0.7, 1.1], F32),
    )
    return x, weights, jnp.asarray(rng.standard_normal((2, t // 2, c)), jnp.bfloat16)


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_pre_then_post_res_equals_the_tuple_ops(impl):
    x, weights, f = _inputs()
    config = MappingConfig(num_iters=7, norm_eps=1e-5)

    def typed(x, weights, f):
        li, ctx = api.pre(x, weights, config, impl=impl)
        assert isinstance(ctx, Context) and ctx.h_res.shape == (*x.shape[:-1], x.shape[-2])
        return li, api.post_res(ctx, f, impl=impl)

    def tuples(x, weights, f):
        li, _, h_post, h_res, xt = api.mhc_mappings_and_pre(
            x, *weights, num_iters=7, norm_eps=1e-5, tied_streams=True, impl=impl
        )
        return li, api.apply_post_res(h_res, h_post, xt, f, impl=impl)

    def loss(fn):
        return lambda *a: sum(jnp.sum(o.astype(F32) ** 2) for o in fn(*a))

    got = jax.value_and_grad(loss(typed), argnums=(0, 1, 2))(x, weights, f)
    want = jax.value_and_grad(loss(tuples), argnums=(0, 1, 2))(x, weights, f)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_iters=0), r"num_iters must be an integer >= 1, got 0"),
        (dict(num_iters=2.0), r"num_iters must be an integer >= 1, got 2.0"),
        (dict(norm_eps=-1.0), r"norm_eps must be >= 0, got -1.0"),
    ],
)
def test_mapping_config_rejects_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        MappingConfig(**kw)
