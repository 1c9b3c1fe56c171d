"""The post-res kernels (``post_res_*.py``): ``apply_post_res`` against the reference,
forward and VJP, and lowered for each backend's platform (see ``kernel_test_base``)."""

from __future__ import annotations

import re

import jax.numpy as jnp
import pytest
from kernel_test_base import (
    BF16,
    F32,
    MOSAIC_GPU_HOSTS,
    MOSAIC_GPU_LOWERINGS,
    MOSAIC_GPU_SHAPES,
    SMOKE,
    TOL,
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

from pallas_kernels.mhc import _mosaic_io, post_res_mosaic, reference
from pallas_kernels.mhc._common import Static
from pallas_kernels.mhc.backends import UnsupportedInput

NAMES = ["x_next", "d_h_res", "d_h_post", "d_x", "d_f"]


class PostResChecks(ApplyChecks):
    """``apply_post_res(h_res, h_post, x, f)``: the next streams and the cotangents of
    every input against the reference on the CPU; one kernel lowered forward, one more
    backward."""

    reference_op = staticmethod(reference.apply_post_res)
    names = NAMES

    def inputs(self, n, c, dtype):
        """(h_res, h_post, x, f) and the cotangents' key."""
        rng = rng_for("post_res", self.backend, n, c, dtype)
        _, h_post, h_res = coefficients(rng, n)
        args = (h_res, h_post, normal(rng, (T, n, c), dtype), normal(rng, (T, c), dtype))
        return args, ("cot", n, c)

    def lowering_inputs(self, n, dtype):
        t, c = 64, 256
        x, f = jnp.zeros((t, n, c), dtype), jnp.zeros((t, c), dtype)
        return jnp.zeros((t, n, n)), jnp.zeros((t, n)), x, f

    def kernel(self, static):
        return lambda *a: self.post_res_module.apply_post_res(*a, static)


class TestPostResTriton(PostResChecks, Triton):
    pass


class TestPostResTpu(PostResChecks, Tpu):
    pass


class TestPostResMosaicGpu(PostResChecks, MosaicGpu):
    pytestmark = MOSAIC_GPU_HOSTS
    CASES = MOSAIC_GPU_SHAPES
    LOWERINGS = MOSAIC_GPU_LOWERINGS

    def inputs(self, n, c, dtype):
        x, f, h_res, h_post, _ = streams_and_coefficients(rng_for("post_res", n, c), n, c, dtype)
        return (h_res, h_post, x, f), ("cot", "post_res", n, c)

    def lowering_inputs(self, n, dtype):
        x, f, h_res, h_post, _ = streams_and_coefficients(rng_for("lower"), n, 2048, dtype)
        return h_res, h_post, x, f

    def check_lowered(self, fwd_text, grad_text):
        # profiles name each kernel (mhc_jax/profiles.py counts "mhc_*" as mHC kernels)
        assert "mhc_post_res_fwd_mgpu" in grad_text and "mhc_post_res_bwd_mgpu" in grad_text

    def test_backward_is_bitwise_repeatable(self):
        """Column-block partials are summed in a fixed order: no atomics anywhere."""
        rng = rng_for("repeat", "post_res")
        x, f, h_res, h_post, _ = streams_and_coefficients(rng, 4, 128, BF16)
        cot_key = ("cot", "repeat", "post_res")
        self.check_repeatable(self.kernel(self.static), (h_res, h_post, x, f), cot_key)

    def test_unsupported_widths_raise_a_typed_error(self):
        x, f, h_res, h_post, _ = streams_and_coefficients(rng_for("unsupported"), 4, 40, F32)
        with pytest.raises(UnsupportedInput, match=r"apply_post_res: C=40"):
            post_res_mosaic.apply_post_res(h_res, h_post, x, f, self.static)

    @pytest.mark.parametrize(
        "tokens, n, c, dtype, candidates",
        [(8, 2, 2048, BF16, ((64, 2, 1),)), (16, 3, 96, F32, post_res_mosaic.CANDIDATES)],
    )
    def test_takes_token_group_tiles(self, monkeypatch, tokens, n, c, dtype, candidates):
        """Forward and VJP with tiles of 8 tokens (8 boxes of 8 x 64 a tile; 4 steps
        through 2 input slots and one output buffer, each reused) and, where C = 96 has
        no whole number of the 16-token tiles' chunks, the 64-token ones; T = 83 ends
        inside a token group."""
        monkeypatch.setattr(post_res_mosaic, "TILE_TOKENS", tokens)
        monkeypatch.setattr(post_res_mosaic, "CANDIDATES", candidates)
        x, f, h_res, h_post, _ = streams_and_coefficients(rng_for("token tiles", n, c), n, c, dtype)
        args = (h_res, h_post, x, f)
        kernel, ref = self.kernel(self.static), reference.apply_post_res
        cot_key = ("cot", "token tiles", n, c)
        self.check_against(kernel, ref, args, cot_key, NAMES, TOL[dtype], forward_first=False)

    def test_plans_fit_and_pipeline(self):
        """(chunk, stages, output buffers) at the paper's n and at the widest tiles; spans
        that give 132 SMs a block each and keep >= 4 chunks per block where C has them."""
        coeffs = lambda n: (n * n + n) * 64 * 4  # noqa: E731
        fwd = post_res_mosaic.plan("f", 8192, 4096, 64 * 10, 64 * 8, coeffs(4))
        bwd = post_res_mosaic.plan("b", 8192, 4096, 64 * 18, 64 * 10, coeffs(4))
        assert (fwd.chunk, fwd.stages, fwd.outs, fwd.span) == (64, 3, 2, 2048)
        assert (bwd.chunk, bwd.stages, bwd.outs) == (64, 2, 1)
        fp32_n8 = post_res_mosaic.plan("b", 83, 64, 64 * 68, 64 * 36, coeffs(8))
        assert (fp32_n8.chunk, fp32_n8.stages, fp32_n8.span) == (16, 2, 64)
        assert _mosaic_io.span_columns(32768, 4096, 64) == 4096  # 512 blocks: whole rows
        assert _mosaic_io.span_columns(8192, 1280, 64) == 640
        assert _mosaic_io.span_columns(83, 4096, 64) == 256  # 2 blocks: 16 spans of 4 chunks
        # 8-token tiles of 8 chunks where C has them, else taller ones (C = 1280: 16 tokens)
        wide = post_res_mosaic.plan("f", 8192, 4096, 64 * 10, 64 * 8, coeffs(4), tokens=8)
        assert (wide.tokens, wide.boxes, wide.chunk, wide.span) == (8, 8, 64, 4096)
        assert post_res_mosaic.plan("f", 8192, 1280, 64 * 10, 64 * 8, coeffs(4), 8).tokens == 16
        with pytest.raises(UnsupportedInput, match=r"b: C=48 .* multiple of 32"):
            post_res_mosaic.plan("b", 83, 48, 64 * 18, 64 * 10, coeffs(4))

    @SMOKE
    def test_equal_calls_lower_to_one_kernel(self, lowered_text):
        """Two sub-layers' post-res of equal shapes share one compiled kernel (an unscanned
        model would otherwise lower and compile it once per sub-layer)."""
        x, f, h_res, h_post, _ = streams_and_coefficients(rng_for("lower", "twice"), 4, 2048, BF16)
        compiled = Static(interpret=False)

        def two_layers(h_res, h_post, x, f):
            once = post_res_mosaic.apply_post_res(h_res, h_post, x, f, compiled)
            return post_res_mosaic.apply_post_res(h_res, h_post, once, f, compiled)

        text = lowered_text(two_layers, h_res, h_post, x, f, platform=self.platform)
        assert len(re.findall(self.custom_call, text)) == 1
        assert len(re.findall(r"call @\S*fwd\S*\(", text)) == 2
