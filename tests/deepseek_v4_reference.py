"""DeepSeek-V4's mHC contract written out from its description, in V4's own terms (its
``fn``/``base``/``scale`` weights; comb contracted over its first index), in jnp so
that the tests can run it in float64 and differentiate it. Shared by
test_variants.py and test_interop.py."""

import jax
import jax.numpy as jnp

V4_EPS = 1e-6


def v4_layer(x, fn, base, scale, f, iters=20):
    """DeepSeek-V4's connection as its released code describes it, in V4's terms:
    mixes = (x_flat @ fn^T) * rsqrt(mean(x_flat^2) + eps); pre = sigmoid + eps,
    post = 2 sigmoid, comb = row softmax + eps, a column normalisation, then iters - 1
    (row, column) pairs, every divisor a sum plus eps; the layer input is
    sum_i pre[i] x[i] and x_next[k] = sum_m comb[m, k] x[m] + post[k] f."""
    *batch, n, c = x.shape
    xf = x.reshape(*batch, n * c)
    mixes = (xf @ fn.T) * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)
    pre = jax.nn.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + V4_EPS
    post = 2 * jax.nn.sigmoid(mixes[..., n : 2 * n] * scale[1] + base[n : 2 * n])
    logits = (mixes[..., 2 * n :] * scale[2] + base[2 * n :]).reshape(*batch, n, n)
    comb = jax.nn.softmax(logits, axis=-1) + V4_EPS
    comb = comb / (comb.sum(-2, keepdims=True) + V4_EPS)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + V4_EPS)
        comb = comb / (comb.sum(-2, keepdims=True) + V4_EPS)
    layer_input = jnp.einsum("...i,...ic->...c", pre, x)
    x_next = jnp.einsum("...mk,...mc->...kc", comb, x) + post[..., :, None] * f[..., None, :]
    return layer_input, x_next


def v4_head(x, fn, base, scale):
    """V4's collapse head: ``sum_i (sigmoid(mixes_i * scale + base_i) + eps) x[i]`` with
    mixes = (x_flat @ fn^T) * rsqrt(mean(x_flat^2) + eps)."""
    *batch, n, c = x.shape
    xf = x.reshape(*batch, n * c)
    mixes = (xf @ fn.T) * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)
    pre = jax.nn.sigmoid(mixes * scale + base) + V4_EPS
    return jnp.einsum("...i,...ic->...c", pre, x)
