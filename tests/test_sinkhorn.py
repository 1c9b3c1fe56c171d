"""Sinkhorn-Knopp (SPEC §5) at every logit scale: the library (``sinkhorn_knopp``)
and the kernels' coefficient math (``_coeffs.sinkhorn`` / ``sinkhorn_vjp`` as plain
jnp, and inside the interpreted kernels) against a float64 Sinkhorn written here."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.connections.sinkhorn import multiplicative_runs, sinkhorn_knopp
from pallas_kernels.mhc import _coeffs, api

F32 = jnp.float32
NUM_ITERS = 20
NS = [1, 2, 3, 4, 8]
STDS = [0.1, 1.0, 3.0, 10.0, 30.0]
FWD_TOL = 5e-5  # max abs error; entries lie in [0, 1]. Measured <= 8e-7 up to std 30.
ROW_TOL = 1e-6  # rows are normalised last: fp32 rounding of n terms (measured <= 2.2e-7)
COL_TOL = 1e-5  # column sums vs the float64 loop's own column sums (measured <= 3e-7)
# Max |VJP error| / max |float64 VJP| over a cell's matrices, N(0, 1) cotangents:
# measured <= 6.1e-7 at every std here (<= 6e-7 over 2000 matrices per cell in
# experiments/results/sinkhorn_accuracy); 1e-4 up to std 3 as specified, tighter
# beyond, where the old floored loop failed the forward anyway.
VJP_TOL = {0.1: 1e-4, 1.0: 1e-4, 3.0: 1e-4, 10.0: 2e-5, 30.0: 2e-5}


# ----------------------------------------------------------------- float64 references


def spec_loop(t, num_iters=NUM_ITERS):
    """SPEC §5 as written (NumPy float64): max-shift, exp, then columns and rows."""
    m = np.exp(t - t.max(axis=(-2, -1), keepdims=True))
    for _ in range(num_iters):
        m = m / m.sum(axis=-2, keepdims=True)
        m = m / m.sum(axis=-1, keepdims=True)
    return m


def _lse(a, axis, xp=np):
    top = a.max(axis=axis, keepdims=True)
    return top + xp.log(xp.exp(a - top).sum(axis=axis, keepdims=True))


def log_loop(t, num_iters=NUM_ITERS):
    """The same loop on logs (NumPy float64): equal in real arithmetic; for logits
    where the plain loop underflows even in float64 (spreads beyond ~700)."""
    for _ in range(num_iters):
        t = t - _lse(t, -2)
        t = t - _lse(t, -1)
    return np.exp(t)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _vjp64(t, g, log, num_iters):
    """VJP of spec_loop (or log_loop) rewritten in jnp, by autodiff. The loop is a
    fori_loop: XLA compiles an unrolled float64 backward several times slower."""

    def step(_, x):
        if log:
            x = x - _lse(x, -2, jnp)
            return x - _lse(x, -1, jnp)
        x = x / x.sum(axis=-2, keepdims=True)
        return x / x.sum(axis=-1, keepdims=True)

    def loop(t):
        start = t if log else jnp.exp(t - t.max(axis=(-2, -1), keepdims=True))
        out = jax.lax.fori_loop(0, num_iters, step, start)
        return jnp.exp(out) if log else out

    return jax.vjp(loop, t)[1](g)[0]


def float64_vjp(t, g, log=False, num_iters=NUM_ITERS):
    """VJP of the SPEC loop (on logs if ``log``) by float64 autodiff."""
    with jax.enable_x64(True):
        t, g = jnp.asarray(t, jnp.float64), jnp.asarray(g, jnp.float64)
        return np.asarray(_vjp64(t, g, log, num_iters))


def rel_err(got, want) -> float:
    got = np.asarray(got, np.float64)
    assert np.all(np.isfinite(got))
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# ----------------------------------------------------------------- code under test


def _rows(x, width):
    x = jnp.pad(x, ((0, 0), (0, 0), (0, width - x.shape[-1])))
    return tuple(x[:, i] for i in range(x.shape[1]))


def _coeffs_impl(t, g, num_iters):
    """(B, n, n) through the kernels' row layout: n (B, np2(n)) rows, zero-padded."""
    n = t.shape[-1]
    width = 1 << (n - 1).bit_length()
    info = _coeffs.Info(None, None, None, None, jnp.arange(width, dtype=jnp.int32)[None])
    out = _coeffs.sinkhorn(_rows(t, width), info, num_iters)
    dt = _coeffs.sinkhorn_vjp(_rows(t, width), _rows(g, width), info, num_iters)
    return jnp.stack(out, 1)[..., :n], jnp.stack(dt, 1)[..., :n]


def _library_impl(t, g, num_iters):
    out, vjp = jax.vjp(lambda t: sinkhorn_knopp(t, num_iters), t)
    return out, vjp(g)[0]


IMPLS = {
    "library": jax.jit(_library_impl, static_argnums=2),
    "coeffs": jax.jit(_coeffs_impl, static_argnums=2),
}


def run(impl, t, g=None, num_iters=NUM_ITERS):
    t = np.asarray(t, np.float32)
    g = np.random.default_rng(7).standard_normal(t.shape).astype(np.float32) if g is None else g
    out, dt = IMPLS[impl](t, g, num_iters)
    return np.asarray(out, np.float64), np.asarray(dt, np.float64), g


# ----------------------------------------------------------------- random logits


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("std", STDS)
@pytest.mark.parametrize("n", NS)
def test_matches_float64_at_every_scale(impl, n, std):
    """Forward, sums and VJP against the SPEC loop in float64 (N(0, std^2) logits).

    The old floored loop (shifted logits floored at -30) was off by up to 0.9 at
    std 10 and 1.0 at std 30. Columns: 20 iterations leave the float64 loop's own
    column sums off 1 by up to 2e-16 at std 0.1, 7.9e-3 at std 1, 4.6e-2 at std 3,
    0.16 at std 10 and 1.0 at std 30, so columns are compared with its sums (and
    with 1 at std 0.1).
    """
    rng = np.random.default_rng(1000 * n + int(10 * std))
    t = (rng.standard_normal((128, n, n)) * std).astype(np.float32)
    out, dt, g = run(impl, t)
    want = spec_loop(t.astype(np.float64))
    assert np.abs(out - want).max() <= FWD_TOL
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=ROW_TOL)
    np.testing.assert_allclose(out.sum(-2), want.sum(-2), atol=COL_TOL)
    if std == 0.1:
        np.testing.assert_allclose(out.sum(-2), 1.0, atol=COL_TOL)
    if n == 1:
        assert np.all(out == 1.0) and np.all(dt == 0.0)
    else:
        assert rel_err(dt, float64_vjp(t, g)) <= VJP_TOL[std]


# ----------------------------------------------------------------- adversarial logits


@pytest.mark.parametrize("impl", list(IMPLS))
def test_rows_far_below_the_max(impl):
    """Rows 1-3 entirely more than 30 below the max. For the first matrix the old
    floored loop made row 3 [0.167 0.272 0.317 0.244] instead of
    [0.208 0.297 0.012 0.483] (error 0.31)."""
    t = np.random.default_rng(2).standard_normal((128, 4, 4))
    t[0] = [[2, 0.5, -1, 1], [0, 1, 0.5, -0.5], [-0.5, 0.2, 1.5, 0.3], [0.1, 0.4, -3, 0.8]]
    t[:, 0] += 40.0
    t = t.astype(np.float32)
    out, dt, g = run(impl, t)
    assert np.abs(out - spec_loop(t.astype(np.float64))).max() <= FWD_TOL
    assert rel_err(dt, float64_vjp(t, g)) <= VJP_TOL[1.0]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_rows_and_columns_shifted_by_thousands(impl):
    """Logits x + a_i + b_j with a_i, b_j up to ±3072 (exact in fp32): rows and whole
    columns lie far below the max, which per-column and per-row shifts absorb exactly.
    The reference is the loop on logs (the plain float64 loop underflows)."""
    rng = np.random.default_rng(3)
    x = np.round(rng.standard_normal((128, 4, 4)) * 128) / 64
    shifts = rng.choice([-2048.0, 0.0, 1024.0], (128, 4, 1)) + rng.choice([-1024, 0], (128, 1, 4))
    t = (x + shifts).astype(np.float32)
    assert np.all(t.astype(np.float64) == x + shifts)
    out, dt, g = run(impl, t)
    assert np.abs(out - log_loop(t.astype(np.float64))).max() <= 1e-6  # measured 1.7e-7
    assert rel_err(dt, float64_vjp(t, g, log=True)) <= 1e-6  # measured 2.5e-7


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("n, num_iters, tol", [(4, 50, 1e-5), (8, 20, 2e-6)])
def test_entries_that_underflow_and_regrow(impl, n, num_iters, tol):
    """0 in row 0 and column 0, -L (80 <= L <= 130) elsewhere: after one iteration the
    -L entries lie near fp32's smallest normal (2^-126), then grow by up to ~n^2 per
    iteration. A multiplicative loop after a log-domain first iteration loses them:
    off by 0.67 at n = 4, 50 iterations, and 1.1e-5 at n = 8, 20 iterations (the old
    floored loop: 0.67 and 0.86). The log-domain rebuilds between runs of at most
    ``multiplicative_runs`` iterations restore them (measured 3.3e-6 and 5.9e-7)."""
    t = -np.linspace(80.0, 130.0, 128)[:, None, None] * np.ones((1, n, n))
    t[:, 0, :] = t[:, :, 0] = 0.0
    out, dt, g = run(impl, t, num_iters=num_iters)
    t64 = t.astype(np.float32).astype(np.float64)
    assert np.abs(out - log_loop(t64, num_iters)).max() <= tol
    assert rel_err(dt, float64_vjp(t64, g, True, num_iters)) <= 1e-4  # measured <= 5e-6


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("n", [2, 4, 8])
def test_extreme_logits_stay_finite(impl, n):
    """±1e4 logits, alone (exact) and mixed with N(0, 1) ones. Mixed, the fp32 logits
    themselves are 1e-3 apart near 1e4, and t - max(column) rounds at that spacing:
    the result is the exact one for logits moved within their own fp32 rounding
    (measured: up to 9e-5 from float64, VJP 1e-4; 1.3e-7 and 3e-7 for ±1e4 alone)."""
    rng = np.random.default_rng(4 + n)
    pattern = rng.choice([-1e4, 1e4], (64, n, n))
    pattern[0], pattern[1, :, 0], pattern[2, 1] = -1e4, 1e4, -1e4  # equal, dominant, low
    mixed = rng.choice([-1e4, 0.0, 1e4], (64, n, n), p=[0.15, 0.7, 0.15])
    t = np.concatenate([pattern, mixed + rng.standard_normal((64, n, n))]).astype(np.float32)
    out, dt, g = run(impl, t)
    # Entries are at most 1 up to rounding: XLA's GPU division is not correctly rounded,
    # so a / sum(column) can exceed 1 by an ulp where a is the column's only mass.
    assert np.all(np.isfinite(dt)) and out.min() >= 0, out.min()
    assert out.max() <= 1 + 4 * np.finfo(np.float32).eps, out.max() - 1
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=ROW_TOL)
    want, dwant = log_loop(t.astype(np.float64)), float64_vjp(t, g, log=True)
    for half, tol in ((slice(0, 64), 1e-6), (slice(64, 128), 5e-4)):
        assert np.abs(out[half] - want[half]).max() <= tol
        assert rel_err(dt[half], dwant[half]) <= tol


# ----------------------------------------------------------------- through the kernels


@pytest.mark.parametrize("n", NS)
def test_interpreted_kernels_match_float64(n):
    """``api.mhc_mappings(impl="pallas_interpret")`` with phi = 0, so each matrix's
    res logits are the bias: 4 matrices per std of STDS, then 4 of ±1e4 logits."""
    rng = np.random.default_rng(5 + n)
    stds = np.repeat(STDS, 4)[:, None, None]
    t = np.concatenate(
        [rng.standard_normal((len(stds), n, n)) * stds, rng.choice([-1e4, 1e4], (4, n, n))]
    )
    t = t.astype(np.float32)
    g = rng.standard_normal(t.shape).astype(np.float32)
    x, phi = jnp.ones((1, n, 16), F32), jnp.zeros((16 * n, n * n + 2 * n), F32)

    def one(tg):
        def h_res(b):
            return api.mhc_mappings(x, phi, b, jnp.ones(3, F32), impl="pallas_interpret")[2][0]

        out, vjp = jax.vjp(h_res, jnp.concatenate([jnp.zeros(2 * n, F32), tg[0].ravel()]))
        return out, vjp(tg[1])[0][2 * n :].reshape(n, n)

    out, dt = (np.asarray(a, np.float64) for a in jax.jit(lambda tg: jax.lax.map(one, tg))((t, g)))
    assert np.abs(out - log_loop(t.astype(np.float64))).max() <= FWD_TOL
    want = float64_vjp(t, g, log=True)
    for i, std in enumerate(STDS + [1e4]):
        rows = slice(4 * i, 4 * i + 4)
        tol = VJP_TOL.get(std, 1e-5)
        assert np.abs(dt[rows] - want[rows]).max() <= tol * max(np.abs(want[rows]).max(), 1e-30)


# ----------------------------------------------------------------- library contract


def test_multiplicative_runs_cover_the_iterations_within_the_bound():
    for n in (2, 4, 8, 64):
        for num_iters in (1, 2, 5, 20, 100):
            runs = multiplicative_runs(n, num_iters)
            if num_iters == 1:
                assert runs == []
                continue
            assert [a for a, _ in runs] == [1] + [b for _, b in runs[:-1]]
            assert runs[-1][1] == num_iters
            for a, b in runs:
                assert b - a <= math.isqrt(max(num_iters - 2, 0)) + 1
                assert 4 * (b - a) * math.log2(n) - 126 <= -40  # n^(4k) 2^-126 <= 2^-40


knopp = jax.jit(sinkhorn_knopp, static_argnums=(1, 2))


def test_smooth_logits_converge_to_doubly_stochastic():
    t = jnp.asarray(np.random.default_rng(0).normal(size=(64, 4, 4)) * 0.5, F32)
    m = knopp(t, 50)
    np.testing.assert_allclose(m.sum(-2), 1.0, atol=1e-5)


@pytest.mark.parametrize("num_iters", [1, 2, 7])
def test_few_iterations(num_iters):
    t = (np.random.default_rng(num_iters).normal(size=(16, 4, 4)) * 10).astype(np.float32)
    out = np.asarray(knopp(jnp.asarray(t), num_iters), np.float64)
    assert np.abs(out - spec_loop(t.astype(np.float64), num_iters)).max() <= FWD_TOL


def test_eps_is_added_to_the_sums_after_the_first_iteration():
    """eps = 0 is the SPEC loop; eps > 0 divides by sum + eps where sums lie in
    [1/n^2, n], so rows end between 1 - n^2 eps and 1."""
    t = jnp.asarray(np.random.default_rng(1).normal(size=(32, 4, 4)) * 3, F32)
    rows = np.asarray(knopp(t, NUM_ITERS, 1e-3).sum(-1))
    assert np.all(rows <= 1.0) and np.all(rows >= 1.0 - 16e-3) and np.any(rows < 1.0 - 1e-4)


def test_bf16_input_computes_in_fp32():
    t = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, 4)), jnp.bfloat16)
    m = knopp(t)
    assert m.dtype == F32
    np.testing.assert_allclose(m, knopp(t.astype(F32)), rtol=1e-6)


@pytest.mark.parametrize("n, scale", [(2, 0.1), (8, 3.0)])
def test_float64_input_matches_the_spec_loop(n, scale):
    rng = np.random.default_rng(n)
    t, g = rng.normal(size=(2, 3, n, n)) * [[[[scale]]], [[[1.0]]]]
    with jax.enable_x64(True):
        out, dt = jax.jit(_library_impl, static_argnums=2)(t, g, NUM_ITERS)
        assert out.dtype == dt.dtype == jnp.float64
    np.testing.assert_allclose(out, spec_loop(t), atol=1e-14)
    assert rel_err(dt, float64_vjp(t, g)) <= 1e-12


def test_jit_vmap_and_grad_compose():
    t = jnp.asarray(np.random.default_rng(4).normal(size=(6, 4, 4)), F32)
    f = jax.jit(jax.vmap(lambda t: sinkhorn_knopp(t, 10)))
    np.testing.assert_allclose(f(t), sinkhorn_knopp(t, 10), rtol=1e-6, atol=1e-7)
    g = jax.jit(jax.grad(lambda t: jnp.sum(jax.vmap(sinkhorn_knopp)(t)[:, 0])))(t)
    assert g.shape == t.shape and bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(logits=jnp.zeros((3, 4))), r"shape \(\.\.\., n, n\)"),
        (dict(logits=jnp.zeros((4,))), r"shape \(\.\.\., n, n\)"),
        (dict(logits=jnp.zeros((4, 4)), num_iters=0), "num_iters must be an integer >= 1"),
        (dict(logits=jnp.zeros((4, 4)), num_iters=True), "num_iters must be an integer >= 1"),
        (dict(logits=jnp.zeros((4, 4)), eps=-1.0), "eps must be finite and >= 0, got -1.0"),
        (dict(logits=jnp.zeros((4, 4)), eps=float("nan")), "eps must be finite and >= 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sinkhorn_knopp(**kwargs)


def test_runs_inside_shard_map(cpu_devices):
    """Under shard_map (the model's mHC on a mesh) the loop's carries vary over the mesh
    axis like the logits; a carry that starts unvarying is a type error there."""
    mesh = jax.sharding.Mesh(np.asarray(cpu_devices[:2]), ("x",))
    spec = jax.sharding.PartitionSpec("x")
    sharded = jax.shard_map(sinkhorn_knopp, mesh=mesh, in_specs=spec, out_specs=spec)
    t = np.random.default_rng(3).standard_normal((4, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(jax.jit(sharded)(t), sinkhorn_knopp(t), rtol=1e-6, atol=1e-7)
