"""Residual, HC and mHC connections as Linen modules around one sub-layer ``F``.

The modules own the parameters; the math is ``functional.py``'s pure functions
(mHC's through ``partitioned.py``, which picks the kernels and the mesh layout):

    x_next = connection(x, branch)      # x: (..., n, C), branch: (..., C) -> (..., C)

Every module has this one interface, so a transformer block takes any of them.
Each tags what it computes around F with checkpoint names that ``remat.py``'s
policies select.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mhc_jax.connections import partitioned
from mhc_jax.connections.functional import (
    MHC_INITS,
    HCDynamicParams,
    apply_post_res,
    apply_pre,
    check_streams,
    hc_mappings,
    residual_init_bias,
    stream_head,
)
from pallas_kernels.mhc import backends, variants
from pallas_kernels.mhc.context import MappingConfig, MappingWeights, Pending

F32 = jnp.float32

Branch = Callable[[jax.Array], jax.Array]
BRANCH_OUTPUT = "branch_out"  # checkpoint name of every sub-layer output F(.) (remat.py)
# Checkpoint name of what a connection computes around F: its output streams,
# layer input and coefficients (remat.py's "save_connections" keeps them).
CONNECTION_OUTPUT = "connection_out"


def defers_post_res(impl: str, n: int) -> bool:
    """Whether mHC layers with these kernels hand a ``Pending`` on (``defer_post_res``):
    where ``impl`` runs a kernel backend for the transition between layers, which
    Mosaic GPU fuses into one pass over the streams (the others run the same two ops
    in turn)."""
    return backends.chain(backends.resolve(impl, n), "transition")[0] != backends.Impl.XLA


def _param_init(init, axes: tuple):
    return nn.with_logical_partitioning(init, axes)


def _run_branch(branch: Branch, layer_input: jax.Array) -> jax.Array:
    return checkpoint_name(branch(checkpoint_name(layer_input, CONNECTION_OUTPUT)), BRANCH_OUTPUT)


def _named(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(checkpoint_name(a, CONNECTION_OUTPUT) for a in arrays)


def _sow_coefficients(module: nn.Module, h_pre, h_post, h_res) -> None:
    """Records token-averaged coefficients for diagnostics (SPEC §6); no-op unless
    the 'diagnostics' collection is mutable."""
    axes = tuple(range(h_pre.ndim - 1))
    row_err = jnp.max(jnp.abs(jnp.sum(h_res, axis=-1) - 1.0))
    col_err = jnp.max(jnp.abs(jnp.sum(h_res, axis=-2) - 1.0))
    stats = {
        "h_pre": jnp.mean(h_pre, axis=axes),
        "h_post": jnp.mean(h_post, axis=axes),
        "h_res": jnp.mean(h_res, axis=axes),
        "res_row_err": row_err,
        "res_col_err": col_err,
    }
    module.sow("diagnostics", "coefficients", stats)


class Residual(nn.Module):
    """Plain residual ``x + F(x)`` on a single stream (x: (..., 1, C))."""

    @nn.compact
    def __call__(self, x: jax.Array, branch: Branch) -> jax.Array:
        if x.shape[-2] != 1:
            raise ValueError(f"Residual: expects n = 1 stream, got x.shape={x.shape}")
        return _named(x + _run_branch(branch, x[..., 0, :])[..., None, :].astype(x.dtype))[0]


class HyperConnection(nn.Module):
    """HC (Zhu et al.) around one sub-layer; static or dynamic (SPEC §3).

    Attributes:
      layer_index: sub-layer index k; the static pre reads stream k mod n.
      dynamic: adds the input-dependent tanh terms.
      scale_init: init of s_alpha and s_beta.
      norm_eps: epsilon of the per-stream RMSNorm.
    """

    layer_index: int
    dynamic: bool = True
    scale_init: float = 0.01
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, branch: Branch) -> jax.Array:
        n, c = check_streams("HyperConnection", x)
        k = self.layer_index
        streams, pair = ("streams",), ("streams", "streams_out")
        b_pre = self.param(
            "b_pre", _param_init(lambda *_: jax.nn.one_hot(k % n, n, dtype=F32), streams)
        )
        b_post = self.param("b_post", _param_init(lambda *_: jnp.ones((n,), F32), streams))
        b_res = self.param("b_res", _param_init(lambda *_: jnp.eye(n, dtype=F32), pair))
        dyn = None
        if self.dynamic:
            zeros = nn.initializers.zeros_init()
            scale = nn.initializers.constant(self.scale_init)
            ones = nn.initializers.ones_init()
            dyn = HCDynamicParams(
                norm_scale=self.param("norm_scale", _param_init(ones, ("norm",)), (c,), F32),
                w_pre=self.param("w_pre", _param_init(zeros, ("embed",)), (c,), F32),
                w_post=self.param("w_post", _param_init(zeros, ("embed",)), (c,), F32),
                w_res=self.param("w_res", _param_init(zeros, ("embed", "streams")), (c, n), F32),
                s_alpha=self.param("s_alpha", scale, (), F32),
                s_beta=self.param("s_beta", scale, (), F32),
            )
        h_pre, h_post, h_res = hc_mappings(x, b_pre, b_post, b_res, dyn, norm_eps=self.norm_eps)
        h_pre, h_post, h_res = _named(h_pre, h_post, h_res)
        _sow_coefficients(self, h_pre, h_post, h_res)
        f = _run_branch(branch, apply_pre(h_pre, x))
        return _named(apply_post_res(h_res, h_post, x, f))[0]


class ManifoldHyperConnection(nn.Module):
    """mHC (Xie et al.) around one sub-layer (SPEC §4).

    ``phi`` is stored as (n, C, K), the row-major reshape of SPEC's (n*C, K), so that
    its C axis can be sharded like the streams' C; K = n*n + 2n (2n + n! for "lite").

    Attributes:
      layer_index: sub-layer index k (used by the residual init).
      num_iters: Sinkhorn iterations.
      norm_eps: epsilon of the RMS over the n*C flattened streams.
      init_scheme: "residual" (starts as a pre-norm residual network) or "uniform"
        (all biases 0); not ``init``, which would hide ``nn.Module.init``.
      variant: the coefficient math, "paper" (SPEC §4-5), "deepseek_v4" (DeepSeek-V4's
        eps terms) or "lite" (mHC-lite: h_res a convex combination of the n!
        permutations, n <= 4); see ``pallas_kernels.mhc.variants``. The kernels take
        "paper" and "deepseek_v4"; "lite" runs the mapping on the XLA path.
      alpha_init: init of the three logit scales.
      impl: an mHC implementation (``pallas_kernels.mhc.backends``): "auto" (the
        platform's kernels where they take the input, pure jnp elsewhere), "xla",
        "pallas", a kernel backend or its "*_interpret" variant.
      residual_shard: the streams' layout on a mesh's ``tensor`` axis, "hidden"
        (C split) or "sequence" (T split); read only when a mesh is active.
      defer_post_res: return ``Pending(ctx, f)`` instead of x_next, for the next mHC
        layer to run this post-res fused with its own mapping + pre
        (``partitioned.transition``); the input may be a Pending either way.
    """

    layer_index: int
    num_iters: int = 20
    norm_eps: float = 1e-6
    init_scheme: str = "residual"
    variant: str = "paper"
    alpha_init: float = 0.01
    impl: str = "auto"
    residual_shard: str = "hidden"
    defer_post_res: bool = False

    @nn.compact
    def __call__(self, x: jax.Array | Pending, branch: Branch) -> jax.Array | Pending:
        n, c = check_streams(
            "ManifoldHyperConnection", x.ctx.streams if isinstance(x, Pending) else x
        )
        if self.init_scheme not in MHC_INITS:
            raise ValueError(
                f"ManifoldHyperConnection.init_scheme must be one of {MHC_INITS}, "
                f"got {self.init_scheme!r}"
            )
        variants.check(self.variant, n, name="ManifoldHyperConnection.variant")
        width = variants.width(n, self.variant)
        zeros = nn.initializers.zeros_init()
        phi = self.param("phi", _param_init(zeros, ("streams", "embed", "coeffs")), (n, c, width))
        if self.init_scheme == "residual":
            init_bias = lambda *_: residual_init_bias(n, self.layer_index, self.variant)
        else:
            init_bias = lambda *_: jnp.zeros((width,), F32)
        bias = self.param("bias", _param_init(init_bias, ("coeffs",)))
        alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), (3,), F32)
        # At init only shapes matter: pure jnp, unpartitioned (the dummy batch need
        # not divide the mesh, and no kernel is compiled).
        init = self.is_initializing()
        layout: dict[str, Any] = dict(
            impl="xla" if init else self.impl, residual_shard=self.residual_shard, on_mesh=not init
        )
        weights = MappingWeights(phi, bias, alpha)
        config = MappingConfig(self.num_iters, self.norm_eps, self.variant)
        if isinstance(x, Pending):
            layer_input, ctx = partitioned.transition(x, weights, config, **layout)
            ctx = ctx._replace(streams=_named(ctx.streams)[0])  # x_next, as post-res names it
        else:
            layer_input, ctx = partitioned.mhc_pre(x, weights, config, **layout)
        ctx = ctx._replace(**dict(zip(("h_pre", "h_post", "h_res"), _named(*ctx[:3]))))
        _sow_coefficients(self, ctx.h_pre, ctx.h_post, ctx.h_res)
        f = _run_branch(branch, layer_input)
        if self.defer_post_res:
            return Pending(ctx, f)
        return _named(partitioned.post_res(ctx, f, **layout))[0]


class StreamHead(nn.Module):
    """DeepSeek-V4's collapse of the streams (``stream_reduce="learned"``): (..., n, C)
    -> (..., C) by ``connections.stream_head``. phi (stored (n, C, n), C sharded like the
    streams') and bias start at 0, so the head starts as (0.5 + 1e-6) times the sum.

    Attributes:
      norm_eps: epsilon of the RMS over the n*C flattened streams.
      scale_init: init of the logit scale.
    """

    norm_eps: float = 1e-6
    scale_init: float = 0.01

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, c = check_streams("StreamHead", x)
        zeros = nn.initializers.zeros_init()
        axes = ("streams", "embed", "coeffs")
        phi = self.param("phi", _param_init(zeros, axes), (n, c, n), F32)
        bias = self.param("bias", zeros, (n,), F32)
        scale = self.param("scale", nn.initializers.constant(self.scale_init), (1,), F32)
        return stream_head(x, phi.reshape(n * c, n), bias, scale, norm_eps=self.norm_eps)
