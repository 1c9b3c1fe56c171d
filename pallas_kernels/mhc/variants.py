"""The variants of the mHC mapping: how the projection's logits become h_pre, h_post
and h_res (``MappingConfig.variant``; SPEC §4-5 for "paper").

- ``"paper"``: SPEC §4-5. h_pre = sigmoid(t), h_post = 2 sigmoid(t), h_res the
  Sinkhorn-Knopp projection of exp(t) (``num_iters`` column-then-row pairs).
- ``"deepseek_v4"``: DeepSeek-V4's released contract. h_pre = sigmoid(t) + eps, h_post
  as the paper, h_res V4's Sinkhorn (softmax plus eps, then normalisations whose
  divisors are sums plus eps; ``sinkhorn.sinkhorn_knopp``), eps = 1e-6. V4 stores its
  mixing matrix transposed (its post step contracts the first index); here h_res keeps
  this project's orientation, ``x_next[i] = sum_j h_res[i, j] x[j]``, and
  ``mhc_jax.interop.deepseek_v4`` transposes V4's weights on the way in.
- ``"lite"``: mHC-lite. h_res = sum_k softmax(t_res)_k P_k over the n! permutation
  matrices (``permutation_matrices``), doubly stochastic by construction, no Sinkhorn;
  phi and bias have 2n + n! columns. n <= 4 (n! grows too fast beyond).

Logits t are ``raw * alpha_group + bias`` with raw the RMS-scaled projection, in every
variant; columns are [pre (n) | post (n) | res (``res_width``)].
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.mhc.sinkhorn import DEEPSEEK_V4_EPS, sinkhorn_knopp

__all__ = [
    "DEEPSEEK_V4_EPS",
    "LITE_MAX_STREAMS",
    "VARIANTS",
    "check",
    "coefficients",
    "lite_res",
    "permutation_matrices",
    "res_width",
    "residual_init_res",
    "streams_of_width",
    "width",
]

VARIANTS = ("paper", "deepseek_v4", "lite")
LITE_MAX_STREAMS = 4  # 24 permutations at n = 4; 120 at n = 5, 40320 at n = 8


def check(variant: str, n: int | None = None, *, name: str = "variant") -> str:
    """``variant`` if it names a variant that takes n streams; else ValueError naming
    ``name`` (the caller's field), the value and what is allowed."""
    if variant not in VARIANTS:
        raise ValueError(f"{name}={variant!r} is invalid: must be one of {VARIANTS}")
    if variant == "lite" and n is not None and n > LITE_MAX_STREAMS:
        raise ValueError(
            f"{name}='lite' with n={n} streams: mHC-lite mixes all n! permutation matrices "
            f"({math.factorial(n)} at n={n}, one phi column and one logit per token each), "
            f"so it takes n <= {LITE_MAX_STREAMS}; use variant 'paper' for more streams"
        )
    return variant


def res_width(n: int, variant: str) -> int:
    """Columns of phi that feed h_res: n*n, or n! for "lite"."""
    return math.factorial(n) if variant == "lite" else n * n


def width(n: int, variant: str = "paper") -> int:
    """Columns of phi (and entries of bias): 2n + ``res_width``."""
    return 2 * n + res_width(n, variant)


def streams_of_width(k: int, variant: str) -> int:
    """The n with ``width(n, variant) == k``; ValueError if there is none."""
    for n in range(1, k + 1):
        if width(n, variant) == k:
            return n
        if width(n, variant) > k:
            break
    raise ValueError(
        f"a coefficient width of {k} matches no stream count for variant {variant!r} "
        f"(widths 2n + {'n!' if variant == 'lite' else 'n*n'})"
    )


@functools.cache
def permutation_matrices(n: int) -> np.ndarray:
    """(n!, n, n) fp32: P_k[i, perm_k[i]] = 1, perm_k the k-th permutation of range(n)
    in lexicographic order (``itertools.permutations``); k = 0 is the identity."""
    perms = np.array(list(itertools.permutations(range(n))), np.int64).reshape(-1, n)
    mats = np.zeros((len(perms), n, n), np.float32)
    mats[np.arange(len(perms))[:, None], np.arange(n)[None, :], perms] = 1.0
    return mats


def lite_res(t_res: jax.Array) -> jax.Array:
    """mHC-lite's h_res from its n! logits: (..., n!) -> (..., n, n), in t_res's float
    dtype (fp32 at least)."""
    k = t_res.shape[-1]
    widths = {math.factorial(n): n for n in range(1, LITE_MAX_STREAMS + 1)}
    if k not in widths:
        raise ValueError(
            f"lite_res: t_res has {k} logits per token; must be one of {tuple(widths)}"
        )
    n = widths[k]
    weights = jax.nn.softmax(t_res.astype(jnp.promote_types(t_res.dtype, jnp.float32)), axis=-1)
    return jnp.einsum("...k,kij->...ij", weights, permutation_matrices(n).astype(weights.dtype))


def coefficients(
    t: jax.Array, n: int, variant: str, num_iters: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(h_pre (..., n), h_post (..., n), h_res (..., n, n)) from the logits t (...,
    ``width(n, variant)``)."""
    h_pre = jax.nn.sigmoid(t[..., :n])
    h_post = 2.0 * jax.nn.sigmoid(t[..., n : 2 * n])
    t_res = t[..., 2 * n :]
    if variant == "lite":
        return h_pre, h_post, lite_res(t_res)
    logits = t_res.reshape(*t.shape[:-1], n, n)
    if variant == "deepseek_v4":
        h_pre = h_pre + DEEPSEEK_V4_EPS
    return h_pre, h_post, sinkhorn_knopp(logits, num_iters, variant=variant)


def residual_init_res(n: int, variant: str, diagonal: float) -> jax.Array:
    """Res logits (``res_width``,) fp32 under which h_res has ``diagonal`` on its
    diagonal and equal off-diagonal entries (the residual init, SPEC §4)."""
    if n == 1:
        return jnp.zeros((1,), jnp.float32)
    if variant == "lite":
        # Identity logit d, the other n! - 1 zero: weight w = e^d / (e^d + n! - 1) on P_0
        # and (1 - w) / (n! - 1) on each other one, (n-1)! - 1 of which also fix a given
        # stream, so the diagonal is w + ((n-1)! - 1)(1 - w) / (n! - 1).
        k, fixing = math.factorial(n), math.factorial(n - 1) - 1
        w = (diagonal * (k - 1) - fixing) / (k - 1 - fixing)
        d = math.log(w * (k - 1) / (1 - w))
        return jnp.zeros((k,), jnp.float32).at[0].set(d)
    # A constant off-diagonal makes exp(t) doubly stochastic up to scale, so the
    # diagonal is exactly e^d / (e^d + n - 1) after the paper's Sinkhorn (and within
    # eps of it after V4's).
    d = math.log(diagonal * (n - 1) / (1 - diagonal))
    return (d * jnp.eye(n, dtype=jnp.float32)).reshape(-1)
