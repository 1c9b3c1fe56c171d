"""Post-res-apply kernels (SPEC §7.3), Pallas Triton backend (GPU).

Forward ``x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] f``: reads (n+1)C,
writes nC per token, gridded over (token block, column block). Backward, one
program per token block looping over C:
``dx[j] = sum_i h_res[i, j] dxn[i]``, ``df = sum_i h_post[i] dxn[i]`` and the
coefficient cotangents ``dh_res[i, j] = <dxn[i], x[j]>``, ``dh_post[i] = <dxn[i], f>``
as row reductions of each chunk, summed in fp32 registers (no atomics).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mhc import blocks
from pallas_kernels.mhc._common import post_res_op
from pallas_kernels.mhc._triton_io import coeff_columns, col_mask, load_f32, row_mask, store_columns

F32 = jnp.float32


def _fwd_kernel(hres_ref, hpost_ref, x_ref, f_ref, o_ref, *, n, c, bt, bc):
    t0, c0 = pl.program_id(0) * bt, pl.program_id(1) * bc
    rows = row_mask(t0, bt, x_ref.shape[0])
    mask = rows & col_mask(c0, bc, c)
    h_res = coeff_columns(hres_ref, t0, bt, rows, n * n)
    h_post = coeff_columns(hpost_ref, t0, bt, rows, n)
    xs = [load_f32(x_ref, t0, bt, j * c + c0, bc, mask) for j in range(n)]
    f = load_f32(f_ref, t0, bt, c0, bc, mask)
    for i in range(n):
        out = h_post[i] * f + sum(h_res[i * n + j] * xs[j] for j in range(n))
        plgpu.store(
            o_ref.at[pl.ds(t0, bt), pl.ds(i * c + c0, bc)], out.astype(o_ref.dtype), mask=mask
        )


def fwd(h_res, h_post, x, f, static):
    """x_next (T, n, C) in x.dtype."""
    t, n, c = x.shape
    blk = blocks.triton_post_res_fwd(t, n, c)
    out = pl.pallas_call(
        functools.partial(_fwd_kernel, n=n, c=c, bt=blk.bt, bc=blk.bc),
        grid=(pl.cdiv(t, blk.bt), pl.cdiv(c, blk.bc)),
        out_shape=jax.ShapeDtypeStruct((t, n * c), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=static.interpret,
        name="mhc_post_res_fwd",
    )(h_res.reshape(t, n * n), h_post, x.reshape(t, n * c), f)
    return out.reshape(x.shape)


def _bwd_kernel(
    hres_ref,
    hpost_ref,
    x_ref,
    f_ref,
    dxn_ref,
    dx_ref,
    df_ref,
    dhres_ref,
    dhpost_ref,
    *,
    n,
    c,
    bt,
    bc,
):
    t0 = pl.program_id(0) * bt
    rows = row_mask(t0, bt, x_ref.shape[0])
    h_res = coeff_columns(hres_ref, t0, bt, rows, n * n)
    h_post = coeff_columns(hpost_ref, t0, bt, rows, n)

    def body(j, accs):
        mask = rows & col_mask(j * bc, bc, c)
        xs = [load_f32(x_ref, t0, bt, k * c + j * bc, bc, mask) for k in range(n)]
        ds = [load_f32(dxn_ref, t0, bt, k * c + j * bc, bc, mask) for k in range(n)]
        f = load_f32(f_ref, t0, bt, j * bc, bc, mask)
        for k in range(n):
            dx = sum(h_res[i * n + k] * ds[i] for i in range(n))
            plgpu.store(
                dx_ref.at[pl.ds(t0, bt), pl.ds(k * c + j * bc, bc)],
                dx.astype(dx_ref.dtype),
                mask=mask,
            )
        df = sum(h_post[i] * ds[i] for i in range(n))
        plgpu.store(df_ref.at[pl.ds(t0, bt), pl.ds(j * bc, bc)], df.astype(df_ref.dtype), mask=mask)
        pairs = [(ds[i], xs[k]) for i in range(n) for k in range(n)] + [(d, f) for d in ds]
        return tuple(a + jnp.sum(u * v, axis=1, keepdims=True) for a, (u, v) in zip(accs, pairs))

    zeros = tuple(jnp.zeros((bt, 1), F32) for _ in range(n * n + n))
    accs = lax.fori_loop(0, pl.cdiv(c, bc), body, zeros)
    store_columns(dhres_ref, t0, bt, rows, accs[: n * n])
    store_columns(dhpost_ref, t0, bt, rows, accs[n * n :])


def bwd(h_res, h_post, x, f, dxn, static):
    """(dh_res, dh_post) fp32, dx in x.dtype, df in f.dtype for cotangent dxn."""
    t, n, c = x.shape
    blk = blocks.triton_post_res_bwd(t, n, c)
    dx, df, dh_res, dh_post = pl.pallas_call(
        functools.partial(_bwd_kernel, n=n, c=c, bt=blk.bt, bc=blk.bc),
        grid=(pl.cdiv(t, blk.bt),),
        out_shape=[
            jax.ShapeDtypeStruct((t, n * c), x.dtype),
            jax.ShapeDtypeStruct((t, c), f.dtype),
            jax.ShapeDtypeStruct((t, n * n), F32),
            jax.ShapeDtypeStruct((t, n), F32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=static.interpret,
        name="mhc_post_res_bwd",
    )(h_res.reshape(t, n * n), h_post, x.reshape(t, n * c), f, dxn.reshape(t, n * c))
    return dh_res.reshape(t, n, n), dh_post, dx.reshape(x.shape), df


apply_post_res = post_res_op(fwd, bwd)
"""``apply_post_res(h_res (T, n, n), h_post (T, n), x (T, n, C), f (T, C), static)``
-> (T, n, C) in x.dtype, differentiable."""
