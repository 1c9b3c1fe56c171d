"""Transformer sub-layers: RMSNorm, RoPE causal self-attention, SwiGLU MLP.

Activations run in ``dtype`` (e.g. bf16) with parameters stored in
``param_dtype`` (fp32 master weights); norms and softmax statistics are fp32.
"""

from __future__ import annotations

import functools
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def attention_impl(requested: str, dtype, head_dim: int, seq_len: int) -> Literal["xla", "cudnn"]:
    """The ``jax.nn.dot_product_attention`` implementation to use.

    "auto" takes cuDNN's fused flash attention where it applies (a GPU backend,
    16-bit activations, head size a multiple of 8 up to 128, an even sequence
    length: its causal training kernels reject odd ones) and XLA elsewhere.
    JAX's own default (``implementation=None``) is the XLA path, which
    materialises the (B, H, T, T) scores: at training sequence lengths they cost
    more time and memory than the rest of the step (docs/benchmarks.md).
    """
    if requested == "xla" or requested == "cudnn":
        return "xla" if requested == "xla" else "cudnn"
    if requested != "auto":
        raise ValueError(f"attention={requested!r} is invalid: must be one of {ATTENTION_IMPLS}")
    fits = jnp.dtype(dtype).itemsize == 2 and head_dim % 8 == 0 and head_dim <= 128
    fits = fits and seq_len % 2 == 0
    return "cudnn" if fits and jax.default_backend() == "gpu" else "xla"


def _init(std: float, axes: tuple):
    """Normal(std) initialiser annotated with logical axis names (see sharding.py)."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale: (..., C) -> (..., C) in ``dtype``."""

    eps: float = 1e-6
    dtype: jnp.dtype = F32
    param_dtype: jnp.dtype = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
        scale = self.param("scale", ones, (x.shape[-1],), self.param_dtype)
        # Recomputed in the backward pass from x: otherwise autodiff keeps three fp32
        # copies of x (14 bytes per element with the output instead of 2 for bf16 x).
        return _rms_norm(x, scale, self.eps, self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype) -> jax.Array:
    xf = x.astype(F32)
    y = xf * lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    return (y * scale.astype(F32)).astype(dtype)


def rope(x: jax.Array, base: float, offset: jax.Array | int = 0) -> jax.Array:
    """Rotary position embedding (rotate-half form) on (B, T, H, D), D even; token t
    sits at position ``offset + t``."""
    t, d = x.shape[-3], x.shape[-1]
    inv_freq = 1.0 / (base ** (jnp.arange(0, d, 2, dtype=F32) / d))
    positions = offset + jnp.arange(t, dtype=F32)
    angles = positions[:, None] * inv_freq[None, :]  # (T, D/2)
    sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]
    x1, x2 = jnp.split(x.astype(F32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with RoPE: (B, T, C) -> (B, T, C).

    Uses ``jax.nn.dot_product_attention`` with ``implementation`` resolved by
    ``attention_impl`` ("auto": cuDNN flash attention on GPUs, XLA elsewhere).

    Decoding: when the "cache" collection is mutable, the module keeps its keys and
    values, (B, max_len, H, D) each, and a write index. The first such call only
    creates them, zeroed, with max_len = its T (``sampling.init_cache`` runs it under
    ``jax.eval_shape``); every later call appends its T tokens at the index and
    attends over the cached prefix, so a decode step costs one token's work.
    """

    num_heads: int
    implementation: str = "auto"
    rope_base: float = 10000.0
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: jnp.dtype = F32
    param_dtype: jnp.dtype = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        h, d = self.num_heads, c // self.num_heads
        w_qkv = self.param(
            "qkv",
            _init(self.init_std, ("embed", "qkv", "heads", "head_dim")),
            (c, 3, h, d),
            self.param_dtype,
        )
        w_out = self.param(
            "out",
            _init(self.out_init_std, ("heads", "head_dim", "embed")),
            (h, d, c),
            self.param_dtype,
        )
        x = x.astype(self.dtype)
        qkv = jnp.einsum("btc,cphd->pbthd", x, w_qkv.astype(self.dtype))
        if self.is_mutable_collection("cache") and not self.is_initializing():
            out = self._cached(qkv)
        else:
            q, k = rope(qkv[0], self.rope_base), rope(qkv[1], self.rope_base)
            impl = attention_impl(self.implementation, self.dtype, d, x.shape[-2])
            out = jax.nn.dot_product_attention(q, k, qkv[2], is_causal=True, implementation=impl)
        return jnp.einsum("bthd,hdc->btc", out, w_out.astype(self.dtype))

    def _cached(self, qkv: jax.Array) -> jax.Array:
        """Attention of qkv's T new tokens (3, B, T, H, D) over the cached prefix."""
        shape, t = qkv.shape[1:], qkv.shape[2]
        ready = self.has_variable("cache", "key")
        keys = self.variable("cache", "key", jnp.zeros, shape, qkv.dtype)
        values = self.variable("cache", "value", jnp.zeros, shape, qkv.dtype)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if not ready:  # creating the cache: its shapes are all this call is for
            return qkv[2]
        start = index.value
        q = rope(qkv[0], self.rope_base, start)
        at = (0, start, 0, 0)
        keys.value = lax.dynamic_update_slice(keys.value, rope(qkv[1], self.rope_base, start), at)
        values.value = lax.dynamic_update_slice(values.value, qkv[2], at)
        index.value = start + t
        max_len = keys.value.shape[1]
        visible = jnp.arange(max_len)[None, :] <= start + jnp.arange(t)[:, None]  # (T, max_len)
        return jax.nn.dot_product_attention(
            q, keys.value, values.value, mask=visible[None, None], implementation="xla"
        )


class SwiGLU(nn.Module):
    """SwiGLU MLP: (B, T, C) -> (B, T, C) with hidden width ``d_ff``."""

    d_ff: int
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: jnp.dtype = F32
    param_dtype: jnp.dtype = F32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def dense(features, std, axes, name):
            return nn.Dense(
                features,
                use_bias=False,
                kernel_init=_init(std, axes),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=name,
            )

        gate = dense(self.d_ff, self.init_std, ("embed", "mlp"), "gate")(x)
        up = dense(self.d_ff, self.init_std, ("embed", "mlp"), "up")(x)
        # Recomputed in the backward pass: keeps gate and up only, not silu's own
        # three intermediates (half the MLP's saved activations).
        h = jax.checkpoint(lambda g, u: jax.nn.silu(g) * u)(gate, up)
        h = nn.with_logical_constraint(h, ("batch", "seq", "mlp"))
        return dense(x.shape[-1], self.out_init_std, ("mlp", "embed"), "down")(h)
