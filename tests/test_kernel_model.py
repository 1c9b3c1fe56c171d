"""The Pallas kernels inside the model: same loss and gradients as the XLA path."""

import jax
import jax.numpy as jnp
import pytest

from mhc_jax.model import LM, ModelConfig, defers_post_res, init_params
from mhc_jax.sharding import MeshConfig
from mhc_jax.train import Layout


def loss_and_grads(cfg, params, tokens):
    def loss_fn(p):
        logits = LM(cfg).apply({"params": p}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    return float(loss), grads


PLATFORM = jax.default_backend()


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_pallas_interpret_model_matches_xla(dtype, tol):
    # fp32 matmuls at full precision: on a GPU they default to TF32 (about 1e-4 apart here)
    with jax.default_matmul_precision("highest"):
        _kernel_model_matches_xla("pallas_interpret", dtype, tol)


@pytest.mark.skipif(
    PLATFORM == "tpu",
    reason="the Mosaic GPU kernels run on a GPU or in the interpreter on a CPU host",
)
def test_mosaic_gpu_model_matches_xla():
    """The Mosaic GPU kernels (compiled on a GPU, interpreted on a CPU host) in the model,
    whose two sub-layers meet in the fused transition."""
    impl = "mosaic_gpu" if PLATFORM == "gpu" else "mosaic_gpu_interpret"
    _kernel_model_matches_xla(impl, "bfloat16", 2e-2, mhc_fuse_transitions=True)


def _kernel_model_matches_xla(impl, dtype, tol, mhc_fuse_transitions=False):
    base = dict(vocab_size=64, num_blocks=1, d_model=64, num_heads=2, d_ff=64, n=4, dtype=dtype)
    base["mhc_fuse_transitions"] = mhc_fuse_transitions
    base["mhc_init"] = "uniform"  # non-trivial coefficients from the start
    xla_cfg = ModelConfig(connection="mhc", impl="xla", **base)
    pallas_cfg = ModelConfig(connection="mhc", impl=impl, **base)
    assert defers_post_res(pallas_cfg) == mhc_fuse_transitions and not defers_post_res(xla_cfg)
    params = init_params(xla_cfg, jax.random.key(0))
    # random phi so the mapping is input-dependent
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            jax.random.normal(jax.random.key(1), x.shape) * 0.05
            if "phi" in jax.tree_util.keystr(path)
            else x
        ),
        params,
    )
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, 64)
    loss_x, grads_x = loss_and_grads(xla_cfg, params, tokens)
    loss_p, grads_p = loss_and_grads(pallas_cfg, params, tokens)
    assert abs(loss_p - loss_x) <= tol * abs(loss_x)
    for (path, gx), gp in zip(
        jax.tree_util.tree_leaves_with_path(grads_x), jax.tree.leaves(grads_p)
    ):
        scale = float(jnp.max(jnp.abs(gx))) + 1e-12
        err = float(jnp.max(jnp.abs(gp - gx))) / scale
        assert err <= tol * 10, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("mesh_shape", [(4, 1, 1), (2, 1, 2)])
def test_pallas_kernels_run_per_device_shard_on_a_mesh(mesh_shape, cpu_devices):
    """Kernels cannot be partitioned by XLA: on a mesh they run inside shard_map."""
    base = dict(vocab_size=64, num_blocks=1, d_model=64, num_heads=2, d_ff=64, n=2)
    cfg = ModelConfig(connection="mhc", impl="pallas_interpret", mhc_init="uniform", **base)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(2), (4, 9), 0, 64)
    want, want_grads = loss_and_grads(cfg, params, tokens)
    layout = Layout.create(MeshConfig(*mesh_shape), cfg, cpu_devices[:4])
    with layout.activate():
        got, grads = loss_and_grads(cfg, params, jax.device_put(tokens, layout.batch))
    assert abs(got - want) <= 1e-5 * abs(want)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert float(jnp.max(jnp.abs(g - w))) <= 1e-4 * (float(jnp.max(jnp.abs(w))) + 1e-6)
