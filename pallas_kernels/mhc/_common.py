"""Glue shared by the Triton and Mosaic TPU kernel files.

* Matmul helpers for the kernels. x is read in its own dtype (bf16 in the paper)
  and every product accumulates in fp32. An fp32 operand meeting a 16-bit one
  is split into a 16-bit hi + lo pair, so phi keeps about 16 mantissa bits
  (tf32 keeps 10) with plain bf16 tensor-core/MXU products; fp32 x uses fp32
  products (``Precision.HIGHEST``).
* ``jax.custom_vjp`` builders: each backend file hands its pallas_call wrappers
  to these and gets differentiable ops on (T, n, C) streams. The glue packs and
  unpacks the coefficient rows (see ``_coeffs``) and sums the per-block
  partials the kernels leave (fixed order, so runs are bitwise repeatable).
  Every kernel output an op's backward needs is tagged with the checkpoint name
  ``KERNEL_OUTPUT``, so a remat policy that saves it (``mhc_jax.remat``'s
  ``save_connections``) never re-runs a forward kernel in the backward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.mhc import _coeffs

F32 = jnp.float32
KERNEL_OUTPUT = "mhc_kernel_output"


def split(a: jax.Array, dtype) -> tuple[jax.Array, ...]:
    """fp32 value -> (a,) for fp32 work, else (hi, lo) in the 16-bit dtype."""
    if jnp.dtype(dtype) == F32:
        return (a.astype(F32),)
    # hi = a rounded to the 16-bit type's mantissa on its bits (add half an ulp, clear
    # the rest), not by an fp32 -> 16-bit -> fp32 round trip: XLA on GPU allows excess
    # precision by default and folds that round trip away, which left lo = 0.
    # Non-finite values keep themselves (the carry of a NaN's low bits could reach the
    # sign), and values below the type's smallest normal go whole into lo (rounding
    # hi to a subnormal would round twice).
    a = a.astype(F32)
    info = jnp.finfo(dtype)
    drop = 23 - info.nmant
    bits = lax.bitcast_convert_type(a, jnp.uint32) + jnp.uint32(1 << (drop - 1))
    hi = lax.bitcast_convert_type(bits & jnp.uint32((0xFFFFFFFF >> drop) << drop), F32)
    hi = jnp.where(jnp.isfinite(a), jnp.where(jnp.abs(a) < info.smallest_normal, 0.0, hi), a)
    return hi.astype(dtype), (a - hi).astype(dtype)


def _dot(a, b, contract):
    precision = lax.Precision.HIGHEST if a.dtype == F32 else None
    return lax.dot_general(
        a, b, (contract, ((), ())), precision=precision, preferred_element_type=F32
    )


def dot_nt(a, b):
    """(M, K) x (N, K) -> (M, N) fp32."""
    return _dot(a, b, ((1,), (1,)))


def dot_nn(a, b):
    """(M, K) x (K, N) -> (M, N) fp32."""
    return _dot(a, b, ((1,), (0,)))


def dot_tn(a, b):
    """(K, M) x (K, N) -> (M, N) fp32."""
    return _dot(a, b, ((0,), (0,)))


def project(x, phi_parts):
    """x (M, W) in its dtype @ phi^T parts (kp, W) -> (M, kp) fp32."""
    return sum(dot_nt(x, p) for p in phi_parts)


def back_project(dy_parts, phi_parts):
    """dy (M, kp) @ phi^T (kp, W) -> (M, W) fp32, for dx in x's dtype.

    With 16-bit x the phi lo part is dropped: its 2^-9 relative contribution is
    the size of dx's own bf16 rounding, so the dot it would cost is skipped.
    """
    return sum(dot_nn(d, phi_parts[0]) for d in dy_parts)


def phi_outer(dy_parts, x):
    """sum_t dy[t]^T x[t]: (M, kp), (M, W) -> (kp, W) fp32."""
    return sum(dot_tn(d, x) for d in dy_parts)


class Static(NamedTuple):
    """Hashable non-differentiable arguments of the ops."""

    num_iters: int = 20
    norm_eps: float = 1e-6
    interpret: bool = False
    variant: str = "paper"  # "paper" or "deepseek_v4" (the kernels take no "lite")


def phi_parts(phi, kp, dtype):
    """phi (n*C, K) -> phi^T padded to (kp, n*C), split for x's dtype (see ``split``)."""
    k = phi.shape[1]
    phi_t = jnp.pad(phi.astype(F32).T, ((0, kp - k), (0, 0)))  # (kp, n*C), zero rows >= K
    return split(phi_t, dtype)


class XPass(NamedTuple):
    """What the mapping backward's x pass takes (``x_bwd``'s arguments): x2 (T, n*C),
    dy (T, kp) fp32 with c_x on lane K, phi^T's parts, h_pre and dli (or None), dx_in
    (T, n*C) (or None)."""

    x2: jax.Array
    dy: jax.Array
    parts: tuple
    h_pre: jax.Array | None
    dli: jax.Array | None
    dx_in: jax.Array | None
    n: int
    c: int


class MappingRules(NamedTuple):
    """A backend's mapping op as its custom-VJP rules (``mapping_rules``):
    ``forward(x, phi, bias, alpha, static, with_pre, tied, partials=None) -> (outs,
    residuals)`` and ``backward(static, with_pre, tied, residuals, cotangents)``;
    ``backward`` is ``finish(*x_pass(xp, static))`` for ``(xp, finish) =
    until_x_pass(static, with_pre, tied, residuals, cotangents)``, so that a caller
    may run the x pass its own way (``transition_op``'s fused backward)."""

    forward: Callable
    backward: Callable
    until_x_pass: Callable
    x_pass: Callable


def mapping_rules(
    backend: str, fwd: Callable, coef_bwd: Callable, x_bwd: Callable, pre_grad: Callable
) -> MappingRules:
    """The custom-VJP rules of ``op(x, phi, bias, alpha, static, with_pre, tied=False)``.

    x is (T, n, C); the op returns (h_pre, h_post, h_res), preceded by
    layer_input (T, C) in x.dtype when ``with_pre``. ``tied`` (with the pre only)
    appends x itself as a last output: a caller that feeds it to post-res
    hands post-res's x cotangent to this op's backward, whose x kernel adds it
    while writing dx, instead of autodiff adding the two (T, n, C) cotangents in
    a separate pass (read 2, write 1 stream slab). Backend callables:

    * ``fwd(x2, phi_parts, info, *, n, c, static, with_pre) -> (coef, saved, li)``;
      a backend whose projection another kernel can do (``transition_op``) also takes
      ``partials=``, that kernel's output
    * ``coef_bwd(saved, dcoef, info, *, n, c, static) -> (dy, dt_parts, dtraw_parts)``
    * ``x_bwd(x2, dy, phi_parts, h_pre, dli, dx_in, *, n, c, static) -> (dx2, dphi_t_parts)``
    * ``pre_grad(x2, dli, *, n, c, static) -> (T, n)``: <x[i], dli>, the pre's d h_pre

    with x2 = x.reshape(T, n*C); ``h_pre``/``dli`` of ``x_bwd`` are None unless
    ``with_pre``, ``dx_in`` (T, n*C) (added to dx) None unless ``tied``; partials
    carry a leading block axis.
    """

    def prepare(x, phi, bias, alpha):
        t, n, c = x.shape
        kp = _coeffs.packed_width(n, backend)
        info = _coeffs.column_info(n, kp, bias, alpha)
        return x.reshape(t, n * c), phi_parts(phi, kp, x.dtype), info, n, c

    def unpack(coef, n):
        k = _coeffs.width(n)
        return coef[:, :n], coef[:, n : 2 * n], coef[:, 2 * n : k].reshape(-1, n, n)

    def op_fwd(x, phi, bias, alpha, static, with_pre, tied, partials=None):
        if tied and not with_pre:
            raise ValueError("mapping op: tied=True needs with_pre=True")
        x2, parts, info, n, c = prepare(x, phi, bias, alpha)
        given = {} if partials is None else dict(partials=partials)
        kw = dict(n=n, c=c, static=static, with_pre=with_pre, **given)
        coef, saved, li = fwd(x2, parts, info, **kw)
        coef, saved = checkpoint_name(coef, KERNEL_OUTPUT), checkpoint_name(saved, KERNEL_OUTPUT)
        outs = unpack(coef, n)
        if with_pre:
            outs = (checkpoint_name(li, KERNEL_OUTPUT), *outs) + ((x,) if tied else ())
        h_pre = outs[1] if with_pre else None
        return outs, (x, phi, bias, alpha, saved, h_pre)

    def until_x_pass(static, with_pre, tied, residuals, g):
        x, phi, bias, alpha, saved, h_pre = residuals
        x2, parts, info, n, c = prepare(x, phi, bias, alpha)
        dx_in = g[-1].reshape(x2.shape) if tied else None
        g = g[:-1] if tied else g
        dli, g = (g[0], g[1:]) if with_pre else (None, g)
        kp, k = info.shape[1], _coeffs.width(n)
        d_pre, d_post, d_res = (a.astype(F32) for a in g)
        dcoef = jnp.concatenate(
            [d_pre, d_post, d_res.reshape(-1, n * n), jnp.zeros((x2.shape[0], kp - k), F32)], 1
        )
        if with_pre:
            dcoef = dcoef.at[:, :n].add(pre_grad(x2, dli, n=n, c=c, static=static))
        dy, dt_parts, dtraw_parts = coef_bwd(saved, dcoef, info, n=n, c=c, static=static)

        def finish(dx2, dphi_t):
            """(dx or None, dphi, dbias, dalpha) from the x pass's dx2 (or None) and
            dphi^T partials (any leading axis, summed)."""
            dtraw = jnp.sum(dtraw_parts, axis=0)
            dalpha = jnp.stack([dtraw[:n].sum(), dtraw[n : 2 * n].sum(), dtraw[2 * n : k].sum()])
            return (
                None if dx2 is None else dx2.reshape(x.shape),
                jnp.sum(dphi_t, axis=0)[:k].T.astype(phi.dtype),
                jnp.sum(dt_parts, axis=0)[:k].astype(bias.dtype),
                dalpha.astype(alpha.dtype),
            )

        return XPass(x2, dy, parts, h_pre, dli, dx_in, n, c), finish

    def x_pass(xp, static):
        return x_bwd(
            xp.x2, xp.dy, xp.parts, xp.h_pre, xp.dli, xp.dx_in, n=xp.n, c=xp.c, static=static
        )

    def op_bwd(static, with_pre, tied, residuals, g):
        xp, finish = until_x_pass(static, with_pre, tied, residuals, g)
        return finish(*x_pass(xp, static))

    return MappingRules(op_fwd, op_bwd, until_x_pass, x_pass)


def mapping_op(rules: MappingRules) -> Callable:
    """``op(x, phi, bias, alpha, static, with_pre, tied=False)`` with the custom VJP of
    ``rules`` (see ``mapping_rules``)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
    def op(x, phi, bias, alpha, static, with_pre, tied):
        return rules.forward(x, phi, bias, alpha, static, with_pre, tied)[0]

    op.defvjp(rules.forward, rules.backward)

    def mapping(x, phi, bias, alpha, static, with_pre, tied=False):
        return op(x, phi, bias, alpha, static, with_pre, tied)

    return mapping


def pre_backward(bwd_call: Callable) -> tuple[Callable, Callable]:
    """``(bwd, weight_grad)`` of the pre op from a backend's kernel call
    ``bwd_call(x2 (T, n*C), dli (T, C), h (T, n) | None, *, n, c, static)``, which
    returns (dx2, dh_pre), or (dh_pre,) alone when h is None.

    ``bwd(h, x, dli, static)``: (dx (T, n, C) in x.dtype, dh_pre (T, n) fp32).
    ``weight_grad(x2, dli, *, n, c, static)``: dh_pre[t, i] = <x[t, i], dli[t]> alone.
    """

    def bwd(h, x, dli, static):
        t, n, c = x.shape
        dx, dh = bwd_call(x.reshape(t, n * c), dli, h, n=n, c=c, static=static)
        return dx.reshape(x.shape), dh

    def weight_grad(x2, dli, *, n, c, static):
        return bwd_call(x2, dli, None, n=n, c=c, static=static)[0]

    return bwd, weight_grad


def pre_op(fwd: Callable, bwd: Callable) -> Callable:
    """``op(h_pre (T, n), x (T, n, C), static) -> (T, C)`` from
    ``fwd(h, x, static)`` and ``bwd(h, x, dli, static) -> (dx, dh)``."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
    def op(h, x, static):
        return fwd(h, x, static)

    def op_fwd(h, x, static):
        return checkpoint_name(fwd(h, x, static), KERNEL_OUTPUT), (h, x)

    def op_bwd(static, residuals, dli):
        h, x = residuals
        dx, dh = bwd(h, x, dli, static)
        return dh.astype(h.dtype), dx

    op.defvjp(op_fwd, op_bwd)
    return op


def post_res_op(fwd: Callable, bwd: Callable) -> Callable:
    """``op(h_res (T, n, n), h_post (T, n), x (T, n, C), f (T, C), static) -> (T, n, C)``
    from ``fwd(h_res, h_post, x, f, static)`` and
    ``bwd(h_res, h_post, x, f, dxn, static) -> (dh_res, dh_post, dx, df)``."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def op(h_res, h_post, x, f, static):
        return fwd(h_res, h_post, x, f, static)

    def op_fwd(h_res, h_post, x, f, static):
        out = checkpoint_name(fwd(h_res, h_post, x, f, static), KERNEL_OUTPUT)
        return out, (h_res, h_post, x, f)

    def op_bwd(static, residuals, dxn):
        h_res, h_post, x, f = residuals
        dh_res, dh_post, dx, df = bwd(h_res, h_post, x, f, dxn, static)
        return dh_res.astype(h_res.dtype), dh_post.astype(h_post.dtype), dx, df

    op.defvjp(op_fwd, op_bwd)
    return op


def transition_op(
    rules: MappingRules,
    fused_fwd: Callable,
    post_res_bwd: Callable,
    fused_bwd: Callable | None = None,
) -> Callable:
    """``op(h_res, h_post, x, f, phi, bias, alpha, static)`` -> (layer_input, h_pre,
    h_post', h_res', x_next): post-res of one layer (h_res (T, n, n), h_post (T, n),
    x (T, n, C), f (T, C)) then the tied mapping + pre of the next (phi, bias, alpha)
    on x_next, whose projection ``fused_fwd(h_res, h_post, x, f, phi, static) ->
    (x_next, partials)`` computes while it writes x_next. The backward is the two
    ops' backward rules in turn: the mapping's (its dx, with x_next's own cotangent
    added, is x_next's cotangent), then ``post_res_bwd`` (``post_res_op``'s bwd);
    ``fused_bwd(h_res, h_post, x, f, xp, static) -> (dh_res, dh_post, dx, df,
    dphi_t partials)``, given, replaces the mapping's x pass and post-res's backward
    where it returns a result (None: it does not take these inputs)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
    def op(h_res, h_post, x, f, phi, bias, alpha, static):
        return op_fwd(h_res, h_post, x, f, phi, bias, alpha, static)[0]

    def op_fwd(h_res, h_post, x, f, phi, bias, alpha, static):
        x_next, partials = fused_fwd(h_res, h_post, x, f, phi, static)
        x_next = checkpoint_name(x_next, KERNEL_OUTPUT)
        outs, res = rules.forward(x_next, phi, bias, alpha, static, True, True, partials)
        return outs, ((h_res, h_post, x, f), res)

    def op_bwd(static, residuals, g):
        (h_res, h_post, x, f), res = residuals
        xp, finish = rules.until_x_pass(static, True, True, res, g)
        fused = None if fused_bwd is None else fused_bwd(h_res, h_post, x, f, xp, static)
        if fused is None:
            dxn, dphi, dbias, dalpha = finish(*rules.x_pass(xp, static))
            dh_res, dh_post, dx, df = post_res_bwd(h_res, h_post, x, f, dxn, static)
        else:
            dh_res, dh_post, dx, df, dphi_t = fused
            _, dphi, dbias, dalpha = finish(None, dphi_t)
        return dh_res.astype(h_res.dtype), dh_post.astype(h_post.dtype), dx, df, dphi, dbias, dalpha

    op.defvjp(op_fwd, op_bwd)
    return op
