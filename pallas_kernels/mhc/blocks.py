"""Block sizes of the mHC kernels, keyed on (n, C, dtype) and the token count T.

GPU (Triton; every block dimension a power of two):

| kernel            | tokens BT                | columns BC            | warps | notes
|-------------------|--------------------------|-----------------------|-------|------------------
| mapping proj fwd  | 64 (>= 16 for tl.dot)    | 128 (64 fp32), /2 n>4 | 4/8   | grid (T/BT, spans)
| mapping coef fwd  | 32 (16 if n > 4)         | -                     | 4     | Sinkhorn
| mapping coef bwd  | 16 (8 if n > 4)          | -                     | 4     | Sinkhorn VJP
| mapping dx        | 32 (>= 16 for tl.dot)    | 128 (64 if n > 4)     | 4     | grid (T/BT, C/1024)
| pre fwd           | 2048 / BC                | min(512, C)           | 4     | grid (T/BT, C/BC)
| pre bwd           | 1024 / BC                | min(256, C)           | 4     | loop over C
| post-res fwd      | 2048 / BC (1024 if n>4)  | min(512, C)           | 4     | grid (T/BT, C/BC)
| post-res bwd      | 1024 / BC (512 if n>4)   | min(256, C)           | 4     | loop over C

BT is capped at next_pow2(T) and BC at next_pow2(C), but not below 16 where
tl.dot needs it (every dot dimension >= 16); C and T need not be multiples of
the blocks: loads and stores are masked. The mapping projection's BT = 64 keeps
phi's re-reads from L2 (kp * n*C * 2 parts * 2 bytes per token block) at about
the size of the x traffic; each program covers ``span`` = 4096 of the n*C
columns (n*C/4096 programs per token block), so that the grid keeps every SM busy
at large C and few tokens, where one program per token block would not.
The mapping dx kernel loops over the column blocks of a 1024-column span and,
in each, over the n streams of its (BT, BC) tile, so dy, c_x and h_pre are read
once per span and dli once per tile; (32, 128, 3 stages, span 1024) is among the
fastest of ``kernels.py --mode sweep``'s candidates at both end-to-end shapes (the
figures: docs/benchmarks.md, experiments/results/step_overhead_h100/NOTES.md). For n > 4
(kp = 128: four times the phi^T rows per tile) BC halves and the pipeline
keeps 2 stages, as 3 ask for 280 KB of shared memory, more than a Hopper SM has;
that size is untuned.

TPU (Mosaic): one token block holds whole rows (n*C values), so a kernel reads
x once; BT is the largest multiple of 16 (at most ``TPU_MAX_ROWS``) whose
double-buffered rows fit ``TPU_ROW_BUDGET``, or T itself when T is smaller (a
full-extent block). In-kernel loops walk each stream in static 2048-lane chunks.
Untuned: no TPU was available.
"""

from __future__ import annotations

from typing import NamedTuple

from jax.experimental import pallas as pl

from pallas_kernels.mhc.backends import UnsupportedInput

TPU_ROW_BUDGET = 16 * 2**20  # bytes of double-buffered token rows per kernel
TPU_MAX_ROWS = 512  # cap on TPU token-block rows
TPU_VMEM_CAP = 100 * 2**20  # largest vmem_limit_bytes we ask for (v5e/v5p/v6e hold >= 95 MiB)
TPU_LANES = 2048  # width of the static in-kernel chunks
TRITON_MAX_SPAN = 4096  # columns per program of the mapping projection
TRITON_DX_SPAN = 1024  # columns per program of the mapping dx kernel (a multiple of its BC)


class TritonBlocks(NamedTuple):
    bt: int
    bc: int
    num_warps: int = 4
    num_stages: int = 2
    span: int = 0  # columns per program of a kernel split over column spans


def _np2(v: int) -> int:
    return pl.next_power_of_2(max(1, v))


def _tokens(t: int, bt: int, floor: int = 1) -> int:
    return max(floor, min(bt, _np2(t)))


def _cols(c: int, bc: int, floor: int = 1) -> int:
    return max(floor, min(bc, _np2(c)))


def triton_mapping_proj(t: int, nc: int, kp: int, itemsize: int) -> TritonBlocks:
    wide = kp > 32  # n > 4: halve BC so 3 stages of x and phi tiles fit shared memory
    bc = (128 if itemsize <= 2 else 64) // (2 if wide else 1)
    return TritonBlocks(
        bt=_tokens(t, 64, 16),
        bc=bc,
        num_warps=8 if wide else 4,
        num_stages=3,
        span=max(bc, min(TRITON_MAX_SPAN, _np2(nc))),
    )


def triton_mapping_coef_fwd(t: int, kp: int) -> TritonBlocks:
    """bc is unused: the kernel reads whole (BT, kp) rows."""
    return TritonBlocks(bt=_tokens(t, 32 if kp <= 32 else 16), bc=0)


def triton_mapping_coef_bwd(t: int, kp: int) -> TritonBlocks:
    """bc is unused: the kernel reads whole (BT, kp) rows."""
    return TritonBlocks(bt=_tokens(t, 16 if kp <= 32 else 8), bc=0)


def triton_mapping_dx(t: int, c: int, kp: int = 32) -> TritonBlocks:
    bc = _cols(c, 128 if kp <= 32 else 64, 16)
    span = max(bc, min(TRITON_DX_SPAN, _np2(c)))
    # 3 stages of n > 4's (kp = 128)-row phi tiles overflow shared memory (280 KB).
    return TritonBlocks(bt=_tokens(t, 32, 16), bc=bc, num_stages=3 if kp <= 32 else 2, span=span)


def triton_pre_fwd(t: int, c: int) -> TritonBlocks:
    bc = _cols(c, 512)
    return TritonBlocks(bt=_tokens(t, max(1, 2048 // bc)), bc=bc)


def triton_pre_bwd(t: int, c: int) -> TritonBlocks:
    bc = _cols(c, 256)
    return TritonBlocks(bt=_tokens(t, max(1, 1024 // bc)), bc=bc)


def triton_post_res_fwd(t: int, n: int, c: int) -> TritonBlocks:
    bc = _cols(c, 512)
    return TritonBlocks(bt=_tokens(t, max(1, (2048 if n <= 4 else 1024) // bc)), bc=bc)


def triton_post_res_bwd(t: int, n: int, c: int) -> TritonBlocks:
    bc = _cols(c, 256)
    return TritonBlocks(bt=_tokens(t, max(1, (1024 if n <= 4 else 512) // bc)), bc=bc)


def tpu_token_block(t: int, row_bytes: int, name: str) -> int:
    """Rows per TPU block for kernels moving ``row_bytes`` per token (all blocked arrays)."""
    bt = min(TPU_MAX_ROWS, TPU_ROW_BUDGET // (2 * row_bytes)) // 16 * 16
    if bt < 16:
        raise UnsupportedInput(
            f"{name}: one token moves {row_bytes} bytes, too many for a 16-row TPU block within "
            f"{TPU_ROW_BUDGET} bytes of VMEM; use impl='xla' for this n*C"
        )
    return t if t <= bt else bt


def tpu_vmem_limit(bt: int, row_bytes: int, const_bytes: int, name: str) -> int:
    """vmem_limit_bytes for double-buffered rows plus double-buffered constant blocks."""
    need = 2 * bt * row_bytes + 2 * const_bytes + 8 * 2**20
    if need > TPU_VMEM_CAP:
        raise UnsupportedInput(
            f"{name}: needs {need} bytes of VMEM (phi^T parts of {const_bytes} bytes), above "
            f"{TPU_VMEM_CAP}; use impl='xla' for this n*C"
        )
    return max(32 * 2**20, need)


def tpu_chunks(width: int) -> list[tuple[int, int]]:
    """Static (start, size) chunks covering [0, width) in TPU_LANES pieces."""
    return [(a, min(TPU_LANES, width - a)) for a in range(0, width, TPU_LANES)]
