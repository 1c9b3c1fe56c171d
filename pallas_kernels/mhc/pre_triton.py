"""Pre-apply kernels (SPEC §7.2), Pallas Triton backend (GPU).

Forward ``layer_input = sum_i h_pre[i] x[i]``: reads n*C, writes C per token,
gridded over (token block, column block). Backward, one program per token
block looping over C: ``dx[i] = h_pre[i] dli`` (writes n*C) and
``dh_pre[i] = sum_c x[i, c] dli[c]`` (row reductions of each chunk, summed in
fp32 registers). All math in fp32; outputs in the stream dtypes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mhc import blocks
from pallas_kernels.mhc._common import pre_backward, pre_op
from pallas_kernels.mhc._triton_io import coeff_columns, col_mask, load_f32, row_mask, store_columns

F32 = jnp.float32


def _fwd_kernel(h_ref, x_ref, o_ref, *, n, c, bt, bc):
    t0, c0 = pl.program_id(0) * bt, pl.program_id(1) * bc
    rows = row_mask(t0, bt, x_ref.shape[0])
    mask = rows & col_mask(c0, bc, c)
    h = coeff_columns(h_ref, t0, bt, rows, n)
    out = sum(h[i] * load_f32(x_ref, t0, bt, i * c + c0, bc, mask) for i in range(n))
    plgpu.store(o_ref.at[pl.ds(t0, bt), pl.ds(c0, bc)], out.astype(o_ref.dtype), mask=mask)


def fwd(h, x, static):
    """layer_input (T, C) in x.dtype from h_pre (T, n) and x (T, n, C).

    h may have more columns than n (the mapping's packed coefficient rows, whose
    first n lanes are h_pre): only columns 0..n-1 are read.
    """
    t, n, c = x.shape
    blk = blocks.triton_pre_fwd(t, c)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, n=n, c=c, bt=blk.bt, bc=blk.bc),
        grid=(pl.cdiv(t, blk.bt), pl.cdiv(c, blk.bc)),
        out_shape=jax.ShapeDtypeStruct((t, c), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=static.interpret,
        name="mhc_pre_fwd",
    )(h, x.reshape(t, n * c))


def _bwd_kernel(x_ref, dli_ref, *refs, n, c, bt, bc, with_dx):
    dh_ref = refs[-1]
    t0 = pl.program_id(0) * bt
    rows = row_mask(t0, bt, x_ref.shape[0])
    if with_dx:
        h_ref, dx_ref = refs[:2]
        h = coeff_columns(h_ref, t0, bt, rows, n)

    def body(j, accs):
        mask = rows & col_mask(j * bc, bc, c)
        dli = load_f32(dli_ref, t0, bt, j * bc, bc, mask)
        out = []
        for i in range(n):
            col = i * c + j * bc
            xi = load_f32(x_ref, t0, bt, col, bc, mask)
            if with_dx:
                dx = (h[i] * dli).astype(dx_ref.dtype)
                plgpu.store(dx_ref.at[pl.ds(t0, bt), pl.ds(col, bc)], dx, mask=mask)
            out.append(accs[i] + jnp.sum(xi * dli, axis=1, keepdims=True))
        return tuple(out)

    zeros = tuple(jnp.zeros((bt, 1), F32) for _ in range(n))
    store_columns(dh_ref, t0, bt, rows, lax.fori_loop(0, pl.cdiv(c, bc), body, zeros))


def _bwd_call(x2, dli, h, *, n, c, static):
    t = x2.shape[0]
    blk = blocks.triton_pre_bwd(t, c)
    with_dx = h is not None
    out_shape = [jax.ShapeDtypeStruct((t, n), F32)]
    if with_dx:
        out_shape.insert(0, jax.ShapeDtypeStruct(x2.shape, x2.dtype))
    return pl.pallas_call(
        functools.partial(_bwd_kernel, n=n, c=c, bt=blk.bt, bc=blk.bc, with_dx=with_dx),
        grid=(pl.cdiv(t, blk.bt),),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=static.interpret,
        name="mhc_pre_bwd" if with_dx else "mhc_pre_dh",
    )(x2, dli, *((h,) if with_dx else ()))


bwd, weight_grad = pre_backward(_bwd_call)

apply_pre = pre_op(fwd, bwd)
"""``apply_pre(h_pre (T, n), x (T, n, C), static) -> (T, C)`` in x.dtype, differentiable."""
