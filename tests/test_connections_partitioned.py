"""mhc_jax/connections/partitioned.py: the mHC ops laid out over a device mesh. Without a
mesh they are the kernel api; on one, each device's shard runs inside shard_map and the
result equals the unpartitioned math, for C split over ``tensor`` (one psum of the partial
projections) and for T split over it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mhc_jax import connections as C
from mhc_jax.connections import partitioned
from mhc_jax.sharding import MeshConfig, make_mesh
from pallas_kernels.mhc.context import MappingConfig, MappingWeights, Pending

B, T, N, CH = 2, 8, 3, 16
K = N * N + 2 * N


def _operands(seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (B, T, N, CH), jnp.float32)
    f = jax.random.normal(keys[1], (B, T, CH), jnp.float32)
    weights = MappingWeights(
        0.1 * jax.random.normal(keys[2], (N, CH, K), jnp.float32),  # phi stored (n, C, K)
        jax.random.normal(keys[3], (K,), jnp.float32),
        jnp.array([0.5, 0.7, 0.9], jnp.float32),
    )
    return x, f, weights


def _reference(x, f, weights, config):
    """The functional math: layer_input and x_next of one mHC layer."""
    phi = weights.phi.reshape(N * CH, K)
    h_pre, h_post, h_res = C.mhc_mappings(
        x, phi, weights.bias, weights.alpha, num_iters=config.num_iters
    )
    return C.apply_pre(h_pre, x), C.apply_post_res(h_res, h_post, x, f)


def _pre_then_post_res(x, f, weights, config, **layout):
    layer_input, ctx = partitioned.mhc_pre(x, weights, config, **layout)
    return layer_input, partitioned.post_res(ctx, f, **layout)


def test_without_a_mesh_the_ops_are_the_functional_math():
    x, f, weights = _operands()
    config = MappingConfig(num_iters=20)
    want = _reference(x, f, weights, config)
    got = _pre_then_post_res(x, f, weights, config, impl="xla", residual_shard="hidden")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_transition_is_post_res_then_the_next_mapping_and_pre():
    x, f, weights = _operands()
    next_weights = _operands(seed=1)[2]
    config = MappingConfig(num_iters=20)
    layout = dict(impl="xla", residual_shard="hidden")
    _, ctx = partitioned.mhc_pre(x, weights, config, **layout)
    x_next = partitioned.post_res(ctx, f, **layout)
    want_input, want_ctx = partitioned.mhc_pre(x_next, next_weights, config, **layout)
    got_input, got_ctx = partitioned.transition(Pending(ctx, f), next_weights, config, **layout)
    np.testing.assert_allclose(got_input, want_input, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_ctx, want_ctx):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual_shard", ["hidden", "sequence"])
@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_on_a_mesh_each_shard_gives_the_unpartitioned_result(residual_shard, impl, cpu_devices):
    x, f, weights = _operands()
    config = MappingConfig(num_iters=20)
    want = _reference(x, f, weights, config)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), cpu_devices[:4])
    layout = dict(impl=impl, residual_shard=residual_shard)
    t_axis = "tensor" if residual_shard == "sequence" else None
    c_axis = "tensor" if residual_shard == "hidden" else None
    with jax.set_mesh(mesh):
        x_sharded = jax.device_put(x, NamedSharding(mesh, P("data", t_axis, None, c_axis)))
        f_sharded = jax.device_put(f, NamedSharding(mesh, P("data", t_axis, c_axis)))
        got = jax.jit(lambda *a: _pre_then_post_res(*a, config, **layout))(
            x_sharded, f_sharded, weights
        )
        transition = jax.jit(
            lambda x, f, w: partitioned.transition(
                Pending(partitioned.mhc_pre(x, w, config, **layout)[1], f), w, config, **layout
            )[0]
        )(x_sharded, f_sharded, weights)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    want_next_input = _reference(want[1], f, weights, config)[0]
    np.testing.assert_allclose(transition, want_next_input, rtol=1e-5, atol=1e-5)


def test_off_mesh_under_a_mesh_and_bad_layouts(cpu_devices):
    x, f, weights = _operands()
    config = MappingConfig(num_iters=20)
    with jax.set_mesh(make_mesh(MeshConfig(data=4), cpu_devices[:4])):
        # on_mesh=False (the modules' init) runs unpartitioned, even on an odd batch
        layer_input, _ = partitioned.mhc_pre(
            x[:1], weights, config, impl="xla", residual_shard="hidden", on_mesh=False
        )
        np.testing.assert_allclose(
            layer_input, _reference(x[:1], f[:1], weights, config)[0], rtol=1e-5, atol=1e-5
        )
        with pytest.raises(ValueError, match=r"must be \(B, T, n, C\); got 3 dims"):
            partitioned.mhc_pre(x[0], weights, config, impl="xla", residual_shard="hidden")
    with pytest.raises(ValueError, match="residual_shard must be one of"):
        partitioned.mhc_pre(x, weights, config, impl="xla", residual_shard="channels")
