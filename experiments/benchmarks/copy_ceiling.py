"""The device's copy ceiling: the best read + write bandwidth of several copy forms
(``mhc_jax.benchmarking``; docs/benchmarks.md has the measured figures).

    python experiments/benchmarks/copy_ceiling.py [--sizes_mib 256 1024] [--reps 20]
"""

import argparse

import jax

from mhc_jax.benchmarking import ceiling, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes_mib", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    rates = measure(args.sizes_mib, args.reps)
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
    for name, rate in rates.items():
        print(f"{name:36s} {rate / 1e9:8.0f} GB/s")
    form, rate = ceiling(rates)
    print(f"ceiling: {rate / 1e9:.0f} GB/s ({form})")


if __name__ == "__main__":
    main()
