"""Generation with the KV cache (``mhc_jax.sampling``) against the uncached baseline it
replaced, measured in one run: the baseline re-runs the model over the whole (B, P + N)
buffer for every new token. Prints seconds per generation and the ratio, and checks that
both produce the same greedy tokens.

    python experiments/benchmarks/sampling.py [--tokens 128 512] [--connection mhc --n 4]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from mhc_jax import sampling
from mhc_jax.model import LM, ModelConfig, init_params


@functools.partial(jax.jit, static_argnames=("config", "num_tokens"))
def uncached_greedy(params, prompt, *, config, num_tokens):
    """The baseline: one full forward pass over the buffer per generated token."""
    b, p = prompt.shape
    buf = jnp.zeros((b, p + num_tokens), jnp.int32).at[:, :p].set(prompt)

    def body(pos, buf):
        logits = LM(config).apply({"params": params}, buf)[:, pos - 1]
        return buf.at[:, pos].set(jnp.argmax(logits, axis=-1).astype(jnp.int32))

    return jax.lax.fori_loop(p, p + num_tokens, body, buf)


def _seconds(fn, reps: int = 3) -> float:
    fn().block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn().block_until_ready()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--connection", default="mhc")
    parser.add_argument("--n", type=int, default=4)
    args = parser.parse_args()
    cfg = ModelConfig(
        num_blocks=4, d_model=128, num_heads=4, d_ff=384, connection=args.connection, n=args.n
    )  # the tiny config's model
    params = init_params(cfg, jax.random.key(0))
    prompt = jnp.arange(16, dtype=jnp.int32)[None] % cfg.vocab_size
    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, {args.connection} n={args.n}")
    print("| tokens | uncached s | cached s | speed-up | same greedy tokens |")
    for num in args.tokens:
        cached = functools.partial(
            sampling.generate, params, cfg, prompt, num, rng=jax.random.key(0), temperature=0.0
        )
        base = functools.partial(uncached_greedy, params, prompt, config=cfg, num_tokens=num)
        same = bool(jnp.array_equal(cached(), base()))
        t_base, t_cached = _seconds(base), _seconds(cached)
        print(f"| {num} | {t_base:.3f} | {t_cached:.3f} | {t_base / t_cached:.1f}x | {same} |")


if __name__ == "__main__":
    main()
