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
from pallas_kernels.mhc.sinkhorn import multiplicative_runs

F32 = jnp.float32
BTE = 128  # tokens per block: one per thread of a warpgroup
ROWS = plgpu.Layout.WG_STRIDED((BTE,), vec_size=1)


def constants(info: jax.Array, n: int) -> jax.Array:
    """(K + 3, BTE) fp32: the K biases, then alpha of the pre, post and res groups, each
    broadcast along a row (loaded as row vectors: the kernels take no scalars)."""
    k = _coeffs.width(n)
    rows = jnp.concatenate([info[0, :k], info[1, jnp.array([0, n, 2 * n])]])
    return jnp.broadcast_to(rows.reshape(k + 3, 1), (k + 3, BTE))


def bias_and_alpha(rows: list, n: int) -> tuple[list, list]:
    """``constants``' K + 3 rows as the K biases and the K per-coefficient alphas. A
    group's coefficients share one alpha value, so a kernel holds 3 of them in registers,
    not K (24 at n = 4: the backward spilled with K)."""
    k = _coeffs.width(n)
    pre, post, res = rows[k : k + 3]
    return rows[:k], [pre] * n + [post] * n + [res] * (n * n)


def _keeper(buf):
    """A ``_token_epilogue.Keep`` that puts each n x n iterate into ``buf``'s next n*n
    rows (each thread its own token's column) while they last, else leaves it in
    registers; its reload reads the rows back where it is called."""
    used = 0

    def keep(m):
        nonlocal used
        flat, base = [e for row in m for e in row], used
        if base + len(flat) > buf.shape[0]:
            return lambda: m
        for r, v in enumerate(flat):
            buf[base + r] = v
        used += len(flat)

        def reload():
            values = [plgpu.load(buf.at[base + r], layout=ROWS) for r in range(len(flat))]
            return [values[i : i + len(m)] for i in range(0, len(flat), len(m))]

        return reload

    return keep


def _keep_rows(n: int, iterates: int, input_rows: int) -> int:
    """Rows of shared memory for up to ``iterates`` n x n iterates, as many as fit beside
    the inputs (the Sinkhorn VJP's 4 checkpoints at 20 iterations: all at n <= 4, 3 at
    n = 8)."""
    room = io.SMEM_BYTES // (BTE * 4) - input_rows
    return min(iterates, max(room, 0) // (n * n)) * n * n


def _run(
    name: str,
    math,
    rows_out: tuple[int, ...],
    *args,
    n: int,
    interpret: bool,
    keep: int = 0,
):
    """Runs ``math(*input row lists, bias, alpha, keep, reread) -> output row lists`` per
    token block, as kernel ``name`` (what profiles show), for n streams; the math's
    ``keep`` stores up to ``keep`` n x n iterates in shared memory (``_keeper``: those
    that fit beside the inputs), ``reread(i)`` loads input i's rows again (the math may
    use them there instead of holding them).

    args: (r, T) fp32 arrays, then ``constants``. Returns (r, T) fp32 arrays with the
    r of rows_out; output i is at most as tall as argument i, whose shared-memory
    buffer it reuses (the backward at n = 8 would not fit in separate ones).
    """
    t = args[0].shape[1]
    keep_rows = _keep_rows(n, keep, sum(a.shape[0] for a in args))
    if t % io.TOKEN_ALIGN:  # TMA strides must be 16-byte multiples
        raise ValueError(f"epilogue kernel: T={t} is not a multiple of {io.TOKEN_ALIGN}")
    if len(rows_out) > len(args) or any(r > a.shape[0] for r, a in zip(rows_out, args)):
        raise ValueError(
            f"epilogue kernel: outputs of {rows_out} rows for inputs of "
            f"{[a.shape[0] for a in args]}"
        )

    def body(*refs):
        ins, outs = refs[: len(args)], refs[len(args) : len(args) + len(rows_out)]
        scratch = refs[len(args) + len(rows_out) :]
        smem, loaded = scratch[: len(args)], scratch[len(args)]
        keeper = _keeper(scratch[-1]) if keep_rows else _token_epilogue.in_registers
        cols = pl.ds(lax.axis_index("t") * BTE, BTE)
        for ref, buf in zip(ins[:-1], smem[:-1]):
            plgpu.copy_gmem_to_smem(ref.at[:, cols], buf, loaded)
        plgpu.copy_gmem_to_smem(ins[-1], smem[-1], loaded)
        plgpu.barrier_wait(loaded)

        def rows(buf):
            return [plgpu.load(buf.at[r], layout=ROWS) for r in range(buf.shape[0])]

        values = [rows(buf) for buf in smem]  # every load before any store (see below)

        def reread(i):
            return rows(smem[i])

        results = math(*values[:-1], *bias_and_alpha(values[-1], n), keeper, reread)
        # Output i overwrites input i's buffer: in this layout each thread reads and
        # writes only its own token's column, it has loaded (and re-read) every input
        # above, and Mosaic GPU puts a warpgroup barrier around every shared-memory store.
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
            *([plgpu.SMEM((keep_rows, BTE), F32)] if keep_rows else []),
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

    def math(p, bias, alpha, keep, reread):
        del keep, reread  # the forward keeps only the last run's start, in registers
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
        n=n,
        interpret=static.interpret,
    )


@io.lowered_once("n", "nc", "static")
def backward(saved_t, dcoef_t, consts, *, n: int, nc: int, static):
    """The VJP of ``forward``: saved_t (K + 1, T) and the coefficients' cotangents
    dcoef_t (K, T) -> dy_t (K + 1, T) [d(x @ phi) | c_x], dt_t and (dt * raw)_t (K, T),
    fp32 (see ``_token_epilogue.backward``)."""
    k = _coeffs.width(n)

    def math(saved, dcoef, bias, alpha, keep, reread):
        def raw():  # re-read after the Sinkhorn VJP: no registers held across it
            return reread(0)[:k]

        dy, c_x, dt = _token_epilogue.backward(
            raw,
            saved[k],
            dcoef,
            bias,
            alpha,
            n=n,
            nc=nc,
            num_iters=static.num_iters,
            variant=static.variant,
            keep=keep,
        )
        return [*dy, c_x], dt, [d * v for d, v in zip(dt, raw())]

    return _run(
        "mhc_mapping_coef_bwd_mgpu",
        math,
        (k + 1, k, k),
        saved_t,
        dcoef_t,
        consts,
        n=n,
        interpret=static.interpret,
        # the paper variant's Sinkhorn VJP: one checkpoint per multiplicative run
        keep=len(multiplicative_runs(n, static.num_iters)) if static.variant == "paper" else 0,
    )
