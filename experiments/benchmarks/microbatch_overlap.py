"""Two micro-batches interleaved per block, mHC kernels on GPU stream 1: does it hide them?

The paper overlaps mHC's memory-bound work with compute from other micro-batches.
This probe runs step_overhead.py's variants with patches: ``mb2`` splits the batch
in two and runs each block's sub-layers on both halves in turn (same parameters,
same loss up to rounding); ``k1`` also puts every Pallas kernel call on GPU stream
1 (``compute_on``; its glue stays on stream 0); ``c1`` puts each whole connection
op on stream 1. ``--plan`` lists ``connection:impl:remat:patches``:

    python experiments/benchmarks/microbatch_overlap.py --shape=A --batch=8 \
        --profile_dir=/tmp/prof --profile_steps=2

Needs a GPU for k1/c1. Kept in history only (BENCHMARKS.md has the result).
"""

import contextlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import step_overhead as so
from absl import app, flags
from jax.experimental import compute_on as _co

import mhc_jax.model as model_lib
import mhc_jax.partitioned as partitioned
from pallas_kernels.mhc import _common, mapping_triton, post_res_triton, pre_triton

ON = getattr(_co, "compute_on2", _co.compute_on)
_PLAN = flags.DEFINE_list(
    "plan",
    "residual:xla:none:-,mhc:pallas:none:-,mhc:pallas:none:mb2,mhc:pallas:none:mb2+k1,mhc:pallas:none:mb2+c1",
    "spec:patches",
)


def on_s1(fn):
    def wrapped(*args, **kw):
        leaves, tree = jax.tree_util.tree_flatten(args)
        dyn = [i for i, v in enumerate(leaves) if isinstance(v, (jax.Array, jax.core.Tracer))]

        def inner(*d):
            ls = list(leaves)
            for i, v in zip(dyn, d):
                ls[i] = v
            return fn(*jax.tree_util.tree_unflatten(tree, ls), **kw)

        return ON(inner, compute_type="gpu_stream:1", out_memory_spaces=jax.memory.Space.Device)(
            *[leaves[i] for i in dyn]
        )

    return wrapped


class MBBlock(nn.Module):
    config: object
    index: int

    @nn.compact
    def __call__(self, xs):
        cfg = self.config
        kw = dict(dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype)
        import math

        from mhc_jax.layers import CausalSelfAttention, RMSNorm, SwiGLU

        out_std = cfg.init_std / (math.sqrt(cfg.n) if cfg.scale_output_init else 1.0)
        mlp_kw = dict(init_std=cfg.init_std, out_init_std=out_std, **kw)
        attn_norm = RMSNorm(cfg.norm_eps, name="attn_norm", **kw)
        attn = CausalSelfAttention(
            cfg.num_heads, cfg.attention, cfg.rope_base, name="attn", **mlp_kw
        )
        mlp_norm = RMSNorm(cfg.norm_eps, name="mlp_norm", **kw)
        mlp = SwiGLU(cfg.d_ff, name="mlp", **mlp_kw)
        ac = model_lib.make_connection(cfg, 2 * self.index, "attn_conn")
        mc = model_lib.make_connection(cfg, 2 * self.index + 1, "mlp_conn")
        xs = [ac(x, lambda h: attn(attn_norm(h))) for x in xs]
        return [mc(x, lambda h: mlp(mlp_norm(h))) for x in xs]


class MBGroup(nn.Module):  # the unrolled model's group_j/block_j names: the same init
    config: object
    index: int

    @nn.compact
    def __call__(self, xs):
        return MBBlock(self.config, self.index, name=f"block_{self.index}")(xs)


def run_blocks_mb(config, x):
    xs = jnp.split(x, 2, axis=0) if x.shape[0] % 2 == 0 else [x]  # init runs one sequence
    for j in range(config.num_blocks):
        xs = MBGroup(config, j, name=f"group_{j}")(xs)
    return jnp.concatenate(xs, 0)


@contextlib.contextmanager
def patches(names):
    saved = []

    def setp(obj, attr, val):
        saved.append((obj, attr, getattr(obj, attr)))
        setattr(obj, attr, val)

    if "mb2" in names:
        import mhc_jax.connection_modules as cm

        sow = cm._sow_coefficients
        # the diagnostics expect one record per connection: keep micro-batch 0's
        setp(
            cm,
            "_sow_coefficients",
            lambda m, *a: None if m.has_variable("diagnostics", "coefficients") else sow(m, *a),
        )
        setp(model_lib, "run_blocks", run_blocks_mb)
    if "k1" in names:  # each Pallas kernel call on stream 1, glue on stream 0
        m = _common.mapping_op(
            "triton",
            on_s1(mapping_triton.fwd),
            on_s1(mapping_triton.coef_bwd),
            on_s1(mapping_triton.x_bwd),
            on_s1(pre_triton.weight_grad),
        )
        setp(mapping_triton, "mapping", m)
        setp(
            post_res_triton,
            "apply_post_res",
            _common.post_res_op(on_s1(post_res_triton.fwd), on_s1(post_res_triton.bwd)),
        )
    if "c1" in names:  # each connection op (kernels + glue) on stream 1
        op, opost = partitioned.mhc_pre, partitioned.post_res

        def pre(x, phi, bias, alpha, **kw):
            if kw.get("impl") == "xla":
                return op(x, phi, bias, alpha, **kw)
            return on_s1(op)(x, phi, bias, alpha, **kw)

        def post(h_res, h_post, x, f, **kw):
            if kw.get("impl") == "xla":
                return opost(h_res, h_post, x, f, **kw)
            return on_s1(opost)(h_res, h_post, x, f, **kw)

        setp(partitioned, "mhc_pre", pre)
        setp(partitioned, "post_res", post)
    try:
        yield
    finally:
        for obj, attr, val in reversed(saved):
            setattr(obj, attr, val)


def main(argv):
    rng = np.random.default_rng(0)
    B, S = so._BATCH.value, so._SEQ.value
    toks = rng.integers(0, 256, size=(B, S + 1)).astype(np.int32)
    batch_np = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "weights": np.ones((B, S), np.float32),
    }
    bw = so.copy_bandwidth(so._COPY_MIB.value)
    print(
        f"{jax.devices()[0].device_kind} jax {jax.__version__} copy {bw / 1e12:.2f} TB/s",
        flush=True,
    )
    rows = []
    for item in _PLAN.value:
        c, i, r, p = item.split(":")
        with patches(p.split("+")):
            try:
                row = so.run_variant(f"{c}:{i}:{r}", (-1, 1, 1), batch_np)
            except Exception as e:
                print(f"{item} failed: {e!r:.1500}", flush=True)
                continue
        row["variant"] = item
        rows.append(row)
        cats = row.get("profile", {}).get("by_category")
        print(
            f"{item}: {row['step_ms']:.1f} ms  mem {row['memory_gib']:.2f}  "
            f"loss {row['loss']:.5f} first {row['first_losses']}  cats {cats}",
            flush=True,
        )
    so.print_profiles(rows)
    base = rows[0]["step_ms"]
    print(f"\nshape {so._SHAPE.value} batch {B}")
    for row in rows:
        print(
            f"{row['variant']:34s} {row['step_ms']:8.1f} ms  {row['step_ms'] / base - 1:+7.1%}  "
            f"mem {row['memory_gib']:.2f}  loss@1 {row['first_losses'][-1]:.5f}"
        )
    if os.environ.get("OUT"):
        json.dump(
            rows,
            open(os.path.join(os.environ["OUT"], f"overlap_{so._SHAPE.value}.json"), "w"),
            indent=1,
        )


if __name__ == "__main__":
    app.run(main)
