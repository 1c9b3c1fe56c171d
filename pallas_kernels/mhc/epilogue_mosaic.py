"""The mHC coefficient epilogue and its VJP as Pallas Mosaic GPU kernels (SPEC §4, §5).

``_token_epilogue``'s element-wise math, one token per thread: a block of BTE = 128
tokens (one warpgroup) TMA-loads its (rows, BTE) slab of per-coefficient rows, runs
the RMS, sigmoids and exact Sinkhorn (or their VJP) on (BTE,) row vectors in
registers, with the iteration loops rolled, and TMA-stores its output rows. Rows are
fp32 and travel transposed, (rows, T): a coefficient's BTE values are contiguous, and
T needs only the 8-token alignment of ``_mosaic_io.aligned`` (TMA zero-fills the last
block's loads past T and clips its stores).

In XLA the same math costs a loop of GPU kernels per Sinkhorn run, ~0.5 ms forward
and ~3 ms backward at any T (measured on an H200): the kernels make it one launch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mhc import _coeffs, _token_epilogue
from pallas_kernels.mhc import _mosaic_io as io

F32 = jnp.float32
BTE = 128  # tokens per block: one per thread of a warpgroup
ROWS = plgpu.Layout.WG_STRIDED((BTE,), vec_size=1)
# Its n*n Sinkhorn entries make the kernels' code grow as n^2: at n = 8 lowering the
# forward alone took 66 s on a 2-core host and the backward's shared memory (562 rows
# of BTE fp32) overflows; past this the mapping runs the same math in XLA.
MAX_STREAMS = 4


def constants(info: jax.Array, n: int) -> jax.Array:
    """(2K, BTE) fp32: bias then the per-coefficient alpha, each broadcast along a row
    (loaded as row vectors: the kernels take no scalars)."""
    k = _coeffs.width(n)
    return jnp.broadcast_to(info[:2, :k].reshape(2 * k, 1), (2 * k, BTE))


def _call(math, rows_in: tuple[int, ...], rows_out: tuple[int, ...], t: int, interpret: bool):
    """A kernel running ``math(*input row lists, bias, alpha) -> output row lists``.

    Its arguments: (r, T) fp32 arrays with the r of rows_in, then ``constants``; its
    outputs (r, T) fp32 with the r of rows_out.
    """
    n_in, n_out = len(rows_in), len(rows_out)

    def body(*refs):
        ins, outs = refs[: n_in + 1], refs[n_in + 1 : n_in + 1 + n_out]
        in_smem = refs[n_in + 1 + n_out : 2 * n_in + 2 + n_out]
        out_smem, loaded = refs[2 * n_in + 2 + n_out : -1], refs[-1]
        cols = pl.ds(lax.axis_index("t") * BTE, BTE)
        for ref, smem in zip(ins[:-1], in_smem[:-1]):
            plgpu.copy_gmem_to_smem(ref.at[:, cols], smem, loaded)
        plgpu.copy_gmem_to_smem(ins[-1], in_smem[-1], loaded)
        plgpu.barrier_wait(loaded)

        def rows(smem):
            return [plgpu.load(smem.at[r], layout=ROWS) for r in range(smem.shape[0])]

        consts = rows(in_smem[-1])
        k = len(consts) // 2
        results = math(*(rows(smem) for smem in in_smem[:-1]), consts[:k], consts[k:])
        for smem, values in zip(out_smem, results, strict=True):
            for r, v in enumerate(values):
                smem[r] = v
        plgpu.commit_smem()
        for ref, smem in zip(outs, out_smem):
            plgpu.copy_smem_to_gmem(smem, ref.at[:, cols])
        plgpu.wait_smem_to_gmem(0)

    def call(*args):
        return plgpu.kernel(
            body,
            out_type=tuple(jax.ShapeDtypeStruct((r, t), F32) for r in rows_out),
            scratch_types=[
                *(plgpu.SMEM((a.shape[0], BTE), F32) for a in args),
                *(plgpu.SMEM((r, BTE), F32) for r in rows_out),
                plgpu.Barrier(num_arrivals=n_in + 1),
            ],
            grid=(pl.cdiv(t, BTE),),
            grid_names=("t",),
            interpret=io.interpret_params(interpret),
        )(*args)

    return call


def forward(partials_t, consts, *, n: int, nc: int, static):
    """Coefficients from the summed projection.

    Args:
      partials_t: (K + 1, T) fp32: rows < K ``x @ phi``, row K ``sum(x**2)``.
      consts: ``constants(info, n)``.

    Returns:
      coef_t (K, T) [h_pre | h_post | h_res] and saved_t (K + 1, T) [raw | r], fp32.
    """
    k, t = _coeffs.width(n), partials_t.shape[1]

    def math(p, bias, alpha):
        coef, raw, r = _token_epilogue.forward(
            p[:k],
            p[k],
            bias,
            alpha,
            n=n,
            nc=nc,
            num_iters=static.num_iters,
            norm_eps=static.norm_eps,
        )
        return coef, [*raw, r]

    return _call(math, (k + 1,), (k, k + 1), t, static.interpret)(partials_t, consts)


def backward(saved_t, dcoef_t, consts, *, n: int, nc: int, static):
    """The VJP of ``forward``: saved_t (K + 1, T) and the coefficients' cotangents
    dcoef_t (K, T) -> dy_t (K + 1, T) [d(x @ phi) | c_x], dt_t and (dt * raw)_t (K, T),
    fp32 (see ``_token_epilogue.backward``)."""
    k, t = _coeffs.width(n), saved_t.shape[1]

    def math(saved, dcoef, bias, alpha):
        dy, c_x, dt = _token_epilogue.backward(
            saved[:k], saved[k], dcoef, bias, alpha, n=n, nc=nc, num_iters=static.num_iters
        )
        return [*dy, c_x], dt, [d * v for d, v in zip(dt, saved[:k])]

    return _call(math, (k + 1, k), (k + 1, k, k), t, static.interpret)(saved_t, dcoef_t, consts)
