"""Post-res-apply kernels (SPEC §7.3), Pallas Mosaic TPU backend.

Forward ``x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] f`` and backward
``dx[j] = sum_i h_res[i, j] dxn[i]``, ``df = sum_i h_post[i] dxn[i]``,
``dh_res[i, j] = <dxn[i], x[j]>``, ``dh_post[i] = <dxn[i], f>``: one program
per token block of whole rows, static lane chunks, fp32 math.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.mhc import _tpu_io, blocks
from pallas_kernels.mhc._common import post_res_op

F32 = jnp.float32


def _columns(ref, count):
    return [ref[:, k : k + 1].astype(F32) for k in range(count)]


def _fwd_kernel(hres_ref, hpost_ref, x_ref, f_ref, o_ref, *, n, c):
    h_res, h_post = _columns(hres_ref, n * n), _columns(hpost_ref, n)
    for a, w in blocks.tpu_chunks(c):
        xs = [x_ref[:, j * c + a : j * c + a + w].astype(F32) for j in range(n)]
        f = f_ref[:, a : a + w].astype(F32)
        for i in range(n):
            out = h_post[i] * f + sum(h_res[i * n + j] * xs[j] for j in range(n))
            o_ref[:, i * c + a : i * c + a + w] = out.astype(o_ref.dtype)


def fwd(h_res, h_post, x, f, static):
    """x_next (T, n, C) in x.dtype."""
    t, n, c = x.shape
    ins = [h_res.reshape(t, n * n), h_post, x.reshape(t, n * c), f]
    out = jax.ShapeDtypeStruct((t, n * c), x.dtype)
    bt, grid, params = _tpu_io.plan(t, _tpu_io.row_bytes(*ins, out), 0, "post-res fwd")
    res = pl.pallas_call(
        functools.partial(_fwd_kernel, n=n, c=c),
        grid=grid,
        in_specs=[_tpu_io.rows_spec(bt, a.shape[1]) for a in ins],
        out_specs=_tpu_io.rows_spec(bt, n * c),
        out_shape=out,
        compiler_params=params,
        interpret=static.interpret,
        name="mhc_post_res_fwd",
    )(*ins)
    return res.reshape(x.shape)


def _bwd_kernel(
    hres_ref, hpost_ref, x_ref, f_ref, dxn_ref, dx_ref, df_ref, dhres_ref, dhpost_ref, *, n, c
):
    h_res, h_post = _columns(hres_ref, n * n), _columns(hpost_ref, n)
    accs = [jnp.zeros((x_ref.shape[0], 1), F32) for _ in range(n * n + n)]
    for a, w in blocks.tpu_chunks(c):
        xs = [x_ref[:, j * c + a : j * c + a + w].astype(F32) for j in range(n)]
        ds = [dxn_ref[:, i * c + a : i * c + a + w].astype(F32) for i in range(n)]
        f = f_ref[:, a : a + w].astype(F32)
        for j in range(n):
            dx = sum(h_res[i * n + j] * ds[i] for i in range(n))
            dx_ref[:, j * c + a : j * c + a + w] = dx.astype(dx_ref.dtype)
        df_ref[:, a : a + w] = sum(h_post[i] * ds[i] for i in range(n)).astype(df_ref.dtype)
        pairs = [(ds[i], xs[j]) for i in range(n) for j in range(n)] + [(d, f) for d in ds]
        accs = [acc + jnp.sum(u * v, axis=1, keepdims=True) for acc, (u, v) in zip(accs, pairs)]
    for ref, vals in ((dhres_ref, accs[: n * n]), (dhpost_ref, accs[n * n :])):
        lane = _tpu_io.lane_index(len(vals))
        ref[...] = sum(jnp.where(lane == k, v, 0.0) for k, v in enumerate(vals))


def bwd(h_res, h_post, x, f, dxn, static):
    """(dh_res, dh_post) fp32, dx in x.dtype, df in f.dtype for cotangent dxn."""
    t, n, c = x.shape
    ins = [h_res.reshape(t, n * n), h_post, x.reshape(t, n * c), f, dxn.reshape(t, n * c)]
    outs = [
        jax.ShapeDtypeStruct((t, n * c), x.dtype),
        jax.ShapeDtypeStruct((t, c), f.dtype),
        jax.ShapeDtypeStruct((t, n * n), F32),
        jax.ShapeDtypeStruct((t, n), F32),
    ]
    bt, grid, params = _tpu_io.plan(t, _tpu_io.row_bytes(*ins, *outs), 0, "post-res bwd")
    dx, df, dh_res, dh_post = pl.pallas_call(
        functools.partial(_bwd_kernel, n=n, c=c),
        grid=grid,
        in_specs=[_tpu_io.rows_spec(bt, a.shape[1]) for a in ins],
        out_specs=[_tpu_io.rows_spec(bt, o.shape[1]) for o in outs],
        out_shape=outs,
        compiler_params=params,
        interpret=static.interpret,
        name="mhc_post_res_bwd",
    )(*ins)
    return dh_res.reshape(t, n, n), dh_post, dx.reshape(x.shape), df


apply_post_res = post_res_op(fwd, bwd)
"""``apply_post_res(h_res (T, n, n), h_post (T, n), x (T, n, C), f (T, C), static)``
-> (T, n, C) in x.dtype, differentiable."""
