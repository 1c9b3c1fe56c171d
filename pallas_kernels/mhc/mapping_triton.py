"""mHC mapping kernels (SPEC §7.1), Pallas Triton backend (GPU).

Forward: a projection kernel, gridded over (token block, column span),
accumulates ``x @ phi`` (tensor cores, fp32 accumulate) and ``sum(x**2)`` over
its span; a coefficient kernel sums the spans' partials and runs the
coefficients and Sinkhorn in registers; with the pre, the pre family's forward
kernel then reads x again and writes ``layer_input``.

Backward: a coefficient kernel (sigmoid and Sinkhorn VJPs, Sinkhorn recomputed
from the saved logits) turns the coefficient cotangents into ``dy = d(x @ phi)``
(with the pre fused, ``<x[i], dli>`` first comes from the pre family's kernel),
then a dx kernel, gridded over (token block, column span) and looping over the
span's column blocks, computes ``dx = dy @ phi^T + c_x x (+ h_pre dli) (+ dx_in)``,
and one XLA matmul gives
``dphi^T = dy^T x``.
Refs are whole arrays; loads and stores are masked, so no size need divide a block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mhc import _coeffs, blocks, pre_triton
from pallas_kernels.mhc._common import (
    back_project,
    dot_tn,
    mapping_op,
    mapping_rules,
    project,
    split,
)
from pallas_kernels.mhc._triton_io import col_mask, row_mask

F32 = jnp.float32


def _info(info_ref, n):
    return _coeffs.load_info(lambda r: info_ref[pl.ds(r, 1), :], _iota, n)


def _iota(width):
    return jnp.arange(width)[None, :]


def _proj_kernel(x_ref, *refs, n, nparts, bt, bc, span):
    parts, part_ref = refs[:nparts], refs[nparts]
    t, nc, kp = x_ref.shape[0], x_ref.shape[1], part_ref.shape[1]
    t0, s = pl.program_id(0) * bt, pl.program_id(1)
    rows = row_mask(t0, bt, t)

    def body(j, carry):
        acc, sumsq = carry
        col = s * span + j * bc
        cols = col_mask(col, bc, nc)
        xb = plgpu.load(x_ref.at[pl.ds(t0, bt), pl.ds(col, bc)], mask=rows & cols, other=0.0)
        phis = [plgpu.load(p.at[:, pl.ds(col, bc)], mask=cols, other=0.0) for p in parts]
        xf = xb.astype(F32)
        return acc + project(xb, phis), sumsq + jnp.sum(xf * xf, axis=1, keepdims=True)

    init = (jnp.zeros((bt, kp), F32), jnp.zeros((bt, 1), F32))
    acc, sumsq = lax.fori_loop(0, span // bc, body, init)
    # Lanes >= K of acc are 0 (phi^T's zero padding rows): lane K carries sum(x^2).
    out = jnp.where(_iota(kp) == _coeffs.width(n), sumsq, acc)
    plgpu.store(part_ref.at[pl.ds(s * t + t0, bt), :], out, mask=rows)


def _coef_fwd_kernel(
    part_ref, info_ref, coef_ref, saved_ref, *, n, nc, spans, bt, num_iters, norm_eps, variant
):
    t = coef_ref.shape[0]
    t0 = pl.program_id(0) * bt
    rows = row_mask(t0, bt, t)
    info = _info(info_ref, n)
    k = _coeffs.width(n)
    total = plgpu.load(part_ref.at[pl.ds(t0, bt), :], mask=rows, other=0.0)
    for s in range(1, spans):  # a fixed order: bitwise repeatable
        total += plgpu.load(part_ref.at[pl.ds(s * t + t0, bt), :], mask=rows, other=0.0)
    coef, saved = _coeffs.forward_epilogue(
        jnp.where(info.lane == k, 0.0, total),
        _coeffs.lane_column(total, info, k),
        info,
        n=n,
        nc=nc,
        num_iters=num_iters,
        norm_eps=norm_eps,
        variant=variant,
    )
    plgpu.store(coef_ref.at[pl.ds(t0, bt), :], coef, mask=rows)
    plgpu.store(saved_ref.at[pl.ds(t0, bt), :], saved, mask=rows)


def proj(x2, parts, *, n, static):
    """Per-span partials (spans, T, kp) fp32 of ``x @ phi`` (lanes < K), ``sum(x^2)`` (lane K)."""
    t, nc, kp = x2.shape[0], x2.shape[1], parts[0].shape[0]
    blk = blocks.triton_mapping_proj(t, nc, kp, x2.dtype.itemsize)
    spans = pl.cdiv(nc, blk.span)
    kernel = functools.partial(
        _proj_kernel, n=n, nparts=len(parts), bt=blk.bt, bc=blk.bc, span=blk.span
    )
    partials = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, blk.bt), spans),
        out_shape=jax.ShapeDtypeStruct((spans * t, kp), F32),
        compiler_params=plgpu.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=static.interpret,
        name="mhc_mapping_proj_fwd",
    )(x2, *parts)
    return partials.reshape(spans, t, kp)


def coef_fwd(partials, info, *, n, c, static):
    """(coef, saved) (T, kp) fp32 from ``proj``'s partials."""
    spans, t, kp = partials.shape
    blk = blocks.triton_mapping_coef_fwd(t, kp)
    kernel = functools.partial(
        _coef_fwd_kernel,
        n=n,
        nc=n * c,
        spans=spans,
        bt=blk.bt,
        num_iters=static.num_iters,
        norm_eps=static.norm_eps,
        variant=static.variant,
    )
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, blk.bt),),
        out_shape=[jax.ShapeDtypeStruct((t, kp), F32)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=static.interpret,
        name="mhc_mapping_coef_fwd",
    )(partials.reshape(spans * t, kp), info)


def fwd(x2, parts, info, *, n, c, static, with_pre):
    """(coef, saved) (T, kp) fp32 and, when with_pre, layer_input (T, C) in x2.dtype.

    Three kernels: the projection, gridded over (token block, column span),
    leaves per-span partials of ``x @ phi`` and ``sum(x^2)``; the coefficient
    kernel sums them and runs the epilogue (Sinkhorn); then the pre kernel reads
    x again for ``layer_input``. One kernel per token block (reading x once, then
    re-reading the block from L2 for the pre) would leave one program per SM at
    large C, which costs more than the second read of x (see blocks.py;
    docs/benchmarks.md has the times).
    """
    partials = proj(x2, parts, n=n, static=static)
    coef, saved = coef_fwd(partials, info, n=n, c=c, static=static)
    li = pre_triton.fwd(coef, x2.reshape(x2.shape[0], n, c), static) if with_pre else None
    return coef, saved, li


def _coef_bwd_kernel(
    saved_ref, dcoef_ref, info_ref, dy_ref, dt_ref, dtraw_ref, *, n, c, bt, num_iters, variant
):
    pid = pl.program_id(0)
    t0 = pid * bt
    rows = row_mask(t0, bt, saved_ref.shape[0])
    info = _info(info_ref, n)
    saved = plgpu.load(saved_ref.at[pl.ds(t0, bt), :], mask=rows, other=1.0)
    dcoef = plgpu.load(dcoef_ref.at[pl.ds(t0, bt), :], mask=rows, other=0.0)
    dy, dt, dtraw = _coeffs.backward_epilogue(
        saved, dcoef, info, n=n, nc=n * c, num_iters=num_iters, variant=variant
    )
    plgpu.store(dy_ref.at[pl.ds(t0, bt), :], dy, mask=rows)
    for ref, val in ((dt_ref, dt), (dtraw_ref, dtraw)):
        plgpu.store(ref.at[pl.ds(pid, 1), :], jnp.sum(jnp.where(rows, val, 0.0), 0, keepdims=True))


def coef_bwd(saved, dcoef, info, *, n, c, static):
    """Coefficient backward: (dy (T, kp), dt and dt*raw partials (blocks, kp)), all fp32."""
    t, kp = saved.shape
    blk = blocks.triton_mapping_coef_bwd(t, kp)
    nb = pl.cdiv(t, blk.bt)
    kernel = functools.partial(
        _coef_bwd_kernel, n=n, c=c, bt=blk.bt, num_iters=static.num_iters, variant=static.variant
    )
    return pl.pallas_call(
        kernel,
        grid=(nb,),
        out_shape=[jax.ShapeDtypeStruct((t, kp), F32)] + [jax.ShapeDtypeStruct((nb, kp), F32)] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=static.interpret,
        name="mhc_mapping_coef_bwd",
    )(saved, dcoef, info)


def _dx_kernel(x_ref, dy_ref, phi_ref, *refs, n, c, bt, bc, span, with_pre, with_dx_in):
    dx_ref, extra = refs[-1], refs[:-1]
    t, kp = x_ref.shape[0], dy_ref.shape[1]
    t0, span0 = pl.program_id(0) * bt, pl.program_id(1) * span
    rows = row_mask(t0, bt, t)
    dy = plgpu.load(dy_ref.at[pl.ds(t0, bt), :], mask=rows, other=0.0)
    c_x = jnp.sum(jnp.where(_iota(kp) == _coeffs.width(n), dy, 0.0), 1, keepdims=True)
    dys = split(dy, x_ref.dtype)
    if with_pre:
        h_ref, dli_ref = extra[:2]
        h = [
            plgpu.load(h_ref.at[pl.ds(t0, bt), pl.ds(i, 1)], mask=rows, other=0.0) for i in range(n)
        ]

    # A loop over the span's column blocks (software-pipelined by num_stages)
    # rather than one program per block: dy, c_x and h are loaded once per span.
    @pl.loop(0, span // bc)
    def _(j):
        c0 = span0 + j * bc
        cols = col_mask(c0, bc, c)
        mask = rows & cols
        if with_pre:
            dli = plgpu.load(dli_ref.at[pl.ds(t0, bt), pl.ds(c0, bc)], mask=mask, other=0.0)
        for i in range(n):
            col = i * c + c0
            phi = plgpu.load(phi_ref.at[:, pl.ds(col, bc)], mask=cols, other=0.0)
            xb = plgpu.load(x_ref.at[pl.ds(t0, bt), pl.ds(col, bc)], mask=mask, other=0.0)
            dx = back_project(dys, [phi]) + c_x * xb.astype(F32)
            if with_pre:
                dx = dx + h[i] * dli.astype(F32)
            if with_dx_in:
                dx_in = plgpu.load(
                    extra[-1].at[pl.ds(t0, bt), pl.ds(col, bc)], mask=mask, other=0.0
                )
                dx = dx + dx_in.astype(F32)
            plgpu.store(
                dx_ref.at[pl.ds(t0, bt), pl.ds(col, bc)], dx.astype(dx_ref.dtype), mask=mask
            )


def x_bwd(x2, dy, parts, h_pre, dli, dx_in, *, n, c, static):
    """(dx2 (T, n*C) in x2.dtype, dphi^T (1, kp, n*C) fp32).

    dx is one kernel over (token block, column span) that streams x, dli and
    dx_in once; dphi^T = dy^T x is one XLA matmul (cuBLAS) over all tokens, with
    dy's 16-bit hi and lo parts stacked so that x is read once. (A single kernel
    doing both, gridded over columns with dphi accumulated in registers over a
    token range, is latency-bound, far below copy bandwidth:
    experiments/results/step_overhead_h100/NOTES.md.)
    """
    t, kp = dy.shape
    blk = blocks.triton_mapping_dx(t, c, kp)
    with_pre = h_pre is not None
    extra = ((h_pre, dli) if with_pre else ()) + ((dx_in,) if dx_in is not None else ())
    kernel = functools.partial(
        _dx_kernel,
        n=n,
        c=c,
        bt=blk.bt,
        bc=blk.bc,
        span=blk.span,
        with_pre=with_pre,
        with_dx_in=dx_in is not None,
    )
    dx2 = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, blk.bt), pl.cdiv(c, blk.span)),
        out_shape=jax.ShapeDtypeStruct(x2.shape, x2.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=static.interpret,
        name="mhc_mapping_dx",
    )(x2, dy, parts[0], *extra)  # back_project reads phi's hi part alone
    dys = split(dy, x2.dtype)
    dphi_t = dot_tn(jnp.concatenate(dys, axis=1), x2)  # (len(dys) * kp, n*C)
    return dx2, sum(dphi_t[i * kp : (i + 1) * kp] for i in range(len(dys)))[None]


mapping = mapping_op(mapping_rules("triton", fwd, coef_bwd, x_bwd, pre_triton.weight_grad))
"""``mapping(x (T, n, C), phi, bias, alpha, static, with_pre)``: see ``_common.mapping_op``."""
