"""Sinkhorn-Knopp projection of logits onto doubly stochastic matrices (SPEC §5).

Forward: the SPEC loop ``M = exp(t - max(t))``, then ``num_iters`` times
normalise columns, then rows, computed so that it stays exact (to fp32
rounding) at every finite logit scale: no row or column underflows, however far
it lies below the others. Rows sum to 1 to float rounding (rows are normalised
last); columns approach 1 geometrically.

Gradient: a ``jax.custom_vjp`` whose residual is the input logits alone. The
backward pass recomputes the iterates from them and back-propagates through
the same computation, so it equals its autodiff while nothing per iteration is
kept between the forward and the backward pass.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# Exactness at every scale. The first iteration (0) runs in the log domain: a column
# log-softmax (shifting each column by its own max is exact, since the loop
# starts by normalising columns), then a row softmax; each sum there holds an
# exp(0) term, so none can underflow. From then on every column and row sum lies
# in [1/n^2, n] (a normalised column has an entry >= 1/n and rows sum to <= n),
# so the other iterations multiply by reciprocal sums, as cheap as the plain loop.
# Only single entries can still underflow: below 2^-126 they are flushed to 0
# (where denormals are off: TPUs, and XLA on CPUs), and a 0 cannot regrow, while
# the true entry grows by at most n^2 per normalisation. So the multiplicative
# iterations run in segments of k with n^(4k) * 2^-126 <= 2^-40, and between
# segments the iterate is rebuilt as exp(lg) from its logarithm lg, carried along
# by the logs of the segment's row and column factors. A lost entry thus stays
# below 2^-40 while lost: the result is the SPEC loop's to fp32 rounding (errors
# against float64 by logit scale: experiments/results/sinkhorn_accuracy/NOTES.md;
# logits mixing huge and O(1) values are only resolved to their own fp32 spacing).
# Cost beyond the plain loop: n x n exps for iteration 0 and one n x n exp and 2n logs
# per rebuild, against 2 n x n exps per normalisation for a loop all in the log domain.
_FLUSH_TO_LOST = 86 * math.log(2.0)  # log(2^-40 / 2^-126)


def multiplicative_runs(n: int, num_iters: int) -> list[tuple[int, int]]:
    """Iterations [start, stop) of the multiplicative segments after iteration 0.

    Each run is at most ``ceil(sqrt(num_iters - 1))`` long (the kernels' VJP
    keeps one checkpoint per run) and at most ``86 ln 2 / (4 ln n)`` (10 at
    n = 4, 7 at n = 8), the bound above. Empty for ``num_iters = 1``.
    """
    run = math.isqrt(max(num_iters - 2, 0)) + 1
    if n > 1:
        run = min(run, max(1, int(_FLUSH_TO_LOST / (4 * math.log(n)))))
    return [(a, min(a + run, num_iters)) for a in range(1, num_iters, run)]


def _compute_dtype(dtype) -> jnp.dtype:
    """fp32 for 16/32-bit inputs; fp64 stays fp64 (used by float64 tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def _first_iteration(t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Iteration 0 in the log domain: (log of its result, its result)."""
    a = t - lax.stop_gradient(jnp.max(t, axis=-2, keepdims=True))
    log_col = jnp.log(jnp.sum(jnp.exp(a), axis=-2, keepdims=True))  # in [0, log n]
    # Shifting rows by their max before subtracting log_col keeps differences within
    # a row exact where |a| is huge; each row keeps an entry >= -log n.
    r = a - lax.stop_gradient(jnp.max(a, axis=-1, keepdims=True)) - log_col
    e = jnp.exp(r)
    s = jnp.sum(e, axis=-1, keepdims=True)
    return r - jnp.log(s), e / s


def _iterations(m: jax.Array, count: int, eps: float):
    """``count`` >= 1 (column, row) normalisations of m, and the products u (..., n, 1) and
    v (..., 1, n) of the row and column factors, so that the result is u * m * v."""

    def normalise(m, u, v):
        s = jnp.sum(m, axis=-2, keepdims=True) + eps  # columns sum to 1
        m, v = m / s, v / s
        s = jnp.sum(m, axis=-1, keepdims=True) + eps  # rows sum to 1
        return m / s, u / s, v

    # The first pair outside the loop: u and v then start from m's sums and carry their
    # type (under shard_map, the mesh axes m varies over), as a fori_loop carry must.
    ones = jnp.ones((), m.dtype)
    m, u, v = normalise(m, ones, ones)
    return lax.fori_loop(1, count, lambda _, carry: normalise(*carry), (m, u, v))


def _sinkhorn_loop(logits: jax.Array, num_iters: int, eps: float) -> jax.Array:
    lg, m = _first_iteration(logits.astype(_compute_dtype(logits.dtype)))
    runs = multiplicative_runs(logits.shape[-1], num_iters)
    for i, (start, stop) in enumerate(runs):
        m, u, v = _iterations(m, stop - start, eps)
        if i < len(runs) - 1:
            lg = lg + jnp.log(u) + jnp.log(v)
            m = jnp.exp(lg)
    return m


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _sinkhorn(logits: jax.Array, num_iters: int, eps: float) -> jax.Array:
    return _sinkhorn_loop(logits, num_iters, eps)


def _sinkhorn_fwd(logits, num_iters, eps):
    return _sinkhorn_loop(logits, num_iters, eps), logits


def _sinkhorn_bwd(num_iters, eps, logits, g):
    _, vjp = jax.vjp(lambda t: _sinkhorn_loop(t, num_iters, eps), logits)
    return vjp(g)


_sinkhorn.defvjp(_sinkhorn_fwd, _sinkhorn_bwd)


# DeepSeek-V4's Sinkhorn (``variant="deepseek_v4"``), in this project's orientation: V4
# contracts the first index of its comb in the post step, so its comb is our h_res
# transposed, and its row softmax and row sums are our column ones. V4 then runs
# softmax(.) + eps, a row normalisation, and num_iters - 1 (column, row) pairs, each
# divisor a sum plus eps: the paper's order (columns first, rows last) with eps terms.
# The eps floor keeps every entry >= ~eps / n, so the plain loop is exact enough here.


def _deepseek_v4_loop(logits: jax.Array, num_iters: int, eps: float) -> jax.Array:
    m = jax.nn.softmax(logits.astype(_compute_dtype(logits.dtype)), axis=-2) + eps
    m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)
    for _ in range(num_iters - 1):
        m = m / (jnp.sum(m, axis=-2, keepdims=True) + eps)
        m = m / (jnp.sum(m, axis=-1, keepdims=True) + eps)
    return m


# The residual is the logits alone, as for the paper's loop: the backward recomputes.
_deepseek_v4 = jax.custom_vjp(_deepseek_v4_loop, nondiff_argnums=(1, 2))
_deepseek_v4.defvjp(
    lambda logits, num_iters, eps: (_deepseek_v4_loop(logits, num_iters, eps), logits),
    lambda num_iters, eps, logits, g: jax.vjp(
        lambda t: _deepseek_v4_loop(t, num_iters, eps), logits
    )[1](g),
)

SINKHORN_VARIANTS = ("paper", "deepseek_v4")
DEEPSEEK_V4_EPS = 1e-6  # V4's hc_eps


def sinkhorn_knopp(
    logits: jax.Array, num_iters: int = 20, eps: float | None = None, *, variant: str = "paper"
) -> jax.Array:
    """Projects ``exp(logits)`` towards the doubly stochastic matrices (SPEC §5).

    Args:
      logits: (..., n, n) float array, any leading batch shape, any float dtype;
        any finite values (the result does not depend on their scale's range).
      num_iters: number of (column, row) normalisation pairs, >= 1.
      eps: for "paper", added to the column and row sums of iterations 2..num_iters,
        which lie in [1/n^2, n], as a guard; None or 0 (the default) is the SPEC
        loop, and the first iteration normalises in the log domain and takes no eps.
        For "deepseek_v4", V4's eps (None: ``DEEPSEEK_V4_EPS``).
      variant: "paper" (SPEC §5) or "deepseek_v4" (V4's loop, in this project's
        orientation: the transpose of V4's comb for the transposed logits).

    Returns:
      (..., n, n) array in fp32 (fp64 for fp64 input): non-negative, rows
      summing to 1 (slightly less with eps > 0), columns summing to 1 up to the
      convergence error.
    """
    if variant not in SINKHORN_VARIANTS:
        raise ValueError(
            f"sinkhorn_knopp: variant must be one of {SINKHORN_VARIANTS}, got {variant!r} "
            "(mHC-lite's h_res is no Sinkhorn: see pallas_kernels.mhc.variants)"
        )
    if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn_knopp: logits must have shape (..., n, n), got {logits.shape}")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"sinkhorn_knopp: num_iters must be an integer >= 1, got {num_iters!r}")
    if eps is None:
        eps = DEEPSEEK_V4_EPS if variant == "deepseek_v4" else 0.0
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"sinkhorn_knopp: eps must be finite and >= 0, got {eps!r}")
    if variant == "deepseek_v4":
        return _deepseek_v4(logits, num_iters, float(eps))
    return _sinkhorn(logits, num_iters, float(eps))
