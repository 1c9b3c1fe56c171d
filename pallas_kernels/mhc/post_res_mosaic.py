"""Post-res-apply kernels (SPEC §7.3), Pallas Mosaic GPU backend (Hopper).

Forward ``x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] f``: one block per (token
block, column block) loads the n stream tiles, f and the coefficient rows by TMA and
builds each output tile from the shared-memory tiles (n reads of each; registers then
hold one accumulator and one operand tile at any n). Backward, gridded the same way:
``dx[j] = sum_i h_res[i, j] dxn[i]``, ``df = sum_i h_post[i] dxn[i]`` and this column
block's part of ``dh_res[i, j] = <dxn[i], x[j]>`` and ``dh_post[i] = <dxn[i], f>``,
summed outside over column blocks in a fixed order. See ``_mosaic_io``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mhc import _mosaic_io as io
from pallas_kernels.mhc._common import post_res_op

F32 = jnp.float32


def _blocks(name: str, t: int, n: int, c: int, itemsize: int) -> tuple[int, dict]:
    bc = io.column_block(name, c, 2 * n + 1, itemsize)
    return bc, dict(grid=(pl.cdiv(t, io.BT), c // bc), grid_names=("t", "c"))


def _load(n, rows, cols, bar, refs, smems) -> None:
    """TMA of this block's h_res and h_post rows, f tile and n stream tiles (n + 3
    arrivals on ``bar``)."""
    (hr_ref, hp_ref, x_ref, f_ref), (hr_smem, hp_smem, x_smem, f_smem) = refs, smems
    plgpu.copy_gmem_to_smem(hr_ref.at[:, rows], hr_smem, bar)
    plgpu.copy_gmem_to_smem(hp_ref.at[:, rows], hp_smem, bar)
    plgpu.copy_gmem_to_smem(f_ref.at[rows, cols], f_smem, bar)
    for j in range(n):
        plgpu.copy_gmem_to_smem(x_ref.at[rows, j, cols], x_smem.at[j], bar)


@io.lowered_once("static")
def fwd(h_res, h_post, x, f, static):
    """x_next (T, n, C) in x.dtype."""
    t, n, c = x.shape
    bc, grid = _blocks("apply_post_res", t, n, c, x.dtype.itemsize)

    def body(hr_ref, hp_ref, x_ref, f_ref, o_ref, hr_smem, hp_smem, x_smem, f_smem, o_smem, bar):
        rows, cols = io.block_slices(bc)
        _load(
            n, rows, cols, bar, (hr_ref, hp_ref, x_ref, f_ref), (hr_smem, hp_smem, x_smem, f_smem)
        )
        plgpu.barrier_wait(bar)
        for i in range(n):
            acc = io.across(io.load_row(hp_smem.at[i]), bc) * io.load_tile(f_smem)
            for j in range(n):
                acc += io.across(io.load_row(hr_smem.at[i * n + j]), bc) * io.load_tile(
                    x_smem.at[j]
                )
            o_smem[i] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        for i in range(n):
            plgpu.copy_smem_to_gmem(o_smem.at[i], o_ref.at[rows, i, cols])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        kernel_name="mhc_post_res_fwd_mgpu",
        out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
        scratch_types=[
            plgpu.SMEM((n * n, io.BT), F32),
            plgpu.SMEM((n, io.BT), F32),
            io.tile_smem((n, io.BT, bc), x.dtype),
            io.tile_smem((io.BT, bc), f.dtype),
            io.tile_smem((n, io.BT, bc), x.dtype),
            plgpu.Barrier(num_arrivals=n + 3),
        ],
        compiler_params=io.LANE,
        interpret=io.interpret_params(static.interpret),
        **grid,
    )(io.coeffs_in(h_res.reshape(t, n * n)), io.coeffs_in(h_post), x, f)


@io.lowered_once("static")
def bwd(h_res, h_post, x, f, dxn, static):
    """(dh_res (T, n, n), dh_post (T, n)) fp32, dx in x.dtype, df in f.dtype."""
    t, n, c = x.shape
    bc, grid = _blocks("apply_post_res backward", t, n, c, x.dtype.itemsize)

    def body(
        hr_ref, hp_ref, x_ref, f_ref, d_ref,  # inputs
        dx_ref, df_ref, dhr_ref, dhp_ref,  # outputs
        hr_smem, hp_smem, x_smem, f_smem, d_smem, dhr_smem, dhp_smem, bar,  # scratch
    ):  # fmt: skip
        rows, cols = io.block_slices(bc)
        _load(
            n, rows, cols, bar, (hr_ref, hp_ref, x_ref, f_ref), (hr_smem, hp_smem, x_smem, f_smem)
        )
        for j in range(n):
            plgpu.copy_gmem_to_smem(d_ref.at[rows, j, cols], d_smem.at[j], bar)
        plgpu.barrier_wait(bar)
        # dx[j] and df replace x[j] and f in place once read: Mosaic GPU puts a warpgroup
        # barrier around every shared-memory store, so no thread still reads them.
        # (operand tile, coefficient rows, gradient rows, row of i = 0, row step in i)
        operands = [(x_smem.at[j], hr_smem, dhr_smem, j, n) for j in range(n)]
        for src, h_smem, dh_smem, k0, step in [*operands, (f_smem, hp_smem, dhp_smem, 0, 1)]:
            v = io.load_tile(src)
            grad = None
            for i in range(n):
                d = io.load_tile(d_smem.at[i])
                dh_smem[k0 + i * step] = jnp.sum(d * v, axis=1)
                term = io.across(io.load_row(h_smem.at[k0 + i * step]), bc) * d
                grad = term if grad is None else grad + term
            src[...] = grad.astype(src.dtype)
        plgpu.commit_smem()
        for j in range(n):
            plgpu.copy_smem_to_gmem(x_smem.at[j], dx_ref.at[rows, j, cols])
        plgpu.copy_smem_to_gmem(f_smem, df_ref.at[rows, cols])
        ci = lax.axis_index("c")
        plgpu.copy_smem_to_gmem(dhr_smem, dhr_ref.at[ci, :, rows])
        plgpu.copy_smem_to_gmem(dhp_smem, dhp_ref.at[ci, :, rows])
        plgpu.wait_smem_to_gmem(0)

    t_pad, blocks = io.padded_tokens(t), c // bc
    dx, df, dhr_parts, dhp_parts = plgpu.kernel(
        body,
        kernel_name="mhc_post_res_bwd_mgpu",
        out_type=(
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(f.shape, f.dtype),
            jax.ShapeDtypeStruct((blocks, n * n, t_pad), F32),
            jax.ShapeDtypeStruct((blocks, n, t_pad), F32),
        ),
        scratch_types=[
            plgpu.SMEM((n * n, io.BT), F32),
            plgpu.SMEM((n, io.BT), F32),
            io.tile_smem((n, io.BT, bc), x.dtype),
            io.tile_smem((io.BT, bc), f.dtype),
            io.tile_smem((n, io.BT, bc), dxn.dtype),
            plgpu.SMEM((n * n, io.BT), F32),
            plgpu.SMEM((n, io.BT), F32),
            plgpu.Barrier(num_arrivals=2 * n + 3),
        ],
        compiler_params=io.LANE,
        interpret=io.interpret_params(static.interpret),
        **grid,
    )(io.coeffs_in(h_res.reshape(t, n * n)), io.coeffs_in(h_post), x, f, dxn)
    dh_res = io.coeffs_out(jnp.sum(dhr_parts, axis=0), t).reshape(t, n, n)
    return dh_res, io.coeffs_out(jnp.sum(dhp_parts, axis=0), t), dx, df


apply_post_res = io.aligned(post_res_op(fwd, bwd))
"""``apply_post_res(h_res (T, n, n), h_post (T, n), x (T, n, C), f (T, C), static)``
-> (T, n, C) in x.dtype, differentiable."""
