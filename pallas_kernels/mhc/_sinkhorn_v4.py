"""DeepSeek-V4's Sinkhorn and its VJP in the kernels' two layouts (``variant=
"deepseek_v4"``; the math of ``sinkhorn.sinkhorn_knopp``'s V4 loop, in this project's
orientation): a column softmax plus eps, a row normalisation, then num_iters - 1
(column, row) pairs, every divisor a sum plus eps.

- ``token_*``: n x n lists of per-token arrays (``_token_epilogue``, Mosaic GPU);
- ``rows_*``: n rows, each a (BT, np2(n)) value with lanes >= n zero (``_coeffs``,
  Triton and Mosaic TPU); ``valid`` (1, np2(n)) marks the lanes < n.

The eps floor keeps every entry >= ~eps / n, so the loop needs none of the paper
variant's log-domain care, and the VJP differentiates it plainly: through
``out = m / (sum + eps)`` a cotangent g maps to ``(g - sum(g * out)) / (sum + eps)``.
Going backwards, iterates are recomputed from checkpoints every ~sqrt(num_iters)
iterations, as for the paper variant.
"""

from __future__ import annotations

import functools
import math
import operator

import jax.numpy as jnp
from jax import lax


def _sum(values):
    return functools.reduce(operator.add, values)


def _runs(num_iters: int) -> list[tuple[int, int]]:
    """Iterations [start, stop) between checkpoints, after the first one."""
    run = math.isqrt(max(num_iters - 2, 0)) + 1
    return [(a, min(a + run, num_iters)) for a in range(1, num_iters, run)]


def _sinkhorn(first, step, t, num_iters):
    return lax.fori_loop(1, num_iters, lambda _, m: step(m), first(t)[0])


def _sinkhorn_vjp(first, step, step_vjp, first_vjp, t, g, num_iters):
    m, aux = first(t)
    starts, runs = [m], _runs(num_iters)
    for start, stop in runs[:-1]:
        starts.append(lax.fori_loop(start, stop, lambda _, m: step(m), starts[-1]))
    for (start, stop), ckpt in reversed(list(zip(runs, starts))):

        def back(j, g, length=stop - start, ckpt=ckpt):
            m = lax.fori_loop(0, length - 1 - j, lambda _, m: step(m), ckpt)
            return step_vjp(m, g)

        g = lax.fori_loop(0, stop - start, back, g)
    return first_vjp(aux, g)


# ------------------------------------------------------------ n x n per-token arrays


def _token_cols(m, eps):
    inv = [1.0 / (_sum([row[j] for row in m]) + eps) for j in range(len(m))]
    return [[e * i for e, i in zip(row, inv)] for row in m], inv


def _token_rows(m, eps):
    inv = [1.0 / (_sum(row) + eps) for row in m]
    return [[e * i for e in row] for row, i in zip(m, inv)], inv


def _token_cols_vjp(g, out, inv):
    s = [_sum([ga[j] * oa[j] for ga, oa in zip(g, out)]) for j in range(len(g))]
    return [[(a - c) * i for a, c, i in zip(ga, s, inv)] for ga in g]


def _token_rows_vjp(g, out, inv):
    s = [_sum([a * o for a, o in zip(ga, oa)]) for ga, oa in zip(g, out)]
    return [[(a - r) * i for a in ga] for ga, r, i in zip(g, s, inv)]


def _token_ops(eps):
    def first(t):
        n = len(t)
        top = [functools.reduce(jnp.maximum, [row[j] for row in t]) for j in range(n)]
        e = [[jnp.exp(t[i][j] - top[j]) for j in range(n)] for i in range(n)]
        p, _ = _token_cols(e, 0.0)  # the column softmax
        m, inv = _token_rows([[v + eps for v in row] for row in p], eps)
        return m, (p, m, inv)

    def step(m):
        return _token_rows(_token_cols(m, eps)[0], eps)[0]

    def step_vjp(m, g):
        mid, inv_c = _token_cols(m, eps)
        out, inv_r = _token_rows(mid, eps)
        return _token_cols_vjp(_token_rows_vjp(g, out, inv_r), mid, inv_c)

    def first_vjp(aux, g):
        p, m, inv = aux
        g = _token_rows_vjp(g, m, inv)
        s = [_sum([ga[j] * pa[j] for ga, pa in zip(g, p)]) for j in range(len(g))]
        return [[pe * (a - c) for pe, a, c in zip(pa, ga, s)] for pa, ga in zip(p, g)]

    return first, step, step_vjp, first_vjp


def token_sinkhorn(t, num_iters: int, eps: float):
    """V4's Sinkhorn of the n x n logits t (lists of per-token arrays)."""
    first, step, _, _ = _token_ops(eps)
    return _sinkhorn(first, step, t, num_iters)


def token_sinkhorn_vjp(t, g, num_iters: int, eps: float):
    """Its VJP w.r.t. t for the cotangent g (same layout)."""
    first, step, step_vjp, first_vjp = _token_ops(eps)
    return _sinkhorn_vjp(first, step, step_vjp, first_vjp, t, g, num_iters)


# ------------------------------------------------------------ rows of (BT, np2(n))


def _rows_ops(valid, eps):
    def cols(m):
        inv = 1.0 / (_sum(m) + eps)
        return tuple(r * inv for r in m), inv

    def rows(m):
        inv = [1.0 / (jnp.sum(r, axis=1, keepdims=True) + eps) for r in m]
        return tuple(r * i for r, i in zip(m, inv)), inv

    def cols_vjp(g, out, inv):  # lanes >= n are masked: 1 / eps would blow them up
        s = _sum([a * o for a, o in zip(g, out)])
        return tuple(jnp.where(valid, (a - s) * inv, 0.0) for a in g)

    def rows_vjp(g, out, inv):
        s = [jnp.sum(a * o, axis=1, keepdims=True) for a, o in zip(g, out)]
        return tuple(jnp.where(valid, (a - r) * i, 0.0) for a, r, i in zip(g, s, inv))

    def first(t):
        top = functools.reduce(jnp.maximum, t)
        e = [jnp.where(valid, jnp.exp(r - top), 0.0) for r in t]
        inv_col = 1.0 / jnp.where(valid, _sum(e), 1.0)
        p = tuple(r * inv_col for r in e)  # the column softmax
        m, inv = rows(tuple(jnp.where(valid, r + eps, 0.0) for r in p))
        return m, (p, m, inv)

    def step(m):
        return rows(cols(m)[0])[0]

    def step_vjp(m, g):
        mid, inv_c = cols(m)
        out, inv_r = rows(mid)
        return cols_vjp(rows_vjp(g, out, inv_r), mid, inv_c)

    def first_vjp(aux, g):
        p, m, inv = aux
        g = rows_vjp(g, m, inv)
        s = _sum([a * b for a, b in zip(g, p)])
        return tuple(b * (a - s) for a, b in zip(g, p))

    return first, step, step_vjp, first_vjp


def rows_sinkhorn(t, valid, num_iters: int, eps: float):
    """V4's Sinkhorn of the logit rows t (``_coeffs.res_rows`` layout)."""
    first, step, _, _ = _rows_ops(valid, eps)
    return _sinkhorn(first, step, tuple(t), num_iters)


def rows_sinkhorn_vjp(t, g, valid, num_iters: int, eps: float):
    """Its VJP w.r.t. the rows t for the cotangent rows g."""
    first, step, step_vjp, first_vjp = _rows_ops(valid, eps)
    return _sinkhorn_vjp(first, step, step_vjp, first_vjp, tuple(t), tuple(g), num_iters)
