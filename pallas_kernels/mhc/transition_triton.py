"""One mHC layer's post-res fused with the next layer's mapping, Pallas Triton (GPU).

Between two sub-layers the streams are read by post-res (layer l) and then by
the mapping (layer l+1), forward and backward. ``transition`` does both on
shared passes over the streams:

Forward: post-res, then the mapping's projection, coefficient and pre kernels
(a kernel writing x_next while projecting it took 0.672 ms at best at T = 16384,
C = 2048 on an H100, against 0.313 ms for post-res + projection).
Backward (3 kernels + 1 matmul):
  * ``<x_next[i], dli>`` (the pre's dh_pre kernel), the coefficient backward;
  * one kernel per (token block, column span) looping over its columns:
    recomputes x_next from x and f (the forward's fp32 arithmetic, rounded the
    same way), forms x_next's whole cotangent
    ``dX = dy @ phi^T + c_x x_next + h_pre dli + dx_next`` in registers and runs
    post-res's backward on it: dx, df, dh_res, dh_post;
  * ``dphi^T = dy^T x_next``, one XLA matmul as in the mapping.
It moves 12 fewer C-rows per token than the mapping dx + post-res backward
kernels (n = 4), yet took 0.98 ms at best against their 0.74 ms in a training
step (H100, JAX 0.11.2): the n stream tiles, n cotangent tiles and the dot's
output all stay live per column block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mhc import _coeffs, blocks, mapping_triton, post_res_triton, pre_triton
from pallas_kernels.mhc._common import (
    KERNEL_OUTPUT,
    back_project,
    mapping_inputs,
    mapping_param_grads,
    packed_cotangent,
    split,
    unpack_coefficients,
)
from pallas_kernels.mhc._triton_io import coeff_columns, col_mask, load_f32, row_mask, store_columns

F32 = jnp.float32


def _lane(kp):
    return jnp.arange(kp)[None, :]


def _next_streams(h_res, h_post, xs, f, i, dtype):
    """Row i of x_next for one tile, rounded to the stream dtype, as fp32."""
    n = len(xs)
    out = h_post[i] * f + sum(h_res[i * n + k] * xs[k] for k in range(n))
    return out.astype(dtype)


def _bwd_kernel(
    hres_ref,
    hpost_ref,
    x_ref,
    f_ref,
    dy_ref,
    phi_ref,
    hpre_ref,
    dli_ref,
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
    span,
):
    t, kp = x_ref.shape[0], dy_ref.shape[1]
    t0, s = pl.program_id(0) * bt, pl.program_id(1)
    rows = row_mask(t0, bt, t)
    h_res = coeff_columns(hres_ref, t0, bt, rows, n * n)
    h_post = coeff_columns(hpost_ref, t0, bt, rows, n)
    h_pre = coeff_columns(hpre_ref, t0, bt, rows, n)
    dy = plgpu.load(dy_ref.at[pl.ds(t0, bt), :], mask=rows, other=0.0)
    c_x = jnp.sum(jnp.where(_lane(kp) == _coeffs.width(n), dy, 0.0), 1, keepdims=True)
    dys = split(dy, x_ref.dtype)

    def body(j, accs):
        c0 = s * span + j * bc
        cols = col_mask(c0, bc, c)
        mask = rows & cols
        xs = [load_f32(x_ref, t0, bt, k * c + c0, bc, mask) for k in range(n)]
        f = load_f32(f_ref, t0, bt, c0, bc, mask)
        dli = load_f32(dli_ref, t0, bt, c0, bc, mask)
        ds = []  # x_next's cotangent, row by row
        for i in range(n):
            col = i * c + c0
            x_next = _next_streams(h_res, h_post, xs, f, i, x_ref.dtype).astype(F32)
            phi = plgpu.load(phi_ref.at[:, pl.ds(col, bc)], mask=cols, other=0.0)
            d = back_project(dys, [phi]) + c_x * x_next + h_pre[i] * dli
            ds.append(d + load_f32(dxn_ref, t0, bt, col, bc, mask))
        for k in range(n):
            dx = sum(h_res[i * n + k] * ds[i] for i in range(n))
            plgpu.store(
                dx_ref.at[pl.ds(t0, bt), pl.ds(k * c + c0, bc)], dx.astype(dx_ref.dtype), mask=mask
            )
        df = sum(h_post[i] * ds[i] for i in range(n))
        plgpu.store(df_ref.at[pl.ds(t0, bt), pl.ds(c0, bc)], df.astype(df_ref.dtype), mask=mask)
        pairs = [(ds[i], xs[k]) for i in range(n) for k in range(n)] + [(d, f) for d in ds]
        return tuple(a + jnp.sum(u * v, axis=1, keepdims=True) for a, (u, v) in zip(accs, pairs))

    zeros = tuple(jnp.zeros((bt, 1), F32) for _ in range(n * n + n))
    accs = lax.fori_loop(0, span // bc, body, zeros)
    store_columns(dhres_ref, s * t + t0, bt, rows, accs[: n * n])
    store_columns(dhpost_ref, s * t + t0, bt, rows, accs[n * n :])


def post_res_dx_bwd(h_res2, h_post, x2, f, dy, phi_hi, h_pre, dli, dxn2, *, n, c, static):
    """(dx2 (T, n*C) in x2.dtype, df (T, C) in f.dtype, and dh_res (T, n*n), dh_post
    (T, n) fp32 as per-span partials (spans, T, .)).

    Gridded over (token block, column span of C), each program looping over its
    span's column blocks; the coefficient cotangents are row sums over C, so each
    span leaves its own partial sums.
    """
    t = x2.shape[0]
    blk = blocks.triton_transition_bwd(t, c, dy.shape[1])
    spans = pl.cdiv(c, blk.span)
    dx2, df, dh_res, dh_post = pl.pallas_call(
        functools.partial(_bwd_kernel, n=n, c=c, bt=blk.bt, bc=blk.bc, span=blk.span),
        grid=(pl.cdiv(t, blk.bt), spans),
        out_shape=[
            jax.ShapeDtypeStruct(x2.shape, x2.dtype),
            jax.ShapeDtypeStruct(f.shape, f.dtype),
            jax.ShapeDtypeStruct((spans * t, n * n), F32),
            jax.ShapeDtypeStruct((spans * t, n), F32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=blk.num_warps, num_stages=blk.num_stages),
        interpret=static.interpret,
        name="mhc_transition_bwd",
    )(h_res2, h_post, x2, f, dy, phi_hi, h_pre, dli, dxn2)
    return dx2, df, dh_res.reshape(spans, t, n * n), dh_post.reshape(spans, t, n)


def _transition_fwd(x, f, h_res, h_post, phi, bias, alpha, static):
    t, n, c = x.shape
    x_next = post_res_triton.fwd(h_res, h_post, x, f, static)
    xn2, parts, info, _, _ = mapping_inputs(x_next, phi, bias, alpha, "triton")
    coef, saved, li = mapping_triton.fwd(xn2, parts, info, n=n, c=c, static=static, with_pre=True)
    coef, saved, li, x_next = (checkpoint_name(a, KERNEL_OUTPUT) for a in (coef, saved, li, x_next))
    h_pre, h_post_next, h_res_next = unpack_coefficients(coef, n)
    residuals = (x, f, h_res, h_post, phi, bias, alpha, x_next, saved, h_pre)
    return (li, h_pre, h_post_next, h_res_next, x_next), residuals


def _transition_bwd(static, residuals, g):
    x, f, h_res, h_post, phi, bias, alpha, x_next, saved, h_pre = residuals
    dli, d_pre, d_post, d_res, dxn = g
    t, n, c = x.shape
    x2, parts, info, _, _ = mapping_inputs(x, phi, bias, alpha, "triton")
    xn2 = x_next.reshape(t, n * c)
    kw = dict(n=n, c=c, static=static)
    dcoef = packed_cotangent(d_pre, d_post, d_res, info.shape[1])
    dcoef = dcoef.at[:, :n].add(pre_triton.weight_grad(xn2, dli, **kw))
    dy, dt_parts, dtraw_parts = mapping_triton.coef_bwd(saved, dcoef, info, **kw)
    dx2, df, dh_res_parts, dh_post_parts = post_res_dx_bwd(
        h_res.reshape(t, n * n),
        h_post,
        x2,
        f,
        dy,
        parts[0],
        h_pre,
        dli,
        dxn.reshape(xn2.shape),
        **kw,
    )
    grads = mapping_param_grads(
        mapping_triton.phi_grad(dy, xn2), dt_parts, dtraw_parts, phi, bias, alpha, n
    )
    dh_res, dh_post = jnp.sum(dh_res_parts, axis=0), jnp.sum(dh_post_parts, axis=0)
    return (
        dx2.reshape(x.shape),
        df,
        dh_res.reshape(h_res.shape).astype(h_res.dtype),
        dh_post.astype(h_post.dtype),
        *grads,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def transition(x, f, h_res, h_post, phi, bias, alpha, static):
    """Post-res of one layer, then mapping + pre of the next, with fused passes.

    Args:
      x: (T, n, C) streams entering layer l; f: (T, C) its branch output, both in
        the stream dtype; h_res (T, n, n), h_post (T, n): layer l's coefficients.
      phi (n*C, K), bias (K,), alpha (3,): layer l+1's mapping parameters.
      static: ``_common.Static``.

    Returns:
      (layer_input (T, C), h_pre (T, n), h_post (T, n), h_res (T, n, n), x_next
      (T, n, C)) of layer l+1: the outputs of ``mapping(x_next, ..., with_pre=True,
      tied=True)`` with ``x_next = apply_post_res(h_res, h_post, x, f)``.
    """
    return _transition_fwd(x, f, h_res, h_post, phi, bias, alpha, static)[0]


transition.defvjp(_transition_fwd, _transition_bwd)
