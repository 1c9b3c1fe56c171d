"""mHC coefficient math shared by the Triton and Mosaic TPU kernels (SPEC §4, §5).

Per-token coefficients travel in one packed fp32 row of ``kp`` lanes, in phi's
column order, so the kernels never reshape or slice values (Triton cannot):

    lanes [0, n)            pre
    lanes [n, 2n)           post
    lanes [2n, 2n + n*n)    res, row-major (lane 2n + i*n + j holds entry (i, j))
    lane  K = n*n + 2n      spare: the RMS r in ``saved``, the x-coefficient in ``dy``
    lanes (K, kp)           zero padding

Lanes are picked by masks built from a small fp32 ``info`` table of per-lane
constants (``column_info``), loaded once per kernel. Everything here is plain
jnp on values, so one copy serves both backends; the kernels only differ in how
they read refs.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mhc_jax.sinkhorn import LOGIT_FLOOR

F32 = jnp.float32
G_PRE, G_POST, G_RES, G_RMS = 0.0, 1.0, 2.0, 3.0
INFO_ROWS = 8  # bias, alpha, group, lane, 4 unused (one fp32 sublane tile)


def width(n: int) -> int:
    """K = n*n + 2n, the number of mHC coefficients per token."""
    return n * n + 2 * n


def packed_width(n: int, backend: str) -> int:
    """Lanes of the packed row: K + 1 rounded up.

    Triton needs power-of-two shapes and tl.dot needs N >= 16; Mosaic wants the
    phi^T parts (kp, n*C) in whole bf16 sublane tiles of 16 rows.
    """
    k1 = width(n) + 1
    if backend == "triton":
        return max(16, 1 << (k1 - 1).bit_length())
    return -(-k1 // 16) * 16


def column_info(n: int, kp: int, bias: jax.Array, alpha: jax.Array) -> jax.Array:
    """(INFO_ROWS, kp) fp32 per-lane constants: bias, alpha, group, lane."""
    k = width(n)
    lane = jnp.arange(kp)
    group = jnp.select(
        [lane < n, lane < 2 * n, lane < k, lane == k], [G_PRE, G_POST, G_RES, G_RMS], -1.0
    )
    alpha = alpha.astype(F32)
    alpha_lane = jnp.select([lane < n, lane < 2 * n, lane < k], [alpha[0], alpha[1], alpha[2]], 0.0)
    bias_lane = jnp.zeros((kp,), F32).at[:k].set(bias.astype(F32))
    rows = [bias_lane, alpha_lane, group, lane]
    info = jnp.stack([r.astype(F32) for r in rows])
    return jnp.concatenate([info, jnp.zeros((INFO_ROWS - len(rows), kp), F32)])


class Info(NamedTuple):
    """The rows of ``column_info`` as (1, kp) fp32 values inside a kernel, plus lane numbers."""

    bias: jax.Array
    alpha: jax.Array
    group: jax.Array
    lane: jax.Array
    row_lane: jax.Array  # (1, np2(n)) int32 lane numbers of a res row


def load_info(read_row, iota, n: int) -> Info:
    """Builds ``Info`` from ``read_row(r) -> (1, kp)`` and ``iota(w) -> (1, w)`` int32
    (the backend-specific ref read and 2-D iota)."""
    rows = (read_row(r).astype(F32) for r in range(4))
    return Info(*rows, iota(1 << (n - 1).bit_length()))


def lane_column(a: jax.Array, info: Info, k: int) -> jax.Array:
    """Lane k of a (BT, kp) value as (BT, 1)."""
    return jnp.sum(jnp.where(info.lane == k, a, 0.0), axis=1, keepdims=True)


def res_rows(a: jax.Array, info: Info, n: int) -> tuple[jax.Array, ...]:
    """Rows of the res matrix in the lanes of a (BT, kp) value, as n (BT, np2(n)) values."""
    rows = []
    for i in range(n):
        row = jnp.zeros(a.shape[:1] + info.row_lane.shape[1:], a.dtype)
        for j in range(n):
            row = jnp.where(info.row_lane == j, lane_column(a, info, 2 * n + i * n + j), row)
        rows.append(row)
    return tuple(rows)


def pack_res(rows, info: Info, n: int, base: jax.Array) -> jax.Array:
    """``base`` (BT, kp) with its res lanes replaced by the entries of the rows."""
    for i, row in enumerate(rows):
        for j in range(n):
            entry = jnp.sum(jnp.where(info.row_lane == j, row, 0.0), axis=1, keepdims=True)
            base = jnp.where(info.lane == 2 * n + i * n + j, entry, base)
    return base


# Sinkhorn works on the n rows as separate (BT, np2(n)) values: column sums are
# element-wise adds of the rows and row sums reduce only np2(n) lanes, so the 40
# normalisations per token (and their VJP) need no wide lane reductions. Lanes
# >= n of each row stay 0; column sums there are replaced by 1.


def _inverse_sums(m, info: Info, by_col: bool) -> tuple[jax.Array, ...]:
    """Each row's normalisers, inverted: 1 / column sums (shared by all rows) or 1 / its
    row sum. One reciprocal per normaliser and multiplies, rather than a division per
    entry (IEEE fp32 division costs several instructions on a GPU)."""
    if by_col:
        col = jnp.where(info.row_lane < len(m), sum(m), 1.0)
        return (1.0 / col,) * len(m)
    return tuple(1.0 / jnp.sum(row, axis=1, keepdims=True) for row in m)


def _normalise(m, info: Info, by_col: bool) -> tuple[jax.Array, ...]:
    return tuple(row * inv for row, inv in zip(m, _inverse_sums(m, info, by_col)))


def _normalise_vjp(m, g, info: Info, by_col: bool) -> tuple[jax.Array, ...]:
    """VJP of ``_normalise`` at input m: out = m / s  =>  dm = (g - sum_group(g * out)) / s."""
    invs = _inverse_sums(m, info, by_col)
    gout = [gr * (row * inv) for gr, row, inv in zip(g, m, invs)]
    if by_col:
        gsums = (sum(gout),) * len(m)
    else:
        gsums = tuple(jnp.sum(r, axis=1, keepdims=True) for r in gout)
    return tuple((gr - gs) * inv for gr, gs, inv in zip(g, gsums, invs))


def _iteration(m, info: Info) -> tuple[jax.Array, ...]:
    """One Sinkhorn iteration: columns sum to 1, then rows (rows last, as in SPEC §5)."""
    return _normalise(_normalise(m, info, True), info, False)


def _iterate(m, info: Info, start, stop) -> tuple[jax.Array, ...]:
    return lax.fori_loop(start, stop, lambda _, m: _iteration(m, info), tuple(m))


def _sinkhorn_start(t, info: Info):
    """exp of the max-shifted, floored logits (as mhc_jax.sinkhorn), and where not floored."""
    valid = info.row_lane < len(t)
    top = functools.reduce(
        jnp.maximum, [jnp.max(jnp.where(valid, r, -jnp.inf), axis=1, keepdims=True) for r in t]
    )
    shifted = [r - top for r in t]
    m = tuple(jnp.where(valid, jnp.exp(jnp.maximum(r, LOGIT_FLOOR)), 0.0) for r in shifted)
    return m, tuple(valid & (r > LOGIT_FLOOR) for r in shifted)


def sinkhorn(t, info: Info, num_iters: int) -> tuple[jax.Array, ...]:
    """Sinkhorn-Knopp of the res logit rows t (``res_rows`` layout); returns the rows."""
    return _iterate(_sinkhorn_start(t, info)[0], info, 0, num_iters)


def sinkhorn_vjp(t, g, info: Info, num_iters: int) -> tuple[jax.Array, ...]:
    """Exact VJP of ``sinkhorn`` w.r.t. the logit rows t for cotangent rows g.

    Back-propagates through recomputed iterates: the forward keeps the iterate
    at the start of every segment of ``seg = ceil(sqrt(num_iters))`` iterations;
    going backwards, each iterate is recomputed from its segment's checkpoint.
    The recomputed iterates are bitwise the forward ones, so the result equals
    autodiff of the unrolled loop, with about ``num_iters / seg`` iterates live
    (registers or VMEM) and rolled loops (small kernels, fast compiles) for a few
    times the forward arithmetic (the whole coefficient backward, alone: about
    0.097 ms for 16384 tokens at n = 4 on an H100, 0.13-0.14 ms with a division
    per entry). Keeping each segment's normalisations instead, unrolled, took
    Triton minutes to compile and ran slower (commit d5a96a3).
    """
    seg = math.isqrt(num_iters - 1) + 1
    bounds = [(a, min(a + seg, num_iters)) for a in range(0, num_iters, seg)]
    m0, alive = _sinkhorn_start(t, info)
    checkpoints, m = [], m0
    for start, stop in bounds:
        checkpoints.append(m)
        m = _iterate(m, info, start, stop)
    gm = tuple(g)
    for (start, stop), ckpt in reversed(list(zip(bounds, checkpoints))):

        def back(j, gm, start=start, stop=stop, ckpt=ckpt):
            m = _iterate(ckpt, info, start, stop - 1 - j)
            gm = _normalise_vjp(_normalise(m, info, True), gm, info, False)
            return _normalise_vjp(m, gm, info, True)

        gm = lax.fori_loop(0, stop - start, back, gm)
    return tuple(jnp.where(a, m * d, 0.0) for a, m, d in zip(alive, m0, gm))


def _sigmoid(t: jax.Array) -> jax.Array:
    return 1.0 / (1.0 + jnp.exp(-t))


def forward_epilogue(
    acc: jax.Array,
    sumsq: jax.Array,
    info: Info,
    *,
    n: int,
    nc: int,
    num_iters: int,
    norm_eps: float,
) -> tuple[jax.Array, jax.Array]:
    """Coefficients from the projection.

    Args:
      acc: (BT, kp) fp32 ``v @ phi`` (zero on lanes >= K).
      sumsq: (BT, 1) fp32 ``sum(v**2)`` over the n*C values.
      info: per-lane constants.

    Returns:
      coef (BT, kp) fp32 [h_pre | h_post | h_res | 0], and saved (BT, kp) fp32
      [raw | r | 0] with raw = acc / r: all the backward pass needs.
    """
    r = jnp.sqrt(sumsq / nc + norm_eps)
    raw = acc / r
    t = raw * info.alpha + info.bias
    sig = _sigmoid(t)
    coef = jnp.where(info.group == G_PRE, sig, jnp.where(info.group == G_POST, 2.0 * sig, 0.0))
    coef = pack_res(sinkhorn(res_rows(t, info, n), info, num_iters), info, n, coef)
    return coef, jnp.where(info.group == G_RMS, r, raw)


def backward_epilogue(
    saved: jax.Array, dcoef: jax.Array, info: Info, *, n: int, nc: int, num_iters: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Coefficient backward: cotangents of coef -> cotangent of the projection.

    Args:
      saved: (BT, kp) ``forward_epilogue``'s second output.
      dcoef: (BT, kp) cotangent of coef (lanes >= K ignored).

    Returns:
      dy (BT, kp): d(v @ phi) on lanes < K and, on lane K, the coefficient c_x
        with dv = dy @ phi^T + c_x * v (the RMS path);
      dt (BT, kp): cotangent of the logits t (sums to d_bias over tokens);
      dt * raw (BT, kp): sums over tokens and groups to d_alpha.
    """
    is_rms = info.group == G_RMS
    r = jnp.sum(jnp.where(is_rms, saved, 0.0), axis=1, keepdims=True)
    raw = jnp.where(is_rms, 0.0, saved)
    t = raw * info.alpha + info.bias
    sig = _sigmoid(t)
    dsig = dcoef * sig * (1.0 - sig)
    dt = jnp.where(info.group == G_PRE, dsig, jnp.where(info.group == G_POST, 2.0 * dsig, 0.0))
    dt_res = sinkhorn_vjp(res_rows(t, info, n), res_rows(dcoef, info, n), info, num_iters)
    dt = pack_res(dt_res, info, n, dt)
    draw = dt * info.alpha
    # raw = y / r and r = sqrt(sum(v^2)/nc + eps)  =>  dv gets -sum(draw * raw) / (nc r^2) * v.
    c_x = -jnp.sum(draw * raw, axis=1, keepdims=True) / (nc * r * r)
    return jnp.where(is_rms, c_x, draw / r), dt, dt * raw
