"""Sharding, rematerialisation and scanned layers: same numbers on any layout, less memory."""

import contextlib
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.model import LM, ModelConfig, init_params
from mhc_jax.optim import OptimizerConfig, make_optimizer
from mhc_jax.remat import blocks_per_group, default_recompute_layers
from mhc_jax.sharding import MeshConfig, check_model_fits, make_mesh
from mhc_jax.train import Layout, init_train_state

# impl="xla": the meshes are of CPU devices on any host, and "auto" would take the
# Pallas kernels whenever the default backend is a GPU or TPU.
SMALL = dict(vocab_size=64, num_blocks=2, d_model=32, num_heads=4, d_ff=64, impl="xla")
TX = make_optimizer(OptimizerConfig(warmup_steps=0), 10)


def batch(b=8, t=16, vocab=64, seed=0):
    toks = np.random.default_rng(seed).integers(0, vocab, size=(b, t + 1)).astype(np.int32)
    return toks[:, :-1], toks[:, 1:]


def loss_and_grads(cfg, devices, mesh_shape=(1, 1, 1), residual_shard=None):
    """Loss and parameter gradients of ``cfg`` on a (data, fsdp, tensor) mesh of ``devices``."""
    if residual_shard:
        cfg = ModelConfig(**{**cfg.__dict__, "residual_shard": residual_shard})
    inputs, targets = batch()
    layout = Layout.create(MeshConfig(*mesh_shape), cfg, devices[: int(np.prod(mesh_shape))])
    with layout.activate():
        shardings = layout.state_shardings(
            jax.eval_shape(lambda: init_train_state(cfg, TX, 0, boxed=True))
        )
        params = jax.jit(
            lambda: init_train_state(cfg, TX, 0).params, out_shardings=shardings.params
        )()

        def loss_fn(p, x, y):
            logits = LM(cfg).apply({"params": p}, x)
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1))

        fn = jax.jit(
            jax.value_and_grad(loss_fn), in_shardings=(shardings.params, layout.batch, layout.batch)
        )
        loss, grads = fn(
            params, layout.put_batch({"x": inputs})["x"], layout.put_batch({"y": targets})["y"]
        )
    return float(loss), jax.tree.map(np.asarray, grads)


def assert_trees_close(a, b, rtol, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


CONNECTIONS = [("residual", 1), ("hc", 4), ("mhc", 4)]


@pytest.mark.parametrize("connection, n", CONNECTIONS)
def test_meshes_give_the_same_loss_and_gradients(connection, n, cpu_devices):
    cfg = ModelConfig(connection=connection, n=n, **SMALL)
    ref_loss, ref_grads = loss_and_grads(cfg, cpu_devices)
    shapes = [(8, 1, 1), (2, 2, 2), (1, 2, 4)] if connection == "mhc" else [(2, 2, 2)]
    for shape in shapes:
        loss, grads = loss_and_grads(cfg, cpu_devices, shape)
        # float32 reductions reordered across devices (mHC, JAX 0.10.2 CPU): measured
        # |dloss| = 0 and max |dgrad| <= 2.5e-8 on every mesh; tolerances leave headroom.
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (shape, loss, ref_loss)
        assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-5)


def test_sequence_sharded_residual_matches(cpu_devices):
    cfg = ModelConfig(connection="mhc", n=4, **SMALL)
    ref_loss, ref_grads = loss_and_grads(cfg, cpu_devices)
    loss, grads = loss_and_grads(cfg, cpu_devices, (1, 2, 4), residual_shard="sequence")
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-5)


def collectives_of(cfg, mesh_shape, devices, b=8, t=16):
    layout = Layout.create(MeshConfig(*mesh_shape), cfg, devices)
    with layout.activate():
        shardings = layout.state_shardings(
            jax.eval_shape(lambda: init_train_state(cfg, TX, 0, boxed=True))
        )

        def loss_fn(p, x):
            return LM(cfg).apply({"params": p}, x).mean()

        abstract_params = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            jax.eval_shape(lambda: init_train_state(cfg, TX, 0).params),
            shardings.params,
        )
        tokens = jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=layout.batch)
        hlo = jax.jit(jax.grad(loss_fn)).lower(abstract_params, tokens).compile().as_text()
    ops = re.findall(r"= \(?([a-z0-9]+\[[0-9,]*\])[^=]*? (all-gather|all-reduce|all-to-all)\(", hlo)
    return [
        (kind, tuple(int(d) for d in re.findall(r"\d+", shape.split("[")[1])))
        for shape, kind in ops
    ]


def test_no_all_gather_of_the_streams_under_tensor_parallelism(cpu_devices):
    n, c = 4, 48  # sizes that no other axis of the test has
    cfg = ModelConfig(connection="mhc", n=n, **{**SMALL, "d_model": c, "d_ff": 96})
    ops = collectives_of(cfg, (1, 2, 4), cpu_devices)
    gathers = [shape for kind, shape in ops if kind == "all-gather"]
    for shape in gathers:  # sub-layer inputs (B, T, C) may be gathered; the streams may not
        assert n * c not in shape and not any(
            shape[i : i + 2] == (n, c) for i in range(len(shape))
        ), shape
    # the mapping's one psum per token: n*n + 2n projections + 1 sum of squares
    assert any(kind == "all-reduce" and shape[-1] == n * n + 2 * n + 1 for kind, shape in ops), ops


def remat_cfg(policy, **kw):
    shape = dict(vocab_size=64, num_blocks=4, d_model=64, num_heads=4, d_ff=128) | kw
    return ModelConfig(connection="mhc", n=4, remat=policy, **shape)


def scanned_from_unscanned(params, unit):
    """Stacks ``group_i/block_i`` parameters into the ``scan/block_j`` layout (i = u * unit + j)."""
    blocks = {k: v for k, v in params.items() if k.startswith("group_")}
    rest = {k: v for k, v in params.items() if not k.startswith("group_")}
    steps = len(blocks) // unit
    stacked = {
        f"block_{j}": jax.tree.map(
            lambda *xs: np.stack(xs),
            *[blocks[f"group_{u * unit + j}"][f"block_{u * unit + j}"] for u in range(steps)],
        )
        for j in range(unit)
    }
    return {**rest, "scan": stacked}


def loss_and_grads_with(cfg, params, data):
    def loss_fn(p):
        logits = LM(cfg).apply({"params": p}, data[0])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), data[1][..., None], -1))

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    return float(loss), jax.tree.map(np.asarray, grads)


def test_remat_policies_and_scan_give_identical_gradients():
    data = batch(b=2, t=32)
    params = jax.tree.map(np.asarray, init_train_state(remat_cfg("none"), TX, 0).params)
    ref_loss, ref_grads = loss_and_grads_with(remat_cfg("none"), params, data)
    for policy in ["full", "save_dots", "mhc_blocks"]:
        cfg = remat_cfg(policy)
        if cfg.blocks_per_group > 1:  # regroup the same weights: group_g holds blocks g*G..
            regrouped = {k: v for k, v in params.items() if not k.startswith("group_")}
            for g in range(cfg.num_blocks // cfg.blocks_per_group):
                ids = range(g * cfg.blocks_per_group, (g + 1) * cfg.blocks_per_group)
                regrouped[f"group_{g}"] = {
                    f"block_{i}": params[f"group_{i}"][f"block_{i}"] for i in ids
                }
            loss, grads = loss_and_grads_with(cfg, regrouped, data)
            grads = {k: v for k, v in grads.items() if not k.startswith("group_")} | {
                f"group_{i}": {
                    f"block_{i}": grads[f"group_{i // cfg.blocks_per_group}"][f"block_{i}"]
                }
                for i in range(cfg.num_blocks)
            }
        else:
            loss, grads = loss_and_grads_with(cfg, params, data)
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), policy
        assert_trees_close(grads, ref_grads, rtol=1e-5, atol=1e-7)  # recomputation changes nothing
    for policy in ["none", "mhc_blocks"]:
        cfg = remat_cfg(policy, scan_layers=True)
        unit = cfg.scan_unit
        loss, grads = loss_and_grads_with(cfg, scanned_from_unscanned(params, unit), data)
        assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss), (policy, "scan")
        assert_trees_close(grads, scanned_from_unscanned(ref_grads, unit), rtol=1e-5, atol=1e-7)


DTYPE_BYTES = {"f32": 4, "bf16": 2, "i32": 4, "bool": 1}


def saved_residual_bytes(policy):
    """Bytes of the activations autodiff keeps for the backward pass (parameters excluded)."""
    cfg = remat_cfg(policy, num_blocks=8, d_model=128, d_ff=256)
    params = init_params(cfg, jax.random.key(0))
    tokens = jnp.zeros((2, 64), jnp.int32)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        jax.ad_checkpoint.print_saved_residuals(
            lambda p: LM(cfg).apply({"params": p}, tokens).mean(), params
        )
    total = 0
    for line in text.getvalue().splitlines():
        m = re.match(r"(\w+)\[([\d,]*)\]", line)
        if m and "from the argument" not in line:
            total += math.prod(int(d) for d in m.group(2).split(",") if d) * DTYPE_BYTES[m.group(1)]
    return total


def test_remat_memory_ordering():
    policies = ["none", "save_connections", "save_dots", "mhc_blocks", "full"]
    sizes = {p: saved_residual_bytes(p) for p in policies}
    # Measured (8 blocks, C = 128, n = 4, 2 x 64 tokens, fp32, MB): none 18.0,
    # save_connections 14.7, save_dots 7.2, mhc_blocks 6.1, full 2.3. (XLA's CPU
    # temporaries are no measure of this: there the transient (T, n, n, C)
    # mixing product dominates.)
    assert sizes["none"] > sizes["save_connections"] > 1.5 * sizes["save_dots"], sizes
    assert sizes["none"] > 2 * sizes["save_dots"], sizes
    assert sizes["save_dots"] > sizes["mhc_blocks"] > 2 * sizes["full"], sizes


def test_recompute_block_length():
    assert default_recompute_layers(4, 60) == 6  # 27B: sqrt(4 * 60 / 6) = 6.3
    assert blocks_per_group("mhc_blocks", 4, 30) == 3
    assert blocks_per_group("mhc_blocks", 4, 30, recompute_layers=10) == 5
    assert blocks_per_group("full", 4, 30) == 1


@pytest.mark.parametrize(
    "mesh_cfg, match",
    [
        (MeshConfig(3, 1, 1), r"product 3 must equal the 8 devices"),
        (MeshConfig(-1, 3, 1), r"fixed sizes \(product 3\) must divide the 8 devices"),
    ],
)
def test_bad_mesh_sizes(mesh_cfg, match, cpu_devices):
    with pytest.raises(ValueError, match=match):
        make_mesh(mesh_cfg, cpu_devices)


def test_bad_mesh_config_and_model_fit(cpu_devices):
    with pytest.raises(
        ValueError, match=r"sharding.\(data, fsdp, tensor\)=\(-1, -1, 1\) is invalid"
    ):
        MeshConfig(-1, -1, 1)
    cfg = ModelConfig(
        connection="mhc", n=4, vocab_size=64, num_blocks=2, d_model=32, num_heads=4, d_ff=66
    )
    with pytest.raises(
        ValueError,
        match=r"model.num_heads=4 is invalid: must be divisible by the mesh's tensor size 8",
    ):
        check_model_fits(make_mesh(MeshConfig(1, 1, 8), cpu_devices), cfg, seq_len=16, batch=8)
    mesh = make_mesh(MeshConfig(1, 2, 4), cpu_devices)
    with pytest.raises(
        ValueError, match=r"model.d_ff=66 is invalid: must be divisible by the mesh's tensor size 4"
    ):
        check_model_fits(mesh, cfg, seq_len=16, batch=8)
    cfg = ModelConfig(**{**cfg.__dict__, "d_ff": 64})
    with pytest.raises(
        ValueError,
        match=r"data.batch_size=3 is invalid: must be divisible by the mesh's data x fsdp size 2",
    ):
        check_model_fits(mesh, cfg, seq_len=16, batch=3)
    seq_cfg = ModelConfig(**{**cfg.__dict__, "residual_shard": "sequence"})
    with pytest.raises(ValueError, match=r"data.seq_len=18 is invalid"):
        check_model_fits(mesh, seq_cfg, seq_len=18, batch=8)
    check_model_fits(mesh, seq_cfg, seq_len=16, batch=8)


def test_scan_needs_whole_round_robin_periods():
    with pytest.raises(
        ValueError, match=r"num_blocks=3 is invalid: must be a multiple of 2 when scan_layers=True"
    ):
        ModelConfig(connection="mhc", n=4, num_blocks=3, scan_layers=True)
    with pytest.raises(ValueError, match=r"ModelConfig.remat='some' is invalid"):
        ModelConfig(remat="some")


def test_multiprocess_launch_detection():
    from mhc_jax.sharding import launched_multiprocess as detect

    assert not detect({})
    assert not detect({"SLURM_NTASKS": "1", "TPU_WORKER_HOSTNAMES": "localhost"})
    assert detect({"SLURM_NTASKS": "4"})
    assert detect({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"})
    assert detect({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
