"""The benchmark scripts: the overhead floor, the multi-device scaling table, the
stream-overlap probe."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name: str):
    """The benchmark script ``experiments/benchmarks/<name>.py``, loaded by its path."""
    spec = importlib.util.spec_from_file_location(
        f"benchmark_{name}", os.path.join(ROOT, "experiments", "benchmarks", f"{name}.py")
    )
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


access_shape = _script("access_shape")
scaling = _script("scaling")
step_overhead = _script("step_overhead")

# tests that assert on the Mosaic GPU interpreter's race record (a CPU host only)
INTERPRETER_ONLY = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the interpreter's race record"
)


@INTERPRETER_ONLY
@pytest.mark.parametrize("shape", [(64, 64), (8, 256)])
def test_access_shape_copy_moves_the_streams_without_races(shape):
    """Tiles stored straight from their input slots; T = 83 ends in a partial block."""
    from kernel_test_base import races_recorded

    x = jnp.asarray(np.random.default_rng(0).standard_normal((83, 3, 512)), jnp.bfloat16)
    f = jnp.ones((83, 512), jnp.bfloat16)
    stages = access_shape.fitting_stages(3, shape, 3)
    out = jax.jit(lambda x, f: access_shape.stream_copy(x, f, shape, stages, True))(x, f)
    assert bool(jnp.array_equal(out, x))
    assert not races_recorded()


@INTERPRETER_ONLY
def test_access_shape_sliced_copy_refills_its_ring_without_races():
    """3 steps of 512 columns through a ring of 2 slots; T = 83 ends in a partial block."""
    from kernel_test_base import races_recorded

    x = jnp.asarray(np.random.default_rng(1).standard_normal((83, 2, 1536)), jnp.bfloat16)
    f = jnp.ones((83, 1536), jnp.bfloat16)
    out = jax.jit(lambda x, f: access_shape.sliced_copy(x, f, 2, True))(x, f)
    assert bool(jnp.array_equal(out, x))
    assert not races_recorded()
    with pytest.raises(ValueError, match=r"C=640 must be a multiple of 512"):
        access_shape.sliced_copy(x[..., :640], f[:, :640], 2, True)


def test_access_shape_names_bad_shapes():
    assert access_shape.parse_shape("16x256") == (16, 256)
    with pytest.raises(ValueError, match=r"'16by256' must be ROWSxCOLS"):
        access_shape.parse_shape("16by256")
    with pytest.raises(ValueError, match=r"'12x256' needs rows a multiple of 8"):
        access_shape.parse_shape("12x256")
    with pytest.raises(ValueError, match=r"two stages of 5 tiles"):
        access_shape.fitting_stages(4, (64, 256), 3)


def test_floor_bytes_per_token():
    # mHC layer (8n + 5) C bf16 values forward + backward, minus a residual's 6C
    assert step_overhead.floor_bytes_per_token(4, 1024) == (37 - 6) * 1024 * 2
    assert step_overhead.floor_bytes_per_token(1, 10, itemsize=4) == 7 * 10 * 4


@pytest.mark.parametrize("spec", ["mhc:auto:none:bogus", "mhc:auto:none:fused:fused"])
def test_step_overhead_names_a_bad_variant_mode(spec):
    with pytest.raises(ValueError, match=r":deterministic and :fused, each once"):
        step_overhead.run_variant(spec, (1, 1, 1), None)


def _result(mesh, devices, rows):
    return {"mesh_arg": mesh, "devices": devices, "rows": rows}


def _row(variant, mesh, step_ms, tps_dev, losses):
    return dict(
        variant=variant,
        mesh=mesh,
        step_ms=step_ms,
        tokens_per_s_per_device=tps_dev,
        memory_gib=1.0,
        first_losses=losses,
    )


def test_scaling_table_efficiency_overhead_and_errors():
    results = [
        _result("1x1x1", 1, [_row("mhc:pallas:mhc_blocks", "1x1x1", 300.0, 100.0, [5.0, 4.0])]),
        _result(
            "1x4x1",
            4,
            [
                _row("residual:xla:none", "1x4x1", 80.0, 110.0, [5.1, 4.1]),
                _row("mhc:pallas:mhc_blocks", "1x4x1", 100.0, 80.0, [5.0, 4.002]),
                {"variant": "hc:xla:none", "error": "RESOURCE_EXHAUSTED: out of memory"},
            ],
        ),
    ]
    lines = scaling.table(results).splitlines()
    mhc4 = next(line for line in lines if line.startswith("| 1x4x1 | 4 | mhc"))
    cells = [c.strip() for c in mhc4.split("|")[1:-1]]
    assert cells[6] == "80%"  # tokens/s per GPU over the 1-GPU run's
    assert cells[8] == "+25.0%"  # step time over the residual's on the same mesh
    assert cells[9] == "2.0e-03"  # largest first-steps loss difference to 1 GPU
    assert any("out of memory" in line and "hc:xla:none" in line for line in lines)


@pytest.mark.slow
def test_scaling_runs_meshes_and_losses_agree(tmp_path):
    """Two tiny meshes on fake CPU devices: same seed and batch, so same losses."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "experiments", "benchmarks", "scaling.py"),
        "--meshes=1x1x1,1x2x1",
        f"--results_dir={tmp_path}",
        "--",
        "--shape=tiny",
        "--seq=32",
        "--batch=4",
        "--steps=1",
        "--warmup=2",
        "--variants=mhc:xla:none",
        "--copy_mib=8",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, timeout=600)
    with open(tmp_path / "mesh_1x2x1.json") as f:
        two = json.load(f)
    with open(tmp_path / "mesh_1x1x1.json") as f:
        one = json.load(f)
    assert two["devices"] == 2 and one["devices"] == 1
    for a, b in zip(one["rows"], two["rows"]):
        assert "error" not in a and "error" not in b
        assert len(a["first_losses"]) == 2
        for la, lb in zip(a["first_losses"], b["first_losses"]):
            assert abs(la - lb) < 1e-4  # measured: 4.8e-7 (bf16 activations, CPU)
    assert "| 1x2x1 | 2 | mhc:xla:none |" in (tmp_path / "scaling.md").read_text()


def test_stream_overlap_probe_puts_each_layers_kernel_on_stream_1(lowered_text):
    """Lowered for CUDA on any host: the streamed program wraps every layer's kernel
    in a stream-1 call (the grouped one also tags scheduling groups); the
    same-stream program has the same kernels and no annotation."""
    stream_overlap = _script("stream_overlap")

    progs = stream_overlap.programs(64, 4, 256, 512, layers=2)

    def lowered(name):
        fn, args = progs[name]
        return lowered_text(fn, *args, platform="cuda")

    calls = r"= call @\S+\(.*_xla_stream_annotation = \"1\""
    kernels = r"custom_call @\S*triton\S*\("
    same, streamed, grouped = (lowered(n) for n in ("same stream", "stream 1", "stream 1, grouped"))
    assert len(re.findall(kernels, same)) == 2 and "_xla_stream_annotation" not in same
    for text in (streamed, grouped):  # streamed functions holding the kernel, called twice
        assert len(re.findall(kernels, text)) >= 1
        assert len(re.findall(calls, text)) == 2
    assert "_scheduling_group_id" in grouped and "_scheduling_group_id" not in streamed
