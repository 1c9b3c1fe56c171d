"""The transition between two mHC layers, Pallas Mosaic GPU backend (Hopper): post-res
of layer l fused with the projection of layer l+1.

``post_res_proj``: one CTA per (token block, column span of C; see
``_mosaic_io.span_columns``) pipelines the span in 64-column chunks. Each step brings
the n stream chunks, f's chunk and phi_{l+1}^T's chunks of every stream (16-bit hi and
lo parts) into shared memory by TMA, builds
``x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] f`` one stream at a time, stores the
tiles by TMA from double-buffered shared memory and, from the same tiles, accumulates
``x_next @ phi_{l+1}`` with wgmma and ``sum(x_next**2)`` in registers. The span's
partials leave as ``mapping_mosaic.proj``'s do, so the mapping's epilogue and pre then
run unchanged on them: the projection's read of x_next (n (T, C) slabs) is gone.

``transition`` is the differentiable op (``_common.transition_op``); its backward is the
mapping's coefficient kernels, then ``transition_bwd_mosaic``'s fused kernel (the
mapping's dx pass inside post-res's backward) where it takes the streams (n <= 4),
else the mapping's x pass and post-res's backward in turn. Where the fused forward's
tiles do not fit in shared memory (n >= 5, whose kp = 64 phi chunks are too wide),
``transition`` runs the two ops unfused, on the same kernels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mhc import _coeffs, mapping_mosaic, post_res_mosaic, transition_bwd_mosaic
from pallas_kernels.mhc import _mosaic_io as io
from pallas_kernels.mhc._common import phi_parts, transition_op

F32 = jnp.float32
CHUNK = mapping_mosaic.CHUNK
STAGES = (3, 2)  # chunks in flight: the most whose tiles fit
SMEM_BYTES = 227 * 1024  # shared memory one Hopper CTA may take


def _smem_bytes(n: int, kp: int, stages: int, itemsize: int, f_itemsize: int) -> int:
    stage = (n * itemsize + f_itemsize) * io.BT * CHUNK + 2 * n * kp * CHUNK * itemsize
    fixed = 2 * n * io.BT * CHUNK * itemsize + io.BT * kp * 4 + (n * n + n) * io.BT * 4
    return fixed + stages * stage + 1024  # barriers and alignment


def stages(n: int, c: int, kp: int, itemsize: int, f_itemsize: int) -> int | None:
    """Chunks in flight in the fused kernel, or None where its tiles do not fit."""
    if c % CHUNK or itemsize != 2:
        return None
    fits = (s for s in STAGES if _smem_bytes(n, kp, s, itemsize, f_itemsize) <= SMEM_BYTES)
    return next(fits, None)


@io.lowered_once("static")
def post_res_proj(h_res, h_post, x, f, phi, static):
    """(x_next (T, n, C) in x.dtype, per-span partials (spans, T, kp) fp32 of
    ``x_next @ phi`` on lanes < K and ``sum(x_next**2)`` on lane K)."""
    t, n, c = x.shape
    k, kp = _coeffs.width(n), _coeffs.packed_width(n, "mosaic_gpu")
    span = io.span_columns(t, c, CHUNK)
    in_flight = stages(n, c, kp, x.dtype.itemsize, f.dtype.itemsize)
    # phi^T's parts as (n, kp, C): one TMA box brings a chunk's columns of every stream
    parts = [p.reshape(kp, n, c).transpose(1, 0, 2) for p in phi_parts(phi, kp, x.dtype)]
    tiles = io.swizzled(CHUNK)
    f_tiles = io.swizzled(CHUNK, f.dtype.itemsize)

    def body(hr_ref, hp_ref, x_ref, f_ref, *refs):
        phi_refs, (xn_ref, part_ref, hr_smem, hp_smem, o_smem, out_smem, loaded) = (
            refs[: len(parts)],
            refs[len(parts) :],
        )
        rows, s = pl.ds(lax.axis_index("t") * io.BT, io.BT), lax.axis_index("s")
        plgpu.copy_gmem_to_smem(hr_ref.at[:, rows], hr_smem, loaded)
        plgpu.copy_gmem_to_smem(hp_ref.at[:, rows], hp_smem, loaded)
        plgpu.barrier_wait(loaded)

        def scope(acc_ref):
            def step(idx, *refs):
                x_smem, f_smem, phi_smem, sumsq = refs[:n], refs[n], refs[n + 1 : -1], refs[-1]
                slot = lax.rem(idx[0], 2)
                # this slot's stores, two steps back, have read it (n groups a step)
                plgpu.wait_smem_to_gmem(n, wait_read_only=True)
                for i in range(n):
                    acc = io.across(io.load_row(hp_smem.at[i]), CHUNK) * io.load_tile(f_smem)
                    for j in range(n):
                        h = io.across(io.load_row(hr_smem.at[i * n + j]), CHUNK)
                        acc += h * io.load_tile(x_smem[j])
                    out = acc.astype(o_smem.dtype)
                    o_smem[slot, i] = out
                    stored = out.astype(F32)  # the projection sees x_next as stored
                    sumsq += jnp.sum(stored * stored, axis=1)
                plgpu.commit_smem()
                cols = pl.ds(s * span + idx[0] * CHUNK, CHUNK)
                for i in range(n):
                    plgpu.copy_smem_to_gmem(o_smem.at[slot, i], xn_ref.at[rows, i, cols])
                for i in range(n):
                    for p in phi_smem:
                        plgpu.wgmma(acc_ref, o_smem.at[slot, i], p.at[i].T)
                plgpu.wgmma_wait(0)  # the pipeline may refill the tiles once this returns
                return sumsq

            span_cols = pl.ds(s * span, span)
            chunk = plgpu.BlockSpec((io.BT, CHUNK), lambda j: (0, j), transforms=tiles)
            f_chunk = plgpu.BlockSpec((io.BT, CHUNK), lambda j: (0, j), transforms=f_tiles)
            phi_chunk = plgpu.BlockSpec((n, kp, CHUNK), lambda j: (0, 0, j), transforms=tiles)
            sumsq = plgpu.emit_pipeline(
                step,
                grid=(span // CHUNK,),
                in_specs=[chunk] * n + [f_chunk] + [phi_chunk] * len(parts),
                max_concurrent_steps=in_flight,
                init_carry=plgpu.layout_cast(jnp.zeros((io.BT,), F32), io.ROW),
            )(
                *(x_ref.at[rows, i, span_cols] for i in range(n)),
                f_ref.at[rows, span_cols],
                *(p.at[:, :, span_cols] for p in phi_refs),
            )
            lane = plgpu.broadcasted_iota(jnp.int32, (io.BT, kp), 1, layout=io.TILE)
            out_smem[...] = jnp.where(lane == k, io.across(sumsq, kp), acc_ref[...])

        pl.run_scoped(scope, plgpu.ACC((io.BT, kp), F32))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, part_ref.at[s, rows])
        plgpu.wait_smem_to_gmem(0)  # also drains the x_next stores

    return plgpu.kernel(
        body,
        kernel_name="mhc_transition_fwd_mgpu",
        out_type=(
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct((c // span, t, kp), F32),
        ),
        scratch_types=[
            plgpu.SMEM((n * n, io.BT), F32),
            plgpu.SMEM((n, io.BT), F32),
            io.tile_smem((2, n, io.BT, CHUNK), x.dtype),
            plgpu.SMEM((io.BT, kp), F32),
            plgpu.Barrier(num_arrivals=2),
        ],
        grid=(pl.cdiv(t, io.BT), c // span),
        grid_names=("t", "s"),
        interpret=io.interpret_params(static.interpret),
    )(io.coeffs_in(h_res.reshape(t, n * n)), io.coeffs_in(h_post), x, f, *parts)


_fused = transition_op(
    mapping_mosaic.RULES, post_res_proj, post_res_mosaic.bwd, transition_bwd_mosaic.fused
)


def fuses(n: int, c: int, dtype, f_dtype) -> bool:
    """Whether ``transition`` runs fused for these streams (else unfused, same kernels)."""
    kp = _coeffs.packed_width(n, "mosaic_gpu")
    return stages(n, c, kp, jnp.dtype(dtype).itemsize, jnp.dtype(f_dtype).itemsize) is not None


def transition(h_res, h_post, x, f, phi, bias, alpha, static):
    """Post-res of one layer, then mapping + pre of the next: (layer_input (T, C),
    h_pre, h_post', h_res', x_next (T, n, C)), differentiable (see the module doc).

    T is padded to a multiple of 8 where it is not one (``_mosaic_io.aligned``)."""
    t, n, c = x.shape
    if not fuses(n, c, x.dtype, f.dtype):
        x_next = post_res_mosaic.apply_post_res(h_res, h_post, x, f, static)
        return mapping_mosaic.mapping(x_next, phi, bias, alpha, static, True, True)
    mapping_mosaic.check_streams(x.reshape(t, n * c), c)

    def op(h_res, h_post, x, f, static):
        return _fused(h_res, h_post, x, f, phi, bias, alpha, static)

    return io.aligned(op)(h_res, h_post, x, f, static)
