"""mHC ops chosen by implementation and laid out over the active device mesh.

Without a mesh (or on one device) these call the ops directly. Under
``jax.set_mesh(mesh)`` with more than one device they run inside
``jax.shard_map`` on each device's shard of the (B, T, n, C) streams: the
Pallas kernels cannot be partitioned by XLA, and the mapping's reductions over
n*C must not gather the streams. With C split over ``tensor``
(``residual_shard="hidden"``) each device projects its own C slice and one
``psum`` combines the n*n + 2n partial projections and the partial sum of
squares per token; the coefficients are then computed redundantly on every C
shard. With T split instead (``"sequence"``) every token is local and no
collective is needed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax
from jax.sharding import PartitionSpec as P

from mhc_jax import connections
from pallas_kernels.mhc import api as kernels_api
from pallas_kernels.mhc import backends

BATCH_AXES = ("data", "fsdp")


class Ops(NamedTuple):
    """The mHC functions of one implementation.

    ``mappings_and_pre(x, phi_flat, bias, alpha, num_iters=, norm_eps=)`` returns
    (layer_input, h_pre, h_post, h_res, x_tied), x_tied being x to hand on to
    ``apply_post_res`` (see ``api.mhc_mappings_and_pre``'s ``tied_streams``); the
    others are as in connections.py.
    """

    mappings_and_pre: Callable
    apply_pre: Callable
    apply_post_res: Callable


@functools.cache
def _note_once(message: str) -> None:
    logging.warning(message)


def resolve_impl(impl: str, n: int) -> str:
    """The implementation the model runs for ``impl`` and n streams, checked before
    anything is traced: "xla" where no kernel can run (a CPU host under "auto", or more
    than ``MAX_STREAMS`` streams, said once in the log), else ``impl`` itself ("auto"
    and "pallas" then pick a kernel backend per op and input: ``backends.chain``).

    Raises:
      ValueError: naming ``model.impl``, for an unknown name, or an explicit choice
        that this host or n cannot run.
    """
    if impl not in backends.IMPLS:
        raise ValueError(f"model.impl={impl!r} is invalid: must be one of {backends.IMPLS}")
    fits = 1 <= n <= kernels_api.MAX_STREAMS
    if impl not in ("auto", "xla") and not fits:
        raise ValueError(
            f"model.impl={impl!r} is invalid for n={n}: the Pallas kernels support 1 <= n <= "
            f"{kernels_api.MAX_STREAMS} streams; use 'auto' (XLA for larger n) or 'xla'"
        )
    chains = [backends.chain(impl, op, field="model.impl") for op in backends.OPS]
    if all(c == (backends.Impl.XLA,) for c in chains):
        return "xla"
    if impl == "auto" and not fits:
        _note_once(
            f"model.impl='auto': the Pallas kernels support 1 <= n <= "
            f"{kernels_api.MAX_STREAMS} streams, so mHC with n={n} runs on the XLA path"
        )
        return "xla"
    return impl


def mhc_ops(impl: str, n: int) -> Ops:
    """Ops of ``impl`` for n streams (``resolve_impl``): pure jnp for "xla", else the
    kernel api's (the mapping and pre then one fused op)."""
    impl = resolve_impl(impl, n)
    if impl == "xla":
        return Ops(
            lambda x, *args, **kw: (*connections.mhc_mappings_and_pre(x, *args, **kw), x),
            connections.apply_pre,
            connections.apply_post_res,
        )
    return Ops(
        lambda x, phi, bias, alpha, **kw: kernels_api.mhc_mappings_and_pre(
            x, phi, bias, alpha, tied_streams=True, impl=impl, **kw
        ),
        lambda h_pre, x: kernels_api.apply_pre(h_pre, x, impl=impl),
        lambda h_res, h_post, x, f: kernels_api.apply_post_res(h_res, h_post, x, f, impl=impl),
    )


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


def _local_mappings_and_pre(x, phi, bias, alpha, *, ops, c_axis, c_total, num_iters, norm_eps):
    n, c = x.shape[-2:]
    width = phi.shape[-1]
    if c_axis is None:
        return ops.mappings_and_pre(
            x, phi.reshape(n * c, width), bias, alpha, num_iters=num_iters, norm_eps=norm_eps
        )
    # Partial projection and sum of squares of this C shard, summed over shards.
    proj, mean_sq = connections.project_streams(x, phi.reshape(n * c, width))
    both = lax.psum(jnp.concatenate([proj, mean_sq], axis=-1), c_axis)
    h_pre, h_post, h_res = connections.mhc_coefficients(
        both[..., :width],
        both[..., width:] * (c / c_total),  # the shards' means of n*c values each
        bias,
        alpha,
        num_iters=num_iters,
        norm_eps=norm_eps,
    )
    return ops.apply_pre(h_pre, x), h_pre, h_post, h_res, x


def mhc_pre(x, phi, bias, alpha, *, impl, residual_shard, num_iters, norm_eps, on_mesh=True):
    """Mapping then pre-apply of one mHC layer.

    Args:
      x: (..., n, C) streams ((B, T, n, C) on a mesh).
      phi: (n, C, n*n + 2n); bias: (n*n + 2n,); alpha: (3,).
      on_mesh: False runs unpartitioned even under a mesh (used at init).

    Returns:
      layer_input (..., C) in x.dtype; h_pre (..., n), h_post (..., n),
      h_res (..., n, n) fp32; x_tied: x, to pass as ``post_res``'s x (with the
      Pallas kernels its cotangent then joins dx inside the mapping's backward).
    """
    impl = resolve_impl(impl, x.shape[-2])
    ops = mhc_ops(impl, x.shape[-2])
    mesh, c_axis, x_spec, tok_spec = _mesh_layout(residual_shard, x.ndim, on_mesh)
    if c_axis is not None and impl != "xla":
        _note_once(
            "mHC with C split over the tensor axis: the mapping runs on the XLA path (each "
            "device projects its C slice, then one psum); pre and post-res use the kernels"
        )
    kw = dict(ops=ops, c_total=x.shape[-1], num_iters=num_iters, norm_eps=norm_eps)
    if mesh is None:
        return _local_mappings_and_pre(x, phi, bias, alpha, c_axis=None, **kw)
    li_spec = P(*x_spec[:2], x_spec[3])
    fn = jax.shard_map(
        lambda x, phi, bias, alpha: _local_mappings_and_pre(
            x, phi, bias, alpha, c_axis=c_axis, **kw
        ),
        mesh=mesh,
        in_specs=(x_spec, P(None, c_axis, None), P(), P()),
        out_specs=(
            li_spec,
            P(*tok_spec, None),
            P(*tok_spec, None),
            P(*tok_spec, None, None),
            x_spec,
        ),
        check_vma=impl == "xla",  # kernel outputs carry no varying-axis types
    )
    return fn(x, phi, bias, alpha)


def post_res(h_res, h_post, x, f, *, impl, residual_shard, on_mesh=True):
    """``x_next = h_res x + h_post f`` of one mHC layer (shapes as in ``mhc_pre``)."""
    impl = resolve_impl(impl, x.shape[-2])
    ops = mhc_ops(impl, x.shape[-2])
    mesh, _, x_spec, tok_spec = _mesh_layout(residual_shard, x.ndim, on_mesh)
    if mesh is None:
        return ops.apply_post_res(h_res, h_post, x, f)
    fn = jax.shard_map(
        ops.apply_post_res,
        mesh=mesh,
        in_specs=(P(*tok_spec, None, None), P(*tok_spec, None), x_spec, P(*x_spec[:2], x_spec[3])),
        out_specs=x_spec,
        check_vma=impl == "xla",
    )
    return fn(h_res, h_post, x, f)
