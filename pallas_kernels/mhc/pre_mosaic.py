"""Pre-apply kernels (SPEC §7.2), Pallas Mosaic GPU backend (Hopper).

Forward ``layer_input = sum_i h_pre[i] x[i]``: one block per (token block, column
block) loads the n stream tiles and the n coefficient rows by TMA, sums in fp32
registers and stores one tile. Backward, gridded the same way: ``dx[i] = h_pre[i] dli``
and this column block's part of ``dh_pre[i] = <x[i], dli>`` (``weight_grad``: the
latter alone, for the mapping kernel's fused pre); the per-column-block
partials (fp32, (C/bc, n, T_pad)) are summed outside in a fixed order, so runs are
bitwise repeatable. See ``_mosaic_io`` for the tiles and the coefficient layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mhc import _mosaic_io as io
from pallas_kernels.mhc._common import pre_op

F32 = jnp.float32


def _grid(t: int, c: int, bc: int) -> dict:
    return dict(grid=(pl.cdiv(t, io.BT), c // bc), grid_names=("t", "c"))


@io.lowered_once("static")
def fwd(h, x, static):
    """layer_input (T, C) in x.dtype from h_pre (T, n) and x (T, n, C)."""
    t, n, c = x.shape
    bc = io.column_block("apply_pre", c, n + 1, x.dtype.itemsize)

    def body(h_ref, x_ref, o_ref, h_smem, x_smem, o_smem, loaded):
        rows, cols = io.block_slices(bc)
        plgpu.copy_gmem_to_smem(h_ref.at[:, rows], h_smem, loaded)
        for i in range(n):
            plgpu.copy_gmem_to_smem(x_ref.at[rows, i, cols], x_smem.at[i], loaded)
        plgpu.barrier_wait(loaded)
        acc = sum(
            io.across(io.load_row(h_smem.at[i]), bc) * io.load_tile(x_smem.at[i]) for i in range(n)
        )
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[rows, cols])
        plgpu.wait_smem_to_gmem(0)

    out = plgpu.kernel(
        body,
        kernel_name="mhc_pre_fwd_mgpu",
        out_type=jax.ShapeDtypeStruct((t, c), x.dtype),
        scratch_types=[
            plgpu.SMEM((n, io.BT), F32),
            io.tile_smem((n, io.BT, bc), x.dtype),
            io.tile_smem((io.BT, bc), x.dtype),
            plgpu.Barrier(num_arrivals=n + 1),
        ],
        compiler_params=io.LANE,
        interpret=io.interpret_params(static.interpret),
        **_grid(t, c, bc),
    )(io.coeffs_in(h), x)
    # XLA's dynamic-slice fusion would otherwise clone this kernel: in a scanned model
    # layer_input feeds the sub-layer and is saved into the scan's stacked residuals,
    # and XLA (as of JAX 0.11.2, GPU) fuses a second copy of the kernel with that
    # stacking update, running it twice per layer. The barrier keeps one call; the
    # stacking becomes a plain copy of one (T, C) slab.
    return lax.optimization_barrier(out)


@io.lowered_once("static")
def _bwd_call(h, x, dli, static):
    """(dx or None, dh_pre (T, n) fp32); dx only when h is given."""
    t, n, c = x.shape
    with_dx = h is not None
    bc = io.column_block("apply_pre backward", c, n + 1, x.dtype.itemsize)

    def body(*refs):
        h_ref, (x_ref, d_ref), refs = (
            (refs[0], refs[1:3], refs[3:]) if with_dx else (None, refs[:2], refs[2:])
        )
        dx_ref, refs = (refs[0], refs[1:]) if with_dx else (None, refs)
        dh_ref, h_smem, x_smem, d_smem, dh_smem, loaded = refs
        rows, cols = io.block_slices(bc)
        if with_dx:
            plgpu.copy_gmem_to_smem(h_ref.at[:, rows], h_smem, loaded)
        plgpu.copy_gmem_to_smem(d_ref.at[rows, cols], d_smem, loaded)
        for i in range(n):
            plgpu.copy_gmem_to_smem(x_ref.at[rows, i, cols], x_smem.at[i], loaded)
        plgpu.barrier_wait(loaded)
        d = io.load_tile(d_smem)
        for i in range(n):
            dh_smem[i] = jnp.sum(io.load_tile(x_smem.at[i]) * d, axis=1)
            if with_dx:  # dx[i] replaces x[i]: stores are fenced by warpgroup barriers
                x_smem[i] = (io.across(io.load_row(h_smem.at[i]), bc) * d).astype(x_smem.dtype)
        plgpu.commit_smem()
        if with_dx:
            for i in range(n):
                plgpu.copy_smem_to_gmem(x_smem.at[i], dx_ref.at[rows, i, cols])
        plgpu.copy_smem_to_gmem(dh_smem, dh_ref.at[lax.axis_index("c"), :, rows])
        plgpu.wait_smem_to_gmem(0)

    dh_type = jax.ShapeDtypeStruct((c // bc, n, io.padded_tokens(t)), F32)
    outs = plgpu.kernel(
        body,
        kernel_name="mhc_pre_bwd_mgpu" if with_dx else "mhc_pre_dh_mgpu",
        out_type=(jax.ShapeDtypeStruct(x.shape, x.dtype), dh_type) if with_dx else (dh_type,),
        scratch_types=[
            plgpu.SMEM((n, io.BT), F32),
            io.tile_smem((n, io.BT, bc), x.dtype),
            io.tile_smem((io.BT, bc), dli.dtype),
            plgpu.SMEM((n, io.BT), F32),
            plgpu.Barrier(num_arrivals=n + 1 + with_dx),
        ],
        compiler_params=io.LANE,
        interpret=io.interpret_params(static.interpret),
        **_grid(t, c, bc),
    )(*((io.coeffs_in(h),) if with_dx else ()), x, dli)
    dh = io.coeffs_out(jnp.sum(outs[-1], axis=0), t)
    return (outs[0] if with_dx else None), dh


def bwd(h, x, dli, static):
    """(dx (T, n, C) in x.dtype, dh_pre (T, n) fp32) for the cotangent dli (T, C)."""
    return _bwd_call(h, x, dli, static)


def weight_grad(x, dli, static):
    """dh_pre[t, i] = <x[t, i], dli[t]> alone: (T, n) fp32 (the fused mapping's pre)."""
    return _bwd_call(None, x, dli, static)[1]


apply_pre = io.aligned(pre_op(fwd, bwd))
"""``apply_pre(h_pre (T, n), x (T, n, C), static) -> (T, C)`` in x.dtype, differentiable."""
