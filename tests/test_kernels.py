"""Pallas mHC kernels (pallas_kernels.mhc) against the pure-jnp references.

On a CPU every kernel runs in the Pallas interpreter, which fills each output
with NaN before the kernel runs: an element the kernel fails to write stays NaN
and fails the finiteness check. On a GPU the Triton kernels run compiled (the
Mosaic ones are skipped), on a TPU the Mosaic ones. References always run on
the CPU (exact fp32 matmuls). Errors are ||got - want|| / ||want||.

T = 83 is no multiple of any token block; the TPU block cap is lowered to 32
rows so the Mosaic kernels also see several blocks and a partial last one, and
the Triton mapping projection's column span to 256, so that it sums several
spans' partials (the last one partial where 256 does not divide n*C), and the
mapping dx kernel's span raised to 256, so that it loops over column blocks.
"""

from __future__ import annotations

import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mhc import (
    api,
    blocks,
    mapping_tpu,
    mapping_triton,
    post_res_tpu,
    post_res_triton,
    pre_tpu,
    pre_triton,
    reference,
)
from pallas_kernels.mhc._common import Static

F32, BF16 = jnp.float32, jnp.bfloat16
T = 83
TOL = {F32: 1e-5, BF16: 1e-2}
# d_alpha sums raw * dt over every token and coefficient; fp32 kernel and fp32
# library each land about 1e-5 from float64 there (measured), so allow 5e-5.
TOL_DALPHA_F32 = 5e-5
KERNELS = {
    "triton": (mapping_triton, pre_triton, post_res_triton),
    "tpu": (mapping_tpu, pre_tpu, post_res_tpu),
}
PLATFORM = jax.default_backend()
NATIVE = {"triton": PLATFORM in ("gpu", "cuda", "rocm"), "tpu": PLATFORM == "tpu"}
BACKENDS = [
    pytest.param(
        b,
        marks=pytest.mark.skipif(
            PLATFORM != "cpu" and not NATIVE[b],
            reason=f"the {b} kernels compile only for their own platform, and the Pallas "
            f"interpreter runs them on CPU hosts only; this host's backend is {PLATFORM}",
        ),
    )
    for b in KERNELS
]
CPU = jax.devices("cpu")[0]


@pytest.fixture(autouse=True)
def _small_tpu_blocks(monkeypatch):
    monkeypatch.setattr(blocks, "TPU_MAX_ROWS", 32)
    monkeypatch.setattr(blocks, "TRITON_MAX_SPAN", 256)
    monkeypatch.setattr(blocks, "TRITON_DX_SPAN", 256)


def _static(backend: str, **kw) -> Static:
    return Static(interpret=not NATIVE[backend], **kw)


def _rng(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _normal(rng, shape, dtype=F32, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def _mapping_inputs(rng, n, c, dtype):
    k = n * n + 2 * n
    x = _normal(rng, (T, n, c), dtype)
    phi = _normal(rng, (n * c, k), scale=2.0 / np.sqrt(n * c))
    bias = _normal(rng, (k,))
    alpha = jnp.asarray(rng.uniform(0.5, 1.5, 3), F32)
    return x, phi, bias, alpha


def _value_and_grads(fn, args, rng, device=None, repeat=1):
    """fn(*args) and the VJP of random cotangents, in one jit (run ``repeat`` times)."""
    outs = jax.eval_shape(fn, *args)
    cots = jax.tree.map(lambda o: _normal(rng, o.shape, o.dtype), outs)

    @jax.jit
    def both(args, cots):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cots)

    if device is None:
        results = [both(args, cots) for _ in range(repeat)]
    else:
        with jax.default_device(device):
            args, cots = jax.device_put((args, cots), device)
            results = [both(args, cots) for _ in range(repeat)]
    return results[0] if repeat == 1 else results


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got)), "non-finite (unwritten) output elements"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _assert_close(got, want, tol, names):
    for name, g, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        err = _rel(g, w)
        limit = TOL_DALPHA_F32 if name == "d_alpha" and tol == TOL[F32] else tol
        assert err <= limit, f"{name}: rel error {err:.2e} > {limit:.0e}"


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


MAP_CASES = [
    (1, 200, BF16, True),
    (2, 512, BF16, False),
    (2, 64, F32, True),
    (3, 200, F32, True),
    (4, 200, BF16, True),
    (4, 512, F32, False),
    (8, 64, F32, True),
    (8, 200, BF16, False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c,dtype,with_pre", MAP_CASES)
def test_mapping_matches_reference(backend, n, c, dtype, with_pre):
    rng = _rng("mapping", backend, n, c, dtype, with_pre)
    args = _mapping_inputs(rng, n, c, dtype)
    static = _static(backend)
    kernel = KERNELS[backend][0].mapping

    def fn(*a):
        return kernel(*a, static, with_pre)

    ref = reference.mhc_mappings_and_pre if with_pre else reference.mhc_mappings
    got = _value_and_grads(fn, args, _rng("cot", n, c))
    want = _value_and_grads(ref, args, _rng("cot", n, c), CPU)
    outs = (["layer_input"] if with_pre else []) + ["h_pre", "h_post", "h_res"]
    _assert_close(got, want, TOL[dtype], outs + ["d_x", "d_phi", "d_bias", "d_alpha"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c,dtype", [(4, 200, BF16), (3, 64, F32)])
def test_tied_mapping_adds_the_pass_through_cotangent(backend, n, c, dtype):
    """tied=True returns x as a fifth output; its cotangent joins d_x in the kernel."""
    rng = _rng("tied", backend, n, c, dtype)
    args = _mapping_inputs(rng, n, c, dtype)
    static = _static(backend)
    kernel = KERNELS[backend][0].mapping

    def ref(x, *a):
        return (*reference.mhc_mappings_and_pre(x, *a), x)

    got = _value_and_grads(lambda *a: kernel(*a, static, True, tied=True), args, _rng("cot", n))
    want = _value_and_grads(ref, args, _rng("cot", n), CPU)
    outs = ["layer_input", "h_pre", "h_post", "h_res", "x"]
    _assert_close(got, want, TOL[dtype], outs + ["d_x", "d_phi", "d_bias", "d_alpha"])


APPLY_CASES = [(1, 200, BF16), (2, 64, F32), (3, 512, BF16), (4, 200, F32), (8, 512, BF16)]


def _coefficients(rng, n):
    h_pre = jnp.asarray(rng.uniform(0, 1, (T, n)), F32)
    h_post = jnp.asarray(rng.uniform(0, 2, (T, n)), F32)
    h_res = jnp.asarray(rng.uniform(0, 1, (T, n, n)), F32)
    return h_pre, h_post, h_res


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c,dtype", APPLY_CASES)
def test_pre_matches_reference(backend, n, c, dtype):
    rng = _rng("pre", backend, n, c, dtype)
    args = (_coefficients(rng, n)[0], _normal(rng, (T, n, c), dtype))
    static = _static(backend)
    kernel = KERNELS[backend][1].apply_pre
    got = _value_and_grads(lambda *a: kernel(*a, static), args, _rng("cot", n, c))
    want = _value_and_grads(reference.apply_pre, args, _rng("cot", n, c), CPU)
    _assert_close(got, want, TOL[dtype], ["layer_input", "d_h_pre", "d_x"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,c,dtype", APPLY_CASES)
def test_post_res_matches_reference(backend, n, c, dtype):
    rng = _rng("post_res", backend, n, c, dtype)
    _, h_post, h_res = _coefficients(rng, n)
    args = (h_res, h_post, _normal(rng, (T, n, c), dtype), _normal(rng, (T, c), dtype))
    static = _static(backend)
    kernel = KERNELS[backend][2].apply_post_res
    got = _value_and_grads(lambda *a: kernel(*a, static), args, _rng("cot", n, c))
    want = _value_and_grads(reference.apply_post_res, args, _rng("cot", n, c), CPU)
    _assert_close(got, want, TOL[dtype], ["x_next", "d_h_res", "d_h_post", "d_x", "d_f"])


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
    rng = _rng("api")
    x, phi, bias, alpha = _mapping_inputs(rng, n, c, BF16)
    x = x[:72].reshape(2, 36, n, c)
    f = _normal(rng, (2, 36, c), BF16)
    impl = "pallas" if PLATFORM != "cpu" else "pallas_interpret"
    args = (x, f, phi, bias, alpha)
    got = _value_and_grads(_connection(impl, tied=tied), args, _rng("cot-api"))
    want = _value_and_grads(_connection("xla"), args, _rng("cot-api"), CPU)
    names = ["layer_input", "x_next", "d_x", "d_f", "d_phi", "d_bias", "d_alpha"]
    _assert_close(got, want, TOL[BF16], names)


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
    rng = _rng("determinism")
    x, phi, bias, alpha = _mapping_inputs(rng, 4, 64, BF16)
    f = _normal(rng, (T, 64), BF16)
    impl = "pallas" if PLATFORM != "cpu" else "pallas_interpret"
    args = (x, f, phi, bias, alpha)
    first, second = _value_and_grads(_connection(impl, False), args, _rng("cot-det"), repeat=2)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    want = _value_and_grads(_connection("xla", False), args, _rng("cot-det"), CPU)
    names = ["layer_input", "x_next", "d_x", "d_f", "d_phi", "d_bias", "d_alpha"]
    _assert_close(first, want, TOL[BF16], names)


def _kernel_sinkhorn_vjp(backend, logits, g):
    """Sinkhorn VJP through the mapping kernels, one (n, n) matrix per call.

    With T = 1 and phi = 0 the res logits are bias[2n:], so the bias cotangent
    is the in-kernel (recomputing) Sinkhorn VJP itself.
    """
    n = logits.shape[-1]
    x, phi = jnp.ones((1, n, 16), F32), jnp.zeros((16 * n, n * n + 2 * n), F32)
    mapping, static = KERNELS[backend][0].mapping, _static(backend)

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
    backend = "tpu" if NATIVE["tpu"] else "triton"
    rows = []
    for case, scale in SINKHORN_CASES.items():
        rng = _rng("sinkhorn", case)
        logits = _normal(rng, (24, 4, 4), scale=scale)
        g = _normal(rng, (24, 4, 4))
        with jax.enable_x64(True):
            l64, g64 = (jnp.asarray(np.asarray(a), jnp.float64) for a in (logits, g))
            exact = np.asarray(jax.vjp(reference.sinkhorn_unrolled, l64)[1](g64)[0])
        errs = {
            "kernel (recompute)": _rel(_kernel_sinkhorn_vjp(backend, logits, g), exact),
            "library custom_vjp": _rel(jax.vjp(reference.sinkhorn_knopp, logits)[1](g)[0], exact),
            "converged iterate": _rel(reference.sinkhorn_converged_vjp(logits, g), exact),
        }
        rows.append((case, errs))
        assert errs["kernel (recompute)"] <= SINKHORN_EXACT_BOUND[case], (case, errs)
        assert errs["library custom_vjp"] <= SINKHORN_EXACT_BOUND[case], (case, errs)
        if case in SINKHORN_CONVERGED_FLOOR:
            assert errs["converged iterate"] >= SINKHORN_CONVERGED_FLOOR[case], (case, errs)
    with capsys.disabled():
        print(f"\nSinkhorn VJP error vs float64 unrolled autodiff ({backend}):")
        for case, errs in rows:
            print(f"  {case:6s} " + "  ".join(f"{k}: {v:.2e}" for k, v in errs.items()))


LOWERINGS = {
    "triton": ("cuda", r"custom_call @\S*triton\S*\("),
    "tpu": ("tpu", r"custom_call @tpu_custom_call\("),
}
# Kernels per op: forward, and forward + backward under jax.grad. The Triton
# mapping forward is 2 kernels (projection, coefficients), + 1 with the pre.
LOWER_OPS = {
    "triton": {"mapping": (2, 4), "mapping_and_pre": (3, 6), "pre": (1, 2), "post_res": (1, 2)},
    "tpu": {"mapping": (1, 3), "mapping_and_pre": (1, 4), "pre": (1, 2), "post_res": (1, 2)},
}
for _ops in LOWER_OPS.values():  # the coefficient kernels with DeepSeek-V4's Sinkhorn
    _ops["mapping_deepseek_v4"] = _ops["mapping"]


def _lowering_args(backend, op):
    n, c, t = 4, 256, 64
    mapping, pre, post_res = KERNELS[backend]
    static = Static()
    x, f = jnp.zeros((t, n, c), BF16), jnp.zeros((t, c), BF16)
    k = n * n + 2 * n
    maps = (x, jnp.zeros((n * c, k)), jnp.zeros(k), jnp.zeros(3))
    coef = jnp.zeros((t, n)), jnp.zeros((t, n, n))
    return {
        "mapping": (lambda *a: mapping.mapping(*a, static, False), maps),
        "mapping_deepseek_v4": (
            lambda *a: mapping.mapping(*a, static._replace(variant="deepseek_v4"), False),
            maps,
        ),
        "mapping_and_pre": (lambda *a: mapping.mapping(*a, static, True), maps),
        "pre": (lambda *a: pre.apply_pre(*a, static), (coef[0], x)),
        "post_res": (lambda *a: post_res.apply_post_res(*a, static), (coef[1], coef[0], x, f)),
    }[op]


@pytest.mark.smoke
@pytest.mark.parametrize("backend", list(KERNELS))
@pytest.mark.parametrize("op", list(LOWER_OPS["tpu"]))
def test_kernels_lower_for_their_platform(backend, op, lowered_text):
    """Cross-lowering on any host: the kernel bodies go through Pallas' Mosaic
    (TPU) or Triton (CUDA) lowering into the platform's custom call."""
    platform, pattern = LOWERINGS[backend]
    fn, args = _lowering_args(backend, op)

    def loss(*a):
        return sum(jnp.sum(o.astype(F32)) for o in jax.tree.leaves(fn(*a)))

    # value_and_grad: the loss keeps the forward kernels live (JAX >= 0.12 drops forward
    # outputs that only jax.grad's unused value would read)
    grad = jax.value_and_grad(loss, argnums=tuple(range(len(args))))
    for f, kernels in zip((fn, grad), LOWER_OPS[backend][op]):
        text = lowered_text(f, *args, platform=platform)
        assert len(re.findall(pattern, text)) == kernels


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


@pytest.mark.parametrize("backend", list(KERNELS))
def test_save_connections_policy_reruns_no_forward_kernel(backend):
    """Loss and gradient of two tied layers under jax.checkpoint: with
    ``save_connections`` each layer's forward kernels (Triton 4, TPU 2) and 4
    backward kernels run once; ``mhc_blocks`` re-runs in the backward pass every
    forward kernel but the last layer's post-res (its output only feeds the loss)."""
    from mhc_jax.remat import checkpoint_policy

    mapping, _, post_res = KERNELS[backend]
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

    per_layer = {"triton": 4, "tpu": 2}[backend]
    assert forward_kernels("save_connections") == 2 * per_layer
    assert forward_kernels("mhc_blocks") == 2 * per_layer + 2 * per_layer - 1
