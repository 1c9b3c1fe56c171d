"""Pre-apply kernels (SPEC §7.2), Pallas Mosaic TPU backend.

Forward ``layer_input = sum_i h_pre[i] x[i]`` and backward ``dx[i] = h_pre[i] dli``,
``dh_pre[i] = <x[i], dli>``, one program per token block of whole rows, walking
C in static lane chunks; fp32 math, outputs in the stream dtypes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.mhc import _tpu_io, blocks
from pallas_kernels.mhc._common import pre_backward, pre_op

F32 = jnp.float32


def _fwd_kernel(h_ref, x_ref, o_ref, *, n, c):
    for a, w in blocks.tpu_chunks(c):
        out = sum(
            h_ref[:, i : i + 1].astype(F32) * x_ref[:, i * c + a : i * c + a + w].astype(F32)
            for i in range(n)
        )
        o_ref[:, a : a + w] = out.astype(o_ref.dtype)


def fwd(h, x, static):
    """layer_input (T, C) in x.dtype from h_pre (T, n) and x (T, n, C)."""
    t, n, c = x.shape
    x2 = x.reshape(t, n * c)
    out = jax.ShapeDtypeStruct((t, c), x.dtype)
    bt, grid, params = _tpu_io.plan(t, _tpu_io.row_bytes(h, x2, out), 0, "pre fwd")
    return pl.pallas_call(
        functools.partial(_fwd_kernel, n=n, c=c),
        grid=grid,
        in_specs=[_tpu_io.rows_spec(bt, n), _tpu_io.rows_spec(bt, n * c)],
        out_specs=_tpu_io.rows_spec(bt, c),
        out_shape=out,
        compiler_params=params,
        interpret=static.interpret,
        name="mhc_pre_fwd",
    )(h, x2)


def _bwd_kernel(x_ref, dli_ref, *refs, n, c, with_dx):
    dh_ref = refs[-1]
    accs = [jnp.zeros((x_ref.shape[0], 1), F32) for _ in range(n)]
    for a, w in blocks.tpu_chunks(c):
        dli = dli_ref[:, a : a + w].astype(F32)
        for i in range(n):
            col = i * c + a
            if with_dx:
                h_ref, dx_ref = refs[:2]
                dx = h_ref[:, i : i + 1].astype(F32) * dli
                dx_ref[:, col : col + w] = dx.astype(dx_ref.dtype)
            prod = x_ref[:, col : col + w].astype(F32) * dli
            accs[i] = accs[i] + jnp.sum(prod, axis=1, keepdims=True)
    lane = _tpu_io.lane_index(n)
    dh_ref[...] = sum(jnp.where(lane == i, acc, 0.0) for i, acc in enumerate(accs))


def _bwd_call(x2, dli, h, *, n, c, static):
    t = x2.shape[0]
    with_dx = h is not None
    outs = [jax.ShapeDtypeStruct((t, n), F32)]
    ins = [x2, dli]
    if with_dx:
        outs.insert(0, jax.ShapeDtypeStruct(x2.shape, x2.dtype))
        ins.append(h)
    bt, grid, params = _tpu_io.plan(t, _tpu_io.row_bytes(*ins, *outs), 0, "pre bwd")
    return pl.pallas_call(
        functools.partial(_bwd_kernel, n=n, c=c, with_dx=with_dx),
        grid=grid,
        in_specs=[_tpu_io.rows_spec(bt, a.shape[1]) for a in ins],
        out_specs=[_tpu_io.rows_spec(bt, o.shape[1]) for o in outs],
        out_shape=outs,
        compiler_params=params,
        interpret=static.interpret,
        name="mhc_pre_bwd" if with_dx else "mhc_pre_dh",
    )(*ins)


bwd, weight_grad = pre_backward(_bwd_call)

apply_pre = pre_op(fwd, bwd)
"""``apply_pre(h_pre (T, n), x (T, n, C), static) -> (T, C)`` in x.dtype, differentiable."""
