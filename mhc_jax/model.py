"""Decoder-only transformer LM whose sub-layers are wrapped by residual, HC or mHC.

Data path (SPEC §1-§2):

    tokens (B, T) -> embedding (B, T, C) -> copy into n streams (B, T, n, C)
    -> N blocks; each block = [attention, MLP] sub-layers, each wrapped by its own
       connection (mapping -> pre -> F = norm + attention/MLP -> post-res)
    -> reduce streams (B, T, C) -> final RMSNorm -> LM head -> logits (B, T, V) fp32

``connection="residual"`` needs n = 1. With ``connection="hc"`` or ``"mhc"`` and
n = 1 the model keeps the connection's learned coefficients on one stream: HC's
static part is then exactly the residual and its dynamic part adds tanh gates;
mHC's h_res is exactly 1 and h_pre, h_post become learned sigmoid gates (its
residual init reads the stream with weight 1 - 0.01, SPEC §4 having no finite
logit for 1). This matches the HC paper's "n = 1" ablation row.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mhc_jax import remat as remat_lib
from mhc_jax.connections import modules as connection_modules
from mhc_jax.connections import partitioned
from mhc_jax.connections.modules import (
    HyperConnection,
    ManifoldHyperConnection,
    Residual,
    StreamHead,
)
from mhc_jax.layers import CausalSelfAttention, RMSNorm, SwiGLU
from mhc_jax.model_config import ModelConfig
from mhc_jax.sharding import strip_boxes
from pallas_kernels.mhc.context import Pending


def make_connection(config: ModelConfig, layer_index: int, name: str) -> nn.Module:
    """The connection module wrapping sub-layer ``layer_index``."""
    if config.connection == "residual":
        return Residual(name=name)
    if config.connection == "hc":
        return HyperConnection(
            layer_index=layer_index,
            dynamic=config.hc_dynamic,
            scale_init=config.hc_scale_init,
            norm_eps=config.norm_eps,
            name=name,
        )
    return ManifoldHyperConnection(
        layer_index=layer_index,
        num_iters=config.sinkhorn_iters,
        norm_eps=config.mhc_norm_eps,
        init_scheme=config.mhc_init,
        variant=config.mhc_variant,
        alpha_init=config.mhc_alpha_init,
        impl=config.impl,
        residual_shard=config.residual_shard,
        defer_post_res=defers_post_res(config),
        name=name,
    )


def defers_post_res(config: ModelConfig) -> bool:
    """Whether the mHC layers hand each other a ``Pending`` (``mhc_fuse_transitions``:
    the kernels' fused transition between layers; see
    ``connections.modules.defers_post_res``). Unscanned models only: under ``nn.scan`` a
    Pending carry fails Flax's check that no broadcast value depends on the scan body,
    so scanned stacks run post-res in each layer."""
    return (
        config.connection == "mhc"
        and config.mhc_fuse_transitions
        and config.mhc_variant != "lite"  # no kernels for lite: its mapping runs on XLA
        and not config.scan_layers
        and connection_modules.defers_post_res(config.impl, config.n)
    )


class Block(nn.Module):
    """Attention and MLP sub-layers, each wrapped by its connection: (B, T, n, C) -> same
    (or a ``Pending`` in and out, when the mHC layers defer their post-res)."""

    config: ModelConfig
    index: int

    @nn.compact
    def __call__(self, x: jax.Array | Pending) -> jax.Array | Pending:
        cfg = self.config
        kw: dict[str, Any] = dict(dtype=cfg.activation_dtype, param_dtype=cfg.weight_dtype)
        out_std = cfg.init_std / (math.sqrt(cfg.n) if cfg.scale_output_init else 1.0)
        mlp_kw: dict[str, Any] = dict(init_std=cfg.init_std, out_init_std=out_std, **kw)
        attn_norm = RMSNorm(cfg.norm_eps, name="attn_norm", **kw)
        attn = CausalSelfAttention(
            cfg.num_heads, cfg.attention, cfg.rope_base, name="attn", **mlp_kw
        )
        mlp_norm = RMSNorm(cfg.norm_eps, name="mlp_norm", **kw)
        mlp = SwiGLU(cfg.d_ff, name="mlp", **mlp_kw)
        x = make_connection(cfg, 2 * self.index, "attn_conn")(x, lambda h: attn(attn_norm(h)))
        return make_connection(cfg, 2 * self.index + 1, "mlp_conn")(x, lambda h: mlp(mlp_norm(h)))


STREAM_AXES = ("batch", "seq", "streams", "act_embed")


def _constrain(x: jax.Array | Pending) -> jax.Array | Pending:
    """The streams' logical sharding, on x or on a Pending's input streams."""
    if isinstance(x, Pending):
        ctx = x.ctx._replace(streams=nn.with_logical_constraint(x.ctx.streams, STREAM_AXES))
        return x._replace(ctx=ctx)
    return nn.with_logical_constraint(x, STREAM_AXES)


class BlockGroup(nn.Module):
    """``size`` consecutive blocks starting at ``first``: (B, T, n, C) -> same.

    The unit of rematerialisation and of ``nn.scan``; the signature
    ``(x, _) -> (x, None)`` is the one ``nn.scan`` needs.
    """

    config: ModelConfig
    first: int
    size: int
    remat_each_block: bool = False

    @nn.compact
    def __call__(self, x: jax.Array | Pending, _=None):
        block_cls = Block
        if self.remat_each_block:
            block_cls = nn.remat(Block, policy=remat_lib.checkpoint_policy(self.config.remat))
        for j in range(self.first, self.first + self.size):
            x = _constrain(block_cls(self.config, j, name=f"block_{j}")(x))
        return x, None


def run_blocks(config: ModelConfig, x: jax.Array, initializing: bool = False) -> jax.Array:
    """All blocks, grouped for rematerialisation and optionally scanned (call from a
    compact method: the groups become submodules of the caller).

    With the kernels' fused transitions (``defers_post_res``) the blocks carry a
    ``Pending`` from the first mHC layer on, and the last layer's post-res runs here."""
    per_group = config.blocks_per_group
    group_remat = config.remat != "none" and per_group > 1
    policy = remat_lib.checkpoint_policy(config.remat)
    remat_blocks = config.remat != "none" and not group_remat
    group_cls = (
        nn.remat(BlockGroup, policy=policy, prevent_cse=not config.scan_layers)
        if group_remat
        else BlockGroup
    )
    if config.scan_layers:
        unit = config.scan_unit
        scanned = nn.scan(
            group_cls,
            variable_axes={"params": 0, "diagnostics": 0, "intermediates": 0, "cache": 0},
            split_rngs={"params": True},
            length=config.num_blocks // unit,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = scanned(config, 0, unit, remat_blocks, name="scan")(x, None)
    else:
        for g, first in enumerate(range(0, config.num_blocks, per_group)):
            size = min(per_group, config.num_blocks - first)
            x, _ = group_cls(config, first, size, remat_blocks, name=f"group_{g}")(x)
    if isinstance(x, Pending):
        impl = "xla" if initializing else config.impl
        x = partitioned.post_res(
            *x, impl=impl, residual_shard=config.residual_shard, on_mesh=not initializing
        )
    return x


class LM(nn.Module):
    """The language model: tokens (B, T) int32 -> logits (B, T, vocab_size) fp32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(cfg.init_std), ("vocab", "embed")
            ),
            dtype=cfg.activation_dtype,
            param_dtype=cfg.weight_dtype,
            name="embed",
        )
        h = embed(tokens)
        x = jnp.broadcast_to(h[..., None, :], (*h.shape[:-1], cfg.n, cfg.d_model))
        x = run_blocks(cfg, nn.with_logical_constraint(x, STREAM_AXES), self.is_initializing())
        h = self.reduce_streams(x)
        h = RMSNorm(cfg.norm_eps, cfg.activation_dtype, cfg.weight_dtype, name="final_norm")(h)
        if cfg.tie_embeddings:
            logits = embed.attend(h)
        else:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.normal(cfg.init_std), ("embed", "vocab")
                ),
                dtype=cfg.activation_dtype,
                param_dtype=cfg.weight_dtype,
                name="lm_head",
            )(h)
        return logits.astype(jnp.float32)

    def reduce_streams(self, x: jax.Array) -> jax.Array:
        """(B, T, n, C) -> (B, T, C) by the configured stream reduction."""
        mode = self.config.stream_reduce
        if mode == "sum":
            return jnp.sum(x, axis=-2, dtype=x.dtype)
        if mode == "mean":
            return jnp.mean(x, axis=-2, dtype=x.dtype)
        cfg = self.config
        return StreamHead(cfg.mhc_norm_eps, cfg.mhc_alpha_init, name="stream_head")(x)


def init_params(
    config: ModelConfig, rng: jax.Array, seq_len: int = 8, *, boxed: bool = False
) -> dict:
    """Initial parameters of ``LM(config)`` (a pytree of ``param_dtype`` arrays).

    With ``boxed=True`` they stay wrapped in Flax's ``LogicallyPartitioned`` boxes, which
    carry each parameter's logical axes (for ``sharding.tree_shardings``).
    """
    params = LM(config).init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return params if boxed else strip_boxes(params)


def count_params(params) -> dict[str, int]:
    """Parameter counts: ``total`` and ``connections`` (connection modules + stream head)."""
    total, conn = 0, 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [getattr(k, "key", str(k)) for k in path]
        total += leaf.size
        if any(k.endswith("_conn") or k.startswith("stream_head") for k in keys):
            conn += leaf.size
    return {"total": total, "connections": conn}
