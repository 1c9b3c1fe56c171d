"""Sinkhorn-Knopp accuracy against float64, per logit scale and n (SPEC §5).

For random N(0, std^2) logit matrices, compares the library (``sinkhorn_knopp``)
and the kernels' coefficient math (``_coeffs.sinkhorn`` / ``sinkhorn_vjp``, run
as plain jnp) with the SPEC loop in float64 and its gradient by float64 autodiff
(``reference.sinkhorn_unrolled``: the loop on logs, which never underflows), on
random logits and on a few adversarial inputs. The tests (tests/test_sinkhorn.py)
check against a float64 loop of their own:

    python experiments/benchmarks/sinkhorn_accuracy.py --matrices=2000
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.connections.sinkhorn import sinkhorn_knopp
from pallas_kernels.mhc import _coeffs, reference

STDS = (0.1, 1.0, 3.0, 6.0, 10.0, 30.0)
NS = (1, 2, 3, 4, 8)


@functools.partial(jax.jit, static_argnums=2)
def _reference_and_vjp(t, g, num_iters):
    out, vjp = jax.vjp(lambda t: reference.sinkhorn_unrolled(t, num_iters), t)
    return out, vjp(g)[0]


def float64_reference(t, g, num_iters):
    """The SPEC loop and its VJP in float64: ``reference.sinkhorn_unrolled``, the loop
    on logs (equal in exact arithmetic, and it never underflows), and its autodiff."""
    with jax.enable_x64(True):
        t, g = jnp.asarray(t, jnp.float64), jnp.asarray(g, jnp.float64)
        return tuple(np.asarray(a) for a in _reference_and_vjp(t, g, num_iters))


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _rows(x, width):
    x = jnp.pad(x, ((0, 0), (0, 0), (0, width - x.shape[-1])))
    return tuple(x[:, i] for i in range(x.shape[1]))


def coeffs_sinkhorn(t, g, num_iters):
    """``_coeffs.sinkhorn`` and ``sinkhorn_vjp`` on (B, n, n) fp32 matrices."""
    n = t.shape[-1]
    width = 1 << (n - 1).bit_length()
    info = _coeffs.Info(None, None, None, None, jnp.arange(width, dtype=jnp.int32)[None])
    out = _coeffs.sinkhorn(_rows(t, width), info, num_iters)
    dt = _coeffs.sinkhorn_vjp(_rows(t, width), _rows(g, width), info, num_iters)
    return jnp.stack(out, 1)[..., :n], jnp.stack(dt, 1)[..., :n]


def library_sinkhorn(t, g, num_iters):
    out, vjp = jax.vjp(lambda t: sinkhorn_knopp(t, num_iters), t)
    return out, vjp(g)[0]


IMPLS = {
    "library": jax.jit(library_sinkhorn, static_argnums=2),
    "coeffs": jax.jit(coeffs_sinkhorn, static_argnums=2),
}


def random_table(matrices: int, num_iters: int, seed: int) -> list[str]:
    lines = [
        "| n | logit std | impl | max abs fwd err | frac > 1e-3 | max rel VJP err |",
        "|---|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(seed)
    for n in NS:
        for std in STDS:
            t = (rng.standard_normal((matrices, n, n)) * std).astype(np.float32)
            g = rng.standard_normal((matrices, n, n)).astype(np.float32)
            want, dwant = float64_reference(t, g, num_iters)
            for name, fn in IMPLS.items():
                out, dt = (np.asarray(a, np.float64) for a in fn(t, g, num_iters))
                err = np.abs(out - want).max(axis=(-2, -1))
                lines.append(
                    f"| {n} | {std:g} | {name} | {err.max():.1e} | {np.mean(err > 1e-3):.4f} "
                    f"| {rel_err(dt, dwant):.1e} |"
                )
    return lines


def adversarial_cases(rng, n: int) -> dict[str, np.ndarray]:
    """(B, n, n) fp32 logits where a floor or plain fp32 loop goes wrong."""
    base = rng.standard_normal((64, n, n))
    offsets = rng.choice([-2048.0, 0.0, 1024.0], (64, n, 1)) + rng.choice(
        [-1024.0, 0.0], (64, 1, n)
    )
    # -L off row 0 and column 0: entries below fp32 range after one iteration regrow
    regrow = np.ones((12, n, n)) * -np.linspace(80.0, 130.0, 12)[:, None, None]
    regrow[:, 0, :] = regrow[:, :, 0] = 0.0
    huge = rng.choice([-1e4, 0.0, 1e4], (64, n, n), p=[0.15, 0.7, 0.15])
    return {
        "rows/cols shifted by 1e3": np.round(base * 64) / 64 + offsets,
        "±1e4": rng.choice([-1e4, 1e4], (64, n, n)),
        "N(0,1) with ±1e4 entries": huge + base,
        "regrowth (tiny entries regrow)": regrow,
    }


def adversarial_table(seed: int) -> list[str]:
    lines = [
        "| n | iters | case | impl | max abs fwd err | max rel VJP err |",
        "|---|---|---|---|---|---|",
    ]
    rng = np.random.default_rng(seed)
    for n in (2, 4, 8):
        for case, t in adversarial_cases(rng, n).items():
            t = t.astype(np.float32)
            g = rng.standard_normal(t.shape).astype(np.float32)
            for num_iters in (20, 50):
                want, dwant = float64_reference(t, g, num_iters)
                for name, fn in IMPLS.items():
                    out, dt = (np.asarray(a, np.float64) for a in fn(t, g, num_iters))
                    lines.append(
                        f"| {n} | {num_iters} | {case} | {name} | {np.abs(out - want).max():.1e} "
                        f"| {rel_err(dt, dwant):.1e} |"
                    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrices", type=int, default=2000, help="random matrices per cell")
    parser.add_argument("--num_iters", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"Random N(0, std^2) logits, {args.matrices} matrices per row, {args.num_iters} iters.")
    print("VJP error: max |dt - dt64| / max |dt64| over the cell (random fp32 cotangents).\n")
    print("\n".join(random_table(args.matrices, args.num_iters, args.seed)))
    print("\nAdversarial logits vs the float64 loop in the log domain:\n")
    print("\n".join(adversarial_table(args.seed)))


if __name__ == "__main__":
    main()
