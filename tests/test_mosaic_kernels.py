"""Pallas Mosaic GPU mHC kernels (``*_mosaic.py``) against the pure-jnp references.

On a CPU host every kernel runs in the Mosaic GPU interpreter with race detection, and
is lowered for CUDA, which catches shared memory over a block's limit, illegal TMA
boxes and layout-inference failures (not ptxas errors, spills or wrong numbers: those
need the GPU, where the same tests run the compiled kernels). JAX 0.11.2's interpreter
records a race without raising, so each run asserts the record is clean, and one test
checks that a kernel with a missing barrier wait is recorded. T = 83 is neither a
multiple of the 8-token alignment nor of the 64-token block.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import TOL, _rel, _rng, _value_and_grads

from pallas_kernels.mhc import (
    _coeffs,
    _mosaic_io,
    _token_epilogue,
    epilogue_mosaic,
    mapping_cluster_mosaic,
    mapping_mosaic,
    post_res_mosaic,
    pre_mosaic,
    reference,
)
from pallas_kernels.mhc._common import Static
from pallas_kernels.mhc.backends import UnsupportedInput

F32, BF16 = jnp.float32, jnp.bfloat16
T = 83
PLATFORM = jax.default_backend()
CPU = jax.devices("cpu")[0]
pytestmark = pytest.mark.skipif(
    PLATFORM not in ("cpu", "gpu"),
    reason=f"the Mosaic GPU kernels run on a GPU or in the interpreter on a CPU host, "
    f"not on {PLATFORM}",
)
STATIC = Static(interpret=PLATFORM == "cpu")
# (n, C, dtype): every n the kernels take, column blocks of 128 down to 32 (C = 96 and
# fp32 at n = 8 take the 32-column tiles), both stream dtypes.
SHAPES = [(1, 64, F32), (2, 256, BF16), (3, 96, F32), (4, 128, BF16), (8, 64, F32)]


_RACES: list[bool] = []  # one entry per race the interpreter recorded, any kernel


def _record_every_race() -> None:
    """The interpreter keeps one race record per kernel call, replaced by the next call:
    a race in any but the last kernel of a jitted function would go unseen. Every
    record's flag now also lands in ``_RACES``."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    state = gpu_callbacks.GPURaceDetectionState

    def set_found(self, found: bool) -> None:
        self.__dict__["_found"] = found
        if found:
            _RACES.append(True)

    state.races_found = property(lambda self: self.__dict__.get("_found", False), set_found)


if PLATFORM == "cpu":
    _record_every_race()


def _races_recorded() -> bool:
    """Whether the interpreter recorded a race in any kernel since the last call."""
    found = bool(_RACES)
    _RACES.clear()
    return found


def _inputs(rng, n, c, dtype):
    x = jnp.asarray(rng.standard_normal((T, n, c)), dtype)
    f = jnp.asarray(rng.standard_normal((T, c)), dtype)
    h_res = jnp.asarray(rng.uniform(0, 1, (T, n, n)) / n, F32)
    h_post = jnp.asarray(rng.uniform(0, 2, (T, n)), F32)
    h_pre = jnp.asarray(rng.uniform(0, 1, (T, n)), F32)
    return x, f, h_res, h_post, h_pre


OPS = {
    "pre": (
        lambda x, f, h_res, h_post, h_pre: (h_pre, x),
        lambda *a: pre_mosaic.apply_pre(*a, STATIC),
        reference.apply_pre,
    ),
    "post_res": (
        lambda x, f, h_res, h_post, h_pre: (h_res, h_post, x, f),
        lambda *a: post_res_mosaic.apply_post_res(*a, STATIC),
        reference.apply_post_res,
    ),
}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("n, c, dtype", SHAPES)
def test_matches_reference(op, n, c, dtype):
    """Forward and VJP (every input's cotangent) against the reference on the CPU."""
    pick, kernel, ref = OPS[op]
    args = pick(*_inputs(_rng(op, n, c), n, c, dtype))
    jax.block_until_ready(jax.jit(kernel)(*args))
    assert not _races_recorded()  # the record covers the last kernel run: the forward
    got = _value_and_grads(kernel, args, _rng("cot", op, n, c))
    assert not _races_recorded()  # the backward
    want = _value_and_grads(ref, args, _rng("cot", op, n, c), device=CPU)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        assert _rel(g, w) <= TOL[dtype]


def _mapping_inputs(rng, n, c, t=T):
    k = n * n + 2 * n
    x = jnp.asarray(rng.standard_normal((t, n, c)), BF16)
    phi = jnp.asarray(rng.standard_normal((n * c, k)) * 2 / np.sqrt(n * c), F32)
    bias = jnp.asarray(rng.standard_normal(k), F32)
    return x, phi, bias, jnp.asarray(rng.uniform(0.5, 1.5, 3), F32)


# bf16 outputs: their own rounding; fp32 ones (coefficients and the cotangents of phi,
# bias, alpha) come from bf16 x through fp32 accumulation: measured up to 3e-5 relative
# (d_alpha at n = 8), where the pre/post-res kernels' fp32 math stays near 1e-6.
MAPPING_TOL = {jnp.dtype(BF16): 1e-2, jnp.dtype(F32): 1e-4}
# (n, C, with_pre, tied): the projection's spans, the dx kernel's column blocks and
# the pre's weight gradient at the narrowest and widest coefficient rows (kp 16, 128)
MAPPINGS = [
    (1, 64, False, False),
    (4, 128, True, False),
    (4, 192, True, True),
    (8, 64, True, False),
]


@pytest.mark.parametrize("n, c, with_pre, tied", MAPPINGS)
def test_mapping_matches_reference(n, c, with_pre, tied):
    """Outputs (layer_input, h_pre, h_post, h_res[, x]) and the cotangents of x, phi,
    bias and alpha; bf16 streams (the Mosaic mapping takes 16-bit streams only)."""
    _check_mapping(n, c, with_pre, tied)


# (n, C, with_pre): clusters of 1 (n = 8: kp = 128), 4, 5 and 8 CTAs
CLUSTER_MAPPINGS = [(8, 64, True), (2, 256, False), (4, 320, True), (4, 512, True)]


@pytest.mark.parametrize("n, c, with_pre", CLUSTER_MAPPINGS)
def test_cluster_forward_matches_reference(monkeypatch, n, c, with_pre):
    """The mapping with its forward as one cluster kernel per token block: the CTAs'
    partials cross through global memory behind a cluster barrier (a missing wait on it
    is recorded as a race); outputs and cotangents as test_mapping_matches_reference."""
    monkeypatch.setattr(mapping_mosaic, "FORWARD", "cluster")
    assert mapping_cluster_mosaic.cluster_size(c) == {64: 1, 256: 4, 320: 5, 512: 8}[c]
    _check_mapping(n, c, with_pre, False)


def _check_mapping(n, c, with_pre, tied):
    args = _mapping_inputs(_rng("mapping", n, c), n, c)

    def kernel(*a):
        return mapping_mosaic.mapping(*a, STATIC, with_pre, tied)

    def ref(*a):
        outs = (reference.mhc_mappings_and_pre if with_pre else reference.mhc_mappings)(*a)
        return (*outs, a[0]) if tied else outs

    jax.block_until_ready(jax.jit(kernel)(*args))
    assert not _races_recorded()
    got = _value_and_grads(kernel, args, _rng("cot", "mapping", n, c))
    assert not _races_recorded()
    want = _value_and_grads(ref, args, _rng("cot", "mapping", n, c), device=CPU)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        assert _rel(g, w) <= MAPPING_TOL[g.dtype]


def test_dx_kernel_pipelines_a_token_group(monkeypatch):
    """The dx kernel's CTAs loop over token groups: here 2 groups of 3 blocks for
    T = 300 (5 blocks), so its pipeline reuses each stage and output slot, the second
    group ends on a partial block and then one wholly past T; dphi sums both groups."""
    monkeypatch.setattr(_mosaic_io, "SMS", 8)  # 4 column blocks -> 2 token groups
    assert mapping_mosaic._dx_groups(300, 4) == 2
    assert mapping_mosaic._dx_groups(300, 2) == 3  # not 4 groups of 2 blocks: one past T
    args = _mapping_inputs(_rng("mapping", "groups"), 4, 128, t=300)

    def kernel(*a):
        return mapping_mosaic.mapping(*a, STATIC, True, True)

    def ref(*a):
        return (*reference.mhc_mappings_and_pre(*a), a[0])

    got = _value_and_grads(kernel, args, _rng("cot", "mapping", "groups"))
    assert not _races_recorded()
    want = _value_and_grads(ref, args, _rng("cot", "mapping", "groups"), device=CPU)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert _rel(g, w) <= MAPPING_TOL[g.dtype]


def _epilogue_inputs(rng, n, t):
    k = _coeffs.width(n)
    kp = _coeffs.packed_width(n, "mosaic_gpu")
    partials = rng.standard_normal((k + 1, t)) * 3  # logits up to ~10: peaked Sinkhorns
    partials[k] = rng.uniform(10, 100, t)
    bias, alpha = rng.standard_normal(k), rng.uniform(0.5, 1.5, 3)
    info = _coeffs.column_info(n, kp, jnp.asarray(bias, F32), jnp.asarray(alpha, F32))
    dcoef = jnp.asarray(rng.standard_normal((k, t)), F32)
    return jnp.asarray(partials, F32), info, dcoef


@pytest.mark.parametrize("n", [1, 2, 4])
def test_token_epilogue_matches_packed_rows(n):
    """``_token_epilogue`` (one array per coefficient) is ``_coeffs``' math."""
    t, k = 37, _coeffs.width(n)
    partials, info, dcoef = _epilogue_inputs(_rng("token", n), n, t)
    kp = info.shape[1]
    rows = _coeffs.load_info(lambda r: info[r : r + 1], lambda w: jnp.arange(w)[None], n)
    acc = jnp.pad(partials[:k].T, ((0, 0), (0, kp - k)))
    kw = dict(n=n, nc=n * 64, num_iters=20)
    coef, saved = _coeffs.forward_epilogue(acc, partials[k][:, None], rows, norm_eps=1e-6, **kw)
    dy, dt, _ = _coeffs.backward_epilogue(
        saved, jnp.pad(dcoef.T, ((0, 0), (0, kp - k))), rows, **kw
    )
    bias, alpha = list(info[0, :k]), list(info[1, :k])
    got, raw, r = _token_epilogue.forward(
        list(partials[:k]), partials[k], bias, alpha, norm_eps=1e-6, **kw
    )
    got_dy, c_x, got_dt = _token_epilogue.backward(raw, r, list(dcoef), bias, alpha, **kw)
    assert _rel(jnp.stack(got, 1), coef[:, :k]) <= 1e-6
    assert _rel(jnp.stack([*got_dy, c_x], 1), dy[:, : k + 1]) <= 2e-6
    assert _rel(jnp.stack(got_dt, 1), dt[:, :k]) <= 1e-6


def _xla_epilogue(partials, consts, dcoef, n, nc):
    """``epilogue_mosaic``'s forward and backward outputs from ``_token_epilogue`` in XLA."""
    k, rows = _coeffs.width(n), list
    bias, alpha = rows(consts[:k, 0]), rows(consts[k:, 0])
    kw = dict(n=n, nc=nc, num_iters=STATIC.num_iters)
    coef, raw, r = _token_epilogue.forward(
        rows(partials[:k]), partials[k], bias, alpha, norm_eps=STATIC.norm_eps, **kw
    )
    dy, c_x, dt = _token_epilogue.backward(raw, r, rows(dcoef), bias, alpha, **kw)
    dtraw = [d * v for d, v in zip(dt, raw)]
    return [jnp.stack(a) for a in (coef, [*raw, r], [*dy, c_x], dt, dtraw)]


@pytest.mark.parametrize("n", [1, 3, 4])
def test_epilogue_kernels_match_xla(n):
    """The epilogue kernels against the same math in XLA, over two token blocks and a
    partial third (T = 264). (n = 8 runs through the mapping test against the library:
    here its XLA form alone takes ~100 s on a CPU host.)"""
    partials, info, dcoef = _epilogue_inputs(_rng("epilogue", n), n, 264)
    consts, kw = epilogue_mosaic.constants(info, n), dict(n=n, nc=n * 64)
    coef, saved = jax.jit(lambda p, c: epilogue_mosaic.forward(p, c, static=STATIC, **kw))(
        partials, consts
    )
    assert not _races_recorded()
    grads = jax.jit(lambda s, d, c: epilogue_mosaic.backward(s, d, c, static=STATIC, **kw))(
        saved, dcoef, consts
    )
    assert not _races_recorded()
    want = _xla_epilogue(partials, consts, dcoef, n, n * 64)
    for g, w in zip((coef, saved, *grads), want, strict=True):
        assert g.shape == w.shape
        assert _rel(g, w) <= 1e-6


def test_mapping_takes_16_bit_streams_and_whole_chunks():
    x, phi, bias, alpha = _mapping_inputs(_rng("mapping", "bad"), 4, 64)
    with pytest.raises(UnsupportedInput, match=r"float32 streams"):
        mapping_mosaic.mapping(x.astype(F32), phi, bias, alpha, STATIC, True)
    x, phi, bias, alpha = _mapping_inputs(_rng("mapping", "bad"), 4, 96)
    with pytest.raises(UnsupportedInput, match=r"C=96: .* multiple of 64"):
        mapping_mosaic.mapping(x, phi, bias, alpha, STATIC, True)


@pytest.mark.parametrize("op", list(OPS))
def test_backward_is_bitwise_repeatable(op):
    """Column-block partials are summed in a fixed order: no atomics anywhere."""
    pick, kernel, _ = OPS[op]
    args = pick(*_inputs(_rng("repeat", op), 4, 128, BF16))
    first, second = _value_and_grads(kernel, args, _rng("cot", "repeat", op), repeat=2)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_mapping_backward_is_bitwise_repeatable():
    args = _mapping_inputs(_rng("repeat", "mapping"), 4, 128)

    def kernel(*a):
        return mapping_mosaic.mapping(*a, STATIC, True, True)

    first, second = _value_and_grads(kernel, args, _rng("cot", "repeat", "mapping"), repeat=2)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(PLATFORM != "cpu", reason="checks the interpreter's race record")
def test_the_race_record_catches_a_missing_wait():
    """The premise of the race assertions: reading a TMA destination before waiting
    on its barrier is recorded."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def run(wait_first: bool):
        def body(x_ref, o_ref, x_smem, loaded):
            plgpu.copy_gmem_to_smem(x_ref, x_smem, loaded)
            if wait_first:
                plgpu.barrier_wait(loaded)
            x_smem[...] = (_mosaic_io.load_tile(x_smem) * 2).astype(x_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(x_smem, o_ref)
            plgpu.wait_smem_to_gmem(0)
            if not wait_first:
                plgpu.barrier_wait(loaded)

        x = jnp.ones((64, 128), F32)
        out = plgpu.kernel(
            body,
            out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
            scratch_types=[plgpu.SMEM(x.shape, x.dtype), plgpu.Barrier(num_arrivals=1)],
            interpret=_mosaic_io.interpret_params(True),
        )(x)
        jax.block_until_ready(out)
        return _races_recorded()

    assert not run(wait_first=True)
    assert run(wait_first=False)


def test_unsupported_widths_raise_a_typed_error():
    x, f, h_res, h_post, h_pre = _inputs(_rng("unsupported"), 4, 40, F32)
    with pytest.raises(UnsupportedInput, match=r"apply_pre: C=40 .* multiple of 32"):
        pre_mosaic.apply_pre(h_pre, x, STATIC)
    with pytest.raises(UnsupportedInput, match=r"apply_post_res: C=40"):
        post_res_mosaic.apply_post_res(h_res, h_post, x, f, STATIC)


def test_token_counts_past_the_grid_limit_raise_a_typed_error():
    t = _mosaic_io.MAX_TOKENS + 8
    x = jax.ShapeDtypeStruct((t, 2, 64), BF16)
    h = jax.ShapeDtypeStruct((t, 2), F32)
    with pytest.raises(UnsupportedInput, match=rf"T={t} tokens"):
        jax.eval_shape(lambda h, x: pre_mosaic.apply_pre(h, x, STATIC), h, x)


def test_column_blocks_fit_the_shared_memory_budgets():
    assert _mosaic_io.column_block("op", 4096, 5, 2) == 128  # pre at n = 4, bf16: 80 KiB
    assert _mosaic_io.column_block("op", 4096, 9, 2) == 64  # 9 bf16 tiles: 72 KiB
    assert _mosaic_io.column_block("op", 96, 3, 2) == 32
    # fp32 post-res at n = 8: 17 tiles fit only the one-block-per-SM budget
    assert _mosaic_io.column_block("op", 1024, 17, 4) == 32
    with pytest.raises(UnsupportedInput):
        _mosaic_io.column_block("op", 1024, 40, 4)


@pytest.mark.parametrize(
    "tokens, n, c, dtype, candidates",
    [(8, 2, 2048, BF16, ((64, 2, 1),)), (16, 3, 96, F32, post_res_mosaic.CANDIDATES)],
)
def test_post_res_takes_token_group_tiles(monkeypatch, tokens, n, c, dtype, candidates):
    """Forward and VJP with tiles of 8 tokens (8 boxes of 8 x 64 a tile; 4 steps
    through 2 input slots and one output buffer, each reused) and, where C = 96 has
    no whole number of the 16-token tiles' chunks, the 64-token ones; T = 83 ends
    inside a token group."""
    monkeypatch.setattr(post_res_mosaic, "TILE_TOKENS", tokens)
    monkeypatch.setattr(post_res_mosaic, "CANDIDATES", candidates)
    x, f, h_res, h_post, _ = _inputs(_rng("token tiles", n, c), n, c, dtype)
    args = (h_res, h_post, x, f)
    kernel = lambda *a: post_res_mosaic.apply_post_res(*a, STATIC)  # noqa: E731
    cot = _rng("cot", "token tiles", n, c)
    got = _value_and_grads(kernel, args, cot)
    assert not _races_recorded()
    cot = _rng("cot", "token tiles", n, c)
    want = _value_and_grads(reference.apply_post_res, args, cot, device=CPU)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert _rel(g, w) <= TOL[dtype]


def test_post_res_plans_fit_and_pipeline():
    """(chunk, stages, output buffers) at the paper's n and at the widest tiles; spans
    that give 132 SMs a block each and keep >= 4 chunks per block where C has them."""
    coeffs = lambda n: (n * n + n) * 64 * 4  # noqa: E731
    fwd = post_res_mosaic.plan("f", 8192, 4096, 64 * 10, 64 * 8, coeffs(4))
    bwd = post_res_mosaic.plan("b", 8192, 4096, 64 * 18, 64 * 10, coeffs(4))
    assert (fwd.chunk, fwd.stages, fwd.outs, fwd.span) == (64, 3, 2, 2048)
    assert (bwd.chunk, bwd.stages, bwd.outs) == (64, 2, 1)
    fp32_n8 = post_res_mosaic.plan("b", 83, 64, 64 * 68, 64 * 36, coeffs(8))
    assert (fp32_n8.chunk, fp32_n8.stages, fp32_n8.span) == (16, 2, 64)
    assert _mosaic_io.span_columns(32768, 4096, 64) == 4096  # 512 blocks: whole rows
    assert _mosaic_io.span_columns(8192, 1280, 64) == 640
    assert _mosaic_io.span_columns(83, 4096, 64) == 256  # 2 blocks: 16 spans of 4 chunks
    # 8-token tiles of 8 chunks where C has them, else taller ones (C = 1280: 16 tokens)
    wide = post_res_mosaic.plan("f", 8192, 4096, 64 * 10, 64 * 8, coeffs(4), tokens=8)
    assert (wide.tokens, wide.boxes, wide.chunk, wide.span) == (8, 8, 64, 4096)
    assert post_res_mosaic.plan("f", 8192, 1280, 64 * 10, 64 * 8, coeffs(4), 8).tokens == 16
    with pytest.raises(UnsupportedInput, match=r"b: C=48 .* multiple of 32"):
        post_res_mosaic.plan("b", 83, 48, 64 * 18, 64 * 10, coeffs(4))


# (n, dtype) lowered: the smallest and the paper's n in both dtypes; n = 8 takes ~25 s
# of layout inference per kernel on a CPU, so once, outside the smoke set.
LOWER = [
    pytest.param(1, F32, marks=pytest.mark.smoke),
    pytest.param(4, BF16, marks=pytest.mark.smoke),
    pytest.param(4, F32, marks=pytest.mark.smoke),
    (8, BF16),
]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("n, dtype", LOWER)
def test_kernels_lower_for_cuda(op, n, dtype, lowered_text):
    """Each op lowers to one Mosaic GPU custom call forward and one more backward."""
    pick, _, _ = OPS[op]
    args = pick(*_inputs(_rng("lower"), n, 2048, dtype))
    compiled = Static(interpret=False)
    kernel = {
        "pre": lambda *a: pre_mosaic.apply_pre(*a, compiled),
        "post_res": lambda *a: post_res_mosaic.apply_post_res(*a, compiled),
    }[op]

    def loss(*a):
        return jnp.sum(kernel(*a).astype(F32))

    grad = jax.value_and_grad(loss, argnums=tuple(range(len(args))))
    for fn, calls in ((kernel, 1), (grad, 2)):
        text = lowered_text(fn, *args, platform="cuda")
        assert len(re.findall(r"custom_call @mosaic_gpu", text)) == calls
        if op == "pre" and fn is kernel:  # see pre_mosaic.fwd: keeps XLA from cloning it
            assert "optimization_barrier" in text
    # profiles name each kernel (gpu_profile.py counts "mhc_*" as mHC kernels)
    assert f"mhc_{op}_fwd_mgpu" in text and f"mhc_{op}_bwd_mgpu" in text


@pytest.mark.smoke
def test_equal_calls_lower_to_one_kernel(lowered_text):
    """Two sub-layers' post-res of equal shapes share one compiled kernel (an unscanned
    model would otherwise lower and compile it once per sub-layer)."""
    x, f, h_res, h_post, _ = _inputs(_rng("lower", "twice"), 4, 2048, BF16)
    compiled = Static(interpret=False)

    def two_layers(h_res, h_post, x, f):
        once = post_res_mosaic.apply_post_res(h_res, h_post, x, f, compiled)
        return post_res_mosaic.apply_post_res(h_res, h_post, once, f, compiled)

    text = lowered_text(two_layers, h_res, h_post, x, f, platform="cuda")
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 1
    assert len(re.findall(r"call @\S*fwd\S*\(", text)) == 2


def _lower_mapping(lowered_text, n, c, t, *, fwd_calls, grad_calls, variant="paper") -> str:
    """Lowers the tied mapping + pre for CUDA, forward then gradient, asserting each
    one's count of Mosaic GPU custom calls; returns the gradient's text."""
    args = _mapping_inputs(_rng("lower", n), n, c, t=t)
    compiled = Static(interpret=False, variant=variant)

    def fwd(*a):
        return mapping_mosaic.mapping(*a, compiled, True, True)

    def loss(*a):
        return sum(jnp.sum(o.astype(F32)) for o in fwd(*a))

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
    for fn, calls in ((fwd, fwd_calls), (grad, grad_calls)):
        text = lowered_text(fn, *args, platform="cuda")
        assert len(re.findall(r"custom_call @mosaic_gpu", text)) == calls
    return text


@pytest.mark.parametrize("n", [pytest.param(4, marks=pytest.mark.smoke), 8])
def test_mapping_lowers_for_cuda(n, lowered_text):
    """Forward: the projection, the coefficient epilogue and the pre; backward adds the
    epilogue's VJP, the pre's weight gradient and the dx kernel (which also gives dphi)."""
    text = _lower_mapping(lowered_text, n, 2048, T, fwd_calls=3, grad_calls=6)
    names = ("mapping_proj", "mapping_coef_fwd", "pre_fwd", "mapping_coef_bwd", "pre_dh")
    assert all(f"mhc_{name}_mgpu" in text for name in (*names, "mapping_dx"))


def test_deepseek_v4_epilogues_lower_for_cuda(lowered_text):
    """The coefficient kernels with DeepSeek-V4's Sinkhorn and its VJP (variants.py)."""
    text = _lower_mapping(
        lowered_text, 4, 2048, T, fwd_calls=3, grad_calls=6, variant="deepseek_v4"
    )
    assert "mhc_mapping_coef_fwd_mgpu" in text and "mhc_mapping_coef_bwd_mgpu" in text


@pytest.mark.parametrize("n, c", [(4, 4096), (8, 4096), (4, 1280)])
def test_cluster_forward_lowers_for_cuda(monkeypatch, n, c, lowered_text):
    """One kernel forward (clusters of 8, 8 and 5 CTAs; n = 8's kp = 128 partials take
    two peers per load); the backward's three kernels are the split forward's."""
    monkeypatch.setattr(mapping_mosaic, "FORWARD", "cluster")
    text = _lower_mapping(lowered_text, n, c, 1024, fwd_calls=1, grad_calls=4)
    assert "mhc_mapping_cluster_fwd_mgpu" in text and "mhc_mapping_proj_mgpu" not in text
