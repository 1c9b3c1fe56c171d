"""mhc_jax/benchmarking.py and mhc_jax/profiles.py: the copy ceiling, the operands of the
kernel benchmarks, and a traced step's kernel time by category."""

import jax
import jax.numpy as jnp
import pytest

from mhc_jax import benchmarking, profiles


def test_copy_ceiling_is_the_best_form_at_every_size():
    rates = benchmarking.measure(sizes_mib=(1, 2), reps=2)
    forms = {"xla neg bf16", "xla neg f32", "xla add u32 (bf16 pairs)"}
    assert {f"{f} @ {m} MiB" for f in forms for m in (1, 2)} <= set(rates)
    assert all(r > 0 for r in rates.values())
    form, rate = benchmarking.ceiling(rates)
    assert rate == max(rates.values()) and rates[form] == rate


def test_timeit_and_connection_operands():
    d = benchmarking.connection_operands(16, 4, 32)
    assert d["x"].shape == (16, 4, 32) and d["x"].dtype == jnp.bfloat16
    assert d["phi"].shape == (128, 24) and d["phi"].dtype == jnp.float32
    assert d["h_res"].shape == (16, 4, 4)
    assert benchmarking.timeit(jax.jit(lambda a: a * 2), d["x"], reps=2) > 0


def test_profile_breakdown_sums_stream_kernels_by_category():
    from jax.profiler import ProfileData

    def event(meta, start_us, dur_us):
        ps = f"offset_ps: {start_us}000000 duration_ps: {dur_us}000000"
        return f"events {{ metadata_id: {meta} {ps} }}"

    names = [
        "mhc_mapping_fwd",
        "loop_add_fusion",
        "nvjet_tst_128x256",
        # cuDNN's attention carries cuBLAS's architecture tag: still attention
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_kernel0_0",
        "mhc_x__1",
    ]
    metadata = " ".join(
        f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
        for i, n in enumerate(names, 1)
    )
    stream = " ".join(
        [
            event(1, 0, 300),
            event(2, 400, 100),
            event(3, 600, 1000),
            event(5, 0, 20),
            event(5, 0, 40),
        ]
    )
    xspace = ProfileData.from_text_proto(
        f"""planes {{ name: "/device:GPU:0"
          lines {{ name: "Stream #13(compute)" {stream} }}
          lines {{ name: "Stream #14(compute)" {event(4, 0, 500)} }}
          lines {{ name: "XLA Ops" {event(1, 0, 300)} }}
          {metadata} }}
        planes {{ name: "/host:CPU" lines {{ name: "python" {event(1, 0, 999)} }} {metadata} }}"""
    )
    got = profiles.breakdown(xspace, steps=2, top=2)
    # per step: mhc (300 + 20 + 40) / 2 us, fusion 50, matmul 500, attention 250; ms
    assert got["by_category"] == pytest.approx(
        {"mhc kernels": 0.18, "fusions and other": 0.05, "matmul": 0.5, "attention": 0.25}
    )
    assert got["total_ms"] == pytest.approx(0.98)
    assert got["top"] == [("nvjet_tst_128x256", 0.5), (names[3], 0.25)]
    assert got["mhc"] == [("mhc_mapping_fwd", 0.15, 0.5), ("mhc_x", 0.03, 1.0)]
