"""mHC connection ops with a choice of implementation.

``impl``:
  * ``"xla"``: the library's pure-jnp math (``mhc_jax.connections``).
  * ``"pallas"``: fused Pallas kernels for the default backend: Triton on GPU,
    Mosaic on TPU (a ValueError on other backends).
  * ``"pallas_interpret"``: the same kernels run by the Pallas interpreter on
    any backend; the Mosaic TPU kernels when the default backend is a TPU,
    the Triton ones otherwise. For tests and debugging.
  * ``"mosaic_gpu"``: the Pallas Mosaic GPU kernels (Hopper; ``*_mosaic.py``), in
    development: they raise ``UnsupportedInput`` for shapes they do not take.
  * ``"mosaic_gpu_interpret"``: those run by the Mosaic GPU interpreter (CPU hosts).

Streams x (..., n, C) may have any leading dims (flattened to T tokens) and a
bf16, fp16 or fp32 dtype; coefficients are fp32. Every op is differentiable;
the Pallas ones carry a ``jax.custom_vjp`` whose backward is Pallas kernels too.
"""

from __future__ import annotations

import math
from types import ModuleType

import jax
import jax.numpy as jnp

from pallas_kernels.mhc import (
    mapping_mosaic,
    mapping_tpu,
    mapping_triton,
    post_res_mosaic,
    post_res_tpu,
    post_res_triton,
    pre_mosaic,
    pre_tpu,
    pre_triton,
    reference,
)
from pallas_kernels.mhc._common import Static

IMPLS = ("xla", "pallas", "pallas_interpret", "mosaic_gpu", "mosaic_gpu_interpret")
STREAM_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MAX_STREAMS = 8  # the mapping kernels keep n*n Sinkhorn entries per token in registers
NATIVE_PLATFORMS = ("gpu", "cuda", "rocm", "tpu")
_BACKENDS = {
    "triton": (mapping_triton, pre_triton, post_res_triton),
    "tpu": (mapping_tpu, pre_tpu, post_res_tpu),
    "mosaic_gpu": (mapping_mosaic, pre_mosaic, post_res_mosaic),
}


def _kernels(impl: str, fn: str) -> tuple[tuple[ModuleType, ...], bool] | None:
    """(mapping, pre, post-res kernel modules, interpret) for impl; None for "xla"."""
    if impl not in IMPLS:
        raise ValueError(f"{fn}: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "xla":
        return None
    platform = jax.default_backend()
    if impl.startswith("mosaic_gpu"):
        if impl == "mosaic_gpu" and platform != "gpu":
            raise ValueError(
                f"{fn}: impl='mosaic_gpu' needs a GPU backend, got {platform!r}; "
                "use impl='mosaic_gpu_interpret' or impl='xla'"
            )
        return _BACKENDS["mosaic_gpu"], impl == "mosaic_gpu_interpret"
    if impl == "pallas" and platform not in NATIVE_PLATFORMS:
        raise ValueError(
            f"{fn}: impl='pallas' needs a GPU or TPU backend, got {platform!r}; "
            "use impl='pallas_interpret' or impl='xla'"
        )
    return _BACKENDS["tpu" if platform == "tpu" else "triton"], impl == "pallas_interpret"


def _check(fn: str, name: str, a: jax.Array, shape: tuple) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(a.shape)}")


def _streams(fn: str, x: jax.Array) -> tuple[tuple, int, int]:
    if x.ndim < 2:
        raise ValueError(f"{fn}: x must have shape (..., n, C), got {x.shape}")
    if not any(x.dtype == d for d in STREAM_DTYPES):
        allowed = tuple(jnp.dtype(d).name for d in STREAM_DTYPES)
        raise ValueError(f"{fn}: x.dtype must be one of {allowed}, got {x.dtype}")
    n, c = x.shape[-2:]
    if not 1 <= n <= MAX_STREAMS:
        raise ValueError(
            f"{fn}: the Pallas kernels support 1 <= n <= {MAX_STREAMS} streams, got n={n}"
        )
    return x.shape[:-2], n, c


def _static(fn: str, num_iters, norm_eps, interpret: bool) -> Static:
    if not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"{fn}: num_iters must be an integer >= 1, got {num_iters!r}")
    if not norm_eps >= 0:
        raise ValueError(f"{fn}: norm_eps must be >= 0, got {norm_eps!r}")
    return Static(num_iters, float(norm_eps), interpret)


def _mapping(fn, x, phi, bias, alpha, num_iters, norm_eps, kernels, with_pre, tied=False):
    (mapping_kernels, _, _), interpret = kernels
    static = _static(fn, num_iters, norm_eps, interpret)
    batch, n, c = _streams(fn, x)
    k = n * n + 2 * n
    _check(fn, "phi", phi, (n * c, k))
    _check(fn, "bias", bias, (k,))
    _check(fn, "alpha", alpha, (3,))
    outs = mapping_kernels.mapping(x.reshape(-1, n, c), phi, bias, alpha, static, with_pre, tied)
    return tuple(o.reshape(*batch, *o.shape[1:]) for o in outs)


def mhc_mappings(
    x: jax.Array,
    phi: jax.Array,
    bias: jax.Array,
    alpha: jax.Array,
    *,
    num_iters: int = 20,
    norm_eps: float = 1e-6,
    impl: str = "xla",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """mHC coefficients (SPEC §4).

    Args:
      x: (..., n, C) streams; phi: (n*C, n*n + 2n) fp32, columns [pre | post | res
        row-major]; bias: (n*n + 2n,); alpha: (3,).

    Returns:
      h_pre (..., n), h_post (..., n), h_res (..., n, n), fp32.
    """
    kernels = _kernels(impl, "mhc_mappings")
    if kernels is None:
        return reference.mhc_mappings(x, phi, bias, alpha, num_iters=num_iters, norm_eps=norm_eps)
    args = (x, phi, bias, alpha, num_iters, norm_eps, kernels, False)
    return _mapping("mhc_mappings", *args)


def mhc_mappings_and_pre(
    x: jax.Array,
    phi: jax.Array,
    bias: jax.Array,
    alpha: jax.Array,
    *,
    num_iters: int = 20,
    norm_eps: float = 1e-6,
    tied_streams: bool = False,
    impl: str = "xla",
) -> tuple[jax.Array, ...]:
    """``mhc_mappings`` fused with ``apply_pre`` in one kernel.

    Returns:
      layer_input (..., C) in x.dtype, h_pre (..., n), h_post (..., n),
      h_res (..., n, n). On TPU a token block's rows stay in VMEM, so x is read
      once; on GPU x is read twice (the projection, then the pre kernel).
      With ``tied_streams``, x itself follows as a fifth output: pass it as
      ``apply_post_res``'s x, and the cotangent post-res sends back to x is
      added inside this op's backward kernel, while it writes dx, instead of in
      a separate pass over three (..., n, C) arrays.
    """
    kernels = _kernels(impl, "mhc_mappings_and_pre")
    if kernels is None:
        outs = reference.mhc_mappings_and_pre(
            x, phi, bias, alpha, num_iters=num_iters, norm_eps=norm_eps
        )
        return (*outs, x) if tied_streams else outs
    args = (x, phi, bias, alpha, num_iters, norm_eps, kernels, True, tied_streams)
    return _mapping("mhc_mappings_and_pre", *args)


def apply_pre(h_pre: jax.Array, x: jax.Array, *, impl: str = "xla") -> jax.Array:
    """``layer_input = sum_i h_pre[i] x[i]``: (..., n), (..., n, C) -> (..., C) in x.dtype."""
    kernels = _kernels(impl, "apply_pre")
    if kernels is None:
        return reference.apply_pre(h_pre, x)
    (_, pre, _), interpret = kernels
    batch, n, c = _streams("apply_pre", x)
    _check("apply_pre", "h_pre", h_pre, (*batch, n))
    t = math.prod(batch)
    out = pre.apply_pre(h_pre.reshape(t, n), x.reshape(t, n, c), Static(interpret=interpret))
    return out.reshape(*batch, c)


def apply_post_res(
    h_res: jax.Array, h_post: jax.Array, x: jax.Array, f: jax.Array, *, impl: str = "xla"
) -> jax.Array:
    """``x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] f``.

    Args:
      h_res: (..., n, n); h_post: (..., n); x: (..., n, C); f: (..., C).

    Returns:
      (..., n, C) in x.dtype.
    """
    kernels = _kernels(impl, "apply_post_res")
    if kernels is None:
        return reference.apply_post_res(h_res, h_post, x, f)
    (_, _, post_res), interpret = kernels
    batch, n, c = _streams("apply_post_res", x)
    _check("apply_post_res", "h_res", h_res, (*batch, n, n))
    _check("apply_post_res", "h_post", h_post, (*batch, n))
    _check("apply_post_res", "f", f, (*batch, c))
    t = math.prod(batch)
    out = post_res.apply_post_res(
        h_res.reshape(t, n, n),
        h_post.reshape(t, n),
        x.reshape(t, n, c),
        f.reshape(t, c),
        Static(interpret=interpret),
    )
    return out.reshape(x.shape)
