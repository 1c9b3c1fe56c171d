"""The pre kernels (``pre_*.py``): ``apply_pre`` against the reference, forward and
VJP, and lowered for each backend's platform (see ``kernel_test_base``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from kernel_test_base import (
    BF16,
    F32,
    MOSAIC_GPU_HOSTS,
    MOSAIC_GPU_LOWERINGS,
    MOSAIC_GPU_SHAPES,
    ApplyChecks,
    MosaicGpu,
    T,
    Tpu,
    Triton,
    coefficients,
    normal,
    rng_for,
    streams_and_coefficients,
)

from pallas_kernels.mhc import _mosaic_io, pre_mosaic, reference
from pallas_kernels.mhc.backends import UnsupportedInput

NAMES = ["layer_input", "d_h_pre", "d_x"]


class PreChecks(ApplyChecks):
    """``apply_pre(h_pre, x)``: the layer input and the cotangents of h_pre and x against
    the reference on the CPU; one kernel lowered forward, one more backward."""

    reference_op = staticmethod(reference.apply_pre)
    names = NAMES

    def inputs(self, n, c, dtype):
        """(h_pre, x) and the cotangents' key."""
        rng = rng_for("pre", self.backend, n, c, dtype)
        return (coefficients(rng, n)[0], normal(rng, (T, n, c), dtype)), ("cot", n, c)

    def lowering_inputs(self, n, dtype):
        t, c = 64, 256
        return jnp.zeros((t, n)), jnp.zeros((t, n, c), dtype)

    def kernel(self, static):
        return lambda *a: self.pre_module.apply_pre(*a, static)


class TestPreTriton(PreChecks, Triton):
    pass


class TestPreTpu(PreChecks, Tpu):
    pass


class TestPreMosaicGpu(PreChecks, MosaicGpu):
    pytestmark = MOSAIC_GPU_HOSTS
    CASES = MOSAIC_GPU_SHAPES
    LOWERINGS = MOSAIC_GPU_LOWERINGS

    def inputs(self, n, c, dtype):
        x, _, _, _, h_pre = streams_and_coefficients(rng_for("pre", n, c), n, c, dtype)
        return (h_pre, x), ("cot", "pre", n, c)

    def lowering_inputs(self, n, dtype):
        x, _, _, _, h_pre = streams_and_coefficients(rng_for("lower"), n, 2048, dtype)
        return h_pre, x

    def check_lowered(self, fwd_text, grad_text):
        assert "optimization_barrier" in fwd_text  # see pre_mosaic.fwd: keeps XLA from cloning it
        # profiles name each kernel (mhc_jax/profiles.py counts "mhc_*" as mHC kernels)
        assert "mhc_pre_fwd_mgpu" in grad_text and "mhc_pre_bwd_mgpu" in grad_text

    def test_backward_is_bitwise_repeatable(self):
        """Column-block partials are summed in a fixed order: no atomics anywhere."""
        x, _, _, _, h_pre = streams_and_coefficients(rng_for("repeat", "pre"), 4, 128, BF16)
        self.check_repeatable(self.kernel(self.static), (h_pre, x), ("cot", "repeat", "pre"))

    def test_unsupported_widths_raise_a_typed_error(self):
        x, _, _, _, h_pre = streams_and_coefficients(rng_for("unsupported"), 4, 40, F32)
        with pytest.raises(UnsupportedInput, match=r"apply_pre: C=40 .* multiple of 32"):
            pre_mosaic.apply_pre(h_pre, x, self.static)

    def test_token_counts_past_the_grid_limit_raise_a_typed_error(self):
        t = _mosaic_io.MAX_TOKENS + 8
        x = jax.ShapeDtypeStruct((t, 2, 64), BF16)
        h = jax.ShapeDtypeStruct((t, 2), F32)
        with pytest.raises(UnsupportedInput, match=rf"T={t} tokens"):
            jax.eval_shape(self.kernel(self.static), h, x)
