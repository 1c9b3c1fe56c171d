"""Bandwidth of post-res's memory traffic alone, by TMA tile shape (Pallas Mosaic GPU).

A kernel moves what post-res's forward moves, n stream tiles and f's tile in and n
stream tiles out per step, with no math: each output tile is stored by TMA straight
from the shared memory its input arrived in (``out[i] = x[i]``; f is read and
dropped). Only the tiles' shape changes between rows, so the rows show what the
access shape alone costs: the Mosaic kernels use (64 tokens, 64 columns) tiles, whose
rows are 128-byte segments 2nC bytes apart, where Triton's post-res moves 4 x 512.

    python experiments/benchmarks/access_shape.py [--tokens 32768] [--hidden 4096] \\
        [--shapes 64x64 32x128 16x256 8x512] [--stages 3]

Each row: ms per call (median, as ``kernels.py``) and the fraction of the copy
ceiling (``mhc_jax.benchmarking``) at (2n + 1) (T, C) bf16 slabs. A last row moves 8 x 512
regions as 8 boxes of (8, 64) each into (64, 64) tiles (``sliced_copy``), the way a
kernel can keep its (64, 64) register code while reading 1 KiB of each token row.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mhc import _mosaic_io as io

BF16 = jnp.bfloat16
SHAPES = ("64x64", "32x128", "16x256", "8x512")
SLICE_COLUMNS = 512  # columns of one token row per step in ``sliced_copy``


def parse_shape(text: str) -> tuple[int, int]:
    """'ROWSxCOLS' -> (rows, cols); ValueError naming the text otherwise."""
    try:
        rows, cols = (int(v) for v in text.split("x"))
    except ValueError:
        raise ValueError(f"--shapes: {text!r} must be ROWSxCOLS, e.g. 64x64") from None
    if rows % 8 or cols % 64:
        raise ValueError(f"--shapes: {text!r} needs rows a multiple of 8, cols of 64")
    return rows, cols


def fitting_stages(n: int, shape: tuple[int, int], stages: int) -> int:
    """The most pipeline stages up to ``stages`` whose n + 1 bf16 tiles fit io.SMEM_BYTES
    (at least 2: a slot is released one step late); ValueError if 2 do not fit."""
    stage = (n + 1) * shape[0] * shape[1] * 2
    fits = min(stages, io.SMEM_BYTES // stage)
    if fits < 2:
        raise ValueError(f"tile {shape}: two stages of {n + 1} tiles exceed {io.SMEM_BYTES} bytes")
    return fits


def stream_copy(x, f, shape: tuple[int, int], stages: int, interpret: bool = False):
    """(T, n, C) streams x and f (T, C) -> x, moved in ``shape`` tiles by TMA.

    One block per token block pipelines its rows' columns; tile i of a step is
    stored from its input slot, which the pipeline refills one step later
    (``delay_release``), after the store has read it."""
    t, n, c = x.shape
    rows, cols = shape
    tiles = io.swizzled(cols)
    spec = plgpu.BlockSpec((rows, cols), lambda j: (0, j), transforms=tiles, delay_release=1)

    def body(x_ref, f_ref, o_ref):
        block = pl.ds(lax.axis_index("t") * rows, rows)

        def step(idx, *smems):
            span = pl.ds(idx[0] * cols, cols)
            for i in range(n):
                plgpu.copy_smem_to_gmem(smems[i], o_ref.at[block, i, span])
            # the previous step's stores have read the slot the pipeline refills next
            plgpu.wait_smem_to_gmem(n, wait_read_only=True)

        plgpu.emit_pipeline(
            step, grid=(c // cols,), in_specs=[spec] * (n + 1), max_concurrent_steps=stages
        )(*(x_ref.at[block, i] for i in range(n)), f_ref.at[block])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(pl.cdiv(t, rows),),
        grid_names=("t",),
        interpret=io.interpret_params(interpret),
    )(x, f)


def sliced_copy(x, f, stages: int, interpret: bool = False):
    """``stream_copy`` of 8-token x 512-column regions, each brought in as 8 TMA boxes
    of (8, 64) into the row slices 8j .. 8j + 7 of one (64, 64) tile (row 8j + r:
    token r's columns 64j .. 64j + 63), and stored back the same way: the (64, 64)
    tiles the kernels' register code takes, with 1 KiB of each token row per step.

    A hand-written ring of ``stages`` slots (``emit_pipeline``'s block specs take one
    box per tile); a slot is refilled once its stores have read it."""
    t, n, c = x.shape
    if c % SLICE_COLUMNS:
        raise ValueError(f"sliced_copy: C={c} must be a multiple of {SLICE_COLUMNS}")
    steps, boxes = c // SLICE_COLUMNS, SLICE_COLUMNS // 64
    stages = min(stages, steps)

    def body(x_ref, f_ref, o_ref, tiles, loaded):
        rows = pl.ds(lax.axis_index("t") * 8, 8)
        srcs = [x_ref.at[rows, i] for i in range(n)] + [f_ref.at[rows]]

        def box(step, j):
            return pl.ds(step * SLICE_COLUMNS + 64 * j, 64)

        def fetch(step, slot):
            for i, src in enumerate(srcs):
                for j in range(boxes):
                    dst = tiles.at[slot, i, pl.ds(8 * j, 8)]
                    plgpu.copy_gmem_to_smem(src.at[:, box(step, j)], dst, loaded.at[slot])

        for step in range(stages):
            fetch(step, step)

        @pl.loop(0, steps)
        def _(step):
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(loaded.at[slot])
            for i in range(n):
                for j in range(boxes):
                    src = tiles.at[slot, i, pl.ds(8 * j, 8)]
                    plgpu.copy_smem_to_gmem(src, o_ref.at[rows, i, box(step, j)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the slot is read
            pl.when(step + stages < steps)(lambda: fetch(step + stages, slot))

        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(x.shape, x.dtype),
        scratch_types=[
            io.tile_smem((stages, n + 1, 64, 64), x.dtype),
            plgpu.Barrier(num_arrivals=(n + 1) * boxes, num_barriers=stages),
        ],
        grid=(pl.cdiv(t, 8),),
        grid_names=("t",),
        interpret=io.interpret_params(interpret),
    )(x, f)


def main() -> None:
    from mhc_jax.benchmarking import ceiling as copy_ceiling_of
    from mhc_jax.benchmarking import measure, timeit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    shapes = [parse_shape(s) for s in args.shapes]
    form, ceiling = copy_ceiling_of(measure(reps=args.reps))
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
    print(f"copy ceiling (read + write): {ceiling / 1e9:.0f} GB/s ({form})")
    t, n, c = args.tokens, args.streams, args.hidden
    keys = jax.random.split(jax.random.key(0))
    x = jax.random.normal(keys[0], (t, n, c), BF16)
    f = jax.random.normal(keys[1], (t, c), BF16)
    nbytes = (2 * n + 1) * t * c * 2
    print(f"{'tile':>16} {'stages':>6} {'ms':>8} {'GB/s':>6} {'copy':>5}")
    runs = [(f"{r:>3}x{cl:<4}", (r, cl), stream_copy) for r, cl in shapes]
    runs.append(("8x512 in 8 boxes", (64, 64), lambda x, f, _, k: sliced_copy(x, f, k)))
    for label, (rows, cols), copy in runs:
        try:
            stages = fitting_stages(n, (rows, cols), args.stages)
            fn = jax.jit(lambda x, f, c=copy, s=(rows, cols), k=stages: c(x, f, s, k))
            if not bool(jnp.array_equal(fn(x, f), x)):
                raise AssertionError("the copy differs from its input")
            sec = timeit(fn, x, f, reps=args.reps)
        except Exception as err:  # report and go on: one shape must not sink the run
            print(f"{label} FAILED {err!r:.300}")
            continue
        rate = nbytes / sec
        print(f"{label:>16} {stages:6d} {sec * 1e3:8.3f} {rate / 1e9:6.0f} {rate / ceiling:5.2f}")


if __name__ == "__main__":
    main()
