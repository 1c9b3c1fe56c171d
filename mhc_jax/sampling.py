"""Autoregressive sampling from the LM (greedy, temperature, top-k) with a KV cache.

The prompt runs once through the model, filling every attention layer's key/value
cache (``layers.CausalSelfAttention``); each new token then costs one forward pass
over that single token. The connections (residual, HC, mHC) act per token, so they
need no cache. One jitted function runs the whole generation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.model import LM, ModelConfig
from mhc_jax.tokenizers import ByteTokenizer, Tokenizer


def init_cache(params, config: ModelConfig, batch: int, max_len: int):
    """Zeroed attention caches for ``batch`` sequences of up to ``max_len`` tokens: the
    "cache" collection of ``LM(config)`` (shapes found without running the model)."""
    tokens = jax.ShapeDtypeStruct((batch, max_len), jnp.int32)

    def create(params, tokens):
        return LM(config).apply({"params": params}, tokens, mutable=["cache"])[1]["cache"]

    shapes = jax.eval_shape(create, params, tokens)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def decode(params, config: ModelConfig, cache, tokens: jax.Array):
    """Appends ``tokens`` (B, T) to the cached sequences: (logits (B, T, vocab) fp32 of
    those T positions, the updated cache)."""
    logits, state = LM(config).apply({"params": params, "cache": cache}, tokens, mutable=["cache"])
    return logits, state["cache"]


def _pick(logits, key, temperature, top_k: int):
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "num_tokens", "top_k"))
def _generate(params, prompt, rng, temperature, *, config, num_tokens, top_k):
    b, p = prompt.shape
    cache = init_cache(params, config, b, p + num_tokens)
    logits, cache = decode(params, config, cache, prompt)
    out = jnp.zeros((b, p + num_tokens), jnp.int32).at[:, :p].set(prompt)

    def body(i, carry):
        cache, last, rng, out = carry
        rng, key = jax.random.split(rng)
        token = _pick(last, key, temperature, top_k)
        logits, cache = decode(params, config, cache, token[:, None])
        return cache, logits[:, -1], rng, out.at[:, p + i].set(token)

    carry = (cache, logits[:, -1], rng, out)
    _, last, rng, out = jax.lax.fori_loop(0, num_tokens - 1, body, carry)
    token = _pick(last, jax.random.split(rng)[1], temperature, top_k)
    return out.at[:, -1].set(token)


def generate(
    params,
    config: ModelConfig,
    prompt: jax.Array,
    num_tokens: int,
    *,
    rng: jax.Array,
    temperature: float = 1.0,
    top_k: int = 0,
) -> jax.Array:
    """Continues ``prompt`` by ``num_tokens`` tokens.

    Args:
      params: the LM's parameters.
      config: its ModelConfig.
      prompt: (B, P) int32 token ids, P >= 1.
      num_tokens: tokens to generate, >= 1.
      rng: PRNG key.
      temperature: 0 means greedy (argmax).
      top_k: keep only the k most likely tokens (0 keeps all).

    Returns:
      (B, P + num_tokens) int32: the prompt followed by the generated tokens.
    """
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"generate: prompt must have shape (B, P) with P >= 1, got {prompt.shape}")
    if num_tokens < 1:
        raise ValueError(f"generate: num_tokens must be >= 1, got {num_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0 <= top_k <= config.vocab_size:
        raise ValueError(f"generate: top_k must be in [0, {config.vocab_size}], got {top_k}")
    return _generate(
        params,
        prompt.astype(jnp.int32),
        rng,
        jnp.float32(temperature),
        config=config,
        num_tokens=num_tokens,
        top_k=top_k,
    )


def sample_prompt(tok: Tokenizer, text: str) -> jax.Array:
    """(1, P) ids starting a sample: the byte tokenizer's BOS then the text's bytes; for
    the others the text's tokens after an EOS (a document boundary, as in training)."""
    if isinstance(tok, ByteTokenizer):
        return jnp.asarray(tok.encode(text, add_bos=True)[None, :])
    return jnp.asarray(np.concatenate([[tok.eos_id], tok.encode(text)]).astype(np.int32)[None])
