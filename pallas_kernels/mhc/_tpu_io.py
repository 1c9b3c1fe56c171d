"""Block specs and compiler parameters shared by the Mosaic TPU kernels.

Every TPU kernel is gridded over token blocks only; a block holds whole rows
(all n*C values of a token), so each block's last dimension is the array's
full width and its row count a multiple of 16 (or all of T): TPU-legal for
bf16 and fp32. Constant operands (phi^T parts, the lane table) are one
full-extent block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mhc import blocks


def rows_spec(bt: int, width: int) -> pl.BlockSpec:
    return pl.BlockSpec((bt, width), lambda i: (i, 0))


def full_spec(shape) -> pl.BlockSpec:
    return pl.BlockSpec(tuple(shape), lambda i: (0,) * len(shape))


def partial_spec(kp: int) -> pl.BlockSpec:
    """One (1, 8, kp) per-token-block partial-sum slot (8 sublanes for a legal tile)."""
    return pl.BlockSpec((1, 8, kp), lambda i: (i, 0, 0))


def row_bytes(*arrays) -> int:
    """Bytes per token of the row-blocked operands (arrays or ShapeDtypeStructs, (T, w))."""
    return sum(a.shape[1] * jnp.dtype(a.dtype).itemsize for a in arrays)


def const_bytes(*arrays) -> int:
    return sum(a.size * jnp.dtype(a.dtype).itemsize for a in arrays)


def plan(t: int, rows: int, consts: int, name: str, sequential: bool = False):
    """(bt, grid, CompilerParams) for a kernel moving ``rows`` bytes per token."""
    bt = blocks.tpu_token_block(t, rows, name)
    params = pltpu.CompilerParams(
        dimension_semantics=("arbitrary" if sequential else "parallel",),
        vmem_limit_bytes=blocks.tpu_vmem_limit(bt, rows, consts, name),
    )
    return bt, (pl.cdiv(t, bt),), params


def valid_rows(bt: int, t: int) -> jax.Array:
    """(bt, 1) bool: rows of this block below t (a last partial block holds garbage)."""
    return pl.program_id(0) * bt + lax.broadcasted_iota(jnp.int32, (bt, 1), 0) < t


def lane_index(width: int) -> jax.Array:
    """(1, width) int32 lane numbers (Mosaic needs 2-D iotas)."""
    return lax.broadcasted_iota(jnp.int32, (1, width), 1)
