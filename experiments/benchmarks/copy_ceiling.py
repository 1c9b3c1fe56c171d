"""The device's copy ceiling: the best read + write bandwidth of several copy forms.

One XLA form understates what the memory can do: on an H200 (JAX 0.11.2) XLA's bf16
elementwise ops top out at 3.0-3.2 TB/s, its fp32 ones at 3.8-4.1, and torch's
``copy_`` of bf16 reaches 4.1-4.2. Kernels are judged against the best of: negation
of bf16 and of fp32, an integer add on bf16 pairs viewed as uint32, each at two
sizes, plus torch's ``Tensor.copy_`` where torch and a CUDA device exist.

    python experiments/benchmarks/copy_ceiling.py [--sizes_mib 256 1024] [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

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
    best = max(rates, key=rates.get)
    return best, rates[best]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes_mib", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    rates = measure(args.sizes_mib, args.reps)
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
    for name, rate in rates.items():
        print(f"{name:36s} {rate / 1e9:8.0f} GB/s")
    form, rate = ceiling(rates)
    print(f"ceiling: {rate / 1e9:.0f} GB/s ({form})")


if __name__ == "__main__":
    main()
