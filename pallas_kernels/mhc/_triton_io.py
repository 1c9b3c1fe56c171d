"""Masked ref access shared by the Triton kernels (refs are whole arrays)."""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

F32 = jnp.float32


def row_mask(t0, bt, t):
    """(bt, 1): rows t0 .. t0+bt-1 that exist in an array of t rows."""
    return (t0 + jnp.arange(bt) < t)[:, None]


def col_mask(c0, bc, c):
    """(1, bc): columns c0 .. c0+bc-1 below c."""
    return (c0 + jnp.arange(bc) < c)[None, :]


def load_f32(ref, t0, bt, col, bc, mask):
    """(bt, bc) tile of a 2-D ref at rows t0.., columns col.., masked lanes 0, as fp32."""
    return plgpu.load(ref.at[pl.ds(t0, bt), pl.ds(col, bc)], mask=mask, other=0.0).astype(F32)


def coeff_columns(h_ref, t0, bt, rows, count):
    """Columns 0..count-1 of a (T, count) coefficient array as (bt, 1) fp32 values."""
    return [load_f32(h_ref, t0, bt, k, 1, rows) for k in range(count)]


def store_columns(ref, t0, bt, rows, values):
    """Writes (bt, 1) values as the columns of a (T, len(values)) array."""
    width = pl.next_power_of_2(len(values))
    lane = jnp.arange(width)[None, :]
    out = sum(jnp.where(lane == k, v, 0.0) for k, v in enumerate(values))
    plgpu.store(ref.at[pl.ds(t0, bt), pl.ds(0, width)], out, mask=rows & (lane < len(values)))
