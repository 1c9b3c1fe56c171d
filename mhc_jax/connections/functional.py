"""Hyper-Connection (HC) and Manifold-Constrained HC (mHC) math on arrays.

Pure functions for SPEC §2-§4: the mappings (``mhc_mappings``, ``hc_mappings``),
``apply_pre``, ``apply_post_res`` and the residual init. The mHC math lives beside
the kernels it is the reference of (``pallas_kernels.mhc.reference``, so that the
kernel package imports nothing of this library) and is exposed here; HC's math and
the inits are this module's own. The Linen modules that own the parameters and wrap
one sub-layer are in ``modules.py``. Coefficient math (``h_pre``,
``h_post``, ``h_res``) is fp32 whatever the stream dtype; the apply functions return
the stream dtype.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.mhc import variants
from pallas_kernels.mhc.reference import (
    apply_post_res,
    apply_pre,
    check_shape,
    check_streams,
    mhc_coefficients,
    mhc_mappings,
    mhc_mappings_and_pre,
    project_streams,
)

__all__ = [
    "MHC_INITS",
    "MHC_VARIANTS",
    "RESIDUAL_SHARDS",
    "HCDynamicParams",
    "apply_post_res",
    "apply_pre",
    "check_streams",
    "hc_mappings",
    "mhc_coefficients",
    "mhc_mappings",
    "mhc_mappings_and_pre",
    "project_streams",
    "residual_init_bias",
    "stream_head",
]

F32 = jnp.float32
MHC_INITS = ("residual", "uniform")
MHC_VARIANTS = variants.VARIANTS  # the coefficient math: "paper", "deepseek_v4", "lite"
RESIDUAL_SHARDS = ("hidden", "sequence")
ROUND_ROBIN_EPS = 0.01  # SPEC §4: the off-stream read weight of the residual init.
RES_DIAGONAL = 0.9  # SPEC §4: h_res diagonal at the residual init.


class HCDynamicParams(NamedTuple):
    """Dynamic part of HC (SPEC §3); shapes for n streams of width C."""

    norm_scale: jax.Array  # (C,) scale of the per-stream RMSNorm
    w_pre: jax.Array  # (C,)
    w_post: jax.Array  # (C,)
    w_res: jax.Array  # (C, n)
    s_alpha: jax.Array  # () scale of the pre and res terms
    s_beta: jax.Array  # () scale of the post term


def hc_mappings(
    x: jax.Array,
    b_pre: jax.Array,
    b_post: jax.Array,
    b_res: jax.Array,
    dynamic: HCDynamicParams | None = None,
    *,
    norm_eps: float = 1e-6,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """HC coefficients of SPEC §3, static (``dynamic=None``) or dynamic.

    Args:
      x: (..., n, C) streams.
      b_pre, b_post: (n,) static parts; b_res: (n, n) static A_r (row i: stream i).
      dynamic: the dynamic weights, or None for static HC.
      norm_eps: epsilon of the per-stream RMSNorm.

    Returns:
      h_pre (..., n), h_post (..., n), h_res (..., n, n) fp32, with h_res already
      transposed (``h_res = A_r^T``) so that ``x_next[i] = sum_j h_res[i, j] x[j]``.
    """
    n, c = check_streams("hc_mappings", x)
    check_shape("hc_mappings", "b_pre", b_pre, (n,))
    check_shape("hc_mappings", "b_post", b_post, (n,))
    check_shape("hc_mappings", "b_res", b_res, (n, n))
    batch = x.shape[:-2]
    h_pre = jnp.broadcast_to(b_pre.astype(F32), (*batch, n))
    h_post = jnp.broadcast_to(b_post.astype(F32), (*batch, n))
    a_res = jnp.broadcast_to(b_res.astype(F32), (*batch, n, n))
    if dynamic is not None:
        for name, shape in zip(HCDynamicParams._fields, [(c,), (c,), (c,), (c, n), (), ()]):
            check_shape("hc_mappings", f"dynamic.{name}", getattr(dynamic, name), shape)
        d_pre, d_post, d_res = _hc_dynamic(x, dynamic, norm_eps)
        h_pre, h_post, a_res = h_pre + d_pre, h_post + d_post, a_res + d_res
    return h_pre, h_post, jnp.swapaxes(a_res, -1, -2)


# under jax.checkpoint, as project_streams: the backward recomputes the fp32 upcasts
@functools.partial(jax.checkpoint, static_argnums=2)
def _hc_dynamic(x: jax.Array, dynamic: HCDynamicParams, norm_eps: float):
    """HC's input-dependent terms (..., n), (..., n), (..., n, n) in fp32."""
    xf = x.astype(F32)
    xn = xf * lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + norm_eps)
    xn = xn * dynamic.norm_scale.astype(F32)
    s_a, s_b = dynamic.s_alpha.astype(F32), dynamic.s_beta.astype(F32)
    return (
        s_a * jnp.tanh(xn @ dynamic.w_pre.astype(F32)),
        s_b * jnp.tanh(xn @ dynamic.w_post.astype(F32)),
        s_a * jnp.tanh(xn @ dynamic.w_res.astype(F32)),
    )


def residual_init_bias(n: int, layer_index: int, variant: str = "paper") -> jax.Array:
    """mHC bias of the residual init (``model.mhc_init="residual"``, SPEC §4) for layer
    ``layer_index``: (K,) fp32, K = ``variants.width(n, variant)``.

    h_pre reads stream ``layer_index mod n`` with weight 1-(n-1)eps and the others
    with eps; h_post = 1; h_res has RES_DIAGONAL on its diagonal. At n = 1 the
    target weight 1 has no finite logit, so the one stream gets 1 - eps instead.
    """
    eps = ROUND_ROBIN_EPS
    p_on = 1.0 - (n - 1) * eps if n > 1 else 1.0 - eps
    on, off = math.log(p_on / (1 - p_on)), math.log(eps / (1 - eps))
    pre = jnp.full((n,), off, F32).at[layer_index % n].set(on)
    res = variants.residual_init_res(n, variant, RES_DIAGONAL)
    return jnp.concatenate([pre, jnp.zeros((n,), F32), res])


def stream_head(
    x: jax.Array,
    phi: jax.Array,
    bias: jax.Array,
    scale: jax.Array,
    *,
    norm_eps: float = 1e-6,
    eps: float = variants.DEEPSEEK_V4_EPS,
) -> jax.Array:
    """DeepSeek-V4's input-dependent collapse of the streams before the final norm
    (SPEC §2, ``stream_reduce="learned"``): ``sum_i w[i] x[i]`` with
    ``w = sigmoid(scale * (v @ phi) / rms(v) + bias) + eps``, v the n*C flattened
    streams and ``rms(v) = sqrt(mean(v**2) + norm_eps)``.

    Args:
      x: (..., n, C) streams.
      phi: (n*C, n) projection (V4's ``hc_head_fn`` transposed); bias: (n,) (its
        ``hc_head_base``); scale: (1,) (its ``hc_head_scale``).

    Returns:
      (..., C) in x.dtype; the weights are fp32.
    """
    n, c = check_streams("stream_head", x)
    check_shape("stream_head", "phi", phi, (n * c, n))
    check_shape("stream_head", "bias", bias, (n,))
    check_shape("stream_head", "scale", scale, (1,))
    proj, mean_square = project_streams(x, phi)
    logits = proj * lax.rsqrt(mean_square + norm_eps) * scale.astype(F32) + bias.astype(F32)
    return apply_pre(jax.nn.sigmoid(logits) + eps, x)
