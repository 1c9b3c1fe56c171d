"""The Mosaic GPU kernels' shared pieces (``_mosaic_io.py``, ``_token_epilogue.py``,
``epilogue_mosaic.py``) and the premise of the race assertions; the ops' kernels are
tested with the other backends' (``test_mapping_kernels.py``, ``test_pre_kernels.py``,
``test_post_res_kernels.py``, ``test_transition.py``).

On a CPU host every kernel runs in the Mosaic GPU interpreter with race detection.
JAX 0.11.2's interpreter records a race without raising, so each run asserts the record
is clean (``kernel_test_base.races_recorded``), and one test checks that a kernel with a
missing barrier wait is recorded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from kernel_test_base import (
    F32,
    MOSAIC_GPU_HOSTS,
    PLATFORM,
    MosaicGpu,
    races_recorded,
    rel_error,
    rng_for,
)

from pallas_kernels.mhc import _coeffs, _mosaic_io, _token_epilogue, epilogue_mosaic
from pallas_kernels.mhc.backends import UnsupportedInput

pytestmark = MOSAIC_GPU_HOSTS
STATIC = MosaicGpu().static


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
    partials, info, dcoef = _epilogue_inputs(rng_for("token", n), n, t)
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
    assert rel_error(jnp.stack(got, 1), coef[:, :k]) <= 1e-6
    assert rel_error(jnp.stack([*got_dy, c_x], 1), dy[:, : k + 1]) <= 2e-6
    assert rel_error(jnp.stack(got_dt, 1), dt[:, :k]) <= 1e-6


def _xla_epilogue(partials, info, dcoef, n, nc):
    """``epilogue_mosaic``'s forward and backward outputs from ``_token_epilogue`` in XLA
    (bias and alpha per coefficient from ``info``, not from the kernels' constants)."""
    k, rows = _coeffs.width(n), list
    bias, alpha = rows(info[0, :k]), rows(info[1, :k])
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
    partials, info, dcoef = _epilogue_inputs(rng_for("epilogue", n), n, 264)
    consts, kw = epilogue_mosaic.constants(info, n), dict(n=n, nc=n * 64)
    coef, saved = jax.jit(lambda p, c: epilogue_mosaic.forward(p, c, static=STATIC, **kw))(
        partials, consts
    )
    assert not races_recorded()
    grads = jax.jit(lambda s, d, c: epilogue_mosaic.backward(s, d, c, static=STATIC, **kw))(
        saved, dcoef, consts
    )
    assert not races_recorded()
    want = _xla_epilogue(partials, info, dcoef, n, n * 64)
    for g, w in zip((coef, saved, *grads), want, strict=True):
        assert g.shape == w.shape
        assert rel_error(g, w) <= 1e-6


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
        return races_recorded()

    assert not run(wait_first=True)
    assert run(wait_first=False)


def test_column_blocks_fit_the_shared_memory_budgets():
    assert _mosaic_io.column_block("op", 4096, 5, 2) == 128  # pre at n = 4, bf16: 80 KiB
    assert _mosaic_io.column_block("op", 4096, 9, 2) == 64  # 9 bf16 tiles: 72 KiB
    assert _mosaic_io.column_block("op", 96, 3, 2) == 32
    # fp32 post-res at n = 8: 17 tiles fit only the one-block-per-SM budget
    assert _mosaic_io.column_block("op", 1024, 17, 4) == 32
    with pytest.raises(UnsupportedInput):
        _mosaic_io.column_block("op", 1024, 40, 4)
