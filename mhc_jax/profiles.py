"""GPU time of a traced training step, summed by kernel category (the benchmarks use it).

``summarise(trace_dir, steps)`` reads the ``*.xplane.pb`` that
``jax.profiler.trace`` wrote, takes every kernel event on the GPU planes'
stream lines and returns milliseconds per step by category, the kernels that
took longest, and every mHC kernel with its calls per step. Categories, by
kernel name: the mHC Pallas kernels (``mhc_*``), matmuls (cuBLAS/CUTLASS),
attention (cuDNN), copies, and the rest (XLA's fused elementwise and reduction
kernels, Adam, the loss).
"""

from __future__ import annotations

import collections
import glob
import os
import re

# First match wins: attention before matmul, since cuDNN's attention kernels carry
# the architecture tag ("cudnn_generated_fort_native_sdpa_sm90_flash_...") that
# cuBLAS's do.
CATEGORIES = (
    ("mhc kernels", ("mhc_",)),
    ("attention", ("cudnn", "fmha", "flash", "sdpa")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
)
OTHER = "fusions and other"


def category(kernel: str) -> str:
    """The category of a kernel name (case-insensitive substring match, first wins)."""
    low = kernel.lower()
    for name, keys in CATEGORIES:
        if any(k in low for k in keys):
            return name
    return OTHER


def kernel_times(xspace) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Total ns and event count per kernel name over the GPU planes' stream lines
    of a ProfileData."""
    totals: collections.Counter[str] = collections.Counter()
    counts: collections.Counter[str] = collections.Counter()
    for plane in xspace.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):
                continue  # derived lines (XLA ops/modules) would count kernels twice
            for event in line.events:
                totals[event.name] += event.duration_ns
                counts[event.name] += 1
    return totals, counts


def summarise(trace_dir: str, steps: int, top: int = 12) -> dict:
    """``breakdown`` of the newest trace under ``trace_dir``."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
    return breakdown(ProfileData.from_file(files[-1]), steps, top)


def breakdown(xspace, steps: int, top: int = 12) -> dict:
    """{"by_category": {category: ms per step}, "top": [(kernel, ms per step)],
    "mhc": [(kernel, ms per step, calls per step)], "total_ms": kernel ms per step}
    of a ProfileData holding ``steps`` steps. "mhc" lists every mHC kernel, the
    copies XLA numbers (``name__1``, ...) merged under one name."""
    totals, counts = kernel_times(xspace)
    by_category: collections.Counter[str] = collections.Counter()
    mhc_ns: collections.Counter[str] = collections.Counter()
    mhc_calls: collections.Counter[str] = collections.Counter()
    for kernel, ns in totals.items():
        by_category[category(kernel)] += ns
        if category(kernel) == CATEGORIES[0][0]:
            base = re.sub(r"__\d+$", "", kernel)
            mhc_ns[base] += ns
            mhc_calls[base] += counts[kernel]
    per_step = lambda ns: ns / 1e6 / steps  # noqa: E731
    return {
        "by_category": {k: per_step(v) for k, v in sorted(by_category.items())},
        "top": [(k, per_step(v)) for k, v in totals.most_common(top)],
        "mhc": [(k, per_step(v), mhc_calls[k] / steps) for k, v in mhc_ns.most_common()],
        "total_ms": per_step(sum(totals.values())),
    }
