"""mHC connection ops with a choice of implementation (``backends``).

``impl`` is ``"auto"`` (the platform's fastest kernels that take the input, else XLA),
``"xla"`` (the pure-jnp references), ``"pallas"`` (the platform's kernels, never XLA),
one kernel backend (``"mosaic_gpu"``: Pallas Mosaic GPU, Hopper; ``"triton"``:
Pallas Triton, any GPU; ``"tpu"``: Pallas Mosaic TPU), or an ``*_interpret``
variant that runs those kernels in the Pallas interpreter on any host (tests,
debugging). A backend that does not take an input (too many streams, a width or
dtype it lacks) raises ``backends.UnsupportedInput``; ``auto`` and ``pallas`` then
try the next backend of their chain, explicit names raise it.

A layer is ``layer_input, ctx = pre(x, MappingWeights(phi, bias, alpha), config)``,
the sub-layer ``f = F(layer_input)``, then ``x_next = post_res(ctx, f)``. Between two
layers, ``transition(ctx, f, weights, config)`` is that post-res followed by the next
layer's ``pre``, fused into one pass over the streams where the backend can (Mosaic
GPU). The tuple-returning ops below are the same math one op at a time.

Streams x (..., n, C) may have any leading dims (flattened to T tokens) and a
bf16, fp16 or fp32 dtype; coefficients are fp32. Every op is differentiable;
the kernels carry a ``jax.custom_vjp`` whose backward is kernels too.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Sequence
from types import ModuleType

import jax
import jax.numpy as jnp

from pallas_kernels.mhc import reference, variants
from pallas_kernels.mhc._common import Static
from pallas_kernels.mhc.backends import (
    IMPLS,
    MAX_STREAMS,
    Impl,
    UnsupportedInput,
    chain,
    note_fallback,
)
from pallas_kernels.mhc.context import Context, MappingConfig, MappingWeights

__all__ = [
    "IMPLS",
    "apply_post_res",
    "apply_pre",
    "mhc_mappings",
    "mhc_mappings_and_pre",
    "post_res",
    "pre",
    "transition",
]

STREAM_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
DEFAULT_CONFIG = MappingConfig()
# (mapping, pre, post-res) kernel modules of each family, imported on first use so that
# a JAX lacking one family's Pallas module (``backends.missing``) still runs the others.
_MODULES = {
    "triton": ("mapping_triton", "pre_triton", "post_res_triton"),
    "tpu": ("mapping_tpu", "pre_tpu", "post_res_tpu"),
    "mosaic_gpu": ("mapping_mosaic", "pre_mosaic", "post_res_mosaic"),
}
_SUPPORT: dict[tuple, str | None] = {}  # probe results: None, or why a backend refused


def _kernels(backend: Impl, fn: str, n: int) -> tuple[tuple[ModuleType, ...], Static]:
    if not 1 <= n <= MAX_STREAMS:
        raise UnsupportedInput(
            f"{fn}: the kernels support 1 <= n <= {MAX_STREAMS} streams, got n={n}"
        )
    assert backend.kernels is not None, backend  # callers pass single kernel backends
    return _family(backend.kernels), Static(interpret=backend.interpret)


@functools.cache
def _family(kernels: str) -> tuple[ModuleType, ...]:
    return tuple(importlib.import_module(f"{__package__}.{m}") for m in _MODULES[kernels])


def _probe(key: tuple, call: Callable, backend: Impl, args: Sequence[jax.Array]) -> None:
    """Traces ``call(backend, *args)`` forward and backward on shapes alone (no
    compile), so that a backend refusing an input in its backward is found before the
    forward is committed to it; the verdict is cached per key."""
    if key not in _SUPPORT:
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]

        def forward_backward(*a):
            out, vjp = jax.vjp(lambda *a: call(backend, *a), *a)
            return vjp(jax.tree.map(jnp.zeros_like, out))

        try:
            jax.eval_shape(forward_backward, *specs)
            _SUPPORT[key] = None
        except UnsupportedInput as e:
            _SUPPORT[key] = str(e)
    if _SUPPORT[key] is not None:
        raise UnsupportedInput(_SUPPORT[key])


def _dispatch(fn: str, op: str, impl: str, call: Callable, args: Sequence, statics=()):
    """``call(backend, *args)`` with the first backend of ``impl``'s chain that takes
    the input; only the last one runs unprobed, so its refusal is the error raised."""
    candidates = chain(impl, op)
    shapes = tuple((a.shape, jnp.dtype(a.dtype).name) for a in args)
    for backend, after in zip(candidates, candidates[1:]):
        try:
            _probe((fn, backend, statics, shapes), call, backend, args)
        except UnsupportedInput as e:
            note_fallback(fn, backend.value, str(e), after.value)
            continue
        return call(backend, *args)
    return call(candidates[-1], *args)


def _check(fn: str, name: str, a: jax.Array, shape: tuple) -> None:
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(a.shape)}")


def _check_weights(fn: str, n: int, c: int, phi, bias, alpha, variant: str = "paper") -> None:
    k = variants.width(n, variants.check(variant, n, name=f"{fn}: variant"))
    _check(fn, "phi", phi, (n * c, k))
    _check(fn, "bias", bias, (k,))
    _check(fn, "alpha", alpha, (3,))


def _check_post_res(fn: str, batch: tuple, n: int, c: int, h_res, h_post, f) -> None:
    _check(fn, "h_res", h_res, (*batch, n, n))
    _check(fn, "h_post", h_post, (*batch, n))
    _check(fn, "f", f, (*batch, c))


def _streams(fn: str, x: jax.Array) -> tuple[tuple, int, int]:
    if x.ndim < 2:
        raise ValueError(f"{fn}: x must have shape (..., n, C), got {x.shape}")
    *lead, n, c = x.shape
    return tuple(lead), n, c


def _stream_dtype(fn: str, x: jax.Array) -> None:
    if not any(x.dtype == d for d in STREAM_DTYPES):
        allowed = tuple(jnp.dtype(d).name for d in STREAM_DTYPES)
        raise UnsupportedInput(f"{fn}: the kernels take x.dtype in {allowed}, got {x.dtype}")


def _kernel_variant(fn: str, variant: str) -> str:
    if variant == "lite":
        raise UnsupportedInput(
            f"{fn}: the kernels implement the mapping variants 'paper' and 'deepseek_v4', "
            f"not {variant!r}; use impl='xla' (or 'auto', which falls back to it)"
        )
    return variant


def _mapping(fn, x, phi, bias, alpha, config, impl, with_pre, tied=False):
    num_iters, norm_eps, variant = config.num_iters, config.norm_eps, config.variant
    batch, n, c = _streams(fn, x)
    _check_weights(fn, n, c, phi, bias, alpha, variant)

    def call(backend, x, phi, bias, alpha):
        if backend == Impl.XLA:
            kw = dict(num_iters=num_iters, norm_eps=norm_eps, variant=variant)
            if not with_pre:
                return reference.mhc_mappings(x, phi, bias, alpha, **kw)
            outs = reference.mhc_mappings_and_pre(x, phi, bias, alpha, **kw)
            return (*outs, x) if tied else outs
        (mapping, _, _), static = _kernels(backend, fn, n)
        _stream_dtype(fn, x)
        static = static._replace(
            num_iters=num_iters, norm_eps=float(norm_eps), variant=_kernel_variant(fn, variant)
        )
        outs = mapping.mapping(x.reshape(-1, n, c), phi, bias, alpha, static, with_pre, tied)
        return tuple(o.reshape(*batch, *o.shape[1:]) for o in outs)

    statics = (num_iters, float(norm_eps), variant, with_pre, tied)
    return _dispatch(fn, "mapping", impl, call, (x, phi, bias, alpha), statics)


def mhc_mappings(
    x: jax.Array,
    phi: jax.Array,
    bias: jax.Array,
    alpha: jax.Array,
    *,
    num_iters: int = 20,
    norm_eps: float = 1e-6,
    variant: str = "paper",
    impl: str = "xla",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """mHC coefficients (SPEC §4).

    Args:
      x: (..., n, C) streams; phi: (n*C, K) fp32, columns [pre | post | res
        row-major], K = n*n + 2n (2n + n! for variant "lite"); bias: (K,); alpha: (3,).
      variant: "paper", "deepseek_v4" or "lite" (``variants``); the kernels take
        the first two.

    Returns:
      h_pre (..., n), h_post (..., n), h_res (..., n, n), fp32.
    """
    config = MappingConfig(num_iters, norm_eps, variant)
    return _mapping("mhc_mappings", x, phi, bias, alpha, config, impl, False)


def mhc_mappings_and_pre(
    x: jax.Array,
    phi: jax.Array,
    bias: jax.Array,
    alpha: jax.Array,
    *,
    num_iters: int = 20,
    norm_eps: float = 1e-6,
    variant: str = "paper",
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
    config = MappingConfig(num_iters, norm_eps, variant)
    args = (x, phi, bias, alpha, config, impl, True, tied_streams)
    return _mapping("mhc_mappings_and_pre", *args)


def apply_pre(h_pre: jax.Array, x: jax.Array, *, impl: str = "xla") -> jax.Array:
    """``layer_input = sum_i h_pre[i] x[i]``: (..., n), (..., n, C) -> (..., C) in x.dtype."""
    batch, n, c = _streams("apply_pre", x)
    _check("apply_pre", "h_pre", h_pre, (*batch, n))
    t = math.prod(batch)

    def call(backend, h_pre, x):
        if backend == Impl.XLA:
            return reference.apply_pre(h_pre, x)
        (_, pre, _), static = _kernels(backend, "apply_pre", n)
        _stream_dtype("apply_pre", x)
        return pre.apply_pre(h_pre.reshape(t, n), x.reshape(t, n, c), static).reshape(*batch, c)

    return _dispatch("apply_pre", "pre", impl, call, (h_pre, x))


def apply_post_res(
    h_res: jax.Array, h_post: jax.Array, x: jax.Array, f: jax.Array, *, impl: str = "xla"
) -> jax.Array:
    """``x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] f``.

    Args:
      h_res: (..., n, n); h_post: (..., n); x: (..., n, C); f: (..., C).

    Returns:
      (..., n, C) in x.dtype.
    """
    batch, n, c = _streams("apply_post_res", x)
    _check_post_res("apply_post_res", batch, n, c, h_res, h_post, f)
    t = math.prod(batch)

    def call(backend, h_res, h_post, x, f):
        if backend == Impl.XLA:
            return reference.apply_post_res(h_res, h_post, x, f)
        (_, _, post_res), static = _kernels(backend, "apply_post_res", n)
        _stream_dtype("apply_post_res", x)
        args = (h_res.reshape(t, n, n), h_post.reshape(t, n), x.reshape(t, n, c), f.reshape(t, c))
        return post_res.apply_post_res(*args, static).reshape(x.shape)

    return _dispatch("apply_post_res", "post_res", impl, call, (h_res, h_post, x, f))


def pre(
    x: jax.Array,
    weights: MappingWeights,
    config: MappingConfig = DEFAULT_CONFIG,
    *,
    impl: str = "xla",
) -> tuple[jax.Array, Context]:
    """Mapping + pre of one mHC layer: x (..., n, C) -> (layer_input (..., C) in x.dtype,
    the Context to hand to ``post_res`` once the sub-layer has run)."""
    li, h_pre, h_post, h_res, streams = mhc_mappings_and_pre(
        x,
        *weights,
        num_iters=config.num_iters,
        norm_eps=config.norm_eps,
        variant=config.variant,
        tied_streams=True,
        impl=impl,
    )
    return li, Context(h_pre, h_post, h_res, streams)


def post_res(ctx: Context, f: jax.Array, *, impl: str = "xla") -> jax.Array:
    """Post-res of the layer ``ctx`` came from: f (..., C) -> x_next (..., n, C)."""
    return apply_post_res(ctx.h_res, ctx.h_post, ctx.streams, f, impl=impl)


def transition(
    ctx: Context,
    f: jax.Array,
    weights: MappingWeights,
    config: MappingConfig = DEFAULT_CONFIG,
    *,
    impl: str = "xla",
) -> tuple[jax.Array, Context]:
    """``pre(post_res(ctx, f), weights, config)``: the end of one layer and the start of
    the next, (layer_input (..., C), the next layer's Context, whose streams are
    x_next).

    Mosaic GPU computes x_next and the next layer's projection in one kernel (the
    projection's read of x_next is gone; ``transition_mosaic``); the other backends
    run the two ops in turn, on the same backend.
    """
    x = ctx.streams
    batch, n, c = _streams("transition", x)
    _check_post_res("transition", batch, n, c, ctx.h_res, ctx.h_post, f)
    _check_weights("transition", n, c, *weights, config.variant)
    t = math.prod(batch)

    def call(backend, h_res, h_post, x, f, phi, bias, alpha):
        if backend == Impl.XLA:
            x_next = reference.apply_post_res(h_res, h_post, x, f)
            kw = dict(num_iters=config.num_iters, norm_eps=config.norm_eps, variant=config.variant)
            return (*reference.mhc_mappings_and_pre(x_next, phi, bias, alpha, **kw), x_next)
        (mapping, _, post_res), static = _kernels(backend, "transition", n)
        _stream_dtype("transition", x)
        static = static._replace(
            num_iters=config.num_iters,
            norm_eps=float(config.norm_eps),
            variant=_kernel_variant("transition", config.variant),
        )
        args = (h_res.reshape(t, n, n), h_post.reshape(t, n), x.reshape(t, n, c), f.reshape(t, c))
        if backend.kernels == "mosaic_gpu":
            from pallas_kernels.mhc import transition_mosaic  # loaded on first use, as _family

            outs = transition_mosaic.transition(*args, phi, bias, alpha, static)
        else:
            x_next = post_res.apply_post_res(*args, static)
            outs = mapping.mapping(x_next, phi, bias, alpha, static, True, True)
        return tuple(o.reshape(*batch, *o.shape[1:]) for o in outs)

    args = (ctx.h_res, ctx.h_post, x, f, *weights)
    statics = (config.num_iters, float(config.norm_eps), config.variant)
    li, h_pre, h_post, h_res, x_next = _dispatch(
        "transition", "transition", impl, call, args, statics
    )
    return li, Context(h_pre, h_post, h_res, x_next)
