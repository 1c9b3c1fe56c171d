"""The mHC math of SPEC §4-§7.3 on arrays: the XLA path of every op and the reference
the kernels are tested against.

``mhc_mappings`` (the coefficients), ``apply_pre``, ``mhc_mappings_and_pre`` and
``apply_post_res`` are pure jnp; the library (``mhc_jax.connections``) exposes them and
adds HC's math and the inits. Coefficient math (``h_pre``, ``h_post``, ``h_res``) is
fp32 whatever the stream dtype; the apply functions return the stream dtype. For the
tests this module adds a plainly unrolled Sinkhorn in the log domain (so that autodiff,
e.g. in float64, gives the exact reference gradient at any logit scale) and the
converged-iterate approximation of the Sinkhorn gradient (the shortcut the kernels do
not take; tests contrast it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.mhc import variants
from pallas_kernels.mhc.sinkhorn import sinkhorn_knopp

F32 = jnp.float32


def check_streams(name: str, x: jax.Array) -> tuple[int, int]:
    """(n, C) of (..., n, C) streams; ValueError naming ``name`` for fewer axes."""
    if x.ndim < 2:
        raise ValueError(f"{name}: x must have shape (..., n, C), got {x.shape}")
    return x.shape[-2], x.shape[-1]


def check_shape(fn: str, arg: str, value: jax.Array, expected: tuple) -> None:
    """ValueError naming ``fn`` and ``arg`` unless ``value`` has shape ``expected``."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{fn}: {arg} must have shape {tuple(expected)}, got {tuple(value.shape)}")


def mhc_mappings(
    x: jax.Array,
    phi: jax.Array,
    bias: jax.Array,
    alpha: jax.Array,
    *,
    num_iters: int = 20,
    norm_eps: float = 1e-6,
    variant: str = "paper",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """mHC coefficients of SPEC §4.

    Args:
      x: (..., n, C) streams, any float dtype (bf16 in the paper).
      phi: (n*C, K) projection, columns [pre | post | res row-major]; K = n*n + 2n
        (2n + n! for variant "lite": ``variants.width``).
      bias: (K,) biases in the same column order.
      alpha: (3,) scales of the pre, post and res logits.
      num_iters: Sinkhorn iterations.
      norm_eps: added to the mean square before the square root.
      variant: "paper", "deepseek_v4" or "lite" (``variants``).

    Returns:
      h_pre (..., n) in (0, 1), h_post (..., n) in (0, 2), h_res (..., n, n)
      doubly stochastic; all fp32.
    """
    n, c = check_streams("mhc_mappings", x)
    width = variants.width(n, variants.check(variant, n, name="mhc_mappings: variant"))
    check_shape("mhc_mappings", "phi", phi, (n * c, width))
    check_shape("mhc_mappings", "bias", bias, (width,))
    check_shape("mhc_mappings", "alpha", alpha, (3,))
    proj, mean_square = project_streams(x, phi)
    return mhc_coefficients(
        proj, mean_square, bias, alpha, num_iters=num_iters, norm_eps=norm_eps, variant=variant
    )


def mhc_mappings_and_pre(
    x: jax.Array,
    phi: jax.Array,
    bias: jax.Array,
    alpha: jax.Array,
    *,
    num_iters: int = 20,
    norm_eps: float = 1e-6,
    variant: str = "paper",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``mhc_mappings`` then ``apply_pre``: (layer_input (..., C) in x.dtype, h_pre,
    h_post, h_res); the unfused counterpart of the fused kernel."""
    h_pre, h_post, h_res = mhc_mappings(
        x, phi, bias, alpha, num_iters=num_iters, norm_eps=norm_eps, variant=variant
    )
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
    variant: str = "paper",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The second half of ``mhc_mappings``: from ``v @ phi`` and ``mean(v**2)`` to h_*.

    Split out so a tensor-parallel caller can ``psum`` partial projections and
    sums of squares over C shards before it (see ``mhc_jax.connections.partitioned``).

    Args:
      proj: (..., K) fp32 projection ``v @ phi``.
      mean_square: (..., 1) fp32 mean of ``v**2`` over all n*C values.
      bias, alpha, num_iters, norm_eps, variant: as in ``mhc_mappings``.
    """
    variants.check(variant, name="mhc_coefficients: variant")
    try:
        n = variants.streams_of_width(proj.shape[-1], variant)
    except ValueError as e:
        raise ValueError(f"mhc_coefficients: proj: {e}") from None
    variants.check(variant, n, name="mhc_coefficients: variant")
    raw = proj / jnp.sqrt(mean_square + norm_eps)
    alpha = alpha.astype(F32)
    groups = (n, n, variants.res_width(n, variant))
    scale = jnp.concatenate([jnp.full((w,), alpha[g]) for g, w in enumerate(groups)])
    t = raw * scale + bias.astype(F32)
    return variants.coefficients(t, n, variant, num_iters)


def apply_pre(h_pre: jax.Array, x: jax.Array) -> jax.Array:
    """``layer_input = sum_i h_pre[i] x[i]``: (..., n), (..., n, C) -> (..., C) in x.dtype."""
    n, _ = check_streams("apply_pre", x)
    check_shape("apply_pre", "h_pre", h_pre, (*x.shape[:-2], n))
    return _apply_pre(h_pre, x)


@jax.checkpoint  # see project_streams
def _apply_pre(h_pre: jax.Array, x: jax.Array) -> jax.Array:
    # Broadcast-multiply then reduce: XLA fuses it into one pass over x (an
    # einsum here lowers to a batched matmul, slower on GPU).
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
    check_shape("apply_post_res", "h_res", h_res, (*batch, n, n))
    check_shape("apply_post_res", "h_post", h_post, (*batch, n))
    check_shape("apply_post_res", "f", f, (*batch, c))
    return _apply_post_res(h_res, h_post, x, f)


@jax.checkpoint  # see project_streams
def _apply_post_res(h_res, h_post, x, f):
    mixed = jnp.sum(h_res[..., :, :, None].astype(F32) * x[..., None, :, :].astype(F32), axis=-2)
    out = mixed + h_post[..., :, None].astype(F32) * f[..., None, :].astype(F32)
    return out.astype(x.dtype)


def sinkhorn_unrolled(logits: jax.Array, num_iters: int = 20) -> jax.Array:
    """SPEC §5 Sinkhorn-Knopp as a Python-unrolled loop in the log domain.

    Each normalisation subtracts a logsumexp (over columns, then rows), which is
    the SPEC loop in exact arithmetic and cannot underflow at any logit scale.
    (..., n, n) -> (..., n, n) in the input's float dtype (fp64 stays fp64), no
    custom VJP: ``jax.vjp`` of it is plain backprop through every iterate.
    """
    lg = logits
    for _ in range(num_iters):
        lg = lg - jax.nn.logsumexp(lg, axis=-2, keepdims=True)
        lg = lg - jax.nn.logsumexp(lg, axis=-1, keepdims=True)
    return jnp.exp(lg)


def sinkhorn_converged_vjp(logits: jax.Array, g: jax.Array, num_iters: int = 20) -> jax.Array:
    """Converged-iterate approximation of the Sinkhorn VJP: (..., n, n) x2 -> (..., n, n) fp32.

    Back-propagates through the 2 * num_iters normalisations as if every
    iterate were the final output P (each normaliser then equals 1), which
    needs no recompute: a row step maps g to ``g - rowsum(g * P)``, a column
    step to ``g - colsum(g * P)``, and exp contributes ``P * g``. Exact only
    when the iteration has converged from the start; wrong for sharp logits.
    """
    p = sinkhorn_knopp(logits, num_iters)
    g = g.astype(p.dtype)
    for _ in range(num_iters):
        g = g - jnp.sum(g * p, axis=-1, keepdims=True)
        g = g - jnp.sum(g * p, axis=-2, keepdims=True)
    return p * g
