"""Does XLA overlap an mHC kernel put on a second GPU stream with independent GEMMs?

The paper hides part of mHC's memory-bound work behind compute. On one GPU, XLA
runs a call marked with ``compute_on`` ("gpu_stream:1") as an async call on
another stream; this probe asks whether the scheduler then overlaps it with
independent matmuls. Per layer, two MLP-sized GEMM pairs (T x C @ C x d_ff and
back, chained across layers) and one post-res backward kernel (T, n, C) that
does not depend on them; it times, in one process, for 1 and 8 layers: the
GEMMs alone, the kernels alone, both on the default stream, both with the
kernels on stream 1, and the same with XLA's ``_scheduling_group_id`` grouping
each layer's GEMMs and kernel. Ratios are against the same-stream time.

    python experiments/benchmarks/stream_overlap.py --hlo_out=/tmp/overlap_hlo.txt

Needs a GPU; docs/benchmarks.md has the results. The scheduling group lands, as
JAX lowers it, on the call's output placement annotations rather than on the call
itself.
"""

from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp
from jax.experimental import compute_on as _compute_on
from jax.experimental.xla_metadata import set_xla_metadata

from mhc_jax.benchmarking import timeit
from pallas_kernels.mhc import post_res_triton
from pallas_kernels.mhc._common import Static

BF16 = jnp.bfloat16
# JAX 0.10 has the context-manager compute_on plus compute_on2; 0.11 renamed the latter.
_ON = getattr(_compute_on, "compute_on2", _compute_on.compute_on)


def on_stream(fn, stream: int):
    """fn as one call on GPU stream ``stream`` (outputs in device memory)."""
    return _ON(fn, compute_type=f"gpu_stream:{stream}", out_memory_spaces=jax.memory.Space.Device)


def scheduling_group(i: int):
    return set_xla_metadata(_scheduling_group_id=str(i))


def programs(t: int, n: int, c: int, d_ff: int, layers: int):
    """name -> (jitted fn, args). Each layer's kernel gets its own dxn, so XLA cannot
    merge the layers' identical kernel calls into one."""
    keys = iter(jax.random.split(jax.random.key(0), 7 + layers))
    a = jax.random.normal(next(keys), (t, c), BF16)
    w1 = jax.random.normal(next(keys), (c, d_ff), BF16) * 0.02
    w2 = jax.random.normal(next(keys), (d_ff, c), BF16) * 0.02
    coeffs = (
        jax.nn.softmax(jax.random.normal(next(keys), (t, n, n)), -1),
        jax.random.uniform(next(keys), (t, n)),
        jax.random.normal(next(keys), (t, n, c), BF16),
        jax.random.normal(next(keys), (t, c), BF16),
    )
    dxns = [jax.random.normal(next(keys), (t, n, c), BF16) for _ in range(layers)]

    def gemm_pairs(y):
        for _ in range(2):
            y = ((y @ w1) @ w2).astype(BF16)
        return y

    def kernel(dxn):
        return post_res_triton.bwd(*coeffs, dxn, Static())

    streamed = on_stream(kernel, 1)

    def program(run_gemms, run_kernel, grouped=False):
        def run(y, dxns):
            outs = []
            for i, dxn in enumerate(dxns):
                with scheduling_group(i + 1) if grouped else contextlib.nullcontext():
                    y = gemm_pairs(y) if run_gemms else y
                    out = run_kernel(dxn) if run_kernel else None
                if out is not None:
                    outs.append(out[0].sum())
            return y, outs

        return jax.jit(run)

    args = (a, dxns)
    return {
        "gemms alone": (program(True, None), args),
        "kernel alone": (program(False, kernel), args),
        "same stream": (program(True, kernel), args),
        "stream 1": (program(True, streamed), args),
        "stream 1, grouped": (program(True, streamed, grouped=True), args),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--d_ff", type=int, default=5632)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--hlo_out", default="", help="Writes the streamed pair's compiled HLO.")
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}")
    for layers in args.layers:
        progs = programs(args.tokens, args.streams, args.hidden, args.d_ff, layers)
        if args.hlo_out and layers == args.layers[0]:
            fn, a = progs["stream 1"]
            text = fn.lower(*a).compile().as_text()
            print(f"async call-start in the compiled HLO: {'call-start' in text}")
            with open(args.hlo_out, "w") as f:
                f.write(text)
        times = {name: timeit(fn, *a, reps=args.reps) for name, (fn, a) in progs.items()}
        base = times["same stream"]
        print(f"{layers} layer(s):")
        for name, sec in times.items():
            print(f"  {name:18s} {sec * 1e3:8.3f} ms  {sec / base:5.2f}x same stream")


if __name__ == "__main__":
    main()
