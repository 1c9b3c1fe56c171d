"""Times the mHC Pallas kernels against the XLA path on one accelerator.

    python experiments/benchmarks/kernels.py [--mode api|kernels|sweep] [--tokens 8192 32768]
        [--hidden 1280 2560 4096] [--streams 4] [--reps 25]
        [--impls xla triton mosaic_gpu auto] [--ops mapping connection ...]
        [--variant paper|deepseek_v4]

For each (T, C) with bf16 streams and n streams it times, for each api impl (on a
GPU "xla", "triton", "mosaic_gpu" and "auto", which takes per op the first backend
of ``backends``' order; on a TPU "xla" and "tpu"), each op's forward and
forward+backward, the mHC connection
forward+backward (mapping fused with pre,
then post-res; f and the cotangents of layer_input and x_next are inputs), the
transition between two layers (post-res of one, mapping + pre of the next) fused
(``api.transition``) beside the same two ops in turn ("post-res then pre"), and a
plain residual add forward+backward (the floor), plus a device copy for the
bandwidth ceiling (``mhc_jax.benchmarking``: the best of several copy forms and sizes, and
torch's ``copy_`` where torch and CUDA exist). Passes: 3 warm-up calls, then
``--reps`` timed samples, each the mean of 4 back-to-back calls between device syncs;
the median is printed, with the compile time of each jitted case. ``--impls`` and
``--ops`` (name prefixes) restrict the api rows.

Bytes are the compulsory traffic: every input read once and every output written
once (bf16 streams, fp32 coefficients, phi once); a kernel that re-reads x moves
more. GB/s = those bytes / time; "copy" = that over the measured copy bandwidth.
``--mode kernels`` times each Triton kernel of the connection alone (plus the
standalone pre kernels) with the same byte accounting; ``--mode sweep`` times
candidate blocks for the mapping kernels and access shapes for post-res's forward
(``--sweep NAME ...`` picks some) at the first (T, C) and prints the best (for
pallas_kernels/mhc/blocks.py);
``--mode tuned`` sweeps, installs the winners for every size and then runs the
api timings. ``--post_res_tile_tokens`` sets the Mosaic GPU post-res kernels' tiles
(64 tokens, or token groups of 8-32 with consecutive chunks of their rows);
``--mapping_forward cluster`` runs the Mosaic GPU mapping (+ pre) forward as one
cluster kernel per token block (``mapping_cluster_mosaic``) instead of split kernels.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from mhc_jax.benchmarking import ceiling, connection_operands, measure, timeit
from pallas_kernels.mhc import api, backends, blocks, mapping_mosaic, post_res_mosaic
from pallas_kernels.mhc.context import Context, MappingConfig, MappingWeights

BF16, F32 = jnp.bfloat16, jnp.float32


def copy_bandwidth(reps: int) -> float:
    """The copy ceiling (``mhc_jax.benchmarking``: the best of several copy forms), printed."""
    form, rate = ceiling(measure(reps=reps))
    print(f"copy ceiling (read + write): {rate / 1e9:.0f} GB/s ({form})")
    return rate


def _vjp_all(fn):
    """(args, cots) -> (outputs, input cotangents): one forward + backward."""

    def run(args, cots):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cots)

    return run


def cases(impl: str, d: dict, t: int, n: int, c: int, variant: str = "paper"):
    """name -> (fn, args, compulsory bytes). E = bf16 bytes of one (T, C) slab; ``variant``
    is the mapping's coefficient math (``pallas_kernels.mhc.variants``)."""
    e, coef = t * c * 2, t * 4
    phi_b = d["phi"].size * 4
    k = n * n + 2 * n
    maps = (d["x"], d["phi"], d["bias"], d["alpha"])

    def mapping(*a):
        return api.mhc_mappings(*a, variant=variant, impl=impl)

    def mapping_pre(*a):
        return api.mhc_mappings_and_pre(*a, variant=variant, impl=impl)

    def pre(h, x):
        return api.apply_pre(h, x, impl=impl)

    def post_res(hr, hp, x, f):
        return api.apply_post_res(hr, hp, x, f, impl=impl)

    def connection(x, f, phi, bias, alpha):
        li, _, h_post, h_res = mapping_pre(x, phi, bias, alpha)
        return li, post_res(h_res, h_post, x, f)

    h_cots = (d["h_pre"], d["h_post"], d["h_res"])
    post_args = (d["h_res"], d["h_post"], d["x"], d["f"])

    # layer l's post-res, then layer l+1's mapping + pre: fused (``api.transition``) and
    # as the two ops in turn; outputs layer_input and x_next (tied, as the model uses it)
    def transition(hr, hp, x, f, phi, bias, alpha):
        ctx = Context(d["h_pre"], hp, hr, x)
        config = MappingConfig(variant=variant)
        li, nxt = api.transition(ctx, f, MappingWeights(phi, bias, alpha), config, impl=impl)
        return li, nxt.streams

    def post_res_then_pre(hr, hp, x, f, phi, bias, alpha):
        x_next = post_res(hr, hp, x, f)
        outs = api.mhc_mappings_and_pre(
            x_next, phi, bias, alpha, tied_streams=True, variant=variant, impl=impl
        )
        return outs[0], outs[-1]

    both = (*post_args, d["phi"], d["bias"], d["alpha"])
    two_layer_cases = {}
    for name, fn in (("transition", transition), ("post-res then pre", post_res_then_pre)):
        two_layer_cases[f"{name} fwd"] = (fn, both, (2 * n + 2) * e + phi_b)
        two_layer_cases[f"{name} fwd+bwd"] = (
            _vjp_all(fn),
            (both, (d["d_li"], d["d_xn"])),
            (4 * n + 4) * e + 2 * phi_b,
        )

    return {
        "mapping fwd": (mapping, maps, n * e + phi_b + k * coef),
        "mapping fwd+bwd": (
            _vjp_all(mapping),
            (maps, h_cots),
            2 * n * e + 2 * phi_b + 2 * k * coef,
        ),
        "mapping+pre fwd": (mapping_pre, maps, (n + 1) * e + phi_b + k * coef),
        "mapping+pre fwd+bwd": (
            _vjp_all(mapping_pre),
            (maps, (d["d_li"], *h_cots)),
            (2 * n + 2) * e + 2 * phi_b + 2 * k * coef,
        ),
        "pre fwd": (pre, (d["h_pre"], d["x"]), (n + 1) * e + n * coef),
        "pre fwd+bwd": (
            _vjp_all(pre),
            ((d["h_pre"], d["x"]), d["d_li"]),
            (2 * n + 2) * e + 2 * n * coef,
        ),
        "post-res fwd": (post_res, post_args, (2 * n + 1) * e + (n * n + n) * coef),
        "post-res fwd+bwd": (
            _vjp_all(post_res),
            (post_args, d["d_xn"]),
            (4 * n + 2) * e + 2 * (n * n + n) * coef,
        ),
        "connection fwd+bwd": (
            _vjp_all(connection),
            ((d["x"], d["f"], d["phi"], d["bias"], d["alpha"]), (d["d_li"], d["d_xn"])),
            (4 * n + 4) * e + 2 * phi_b,
        ),
        **two_layer_cases,
    }


def residual(d: dict, t: int, c: int):
    def run(x, f, dy):
        y, vjp = jax.vjp(lambda a, b: a + b, x, f)
        return y, vjp(dy)

    x = d["x"][:, 0]
    return run, (x, d["f"], d["d_li"]), 6 * t * c * 2


def bench(args) -> None:
    device = jax.devices()[0]
    print(f"device: {device.device_kind}; jax {jax.__version__}; n = {args.streams}, bf16 streams")
    default = {"hopper": ("triton", "mosaic_gpu", "auto"), "gpu": ("triton",), "tpu": ("tpu",)}
    impls = args.impls or ("xla", *default.get(backends.platform(), ()))
    for impl in impls:
        backends.chain(impl, "mapping", field="--impls")  # this device can run it
    copy_bw = copy_bandwidth(args.reps)
    header = f"{'T':>6} {'C':>5} {'op':22s} {'impl':10s} {'ms':>8} {'GB':>6} {'GB/s':>6} "
    print(header + f"{'copy':>5} {'xla/impl':>10} {'compile s':>9}")
    for t in args.tokens:
        for c in args.hidden:
            d = connection_operands(t, args.streams, c)
            fn, a, nbytes = residual(d, t, c)
            sec = timeit(jax.jit(fn), *a, reps=args.reps)
            _row(t, c, "residual add fwd+bwd", "xla", sec, nbytes, copy_bw, "")
            times = {}
            for impl in impls:
                for name, (fn, a, nbytes) in cases(
                    impl, d, t, args.streams, c, args.variant
                ).items():
                    if args.ops and not any(name.startswith(o) for o in args.ops):
                        continue
                    try:
                        t0 = time.perf_counter()
                        compiled = jax.jit(fn).lower(*a).compile()
                        compile_s = time.perf_counter() - t0
                        sec = timeit(compiled, *a, reps=args.reps)
                    except Exception as err:  # report and go on: one size must not sink the run
                        print(f"{t:6d} {c:5d} {name:22s} {impl:10s} FAILED {err!r:.300}")
                        continue
                    times[name, impl] = sec
                    xla = times.get((name, "xla"))  # blank where xla is not among --impls
                    ratio = xla / sec if xla is not None and impl != "xla" else ""
                    _row(t, c, name, impl, sec, nbytes, copy_bw, ratio, compile_s)
            del d


def _row(t, c, name, impl, sec, nbytes, copy_bw, ratio, compile_s=None):
    ratio = f"{ratio:10.2f}" if isinstance(ratio, float) else f"{ratio:>10}"
    compiled = "" if compile_s is None else f" {compile_s:9.2f}"
    print(
        f"{t:6d} {c:5d} {name:22s} {impl:10s} {sec * 1e3:8.3f} {nbytes / 1e9:6.2f} "
        f"{nbytes / sec / 1e9:6.0f} {nbytes / sec / copy_bw:5.2f} {ratio}{compiled}",
        flush=True,
    )


def kernel_table(d: dict, t: int, n: int, c: int):
    """Each Triton kernel of the connection alone: name -> (fn, args, bytes, blocks function)."""
    from pallas_kernels.mhc import _coeffs, _common, mapping_triton, post_res_triton, pre_triton

    e, kp = t * c * 2, _coeffs.packed_width(n, "triton")
    static = _common.Static()
    x2 = d["x"].reshape(t, n * c)
    info = _coeffs.column_info(n, kp, d["bias"], d["alpha"])
    parts = _common.phi_parts(d["phi"], kp, BF16)
    phi_b, rows = sum(p.size * 2 for p in parts), t * kp * 4
    partials = mapping_triton.proj(x2, parts, n=n, static=static)
    coef, saved, _ = mapping_triton.fwd(x2, parts, info, n=n, c=c, static=static, with_pre=True)
    dcoef = jax.random.normal(jax.random.key(1), (t, kp), F32)
    dy = mapping_triton.coef_bwd(saved, dcoef, info, n=n, c=c, static=static)[0]
    kw = dict(n=n, c=c, static=static)

    def mapping_fwd(x2, parts, info):
        return mapping_triton.fwd(x2, parts, info, with_pre=True, **kw)

    return {
        # projection + coefficient + pre kernels; compulsory: x once (they read it twice).
        "mapping+pre fwd": (
            mapping_fwd,
            (x2, parts, info),
            (n + 1) * e + phi_b + 2 * rows,
            "triton_mapping_proj",
        ),
        "mapping proj fwd": (
            lambda x2, parts: mapping_triton.proj(x2, parts, n=n, static=static),
            (x2, parts),
            n * e + phi_b + partials.size * 4,
            "triton_mapping_proj",
        ),
        "mapping coef fwd": (
            lambda partials, info: mapping_triton.coef_fwd(partials, info, **kw),
            (partials, info),
            partials.size * 4 + 2 * rows,
            "triton_mapping_coef_fwd",
        ),
        "pre dh (pass A)": (
            lambda x2, dli: pre_triton.weight_grad(x2, dli, **kw),
            (x2, d["d_li"]),
            (n + 1) * e + t * n * 4,
            "triton_pre_bwd",
        ),
        "mapping coef bwd": (
            lambda saved, dcoef, info: mapping_triton.coef_bwd(saved, dcoef, info, **kw),
            (saved, dcoef, info),
            3 * rows,
            "triton_mapping_coef_bwd",
        ),
        # dx kernel + the dphi matmul; compulsory: x, dli, dx_in (post-res's x
        # cotangent; x2 stands in for it), dx. The matmul's second read of x is not.
        "mapping+pre x bwd": (
            lambda *a: mapping_triton.x_bwd(*a, **kw),
            (x2, dy, parts, coef[:, :n], d["d_li"], x2),
            (3 * n + 1) * e + phi_b + rows + 4 * kp * n * c,
            "triton_mapping_dx",
        ),
        "post-res fwd": (
            lambda *a: post_res_triton.fwd(*a, static),
            (d["h_res"], d["h_post"], d["x"], d["f"]),
            (2 * n + 1) * e,
            "triton_post_res_fwd",
        ),
        "post-res bwd": (
            lambda *a: post_res_triton.bwd(*a, static),
            (d["h_res"], d["h_post"], d["x"], d["f"], d["d_xn"]),
            (3 * n + 2) * e,
            "triton_post_res_bwd",
        ),
        "pre fwd": (
            lambda *a: pre_triton.fwd(*a, static),
            (d["h_pre"], d["x"]),
            (n + 1) * e,
            "triton_pre_fwd",
        ),
        "pre bwd": (
            lambda *a: pre_triton.bwd(*a, static),
            (d["h_pre"], d["x"], d["d_li"]),
            (2 * n + 1) * e,
            "triton_pre_bwd",
        ),
    }


def breakdown(args) -> None:
    """Times every Triton kernel of the connection alone (default blocks)."""
    copy_bw = copy_bandwidth(args.reps)
    print(f"per-kernel, {jax.devices()[0].device_kind}")
    for t in args.tokens:
        for c in args.hidden:
            table = kernel_table(connection_operands(t, args.streams, c), t, args.streams, c)
            for name, (fn, a, nbytes, _) in table.items():
                _row(
                    t,
                    c,
                    name,
                    "triton",
                    timeit(jax.jit(fn), *a, reps=args.reps),
                    nbytes,
                    copy_bw,
                    "",
                )


def _grid(tiles, warps=(4,), stages=(2,)):
    return [(bt, bc, w, s) for bt, bc in tiles for w in warps for s in stages]


# Candidate (bt, bc, num_warps, num_stages[, span]) for the kernels that do not already
# stream at about copy bandwidth (the pre and post-res ones do, see --mode kernels), and
# post-res's forward over access shapes: its default moves 4 tokens x 512 columns (1 KiB
# contiguous per row), the Mosaic kernels 64 x 64 tiles (128 bytes per row).
SWEEP = {
    "post-res fwd": _grid(((4, 512), (8, 256), (16, 128), (32, 64), (64, 64), (16, 512))),
    "mapping+pre fwd": [
        (bt, bc, w, 3, span)
        for bt, bc, w in ((64, 128, 4), (64, 128, 8), (128, 128, 8), (32, 128, 4), (64, 64, 4))
        for span in (1024, 2048, 4096)
    ],
    "mapping coef fwd": _grid(((16, 1), (32, 1), (64, 1), (128, 1)), (1, 2, 4)),
    "mapping coef bwd": _grid(((8, 1), (16, 1), (32, 1), (64, 1)), (1, 2, 4)),
    "mapping+pre x bwd": [
        (bt, bc, 4, stages, span)
        for bt, bc in ((32, 128), (64, 128), (64, 64))
        for stages, span in ((2, bc), (3, 512), (3, 1024), (4, 1024), (3, 2048))
    ],
}


def _fixed(blk):
    """A replacement for a blocks function returning blk at every size."""
    return lambda *_: blk


def sweep(args) -> dict:
    """Times candidate Triton blocks per kernel (alone) at the first (T, C); returns the best."""
    t, c, n = args.tokens[0], args.hidden[0], args.streams
    table = kernel_table(connection_operands(t, n, c), t, n, c)
    print(f"sweep at T={t} C={c} n={n} on {jax.devices()[0].device_kind}")
    best = {}
    for name, candidates in SWEEP.items():
        if args.sweep and name not in args.sweep:
            continue
        fn, a, _, attr = table[name]
        original, results = getattr(blocks, attr), []
        for cand in candidates:
            setattr(blocks, attr, _fixed(blocks.TritonBlocks(*cand)))
            try:  # a fresh function per candidate: jit caches traces by function
                fresh = functools.partial(fn)
                results.append((timeit(jax.jit(fresh), *a, reps=args.reps), cand))
            except Exception as err:  # a candidate that does not compile is skipped
                print(f"  {name} {cand} failed: {err!r:.200}")
        setattr(blocks, attr, original)
        results.sort()
        best[attr] = results[0][1]
        print(f"{name}: " + ", ".join(f"{v}: {s * 1e3:.3f} ms" for s, v in results[:5]), flush=True)
    return best


def tuned(args) -> None:
    """Sweeps, installs the best blocks at every size, then runs the api timings."""
    best = sweep(argparse.Namespace(**{**vars(args), "reps": 8}))
    for attr, cand in best.items():
        setattr(blocks, attr, _fixed(blocks.TritonBlocks(*cand)))
    print(f"installed: {best}", flush=True)
    bench(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1280, 2560, 4096])
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument(
        "--impls", nargs="+", choices=backends.IMPLS, help="api mode: rows (the device's)."
    )
    parser.add_argument(
        "--ops", nargs="+", default=[], help="api mode: ops whose names start so (all)."
    )
    parser.add_argument(
        "--post_res_tile_tokens",
        type=int,
        choices=(8, 16, 32, 64),
        default=post_res_mosaic.TILE_TOKENS,
        help="Tokens per tile of the Mosaic GPU post-res kernels (post_res_mosaic.TILE_TOKENS).",
    )
    parser.add_argument(
        "--mapping_forward",
        choices=mapping_mosaic.FORWARDS,
        default=mapping_mosaic.FORWARD,
        help="The Mosaic GPU mapping forward's kernels (mapping_mosaic.FORWARD).",
    )
    parser.add_argument(
        "--variant",
        choices=("paper", "deepseek_v4"),
        default="paper",
        help="api mode: the mapping's coefficient math (pallas_kernels.mhc.variants).",
    )
    parser.add_argument("--mode", choices=("api", "kernels", "sweep", "tuned"), default="api")
    parser.add_argument(
        "--sweep", nargs="*", choices=list(SWEEP), default=[], help="Kernels to sweep (all)."
    )
    args = parser.parse_args()
    if args.reps < 20 and args.mode != "sweep":
        parser.error(f"--reps must be >= 20 for reported timings, got {args.reps}")
    post_res_mosaic.TILE_TOKENS = args.post_res_tile_tokens
    mapping_mosaic.FORWARD = args.mapping_forward
    {"api": bench, "kernels": breakdown, "sweep": sweep, "tuned": tuned}[args.mode](args)


if __name__ == "__main__":
    main()
