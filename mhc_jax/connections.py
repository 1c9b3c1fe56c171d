"""Hyper-Connection (HC) and Manifold-Constrained HC (mHC) math on arrays.

Pure functions for SPEC §2-§4: the mappings (``mhc_mappings``, ``hc_mappings``),
``apply_pre``, ``apply_post_res`` and the residual init. The Linen modules that
own the parameters and wrap one sub-layer are in ``connection_modules.py``.
Coefficient math (``h_pre``, ``h_post``, ``h_res``) is fp32 whatever the
stream dtype; the apply functions return the stream dtype.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mhc_jax.sinkhorn import sinkhorn_knopp

F32 = jnp.float32
MHC_INITS = ("residual", "uniform")
RESIDUAL_SHARDS = ("hidden", "sequence")
ROUND_ROBIN_EPS = 0.01  # SPEC §4: the off-stream read weight of the residual init.
RES_DIAGONAL = 0.9  # SPEC §4: h_res diagonal at the residual init.


def check_streams(name: str, x: jax.Array) -> tuple[int, int]:
    if x.ndim < 2:
        raise ValueError(f"{name}: x must have shape (..., n, C), got {x.shape}")
    return x.shape[-2], x.shape[-1]


def _check_shape(fn: str, arg: str, value: jax.Array, expected: tuple) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{fn}: {arg} must have shape {tuple(expected)}, got {tuple(value.shape)}")


# ----------------------------------------------------------------------------- pure math


def mhc_mappings(
    x: jax.Array,
    phi: jax.Array,
    bias: jax.Array,
    alpha: jax.Array,
    *,
    num_iters: int = 20,
    norm_eps: float = 1e-6,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """mHC coefficients of SPEC §4.

    Args:
      x: (..., n, C) streams, any float dtype (bf16 in the paper).
      phi: (n*C, n*n + 2n) projection, columns [pre | post | res row-major].
      bias: (n*n + 2n,) biases in the same column order.
      alpha: (3,) scales of the pre, post and res logits.
      num_iters: Sinkhorn iterations.
      norm_eps: added to the mean square before the square root.

    Returns:
      h_pre (..., n) in (0, 1), h_post (..., n) in (0, 2), h_res (..., n, n)
      doubly stochastic; all fp32.
    """
    n, c = check_streams("mhc_mappings", x)
    width = n * n + 2 * n
    _check_shape("mhc_mappings", "phi", phi, (n * c, width))
    _check_shape("mhc_mappings", "bias", bias, (width,))
    _check_shape("mhc_mappings", "alpha", alpha, (3,))
    proj, mean_square = project_streams(x, phi)
    return mhc_coefficients(proj, mean_square, bias, alpha, num_iters=num_iters, norm_eps=norm_eps)


def mhc_mappings_and_pre(
    x: jax.Array,
    phi: jax.Array,
    bias: jax.Array,
    alpha: jax.Array,
    *,
    num_iters: int = 20,
    norm_eps: float = 1e-6,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``mhc_mappings`` then ``apply_pre``: (layer_input (..., C) in x.dtype, h_pre,
    h_post, h_res); the unfused counterpart of the fused kernel."""
    h_pre, h_post, h_res = mhc_mappings(x, phi, bias, alpha, num_iters=num_iters, norm_eps=norm_eps)
    return apply_pre(h_pre, x), h_pre, h_post, h_res


# The fp32 math over (..., n, C) below runs under jax.checkpoint: the backward pass
# recomputes the fp32 upcasts from the 16-bit streams instead of keeping them
# (4 bytes per stream element for every layer: more than the streams themselves).


@jax.checkpoint
def project_streams(x: jax.Array, phi: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(v @ phi, mean(v**2))`` of the flattened streams v = x (..., n*C), fp32."""
    v = x.reshape(*x.shape[:-2], -1).astype(F32)
    # Project first, divide by the RMS after: the paper's kernel order, equal to
    # normalising first (SPEC §4). One pass over v gives both reductions.
    proj = jnp.dot(v, phi.astype(F32), preferred_element_type=F32)
    return proj, jnp.mean(jnp.square(v), axis=-1, keepdims=True)


def mhc_coefficients(
    proj: jax.Array,
    mean_square: jax.Array,
    bias: jax.Array,
    alpha: jax.Array,
    *,
    num_iters: int = 20,
    norm_eps: float = 1e-6,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The second half of ``mhc_mappings``: from ``v @ phi`` and ``mean(v**2)`` to h_*.

    Split out so a tensor-parallel caller can ``psum`` partial projections and
    sums of squares over C shards before it (see ``mhc_jax.partitioned``).

    Args:
      proj: (..., n*n + 2n) fp32 projection ``v @ phi``.
      mean_square: (..., 1) fp32 mean of ``v**2`` over all n*C values.
      bias, alpha, num_iters, norm_eps: as in ``mhc_mappings``.
    """
    width = proj.shape[-1]
    n = math.isqrt(width + 1) - 1
    if n * n + 2 * n != width:
        raise ValueError(f"mhc_coefficients: proj width must be n*n + 2n, got {width}")
    raw = proj / jnp.sqrt(mean_square + norm_eps)
    alpha = alpha.astype(F32)
    scale = jnp.concatenate(
        [jnp.full((n,), alpha[0]), jnp.full((n,), alpha[1]), jnp.full((n * n,), alpha[2])]
    )
    t = raw * scale + bias.astype(F32)
    h_pre = jax.nn.sigmoid(t[..., :n])
    h_post = 2.0 * jax.nn.sigmoid(t[..., n : 2 * n])
    h_res = sinkhorn_knopp(t[..., 2 * n :].reshape(*t.shape[:-1], n, n), num_iters)
    return h_pre, h_post, h_res


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
    _check_shape("hc_mappings", "b_pre", b_pre, (n,))
    _check_shape("hc_mappings", "b_post", b_post, (n,))
    _check_shape("hc_mappings", "b_res", b_res, (n, n))
    batch = x.shape[:-2]
    h_pre = jnp.broadcast_to(b_pre.astype(F32), (*batch, n))
    h_post = jnp.broadcast_to(b_post.astype(F32), (*batch, n))
    a_res = jnp.broadcast_to(b_res.astype(F32), (*batch, n, n))
    if dynamic is not None:
        for name, shape in zip(HCDynamicParams._fields, [(c,), (c,), (c,), (c, n), (), ()]):
            _check_shape("hc_mappings", f"dynamic.{name}", getattr(dynamic, name), shape)
        d_pre, d_post, d_res = _hc_dynamic(x, dynamic, norm_eps)
        h_pre, h_post, a_res = h_pre + d_pre, h_post + d_post, a_res + d_res
    return h_pre, h_post, jnp.swapaxes(a_res, -1, -2)


@functools.partial(jax.checkpoint, static_argnums=2)  # see project_streams
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


def apply_pre(h_pre: jax.Array, x: jax.Array) -> jax.Array:
    """``layer_input = sum_i h_pre[i] x[i]``: (..., n), (..., n, C) -> (..., C) in x.dtype."""
    n, _ = check_streams("apply_pre", x)
    _check_shape("apply_pre", "h_pre", h_pre, (*x.shape[:-2], n))
    return _apply_pre(h_pre, x)


@jax.checkpoint  # see project_streams
def _apply_pre(h_pre: jax.Array, x: jax.Array) -> jax.Array:
    # Broadcast-multiply then reduce: XLA fuses it into one pass over x (an
    # einsum here lowers to a batched matmul that is about 2x slower on GPU).
    out = jnp.sum(h_pre[..., :, None].astype(F32) * x.astype(F32), axis=-2)
    return out.astype(x.dtype)


def apply_post_res(h_res: jax.Array, h_post: jax.Array, x: jax.Array, f: jax.Array) -> jax.Array:
    """``x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] f``.

    Args:
      h_res: (..., n, n); h_post: (..., n); x: (..., n, C); f: (..., C).

    Returns:
      (..., n, C) in x.dtype.
    """
    n, c = check_streams("apply_post_res", x)
    batch = x.shape[:-2]
    _check_shape("apply_post_res", "h_res", h_res, (*batch, n, n))
    _check_shape("apply_post_res", "h_post", h_post, (*batch, n))
    _check_shape("apply_post_res", "f", f, (*batch, c))
    return _apply_post_res(h_res, h_post, x, f)


@jax.checkpoint  # see project_streams
def _apply_post_res(h_res, h_post, x, f):
    mixed = jnp.sum(h_res[..., :, :, None].astype(F32) * x[..., None, :, :].astype(F32), axis=-2)
    out = mixed + h_post[..., :, None].astype(F32) * f[..., None, :].astype(F32)
    return out.astype(x.dtype)


def residual_init_bias(n: int, layer_index: int) -> jax.Array:
    """mHC bias of ``init="residual"`` (SPEC §4) for layer ``layer_index``: (n*n + 2n,) fp32.

    h_pre reads stream ``layer_index mod n`` with weight 1-(n-1)eps and the others
    with eps; h_post = 1; h_res has RES_DIAGONAL on its diagonal. At n = 1 the
    target weight 1 has no finite logit, so the one stream gets 1 - eps instead.
    """
    eps = ROUND_ROBIN_EPS
    p_on = 1.0 - (n - 1) * eps if n > 1 else 1.0 - eps
    on, off = math.log(p_on / (1 - p_on)), math.log(eps / (1 - eps))
    pre = jnp.full((n,), off, F32).at[layer_index % n].set(on)
    # A constant off-diagonal makes exp(t) doubly stochastic up to scale, so the
    # diagonal is exactly e^d / (e^d + n - 1) = RES_DIAGONAL after Sinkhorn.
    d = math.log(RES_DIAGONAL * (n - 1) / (1 - RES_DIAGONAL)) if n > 1 else 0.0
    res = d * jnp.eye(n, dtype=F32)
    return jnp.concatenate([pre, jnp.zeros((n,), F32), res.reshape(-1)])
