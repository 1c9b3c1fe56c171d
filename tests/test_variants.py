"""The mHC variants (``pallas_kernels.mhc.variants``) against float64 implementations of
their contracts written in the tests from their descriptions: DeepSeek-V4's in V4's own
terms (``deepseek_v4_reference``: its ``fn``/``base``/``scale`` weights, its comb
contracted over the first index), and mHC-lite's here (a softmax over the n!
permutation matrices). Forward and gradients."""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deepseek_v4_reference import v4_layer
from kernel_test_base import MosaicGpu, Tpu, Triton

from mhc_jax import connections
from mhc_jax.connections import modules as connection_modules
from mhc_jax.interop import deepseek_v4
from mhc_jax.model import ModelConfig
from mhc_jax.sharding import strip_boxes
from pallas_kernels.mhc import api, variants
from pallas_kernels.mhc.backends import Impl, UnsupportedInput
from pallas_kernels.mhc.context import MappingConfig
from pallas_kernels.mhc.sinkhorn import sinkhorn_knopp

FWD_TOL = 2e-5  # max |fp32 - float64| / max |float64|, forward
GRAD_TOL = 1e-4  # the same for gradients


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# ------------------------------------------------------------ float64 contracts, in jnp


def lite_layer(x, phi, bias, alpha, f):
    """mHC-lite: the paper's h_pre and h_post; h_res = sum_k softmax(t_res)_k P_k over
    the n! permutation matrices, P_k[i, perm_k[i]] = 1 in itertools order."""
    *batch, n, c = x.shape
    xf = x.reshape(*batch, n * c)
    raw = (xf @ phi) / jnp.sqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-6)
    h_pre = jax.nn.sigmoid(raw[..., :n] * alpha[0] + bias[:n])
    h_post = 2 * jax.nn.sigmoid(raw[..., n : 2 * n] * alpha[1] + bias[n : 2 * n])
    w = jax.nn.softmax(raw[..., 2 * n :] * alpha[2] + bias[2 * n :], axis=-1)
    h_res = 0.0
    for k, perm in enumerate(itertools.permutations(range(n))):
        h_res = h_res + w[..., k, None, None] * jnp.eye(n)[np.array(perm)]
    layer_input = jnp.einsum("...i,...ic->...c", h_pre, x)
    x_next = jnp.einsum("...ij,...jc->...ic", h_res, x) + h_post[..., :, None] * f[..., None, :]
    return layer_input, x_next


def _ours(x, phi, bias, alpha, f, variant, impl="xla"):
    li, h_pre, h_post, h_res = api.mhc_mappings_and_pre(
        x, phi, bias, alpha, variant=variant, impl=impl
    )
    return li, api.apply_post_res(h_res, h_post, x, f, impl="xla")


def _inputs(seed, n, c, width, logit_scale, batch=(3, 5)):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(*batch, n, c)).astype(np.float32)
    f = rng.normal(size=(*batch, c)).astype(np.float32)
    w = (rng.normal(size=(n * c, width)) * logit_scale / np.sqrt(n * c)).astype(np.float32)
    bias = rng.normal(size=(width,)).astype(np.float32)
    alpha = np.asarray([1.0, 0.7, 1.3], np.float32)
    return x, w, bias, alpha, f


def _compare(ours, theirs, args_ours, args_theirs):
    """Forward outputs and the gradients of one random linear loss, fp32 against float64."""
    got = ours(*map(jnp.asarray, args_ours))
    with jax.enable_x64(True):
        want = theirs(*(jnp.asarray(a, jnp.float64) for a in args_theirs))
        cots = [np.random.default_rng(7).normal(size=w.shape) for w in want]
        loss64 = lambda *a: sum(jnp.sum(o * g) for o, g in zip(theirs(*a), cots))  # noqa: E731
        grads64 = jax.grad(loss64, argnums=tuple(range(len(args_theirs))))(
            *(jnp.asarray(a, jnp.float64) for a in args_theirs)
        )
        want, grads64 = jax.tree.map(np.asarray, (want, grads64))
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) <= FWD_TOL
    loss = lambda *a: sum(jnp.sum(o * g) for o, g in zip(ours(*a), cots))  # noqa: E731
    grads = jax.grad(loss, argnums=tuple(range(len(args_ours))))(*map(jnp.asarray, args_ours))
    return grads, grads64


@pytest.mark.parametrize("logit_scale", [1.0, 4.0])
@pytest.mark.parametrize("n", [2, 4])
def test_deepseek_v4_matches_its_contract(n, logit_scale):
    x, phi, bias, alpha, f = _inputs(n, n, 16, n * n + 2 * n, logit_scale)
    # the same weights in V4's layout: fn (K, n*C) with comb's (m, k) rows
    v4 = deepseek_v4.connection_to_v4(phi.reshape(n, -1, phi.shape[1]), bias, alpha)
    fn, base = v4["fn"], v4["base"]
    order = np.concatenate([np.arange(2 * n), 2 * n + np.arange(n * n).reshape(n, n).T.ravel()])
    assert np.array_equal(fn, phi.T[order])

    def ours(x, phi, bias, alpha, f):
        return _ours(x, phi, bias, alpha, f, "deepseek_v4")

    grads, grads64 = _compare(ours, v4_layer, (x, phi, bias, alpha, f), (x, fn, base, alpha, f))
    dx, dphi, dbias, dalpha, df = grads
    dx64, dfn64, dbase64, dscale64, df64 = grads64
    for g, w in ((dx, dx64), (dphi, dfn64.T[:, order]), (dbias, dbase64[order])):
        assert _rel(g, w) <= GRAD_TOL
    assert _rel(dalpha, dscale64) <= GRAD_TOL and _rel(df, df64) <= GRAD_TOL


def test_deepseek_v4_eps_matters_and_zero_eps_is_the_paper():
    """V4 differs from the paper by its eps terms alone: with eps = 0 its Sinkhorn is the
    paper's (to fp32 rounding); with V4's eps = 1e-6 and peaked logits it is not."""
    t = jnp.asarray(np.random.default_rng(0).normal(size=(64, 4, 4)) * 6, jnp.float32)
    v4_no_eps = sinkhorn_knopp(t, 20, 0.0, variant="deepseek_v4")
    assert float(jnp.max(jnp.abs(v4_no_eps - sinkhorn_knopp(t, 20)))) <= 2e-6
    v4 = sinkhorn_knopp(t, 20, variant="deepseek_v4")
    assert float(jnp.max(jnp.abs(v4 - sinkhorn_knopp(t, 20)))) > 1e-3


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_lite_matches_its_contract(n):
    width = 2 * n + math.factorial(n)
    x, phi, bias, alpha, f = _inputs(10 + n, n, 8, width, 3.0)

    def ours(x, phi, bias, alpha, f):
        return _ours(x, phi, bias, alpha, f, "lite")

    grads, grads64 = _compare(ours, lite_layer, (x, phi, bias, alpha, f), (x, phi, bias, alpha, f))
    for g, w in zip(grads, grads64, strict=True):
        assert _rel(g, w) <= GRAD_TOL


def test_lite_res_is_doubly_stochastic_at_any_logits():
    t = jnp.asarray(np.random.default_rng(1).normal(size=(50, 24)) * 30, jnp.float32)
    h = variants.lite_res(t)
    np.testing.assert_allclose(h.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(h.sum(-2), 1.0, atol=1e-6)
    assert float(h.min()) >= 0.0


def test_permutation_matrices_are_all_of_them():
    mats = variants.permutation_matrices(4)
    assert mats.shape == (24, 4, 4) and np.array_equal(mats[0], np.eye(4))
    assert len({m.tobytes() for m in mats}) == 24
    np.testing.assert_array_equal(mats.sum(-1), 1.0)
    np.testing.assert_array_equal(mats.sum(-2), 1.0)


@pytest.mark.parametrize("variant", variants.VARIANTS)
@pytest.mark.parametrize("n", [1, 2, 4])
def test_residual_init_gives_the_diagonal(variant, n):
    bias = connections.residual_init_bias(n, 1, variant)
    assert bias.shape == (variants.width(n, variant),)
    t = bias[None]  # raw = 0 at phi = 0: the logits are the bias
    _, h_post, h_res = variants.coefficients(t, n, variant, 20)
    want = np.full((n, n), (1 - connections.RES_DIAGONAL) / max(n - 1, 1))
    np.fill_diagonal(want, connections.RES_DIAGONAL if n > 1 else 1.0)
    np.testing.assert_allclose(h_res[0], want, atol=1e-4)
    np.testing.assert_allclose(h_post[0], 1.0, atol=1e-6)


def test_bad_variants_are_refused_by_name():
    x = jnp.ones((2, 5, 8))
    with pytest.raises(ValueError, match=r"variant='v5' is invalid: must be one of"):
        api.mhc_mappings(x, jnp.zeros((40, 35)), jnp.zeros(35), jnp.ones(3), variant="v5")
    with pytest.raises(ValueError, match=r"'lite' with n=5 streams: .*n <= 4"):
        variants.check("lite", 5)
    with pytest.raises(ValueError, match=r"phi must have shape \(32, 32\)"):
        api.mhc_mappings(
            jnp.ones((2, 4, 8)), jnp.zeros((32, 24)), jnp.zeros(32), jnp.ones(3), variant="lite"
        )
    with pytest.raises(ValueError, match="mHC-lite's h_res is no Sinkhorn"):
        sinkhorn_knopp(jnp.zeros((4, 4)), variant="lite")
    with pytest.raises(ValueError, match=r"ModelConfig.mhc_variant='v4' is invalid"):
        ModelConfig(mhc_variant="v4")
    with pytest.raises(ValueError, match=r"MappingConfig.variant='v4' is invalid"):
        MappingConfig(variant="v4")
    with pytest.raises(ValueError, match=r"t_res has 5 logits per token; must be one of"):
        variants.lite_res(jnp.zeros((2, 5)))


def test_kernels_refuse_lite_and_auto_falls_back(monkeypatch, caplog):
    """An explicit kernel backend raises the typed error; auto (here: the Triton kernels,
    then XLA, as on a GPU) logs the refusal and runs XLA."""
    n, c = 2, 64
    x, phi, bias, alpha, _ = _inputs(3, n, c, variants.width(n, "lite"), 1.0, batch=(16,))
    with pytest.raises(UnsupportedInput, match="not 'lite'"):
        api.mhc_mappings(x, phi, bias, alpha, variant="lite", impl="triton_interpret")
    monkeypatch.setattr(api, "chain", lambda *_: (Impl.TRITON_INTERPRET, Impl.XLA))
    got = api.mhc_mappings(x, phi, bias, alpha, variant="lite", impl="auto")
    assert "not 'lite'" in caplog.text and "running xla" in caplog.text
    want = api.mhc_mappings(x, phi, bias, alpha, variant="lite", impl="xla")
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("n", [3, 4])  # n = 3: padded lanes in every layout
@pytest.mark.parametrize("backend", [Triton(), Tpu(), MosaicGpu()], ids=lambda b: b.backend)
def test_kernels_take_deepseek_v4(backend, n):
    """Every kernel backend (compiled on its own platform, else in the interpreter)
    computes V4's coefficients and their gradients as the XLA path does: its epilogues'
    V4 Sinkhorn and VJP. Coefficients
    and the weights' gradients agree to ~1e-5 (the paper's Sinkhorn instead, in the
    forward or the backward alone, is off by >= 6e-3); the bf16 layer input and dx to
    bf16 rounding."""
    x, phi, bias, alpha, _ = _inputs(5, n, 64, variants.width(n), 4.0, batch=(40,))
    args = (jnp.asarray(x, jnp.bfloat16), *map(jnp.asarray, (phi, bias, alpha)))

    def run(impl):
        def fn(*a):
            li, *h = api.mhc_mappings_and_pre(*a, variant="deepseek_v4", impl=impl)
            return li.astype(jnp.float32), *h

        out, vjp = jax.vjp(fn, *args)
        cots = [jnp.asarray(np.random.default_rng(3).normal(size=o.shape), o.dtype) for o in out]
        return out, vjp(tuple(cots))

    (out, grads), (want, want_grads) = run(backend.impl), run("xla")
    for name, g, w, tol in zip(("li", "h_pre", "h_post", "h_res"), out, want, (1e-2, *[1e-4] * 3)):
        assert _rel(g, w) <= tol, name
    tols = (1e-2, 1e-4, 1e-4, 1e-4)
    for name, g, w, tol in zip(("x", "phi", "bias", "alpha"), grads, want_grads, tols, strict=True):
        assert _rel(g.astype(jnp.float32), w.astype(jnp.float32)) <= tol, name


class _OneLayer(nn.Module):
    variant: str

    @nn.compact
    def __call__(self, x):
        mhc = connection_modules.ManifoldHyperConnection
        return mhc(layer_index=0, variant=self.variant, impl="xla")(x, jnp.tanh)


@pytest.mark.parametrize("variant", variants.VARIANTS)
def test_module_trains_with_each_variant(variant):
    """The Linen module: phi's width per variant, the residual init, a finite gradient."""
    n, c = 3, 16
    layer = _OneLayer(variant)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, n, c)), jnp.float32)
    params = strip_boxes(layer.init(jax.random.key(0), x))
    phi = params["params"]["ManifoldHyperConnection_0"]["phi"]
    assert phi.shape == (n, c, variants.width(n, variant))

    def loss(p):
        return jnp.sum(layer.apply(p, x) ** 2)

    grads = jax.grad(loss)(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["params"]["ManifoldHyperConnection_0"]["phi"]).max()) > 0
