"""Run 23 (NOTES.md): the split and cluster Mosaic GPU mapping forwards, called directly,
with 20 and 1 Sinkhorn iterations, with and without the pre; and the projection alone.

    python experiments/results/mosaic_gpu/h200/v10_bench_cluster.py   # from the repo root
"""

import jax

from mhc_jax import benchmarking as kb
from pallas_kernels.mhc import _coeffs
from pallas_kernels.mhc import mapping_cluster_mosaic as cluster
from pallas_kernels.mhc import mapping_mosaic as split
from pallas_kernels.mhc._common import Static, phi_parts


def times(t: int, c: int, n: int = 4) -> list[tuple]:
    d = kb.connection_operands(t, n, c)
    kp = _coeffs.packed_width(n, "mosaic_gpu")
    info = _coeffs.column_info(n, kp, d["bias"], d["alpha"])
    x2 = d["x"].reshape(t, n * c)
    parts = phi_parts(d["phi"], kp, x2.dtype)
    consts = cluster.constants(info, n)
    rows = []
    for iters in (20, 1):
        static = Static(num_iters=iters)
        for pre in (True, False):
            kw = dict(n=n, c=c, with_pre=pre, static=static)
            one = jax.jit(lambda x2, parts, consts, kw=kw: cluster.fwd(x2, parts, consts, **kw))
            two = jax.jit(lambda x2, parts, info, kw=kw: split.fwd(x2, parts, info, **kw))
            ms_split = kb.timeit(two, x2, parts, info, reps=20) * 1e3
            ms_cluster = kb.timeit(one, x2, parts, consts, reps=20) * 1e3
            rows.append((t, c, iters, pre, f"{ms_split:.3f}", f"{ms_cluster:.3f}"))
    proj = jax.jit(lambda x2, parts: split.proj(x2, parts, n=n, static=Static()))
    rows.append((t, c, "proj", "-", f"{kb.timeit(proj, x2, parts, reps=20) * 1e3:.3f}", "nan"))
    return rows


def main() -> None:
    print("| T | C | sinkhorn iters | pre | split ms | cluster ms |")
    for t, c in ((32768, 4096), (8192, 4096)):
        for row in times(t, c):
            print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
