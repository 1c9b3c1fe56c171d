r"""Training-step time, throughput, MFU and memory of residual / HC / mHC variants.

Every variant of a shape runs in this one process with the same batch, so the
ratios are measured against a baseline from the same run:

    python experiments/benchmarks/step_overhead.py --shape=A \
        --variants=residual:xla:none,hc:xla:none,mhc:xla:none,mhc:auto:none,mhc:auto:mhc_blocks
    python experiments/benchmarks/step_overhead.py --shape=medium --mesh=1,1,2 \
        --variants=mhc:auto:none,mhc:auto:full,mhc:auto:save_dots,mhc:auto:mhc_blocks

A variant is ``connection:impl:remat``, optionally followed by modes: ``:deterministic``
(XLA's deterministic GPU mode with XLA attention, ``training.deterministic``; a variant
given twice runs twice, so final losses that differ show a mode is not run-to-run
deterministic) and ``:fused`` (``model.mhc_fuse_transitions``: one transition kernel
between consecutive mHC sub-layers).
Shapes (seq 2048 unless set): A = 24 blocks,
C 2048, 16 heads, d_ff 5632; B = 12 blocks, C 4096, 32 heads, d_ff 11008; medium =
the ~330M config (24 blocks, C 1024). bf16 activations, fp32 master weights, AdamW.

Reported per variant: step time (median of --steps after --warmup), tokens/s,
MFU (model FLOPs from mhc_jax.costs: 3x forward, no remat recompute counted, over
--peak_tflops per device), memory (the compiled step's arguments + temporaries per
device, from XLA's memory analysis), overhead = step/step(first variant) - 1, and
the floor overhead of the mHC residual path: its compulsory bytes per token per
sub-layer beyond a plain residual's (``floor_bytes_per_token``) at the copy
bandwidth measured in this run, divided by the first variant's step time.
``--profile_dir`` also traces a few steps per variant and prints the GPU kernel
time per step by category (mHC kernels, matmuls, attention, copies, fusions)
and the longest kernels (``mhc_jax.profiles``).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from mhc_jax import benchmarking, costs, profiles
from mhc_jax.model import ModelConfig
from mhc_jax.optim import OptimizerConfig, make_optimizer
from mhc_jax.sharding import MeshConfig
from mhc_jax.train import (
    Layout,
    compiler_options,
    deterministic_model,
    init_train_state,
    make_train_step,
)

SHAPES = {
    "A": dict(num_blocks=24, d_model=2048, num_heads=16, d_ff=5632),
    "B": dict(num_blocks=12, d_model=4096, num_heads=32, d_ff=11008),
    "medium": dict(num_blocks=24, d_model=1024, num_heads=16, d_ff=3072),
    "tiny": dict(num_blocks=2, d_model=128, num_heads=4, d_ff=256),
}

_SHAPE = flags.DEFINE_enum("shape", "A", list(SHAPES), "Model shape.")
_VARIANTS = flags.DEFINE_list(
    "variants",
    "residual:xla:none,hc:xla:none,mhc:xla:none,mhc:auto:none",
    "connection:impl:remat[:deterministic]",
)
_N = flags.DEFINE_integer("n", 4, "Streams of hc/mhc variants.")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch (sequences).")
_SEQ = flags.DEFINE_integer("seq", 2048, "Sequence length.")
_MESH = flags.DEFINE_list("mesh", ["-1", "1", "1"], "data,fsdp,tensor sizes.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "Dense bf16 peak per device (H100 SXM).")
_SCAN = flags.DEFINE_bool(
    "scan",
    False,
    "Scan over blocks: faster compiles, but on GPU XLA copies every saved activation into "
    "the scan's stacked buffers (docs/benchmarks.md has the cost).",
)
_ATTENTION = flags.DEFINE_enum(
    "attention", "auto", ["auto", "xla", "cudnn"], "Attention implementation (ModelConfig)."
)
_COPY_MIB = flags.DEFINE_integer("copy_mib", 1024, "Size of the copy-bandwidth probe (MiB).")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir", "", "Trace --profile_steps more steps per variant here; print GPU ms by kernel."
)
_PROFILE_STEPS = flags.DEFINE_integer("profile_steps", 3, "Steps in each profile trace.")


def copy_bandwidth(mib: int) -> float:
    """The copy ceiling in bytes/s (read + write) with ``mib`` MiB operands: the best
    of ``mhc_jax.benchmarking``'s copy forms (one XLA bf16 form alone understates it)."""
    return benchmarking.ceiling(benchmarking.measure((mib,), reps=10))[1]


def floor_bytes_per_token(n: int, c: int, itemsize: int = 2) -> float:
    """Compulsory traffic of one mHC layer's residual path beyond a plain residual's.

    Forward: mapping+pre reads x (nC), writes layer_input (C); post-res reads x and
    f ((n+1)C), writes x_next (nC). Backward: post-res reads x, f, d_x_next and
    writes d_x, d_f ((2n+1)C + (n+1)C); mapping+pre reads x and d_layer_input and
    writes d_x ((2n+1)C); the two d_x contributions are summed in the same pass.
    Total (8n + 5)C; a plain residual moves 6C (read x, f, write x; backward read
    d, write 2 copies). Coefficients (n*n + 2n fp32) are negligible.
    """
    return ((8 * n + 5) - 6) * c * itemsize


def run_variant(spec: str, layout_shape, batch_np) -> dict:
    connection, impl, remat, *modes = spec.split(":")
    unknown = set(modes) - {"deterministic", "fused"}
    if unknown or len(set(modes)) < len(modes):
        raise ValueError(
            f"--variants: {spec!r} must be connection:impl:remat followed by any of the "
            f"modes :deterministic and :fused, each once; got {sorted(unknown) or modes}"
        )
    n = 1 if connection == "residual" else _N.value
    cfg = ModelConfig(
        vocab_size=259,
        connection=connection,
        n=n,
        impl=impl,
        remat=remat,
        dtype="bfloat16",
        attention=_ATTENTION.value,
        scan_layers=_SCAN.value,
        mhc_fuse_transitions="fused" in modes,
        **SHAPES[_SHAPE.value],
    )
    deterministic = "deterministic" in modes
    cfg = deterministic_model(cfg, deterministic)
    tx = make_optimizer(OptimizerConfig(warmup_steps=10), 1000)
    layout = Layout.create(MeshConfig(*layout_shape), cfg)
    with layout.activate():
        init = lambda boxed=False: init_train_state(cfg, tx, 0, boxed=boxed)
        shardings = layout.state_shardings(jax.eval_shape(lambda: init(True)))
        state = jax.jit(init, out_shardings=shardings)()
        step = jax.jit(
            make_train_step(cfg, tx, 1),
            in_shardings=(shardings, layout.batch),
            out_shardings=(shardings, layout.replicated),
            donate_argnums=(0,),
            compiler_options=compiler_options(deterministic),
        )
        batch = layout.put_batch(batch_np)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        losses = []  # the first steps' losses: compared across meshes (same seed and batch)
        for _ in range(_WARMUP.value):
            state, metrics = compiled(state, batch)
            losses.append(float(metrics["loss"]))
        times = []
        for _ in range(_STEPS.value):
            t = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
        profile = None
        if _PROFILE_DIR.value:
            trace_dir = os.path.join(_PROFILE_DIR.value, spec.replace(":", "_"))
            with jax.profiler.trace(trace_dir):
                for _ in range(_PROFILE_STEPS.value):
                    state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
            profile = profiles.summarise(trace_dir, _PROFILE_STEPS.value)
    step_s = float(np.median(times))
    tokens = batch_np["inputs"].size
    flops = costs.train_flops_per_token(cfg, _SEQ.value) * tokens
    devices = layout.mesh.size
    return {
        "variant": spec,
        "mesh": "x".join(map(str, layout.mesh.shape.values())),
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens / step_s,
        "tokens_per_s_per_device": tokens / step_s / layout.mesh.size,
        "mfu": flops / step_s / devices / (_PEAK.value * 1e12),
        "memory_gib": (mem.argument_size_in_bytes + mem.temp_size_in_bytes) / 2**30,
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
        "first_losses": losses,
        "params": costs.abstract_param_counts(cfg)["total"],
        "n": n,
    } | ({"profile": profile} if profile else {})


def print_profiles(rows: list[dict]) -> None:
    """GPU kernel ms per step by category (columns: variants), then each one's top kernels."""
    rows = [r for r in rows if "profile" in r]
    if not rows:
        return
    cats = sorted({c for r in rows for c in r["profile"]["by_category"]})
    if not cats:
        print("\nno GPU kernel events in the profile traces")
        return
    print(f"\nGPU kernel time per step (ms), {_PROFILE_STEPS.value} traced steps")
    print(f"{'category':20s} " + " ".join(f"{r['variant']:>28s}" for r in rows))
    table = [(cat, [r["profile"]["by_category"].get(cat, 0.0) for r in rows]) for cat in cats]
    for cat, vals in [*table, ("all kernels", [r["profile"]["total_ms"] for r in rows])]:
        print(f"{cat:20s} " + " ".join(f"{v:28.1f}" for v in vals))
    for r in rows:
        print(f"top kernels of {r['variant']}:")
        for name, ms in r["profile"]["top"]:
            print(f"  {ms:8.2f} ms  {name[:100]}")
        for name, ms, calls in r["profile"].get("mhc", []):
            print(f"  {ms:8.2f} ms  {name} ({calls:g} calls, {ms / calls:.3f} ms each)")


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 256, size=(_BATCH.value, _SEQ.value + 1)).astype(np.int32)
    batch_np = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "weights": np.ones((_BATCH.value, _SEQ.value), np.float32),
    }
    mesh = tuple(int(s) for s in _MESH.value)
    bandwidth = copy_bandwidth(_COPY_MIB.value)
    print(f"devices: {jax.devices()}  jax {jax.__version__}  copy {bandwidth / 1e12:.2f} TB/s")
    rows = []
    for spec in _VARIANTS.value:
        try:
            rows.append(run_variant(spec, mesh, batch_np))
        except Exception as e:  # an out-of-memory variant is reported, not fatal
            rows.append({"variant": spec, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if "error" not in r), None)
    c, layers = SHAPES[_SHAPE.value]["d_model"], 2 * SHAPES[_SHAPE.value]["num_blocks"]
    # every device moves its share of the streams (batch or C split over the mesh)
    floor_s = (
        floor_bytes_per_token(_N.value, c)
        * layers
        * _BATCH.value
        * _SEQ.value
        / bandwidth
        / jax.device_count()
    )
    print(f"\nshape {_SHAPE.value} {SHAPES[_SHAPE.value]}  batch {_BATCH.value} x {_SEQ.value}")
    cols = ("step ms", "tok/s", "tok/s/dev", "MFU", "mem GiB", "overhead", "loss@1")
    print(f"{'variant':34s} {'mesh':7s} " + " ".join(f"{h:>10s}" for h in cols))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:34s} {r['error']}")
            continue
        over = r["step_ms"] / base["step_ms"] - 1
        print(
            f"{r['variant']:34s} {r['mesh']:7s} {r['step_ms']:10.1f} {r['tokens_per_s']:10.0f} "
            f"{r['tokens_per_s_per_device']:10.0f} {r['mfu']:10.1%} {r['memory_gib']:10.2f} "
            f"{over:10.1%} {r['first_losses'][-1] if r['first_losses'] else r['loss']:10.5f}"
        )
    print_profiles(rows)
    if base is not None:
        print(
            f"floor overhead of the mHC residual path (n={_N.value}): "
            f"{1e3 * floor_s:.1f} ms = {floor_s / (base['step_ms'] / 1e3):.1%} of {base['variant']}"
        )
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(
                {
                    "rows": rows,
                    "copy_bytes_per_s": bandwidth,
                    "floor_s": floor_s,
                    "shape": _SHAPE.value,
                    "batch": _BATCH.value,
                    "seq": _SEQ.value,
                    "jax": jax.__version__,
                    "device": str(jax.devices()[0].device_kind),
                    "devices": jax.device_count(),
                    "mesh_arg": "x".join(map(str, mesh)),
                    "attention": _ATTENTION.value,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    app.run(main)
