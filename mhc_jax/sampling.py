"""Autoregressive sampling from the LM (greedy, temperature, top-k).

Simple and exact rather than fast: each new token re-runs the model on a fixed
(B, max_len) buffer (causal attention makes the unused tail irrelevant), so one
compiled step serves every position. Fine for the short samples a training run
shows; no KV cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mhc_jax.model import LM, ModelConfig


@functools.partial(jax.jit, static_argnames=("config", "max_len", "top_k"))
def _generate(params, prompt, prompt_len, rng, temperature, *, config, max_len, top_k):
    model = LM(config)
    buf = jnp.zeros((prompt.shape[0], max_len), jnp.int32).at[:, : prompt.shape[1]].set(prompt)

    def body(pos, carry):
        buf, rng = carry
        logits = model.apply({"params": params}, buf)[:, pos - 1, :]
        if top_k > 0:
            kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        rng, key = jax.random.split(rng)
        sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
        token = jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1))
        return buf.at[:, pos].set(token.astype(jnp.int32)), rng

    buf, _ = jax.lax.fori_loop(prompt_len, max_len, body, (buf, rng))
    return buf


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
    max_len = prompt.shape[1] + num_tokens
    return _generate(
        params,
        prompt.astype(jnp.int32),
        prompt.shape[1],
        rng,
        jnp.float32(temperature),
        config=config,
        max_len=max_len,
        top_k=top_k,
    )
