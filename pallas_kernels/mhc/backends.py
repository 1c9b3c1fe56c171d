"""Which implementation runs an mHC op: the names, each platform's order, the typed error.

An implementation is either one backend (``xla``, ``mosaic_gpu``, ``triton``, ``tpu``
and the ``*_interpret`` variants, which run the kernels in the Pallas interpreter on
any host) or a chain of them:

* ``auto``: the platform's kernels, fastest first, then ``xla``. A backend that does
  not take an input raises ``UnsupportedInput``; ``auto`` then runs the next one and
  logs that once per (op, backend, reason).
* ``pallas``: the platform's kernels in the same order, never ``xla``: an input no
  kernel takes is an error. ``pallas_interpret``: the platform's kernels run by the
  Pallas interpreter (the TPU kernels on a TPU host, the Triton ones elsewhere).

Every other name is explicit: it runs that backend or raises.

A kernel family loads its Pallas backend on first use. JAX 0.11 deprecated Pallas
Triton; on a JAX without one of the Pallas modules, ``auto`` and ``pallas`` leave that
family out (logged once) and an explicit name of it is an error saying so.

A backend's refusals are those raised while its ops are traced (shapes, dtypes,
widths, shared-memory and VMEM budgets are all checked in Python before a kernel is
built); a failure only the compiler meets (ptxas, Mosaic lowering) is not caught.
"""

from __future__ import annotations

import enum
import functools
import importlib

import jax
from absl import logging


class Impl(enum.StrEnum):
    AUTO = "auto"
    XLA = "xla"
    PALLAS = "pallas"
    PALLAS_INTERPRET = "pallas_interpret"
    MOSAIC_GPU = "mosaic_gpu"
    MOSAIC_GPU_INTERPRET = "mosaic_gpu_interpret"
    TRITON = "triton"
    TRITON_INTERPRET = "triton_interpret"
    TPU = "tpu"
    TPU_INTERPRET = "tpu_interpret"

    @property
    def interpret(self) -> bool:
        return self.value.endswith("_interpret")

    @property
    def kernels(self) -> str | None:
        """The kernel family of a single backend ("mosaic_gpu", "triton", "tpu"), None for xla."""
        name = self.value.removesuffix("_interpret")
        return name if name in ("mosaic_gpu", "triton", "tpu") else None


IMPLS = tuple(i.value for i in Impl)
MAX_STREAMS = 8  # the mapping kernels keep n*n Sinkhorn entries per token in registers


class UnsupportedInput(ValueError):
    """A kernel backend does not take this input; the message says why and what does."""


# Ops: the fused mapping (+ pre), the pre alone, post-res, and the transition between
# two layers (post-res, then the next layer's mapping + pre).
OPS = ("mapping", "pre", "post_res", "transition")

# The kernel families of each platform, fastest first for each op (docs/benchmarks.md):
# Mosaic GPU's mapping and pre beat Triton's at every measured shape, its post-res does
# not yet.
_ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "hopper": {
        "mapping": ("mosaic_gpu", "triton"),
        "pre": ("mosaic_gpu", "triton"),
        "post_res": ("triton", "mosaic_gpu"),
        "transition": ("mosaic_gpu", "triton"),
    },
    "gpu": {op: ("triton",) for op in OPS},
    "tpu": {op: ("tpu",) for op in OPS},
    "cpu": {op: () for op in OPS},
}


# The Pallas module each kernel family is written in.
_PALLAS_MODULES = {
    "mosaic_gpu": "jax.experimental.pallas.mosaic_gpu",
    "triton": "jax.experimental.pallas.triton",
    "tpu": "jax.experimental.pallas.tpu",
}


@functools.cache
def missing(kernels: str) -> str | None:
    """Why this JAX cannot build kernel family ``kernels`` (its Pallas module does not
    import), else None."""
    module = _PALLAS_MODULES[kernels]
    try:
        importlib.import_module(module)
    except ImportError as e:
        return f"JAX {jax.__version__} has no {module} ({e})"
    return None


def _present(kernels: tuple[str, ...]) -> tuple[str, ...]:
    """``kernels`` less the families this JAX cannot build, each logged once."""
    for k in kernels:
        if why := missing(k):
            _note_once(f"mHC kernels: {k} is left out of 'auto' and 'pallas': {why}")
    return tuple(k for k in kernels if not missing(k))


def parse(impl: str, field: str = "impl") -> Impl:
    """``impl`` as an Impl; a ValueError naming ``field``, the value and the names allowed."""
    try:
        return Impl(impl)
    except ValueError:
        raise ValueError(f"{field} must be one of {IMPLS}, got {impl!r}") from None


def platform() -> str:
    """ "hopper" (an NVIDIA GPU of compute capability 9.x, which Mosaic GPU's wgmma
    kernels need), "gpu" (any other GPU), "tpu" or "cpu"."""
    backend = jax.default_backend()
    if backend in ("gpu", "cuda", "rocm"):
        capability = getattr(jax.devices()[0], "compute_capability", "")
        return "hopper" if str(capability).startswith("9.") else "gpu"
    return "tpu" if backend == "tpu" else "cpu"


def _needs(kernels: str) -> tuple[str, ...]:
    return {"mosaic_gpu": ("hopper",), "triton": ("hopper", "gpu"), "tpu": ("tpu",)}[kernels]


def chain(impl: str | Impl, op: str, field: str = "impl") -> tuple[Impl, ...]:
    """The single backends ``impl`` tries for ``op``, in order.

    Raises:
      ValueError: an unknown name, or an explicit backend (``pallas`` included) that
        cannot run on this platform or whose Pallas module this JAX lacks; the message
        names ``field``.
    """
    impl, where = parse(impl, field), platform()
    backend = jax.default_backend()
    if impl in (Impl.AUTO, Impl.PALLAS):
        order = tuple(Impl(k) for k in _present(_ORDER[where][op]))
        if impl == Impl.AUTO:
            return (*order, Impl.XLA)
        if not order and _ORDER[where][op]:
            reasons = "; ".join(str(missing(k)) for k in _ORDER[where][op])
            raise ValueError(
                f"{field}='pallas' is unavailable for {op!r}: {reasons}; use {field}='auto' or "
                f"{field}='xla'"
            )
        if not order:
            raise ValueError(
                f"{field}='pallas' is invalid on the {backend!r} backend: the kernels need a "
                f"GPU or TPU; use {field}='pallas_interpret' or {field}='xla'"
            )
        return order
    asked = impl.value
    if impl == Impl.PALLAS_INTERPRET:
        impl = Impl.TPU_INTERPRET if where == "tpu" else Impl.TRITON_INTERPRET
    if impl.kernels and (why := missing(impl.kernels)):
        raise ValueError(
            f"{field}={asked!r} is unavailable: {why}; use {field}='auto' or {field}='xla'"
        )
    if impl.kernels and not impl.interpret and where not in _needs(impl.kernels):
        wanted = {"mosaic_gpu": "an NVIDIA Hopper GPU (sm_90)", "triton": "a GPU"}
        raise ValueError(
            f"{field}={impl.value!r} is invalid on the {backend!r} backend ({where}): the "
            f"kernels need {wanted.get(impl.kernels, 'a TPU')}; use {field}='auto', "
            f"{field}='xla' or {field}='{impl.value}_interpret'"
        )
    return (impl,)


def resolve(impl: str, n: int, field: str = "impl") -> str:
    """What a model runs for ``impl`` and n streams, checked before anything is traced:
    "xla" where no kernel can run (a CPU host under "auto", or more than MAX_STREAMS
    streams, said once in the log), else ``impl`` itself ("auto" and "pallas" then pick a
    backend per op and input).

    Raises:
      ValueError: naming ``field``, for an unknown name, or an explicit choice that
        this host or n cannot run.
    """
    if impl not in IMPLS:
        raise ValueError(f"{field}={impl!r} is invalid: must be one of {IMPLS}")
    fits = 1 <= n <= MAX_STREAMS
    if impl not in ("auto", "xla") and not fits:
        raise ValueError(
            f"{field}={impl!r} is invalid for n={n}: the Pallas kernels support 1 <= n <= "
            f"{MAX_STREAMS} streams; use 'auto' (XLA for larger n) or 'xla'"
        )
    if all(chain(impl, op, field) == (Impl.XLA,) for op in OPS):
        return "xla"
    if impl == "auto" and not fits:
        _note_once(
            f"{field}='auto': the Pallas kernels support 1 <= n <= {MAX_STREAMS} streams, "
            f"so mHC with n={n} runs on the XLA path"
        )
        return "xla"
    return impl


def describe(impl: str | Impl) -> str:
    """What ``impl`` runs here: ``auto (triton > xla)`` on a non-Hopper GPU, per op
    where the orders differ (``auto (mapping: mosaic_gpu > triton > xla; ...)``)."""
    impl = parse(impl)
    if impl not in (Impl.AUTO, Impl.PALLAS):
        return impl.value
    orders = {op: " > ".join(b.value for b in chain(impl, op)) for op in OPS}
    if len(set(orders.values())) == 1:
        return f"{impl.value} ({orders[OPS[0]]})"
    return f"{impl.value} (" + "; ".join(f"{op}: {o}" for op, o in orders.items()) + ")"


@functools.cache
def _note_once(message: str) -> None:
    logging.warning(message)


@functools.cache
def note_fallback(op: str, backend: str, reason: str, then: str) -> None:
    """Logs, once per argument tuple, that ``backend`` refused an input of ``op``."""
    logging.warning(
        "mHC %s: %s does not take this input (%s); running %s", op, backend, reason, then
    )
