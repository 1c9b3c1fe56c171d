"""What the kernel tests share: seeded inputs, forward and VJP in one jit, relative
errors against the references, the Mosaic GPU interpreter's race record, and the
kernel backends the per-op checks run against.

As in JAX's own Pallas tests, each op family's checks (``PreChecks`` in
``test_pre_kernels.py``, ...) are written once in a base class named without the
``Test`` prefix, so that pytest collects only its subclasses, one per backend:
``class TestPreTriton(PreChecks, Triton)``. A backend class (``Triton``, ``Tpu``,
``MosaicGpu``, ``Xla``) says what differs: its kernel modules, the platform it compiles
on, what it lowers for; a family's hooks (inputs, tolerances, cases) are overridden
where a backend needs its own. ``per_backend`` parametrises a check with a case list
that the collecting class names.

A backend compiles on its own platform and runs in an interpreter on a CPU host: the
Pallas interpreter (Triton and TPU kernels), which fills each output with NaN before
the kernel runs, so that an element the kernel fails to write stays NaN and fails the
finiteness check; the Mosaic GPU interpreter, with race detection. References always
run on the CPU (exact fp32 matmuls). Errors are ||got - want|| / ||want||; T = 83 is
no multiple of any token block.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mhc import (
    blocks,
    mapping_mosaic,
    mapping_tpu,
    mapping_triton,
    post_res_mosaic,
    post_res_tpu,
    post_res_triton,
    pre_mosaic,
    pre_tpu,
    pre_triton,
)
from pallas_kernels.mhc._common import Static

F32, BF16 = jnp.float32, jnp.bfloat16
T = 83
TOL = {F32: 1e-5, BF16: 1e-2}
# bf16 outputs: their own rounding; fp32 ones (coefficients and the cotangents of phi,
# bias, alpha) come from bf16 x through fp32 accumulation: measured up to 3e-5 relative
# (d_alpha at n = 8), where the pre/post-res kernels' fp32 math stays near 1e-6.
MAPPING_TOL = {jnp.dtype(BF16): 1e-2, jnp.dtype(F32): 1e-4}
PLATFORM = jax.default_backend()
CPU = jax.devices("cpu")[0]
SMOKE = pytest.mark.smoke


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def normal(rng, shape, dtype=F32, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def mapping_inputs(rng, n, c, dtype=BF16, t=T):
    """(x, phi, bias, alpha) of the mapping: x (t, n, C) in ``dtype``, the rest fp32."""
    k = n * n + 2 * n
    x = normal(rng, (t, n, c), dtype)
    phi = normal(rng, (n * c, k), scale=2.0 / np.sqrt(n * c))
    bias = normal(rng, (k,))
    alpha = jnp.asarray(rng.uniform(0.5, 1.5, 3), F32)
    return x, phi, bias, alpha


def coefficients(rng, n):
    """(h_pre, h_post, h_res), fp32, T tokens."""
    h_pre = jnp.asarray(rng.uniform(0, 1, (T, n)), F32)
    h_post = jnp.asarray(rng.uniform(0, 2, (T, n)), F32)
    h_res = jnp.asarray(rng.uniform(0, 1, (T, n, n)), F32)
    return h_pre, h_post, h_res


def streams_and_coefficients(rng, n, c, dtype):
    """(x, f, h_res, h_post, h_pre): streams and the layer output in ``dtype``, T tokens,
    then coefficients (h_res's rows summing to at most 1)."""
    x = jnp.asarray(rng.standard_normal((T, n, c)), dtype)
    f = jnp.asarray(rng.standard_normal((T, c)), dtype)
    h_res = jnp.asarray(rng.uniform(0, 1, (T, n, n)) / n, F32)
    h_post = jnp.asarray(rng.uniform(0, 2, (T, n)), F32)
    h_pre = jnp.asarray(rng.uniform(0, 1, (T, n)), F32)
    return x, f, h_res, h_post, h_pre


def value_and_grads(fn, args, rng, device=None, repeat=1):
    """fn(*args) and the VJP of random cotangents, in one jit (run ``repeat`` times)."""
    outs = jax.eval_shape(fn, *args)
    cots = jax.tree.map(lambda o: normal(rng, o.shape, o.dtype), outs)

    @jax.jit
    def both(args, cots):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cots)

    if device is None:
        results = [both(args, cots) for _ in range(repeat)]
    else:
        with jax.default_device(device):
            args, cots = jax.device_put((args, cots), device)
            results = [both(args, cots) for _ in range(repeat)]
    return results[0] if repeat == 1 else results


def rel_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got)), "non-finite (unwritten) output elements"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def assert_close(got, want, names, tol: float | Callable) -> None:
    """Leaf by leaf (named ``names``): equal dtypes and a relative error of at most
    ``tol``, or of ``tol(name, dtype)``."""
    for name, g, w in zip(names, jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype, f"{name}: {g.dtype} != {w.dtype}"
        err = rel_error(g, w)
        limit = tol(name, g.dtype) if callable(tol) else tol
        assert err <= limit, f"{name}: rel error {err:.2e} > {limit:.0e}"


def shrink_blocks(monkeypatch) -> None:
    """The TPU block cap lowered to 32 rows, so that the TPU kernels also see several
    blocks and a partial last one at T = 83; the Triton mapping projection's column span
    to 256, so that it sums several spans' partials (the last one partial where 256 does
    not divide n*C); the mapping dx kernel's span raised to 256, so that it loops over
    column blocks. (The Mosaic GPU kernels take none of these.)"""
    monkeypatch.setattr(blocks, "TPU_MAX_ROWS", 32)
    monkeypatch.setattr(blocks, "TRITON_MAX_SPAN", 256)
    monkeypatch.setattr(blocks, "TRITON_DX_SPAN", 256)


_RACES: list[bool] = []  # one entry per race the interpreter recorded, any kernel


def _record_every_race() -> None:
    """The interpreter keeps one race record per kernel call, replaced by the next call:
    a race in any but the last kernel of a jitted function would go unseen. Every
    record's flag now also lands in ``_RACES``."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    state = gpu_callbacks.GPURaceDetectionState

    def set_found(self, found: bool) -> None:
        self.__dict__["_found"] = found
        if found:
            _RACES.append(True)

    state.races_found = property(lambda self: self.__dict__.get("_found", False), set_found)


if PLATFORM == "cpu":
    _record_every_race()


def races_recorded() -> bool:
    """Whether the Mosaic GPU interpreter recorded a race in any kernel since the last call."""
    found = bool(_RACES)
    _RACES.clear()
    return found


def per_backend(argnames: str, cases: str):
    """Parametrises a shared check with ``argnames`` from the collecting class's list
    named ``cases`` (``KernelBackend.pytest_generate_tests`` reads it)."""

    def mark(check):
        check.per_backend = (argnames, cases)
        return check

    return mark


class KernelBackend:
    """One backend as the checks see it. Subclasses set ``backend`` (its impl name;
    ``backend + "_interpret"`` runs it in the interpreter), ``home`` (the platform it
    compiles on), its ``*_module``s, and ``platform`` and ``custom_call``: what it lowers
    for, and the pattern of one kernel's custom call there. ``race_checked``: every run
    asserts the Mosaic GPU interpreter's race record clean."""

    backend: str
    home: str
    platform: str
    custom_call: str
    race_checked = False

    @property
    def native(self) -> bool:
        """Whether this host compiles the backend."""
        return PLATFORM == self.home

    @property
    def impl(self) -> str:
        """The api's name for it here: itself where it compiles, else its interpreted form."""
        return self.backend if self.native else f"{self.backend}_interpret"

    @property
    def static(self) -> Static:
        """How the checks run its kernels: in the interpreter on a CPU host, else compiled."""
        return Static(interpret=PLATFORM == "cpu")

    @property
    def skip_reason(self) -> str:
        return (
            f"the {self.backend} kernels compile only for their own platform, and the Pallas "
            f"interpreter runs them on CPU hosts only; this host's backend is {PLATFORM}"
        )

    def pytest_generate_tests(self, metafunc):
        """pytest calls it for each test of a collected class: ``per_backend`` checks take
        that class's cases."""
        spec = getattr(metafunc.function, "per_backend", None)
        if spec is not None:
            argnames, cases = spec
            metafunc.parametrize(argnames, getattr(self, cases))

    def skip_unless_runnable(self) -> None:
        """Skips a check that runs the kernels where they neither compile nor interpret."""
        if PLATFORM != "cpu" and not self.native:
            pytest.skip(self.skip_reason)

    def check_against(self, kernel, ref, args, cot_key, names, tol, *, forward_first=True):
        """``kernel``'s outputs and VJP (of cotangents drawn from ``cot_key``) against
        ``ref``'s on the CPU, as ``assert_close``. Where ``race_checked``, the race
        record is asserted clean after the forward alone (``forward_first``; the record
        covers the last kernel run) and after forward and backward."""
        self.skip_unless_runnable()
        if self.race_checked and forward_first:
            jax.block_until_ready(jax.jit(kernel)(*args))
            assert not races_recorded()
        got = value_and_grads(kernel, args, rng_for(*cot_key))
        if self.race_checked:
            assert not races_recorded()
        want = value_and_grads(ref, args, rng_for(*cot_key), device=CPU)
        assert_close(got, want, names, tol)

    def check_repeatable(self, kernel, args, cot_key) -> None:
        """Two forward and backward passes are bitwise equal."""
        first, second = value_and_grads(kernel, args, rng_for(*cot_key), repeat=2)
        for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))

    def assert_lowers(self, lowered_text, fn, args, calls) -> tuple[str, str]:
        """Lowers ``fn``, then the value and gradient of the sum of its outputs (which
        keeps the forward kernels live: JAX >= 0.12 drops forward outputs that only
        jax.grad's unused value would read), for ``platform``; asserts each one's count
        of ``custom_call``s is ``calls``' and returns both texts."""

        def loss(*a):
            return sum(jnp.sum(o.astype(F32)) for o in jax.tree.leaves(fn(*a)))

        grad = jax.value_and_grad(loss, argnums=tuple(range(len(args))))
        texts = []
        for f, count in zip((fn, grad), calls, strict=True):
            texts.append(lowered_text(f, *args, platform=self.platform))
            assert len(re.findall(self.custom_call, texts[-1])) == count
        return texts[0], texts[1]


class KernelChecks(KernelBackend):
    """Base of an op family's checks: the Triton and TPU block sizes shrunk (as
    ``shrink_blocks``) for each of them."""

    @pytest.fixture(autouse=True)
    def _small_blocks(self, monkeypatch):
        shrink_blocks(monkeypatch)


class Xla(KernelBackend):
    backend = "xla"
    home = PLATFORM


class Triton(KernelBackend):
    backend = "triton"
    home = "gpu"
    platform, custom_call = "cuda", r"custom_call @\S*triton\S*\("
    mapping_module, pre_module, post_res_module = mapping_triton, pre_triton, post_res_triton


class Tpu(KernelBackend):
    backend = "tpu"
    home = "tpu"
    platform, custom_call = "tpu", r"custom_call @tpu_custom_call\("
    mapping_module, pre_module, post_res_module = mapping_tpu, pre_tpu, post_res_tpu


class MosaicGpu(KernelBackend):
    """The Mosaic GPU kernels; on a CPU host also lowered for CUDA, which catches shared
    memory over a block's limit, illegal TMA boxes and layout-inference failures (ptxas
    errors and spills: ``test_ptxas.py``; timing: the GPU)."""

    backend = "mosaic_gpu"
    home = "gpu"
    platform, custom_call = "cuda", r"custom_call @mosaic_gpu"
    mapping_module, pre_module, post_res_module = mapping_mosaic, pre_mosaic, post_res_mosaic
    race_checked = True

    @property
    def skip_reason(self) -> str:
        return MOSAIC_GPU_HOSTS.kwargs["reason"]


# (n, C, dtype) of the Triton and TPU pre and post-res
APPLY_CASES = [(1, 200, BF16), (2, 64, F32), (3, 512, BF16), (4, 200, F32), (8, 512, BF16)]


class ApplyChecks(KernelChecks):
    """The checks every backend of an apply op (pre, post-res) passes: each input's
    cotangent against ``reference_op`` on the CPU, and one kernel lowered forward and one
    more backward. A family sets ``reference_op``, ``names``, ``kernel``, ``inputs`` and
    ``lowering_inputs``; a backend may add to ``check_lowered``."""

    CASES = APPLY_CASES
    LOWERINGS = [pytest.param(4, BF16, marks=SMOKE)]  # (n, dtype)
    reference_op: Callable
    names: list[str]

    def check_lowered(self, fwd_text, grad_text):
        """Whatever else a backend's lowered texts must show."""

    @per_backend("n, c, dtype", "CASES")
    def test_matches_reference(self, n, c, dtype):
        args, cot_key = self.inputs(n, c, dtype)
        kernel = self.kernel(self.static)
        self.check_against(kernel, self.reference_op, args, cot_key, self.names, TOL[dtype])

    @per_backend("n, dtype", "LOWERINGS")
    def test_lowers_for_its_platform(self, n, dtype, lowered_text):
        """Cross-lowering on any host: the kernel bodies go through the backend's Pallas
        lowering into its platform's custom call, one forward and one more backward."""
        kernel = self.kernel(Static(interpret=False))
        args = self.lowering_inputs(n, dtype)
        self.check_lowered(*self.assert_lowers(lowered_text, kernel, args, (1, 2)))


# The Mosaic GPU test classes' (and test_mosaic_kernels.py's) mark
MOSAIC_GPU_HOSTS = pytest.mark.skipif(
    PLATFORM not in ("cpu", "gpu"),
    reason=f"the Mosaic GPU kernels run on a GPU or in the interpreter on a CPU host, "
    f"not on {PLATFORM}",
)
# (n, C, dtype) of the Mosaic GPU pre and post-res: every n the kernels take, column
# blocks of 128 down to 32 (C = 96 and fp32 at n = 8 take the 32-column tiles), both
# stream dtypes.
MOSAIC_GPU_SHAPES = [(1, 64, F32), (2, 256, BF16), (3, 96, F32), (4, 128, BF16), (8, 64, F32)]
# (n, dtype) of the Mosaic GPU pre and post-res lowered: the smallest and the paper's n
# in both dtypes; n = 8 takes ~25 s of layout inference per kernel on a CPU, so once,
# outside the smoke set.
MOSAIC_GPU_LOWERINGS = [
    pytest.param(1, F32, marks=SMOKE),
    pytest.param(4, BF16, marks=SMOKE),
    pytest.param(4, F32, marks=SMOKE),
    (8, BF16),
]
