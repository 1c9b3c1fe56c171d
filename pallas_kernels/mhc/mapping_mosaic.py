"""mHC mapping kernels (SPEC §7.1), Pallas Mosaic GPU backend (Hopper).

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
coefficient c_x; one dx kernel, gridded over (token group, column block), pipelines
its group's token blocks and computes ``dx = dy @ phi^T + c_x x (+ h_pre dli)
(+ dx_in)`` with wgmma (dy's hi and lo parts times phi's hi part) and, from the same
x tiles, ``dphi^T = dy^T x`` (dy's parts transposed as wgmma's A operand),
accumulated over the group in registers; XLA sums the groups' partials (a fixed
order).

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

from pallas_kernels.mhc import _coeffs, epilogue_mosaic, mapping_cluster_mosaic, pre_mosaic
from pallas_kernels.mhc import _mosaic_io as io
from pallas_kernels.mhc._common import mapping_op, mapping_rules, split
from pallas_kernels.mhc.backends import UnsupportedInput

F32 = jnp.float32
CHUNK = 64  # columns per wgmma step: one 128-byte swizzle row of 16-bit values
SPANS = (2048, 1024, 512, 256, 128, 64)  # columns per projection block, widest dividing n*C
STAGES = 3  # chunks in flight in the projection's pipeline
DX_MIN_LANES = 64
DX_STAGES = 2  # token blocks in flight in the dx kernel's pipeline
# The forward's kernels: "split" (projection, XLA's sum of the spans, the epilogue
# kernel, the pre) or "cluster" (``mapping_cluster_mosaic``: one kernel, x read once)
FORWARDS = ("split", "cluster")
FORWARD = "split"


def check_streams(x2, c: int) -> None:
    """UnsupportedInput unless x2 (T, n*C) holds 16-bit streams and C is whole chunks."""
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

    tiles = io.swizzled(CHUNK)

    def body(x_ref, *refs):
        phi_refs, out_ref, out_smem = refs[: len(parts)], refs[len(parts)], refs[len(parts) + 1]
        rows, s = pl.ds(lax.axis_index("t") * io.BT, io.BT), lax.axis_index("s")
        cols = pl.ds(s * span, span)

        def scope(acc_ref):
            def step(_, x_smem, *rest):
                *phi_smem, sumsq = rest
                xf = io.load_tile(x_smem)
                for p in phi_smem:
                    plgpu.wgmma(acc_ref, x_smem, p.T)
                plgpu.wgmma_wait(0)
                # the pipeline refills the tiles by TMA (one thread) once this returns:
                # every warp's loads of them must be done first
                plgpu.commit_smem()
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


def fwd(x2, parts, info, *, n, c, static, with_pre, partials=None):
    """(coef, saved) (T, kp) fp32 and, when with_pre, layer_input (T, C) in x2.dtype.

    saved holds raw = (x @ phi) / r on lanes < K and r on lane K. ``partials``: the
    projection's per-span partials (spans, T, kp) where another kernel computed them
    (``transition_mosaic``), else the kernels FORWARD names run here."""
    check_streams(x2, c)
    if FORWARD not in FORWARDS:
        raise ValueError(f"mapping_mosaic.FORWARD={FORWARD!r}: expected one of {FORWARDS}")
    if partials is None and FORWARD == "cluster":
        consts = mapping_cluster_mosaic.constants(info, n)
        outs = mapping_cluster_mosaic.fwd(
            x2, parts, consts, n=n, c=c, with_pre=with_pre, static=static
        )
        return lax.optimization_barrier(outs)  # see pre_mosaic.fwd: one kernel call per layer
    if partials is None:
        partials = proj(x2, parts, n=n, static=static)
    partials = jnp.sum(partials, axis=0)  # a fixed order
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


def _dx_block(c: int, kd: int) -> int:
    """Columns per dx block: 128 where the two fp32 accumulators (dx and dphi^T, 64
    registers each at kd = 64) leave room for the epilogue, else 64. Shared memory at
    DX_STAGES = 2 stays under 182 KiB for every n <= 8 with the pre and dx_in tiles:
    one CTA per SM."""
    return 128 if kd == DX_MIN_LANES and c % 128 == 0 else 64


def _dx_groups(t: int, blocks: int) -> int:
    """Token groups of the dx kernel: at most one CTA per SM (its shared memory admits
    one per SM), and no group wholly past T."""
    blocks_t = pl.cdiv(t, io.BT)
    groups = max(1, min(blocks_t, io.SMS // blocks))
    return pl.cdiv(blocks_t, pl.cdiv(blocks_t, groups))


def _dx_call(t, n, c, kd, dtype, bc, groups, with_pre, with_dx_in, interpret):
    """dx (T, n*C) and dphi^T partials (groups, kd, n*C) fp32: one CTA per (token group,
    column block) pipelines its group's token blocks; phi^T's (kd, bc) tile stays in
    shared memory and dphi^T's tile accumulates in registers across the group."""
    per = pl.cdiv(pl.cdiv(t, io.BT), groups) * io.BT  # tokens per group (the last may run past T)
    io_tiles = io.swizzled(bc)

    def body(*refs):
        x_ref, dy_refs, phi_ref, cx_ref = refs[0], refs[1:3], refs[3], refs[4]
        rest = list(refs[5:])
        h_ref, dli_ref = (rest.pop(0), rest.pop(0)) if with_pre else (None, None)
        dxin_ref = rest.pop(0) if with_dx_in else None
        dx_ref, dphi_ref, phi_smem, o_smem, loaded = rest
        g, b = lax.axis_index("g"), lax.axis_index("c")
        tokens, cols = pl.ds(g * per, per), pl.ds(b * bc, bc)
        stream = b * bc // c
        plgpu.copy_gmem_to_smem(phi_ref.at[:, cols], phi_smem, loaded)
        plgpu.barrier_wait(loaded)

        def scope(dphi_acc):
            def step(idx, x_smem, dy0, dy1, cx_smem, *extra):
                def dx_scope(acc_ref):
                    for d in (dy0, dy1):
                        plgpu.wgmma(acc_ref, d, phi_smem)
                    for d in (dy0, dy1):  # dphi^T += dy^T x over this block's tokens
                        plgpu.wgmma(dphi_acc, d.T, x_smem)
                    plgpu.wgmma_wait(0)  # the pipeline refills these tiles on return
                    return acc_ref[...]

                dx = pl.run_scoped(dx_scope, plgpu.ACC((io.BT, bc), F32))
                dx += io.across(io.load_row(cx_smem.at[0]), bc) * io.load_tile(x_smem)
                if with_pre:
                    h = io.across(io.load_row(extra[0].at[stream]), bc)
                    dx += h * io.load_tile(extra[1])
                if with_dx_in:
                    dx += io.load_tile(extra[-1])
                slot = lax.rem(idx[0], 2)
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # slot's last store read it
                o_smem[slot] = dx.astype(o_smem.dtype)
                plgpu.commit_smem()
                rows = pl.ds(g * per + idx[0] * io.BT, io.BT)
                plgpu.copy_smem_to_gmem(o_smem.at[slot], dx_ref.at[rows, cols])

            # TMA zero-fills rows past T (the default fill): they add nothing to dphi
            tile = plgpu.BlockSpec((io.BT, bc), lambda j: (j, 0), transforms=io_tiles)
            in_specs = [tile]
            in_specs += [
                plgpu.BlockSpec((io.BT, kd), lambda j: (j, 0), transforms=io.swizzled(kd))
            ] * 2
            in_specs += [plgpu.BlockSpec((1, io.BT), lambda j: (0, j))]
            gmem = [x_ref.at[tokens, cols], *(d.at[tokens] for d in dy_refs), cx_ref.at[:, tokens]]
            if with_pre:
                in_specs += [plgpu.BlockSpec((n, io.BT), lambda j: (0, j)), tile]
                dli_cols = pl.ds(b * bc - stream * c, bc)
                gmem += [h_ref.at[:, tokens], dli_ref.at[tokens, dli_cols]]
            if with_dx_in:
                in_specs.append(tile)
                gmem.append(dxin_ref.at[tokens, cols])
            plgpu.emit_pipeline(
                step, grid=(per // io.BT,), in_specs=in_specs, max_concurrent_steps=DX_STAGES
            )(*gmem)

            # last, so that its full wait also drains the dx stores before the kernel ends
            def store(out_smem):
                out_smem[...] = dphi_acc[...]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, dphi_ref.at[g, :, cols])
                plgpu.wait_smem_to_gmem(0)

            pl.run_scoped(store, plgpu.SMEM((kd, bc), F32))

        pl.run_scoped(scope, plgpu.ACC((kd, bc), F32))

    return plgpu.kernel(
        body,
        kernel_name="mhc_mapping_dx_mgpu",
        out_type=(
            jax.ShapeDtypeStruct((t, n * c), dtype),
            jax.ShapeDtypeStruct((groups, kd, n * c), F32),
        ),
        scratch_types=[
            plgpu.SMEM((kd, bc), dtype, transforms=io.swizzled(bc)),
            plgpu.SMEM((2, io.BT, bc), dtype, transforms=io_tiles),
            plgpu.Barrier(num_arrivals=1),
        ],
        grid=(groups, n * c // bc),
        grid_names=("g", "c"),
        interpret=io.interpret_params(interpret),
    )


@io.lowered_once("n", "c", "static")
def x_bwd(x2, dy, parts, h_pre, dli, dx_in, *, n, c, static):
    """(dx2 (T, n*C) in x2.dtype, dphi^T partials (groups, kd, n*C) fp32, kd >= kp)."""
    t, kp = dy.shape
    k = _coeffs.width(n)
    # lane K holds c_x, passed on its own: zeroed here, it cannot overflow an fp16 split
    dys = split(jnp.where(jnp.arange(kp) == k, 0.0, dy), x2.dtype)
    # wgmma's dy operand needs rows of at least 64 lanes to lay out (narrower ones fail
    # layout inference), and dphi^T's accumulator (dy^T as wgmma's A) needs M = 64: pad
    # dy and phi^T's hi part with zero lanes / rows.
    kd = max(kp, DX_MIN_LANES)
    with_pre, with_dx_in = h_pre is not None, dx_in is not None
    bc = _dx_block(c, kd)
    groups = _dx_groups(t, n * c // bc)
    dys_dx = [jnp.pad(d, ((0, 0), (0, kd - kp))) for d in dys]
    phi_dx = jnp.pad(parts[0], ((0, kd - kp), (0, 0)))
    call = _dx_call(t, n, c, kd, x2.dtype, bc, groups, with_pre, with_dx_in, static.interpret)
    extra = ((io.coeffs_in(h_pre), dli) if with_pre else ()) + ((dx_in,) if with_dx_in else ())
    return call(x2, *dys_dx, phi_dx, io.coeffs_in(dy[:, k : k + 1]), *extra)


def _pre_grad(x2, dli, *, n, c, static):
    return pre_mosaic.weight_grad(x2.reshape(x2.shape[0], n, c), dli, static)


RULES = mapping_rules("mosaic_gpu", fwd, coef_bwd, x_bwd, _pre_grad)
_mapping = mapping_op(RULES)


def mapping(x, phi, bias, alpha, static, with_pre, tied=False):
    """``mapping(x (T, n, C), phi, bias, alpha, static, with_pre)``: see ``_common.mapping_op``.

    T is padded to a multiple of 8 where it is not one (``_mosaic_io.aligned``)."""
    run = functools.partial(_mapping, static=static, with_pre=with_pre, tied=tied)
    return io.aligned(lambda x, static: run(x, phi, bias, alpha))(x, static)
