"""The transition's backward, Pallas Mosaic GPU backend (Hopper): layer l+1's dx pass
fused into layer l's post-res backward (SPEC §7.3; experiments/results/mosaic_gpu/NOTES.md,
"The transition's backward fused").

Layer l+1's mapping backward would write the cotangent of x_next,
``dxn = dy @ phi^T + c_x x_next + h_pre' dli + g`` (g: x_next's own cotangent,
from layer l+1's post-res), and layer l's post-res backward would read it back. Here
one CTA per (64-token block, column span of C) rings through its span in 32-column
steps: TMA brings x, f, x_next, g and dli's chunks of every stream and phi^T's
(hi part) chunks, wgmma builds each stream's dxn tile from the block's dy (hi and lo
parts, loaded once), the registers finish it and apply post-res's backward at once
(``dx[j] = sum_i h_res[i, j] dxn[i]``, ``df = sum_i h_post[i] dxn[i]``, and the
per-token ``<dxn[i], x[j]>``, ``<dxn[i], f>`` carried over the span): dxn is never
written (-8 slabs of (T, C) against the two kernels). dphi^T = dy^T x_next, a sum over
tokens where this grid sums over columns, is left to one XLA matmul outside (+4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mhc import _coeffs
from pallas_kernels.mhc import _mosaic_io as io
from pallas_kernels.mhc._common import XPass, phi_outer, split
from pallas_kernels.mhc.backends import UnsupportedInput

F32 = jnp.float32
CHUNK = 32  # columns per step: 5n + 2 tiles a stage fit twice at n = 4
STAGES = 2
OUTS = 2  # dx/df tile sets being stored while the next are built
# dy's lanes (wgmma's K): its (64, kd) tiles must share the 64-byte swizzle of phi^T's
# (kd, CHUNK) ones, so kd = 32 16-bit lanes (n <= 4; kp = 64 from n = 5 on)
DY_LANES = 32


def _smem_bytes(n: int, kd: int, itemsize: int) -> int:
    stage = (4 * n + 2) * io.BT * CHUNK * itemsize + n * kd * CHUNK * itemsize
    outs = OUTS * (n + 1) * io.BT * CHUNK * itemsize
    rows = (n * n + 2 * n + 1 + n * n + n) * io.BT * 4  # coefficients in, dh out
    return STAGES * stage + outs + 2 * io.BT * kd * itemsize + rows + 1024


def check(n: int, c: int, kd: int, dtype) -> None:
    """UnsupportedInput unless the fused backward takes (n, C, kd, dtype)."""
    if jnp.dtype(dtype).itemsize != 2 or c % CHUNK or kd != DY_LANES:
        raise UnsupportedInput(
            f"transition backward (fused): {jnp.dtype(dtype)} streams, C={c}, {kd} lanes of "
            f"dy: needs 16-bit streams, C a multiple of {CHUNK} and at most {DY_LANES} lanes "
            "(n <= 4); the two ops' backward kernels run instead"
        )
    if (need := _smem_bytes(n, kd, 2)) > io.SMEM_BYTES:
        raise UnsupportedInput(
            f"transition backward (fused): n={n} needs {need} bytes of shared memory, over "
            f"{io.SMEM_BYTES}; the two ops' backward kernels run instead"
        )


@io.lowered_once("static")
def post_res_bwd(h_res, h_post, x, f, x_next, g, dli, h_pre, c_x, dys, phi_hi, static):
    """Layer l's post-res backward for the cotangent dxn of x_next built in the kernel.

    Args:
      h_res (T, n, n), h_post (T, n): layer l's post-res coefficients, fp32.
      x (T, n, C), f (T, C): layer l's post-res inputs (16-bit).
      x_next (T, n, C), g (T, n, C), dli (T, C): layer l+1's input streams, their own
        cotangent and layer_input's cotangent.
      h_pre (T, n), c_x (T,): layer l+1's pre coefficients and RMS term, fp32.
      dys: dy's hi and lo parts, each (T, kd) in x's dtype (``_common.split``).
      phi_hi: phi^T's hi part (kd, n*C) in x's dtype.

    Returns:
      (dh_res (T, n, n), dh_post (T, n)) fp32, dx (T, n, C) and df (T, C).
    """
    t, n, c = x.shape
    kd = phi_hi.shape[0]
    check(n, c, kd, x.dtype)
    span = io.span_columns(t, c, CHUNK)
    steps, spans = span // CHUNK, c // span
    nk = n * n + n  # dh rows: dh_res row-major, then dh_post

    def body(*refs):
        coef_ref, x_ref, f_ref, xn_ref, g_ref, dli_ref, dy_ref, lo_ref, phi_ref = refs[:9]
        dx_ref, df_ref, dh_ref = refs[9:12]
        coef_smem, dy_smem, x_smem, f_smem, xn_smem, g_smem, dli_smem, phi_smem = refs[12:20]
        gx_smem, gf_smem, dh_smem, loaded, bar = refs[20:]
        b, s = lax.axis_index("t"), lax.axis_index("s")
        rows = pl.ds(b * io.BT, io.BT)
        plgpu.copy_gmem_to_smem(coef_ref.at[:, rows], coef_smem, bar)
        plgpu.copy_gmem_to_smem(dy_ref.at[rows], dy_smem.at[0], bar)
        plgpu.copy_gmem_to_smem(lo_ref.at[rows], dy_smem.at[1], bar)
        plgpu.barrier_wait(bar)

        def row(k):  # coefficient rows: h_res (n*n), h_post (n), h_pre (n), c_x (1)
            return io.across(io.load_row(coef_smem.at[k]), CHUNK)

        def cols(step, stream=None):
            start = s * span + step * CHUNK
            return pl.ds(start if stream is None else stream * c + start, CHUNK)

        def fetch(step, slot):
            bar = loaded.at[slot]
            for i in range(n):
                plgpu.copy_gmem_to_smem(x_ref.at[rows, i, cols(step)], x_smem.at[slot, i], bar)
                plgpu.copy_gmem_to_smem(xn_ref.at[rows, i, cols(step)], xn_smem.at[slot, i], bar)
                plgpu.copy_gmem_to_smem(g_ref.at[rows, i, cols(step)], g_smem.at[slot, i], bar)
                plgpu.copy_gmem_to_smem(phi_ref.at[:, cols(step, i)], phi_smem.at[slot, i], bar)
            plgpu.copy_gmem_to_smem(f_ref.at[rows, cols(step)], f_smem.at[slot], bar)
            plgpu.copy_gmem_to_smem(dli_ref.at[rows, cols(step)], dli_smem.at[slot], bar)

        def compute(step, slot, dh):
            out, dh = lax.rem(step, OUTS), list(dh)
            # this buffer's stores, OUTS steps back (n + 1 a step), have read it
            plgpu.wait_smem_to_gmem((n + 1) * (OUTS - 1), wait_read_only=True)
            dli_tile = io.load_tile(dli_smem.at[slot])
            grads, df = [None] * n, None
            for i in range(n):

                def project(acc_ref, i=i):
                    for part in range(2):
                        plgpu.wgmma(acc_ref, dy_smem.at[part], phi_smem.at[slot, i])
                    plgpu.wgmma_wait(0)
                    return acc_ref[...]

                dxn = pl.run_scoped(project, plgpu.ACC((io.BT, CHUNK), F32))
                dxn += row(nk + n) * io.load_tile(xn_smem.at[slot, i])
                dxn += row(nk + i) * dli_tile + io.load_tile(g_smem.at[slot, i])
                for j in range(n):
                    dh[i * n + j] += jnp.sum(dxn * io.load_tile(x_smem.at[slot, j]), axis=1)
                    term = row(i * n + j) * dxn
                    grads[j] = term if grads[j] is None else grads[j] + term
                dh[n * n + i] += jnp.sum(dxn * io.load_tile(f_smem.at[slot]), axis=1)
                term = row(n * n + i) * dxn
                df = term if df is None else df + term
            for j in range(n):
                gx_smem[out, j] = grads[j].astype(gx_smem.dtype)
            gf_smem[out] = df.astype(gf_smem.dtype)
            plgpu.commit_smem()  # also orders the slot's refill after every load above
            for j in range(n):
                plgpu.copy_smem_to_gmem(gx_smem.at[out, j], dx_ref.at[rows, j, cols(step)])
            plgpu.copy_smem_to_gmem(gf_smem.at[out], df_ref.at[rows, cols(step)])
            return tuple(dh)

        zero = plgpu.layout_cast(jnp.zeros((io.BT,), F32), io.ROW)
        dh = io.ring(steps, STAGES, fetch, loaded, compute, (zero,) * nk)
        for k in range(nk):
            dh_smem[k] = dh[k]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(dh_smem, dh_ref.at[s, :, rows])
        plgpu.wait_smem_to_gmem(0)

    coefs = jnp.concatenate(
        [h_res.reshape(t, n * n), h_post, h_pre, c_x[:, None]], axis=1
    )  # (T, n*n + 2n + 1)
    tile = io.tile_smem
    dx, df, dh_parts = plgpu.kernel(
        body,
        kernel_name="mhc_transition_bwd_mgpu",
        out_type=(
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(f.shape, f.dtype),
            jax.ShapeDtypeStruct((spans, nk, io.padded_tokens(t)), F32),
        ),
        scratch_types=[
            plgpu.SMEM((coefs.shape[1], io.BT), F32),
            tile((2, io.BT, kd), x.dtype),
            tile((STAGES, n, io.BT, CHUNK), x.dtype),
            tile((STAGES, io.BT, CHUNK), f.dtype),
            tile((STAGES, n, io.BT, CHUNK), x_next.dtype),
            tile((STAGES, n, io.BT, CHUNK), g.dtype),
            tile((STAGES, io.BT, CHUNK), dli.dtype),
            tile((STAGES, n, kd, CHUNK), phi_hi.dtype),
            tile((OUTS, n, io.BT, CHUNK), x.dtype),
            tile((OUTS, io.BT, CHUNK), f.dtype),
            plgpu.SMEM((nk, io.BT), F32),
            plgpu.Barrier(num_arrivals=4 * n + 2, num_barriers=STAGES),
            plgpu.Barrier(num_arrivals=3),
        ],
        grid=(pl.cdiv(t, io.BT), spans),
        grid_names=("t", "s"),
        compiler_params=io.LANE,
        interpret=io.interpret_params(static.interpret),
    )(io.coeffs_in(coefs), x, f, x_next, g, dli, *dys, phi_hi)
    dh = io.coeffs_out(jnp.sum(dh_parts, axis=0), t)  # a fixed order over spans
    return dh[:, : n * n].reshape(t, n, n), dh[:, n * n :], dx, df


def fused(h_res, h_post, x, f, xp: XPass, static):
    """``transition_op``'s ``fused_bwd``: (dh_res, dh_post, dx, df, dphi^T partials
    (1, kp, n*C)) from the mapping backward's x-pass inputs ``xp`` (tied, with the
    pre), or None where ``check`` refuses these streams."""
    t, n, c = x.shape
    kp, k = xp.dy.shape[1], _coeffs.width(n)
    kd = max(kp, DY_LANES)
    try:
        check(n, c, kd, x.dtype)
    except UnsupportedInput:
        return None
    # as mapping_mosaic.x_bwd: c_x (lane K) travels on its own, dy's lanes padded to
    # wgmma's 64 and phi^T's hi part with zero rows
    dys = split(jnp.where(jnp.arange(kp) == k, 0.0, xp.dy), x.dtype)
    padded = [jnp.pad(d, ((0, 0), (0, kd - kp))) for d in dys]
    phi_hi = jnp.pad(xp.parts[0], ((0, kd - kp), (0, 0)))
    streams = (t, n, c)
    # tied with the pre: the x pass carries dli and dx_in
    assert xp.dli is not None and xp.dx_in is not None and xp.h_pre is not None
    dh_res, dh_post, dx, df = post_res_bwd(
        h_res.astype(F32),
        h_post.astype(F32),
        x,
        f,
        xp.x2.reshape(streams),
        xp.dx_in.reshape(streams),
        xp.dli,
        xp.h_pre.astype(F32),
        xp.dy[:, k],
        padded,
        phi_hi,
        static,
    )
    return dh_res, dh_post, dx, df, phi_outer(dys, xp.x2)[None]
