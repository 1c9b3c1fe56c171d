"""The mHC coefficient epilogue and its VJP, one array per coefficient (SPEC §4, §5).

The math of ``_coeffs.forward_epilogue`` / ``backward_epilogue``, equal up to
rounding (same Sinkhorn scheme: iteration 0 in the log domain, multiplicative runs,
rebuilds between runs, log-gradient VJP through recomputed iterates), but every
per-token coefficient is its own array of any shape: a Sinkhorn row or column sum is
a sum of n arrays, so the math is element-wise over tokens and needs no lane
reductions. ``epilogue_mosaic`` runs it on (128,) row vectors, one token per thread;
as plain XLA ops it serves as that kernel's test reference (on a GPU its loops
become XLA while loops, a kernel launch per iteration). Loops stay rolled
(``lax.fori_loop``): unrolled, the VJP is ~14k HLO ops at n = 4, too many for XLA to
compile quickly.

Coefficient k of a token follows phi's column order: pre [0, n), post [n, 2n), res
[2n, K) row-major (entry (i, j) at 2n + i*n + j).
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.mhc import _sinkhorn_v4
from pallas_kernels.mhc.sinkhorn import DEEPSEEK_V4_EPS, multiplicative_runs

Rows = list[list[jax.Array]]  # n x n per-token entries of a res matrix
Keep = Callable[[Rows], Callable[[], Rows]]  # stores an iterate, returns its reload


def in_registers(m: Rows) -> Callable[[], Rows]:
    """The default ``Keep``: the iterate stays where it is (in XLA, or in registers)."""
    return lambda: m


def _sigmoid(t):
    return 1.0 / (1.0 + jnp.exp(-t))


def _sum(values):
    return functools.reduce(operator.add, values)  # no 0 + ..., unlike sum()


def _col_sums(m: Rows) -> list[jax.Array]:
    return [_sum([row[j] for row in m]) for j in range(len(m))]


def _row_sums(m: Rows) -> list[jax.Array]:
    return [_sum(row) for row in m]


def _scale_cols(m: Rows, inv: Sequence) -> Rows:
    return [[e * i for e, i in zip(row, inv)] for row in m]


def _scale_rows(m: Rows, inv: Sequence) -> Rows:
    return [[e * i for e in row] for row, i in zip(m, inv)]


def _step(m: Rows):
    """One Sinkhorn iteration: columns sum to 1, then rows (rows last, SPEC §5), one
    reciprocal per sum. Returns (result, 1 / row sums, 1 / column sums)."""
    inv_col = [1.0 / s for s in _col_sums(m)]
    m = _scale_cols(m, inv_col)
    inv_row = [1.0 / s for s in _row_sums(m)]
    return _scale_rows(m, inv_row), inv_row, inv_col


def _iteration(m: Rows) -> Rows:
    return _step(m)[0]


def _iterate(m: Rows, count) -> Rows:
    return lax.fori_loop(0, count, lambda _, m: _iteration(m), m)


def _first_iteration(t: Rows):
    """(lg, m, p): iteration 0's log and result, and the column softmax of t."""
    n = len(t)
    top = [functools.reduce(jnp.maximum, [row[j] for row in t]) for j in range(n)]
    ec = [[jnp.exp(t[i][j] - top[j]) for j in range(n)] for i in range(n)]
    col = _col_sums(ec)
    inv_col, log_col = [1.0 / s for s in col], [jnp.log(s) for s in col]
    p = _scale_cols(ec, inv_col)
    lg, m = [], []
    for i in range(n):
        a = [t[i][j] - top[j] for j in range(n)]
        row_max = functools.reduce(jnp.maximum, a)
        r = [a[j] - row_max - log_col[j] for j in range(n)]
        e = [jnp.exp(v) for v in r]
        s = _sum(e)
        inv, log_s = 1.0 / s, jnp.log(s)
        lg.append([v - log_s for v in r])
        m.append([v * inv for v in e])
    return lg, m, p


def _scaled_iterate(m: Rows, count: int):
    """``_iterate`` (count >= 1) plus the products u (per row) and v (per column) of
    the factors applied, so that the result is u_i * m_ij * v_j."""

    def body(_, carry):
        m, u, v = carry
        m, inv_row, inv_col = _step(m)
        return m, [a * b for a, b in zip(u, inv_row)], [a * b for a, b in zip(v, inv_col)]

    # the first iteration outside the loop: its factors start u and v with the
    # entries' own layout (a Mosaic GPU loop carry must keep its layout)
    return lax.fori_loop(1, count, body, _step(m))


def _run_starts(t: Rows, runs, keep: Keep = in_registers):
    """The iterate at the start of every multiplicative run, each as ``keep`` returns it
    (its reload), the last also as it is, and iteration 0's softmax."""
    lg, m, p = _first_iteration(t)
    starts = [keep(m)]
    for start, stop in runs[:-1]:
        _, u, v = _scaled_iterate(m, stop - start)
        log_u, log_v = [jnp.log(a) for a in u], [jnp.log(b) for b in v]
        lg = [[e + lu + lv for e, lv in zip(row, log_v)] for row, lu in zip(lg, log_u)]
        m = [[jnp.exp(e) for e in row] for row in lg]
        starts.append(keep(m))
    return starts, m, p


def sinkhorn(t: Rows, num_iters: int) -> Rows:
    """Sinkhorn-Knopp of the n x n logits t (per-token arrays)."""
    runs = multiplicative_runs(len(t), num_iters)
    _, last, _ = _run_starts(t, runs)
    return _iterate(last, runs[-1][1] - runs[-1][0]) if runs else last


def _group_vjp(g: Rows, out: Rows, by_col: bool) -> Rows:
    """Log-gradient VJP of a normalisation whose result is out: G - out * sum(G)."""
    if by_col:
        s = _col_sums(g)
        return [[a - o * c for a, o, c in zip(ga, oa, s)] for ga, oa in zip(g, out)]
    s = _row_sums(g)
    return [[a - o * r for a, o in zip(ga, oa)] for ga, oa, r in zip(g, out, s)]


def _iteration_vjp(m: Rows, g: Rows) -> Rows:
    c = _scale_cols(m, [1.0 / s for s in _col_sums(m)])
    r = _scale_rows(c, [1.0 / s for s in _row_sums(c)])
    return _group_vjp(_group_vjp(g, r, by_col=False), c, by_col=True)


def sinkhorn_vjp(t: Rows, g: Rows, num_iters: int, keep: Keep = in_registers) -> Rows:
    """VJP of ``sinkhorn`` w.r.t. t for the cotangent g, as ``_coeffs.sinkhorn_vjp``:
    log-gradients back through iterates recomputed from each run's start. The starts
    (one n x n checkpoint per run) are held as ``keep`` stores them: a kernel puts them
    in shared memory, where they take no registers between their uses."""
    runs = multiplicative_runs(len(t), num_iters)
    starts, last, p = _run_starts(t, runs, keep)
    out = _iterate(last, runs[-1][1] - runs[-1][0]) if runs else last
    grad = [[o * a for o, a in zip(orow, grow)] for orow, grow in zip(out, g)]
    for (start, stop), ckpt in reversed(list(zip(runs, starts))):

        def back(j, grad, length=stop - start, ckpt=ckpt):
            return _iteration_vjp(_iterate(ckpt(), length - 1 - j), grad)

        grad = lax.fori_loop(0, stop - start, back, grad)
    grad = _group_vjp(grad, starts[0](), by_col=False)
    return _group_vjp(grad, p, by_col=True)


def _res(v: Sequence, n: int) -> Rows:
    return [list(v[2 * n + i * n : 2 * n + (i + 1) * n]) for i in range(n)]


def forward(
    y, sumsq, bias, alpha, *, n: int, nc: int, num_iters: int, norm_eps: float, variant="paper"
):
    """Coefficients from the projection of one token set (``variant`` "paper" or
    "deepseek_v4").

    Args:
      y: K arrays (any one shape), fp32: the projection ``x @ phi``, coefficient k.
      sumsq: fp32 array of that shape: ``sum(x**2)`` over the n*C values.
      bias, alpha: K per-coefficient values (scalars or broadcastable arrays); alpha
        is the group's alpha repeated per coefficient.

    Returns:
      (coef, raw, r): K coefficients [h_pre | h_post | h_res], the K normalised
      projections ``y / r`` and the RMS r: all the backward needs is (raw, r).
    """
    r = jnp.sqrt(sumsq / nc + norm_eps)
    inv_r = 1.0 / r
    raw = [v * inv_r for v in y]
    t = [v * a + b for v, a, b in zip(raw, alpha, bias)]
    pre = [_sigmoid(v) for v in t[:n]]
    post = [2.0 * _sigmoid(v) for v in t[n : 2 * n]]
    if variant == "deepseek_v4":
        pre = [v + DEEPSEEK_V4_EPS for v in pre]
        res = _sinkhorn_v4.token_sinkhorn(_res(t, n), num_iters, DEEPSEEK_V4_EPS)
    else:
        res = sinkhorn(_res(t, n), num_iters)
    return pre + post + [e for row in res for e in row], raw, r


def backward(
    raw,
    r,
    dcoef,
    bias,
    alpha,
    *,
    n: int,
    nc: int,
    num_iters: int,
    variant="paper",
    keep: Keep = in_registers,
):
    """The VJP of ``forward`` from its saved (raw, r) and the K coefficient cotangents
    (``keep``: how the paper variant's Sinkhorn VJP holds its checkpoints). ``raw`` may
    also be a function returning the K values, called before the Sinkhorn VJP and after
    it: a kernel re-reads them from shared memory rather than hold them across it.

    Returns (dy, c_x, dt): dy (K arrays) the cotangent of ``x @ phi``, c_x such that
    dx = dy @ phi^T + c_x * x (the RMS path), dt (K arrays) the cotangent of the logits
    (its token sums give d_bias; those of dt * raw, by group, d_alpha).
    """
    read = raw if callable(raw) else lambda: raw
    t = [v * a + b for v, a, b in zip(read(), alpha, bias)]
    dt = []
    for k in range(2 * n):
        s = _sigmoid(t[k])
        ds = dcoef[k] * s * (1.0 - s)
        dt.append(ds if k < n else 2.0 * ds)
    if variant == "deepseek_v4":
        dres = _sinkhorn_v4.token_sinkhorn_vjp(
            _res(t, n), _res(dcoef, n), num_iters, DEEPSEEK_V4_EPS
        )
    else:
        dres = sinkhorn_vjp(_res(t, n), _res(dcoef, n), num_iters, keep)
    dt += [e for row in dres for e in row]
    draw = [d * a for d, a in zip(dt, alpha)]
    inv_r = 1.0 / r
    # raw = y / r, r = sqrt(sum(x^2)/nc + eps): x gets -sum(draw * raw) / (nc r^2) * x
    c_x = -_sum([d * v for d, v in zip(draw, read())]) * (inv_r * inv_r / nc)
    return [d * inv_r for d in draw], c_x, dt
