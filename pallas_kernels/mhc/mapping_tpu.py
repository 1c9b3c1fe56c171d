"""mHC mapping kernels (SPEC §7.1), Pallas Mosaic TPU backend.

Forward: a token block's whole rows sit in VMEM, so ``x @ phi`` (MXU, fp32
accumulate), ``sum(x**2)``, the coefficients, Sinkhorn and, when fused, the
pre-apply all read x once. Backward: a coefficient kernel (sigmoid and Sinkhorn
VJPs, Sinkhorn recomputed from the saved logits) produces ``dy = d(x @ phi)``
(with the pre fused, ``<x[i], dli>`` first comes from the pre family's kernel);
an x kernel writes ``dx = dy @ phi^T + c_x x (+ h_pre dli)`` and accumulates
``dphi^T = dy^T x`` in its resident output block over the (sequential) token
grid. Rows past T in a last partial block are masked before any reduction
over tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.mhc import _coeffs, _tpu_io, blocks, pre_tpu
from pallas_kernels.mhc._common import (
    back_project,
    mapping_op,
    mapping_rules,
    phi_outer,
    project,
    split,
)

F32 = jnp.float32


def _info(info_ref, n):
    return _coeffs.load_info(lambda r: info_ref[r : r + 1, :], _tpu_io.lane_index, n)


def _fwd_kernel(x_ref, *refs, n, c, nparts, num_iters, norm_eps, variant, with_pre):
    parts = refs[:nparts]
    info_ref, coef_ref, saved_ref = refs[nparts : nparts + 3]
    bt, kp = coef_ref.shape
    info = _info(info_ref, n)
    acc, sumsq = jnp.zeros((bt, kp), F32), jnp.zeros((bt, 1), F32)
    for i in range(n):
        for a, w in blocks.tpu_chunks(c):
            col = i * c + a
            xb = x_ref[:, col : col + w]
            acc = acc + project(xb, [p[:, col : col + w] for p in parts])
            xf = xb.astype(F32)
            sumsq = sumsq + jnp.sum(xf * xf, axis=1, keepdims=True)
    coef, saved = _coeffs.forward_epilogue(
        acc, sumsq, info, n=n, nc=n * c, num_iters=num_iters, norm_eps=norm_eps, variant=variant
    )
    coef_ref[...] = coef
    saved_ref[...] = saved
    if with_pre:
        li_ref = refs[nparts + 3]
        for a, w in blocks.tpu_chunks(c):
            li = sum(coef[:, i : i + 1] * x_ref[:, i * c + a : i * c + a + w] for i in range(n))
            li_ref[:, a : a + w] = li.astype(li_ref.dtype)


def fwd(x2, parts, info, *, n, c, static, with_pre):
    """(coef, saved) (T, kp) fp32 and, when with_pre, layer_input (T, C) in x2.dtype."""
    t, kp = x2.shape[0], info.shape[1]
    outs = [jax.ShapeDtypeStruct((t, kp), F32)] * 2
    if with_pre:
        outs.append(jax.ShapeDtypeStruct((t, c), x2.dtype))
    rows = _tpu_io.row_bytes(x2, *outs)
    bt, grid, params = _tpu_io.plan(t, rows, _tpu_io.const_bytes(*parts, info), "mapping fwd")
    kernel = functools.partial(
        _fwd_kernel,
        n=n,
        c=c,
        nparts=len(parts),
        num_iters=static.num_iters,
        norm_eps=static.norm_eps,
        variant=static.variant,
        with_pre=with_pre,
    )
    res = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[_tpu_io.rows_spec(bt, n * c)]
        + [_tpu_io.full_spec(p.shape) for p in parts]
        + [_tpu_io.full_spec(info.shape)],
        out_specs=[_tpu_io.rows_spec(bt, o.shape[1]) for o in outs],
        out_shape=outs,
        compiler_params=params,
        interpret=static.interpret,
        name="mhc_mapping_fwd",
    )(x2, *parts, info)
    return res[0], res[1], res[2] if with_pre else None


def _coef_bwd_kernel(
    saved_ref, dcoef_ref, info_ref, dy_ref, dt_ref, dtraw_ref, *, n, c, t, num_iters, variant
):
    bt = saved_ref.shape[0]
    ok = _tpu_io.valid_rows(bt, t)
    info = _info(info_ref, n)
    saved = jnp.where(ok, saved_ref[...], 1.0)
    dcoef = jnp.where(ok, dcoef_ref[...], 0.0)
    dy, dt, dtraw = _coeffs.backward_epilogue(
        saved, dcoef, info, n=n, nc=n * c, num_iters=num_iters, variant=variant
    )
    dy_ref[...] = dy
    for ref, val in ((dt_ref, dt), (dtraw_ref, dtraw)):
        part = jnp.sum(jnp.where(ok, val, 0.0), axis=0, keepdims=True)
        ref[...] = jnp.broadcast_to(part, ref.shape[1:])[None]


def coef_bwd(saved, dcoef, info, *, n, c, static):
    """Coefficient backward: (dy (T, kp), dt and dt*raw partials (blocks, kp)), all fp32."""
    t, kp = saved.shape
    rows = _tpu_io.row_bytes(saved, dcoef, saved)
    bt, grid, params = _tpu_io.plan(t, rows, _tpu_io.const_bytes(info), "mapping coef bwd")
    kernel = functools.partial(
        _coef_bwd_kernel, n=n, c=c, t=t, num_iters=static.num_iters, variant=static.variant
    )
    dy, dt, dtraw = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[_tpu_io.rows_spec(bt, kp)] * 2 + [_tpu_io.full_spec(info.shape)],
        out_specs=[_tpu_io.rows_spec(bt, kp)] + [_tpu_io.partial_spec(kp)] * 2,
        out_shape=[jax.ShapeDtypeStruct((t, kp), F32)]
        + [jax.ShapeDtypeStruct((grid[0], 8, kp), F32)] * 2,
        compiler_params=params,
        interpret=static.interpret,
        name="mhc_mapping_coef_bwd",
    )(saved, dcoef, info)
    return dy, dt[:, 0], dtraw[:, 0]


def _x_bwd_kernel(x_ref, dy_ref, *refs, n, c, t, nparts, with_pre, with_dx_in):
    parts = refs[:nparts]
    extra = refs[nparts:-2]
    dx_ref, dphi_ref = refs[-2:]
    bt, kp = dy_ref.shape
    ok = _tpu_io.valid_rows(bt, t)
    dy = jnp.where(ok, dy_ref[...], 0.0)
    c_x = jnp.sum(jnp.where(_tpu_io.lane_index(kp) == _coeffs.width(n), dy, 0.0), 1, keepdims=True)
    dys = split(dy, x_ref.dtype)

    @pl.when(pl.program_id(0) == 0)
    def _():
        dphi_ref[...] = jnp.zeros_like(dphi_ref)

    for i in range(n):
        for a, w in blocks.tpu_chunks(c):
            col = i * c + a
            xb = jnp.where(ok, x_ref[:, col : col + w], 0.0).astype(x_ref.dtype)
            dx = back_project(dys, [p[:, col : col + w] for p in parts]) + c_x * xb.astype(F32)
            if with_pre:
                h_ref, dli_ref = extra[:2]
                dx = dx + h_ref[:, i : i + 1].astype(F32) * dli_ref[:, a : a + w].astype(F32)
            if with_dx_in:
                dx = dx + extra[-1][:, col : col + w].astype(F32)
            dx_ref[:, col : col + w] = dx.astype(dx_ref.dtype)
            dphi_ref[:, col : col + w] += phi_outer(dys, xb)


def x_bwd(x2, dy, parts, h_pre, dli, dx_in, *, n, c, static):
    """(dx2 (T, n*C) in x2.dtype, dphi^T partials (1, kp, n*C) fp32)."""
    t, kp = dy.shape
    with_pre, with_dx_in = h_pre is not None, dx_in is not None
    ins = [x2, dy] + ([h_pre, dli] if with_pre else []) + ([dx_in] if with_dx_in else [])
    rows = _tpu_io.row_bytes(*ins, x2)
    dphi = jax.ShapeDtypeStruct((kp, n * c), F32)
    consts = _tpu_io.const_bytes(*parts, dphi)
    bt, grid, params = _tpu_io.plan(t, rows, consts, "mapping x bwd", sequential=True)
    kernel = functools.partial(
        _x_bwd_kernel,
        n=n,
        c=c,
        t=t,
        nparts=len(parts),
        with_pre=with_pre,
        with_dx_in=with_dx_in,
    )
    in_specs = [_tpu_io.rows_spec(bt, n * c), _tpu_io.rows_spec(bt, kp)]
    in_specs += [_tpu_io.full_spec(p.shape) for p in parts]
    if with_pre:
        in_specs += [_tpu_io.rows_spec(bt, n), _tpu_io.rows_spec(bt, c)]
    if with_dx_in:
        in_specs.append(_tpu_io.rows_spec(bt, n * c))
    dx2, dphi_t = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[_tpu_io.rows_spec(bt, n * c), _tpu_io.full_spec(dphi.shape)],
        out_shape=[jax.ShapeDtypeStruct(x2.shape, x2.dtype), dphi],
        compiler_params=params,
        interpret=static.interpret,
        name="mhc_mapping_x_bwd",
    )(x2, dy, *parts, *ins[2:])
    return dx2, dphi_t[None]


mapping = mapping_op(mapping_rules("tpu", fwd, coef_bwd, x_bwd, pre_tpu.weight_grad))
"""``mapping(x (T, n, C), phi, bias, alpha, static, with_pre)``: see ``_common.mapping_op``."""
