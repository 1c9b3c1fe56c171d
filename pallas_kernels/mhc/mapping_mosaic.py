"""mHC mapping kernels (SPEC §7.1), Pallas Mosaic GPU backend (Hopper), version 0.

Forward: a projection kernel, gridded over (64-token block, column span), pipelines
its span in 64-column chunks (``emit_pipeline``, STAGES chunks in flight): TMA brings
the x chunk and the phi^T chunks (16-bit hi and lo parts) into swizzled shared
memory, wgmma accumulates ``x @ phi`` in fp32 and the same x tile gives
``sum(x**2)``; each block leaves its span's partials (lane K holds the sum of
squares). XLA sums the spans' partials (fixed order) into (K + 1, T) rows, and
``epilogue_mosaic``'s kernel turns them into the coefficients (RMS, sigmoids, exact
Sinkhorn; one token per thread); with the pre, ``pre_mosaic`` then reads x again
for ``layer_input``.

Backward: the epilogue's VJP kernel gives ``dy = d(x @ phi)`` and the RMS
coefficient c_x; a dx kernel, gridded over (token block, column block), computes
``dx = dy @ phi^T + c_x x (+ h_pre dli) (+ dx_in)`` with wgmma (dy's hi and lo parts
times phi's hi part), and one XLA matmul gives ``dphi^T = dy^T x``.

16-bit streams only: fp32 streams would take wgmma's tf32 products, 10 mantissa bits
where the reference keeps fp32 (``UnsupportedInput``; the Triton kernels take them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mhc import _coeffs, epilogue_mosaic, pre_mosaic
from pallas_kernels.mhc import _mosaic_io as io
from pallas_kernels.mhc._common import dot_tn, mapping_op, split
from pallas_kernels.mhc.backends import UnsupportedInput

F32 = jnp.float32
CHUNK = 64  # columns per wgmma step: one 128-byte swizzle row of 16-bit values
SPANS = (2048, 1024, 512, 256, 128, 64)  # columns per projection block, widest dividing n*C
STAGES = 3  # chunks in flight in the projection's pipeline
DX_MIN_LANES = 64


def _swizzled(cols: int, itemsize: int = 2) -> tuple:
    """Tiling and swizzle transforms for a wgmma operand whose rows are ``cols`` wide."""
    swizzle = min(128, cols * itemsize)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _check(x2, c: int) -> None:
    if x2.dtype.itemsize != 2:
        raise UnsupportedInput(
            f"mhc mapping: {x2.dtype} streams: the Mosaic GPU mapping kernels take 16-bit "
            "streams (wgmma would round fp32 to tf32); use impl='xla' or the Triton kernels"
        )
    if c % CHUNK:
        raise UnsupportedInput(
            f"mhc mapping: C={c}: the Mosaic GPU mapping kernels need C a multiple of "
            f"{CHUNK}; use impl='xla' or the Triton kernels"
        )


@io.lowered_once("n", "static")
def proj(x2, parts, *, n, static):
    """Per-span partials (spans, T, kp) fp32 of ``x @ phi`` (lanes < K), ``sum(x^2)`` (lane K)."""
    t, nc = x2.shape
    kp, k = parts[0].shape[0], _coeffs.width(n)
    span = next(s for s in SPANS if nc % s == 0)
    spans = nc // span

    tiles = _swizzled(CHUNK)

    def body(x_ref, *refs):
        phi_refs, out_ref, out_smem = refs[: len(parts)], refs[len(parts)], refs[len(parts) + 1]
        rows, s = pl.ds(lax.axis_index("t") * io.BT, io.BT), lax.axis_index("s")
        cols = pl.ds(s * span, span)

        def scope(acc_ref):
            def step(_, x_smem, *rest):
                *phi_smem, sumsq = rest
                for p in phi_smem:
                    plgpu.wgmma(acc_ref, x_smem, p.T)
                xf = io.load_tile(x_smem)
                plgpu.wgmma_wait(0)  # the pipeline may refill the tiles once this returns
                return sumsq + jnp.sum(xf * xf, axis=1)

            sumsq = plgpu.emit_pipeline(
                step,
                grid=(span // CHUNK,),
                in_specs=[plgpu.BlockSpec((io.BT, CHUNK), lambda j: (0, j), transforms=tiles)]
                + [plgpu.BlockSpec((kp, CHUNK), lambda j: (0, j), transforms=tiles)] * len(parts),
                max_concurrent_steps=STAGES,
                init_carry=plgpu.layout_cast(jnp.zeros((io.BT,), F32), io.ROW),
            )(x_ref.at[rows, cols], *(ref.at[:, cols] for ref in phi_refs))
            lane = plgpu.broadcasted_iota(jnp.int32, (io.BT, kp), 1, layout=io.TILE)
            out_smem[...] = jnp.where(lane == k, io.across(sumsq, kp), acc_ref[...])

        pl.run_scoped(scope, plgpu.ACC((io.BT, kp), F32))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_ref.at[s, rows])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        kernel_name="mhc_mapping_proj_mgpu",
        out_type=jax.ShapeDtypeStruct((spans, t, kp), F32),
        scratch_types=[plgpu.SMEM((io.BT, kp), F32)],
        grid=(pl.cdiv(t, io.BT), spans),
        grid_names=("t", "s"),
        interpret=io.interpret_params(static.interpret),
    )(x2, *parts)


def _packed(rows_t, kp):
    """(r, T) coefficient rows -> (T, kp), zero lanes from r on."""
    return jnp.pad(rows_t.T, ((0, 0), (0, kp - rows_t.shape[0])))


def fwd(x2, parts, info, *, n, c, static, with_pre):
    """(coef, saved) (T, kp) fp32 and, when with_pre, layer_input (T, C) in x2.dtype.

    saved holds raw = (x @ phi) / r on lanes < K and r on lane K."""
    _check(x2, c)
    partials = jnp.sum(proj(x2, parts, n=n, static=static), axis=0)  # a fixed order
    k, kp = _coeffs.width(n), partials.shape[1]
    coef_t, saved_t = epilogue_mosaic.forward(
        partials[:, : k + 1].T, epilogue_mosaic.constants(info, n), n=n, nc=n * c, static=static
    )
    coef, saved = _packed(coef_t, kp), _packed(saved_t, kp)
    li = None
    if with_pre:
        li = pre_mosaic.fwd(coef[:, :n], x2.reshape(x2.shape[0], n, c), static)
    return coef, saved, li


def coef_bwd(saved, dcoef, info, *, n, c, static):
    """(dy (T, kp) with c_x on lane K, and the token sums of dt and dt*raw (1, kp)), fp32."""
    k, kp = _coeffs.width(n), saved.shape[1]
    dy_t, dt_t, dtraw_t = epilogue_mosaic.backward(
        saved[:, : k + 1].T,
        dcoef[:, :k].T,
        epilogue_mosaic.constants(info, n),
        n=n,
        nc=n * c,
        static=static,
    )
    sums = (jnp.pad(jnp.sum(a, 1), (0, kp - k))[None] for a in (dt_t, dtraw_t))
    return (_packed(dy_t, kp), *sums)


def _dx_call(t, n, c, kp, dtype, bc, with_pre, with_dx_in, interpret):
    def body(*refs):
        x_ref, dy_refs, phi_ref, cx_ref = refs[0], refs[1:3], refs[3], refs[4]
        rest = list(refs[5:])
        h_ref, dli_ref = (rest.pop(0), rest.pop(0)) if with_pre else (None, None)
        dxin_ref = rest.pop(0) if with_dx_in else None
        dx_ref, x_smem, dy_smem, phi_smem, cx_smem, h_smem, e_smem, o_smem, loaded = rest
        g = lax.axis_index("c")
        rows, cols = pl.ds(lax.axis_index("t") * io.BT, io.BT), pl.ds(g * bc, bc)
        stream = g * bc // c
        plgpu.copy_gmem_to_smem(x_ref.at[rows, cols], x_smem, loaded)
        for p in range(2):
            plgpu.copy_gmem_to_smem(dy_refs[p].at[rows], dy_smem.at[p], loaded)
        plgpu.copy_gmem_to_smem(phi_ref.at[:, cols], phi_smem, loaded)
        plgpu.copy_gmem_to_smem(cx_ref.at[:, rows], cx_smem, loaded)
        if with_pre:
            plgpu.copy_gmem_to_smem(h_ref.at[:, rows], h_smem, loaded)
            plgpu.copy_gmem_to_smem(
                dli_ref.at[rows, pl.ds(g * bc - stream * c, bc)], e_smem.at[0], loaded
            )
        if with_dx_in:
            plgpu.copy_gmem_to_smem(dxin_ref.at[rows, cols], e_smem.at[1], loaded)
        plgpu.barrier_wait(loaded)

        def scope(acc_ref):
            for p in range(2):
                plgpu.wgmma(acc_ref, dy_smem.at[p], phi_smem)
            plgpu.wgmma_wait(0)
            dx = acc_ref[...] + io.across(io.load_row(cx_smem.at[0]), bc) * io.load_tile(x_smem)
            if with_pre:
                h = io.across(io.load_row(h_smem.at[stream]), bc)
                dx += h * io.load_tile(e_smem.at[0])
            if with_dx_in:
                dx += io.load_tile(e_smem.at[1])
            o_smem[...] = dx.astype(o_smem.dtype)

        pl.run_scoped(scope, plgpu.ACC((io.BT, bc), F32))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, dx_ref.at[rows, cols])
        plgpu.wait_smem_to_gmem(0)

    arrivals = 5 + (2 if with_pre else 0) + (1 if with_dx_in else 0)
    return plgpu.kernel(
        body,
        kernel_name="mhc_mapping_dx_mgpu",
        out_type=jax.ShapeDtypeStruct((t, n * c), dtype),
        scratch_types=[
            plgpu.SMEM((io.BT, bc), dtype),
            plgpu.SMEM((2, io.BT, kp), dtype, transforms=_swizzled(kp)),
            plgpu.SMEM((kp, bc), dtype, transforms=_swizzled(bc)),
            plgpu.SMEM((1, io.BT), F32),
            plgpu.SMEM((n, io.BT), F32),
            plgpu.SMEM((2, io.BT, bc), dtype),
            plgpu.SMEM((io.BT, bc), dtype),
            plgpu.Barrier(num_arrivals=arrivals),
        ],
        grid=(pl.cdiv(t, io.BT), n * c // bc),
        grid_names=("t", "c"),
        interpret=io.interpret_params(interpret),
    )


@io.lowered_once("n", "c", "static")
def x_bwd(x2, dy, parts, h_pre, dli, dx_in, *, n, c, static):
    """(dx2 (T, n*C) in x2.dtype, dphi^T (1, kp, n*C) fp32)."""
    t, kp = dy.shape
    k = _coeffs.width(n)
    # lane K holds c_x, passed on its own: zeroed here, it cannot overflow an fp16 split
    dys = split(jnp.where(jnp.arange(kp) == k, 0.0, dy), x2.dtype)
    # wgmma's A operand (dy) needs rows of at least 64 lanes to lay out (narrower ones
    # fail layout inference): pad dy and phi^T's hi part with zero lanes / rows.
    kd = max(kp, DX_MIN_LANES)
    # shared memory in (64, bc) tiles: x, dli, dx_in, dx, then dy (2 x 64 x kd) and
    # phi^T (kd x bc), at most 3 kd / 64 more for bc >= 64
    bc = io.column_block("mhc mapping backward", c, 4 + 3 * kd // 64, x2.dtype.itemsize)
    dys_dx = [jnp.pad(d, ((0, 0), (0, kd - kp))) for d in dys]
    phi_dx = jnp.pad(parts[0], ((0, kd - kp), (0, 0)))
    call = _dx_call(
        t, n, c, kd, x2.dtype, bc, h_pre is not None, dx_in is not None, static.interpret
    )
    extra = ((io.coeffs_in(h_pre), dli) if h_pre is not None else ()) + (
        (dx_in,) if dx_in is not None else ()
    )
    dx2 = call(x2, *dys_dx, phi_dx, io.coeffs_in(dy[:, k : k + 1]), *extra)
    dphi_t = dot_tn(jnp.concatenate(dys, axis=1), x2)  # (2 kp, n*C)
    return dx2, (dphi_t[:kp] + dphi_t[kp:])[None]


def _pre_grad(x2, dli, *, n, c, static):
    return pre_mosaic.weight_grad(x2.reshape(x2.shape[0], n, c), dli, static)


_mapping = mapping_op("mosaic_gpu", fwd, coef_bwd, x_bwd, _pre_grad)


def mapping(x, phi, bias, alpha, static, with_pre, tied=False):
    """``mapping(x (T, n, C), phi, bias, alpha, static, with_pre)``: see ``_common.mapping_op``.

    T is padded to a multiple of 8 where it is not one (``_mosaic_io.aligned``)."""
    run = functools.partial(_mapping, static=static, with_pre=with_pre, tied=tied)
    return io.aligned(lambda x, static: run(x, phi, bias, alpha))(x, static)
