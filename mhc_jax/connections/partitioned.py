"""mHC ops laid out over the active device mesh.

Without a mesh (or on one device) these call the kernel api directly. Under
``jax.set_mesh(mesh)`` with more than one device they run inside ``jax.shard_map``
on each device's shard of the (B, T, n, C) streams: the Pallas kernels cannot be
partitioned by XLA, and the mapping's reductions over n*C must not gather the
streams. With C split over ``tensor`` (``residual_shard="hidden"``) each device
projects its own C slice and one ``psum`` combines the n*n + 2n partial projections
and the partial sum of squares per token; the coefficients are then computed
redundantly on every C shard. With T split instead (``"sequence"``) every token is
local and no collective is needed. ``backends.resolve`` checks the implementation
name first; with "auto" or "pallas" the kernel api then picks a backend per op.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax
from jax.sharding import PartitionSpec as P

from mhc_jax.connections import functional as connections
from pallas_kernels.mhc import api, backends
from pallas_kernels.mhc.context import Context, MappingConfig, MappingWeights, Pending

BATCH_AXES = ("data", "fsdp")


@functools.cache
def _note_once(message: str) -> None:
    logging.warning(message)


def _mesh_layout(residual_shard: str, ndim: int, on_mesh: bool):
    """(mesh or None, tensor axis name for C or None, stream spec, token spec)."""
    if residual_shard not in connections.RESIDUAL_SHARDS:
        raise ValueError(
            f"residual_shard must be one of {connections.RESIDUAL_SHARDS}, got {residual_shard!r}"
        )
    mesh = jax.sharding.get_abstract_mesh()
    if not on_mesh or mesh.empty or mesh.size == 1:
        return None, None, None, None
    if ndim != 4:
        raise ValueError(f"on a mesh the streams must be (B, T, n, C); got {ndim} dims")
    tp = mesh.shape.get("tensor", 1)
    c_axis = "tensor" if residual_shard == "hidden" and tp > 1 else None
    t_axis = "tensor" if residual_shard == "sequence" and tp > 1 else None
    batch = tuple(a for a in BATCH_AXES if a in mesh.shape) or None
    return mesh, c_axis, P(batch, t_axis, None, c_axis), P(batch, t_axis)


def _context_spec(x_spec, tok_spec) -> Context:
    """A Context's PartitionSpecs (a Context holding specs): coefficients per token,
    streams as x."""
    return Context._make((P(*tok_spec, None), P(*tok_spec, None), P(*tok_spec, None, None), x_spec))


def _local_pre(x, weights, *, impl, config, c_axis, c_total):
    n, c = x.shape[-2:]
    flat = weights._replace(phi=weights.phi.reshape(n * c, weights.phi.shape[-1]))
    if c_axis is None:
        return api.pre(x, flat, config, impl=impl)
    # Partial projection and sum of squares of this C shard, summed over shards.
    width = flat.phi.shape[-1]
    proj, mean_sq = connections.project_streams(x, flat.phi)
    both = lax.psum(jnp.concatenate([proj, mean_sq], axis=-1), c_axis)
    h_pre, h_post, h_res = connections.mhc_coefficients(
        both[..., :width],
        both[..., width:] * (c / c_total),  # the shards' means of n*c values each
        flat.bias,
        flat.alpha,
        num_iters=config.num_iters,
        norm_eps=config.norm_eps,
        variant=config.variant,
    )
    return api.apply_pre(h_pre, x, impl=impl), Context(h_pre, h_post, h_res, x)


def mhc_pre(
    x: jax.Array,
    weights: MappingWeights,
    config: MappingConfig,
    *,
    impl: str,
    residual_shard: str,
    on_mesh: bool = True,
) -> tuple[jax.Array, Context]:
    """Mapping then pre-apply of one mHC layer.

    Args:
      x: (..., n, C) streams ((B, T, n, C) on a mesh).
      weights: phi as (n, C, K), so that its C axis shards like the streams'.
      impl: an mHC implementation name (``backends``).
      on_mesh: False runs unpartitioned even under a mesh (used at init).

    Returns:
      layer_input (..., C) in x.dtype, and the Context to hand to ``post_res``.
    """
    impl = backends.resolve(impl, x.shape[-2], field="model.impl")
    mesh, c_axis, x_spec, tok_spec = _mesh_layout(residual_shard, x.ndim, on_mesh)
    if c_axis is not None and impl != "xla":
        _note_once(
            "mHC with C split over the tensor axis: the mapping runs on the XLA path (each "
            "device projects its C slice, then one psum); pre and post-res use the kernels"
        )
    fn = functools.partial(_local_pre, impl=impl, config=config, c_total=x.shape[-1])
    if mesh is None:
        return fn(x, weights, c_axis=None)
    return jax.shard_map(
        functools.partial(fn, c_axis=c_axis),
        mesh=mesh,
        in_specs=(x_spec, MappingWeights._make((P(None, c_axis, None), P(), P()))),
        out_specs=(P(*x_spec[:2], x_spec[3]), _context_spec(x_spec, tok_spec)),
        check_vma=impl == "xla",  # kernel outputs carry no varying-axis types
    )(x, weights)


def post_res(
    ctx: Context, f: jax.Array, *, impl: str, residual_shard: str, on_mesh: bool = True
) -> jax.Array:
    """``x_next = h_res x + h_post f`` of one mHC layer: (..., n, C) in the streams' dtype."""
    x = ctx.streams
    impl = backends.resolve(impl, x.shape[-2], field="model.impl")
    mesh, _, x_spec, tok_spec = _mesh_layout(residual_shard, x.ndim, on_mesh)
    if mesh is None:
        return api.post_res(ctx, f, impl=impl)
    return jax.shard_map(
        functools.partial(api.post_res, impl=impl),
        mesh=mesh,
        in_specs=(_context_spec(x_spec, tok_spec), P(*x_spec[:2], x_spec[3])),
        out_specs=x_spec,
        check_vma=impl == "xla",
    )(ctx, f)


def transition(
    pending: Pending,
    weights: MappingWeights,
    config: MappingConfig,
    *,
    impl: str,
    residual_shard: str,
    on_mesh: bool = True,
) -> tuple[jax.Array, Context]:
    """``mhc_pre(post_res(*pending), weights, config)``, fused where the kernels can
    (``api.transition``): the end of one mHC layer and the start of the next.

    With C split over ``tensor`` the mapping runs on the XLA path (``mhc_pre``), so the
    two run in turn there.
    """
    ctx, f = pending
    x = ctx.streams
    n, c = x.shape[-2:]
    impl = backends.resolve(impl, n, field="model.impl")
    layout: dict[str, Any] = dict(impl=impl, residual_shard=residual_shard, on_mesh=on_mesh)
    mesh, c_axis, x_spec, tok_spec = _mesh_layout(residual_shard, x.ndim, on_mesh)
    if c_axis is not None:
        return mhc_pre(post_res(ctx, f, **layout), weights, config, **layout)
    flat = weights._replace(phi=weights.phi.reshape(n * c, weights.phi.shape[-1]))
    fn = functools.partial(api.transition, config=config, impl=impl)
    if mesh is None:
        return fn(ctx, f, flat)
    f_spec, ctx_spec = P(*x_spec[:2], x_spec[3]), _context_spec(x_spec, tok_spec)
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(ctx_spec, f_spec, MappingWeights._make((P(), P(), P()))),
        out_specs=(f_spec, ctx_spec),
        check_vma=impl == "xla",
    )(ctx, f, flat)
