"""The kernel package as a whole (``pallas_kernels.mhc``): the api's connection through
the platform's kernels against ``xla``, its input checks, the shared pieces the kernel
families build on, and checks across a family's ops. Each op's kernels are tested per
backend in ``test_mapping_kernels.py``, ``test_pre_kernels.py`` and
``test_post_res_kernels.py`` (see ``kernel_test_base``); as there, the Triton and TPU
block sizes are shrunk (``shrink_blocks``) so that T = 83 spans several blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_test_base import (
    BF16,
    CPU,
    F32,
    PLATFORM,
    TOL,
    T,
    Tpu,
    Triton,
    assert_close,
    mapping_inputs,
    normal,
    rel_error,
    rng_for,
    shrink_blocks,
    value_and_grads,
)

from pallas_kernels.mhc import api, reference
from pallas_kernels.mhc._common import Static


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    shrink_blocks(monkeypatch)


@pytest.mark.skipif(PLATFORM != "cpu", reason="the interpreter's poisoning is what is checked")
def test_interpreter_poisons_unwritten_outputs():
    """The premise of the finiteness checks: an output element no kernel writes is NaN."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    def half(x_ref, o_ref):
        plgpu.store(o_ref.at[pl.ds(0, 8)], x_ref[pl.ds(0, 8)])

    out = pl.pallas_call(half, out_shape=jax.ShapeDtypeStruct((16,), F32), interpret=True)(
        jnp.ones(16, F32)
    )
    assert np.all(np.isnan(np.asarray(out[8:]))) and np.all(np.asarray(out[:8]) == 1)


@pytest.mark.parametrize("dtype", [BF16, jnp.float16])
def test_split_keeps_sixteen_bits_when_compiled(dtype):
    """phi's hi + lo parts carry about 16 mantissa bits on this backend, compiled (on a
    GPU, XLA folded the old fp32 -> 16-bit -> fp32 round trip, so lo came out zero: a
    native run catches that), and non-finite values stay themselves in hi."""
    from pallas_kernels.mhc._common import split

    a = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0, 4096), F32)  # normal in fp16
    hi, lo = jax.jit(lambda a: split(a, dtype))(a)
    assert hi.dtype == lo.dtype == dtype
    err = np.abs(np.asarray(hi, np.float64) + np.asarray(lo, np.float64) - np.asarray(a))
    assert np.max(err / np.asarray(a)) <= 2.0**-16
    assert np.max(np.abs(np.asarray(hi, np.float64) - np.asarray(a)) / np.asarray(a)) <= 2.0 ** -(
        jnp.finfo(dtype).nmant + 1
    )
    tiny = 1e-6 if dtype == jnp.float16 else 1e-30  # fp16: below its smallest normal
    odd = jnp.asarray([np.inf, -np.inf, tiny, -0.0], F32)
    nans = jax.lax.bitcast_convert_type(jnp.asarray([0x7FFFFFFF, 0xFFFFFFFF], jnp.uint32), F32)
    hi, lo = jax.jit(lambda a: split(a, dtype))(jnp.concatenate([odd, nans]))
    hi = np.asarray(hi, np.float32)
    assert list(hi[:2]) == [np.inf, -np.inf] and np.all(np.isnan(hi[4:]))
    if dtype == jnp.float16:  # all of it in lo, rounded once
        assert hi[2] == 0 and float(lo[2]) == float(jnp.asarray(tiny, F32).astype(dtype))
    else:
        assert abs(float(hi[2]) + float(lo[2]) - float(odd[2])) <= 2.0**-16 * float(odd[2])


def _connection(impl, fused=True, tied=False):
    """One mHC connection with f given: (layer_input, x_next) from (x, f, phi, bias, alpha).
    ``tied``: post-res takes the mapping's pass-through x (its cotangent then
    joins dx inside the mapping's backward kernel)."""

    def fn(x, f, phi, bias, alpha):
        if tied:
            li, _, h_post, h_res, x = api.mhc_mappings_and_pre(
                x, phi, bias, alpha, tied_streams=True, impl=impl
            )
        elif fused:
            li, _, h_post, h_res = api.mhc_mappings_and_pre(x, phi, bias, alpha, impl=impl)
        else:
            h_pre, h_post, h_res = api.mhc_mappings(x, phi, bias, alpha, impl=impl)
            li = api.apply_pre(h_pre, x, impl=impl)
        return li, api.apply_post_res(h_res, h_post, x, f, impl=impl)

    return fn


@pytest.mark.parametrize("tied", [False, True])
def test_api_fused_connection_with_leading_dims_matches_xla(tied):
    n, c = 4, 64
    rng = rng_for("api")
    x, phi, bias, alpha = mapping_inputs(rng, n, c, BF16)
    x = x[:72].reshape(2, 36, n, c)
    f = normal(rng, (2, 36, c), BF16)
    impl = "pallas" if PLATFORM != "cpu" else "pallas_interpret"
    args = (x, f, phi, bias, alpha)
    got = value_and_grads(_connection(impl, tied=tied), args, rng_for("cot-api"))
    want = value_and_grads(_connection("xla"), args, rng_for("cot-api"), CPU)
    names = ["layer_input", "x_next", "d_x", "d_f", "d_phi", "d_bias", "d_alpha"]
    assert_close(got, want, names, TOL[BF16])


def _maps(x, **kw):
    k = 24  # n = 4
    return api.mhc_mappings(
        x, jnp.zeros((256, k)), jnp.zeros(k), jnp.zeros(3), impl="pallas_interpret", **kw
    )


BAD_INPUTS = {
    "impl": (lambda x, h: api.apply_pre(h, x, impl="cuda"), r"impl must be one of .*'cuda'"),
    "h_pre": (lambda x, h: api.apply_pre(h[:, :2], x, impl="pallas_interpret"), "h_pre must"),
    "dtype": (
        lambda x, h: api.apply_pre(h, x.astype(jnp.int32), impl="pallas_interpret"),
        r"x.dtype in .*got int32",
    ),
    "n": (
        lambda x, h: api.apply_pre(
            h[:, :1].repeat(9, 1), x[:, :1].repeat(9, 1), impl="pallas_interpret"
        ),
        r"1 <= n <= 8 streams, got n=9",
    ),
    "phi": (
        lambda x, h: api.mhc_mappings(
            x, jnp.zeros((3, 24)), jnp.zeros(24), jnp.zeros(3), impl="pallas_interpret"
        ),
        r"phi must have shape \(256, 24\), got \(3, 24\)",
    ),
    "num_iters": (lambda x, h: _maps(x, num_iters=0), r"num_iters must be .* >= 1, got 0"),
    "norm_eps": (lambda x, h: _maps(x, norm_eps=-1.0), r"norm_eps must be >= 0, got -1.0"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_api_rejects_bad_input(case):
    call, match = BAD_INPUTS[case]
    x, h = jnp.ones((5, 4, 64), F32), jnp.ones((5, 4), F32)
    with pytest.raises(ValueError, match=match):
        call(x, h)


@pytest.mark.skipif(PLATFORM != "cpu", reason="checks the CPU-only error")
def test_api_pallas_needs_an_accelerator():
    with pytest.raises(ValueError, match="impl='pallas' is invalid on the 'cpu' backend"):
        api.apply_pre(jnp.ones((5, 4)), jnp.ones((5, 4, 64)), impl="pallas")


def test_unfused_connection_matches_xla_and_is_deterministic():
    """mhc_mappings -> apply_pre -> apply_post_res through the api; two backward
    passes are bitwise equal (per-block partials, no atomics)."""
    rng = rng_for("determinism")
    x, phi, bias, alpha = mapping_inputs(rng, 4, 64, BF16)
    f = normal(rng, (T, 64), BF16)
    impl = "pallas" if PLATFORM != "cpu" else "pallas_interpret"
    args = (x, f, phi, bias, alpha)
    first, second = value_and_grads(_connection(impl, False), args, rng_for("cot-det"), repeat=2)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    want = value_and_grads(_connection("xla", False), args, rng_for("cot-det"), CPU)
    names = ["layer_input", "x_next", "d_x", "d_f", "d_phi", "d_bias", "d_alpha"]
    assert_close(first, want, names, TOL[BF16])


def _kernel_sinkhorn_vjp(kernels, logits, g):
    """Sinkhorn VJP through the mapping kernels, one (n, n) matrix per call.

    With T = 1 and phi = 0 the res logits are bias[2n:], so the bias cotangent
    is the in-kernel (recomputing) Sinkhorn VJP itself.
    """
    n = logits.shape[-1]
    x, phi = jnp.ones((1, n, 16), F32), jnp.zeros((16 * n, n * n + 2 * n), F32)
    mapping, static = kernels.mapping_module.mapping, kernels.static

    def one(lg):
        bias = jnp.concatenate([jnp.zeros(2 * n, F32), lg[0].ravel()])
        _, vjp = jax.vjp(lambda b: mapping(x, phi, b, jnp.ones(3, F32), static, False)[2], bias)
        return vjp(lg[1][None])[0][2 * n :].reshape(n, n)

    return jax.jit(lambda lg: jax.lax.map(one, lg))((logits, g))


# Sinkhorn-gradient error vs float64 autodiff of the unrolled loop (rel. Frobenius
# over 24 matrices, n = 4, 20 iterations): upper bounds for the exact strategies,
# a lower bound showing the converged-iterate shortcut is wrong for sharp logits.
SINKHORN_CASES = {"smooth": 0.5, "sharp": 8.0}
SINKHORN_EXACT_BOUND = {"smooth": 1e-6, "sharp": 1e-6}
SINKHORN_CONVERGED_FLOOR = {"sharp": 1e-2}


def test_sinkhorn_backward_error_table(capsys):
    """Through the Triton kernels (the Mosaic ones share _coeffs), or the Mosaic
    ones on a TPU."""
    kernels = Tpu() if Tpu().native else Triton()
    rows = []
    for case, scale in SINKHORN_CASES.items():
        rng = rng_for("sinkhorn", case)
        logits = normal(rng, (24, 4, 4), scale=scale)
        g = normal(rng, (24, 4, 4))
        with jax.enable_x64(True):
            l64, g64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (logits, g))
            exact = np.asarray(jax.vjp(reference.sinkhorn_unrolled, l64)[1](g64)[0])
        errs = {
            "kernel (recompute)": rel_error(_kernel_sinkhorn_vjp(kernels, logits, g), exact),
            "library custom_vjp": rel_error(
                jax.vjp(reference.sinkhorn_knopp, logits)[1](g)[0], exact
            ),
            "converged iterate": rel_error(reference.sinkhorn_converged_vjp(logits, g), exact),
        }
        rows.append((case, errs))
        assert errs["kernel (recompute)"] <= SINKHORN_EXACT_BOUND[case], (case, errs)
        assert errs["library custom_vjp"] <= SINKHORN_EXACT_BOUND[case], (case, errs)
        if case in SINKHORN_CONVERGED_FLOOR:
            assert errs["converged iterate"] >= SINKHORN_CONVERGED_FLOOR[case], (case, errs)
    with capsys.disabled():
        print(f"\nSinkhorn VJP error vs float64 unrolled autodiff ({kernels.backend}):")
        for case, errs in rows:
            print(f"  {case:6s} " + "  ".join(f"{k}: {v:.2e}" for k, v in errs.items()))


def _live_kernels(jaxpr) -> list[str]:
    """Names of the pallas_calls whose outputs reach the jaxpr's outputs (XLA drops
    the others: the kernel custom calls have no side effects), nested jaxprs
    included (all of a live nested jaxpr's outputs count as used)."""
    from jax.extend import core

    live = []
    used = {v for v in jaxpr.outvars if isinstance(v, core.Var)}
    for e in reversed(jaxpr.eqns):
        if not any(v in used for v in e.outvars):
            continue
        used |= {v for v in e.invars if isinstance(v, core.Var)}
        if e.primitive.name == "pallas_call":
            name = e.params.get("name") or e.params.get("name_and_src_info")
            live.append(str(name).split()[0])
            continue
        for p in e.params.values():
            inner = p.jaxpr if isinstance(p, core.ClosedJaxpr) else p
            if isinstance(inner, core.Jaxpr):
                live += _live_kernels(inner)
    return live[::-1]


@pytest.mark.parametrize("kernels", [Triton(), Tpu()], ids=lambda k: k.backend)
def test_save_connections_policy_reruns_no_forward_kernel(kernels):
    """Loss and gradient of two tied layers under jax.checkpoint: with
    ``save_connections`` each layer's forward kernels (Triton 4, TPU 2) and 4
    backward kernels run once; ``mhc_blocks`` re-runs in the backward pass every
    forward kernel but the last layer's post-res (its output only feeds the loss)."""
    from mhc_jax.remat import checkpoint_policy

    mapping, post_res = kernels.mapping_module, kernels.post_res_module
    n, c, t = 4, 256, 64
    static = Static()
    k = n * n + 2 * n

    def layers(x, phi, bias, alpha):
        for _ in range(2):
            li, _, h_post, h_res, x = mapping.mapping(x, phi, bias, alpha, static, True, tied=True)
            x = post_res.apply_post_res(h_res, h_post, x, jnp.tanh(li), static)
        return jnp.sum(x.astype(F32))

    args = (jnp.zeros((t, n, c), BF16), jnp.zeros((n * c, k)), jnp.zeros(k), jnp.zeros(3))

    def forward_kernels(policy):
        checkpointed = jax.checkpoint(layers, policy=checkpoint_policy(policy))
        grad = jax.value_and_grad(checkpointed, argnums=(0, 1))
        live = _live_kernels(jax.make_jaxpr(grad)(*args).jaxpr)
        assert len(live) - sum(name.endswith("_fwd") for name in live) == 2 * 4, live
        return sum(name.endswith("_fwd") for name in live)

    per_layer = {"triton": 4, "tpu": 2}[kernels.backend]
    assert forward_kernels("save_connections") == 2 * per_layer
    assert forward_kernels("mhc_blocks") == 2 * per_layer + 2 * per_layer - 1
