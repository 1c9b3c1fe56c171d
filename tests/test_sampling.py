"""KV-cached decoding (``sampling``) against the model's uncached forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import sampling
from mhc_jax.model import LM, ModelConfig, init_params

SMALL = dict(vocab_size=64, num_blocks=2, d_model=32, num_heads=2, d_ff=64)


@pytest.mark.parametrize(
    "kw",
    [
        dict(connection="mhc", n=4),
        dict(connection="mhc", n=4, scan_layers=True, remat="mhc_blocks"),
        dict(connection="hc", n=2, dtype="bfloat16"),
        dict(connection="residual", n=1),
    ],
)
def test_cached_logits_match_the_full_forward(kw):
    """Prefill 5 tokens, then decode 6 more one by one: every position's logits equal
    those of one uncached pass over the whole sequence."""
    cfg = ModelConfig(**SMALL, **kw)
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 11), 0, cfg.vocab_size)
    full = LM(cfg).apply({"params": params}, tokens)
    cache = sampling.init_cache(params, cfg, 3, 11)
    logits, cache = sampling.decode(params, cfg, cache, tokens[:, :5])
    steps = [logits]
    for t in range(5, 11):
        logits, cache = sampling.decode(params, cfg, cache, tokens[:, t : t + 1])
        steps.append(logits)
    cached = jnp.concatenate(steps, axis=1)
    tol = 5e-2 if cfg.dtype == "bfloat16" else 1e-4
    np.testing.assert_allclose(cached, full, atol=tol * float(jnp.abs(full).max()))
    flat = jax.tree_util.tree_leaves_with_path(cache)
    indices = [v for path, v in flat if "index" in jax.tree_util.keystr(path)]
    assert indices and all(bool(jnp.all(i == 11)) for i in indices)


def test_greedy_generation_is_the_argmax_of_the_full_forward():
    cfg = ModelConfig(**SMALL, connection="mhc", n=2)
    params = init_params(cfg, jax.random.key(2))
    prompt = jnp.asarray([[3, 9, 4]], jnp.int32)
    out = sampling.generate(params, cfg, prompt, 7, rng=jax.random.key(0), temperature=0.0)
    assert out.shape == (1, 10) and np.array_equal(out[:, :3], prompt)
    logits = LM(cfg).apply({"params": params}, out)
    np.testing.assert_array_equal(out[:, 3:], jnp.argmax(logits[:, 2:-1], axis=-1))


def test_init_cache_runs_nothing_and_training_keeps_no_cache():
    cfg = ModelConfig(**SMALL, connection="mhc", n=2)
    params = init_params(cfg, jax.random.key(0))
    cache = sampling.init_cache(params, cfg, 2, 16)
    key = jax.tree.leaves(cache)[1]
    assert key.shape[:2] == (2, 16) and not bool(jnp.any(key))
    assert "cache" not in LM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
