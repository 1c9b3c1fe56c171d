"""Post-res-apply kernels (SPEC §7.3), Pallas Mosaic GPU backend (Hopper).

Forward ``x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] f``; backward
``dx[j] = sum_i h_res[i, j] dxn[i]``, ``df = sum_i h_post[i] dxn[i]``,
``dh_res[i, j] = <dxn[i], x[j]>`` and ``dh_post[i] = <dxn[i], f>``.

Both kernels stream: one block per (token group, column span) runs a ring of stages
over its span's column steps (``_ring``: TMA brings the next steps' tiles while this
one's are used), builds each output tile from the shared-memory tiles (loaded once
per step where registers hold them, HOLD_BYTES) and stores it by TMA from a separate
buffer, so that the stores of one step overlap the next step's math. A (64, chunk)
tile holds 64 tokens, or a group of TILE_TOKENS tokens' consecutive chunks. The
backward carries the coefficient gradients of its tile rows in registers and leaves
them per span; outside they are summed over spans and a token's rows, in a fixed
order. See ``_mosaic_io`` for the tiles.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mhc import _mosaic_io as io
from pallas_kernels.mhc._common import post_res_op
from pallas_kernels.mhc.backends import UnsupportedInput

F32 = jnp.float32
# (chunk columns, chunks in flight, output buffers), preferred first: 128-byte rows of
# 16-bit values, loads of two chunks in flight, stores overlapping the next chunk (16
# columns: the backward's fp32 tiles at n = 8).
CANDIDATES = (
    (64, 3, 2), (64, 2, 2), (64, 2, 1), (32, 3, 2), (32, 2, 2), (32, 2, 1), (16, 2, 1),
)  # fmt: skip


# Tokens per (64, chunk) tile. 64: one TMA box per tile, 128-byte rows
# 2nC bytes apart. Fewer: the tile holds 64 / TILE_TOKENS boxes of (TILE_TOKENS, chunk),
# one token group's consecutive column chunks, row b * TILE_TOKENS + r holding token
# r's chunk b, so each step reads 64 / TILE_TOKENS chunks of every token row in a row.
# 64 by default: longer rows per token speed up TMA alone but not these kernels, whose
# time goes to the register work and stores (experiments/results/mosaic_gpu/NOTES.md).
TILE_TOKENS = 64
# Operand tiles whose step holds at most this many bytes per token row (n * chunk *
# itemsize) are loaded from shared memory once per step and widened to fp32 per use;
# wider ones are loaded per use (registers would spill).
HOLD_BYTES = 512


def _operands(smems, chunk: int) -> list:
    """Per shared-memory tile, a function giving it as fp32 registers (see HOLD_BYTES)."""
    if len(smems) * chunk * smems[0].dtype.itemsize <= HOLD_BYTES:
        held = [plgpu.load(ref, layout=io.TILE) for ref in smems]
        return [lambda tile=tile: tile.astype(F32) for tile in held]
    return [lambda ref=ref: io.load_tile(ref) for ref in smems]


@dataclasses.dataclass(frozen=True)
class Plan:
    """One kernel's tiling: ``span`` columns of C per block in ``chunk``-column steps,
    ``stages`` chunks of input tiles in shared memory, ``outs`` output buffers."""

    chunk: int
    span: int
    stages: int
    outs: int
    tokens: int = io.BT  # per tile (see TILE_TOKENS)

    @property
    def boxes(self) -> int:
        """TMA boxes of (tokens, chunk) per (64, chunk) tile."""
        return io.BT // self.tokens


def plan(
    name: str, t: int, c: int, in_bytes: int, out_bytes: int, fixed: int, tokens: int = io.BT
) -> Plan:
    """The first of CANDIDATES whose tiles fit: ``in_bytes`` and ``out_bytes`` are the
    bytes of one column of a step's input and output tiles (all streams, BT tokens),
    ``fixed`` the kernel's other shared memory; tiles of ``tokens`` tokens where C is a
    whole number of their io.BT // tokens chunks, else of the fewest more that divide.

    Raises:
      UnsupportedInput: C not a multiple of 32, or no candidate fits.
    """
    # a C that is not a whole number of the tiles' chunks takes taller tiles (fewer boxes)
    taller = [tk for tk in (8, 16, 32, io.BT) if tk >= tokens]
    for (chunk, stages, outs), tile_tokens in itertools.product(CANDIDATES, taller):
        fits = fixed + chunk * (stages * in_bytes + outs * out_bytes) <= io.SMEM_BYTES
        width = chunk * (io.BT // tile_tokens)  # columns of C per step
        if c % 32 == 0 and c % width == 0 and fits:
            span = io.span_columns(t, c, width, tile_tokens)
            return Plan(chunk, span, stages, outs, tile_tokens)
    raise UnsupportedInput(
        f"{name}: C={c} with {in_bytes + out_bytes} bytes of tiles per column: the Mosaic GPU "
        f"kernels need C a multiple of 32 and one 32-column step within {io.SMEM_BYTES} bytes "
        "of shared memory; use impl='xla' or the Triton kernels"
    )


def _columns(p: Plan, s, step, b):
    """Columns of C in chunk b of a step of span s."""
    return pl.ds(s * p.span + step * p.chunk * p.boxes + b * p.chunk, p.chunk)


def _box(p: Plan, tile, b):
    """The rows of a (64, chunk) tile that box b fills."""
    return tile.at[pl.ds(b * p.tokens, p.tokens)]


def _store(p: Plan, tile, dst, s, step) -> None:
    """TMA of a (64, chunk) tile to its step's columns of dst, a (tokens, C) view."""
    for b in range(p.boxes):
        plgpu.copy_smem_to_gmem(_box(p, tile, b), dst.at[:, _columns(p, s, step, b)])


def _coeff_rows(hr_ref, hp_ref, hr_smem, hp_smem, group, bar) -> None:
    """This token group's h_res and h_post rows (``coeff_tiles``) into shared memory."""
    plgpu.copy_gmem_to_smem(hr_ref.at[:, group], hr_smem, bar)
    plgpu.copy_gmem_to_smem(hp_ref.at[:, group], hp_smem, bar)
    plgpu.barrier_wait(bar)


def _ring(p: Plan, s, stages: int, srcs, slots, loaded, compute, carry=None):
    """``_mosaic_io.ring`` over the span's steps: srcs[k] is a (tokens, C) view whose
    chunks go to the tile ``slots[k](slot)``."""

    def fetch(step, slot):
        for src, tile in zip(srcs, slots, strict=True):
            for b in range(p.boxes):
                dst = _box(p, tile(slot), b)
                plgpu.copy_gmem_to_smem(src.at[:, _columns(p, s, step, b)], dst, loaded.at[slot])

    return io.ring(p.span // (p.chunk * p.boxes), stages, fetch, loaded, compute, carry)


def _stages(p: Plan) -> int:
    return min(p.stages, p.span // (p.chunk * p.boxes))


def coeff_tiles(h: jax.Array, tokens: int) -> jax.Array:
    """(T, K) per-token coefficients -> (K, G, BT) fp32 for tiles of ``tokens`` tokens
    (G groups, zero past T): row b * tokens + r of group g holds token g * tokens + r."""
    t, k = h.shape
    groups = pl.cdiv(t, tokens)
    h = jnp.pad(h.astype(F32), ((0, groups * tokens - t), (0, 0))).reshape(groups, tokens, k)
    return jnp.tile(h, (1, io.BT // tokens, 1)).transpose(2, 0, 1)


@io.lowered_once("static")
def fwd(h_res, h_post, x, f, static):
    """x_next (T, n, C) in x.dtype."""
    t, n, c = x.shape
    xs, fs = x.dtype.itemsize, f.dtype.itemsize
    coeffs = (n * n + n) * io.BT * 4
    in_bytes, out_bytes = io.BT * (n * xs + fs), io.BT * n * xs
    p = plan("apply_post_res", t, c, in_bytes, out_bytes, coeffs, TILE_TOKENS)
    stages = _stages(p)

    def body(hr_ref, hp_ref, x_ref, f_ref, o_ref, hr_smem, hp_smem, *scratch):
        x_smem, f_smem, o_smem, loaded, bar = scratch
        group, s = lax.axis_index("t"), lax.axis_index("s")
        rows = pl.ds(group * p.tokens, p.tokens)
        _coeff_rows(hr_ref, hp_ref, hr_smem, hp_smem, group, bar)

        def compute(step, slot, _):
            out = lax.rem(step, p.outs)
            # this buffer's stores, p.outs steps back (n * boxes groups a step), have read it
            plgpu.wait_smem_to_gmem(n * p.boxes * (p.outs - 1), wait_read_only=True)
            x_tiles = _operands([x_smem.at[slot, j] for j in range(n)], p.chunk)
            f_tile = _operands([f_smem.at[slot]], p.chunk)[0]
            for i in range(n):
                acc = io.across(io.load_row(hp_smem.at[i]), p.chunk) * f_tile()
                for j in range(n):
                    h = io.across(io.load_row(hr_smem.at[i * n + j]), p.chunk)
                    acc += h * x_tiles[j]()
                o_smem[out, i] = acc.astype(o_smem.dtype)
            plgpu.commit_smem()
            for i in range(n):
                _store(p, o_smem.at[out, i], o_ref.at[rows, i], s, step)

        srcs = [x_ref.at[rows, j] for j in range(n)] + [f_ref.at[rows]]
        slots = [lambda k, j=j: x_smem.at[k, j] for j in range(n)] + [lambda k: f_smem.at[k]]
        _ring(p, s, stages, srcs, slots, loaded, compute)
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        kernel_name="mhc_post_res_fwd_mgpu",
        out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
        scratch_types=[
            plgpu.SMEM((n * n, io.BT), F32),
            plgpu.SMEM((n, io.BT), F32),
            io.tile_smem((stages, n, io.BT, p.chunk), x.dtype),
            io.tile_smem((stages, io.BT, p.chunk), f.dtype),
            io.tile_smem((p.outs, n, io.BT, p.chunk), x.dtype),
            plgpu.Barrier(num_arrivals=(n + 1) * p.boxes, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2),
        ],
        grid=(pl.cdiv(t, p.tokens), c // p.span),
        grid_names=("t", "s"),
        compiler_params=io.LANE,
        interpret=io.interpret_params(static.interpret),
    )(coeff_tiles(h_res.reshape(t, n * n), p.tokens), coeff_tiles(h_post, p.tokens), x, f)


@io.lowered_once("static")
def bwd(h_res, h_post, x, f, dxn, static):
    """(dh_res (T, n, n), dh_post (T, n)) fp32, dx in x.dtype, df in f.dtype."""
    t, n, c = x.shape
    xs, fs, ds = x.dtype.itemsize, f.dtype.itemsize, dxn.dtype.itemsize
    coeffs = (n * n + n) * io.BT * 4  # the rows in, then their gradients out
    in_bytes, out_bytes = io.BT * (n * xs + fs + n * ds), io.BT * (n * xs + fs)
    p = plan("apply_post_res backward", t, c, in_bytes, out_bytes, coeffs, TILE_TOKENS)
    stages = _stages(p)

    def body(
        hr_ref, hp_ref, x_ref, f_ref, d_ref,  # inputs
        dx_ref, df_ref, dhr_ref, dhp_ref,  # outputs
        hr_smem, hp_smem, x_smem, f_smem, d_smem, gx_smem, gf_smem, loaded, bar,  # scratch
    ):  # fmt: skip
        group, s = lax.axis_index("t"), lax.axis_index("s")
        rows = pl.ds(group * p.tokens, p.tokens)
        _coeff_rows(hr_ref, hp_ref, hr_smem, hp_smem, group, bar)

        def compute(step, slot, dh):
            out, dh = lax.rem(step, p.outs), list(dh)
            plgpu.wait_smem_to_gmem((n + 1) * p.boxes * (p.outs - 1), wait_read_only=True)
            # (operand tile, its coefficient row for i = 0, row step in i, gradient row
            # for i = 0 in dh (dh_res's n*n rows, then dh_post's n), output tile)
            operands = [
                (x_smem.at[slot, j], hr_smem, j, n, j, gx_smem.at[out, j]) for j in range(n)
            ]
            operands.append((f_smem.at[slot], hp_smem, 0, 1, n * n, gf_smem.at[out]))
            d_tiles = _operands([d_smem.at[slot, i] for i in range(n)], p.chunk)
            for src, h_smem, k0, stride, g0, dst in operands:
                v = io.load_tile(src)
                grad = None
                for i in range(n):
                    d = d_tiles[i]()
                    dh[g0 + i * stride] += jnp.sum(d * v, axis=1)
                    term = io.across(io.load_row(h_smem.at[k0 + i * stride]), p.chunk) * d
                    grad = term if grad is None else grad + term
                dst[...] = grad.astype(dst.dtype)
            plgpu.commit_smem()
            for j in range(n):
                _store(p, gx_smem.at[out, j], dx_ref.at[rows, j], s, step)
            _store(p, gf_smem.at[out], df_ref.at[rows], s, step)
            return tuple(dh)

        srcs = [
            *(x_ref.at[rows, j] for j in range(n)),
            f_ref.at[rows],
            *(d_ref.at[rows, i] for i in range(n)),
        ]
        slots = [
            *(lambda k, j=j: x_smem.at[k, j] for j in range(n)),
            lambda k: f_smem.at[k],
            *(lambda k, i=i: d_smem.at[k, i] for i in range(n)),
        ]
        zero = plgpu.layout_cast(jnp.zeros((io.BT,), F32), io.ROW)
        dh = _ring(p, s, stages, srcs, slots, loaded, compute, (zero,) * (n * n + n))
        # per tile row (token r's box b at row b * tokens + r; summed outside): they
        # replace the coefficient rows, read for the last time above
        for k in range(n * n):
            hr_smem[k] = dh[k]
        for i in range(n):
            hp_smem[i] = dh[n * n + i]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(hr_smem, dhr_ref.at[s, :, group])
        plgpu.copy_smem_to_gmem(hp_smem, dhp_ref.at[s, :, group])
        plgpu.wait_smem_to_gmem(0)

    groups, spans = pl.cdiv(t, p.tokens), c // p.span
    dx, df, dhr_parts, dhp_parts = plgpu.kernel(
        body,
        kernel_name="mhc_post_res_bwd_mgpu",
        out_type=(
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(f.shape, f.dtype),
            jax.ShapeDtypeStruct((spans, n * n, groups, io.BT), F32),
            jax.ShapeDtypeStruct((spans, n, groups, io.BT), F32),
        ),
        scratch_types=[
            plgpu.SMEM((n * n, io.BT), F32),
            plgpu.SMEM((n, io.BT), F32),
            io.tile_smem((stages, n, io.BT, p.chunk), x.dtype),
            io.tile_smem((stages, io.BT, p.chunk), f.dtype),
            io.tile_smem((stages, n, io.BT, p.chunk), dxn.dtype),
            io.tile_smem((p.outs, n, io.BT, p.chunk), x.dtype),
            io.tile_smem((p.outs, io.BT, p.chunk), f.dtype),
            plgpu.Barrier(num_arrivals=(2 * n + 1) * p.boxes, num_barriers=stages),
            plgpu.Barrier(num_arrivals=2),
        ],
        grid=(groups, spans),
        grid_names=("t", "s"),
        compiler_params=io.LANE,
        interpret=io.interpret_params(static.interpret),
    )(coeff_tiles(h_res.reshape(t, n * n), p.tokens), coeff_tiles(h_post, p.tokens), x, f, dxn)

    def per_token(parts):  # (spans, K, G, BT) per tile row -> (T, K), a fixed order
        k = parts.shape[1]
        folded = parts.reshape(spans, k, groups, p.boxes, p.tokens).sum(axis=(0, 3))
        return folded.reshape(k, groups * p.tokens)[:, :t].T

    return per_token(dhr_parts).reshape(t, n, n), per_token(dhp_parts), dx, df


apply_post_res = io.aligned(post_res_op(fwd, bwd))
"""``apply_post_res(h_res (T, n, n), h_post (T, n), x (T, n, C), f (T, C), static)``
-> (T, n, C) in x.dtype, differentiable."""
