"""Runs 24-25 (NOTES.md): the per-kernel difference between two traced variants.

    python experiments/results/mosaic_gpu/h200/v10_diff_profiles.py TRACE_A TRACE_B

TRACE_A and TRACE_B are ``step_overhead.py --profile_dir`` folders of 3 traced steps.
"""

import sys

from mhc_jax import profiles as gpu_profile


def main(a: str, b: str) -> None:
    sa, sb = (gpu_profile.summarise(d, steps=3, top=100000) for d in (a, b))
    print("by category", a, sa["by_category"])
    print("by category", b, sb["by_category"])
    ta, tb = dict(sa["top"]), dict(sb["top"])
    diff = {k: tb.get(k, 0.0) - ta.get(k, 0.0) for k in set(ta) | set(tb)}
    print(f"kernels differing by > 0.2 ms per step ({b} minus {a}):")
    for k, d in sorted(diff.items(), key=lambda kv: -abs(kv[1])):
        if abs(d) > 0.2:
            before, after, cat = ta.get(k, 0), tb.get(k, 0), gpu_profile.category(k)
            print(f"{d:+8.2f}  {before:7.2f} -> {after:7.2f}  [{cat}] {k[:110]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
