"""Run 26 (NOTES.md, "Tiling B"): a lower bound for tiling B's mapping forward, measured.

Tiling B keeps a few whole token rows per CTA and streams phi past them. The smallest
wgmma N is 8, so a CTA holds 8 rows: x^T (64-column chunks, 8 tokens) is wgmma's B
operand and phi^T's hi and lo parts, stacked into one (64, 64) tile per chunk, its A.
Each CTA then takes in all of phi's 128 * n * C bytes for its 8 tokens' 16 * n * C
bytes of x: 8 times its x bytes. A cluster's multicast divides the L2 reads of phi by
the cluster size, not the bytes each SM's shared memory receives.

This kernel does only what tiling B cannot avoid: load its 8 rows once, stream phi
(multicast across a cluster of S CTAs, a ring of STAGES slots released by a cluster
barrier), run the wgmmas and store the (64, 8) fp32 accumulator. No sum of squares, no
Sinkhorn epilogue, no pre. Its time is a lower bound on tiling B's mapping + pre; the
script prints it beside the split forward's projection and mapping + pre.

    python experiments/results/mosaic_gpu/h200/v13_bench_tiling_b.py          # H200
    python experiments/results/mosaic_gpu/h200/v13_bench_tiling_b.py --check  # CPU interpreter
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mhc import _coeffs
from pallas_kernels.mhc import _mosaic_io as io
from pallas_kernels.mhc import mapping_mosaic as split
from pallas_kernels.mhc._common import Static, phi_parts

F32 = jnp.float32
ROWS = 8  # tokens per CTA: wgmma's smallest N
CHUNK = 64  # columns per step: one 128-byte swizzle row of bf16


def rows_projection(x2, phi_cat, *, cluster: int, stages: int, interpret: bool = False):
    """(T / 8, 64, 8) fp32: per CTA, phi_cat (64, n*C) @ x2[rows]^T (n*C, 8).

    Args:
      x2: (T, n*C) bf16, T a multiple of 8 * cluster.
      phi_cat: (64, n*C) bf16, phi^T's hi part (kp rows) over its lo part (kp rows).
    """
    t, nc = x2.shape
    steps = nc // CHUNK
    stages = min(stages, steps)
    ctas = t // ROWS

    def body(x_ref, phi_ref, out_ref, consumed):
        cta = lax.axis_index("b") * cluster + lax.axis_index("s")
        rows = pl.ds(cta * ROWS, ROWS)

        def scoped(x_smem, phi_smem, out_smem, x_loaded, phi_loaded):
            def load_row_chunk(j, carry):
                src = x_ref.at[rows, pl.ds(j * CHUNK, CHUNK)]
                plgpu.copy_gmem_to_smem(src, x_smem.at[j], x_loaded)
                return carry

            lax.fori_loop(0, steps, load_row_chunk, 0)

            def fetch(step, slot):  # every CTA of the cluster issues its share
                src = phi_ref.at[:, pl.ds(step * CHUNK, CHUNK)]
                plgpu.copy_gmem_to_smem(
                    src, phi_smem.at[slot], phi_loaded.at[slot], collective_axes="s"
                )

            for step in range(stages):
                fetch(step, step)
            plgpu.barrier_wait(x_loaded)

            def project(acc_ref):
                def step_body(step, carry):
                    slot = lax.rem(step, stages)
                    plgpu.barrier_wait(phi_loaded.at[slot])
                    plgpu.wgmma(acc_ref, phi_smem.at[slot], x_smem.at[step].T)
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(consumed.at[slot])  # at every CTA of the cluster

                    @pl.when(step + stages < steps)
                    def _():
                        plgpu.barrier_wait(consumed.at[slot])  # the whole cluster is done
                        fetch(step + stages, slot)

                    return carry

                lax.fori_loop(0, steps, step_body, 0)
                for step in range(max(0, steps - stages), steps):  # arrivals not yet awaited
                    plgpu.barrier_wait(consumed.at[step % stages])
                out_smem[...] = acc_ref[...]

            pl.run_scoped(project, plgpu.ACC((64, ROWS), F32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, out_ref.at[cta])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scoped,
            io.tile_smem((steps, ROWS, CHUNK), x2.dtype),
            io.tile_smem((stages, 64, CHUNK), x2.dtype),
            io.tile_smem((64, ROWS), F32),
            plgpu.Barrier(num_arrivals=steps),
            plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        )

    return plgpu.kernel(
        body,
        kernel_name="tiling_b_rows_projection",
        out_type=jax.ShapeDtypeStruct((ctas, 64, ROWS), F32),
        scratch_types=[
            plgpu.ClusterBarrier(collective_axes=("s",), num_arrivals=1, num_barriers=stages)
        ],
        grid=(ctas // cluster,),
        grid_names=("b",),
        cluster=(cluster,),
        cluster_names=("s",),
        compiler_params=io.LANE,
        interpret=io.interpret_params(interpret),
    )(x2, phi_cat)


def inputs(t: int, c: int, n: int = 4):
    kx, kp = jax.random.split(jax.random.key(t + c))
    x2 = jax.random.normal(kx, (t, n * c), F32).astype(jnp.bfloat16)
    phi = jax.random.normal(kp, (n * c, _coeffs.width(n)), F32) / np.sqrt(n * c)
    kpad = _coeffs.packed_width(n, "mosaic_gpu")
    parts = phi_parts(phi, kpad, x2.dtype)
    if len(parts) != 2 or 2 * kpad != 64:
        raise ValueError(f"n={n}: the stacked A tile needs 2 parts of 32 rows")
    return x2, parts, jnp.concatenate(parts), phi, kpad


def check(t: int, c: int, cluster: int, interpret: bool) -> float:
    """Largest relative error of the kernel's (hi + lo) projection against fp32 x @ phi."""
    x2, _, phi_cat, phi, kpad = inputs(t, c)
    out = rows_projection(x2, phi_cat, cluster=cluster, stages=3, interpret=interpret)
    got = (out[:, :kpad] + out[:, kpad:]).transpose(0, 2, 1).reshape(t, kpad)[:, : phi.shape[1]]
    want = jnp.dot(x2.astype(F32), phi, precision="highest")
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="CPU interpreter check only")
    args = parser.parse_args()
    if args.check:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

        for cluster in (1, 2):
            err = check(32, 128, cluster, True)
            races = gpu_callbacks.get_races().races_found
            print(f"interpreter, cluster {cluster}: rel err {err:.2e}, races {races}")
        return
    from mhc_jax import benchmarking as kb

    for cluster in (1, 8):
        err = check(1024, 1280, cluster, False)
        print(f"native, cluster {cluster}: rel err {err:.2e}")
        assert err < 1e-2, err
    print("| T | C | split proj ms | split mapping+pre ms | B bound ms, S=1 | S=2 | S=4 | S=8 |")
    for t, c in ((8192, 1280), (32768, 1280), (8192, 2048), (32768, 2048)):
        x2, parts, phi_cat, phi, kpad = inputs(t, c)
        info = _coeffs.column_info(4, kpad, jnp.zeros(24), jnp.ones(3))
        proj = jax.jit(lambda x2, parts: split.proj(x2, parts, n=4, static=Static()))
        fwd = jax.jit(
            lambda x2, parts, info, c=c: split.fwd(
                x2, parts, info, n=4, c=c, with_pre=True, static=Static()
            )
        )
        row = [t, c, kb.timeit(proj, x2, parts, reps=20), kb.timeit(fwd, x2, parts, info, reps=20)]
        for cluster in (1, 2, 4, 8):
            b = jax.jit(lambda x2, p, s=cluster: rows_projection(x2, p, cluster=s, stages=4))
            row.append(kb.timeit(b, x2, phi_cat, reps=20))
        print("| " + " | ".join([str(t), str(c)] + [f"{v * 1e3:.3f}" for v in row[2:]]) + " |")


if __name__ == "__main__":
    main()
