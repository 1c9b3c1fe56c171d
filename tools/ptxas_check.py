"""The Mosaic GPU kernels through ptxas on a host without a GPU: each kernel's registers,
spills and stack, and any ptxas error, for Hopper (sm_90a).

Lowering for CUDA on a CPU (the kernel tests) stops at the Mosaic GPU MLIR module that
the ``mosaic_gpu`` custom call carries. The rest, MLIR -> LLVM -> PTX -> ptxas -> cubin,
runs in JAX's CUDA plugin, whose ``MosaicGpuCompile`` (the entry point of
``jax.experimental.mosaic.gpu.as_torch_gpu_kernel``) asks the CUDA driver only for the
device's compute capability before it compiles. Here a stand-in ``libcuda.so.1`` (built
with the host's C compiler, loaded before the plugin looks for the driver) answers 9.0,
and ``MOSAIC_GPU_DUMP_PTXAS`` makes the plugin print ptxas's verbose report. The
compile is the one a GPU host runs, with the same LLVM and flags, and ptxas from the
CUDA toolkit in ``CUDA_HOME`` (default ``/usr/local/cuda``, put first on PATH). What
follows ptxas, linking the host-side launcher against the Mosaic GPU runtime, fails
here, so ``MosaicGpuCompile`` always returns NULL and a failure after ptxas goes
unseen. Not thread-safe: it redirects the process's stdout and stderr while it
compiles.

Needs, besides this project's environment: the plugin at jaxlib's version in
``.cache/cuda-compiler/jaxlib-VERSION`` (``tools/fetch_cuda_compiler.sh``; kept out of
the environment, where it would make JAX look for a GPU), a CUDA toolkit with ptxas,
and ``cc``. ``unavailable()`` says which is missing.

Usage (a table of every kernel the ops lower to at each shape)::

    python tools/ptxas_check.py --n 4 8 --hidden 1280 4096
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import jaxlib
from jax._src.lib.mlir import ir
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_DIR = os.environ.get(
    "MHC_CUDA_COMPILER_DIR",
    os.path.join(ROOT, ".cache", "cuda-compiler", f"jaxlib-{jaxlib.__version__}"),
)
CUDA_ROOT = os.environ.get("CUDA_HOME", "/usr/local/cuda")  # its bin/ptxas compiles
# What lowering without a GPU targets: the Hopper GPU the kernels are built for.
TARGET = AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")

# The stand-in driver: compute capability 9.0 for any device, success for the context
# query (all the compile asks of the driver).
_FAKE_DRIVER = r"""
typedef int CUresult;
CUresult cuCtxGetDevice(int *device) { *device = 0; return 0; }
CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
  *value = attribute == 75 ? 9 : 0;  /* 75, 76: compute capability major, minor */
  return 0;
}
CUresult cuGetErrorString(CUresult error, const char **text) {
  *text = "no GPU: a stand-in libcuda for compiling only";
  return 0;
}
"""


@dataclasses.dataclass(frozen=True)
class Kernel:
    """ptxas's report on one kernel (sm_90a): registers per thread, spill stores and
    loads and stack frame in bytes per thread, and its other warnings and notes."""

    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    notes: tuple[str, ...]  # ptxas's warnings (but the spill one) and coded notes
    seconds: float  # the whole compile: LLVM, ptxas

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def performance_loss(self) -> tuple[str, ...]:
        """ptxas's warnings, and its notes of lost performance (serialized wgmma)."""
        return tuple(n for n in self.notes if "warning" in n or "Performance Loss" in n)


class PtxasError(RuntimeError):
    """The plugin's compile of a kernel failed; the message holds its output."""


def _plugin_library() -> str:
    return os.path.join(PLUGIN_DIR, "jax_plugins", "xla_cuda13", "xla_cuda_plugin.so")


def unavailable() -> str | None:
    """Why kernels cannot be compiled here, else None."""
    if jax.default_backend() != "cpu":
        return (
            f"the {jax.default_backend()!r} backend is up: compile on the device itself "
            "(MOSAIC_GPU_DUMP_PTXAS=1)"
        )
    if not os.path.exists(_plugin_library()):
        return (
            f"no CUDA plugin for jaxlib {jaxlib.__version__} in {PLUGIN_DIR} (run "
            "tools/fetch_cuda_compiler.sh)"
        )
    if not os.path.exists(os.path.join(CUDA_ROOT, "bin", "ptxas")):
        return f"no ptxas in {CUDA_ROOT}/bin (set CUDA_HOME to a CUDA toolkit)"
    if not shutil.which("cc"):
        return "no C compiler (cc) for the stand-in libcuda"
    return None


@functools.cache
def _compiler() -> Callable[[bytes], int]:
    """The plugin's ``MosaicGpuCompile``, with the stand-in driver loaded first (a later
    dlopen of libcuda.so.1 finds it by its soname)."""
    if why := unavailable():
        raise RuntimeError(f"cannot compile Mosaic GPU kernels here: {why}")
    with tempfile.TemporaryDirectory(prefix="mhc-fake-libcuda-") as build:
        source, library = os.path.join(build, "libcuda.c"), os.path.join(build, "libcuda.so.1")
        with open(source, "w") as f:
            f.write(_FAKE_DRIVER)
        command = ["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", library, source]
        subprocess.run(command, check=True)
        ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)  # stays loaded once its file is gone
    compile_fn = ctypes.CDLL(_plugin_library()).MosaicGpuCompile
    compile_fn.argtypes = [ctypes.c_char_p, ctypes.c_int]
    compile_fn.restype = ctypes.c_void_p
    # XLA runs the first ptxas on PATH and finds libdevice under the CUDA root
    bin_dir = os.path.join(CUDA_ROOT, "bin")
    os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    os.environ["MOSAIC_GPU_CUDA_ROOT"] = CUDA_ROOT
    return lambda module: compile_fn(module, len(module))


def _captured(fn: Callable[[], object]) -> str:
    """What ``fn`` writes to the process's stdout and stderr (file descriptors 1, 2)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            fn()
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        out.seek(0)
        return out.read().decode(errors="replace")


_ENTRY = re.compile(r"Compiling entry function '(\w+?)(?:_mosaic_gpu_kernel)?'")
_PROPERTIES = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_REGISTERS = re.compile(r"Used (\d+) registers")
# ptxas's notes on a kernel, beside its warnings: "ptxas info    : (C7515) Potential
# Performance Loss: wgmma.mma_async instructions are serialized ..."
_NOTE = re.compile(r"^ptxas\b.*(warning|\(C\d{4}\))")


def parse_report(output: str, seconds: float = 0.0) -> Kernel:
    """The Kernel that ptxas's verbose ``output`` (for one kernel) reports.

    Raises:
      PtxasError: ``output`` holds no ptxas report (an MLIR, LLVM or ptxas failure).
    """
    entries, properties = _ENTRY.findall(output), _PROPERTIES.findall(output)
    registers = _REGISTERS.findall(output)
    if not (len(entries) == len(properties) == len(registers) == 1):
        raise PtxasError(
            f"no ptxas report on one kernel ({len(entries)} entry functions); the compile "
            f"printed:\n{output[-4000:]}"
        )
    stack, stores, loads = (int(v) for v in properties[0])
    notes = tuple(
        line.strip()
        for line in output.splitlines()
        if _NOTE.match(line) and "spilled to local memory" not in line
    )
    return Kernel(entries[0], int(registers[0]), stores, loads, stack, notes, seconds)


@functools.lru_cache(maxsize=256)
def compile_module(module: bytes) -> Kernel:
    """Compiles one serialized Mosaic GPU module for sm_90a; ptxas's report on it.

    Raises:
      PtxasError: the compile printed no ptxas report.
    """
    compile_fn = _compiler()
    # only ptxas's report, to stdout (MOSAIC_GPU_DUMP_TO would send it to files)
    dumps = {k: v for k, v in os.environ.items() if k.startswith("MOSAIC_GPU_DUMP")}
    for k in dumps:
        del os.environ[k]
    os.environ["MOSAIC_GPU_DUMP_PTXAS"] = "1"
    start = time.perf_counter()
    try:
        output = _captured(lambda: compile_fn(module))
    finally:
        del os.environ["MOSAIC_GPU_DUMP_PTXAS"]
        os.environ.update(dumps)
    return parse_report(output, time.perf_counter() - start)


def mosaic_modules(lowered: jax.stages.Lowered) -> list[bytes]:
    """The serialized module of each ``mosaic_gpu`` custom call in ``lowered``, in order."""
    modules = []

    def walk(op: ir.Operation) -> None:
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    child = child.operation
                    if child.name == "stablehlo.custom_call":
                        target = ir.StringAttr(child.attributes["call_target_name"]).value
                        if target.startswith("mosaic_gpu"):
                            config = ir.DictAttr(child.attributes["mhlo.backend_config"])
                            modules.append(ir.StringAttr(config["module"]).value_bytes)
                    walk(child)

    walk(lowered.compiler_ir("stablehlo").operation)
    return modules


def lower_for_cuda(fn: Callable, *args) -> jax.stages.Lowered:
    """``jax.jit(fn)`` lowered for CUDA on this host (the target taken from ``TARGET``)."""
    mesh = AbstractMesh((1,), ("_target",), (AxisType.Auto,), abstract_device=TARGET)
    with use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def compile_all(fn: Callable, *args) -> list[Kernel]:
    """ptxas's report on every Mosaic GPU kernel of ``fn``'s forward and of its value and
    gradient (the sum of its outputs, against every argument), each kernel once."""

    def loss(*a):
        return sum(jnp.sum(o.astype(jnp.float32)) for o in jax.tree.leaves(fn(*a)))

    grad = jax.value_and_grad(loss, argnums=tuple(range(len(args))))
    modules = mosaic_modules(lower_for_cuda(fn, *args))
    modules += mosaic_modules(lower_for_cuda(grad, *args))
    # the primal and the VJP's forward rule may build different kernels; where they build
    # the same one, the modules differ in source locations only and report the same
    kernels = {}
    for module in dict.fromkeys(modules):
        kernel = compile_module(module)
        kernels.setdefault(dataclasses.replace(kernel, seconds=0.0), kernel)
    return list(kernels.values())


def ops(n: int, c: int, dtype, variant: str = "paper", t: int = 4096) -> Iterator[tuple]:
    """(op name, function, argument shapes) of each Mosaic GPU op, at n streams of C
    channels in ``dtype``: the mapping (+ pre), its forward as one cluster kernel, the pre,
    post-res and the transition; the DeepSeek-V4 variant changes only the mapping's."""
    from pallas_kernels.mhc import (
        mapping_mosaic,
        post_res_mosaic,
        pre_mosaic,
        transition_mosaic,
    )
    from pallas_kernels.mhc._common import Static

    f32 = jnp.float32
    k = n * n + 2 * n
    static = Static(interpret=False, variant=variant)
    s = jax.ShapeDtypeStruct
    x, f = s((t, n, c), dtype), s((t, c), dtype)
    weights = s((n * c, k), f32), s((k,), f32), s((3,), f32)
    h_res, h_post, h_pre = s((t, n, n), f32), s((t, n), f32), s((t, n), f32)

    def mapping(*a):
        return mapping_mosaic.mapping(*a, static, True, True)

    def cluster_mapping(*a):  # the forward as one cluster kernel (not the default)
        default, mapping_mosaic.FORWARD = mapping_mosaic.FORWARD, "cluster"
        try:
            return mapping(*a)
        finally:
            mapping_mosaic.FORWARD = default

    yield "mapping", mapping, (x, *weights)
    yield "cluster", cluster_mapping, (x, *weights)
    if variant != "paper":
        return
    yield "pre", lambda *a: pre_mosaic.apply_pre(*a, static), (h_pre, x)
    yield "post-res", lambda *a: post_res_mosaic.apply_post_res(*a, static), (h_res, h_post, x, f)
    if transition_mosaic.fuses(n, c, dtype, dtype):
        args = (h_res, h_post, x, f, *weights)
        yield "transition", lambda *a: transition_mosaic.transition(*a, static), args


def ptxas_version() -> str:
    """The last line of ``ptxas --version`` ("Build cuda_13.0.r13.0/compiler...")."""
    ptxas = os.path.join(CUDA_ROOT, "bin", "ptxas")
    lines = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    return (lines.strip().splitlines() or ["ptxas: no version"])[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[4])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1280, 4096])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float32"])
    parser.add_argument("--variant", nargs="+", default=["paper"], choices=["paper", "deepseek_v4"])
    args = parser.parse_args(argv)
    from pallas_kernels.mhc.backends import UnsupportedInput

    if why := unavailable():
        print(f"ptxas_check: {why}", file=sys.stderr)
        return 2
    print(f"JAX {jax.__version__}, sm_90a, {ptxas_version()}")
    columns = ("n", "    C", "dtype   ", "regs", "spill st/ld", "stack", "    s")
    print(f"{'kernel':32} {'op':10} {'variant':11} " + " ".join(columns))
    failures = 0
    for variant, dtype, n, c in itertools.product(args.variant, args.dtype, args.n, args.hidden):
        for op, fn, shapes in ops(n, c, jnp.dtype(dtype), variant):
            row = f"{op:10} {variant:11} {n} {c:5} {dtype:8}"
            try:
                kernels = compile_all(fn, *shapes)
            except UnsupportedInput as e:  # a documented refusal: XLA or Triton run it
                print(f"{'(not taken)':32} {row} {str(e)[:160]}")
                continue
            except Exception as e:  # noqa: BLE001 - a row per failure, then the rest
                failures += 1
                print(f"{'(failed)':32} {row} {type(e).__name__}: {str(e)[:600]}")
                continue
            for kn in kernels:
                spill = f"{kn.spill_stores}/{kn.spill_loads}"
                print(
                    f"{kn.name:32} {row} {kn.registers:4} {spill:>11} {kn.stack:5} "
                    f"{kn.seconds:5.1f}" + "".join(f"\n    {note}" for note in kn.notes)
                )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
