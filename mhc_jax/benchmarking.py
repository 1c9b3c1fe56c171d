"""Timing on a device: the median time of a jitted call, the device's copy ceiling, and
the operands of the kernel benchmarks.

The copy ceiling is the best read + write bandwidth of several copy forms: one XLA form
understates what the memory can do (XLA's bf16 elementwise ops can stay well below
torch's ``copy_``). Kernels are judged against the best of: negation of bf16 and
of fp32, an integer add on bf16 pairs viewed as uint32, each at two sizes, plus torch's
``Tensor.copy_`` where torch and a CUDA device exist.
"""

from __future__ import annotations

import math
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

WARMUP, BATCH = 3, 4  # timeit: untimed calls, then calls per device sync
SAMPLES_PER_SYNC = 8  # back-to-back copies per device sync: one per sync adds the host trip


def _median_seconds(call, reps: int) -> float:
    call()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [call() for _ in range(SAMPLES_PER_SYNC)]
        jax.block_until_ready(outs)
        samples.append((time.perf_counter() - t0) / SAMPLES_PER_SYNC)
    return statistics.median(samples)


def _xla_forms(nbytes: int) -> dict:
    """name -> (jitted fn, operand) moving ``nbytes`` in and ``nbytes`` out."""
    bf16 = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f32 = jnp.ones((nbytes // 4,), jnp.float32)
    return {
        "xla neg bf16": (jax.jit(lambda a: -a), bf16),
        "xla neg f32": (jax.jit(lambda a: -a), f32),
        "xla add u32 (bf16 pairs)": (
            jax.jit(lambda a: lax.bitcast_convert_type(a.reshape(-1, 2), jnp.uint32) + 1),
            bf16,
        ),
    }


def _torch_copy(nbytes: int):
    """torch's bf16 ``copy_`` as a zero-argument call returning a syncable value, or None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)

    class _Synced:  # jax.block_until_ready calls block_until_ready() on unknown leaves
        def block_until_ready(self):
            torch.cuda.synchronize()
            return self

    def call():
        dst.copy_(src)
        return _Synced()

    return call


def measure(sizes_mib=(256, 1024), reps: int = 20) -> dict[str, float]:
    """Bytes/s (read + write) of every form at every size: {"form @ N MiB": bytes/s}."""
    rates = {}
    for mib in sizes_mib:
        nbytes = mib << 20
        for name, (fn, operand) in _xla_forms(nbytes).items():
            seconds = _median_seconds(lambda fn=fn, a=operand: fn(a), reps)
            rates[f"{name} @ {mib} MiB"] = 2 * nbytes / seconds
        torch_call = _torch_copy(nbytes)
        if torch_call is not None:
            rates[f"torch copy_ bf16 @ {mib} MiB"] = 2 * nbytes / _median_seconds(torch_call, reps)
    return rates


def ceiling(rates: dict[str, float]) -> tuple[str, float]:
    """(form, bytes/s) of the fastest measured form."""
    best = max(rates, key=lambda form: rates[form])
    return best, rates[best]


def timeit(fn, *args, reps: int) -> float:
    """Median seconds per call of a jitted fn (device-synchronised)."""
    for _ in range(WARMUP):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(BATCH):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / BATCH)
    return statistics.median(samples)


def connection_operands(t: int, n: int, c: int) -> dict[str, jax.Array]:
    """Random (never zero) operands of one mHC connection of T tokens, n streams, C channels,
    drawn on the device: streams x (T, n, C), branch output f and cotangents in bf16; phi,
    bias, alpha and coefficients h_pre (T, n), h_post (T, n), h_res (T, n, n) in fp32."""
    keys = iter(jax.random.split(jax.random.key(t * 7 + c), 10))
    k = n * n + 2 * n

    def normal(shape, dtype=jnp.bfloat16, scale=1.0):
        return (jax.random.normal(next(keys), shape, jnp.float32) * scale).astype(dtype)

    def uniform(shape, high):
        return jax.random.uniform(next(keys), shape, jnp.float32, 0.0, high)

    return dict(
        x=normal((t, n, c)),
        f=normal((t, c)),
        d_li=normal((t, c)),
        d_xn=normal((t, n, c)),
        phi=normal((n * c, k), jnp.float32, 1.0 / math.sqrt(n * c)),
        bias=normal((k,), jnp.float32),
        alpha=jnp.full((3,), 0.5, jnp.float32),
        h_pre=uniform((t, n), 1.0),
        h_post=uniform((t, n), 2.0),
        h_res=uniform((t, n, n), 1.0),
    )
