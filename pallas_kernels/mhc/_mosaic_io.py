"""Tiles, coefficient layout and launch settings shared by the Mosaic GPU kernels.

Every Mosaic GPU kernel of this package works on (BT, bc) tiles of the streams: BT = 64
tokens (one warpgroup's WGMMA row tile), bc columns of one stream. Tiles move between
global and shared memory by TMA; a token block past the end of T is zero-filled on
load and clipped on store by the TMA unit itself, so T needs padding only to a multiple
of 8 (``aligned``). Per-token coefficients travel transposed and padded, (K, T_pad) fp32
with T_pad a multiple of BT, so that the BT values of one coefficient are one
contiguous TMA box that loads into the row layout the tiles broadcast along.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mhc.backends import UnsupportedInput

F32 = jnp.float32
BT = 64
TOKEN_ALIGN = 8  # TMA into tiled shared memory needs T a multiple of the 8-row tiling
# 128 at most: a (64, 256) fp32 tile is 128 registers per thread, and the kernels keep
# two or three live, which would spill.
COLUMN_BLOCKS = (128, 64, 32)
MAX_TOKENS = 65535 * BT  # token blocks run on CUDA grid y, at most 65535 of them
SMS = 132  # streaming multiprocessors of an H100 / H200 (SXM)
MIN_STEPS = 4  # chunks per block that ``span_columns`` keeps where C has them
SMEM_BYTES = 224 * 1024  # of the 227 KiB a Hopper block may take; the rest: barriers, alignment
# Shared memory a kernel may fill with tiles: first about half of the 227 KiB a Hopper
# block can take, so two blocks share an SM and one's loads hide the other's math;
# failing that (fp32 streams at n = 8), most of it for one block per SM.
SMEM_BUDGETS = (112 * 1024, 200 * 1024)
TILE = plgpu.Layout.WGMMA  # (BT, bc) tiles in registers
ROW = plgpu.Layout.WGMMA.reduce(1)  # (BT,) per-token values, broadcast along columns


# Lane-level lowering: every value's layout is given, so Mosaic GPU's layout inference,
# which dominates lowering time (experiments/results/mosaic_gpu/NOTES.md), is skipped.
# It needs stream tiles in swizzled shared memory (``tile_smem``).
LANE = plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


def column_block(name: str, c: int, tiles: int, itemsize: int) -> int:
    """Widest bc in COLUMN_BLOCKS dividing c with ``tiles`` (BT, bc) tiles in the first
    of SMEM_BUDGETS that fits any.

    Raises:
      UnsupportedInput: no such bc (c not a multiple of 32, or too many tiles).
    """
    for budget in SMEM_BUDGETS:
        for bc in COLUMN_BLOCKS:
            if c % bc == 0 and tiles * BT * bc * itemsize <= budget:
                return bc
    raise UnsupportedInput(
        f"{name}: C={c} with {tiles} tiles of {itemsize}-byte values: the Mosaic GPU kernels "
        f"need C a multiple of {COLUMN_BLOCKS[-1]} and {tiles} x {BT} x {COLUMN_BLOCKS[-1]} "
        f"x {itemsize} bytes within {SMEM_BUDGETS[-1]} bytes of shared memory; use "
        "impl='xla' or the Triton kernels"
    )


def aligned(op):
    """``op`` on arrays whose leading token axis is zero-padded to a multiple of
    TOKEN_ALIGN, its output sliced back. Padding copies the streams, so only a T that
    is not a multiple of 8 pays for it. T over MAX_TOKENS is an UnsupportedInput."""

    def call(*args):
        *arrays, static = args
        t = arrays[0].shape[0]
        if t > MAX_TOKENS:
            raise UnsupportedInput(
                f"T={t} tokens: the Mosaic GPU kernels take at most {MAX_TOKENS} per call "
                f"(65535 blocks of {BT}); use impl='xla' or the Triton kernels"
            )
        pad = -t % TOKEN_ALIGN
        if pad:
            arrays = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in arrays]
        out = op(*arrays, static)
        return jax.tree.map(lambda o: o[:t], out) if pad else out

    return call


def lowered_once(*static_argnames: str):
    """Decorator: the kernel call under ``jax.jit``, so that calls with equal shapes and
    static arguments share one traced jaxpr, which XLA lowers (and Mosaic GPU compiles)
    once per program instead of once per call site (an unscanned model has one call
    site per sub-layer)."""
    return lambda fn: jax.jit(fn, static_argnames=static_argnames)


def span_columns(t: int, c: int, chunk: int, tokens: int = BT) -> int:
    """Columns of C per block of a kernel gridded over (block of ``tokens`` tokens, span)
    that pipelines its span in ``chunk``-column steps: the widest span that still gives
    every SM a block, keeping MIN_STEPS chunks per block where C has them (a pipeline
    needs steps to overlap; each block also pays to fill and drain it)."""
    chunks, blocks = c // chunk, pl.cdiv(t, tokens)
    fewest = min(MIN_STEPS, chunks)
    splits = [d for d in range(1, chunks + 1) if chunks % d == 0 and chunks // d >= fewest]
    split = next((d for d in splits if blocks * d >= SMS), splits[-1])
    return c // split


def ring(steps: int, stages: int, fetch, loaded, compute, carry=None):
    """``compute(step, slot, carry) -> carry`` over ``steps``, ``fetch(step, slot)``
    issuing a step's TMA loads onto barrier ``loaded.at[slot]`` ``stages`` steps ahead
    (a hand-written ring of stages, where ``emit_pipeline`` cannot express the copies:
    several boxes into one tile, tiles from strided columns). A slot is refilled after
    ``compute``, which must end with ``commit_smem`` (every thread's reads of it done)."""
    stages = min(stages, steps)
    for step in range(stages):
        fetch(step, step)

    def body(step, carry):
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(loaded.at[slot])
        carry = compute(step, slot, carry)
        pl.when(step + stages < steps)(lambda: fetch(step + stages, slot))
        return carry

    return lax.fori_loop(0, steps, body, carry)


def padded_tokens(t: int) -> int:
    """T rounded up to a whole number of token blocks."""
    return -(-t // BT) * BT


def coeffs_in(h: jax.Array) -> jax.Array:
    """(T, K) per-token coefficients -> (K, T_pad) fp32, zero past T."""
    t = h.shape[0]
    return jnp.pad(h.astype(F32), ((0, padded_tokens(t) - t), (0, 0))).T


def coeffs_out(h_t: jax.Array, t: int) -> jax.Array:
    """(K, T_pad) kernel output -> (T, K)."""
    return h_t[:, :t].T


def interpret_params(interpret: bool):
    """``plgpu.kernel``'s ``interpret``: the GPU interpreter, with race detection."""
    return plgpu.InterpretGPUParams(detect_races=True) if interpret else None


def block_slices(bc: int) -> tuple:
    """(rows, cols) of this block's tile in a kernel gridded over ("t", "c") blocks."""
    return pl.ds(lax.axis_index("t") * BT, BT), pl.ds(lax.axis_index("c") * bc, bc)


def swizzled(cols: int, itemsize: int = 2) -> tuple:
    """Tiling and swizzle transforms for shared-memory tiles whose rows are ``cols``
    values of ``itemsize`` bytes wide (the widest swizzle such a row fills): WGMMA-layout
    loads and stores are then free of bank conflicts, and wgmma takes them as operands."""
    swizzle = min(128, cols * itemsize)
    # jax declares transform_array with an empty body, which mypy takes as abstract
    tiling = plgpu.TilingTransform((8, swizzle // itemsize))  # type: ignore[abstract]
    return tiling, plgpu.SwizzleTransform(swizzle)  # type: ignore[abstract]


def tile_smem(shape: tuple, dtype) -> pl.MemoryRef:
    """Shared memory for (..., BT, bc) stream tiles, swizzled along bc (``swizzled``);
    TMA copies lay tiles out so."""
    return plgpu.SMEM(shape, dtype, transforms=swizzled(shape[-1], jnp.dtype(dtype).itemsize))


def load_row(ref) -> jax.Array:
    """(BT,) fp32 values of a (BT,) shared-memory row, laid out to broadcast over columns."""
    return plgpu.load(ref, layout=ROW)


def load_tile(ref) -> jax.Array:
    """(BT, bc) tile of a shared-memory ref as fp32 registers."""
    return plgpu.load(ref, layout=TILE).astype(F32)


def across(row: jax.Array, bc: int) -> jax.Array:
    """(BT,) per-token values broadcast to a (BT, bc) tile."""
    return jax.lax.broadcast_in_dim(row, (BT, bc), [0])
