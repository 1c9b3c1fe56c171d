"""The mHC coefficient epilogue and its VJP as Pallas Mosaic GPU kernels (SPEC §4, §5).

``_token_epilogue``'s element-wise math, one token per thread: a block of BTE = 128
tokens (one warpgroup) TMA-loads its (rows, BTE) slab of per-coefficient rows, runs
the RMS, sigmoids and exact Sinkhorn (or their VJP) on (BTE,) row vectors in
registers, with the iteration loops rolled, and TMA-stores its output rows. Rows are
fp32 and travel transposed, (rows, T): a coefficient's BTE values are contiguous, and
T needs only the 8-token alignment of ``_mosaic_io.aligned`` (TMA zero-fills the last
block's loads past T and clips its stores).

In XLA the same math costs a loop of GPU kernels per Sinkhorn run, a fixed latency
at any T (experiments/results/mosaic_gpu/NOTES.md): the kernels make it one launch.
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


def constants(info: jax.Array, n: int) -> jax.Array:
    """(2K, BTE) fp32: bias then the per-coefficient alpha, each broadcast along a row
    (loaded as row vectors: the kernels take no scalars)."""
    k = _coeffs.width(n)
    return jnp.broadcast_to(info[:2, :k].reshape(2 * k, 1), (2 * k, BTE))


def _run(name: str, math, rows_out: tuple[int, ...], *args, interpret: bool):
    """Runs ``math(*input row lists, bias, alpha) -> output row lists`` per token block,
    as kernel ``name`` (what profiles show).

    args: (r, T) fp32 arrays, then ``constants``. Returns (r, T) fp32 arrays with the
    r of rows_out; output i is at most as tall as argument i, whose shared-memory
    buffer it reuses (the backward at n = 8 would not fit in separate ones).
    """
    t = args[0].shape[1]
    if t % io.TOKEN_ALIGN:  # TMA strides must be 16-byte multiples
        raise ValueError(f"epilogue kernel: T={t} is not a multiple of {io.TOKEN_ALIGN}")
    if len(rows_out) > len(args) or any(r > a.shape[0] for r, a in zip(rows_out, args)):
        raise ValueError(
            f"epilogue kernel: outputs of {rows_out} rows for inputs of "
            f"{[a.shape[0] for a in args]}"
        )

    def body(*refs):
        ins, outs = refs[: len(args)], refs[len(args) : len(args) + len(rows_out)]
        smem, loaded = refs[len(args) + len(rows_out) : -1], refs[-1]
        cols = pl.ds(lax.axis_index("t") * BTE, BTE)
        for ref, buf in zip(ins[:-1], smem[:-1]):
            plgpu.copy_gmem_to_smem(ref.at[:, cols], buf, loaded)
        plgpu.copy_gmem_to_smem(ins[-1], smem[-1], loaded)
        plgpu.barrier_wait(loaded)

        def rows(buf):
            return [plgpu.load(buf.at[r], layout=ROWS) for r in range(buf.shape[0])]

        values = [rows(buf) for buf in smem]  # every load before any store (see below)
        k = len(values[-1]) // 2
        results = math(*values[:-1], values[-1][:k], values[-1][k:])
        # Output i overwrites input i's buffer: in this layout each thread reads and
        # writes only its own token's column, it has loaded every input above, and
        # Mosaic GPU puts a warpgroup barrier around every shared-memory store.
        for buf, result in zip(smem, results):
            for r, v in enumerate(result):
                buf[r] = v
        plgpu.commit_smem()
        for ref, buf, r in zip(outs, smem, rows_out):
            plgpu.copy_smem_to_gmem(buf.at[:r], ref.at[:, cols])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        kernel_name=name,
        out_type=tuple(jax.ShapeDtypeStruct((r, t), F32) for r in rows_out),
        scratch_types=[
            *(plgpu.SMEM((a.shape[0], BTE), F32) for a in args),
            plgpu.Barrier(num_arrivals=len(args)),
        ],
        grid=(pl.cdiv(t, BTE),),
        grid_names=("t",),
        # every value has the one row layout: lane-level lowering skips layout
        # inference, which would take most of the backward's lowering time
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=io.interpret_params(interpret),
    )(*args)


@io.lowered_once("n", "nc", "static")
def forward(partials_t, consts, *, n: int, nc: int, static):
    """Coefficients from the summed projection.

    Args:
      partials_t: (K + 1, T) fp32: rows < K ``x @ phi``, row K ``sum(x**2)``.
      consts: ``constants(info, n)``.

    Returns:
      coef_t (K, T) [h_pre | h_post | h_res] and saved_t (K + 1, T) [raw | r], fp32.
    """
    k = _coeffs.width(n)

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
            variant=static.variant,
        )
        return coef, [*raw, r]

    return _run(
        "mhc_mapping_coef_fwd_mgpu",
        math,
        (k, k + 1),
        partials_t,
        consts,
        interpret=static.interpret,
    )


@io.lowered_once("n", "nc", "static")
def backward(saved_t, dcoef_t, consts, *, n: int, nc: int, static):
    """The VJP of ``forward``: saved_t (K + 1, T) and the coefficients' cotangents
    dcoef_t (K, T) -> dy_t (K + 1, T) [d(x @ phi) | c_x], dt_t and (dt * raw)_t (K, T),
    fp32 (see ``_token_epilogue.backward``)."""
    k = _coeffs.width(n)

    def math(saved, dcoef, bias, alpha):
        dy, c_x, dt = _token_epilogue.backward(
            saved[:k],
            saved[k],
            dcoef,
            bias,
            alpha,
            n=n,
            nc=nc,
            num_iters=static.num_iters,
            variant=static.variant,
        )
        return [*dy, c_x], dt, [d * v for d, v in zip(dt, saved[:k])]

    return _run(
        "mhc_mapping_coef_bwd_mgpu",
        math,
        (k + 1, k, k),
        saved_t,
        dcoef_t,
        consts,
        interpret=static.interpret,
    )
