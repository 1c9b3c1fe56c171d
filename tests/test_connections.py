"""HC/mHC pure math against an independent NumPy float64 implementation of SPEC §2-§4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import connections as C

# --------------------------------------------------------------------- NumPy float64 reference


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """The references are float64 numpy: fp32 matmuls run at full precision (on a GPU
    they default to TF32, about 1e-4 from float64 in these tests)."""
    with jax.default_matmul_precision("highest"):
        yield


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_sinkhorn(t, iters):
    m = np.exp(t - t.max(axis=(-2, -1), keepdims=True))
    for _ in range(iters):
        m = m / m.sum(-2, keepdims=True)
        m = m / m.sum(-1, keepdims=True)
    return m


def np_mhc(x, phi, bias, alpha, iters=20, norm_eps=1e-6):
    """SPEC §4 written out literally, per token, in float64."""
    x = np.asarray(x, np.float64)
    *batch, n, c = x.shape
    h_pre = np.zeros((*batch, n))
    h_post = np.zeros((*batch, n))
    h_res = np.zeros((*batch, n, n))
    for idx in np.ndindex(*batch):
        v = x[idx].reshape(n * c)
        r = np.sqrt(np.mean(v**2) + norm_eps)
        raw = (v @ phi) / r
        h_pre[idx] = np_sigmoid(alpha[0] * raw[:n] + bias[:n])
        h_post[idx] = 2 * np_sigmoid(alpha[1] * raw[n : 2 * n] + bias[n : 2 * n])
        h_res[idx] = np_sinkhorn((alpha[2] * raw[2 * n :] + bias[2 * n :]).reshape(n, n), iters)
    return h_pre, h_post, h_res


def np_apply(h_pre, h_post, h_res, x, f):
    x = np.asarray(x, np.float64)
    layer_input = np.einsum("...i,...ic->...c", h_pre, x)
    x_next = np.einsum("...ij,...jc->...ic", h_res, x) + h_post[..., :, None] * f[..., None, :]
    return layer_input, x_next


def random_mhc_inputs(rng, batch, n, c, scale=1.0):
    x = rng.normal(size=(*batch, n, c)).astype(np.float32)
    phi = (rng.normal(size=(n * c, n * n + 2 * n)) * scale / np.sqrt(n * c)).astype(np.float32)
    bias = rng.normal(size=(n * n + 2 * n,)).astype(np.float32)
    alpha = rng.uniform(0.1, 2.0, size=(3,)).astype(np.float32)
    return x, phi, bias, alpha


# --------------------------------------------------------------------- mHC


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("batch", [(), (5,), (2, 3)])
def test_mhc_mappings_match_numpy(n, batch):
    rng = np.random.default_rng(n * 10 + len(batch))
    x, phi, bias, alpha = random_mhc_inputs(rng, batch, n, 24)
    got = jax.jit(C.mhc_mappings)(x, phi, bias, alpha)
    want = np_mhc(x, phi.astype(np.float64), bias.astype(np.float64), alpha.astype(np.float64))
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32 and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
    h_pre, h_post, h_res = got
    assert bool(jnp.all((h_pre > 0) & (h_pre < 1)))
    assert bool(jnp.all((h_post > 0) & (h_post < 2)))
    assert bool(jnp.all(h_res >= 0))
    np.testing.assert_allclose(h_res.sum(-1), 1.0, atol=5e-7)
    np.testing.assert_allclose(h_res.sum(-2), 1.0, atol=5e-2)  # 20 iterations, logit std ~ 1.5


def test_mhc_n1_h_res_is_one():
    rng = np.random.default_rng(0)
    x, phi, bias, alpha = random_mhc_inputs(rng, (4,), 1, 16)
    _, _, h_res = C.mhc_mappings(x, phi, bias, alpha)
    np.testing.assert_array_equal(h_res, np.ones((4, 1, 1), np.float32))


def test_mhc_bf16_streams_fp32_coefficients():
    rng = np.random.default_rng(1)
    x, phi, bias, alpha = random_mhc_inputs(rng, (6,), 4, 32)
    got = C.mhc_mappings(jnp.asarray(x, jnp.bfloat16), phi, bias, alpha)
    x_rounded = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    want = np_mhc(x_rounded, phi.astype(np.float64), bias, alpha)
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)


def test_mhc_norm_then_project_equals_project_then_divide():
    rng = np.random.default_rng(2)
    x, phi, bias, alpha = random_mhc_inputs(rng, (3,), 4, 8)
    v = x.reshape(3, -1).astype(np.float64)
    vn = v / np.sqrt(np.mean(v**2, -1, keepdims=True) + 1e-6)
    raw = vn @ phi
    h_pre = np_sigmoid(alpha[0] * raw[:, :4] + bias[:4])
    np.testing.assert_allclose(C.mhc_mappings(x, phi, bias, alpha)[0], h_pre, rtol=1e-5)


def test_residual_init_bias_gives_round_robin_and_diagonal():
    for n in (2, 4, 8):
        for k in range(2 * n):
            bias = C.residual_init_bias(n, k)
            x = np.ones((n, 8), np.float32)
            h_pre, h_post, h_res = C.mhc_mappings(
                x, np.zeros((8 * n, n * n + 2 * n), np.float32), bias, np.full(3, 0.01)
            )
            want_pre = np.full(n, 0.01)
            want_pre[k % n] = 1 - (n - 1) * 0.01
            np.testing.assert_allclose(h_pre, want_pre, rtol=1e-5)
            np.testing.assert_allclose(h_pre.sum(), 1.0, rtol=1e-6)
            np.testing.assert_allclose(h_post, 1.0, rtol=1e-6)
            np.testing.assert_allclose(np.diag(h_res), 0.9, rtol=1e-5)
            np.testing.assert_allclose(h_res.sum(-2), 1.0, atol=1e-6)


# --------------------------------------------------------------------- HC


def np_hc(x, b_pre, b_post, b_res, dyn=None, eps=1e-6):
    x = np.asarray(x, np.float64)
    *batch, n, _ = x.shape
    h_pre = np.broadcast_to(b_pre, (*batch, n)).copy()
    h_post = np.broadcast_to(b_post, (*batch, n)).copy()
    a_res = np.broadcast_to(b_res, (*batch, n, n)).copy()
    if dyn is not None:
        xn = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * dyn["norm_scale"]
        h_pre += dyn["s_alpha"] * np.tanh(xn @ dyn["w_pre"])
        h_post += dyn["s_beta"] * np.tanh(xn @ dyn["w_post"])
        a_res += dyn["s_alpha"] * np.tanh(xn @ dyn["w_res"])
    return h_pre, h_post, np.swapaxes(a_res, -1, -2)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("dynamic", [False, True])
def test_hc_mappings_match_numpy(n, dynamic):
    rng = np.random.default_rng(n + 100 * dynamic)
    c = 16
    x = rng.normal(size=(3, 5, n, c)).astype(np.float32)
    b_pre, b_post = rng.normal(size=(n,)), rng.normal(size=(n,))
    b_res = rng.normal(size=(n, n))
    dyn = None
    if dynamic:
        dyn = dict(
            norm_scale=rng.uniform(0.5, 1.5, size=(c,)),
            w_pre=rng.normal(size=(c,)),
            w_post=rng.normal(size=(c,)),
            w_res=rng.normal(size=(c, n)),
            s_alpha=np.float64(0.3),
            s_beta=np.float64(0.7),
        )
    params = (
        None
        if dyn is None
        else C.HCDynamicParams(**{k: jnp.asarray(v, jnp.float32) for k, v in dyn.items()})
    )
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    got = C.hc_mappings(x, f32(b_pre), f32(b_post), f32(b_res), params)
    want = np_hc(x, b_pre, b_post, b_res, dyn)
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_hc_res_orientation_is_transposed_a_r():
    """HC applies A_r transposed: stream j of x_next gets sum_i A_r[i, j] x[i]."""
    a_r = jnp.asarray([[0.0, 1.0], [0.0, 0.0]])  # stream 0 feeds stream 1
    x = jnp.asarray([[1.0, 1.0], [5.0, 5.0]])
    _, _, h_res = C.hc_mappings(x, jnp.zeros(2), jnp.zeros(2), a_r)
    x_next = C.apply_post_res(h_res, jnp.zeros(2), x, jnp.zeros(2))
    np.testing.assert_array_equal(x_next, [[0.0, 0.0], [1.0, 1.0]])


# --------------------------------------------------------------------- apply


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_apply_functions_match_numpy(n, dtype):
    rng = np.random.default_rng(n)
    x = jnp.asarray(rng.normal(size=(2, 3, n, 40)), dtype)
    f = jnp.asarray(rng.normal(size=(2, 3, 40)), dtype)
    h_pre = rng.uniform(size=(2, 3, n)).astype(np.float32)
    h_post = rng.uniform(0, 2, size=(2, 3, n)).astype(np.float32)
    h_res = rng.uniform(size=(2, 3, n, n)).astype(np.float32)
    layer_input = C.apply_pre(h_pre, x)
    x_next = C.apply_post_res(h_res, h_post, x, f)
    assert layer_input.dtype == dtype and x_next.dtype == dtype
    want_in, want_next = np_apply(
        h_pre, h_post, h_res, np.asarray(x.astype(jnp.float32)), np.asarray(f.astype(jnp.float32))
    )
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(layer_input.astype(jnp.float32), want_in, rtol=tol, atol=tol)
    np.testing.assert_allclose(x_next.astype(jnp.float32), want_next, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: C.mhc_mappings(
                jnp.zeros((4, 8)), jnp.zeros((31, 24)), jnp.zeros(24), jnp.zeros(3)
            ),
            r"mhc_mappings: phi must have shape \(32, 24\), got \(31, 24\)",
        ),
        (
            lambda: C.mhc_mappings(
                jnp.zeros((4, 8)), jnp.zeros((32, 24)), jnp.zeros(23), jnp.zeros(3)
            ),
            r"mhc_mappings: bias must have shape \(24,\), got \(23,\)",
        ),
        (
            lambda: C.mhc_mappings(
                jnp.zeros((4, 8)), jnp.zeros((32, 24)), jnp.zeros(24), jnp.zeros(2)
            ),
            r"mhc_mappings: alpha must have shape \(3,\)",
        ),
        (
            lambda: C.mhc_mappings(jnp.zeros((8,)), jnp.zeros((8, 3)), jnp.zeros(3), jnp.zeros(3)),
            r"mhc_mappings: x must have shape \(\.\.\., n, C\)",
        ),
        (
            lambda: C.apply_pre(jnp.zeros((2, 3)), jnp.zeros((2, 4, 8))),
            r"apply_pre: h_pre must have shape \(2, 4\), got \(2, 3\)",
        ),
        (
            lambda: C.apply_post_res(
                jnp.zeros((4, 4)), jnp.zeros(4), jnp.zeros((4, 8)), jnp.zeros(7)
            ),
            r"apply_post_res: f must have shape \(8,\), got \(7,\)",
        ),
        (
            lambda: C.apply_post_res(
                jnp.zeros((4, 3)), jnp.zeros(4), jnp.zeros((4, 8)), jnp.zeros(8)
            ),
            r"apply_post_res: h_res must have shape \(4, 4\)",
        ),
        (
            lambda: C.hc_mappings(jnp.zeros((4, 8)), jnp.zeros(3), jnp.zeros(4), jnp.eye(4)),
            r"hc_mappings: b_pre must have shape \(4,\), got \(3,\)",
        ),
    ],
)
def test_shape_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
