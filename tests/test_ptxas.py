"""Every Mosaic GPU kernel through ptxas for Hopper (sm_90a) on a host without a GPU
(``tools/ptxas_check.py``): each compiles, and the registers it spills are the ones
recorded here. Lowering alone (the kernel tests) stops before ptxas, so this is what
catches a ptxas error, a serialized wgmma or a new spill before a GPU runs the kernel.
Skipped where JAX's CUDA plugin (``tools/fetch_cuda_compiler.sh``) or a CUDA toolkit is
missing, and on a GPU host, which compiles natively; CI sets MHC_REQUIRE_PTXAS=1, which
makes a missing one a failure."""

import importlib.util
import os
import sys

import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "tool_ptxas_check", os.path.join(ROOT, "tools", "ptxas_check.py")
)
ptxas_check = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ptxas_check)

UNAVAILABLE = ptxas_check.unavailable()
if UNAVAILABLE and os.environ.get("MHC_REQUIRE_PTXAS") == "1":
    raise RuntimeError(f"MHC_REQUIRE_PTXAS=1, but ptxas cannot run here: {UNAVAILABLE}")
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))

# Spill stores and loads (bytes per thread) of the kernels that spill, by (variant, n),
# as ptxas RECORDED_WITH reports them: a kernel that starts to spill, or stops, fails
# the test until this table says so (another ptxas skips the comparison). At n = 8 the
# coefficient kernels (and the cluster forward, which runs the same epilogue) hold a
# token's 64-entry Sinkhorn iterate and its temporaries in registers (the VJP's fourth
# checkpoint too: three fit in shared memory), post-res's backward 8 streams' tiles.
RECORDED_WITH = "Build cuda_13.0.r13.0/compiler.36424714_0"
SPILLS = {
    ("paper", 4): {"mhc_transition_bwd_mgpu": (24, 24)},
    ("paper", 8): {
        "mhc_mapping_coef_fwd_mgpu": (72, 72),
        "mhc_mapping_coef_bwd_mgpu": (436, 436),
        "mhc_mapping_cluster_fwd_mgpu": (2372, 2508),
        "mhc_post_res_bwd_mgpu": (1388, 944),
    },
    ("deepseek_v4", 4): {},
}
# every kernel of the package, at n = 4 (the paper's)
KERNELS = {
    "mhc_mapping_proj_mgpu",
    "mhc_mapping_coef_fwd_mgpu",
    "mhc_mapping_coef_bwd_mgpu",
    "mhc_mapping_dx_mgpu",
    "mhc_mapping_cluster_fwd_mgpu",
    "mhc_pre_fwd_mgpu",
    "mhc_pre_bwd_mgpu",
    "mhc_pre_dh_mgpu",
    "mhc_post_res_fwd_mgpu",
    "mhc_post_res_bwd_mgpu",
    "mhc_transition_fwd_mgpu",
    "mhc_transition_bwd_mgpu",
}


@pytest.mark.parametrize(
    "variant, n, c", [("paper", 4, 1280), ("paper", 8, 4096), ("deepseek_v4", 4, 4096)]
)
def test_every_kernel_compiles_with_the_recorded_spills(variant, n, c):
    """Each op's forward and gradient kernels at bf16 streams: ptxas compiles every one,
    warns of nothing but spills and serializes no wgmma; the spills are ``SPILLS``'."""
    spills, names = {}, set()
    for _, fn, shapes in ptxas_check.ops(n, c, jnp.bfloat16, variant):
        for kernel in ptxas_check.compile_all(fn, *shapes):
            names.add(kernel.name)
            assert kernel.performance_loss == (), kernel.name
            if kernel.spills:  # the most any compile of this kernel spills
                spill = (kernel.spill_stores, kernel.spill_loads)
                spills[kernel.name] = max(spill, spills.get(kernel.name, spill))
    if (variant, n) == ("paper", 4):
        assert names == KERNELS
    if (version := ptxas_check.ptxas_version()) != RECORDED_WITH:
        pytest.skip(f"spills recorded with ptxas {RECORDED_WITH!r}, this is {version!r}")
    assert spills == SPILLS[variant, n]


def test_the_report_names_spills_and_lost_performance():
    """What ptxas prints for a kernel that spills, whose wgmmas it serialized, and into
    which it injected a warpgroup.arrive (a note, not a loss)."""
    serialized = (
        "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions "
        "are serialized due to the presence of Extern calls in the function 'k'."
    )
    injected = (
        "ptxas info    : (C7519) warpgroup.arrive is injected in around line 9 by compiler "
        "to allow use of registers in GMMA in function 'k'"
    )
    output = f"""ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for k_mosaic_gpu_kernel
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas warning : Registers are spilled to local memory in function 'k_mosaic_gpu_kernel'
{injected}
{serialized}
ptxas info    : Used 255 registers, used 1 barriers, 1 bytes smem
"""
    kernel = ptxas_check.parse_report(output)
    assert (kernel.name, kernel.registers, kernel.stack) == ("k", 255, 8)
    assert (kernel.spill_stores, kernel.spill_loads, kernel.spills) == (8, 4, True)
    assert kernel.notes == (injected, serialized)
    assert kernel.performance_loss == (serialized,)


def test_a_failed_compile_raises_with_the_plugins_output():
    with pytest.raises(ptxas_check.PtxasError, match="no ptxas report"):
        ptxas_check.compile_module(b"this is no MLIR module")


def test_the_report_prints_a_row_per_kernel(capsys):
    """The command line's table: a header naming ptxas, a row per kernel of each op,
    the fp32 mapping refused as the op documents, and exit status 0."""
    assert ptxas_check.main(["--n", "2", "--hidden", "256", "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("JAX ") and "sm_90a" in lines[0] and "cuda" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [r[2] for r in rows if r[0] == "(not"] == ["mapping", "cluster"]
    kernels = {r[0] for r in rows if r[0] != "(not"}
    assert kernels == {
        "mhc_pre_fwd_mgpu",
        "mhc_pre_bwd_mgpu",
        "mhc_post_res_fwd_mgpu",
        "mhc_post_res_bwd_mgpu",
    }
