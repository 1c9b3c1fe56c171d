"""Pure-jnp references for the mHC kernels.

The mapping, pre, mapping + pre and post-res math is the library's (``mhc_jax``),
re-exported here; this module adds only what the library has no counterpart for:
a plainly unrolled Sinkhorn in the log domain (so that autodiff, e.g. in float64,
gives the exact reference gradient at any logit scale), and the converged-iterate
approximation of the Sinkhorn gradient (the shortcut the kernels do not take; tests
contrast it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mhc_jax.connections import apply_post_res, apply_pre, mhc_mappings, mhc_mappings_and_pre
from mhc_jax.sinkhorn import sinkhorn_knopp

__all__ = [
    "apply_post_res",
    "apply_pre",
    "mhc_mappings",
    "mhc_mappings_and_pre",
    "sinkhorn_converged_vjp",
    "sinkhorn_unrolled",
]


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
