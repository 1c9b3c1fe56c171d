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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.mhc import _sinkhorn_v4
from pallas_kernels.mhc.sinkhorn import DEEPSEEK_V4_EPS, multiplicative_runs

F32 = jnp.float32
G_PRE, G_POST, G_RES, G_RMS = 0.0, 1.0, 2.0, 3.0
INFO_ROWS = 8  # bias, alpha, group, lane, 4 unused (one fp32 sublane tile)


def width(n: int) -> int:
    """K = n*n + 2n, the number of mHC coefficients per token."""
    return n * n + 2 * n


def packed_width(n: int, backend: str) -> int:
    """Lanes of the packed row: K + 1 rounded up.

    Triton needs power-of-two shapes and tl.dot needs N >= 16, as do Mosaic GPU's
    wgmma operands whose rows are kp wide (a 16-bit row must fill a swizzle span of
    32, 64 or 128 bytes, or whole 128-byte ones); Mosaic TPU wants the phi^T parts
    (kp, n*C) in whole bf16 sublane tiles of 16 rows.
    """
    k1 = width(n) + 1
    if backend in ("triton", "mosaic_gpu"):
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
    bias, alpha, group, lane = (read_row(r).astype(F32) for r in range(4))
    return Info(bias, alpha, group, lane, iota(1 << (n - 1).bit_length()))


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
# >= n of each row stay 0; column sums there are replaced by 1. The scheme is
# ``sinkhorn.sinkhorn_knopp``'s (exact at every logit scale): iteration 0 in the log domain,
# then multiplicative runs (``multiplicative_runs``), the iterate rebuilt from its
# log lg between runs.


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


def _iteration(m, info: Info) -> tuple[jax.Array, ...]:
    """One Sinkhorn iteration: columns sum to 1, then rows (rows last, as in SPEC §5)."""
    return _normalise(_normalise(m, info, True), info, False)


def _iterate(m, info: Info, start, stop) -> tuple[jax.Array, ...]:
    return lax.fori_loop(start, stop, lambda _, m: _iteration(m, info), tuple(m))


def _first_iteration(t, info: Info):
    """Iteration 0 in the log domain from the logit rows t.

    Returns (lg, m, p): the log of its result and the result (rows), and the column
    softmax of t (its intermediate, for the VJP); all zero on lanes >= n but lg.
    """
    valid = info.row_lane < len(t)
    top = functools.reduce(jnp.maximum, t)  # column maxima (lanes >= n: 0)
    ec = [jnp.where(valid, jnp.exp(r - top), 0.0) for r in t]
    col = jnp.where(valid, sum(ec), 1.0)
    inv_col, log_col = 1.0 / col, jnp.log(col)
    p = tuple(r * inv_col for r in ec)
    lg, m = [], []
    for r in t:
        r = r - top  # row max before log_col, as in ``sinkhorn.sinkhorn_knopp``
        r = r - jnp.max(jnp.where(valid, r, -jnp.inf), axis=1, keepdims=True) - log_col
        e = jnp.where(valid, jnp.exp(r), 0.0)
        s = jnp.sum(e, axis=1, keepdims=True)
        lg.append(r - jnp.log(s))
        m.append(e * (1.0 / s))
    return tuple(lg), tuple(m), p


def _scaled_iterate(m, info: Info, start, stop):
    """``_iterate``, also returning the products u (rows, (BT, 1)) and v ((BT, np2(n)))
    of the row and column factors applied, so that the result is u * m * v."""

    def body(_, carry):
        m, u, v = carry
        inv_col = _inverse_sums(m, info, True)
        m = tuple(row * inv for row, inv in zip(m, inv_col))
        inv_row = _inverse_sums(m, info, False)
        m = tuple(row * inv for row, inv in zip(m, inv_row))
        return m, tuple(a * inv for a, inv in zip(u, inv_row)), v * inv_col[0]

    one = jnp.ones_like(m[0][:, :1])
    carry = (tuple(m), (one,) * len(m), jnp.ones_like(m[0]))
    return lax.fori_loop(start, stop, body, carry)


def _rebuild(lg, u, v, info: Info):
    """The iterate u * exp(lg) * v as exp(lg + log u + log v), and that log."""
    log_v = jnp.log(v)
    lg = tuple(r + jnp.log(a) + log_v for r, a in zip(lg, u))
    return lg, tuple(jnp.where(info.row_lane < len(lg), jnp.exp(r), 0.0) for r in lg)


def _run_starts(t, info: Info, runs):
    """The iterate at the start of every multiplicative run (before iteration 1 when
    there are none), and the first iteration's column softmax."""
    lg, m, p = _first_iteration(t, info)
    starts = [m]
    for start, stop in runs[:-1]:
        _, u, v = _scaled_iterate(m, info, start, stop)
        lg, m = _rebuild(lg, u, v, info)
        starts.append(m)
    return starts, p


def sinkhorn(t, info: Info, num_iters: int) -> tuple[jax.Array, ...]:
    """Sinkhorn-Knopp of the res logit rows t (``res_rows`` layout); returns the rows."""
    runs = multiplicative_runs(len(t), num_iters)
    starts, _ = _run_starts(t, info, runs)
    return _iterate(starts[-1], info, *runs[-1]) if runs else starts[-1]


def _iteration_vjp(m, grad, info: Info) -> tuple[jax.Array, ...]:
    """VJP of ``_iteration`` at its input m, on log-gradients (x * dL/dx, the cotangent
    of log x). Through out = x / s (s a column or row sum) a log-gradient G maps to
    G - out * sum(G) over the group: no division, so it stays bounded, while dL/dx
    itself grows like 1 / x for entries that later regrow (and overflows fp32)."""
    c = _normalise(m, info, True)
    r = _normalise(c, info, False)
    grad = tuple(gr - o * jnp.sum(gr, axis=1, keepdims=True) for gr, o in zip(grad, r))
    col = sum(grad)
    return tuple(gr - o * col for gr, o in zip(grad, c))


def sinkhorn_vjp(t, g, info: Info, num_iters: int) -> tuple[jax.Array, ...]:
    """VJP of ``sinkhorn`` w.r.t. the logit rows t for cotangent rows g.

    Back-propagates log-gradients (``_iteration_vjp``) through recomputed iterates:
    the iterate at the start of each multiplicative run (at most
    ``ceil(sqrt(num_iters - 1))`` iterations) is kept; going backwards, each iterate
    is recomputed from its run's start, so about ``sqrt(num_iters)`` iterates are
    live (registers or VMEM) and loops stay rolled (small kernels, fast compiles)
    for a few times the forward arithmetic. The recomputed iterates are bitwise the
    forward ones. The rebuild between runs is the identity in exact arithmetic and
    is differentiated as such; it only restores entries too small to matter (see
    ``sinkhorn.sinkhorn_knopp``), so the result is the exact VJP up to fp32 rounding.
    """
    runs = multiplicative_runs(len(t), num_iters)
    starts, p = _run_starts(t, info, runs)
    out = _iterate(starts[-1], info, *runs[-1]) if runs else starts[-1]
    grad = tuple(o * gr for o, gr in zip(out, g))
    for (start, stop), ckpt in reversed(list(zip(runs, starts))):

        def back(j, grad, start=start, stop=stop, ckpt=ckpt):
            return _iteration_vjp(_iterate(ckpt, info, start, stop - 1 - j), grad, info)

        grad = lax.fori_loop(0, stop - start, back, grad)
    # Iteration 0: starts[0] = row softmax of lc, lc = column log-softmax of t.
    grad = tuple(gr - m * jnp.sum(gr, axis=1, keepdims=True) for gr, m in zip(grad, starts[0]))
    col = sum(grad)
    return tuple(gr - pr * col for gr, pr in zip(grad, p))


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
    variant: str = "paper",
) -> tuple[jax.Array, jax.Array]:
    """Coefficients from the projection (``variant`` "paper" or "deepseek_v4").

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
    pre = sig + DEEPSEEK_V4_EPS if variant == "deepseek_v4" else sig
    coef = jnp.where(info.group == G_PRE, pre, jnp.where(info.group == G_POST, 2.0 * sig, 0.0))
    if variant == "deepseek_v4":
        valid = info.row_lane < n
        res = _sinkhorn_v4.rows_sinkhorn(res_rows(t, info, n), valid, num_iters, DEEPSEEK_V4_EPS)
    else:
        res = sinkhorn(res_rows(t, info, n), info, num_iters)
    coef = pack_res(res, info, n, coef)
    return coef, jnp.where(info.group == G_RMS, r, raw)


def backward_epilogue(
    saved: jax.Array,
    dcoef: jax.Array,
    info: Info,
    *,
    n: int,
    nc: int,
    num_iters: int,
    variant: str = "paper",
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
    t_res, g_res = res_rows(t, info, n), res_rows(dcoef, info, n)
    if variant == "deepseek_v4":
        valid = info.row_lane < n
        dt_res = _sinkhorn_v4.rows_sinkhorn_vjp(t_res, g_res, valid, num_iters, DEEPSEEK_V4_EPS)
    else:
        dt_res = sinkhorn_vjp(t_res, g_res, info, num_iters)
    dt = pack_res(dt_res, info, n, dt)
    draw = dt * info.alpha
    # raw = y / r and r = sqrt(sum(v^2)/nc + eps)  =>  dv gets -sum(draw * raw) / (nc r^2) * v.
    c_x = -jnp.sum(draw * raw, axis=1, keepdims=True) / (nc * r * r)
    return jnp.where(is_rms, c_x, draw / r), dt, dt * raw
