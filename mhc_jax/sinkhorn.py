"""Sinkhorn-Knopp projection of logits onto doubly stochastic matrices (SPEC §5).

Forward: ``M = exp(t - max(t))``, then ``num_iters`` times normalise columns,
then rows. The result's rows sum to 1 to float rounding (rows are normalised
last); its columns approach 1 geometrically.

Gradient: a ``jax.custom_vjp`` whose residual is the input logits alone. The
backward pass recomputes the iterates from them and back-propagates through
the same loop, so it equals autodiff of the unrolled loop while nothing per
iteration is kept between the forward and the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

LOGIT_FLOOR = -30.0


def _compute_dtype(dtype) -> jnp.dtype:
    """fp32 for 16/32-bit inputs; fp64 stays fp64 (used by float64 tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def _sinkhorn_loop(logits: jax.Array, num_iters: int, eps: float) -> jax.Array:
    t = logits.astype(_compute_dtype(logits.dtype))
    # Subtracting the per-matrix max leaves the result unchanged (each step is
    # scale invariant) and keeps exp finite. Deviation from SPEC §5: shifted
    # logits are floored at LOGIT_FLOOR, so a row or column far below the max
    # (exp underflowing to 0, then 0/0) stays positive instead of turning NaN;
    # entries that far below the max carry weight < 1e-13 either way, and the
    # floor keeps squared normalisers (in the gradient) above float32 underflow.
    shifted = t - lax.stop_gradient(jnp.max(t, axis=(-2, -1), keepdims=True))
    m = jnp.exp(jnp.maximum(shifted, LOGIT_FLOOR))

    def body(_, m):
        m = m / (jnp.sum(m, axis=-2, keepdims=True) + eps)  # columns sum to 1
        return m / (jnp.sum(m, axis=-1, keepdims=True) + eps)  # rows sum to 1

    return lax.fori_loop(0, num_iters, body, m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _sinkhorn(logits: jax.Array, num_iters: int, eps: float) -> jax.Array:
    return _sinkhorn_loop(logits, num_iters, eps)


def _sinkhorn_fwd(logits, num_iters, eps):
    return _sinkhorn_loop(logits, num_iters, eps), logits


def _sinkhorn_bwd(num_iters, eps, logits, g):
    _, vjp = jax.vjp(lambda t: _sinkhorn_loop(t, num_iters, eps), logits)
    return vjp(g)


_sinkhorn.defvjp(_sinkhorn_fwd, _sinkhorn_bwd)


def sinkhorn_knopp(logits: jax.Array, num_iters: int = 20, eps: float = 0.0) -> jax.Array:
    """Projects ``exp(logits)`` towards the doubly stochastic matrices.

    Args:
      logits: (..., n, n) float array, any leading batch shape, any float dtype.
      num_iters: number of (column, row) normalisation pairs, >= 1.
      eps: added to every normaliser; 0 is safe because the max-shift keeps
        at least one entry per matrix equal to 1 before the first step.

    Returns:
      (..., n, n) array in fp32 (fp64 for fp64 input): non-negative, rows
      summing to 1, columns summing to 1 up to the convergence error.
    """
    if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn_knopp: logits must have shape (..., n, n), got {logits.shape}")
    if not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"sinkhorn_knopp: num_iters must be an integer >= 1, got {num_iters!r}")
    if eps < 0:
        raise ValueError(f"sinkhorn_knopp: eps must be >= 0, got {eps!r}")
    return _sinkhorn(logits, num_iters, float(eps))
