"""The mHC mapping (+ pre) forward as one Pallas Mosaic GPU kernel (Hopper): a cluster of
CTAs per token block splits C (SPEC §7.1, §7.2; "tiling A" in
experiments/results/mosaic_gpu/NOTES.md).

A cluster of S CTAs (S <= 8, ``cluster_size``) takes a block of 64 tokens; CTA s owns
columns [s*cs, (s+1)*cs) of every stream (cs = C / S). In turn, each CTA:

1. projects its columns: a ring of ``STAGES`` 64-column chunks (TMA) feeds wgmma
   ``x @ phi`` (phi^T's 16-bit hi and lo parts, as ``mapping_mosaic.proj``) and
   ``sum(x**2)``, both fp32;
2. stores its (64, kp) partials into an exchange buffer in global memory, waits for
   the store to complete and arrives at a cluster barrier; past the barrier it loads
   the cluster's S partials and sums them in the order s = 0 .. S-1, so every CTA
   holds the same sums, bitwise;
3. runs the coefficient epilogue (RMS, sigmoids, exact Sinkhorn: ``_token_epilogue``)
   on (64,) per-token row vectors in registers; CTA 0 stores the coefficients and the
   saved (raw, r) rows;
4. with the pre, streams its columns of x again (read moments before, mostly from L2)
   and writes its columns of layer_input = sum_i h_pre[i] x[i].

DRAM traffic is x once and layer_input once, where the split forward
(``mapping_mosaic.fwd``: projection, XLA's sum of the span partials, the epilogue
kernel, then ``pre_mosaic``) reads x twice. The exchange goes through global memory
(a few KiB per block, L2-resident) rather than distributed shared memory, which the
interpreter cannot run. The TMA store is complete before the arrive and the peers'
TMA loads come after their wait; no async-proxy fence stands between the barrier and
those copies, which the PTX memory model leaves borderline (the native tests pass:
experiments/results/mosaic_gpu/NOTES.md).

Not the default (``mapping_mosaic.FORWARD``): each CTA's exchange and epilogue stall
its streaming, which costs more than the second read of x saves (the measurements:
experiments/results/mosaic_gpu/NOTES.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mhc import _coeffs, _token_epilogue, epilogue_mosaic
from pallas_kernels.mhc import _mosaic_io as io
from pallas_kernels.mhc.backends import UnsupportedInput

F32 = jnp.float32
CHUNK = 64  # columns per step: one 128-byte swizzle row of 16-bit values
MAX_CLUSTER = 8  # CTAs per cluster a Hopper GPU launches without opting in
STAGES = 3  # projection chunks in flight
PRE_STAGES = 2  # pre chunks (n tiles each) in flight
OUTS = 2  # layer_input tiles being stored while the next is built
EXCHANGE_BYTES = 64 * 1024  # shared memory for the peers' partials loaded at once


def cluster_size(c: int) -> int:
    """CTAs per token block: the largest S <= MAX_CLUSTER dividing C's 64-column chunks."""
    if c % CHUNK:
        raise UnsupportedInput(
            f"mhc mapping (cluster forward): C={c}: needs C a multiple of {CHUNK}; use the "
            "split forward, impl='xla' or the Triton kernels"
        )
    chunks = c // CHUNK
    return max(d for d in range(1, MAX_CLUSTER + 1) if chunks % d == 0)


def _lanes(kp: int) -> jax.Array:
    return plgpu.broadcasted_iota(jnp.int32, (io.BT, kp), 1, layout=io.TILE)


def _column(tile: jax.Array, lane: jax.Array, k: int) -> jax.Array:
    """Lane k of a (64, kp) tile as a (64,) row vector."""
    return jnp.sum(jnp.where(lane == k, tile, 0.0), axis=1)


def _packed(rows, lane: jax.Array, kp: int) -> jax.Array:
    """(64,) row vectors -> (64, kp) tile, lane k holding rows[k], zero past them."""
    tile = jnp.zeros((io.BT, kp), F32)
    for k, row in enumerate(rows):
        tile = jnp.where(lane == k, io.across(row, kp), tile)
    return tile


@io.lowered_once("n", "c", "with_pre", "static")
def fwd(x2, parts, consts, *, n, c, with_pre, static):
    """(coef, saved, li): coef (T, kp) [h_pre | h_post | h_res], saved (T, kp) [raw | r]
    fp32, and layer_input (T, C) in x2.dtype when ``with_pre`` (else None).

    Args:
      x2: (T, n*C) 16-bit streams, T a multiple of 8.
      parts: phi^T's parts, each (kp, n*C) in x2.dtype (``_common.phi_parts``).
      consts: (K + 3, 64) fp32, ``constants``.
    """
    t, nc = x2.shape
    kp, k = parts[0].shape[0], _coeffs.width(n)
    size = cluster_size(c)
    cs = c // size
    steps = cs // CHUNK  # chunks per stream
    blocks = pl.cdiv(t, io.BT)
    per_load = max(1, min(size, EXCHANGE_BYTES // (io.BT * kp * 4)))
    while size % per_load:
        per_load -= 1

    def body(x_ref, *refs):
        phi_refs, consts_ref = refs[: len(parts)], refs[len(parts)]
        coef_ref, saved_ref, xch_ref, *rest = refs[len(parts) + 1 :]
        li_ref = rest.pop(0) if with_pre else None
        (sync,) = rest
        b, s = lax.axis_index("t"), lax.axis_index("s")
        rows = pl.ds(b * io.BT, io.BT)
        lane = _lanes(kp)

        def chunk_cols(stream, step):  # chunk `step` of this CTA's columns of a stream
            return pl.ds(stream * c + s * cs + step * CHUNK, CHUNK)

        # 1. projection of this CTA's columns, stream by stream
        def project(x_smem, phi_smem, loaded, part_smem):
            def fetch(step, slot):
                cols = chunk_cols(step // steps, step % steps)
                plgpu.copy_gmem_to_smem(x_ref.at[rows, cols], x_smem.at[slot], loaded.at[slot])
                for p_ref, p_smem in zip(phi_refs, phi_smem):
                    plgpu.copy_gmem_to_smem(p_ref.at[:, cols], p_smem.at[slot], loaded.at[slot])

            def accumulate(acc_ref):
                def compute(step, slot, sumsq):
                    xf = io.load_tile(x_smem.at[slot])
                    for p_smem in phi_smem:
                        plgpu.wgmma(acc_ref, x_smem.at[slot], p_smem.at[slot].T)
                    plgpu.wgmma_wait(0)
                    plgpu.commit_smem()
                    return sumsq + jnp.sum(xf * xf, axis=1)

                zero = plgpu.layout_cast(jnp.zeros((io.BT,), F32), io.ROW)
                sumsq = io.ring(n * steps, STAGES, fetch, loaded, compute, zero)
                part_smem[...] = jnp.where(lane == k, io.across(sumsq, kp), acc_ref[...])

            pl.run_scoped(accumulate, plgpu.ACC((io.BT, kp), F32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(part_smem, xch_ref.at[b, s])
            plgpu.wait_smem_to_gmem(0)  # complete in global memory, not only read out

        pl.run_scoped(
            project,
            io.tile_smem((STAGES, io.BT, CHUNK), x2.dtype),
            [io.tile_smem((STAGES, kp, CHUNK), x2.dtype) for _ in parts],
            plgpu.Barrier(num_arrivals=1 + len(parts), num_barriers=STAGES),
            io.tile_smem((io.BT, kp), F32),
        )
        plgpu.barrier_arrive(sync)
        plgpu.barrier_wait(sync)

        # 2-3. the cluster's partials summed in a fixed order, then the epilogue
        def epilogue(peer_smem, consts_smem, consts_loaded, loaded):
            plgpu.copy_gmem_to_smem(consts_ref, consts_smem, consts_loaded)
            plgpu.barrier_wait(consts_loaded)
            total = None
            for first in range(0, size, per_load):
                for j in range(per_load):  # one (64, kp) box each: TMA takes <= 5 dimensions
                    plgpu.copy_gmem_to_smem(xch_ref.at[b, first + j], peer_smem.at[j], loaded)
                plgpu.barrier_wait(loaded)
                for j in range(per_load):
                    part = plgpu.load(peer_smem.at[j], layout=io.TILE)
                    total = part if total is None else total + part
                plgpu.commit_smem()  # every thread's loads done before the next round's TMA
            y = [_column(total, lane, j) for j in range(k + 1)]
            rows = [io.load_row(consts_smem.at[j]) for j in range(consts_smem.shape[0])]
            bias, alpha = epilogue_mosaic.bias_and_alpha(rows, n)
            return _token_epilogue.forward(
                y[:k],
                y[k],
                bias,
                alpha,
                n=n,
                nc=n * c,
                num_iters=static.num_iters,
                variant=static.variant,
                norm_eps=static.norm_eps,
            )

        coef, raw, r = pl.run_scoped(
            epilogue,
            io.tile_smem((per_load, io.BT, kp), F32),
            plgpu.SMEM((k + 3, io.BT), F32),
            plgpu.Barrier(num_arrivals=1),
            plgpu.Barrier(num_arrivals=per_load),
        )

        def store_rows(out_smem):
            out_smem[0] = _packed(coef, lane, kp)
            out_smem[1] = _packed([*raw, r], lane, kp)
            plgpu.commit_smem()

            @pl.when(s == 0)
            def _():
                plgpu.copy_smem_to_gmem(out_smem.at[0], coef_ref.at[rows])
                plgpu.copy_smem_to_gmem(out_smem.at[1], saved_ref.at[rows])
                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store_rows, io.tile_smem((2, io.BT, kp), F32))
        if not with_pre:
            return

        # 4. the pre over this CTA's columns
        def pre(x_smem, o_smem, loaded):
            def fetch(step, slot):
                for i in range(n):
                    src = x_ref.at[rows, chunk_cols(i, step)]
                    plgpu.copy_gmem_to_smem(src, x_smem.at[slot, i], loaded.at[slot])

            def compute(step, slot, carry):
                out = lax.rem(step, OUTS)
                # this buffer's store, OUTS steps back, has read it
                plgpu.wait_smem_to_gmem(OUTS - 1, wait_read_only=True)
                acc = sum(
                    io.across(coef[i], CHUNK) * io.load_tile(x_smem.at[slot, i]) for i in range(n)
                )
                o_smem[out] = acc.astype(o_smem.dtype)
                plgpu.commit_smem()
                cols = pl.ds(s * cs + step * CHUNK, CHUNK)
                plgpu.copy_smem_to_gmem(o_smem.at[out], li_ref.at[rows, cols])
                return carry

            io.ring(steps, PRE_STAGES, fetch, loaded, compute, 0)
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            pre,
            io.tile_smem((PRE_STAGES, n, io.BT, CHUNK), x2.dtype),
            io.tile_smem((OUTS, io.BT, CHUNK), x2.dtype),
            plgpu.Barrier(num_arrivals=n, num_barriers=PRE_STAGES),
        )

    out_type = [
        jax.ShapeDtypeStruct((t, kp), F32),
        jax.ShapeDtypeStruct((t, kp), F32),
        jax.ShapeDtypeStruct((blocks, size, io.BT, kp), F32),  # the exchange
    ]
    if with_pre:
        out_type.append(jax.ShapeDtypeStruct((t, c), x2.dtype))
    outs = plgpu.kernel(
        body,
        kernel_name="mhc_mapping_cluster_fwd_mgpu",
        out_type=tuple(out_type),
        scratch_types=[plgpu.ClusterBarrier(collective_axes=("s",), num_arrivals=1)],
        grid=(blocks,),
        grid_names=("t",),
        cluster=(size,),
        cluster_names=("s",),
        compiler_params=io.LANE,
        interpret=io.interpret_params(static.interpret),
    )(x2, *parts, consts)
    return outs[0], outs[1], (outs[3] if with_pre else None)


def constants(info: jax.Array, n: int) -> jax.Array:
    """(K + 3, 64) fp32 bias and alpha rows for ``fwd`` (``epilogue_mosaic.constants``
    cut to one token block's width)."""
    return epilogue_mosaic.constants(info, n)[:, : io.BT]
