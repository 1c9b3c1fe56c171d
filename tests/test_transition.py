"""The transition between two mHC layers (``api.transition``, ``transition_mosaic``):
post-res of layer l, then mapping + pre of layer l+1, against the two reference ops in
turn, forward and backward. ``api.transition`` is checked on every backend (see
``kernel_test_base``); the Mosaic GPU kernel, its one fused form, runs in the
interpreter with race detection on a CPU host and is lowered for CUDA; on a GPU the
same tests run it compiled."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from kernel_test_base import (
    BF16,
    F32,
    MAPPING_TOL,
    SMOKE,
    KernelBackend,
    MosaicGpu,
    T,
    Tpu,
    Triton,
    Xla,
    mapping_inputs,
    rel_error,
    rng_for,
)

from pallas_kernels.mhc import _mosaic_io, api, reference, transition_mosaic
from pallas_kernels.mhc._common import Static
from pallas_kernels.mhc.backends import UnsupportedInput
from pallas_kernels.mhc.context import Context, MappingConfig, MappingWeights


def _transition_inputs(rng, n, c, t=T):
    x = jnp.asarray(rng.standard_normal((t, n, c)), BF16)
    f = jnp.asarray(rng.standard_normal((t, c)), BF16)
    h_res = jnp.asarray(rng.uniform(0, 1, (t, n, n)) / n, F32)
    h_post = jnp.asarray(rng.uniform(0, 2, (t, n)), F32)
    _, phi, bias, alpha = mapping_inputs(rng, n, c, t=t)
    return h_res, h_post, x, f, phi, bias, alpha


def _composed(h_res, h_post, x, f, phi, bias, alpha):
    x_next = reference.apply_post_res(h_res, h_post, x, f)
    return (*reference.mhc_mappings_and_pre(x_next, phi, bias, alpha), x_next)


# The cotangents of h_res and h_post are fp32 sums over x_next's bf16 cotangent, which
# the kernels round once (mapping dx plus x_next's own, in fp32) and autodiff of the
# references rounds per term: they agree to bf16's rounding, measured up to 4e-3.
POST_RES_GRAD_TOL = 1e-2
NAMES = ["layer_input", "h_pre", "h_post", "h_res", "x_next"] + [
    f"d_{a}" for a in ("h_res", "h_post", "x", "f", "phi", "bias", "alpha")
]


def _tolerance(name, dtype):
    if name in ("d_h_res", "d_h_post"):
        assert dtype == F32
        return POST_RES_GRAD_TOL
    return MAPPING_TOL[dtype]


class TransitionChecks(KernelBackend):
    def test_api_transition_is_post_res_then_pre(self):
        """``api.transition`` on (B, T, n, C) streams equals ``api.post_res`` then
        ``api.pre``, every backend (fused on Mosaic GPU, the two ops in turn elsewhere):
        compiled on its own platform, interpreted on a CPU host."""
        self.skip_unless_runnable()
        impl = self.impl
        h_res, h_post, x, f, phi, bias, alpha = _transition_inputs(
            rng_for("api", "transition"), 4, 128
        )
        batch = lambda a: a.reshape(1, *a.shape)  # noqa: E731
        ctx = Context(batch(h_res[..., 0]), batch(h_post), batch(h_res), batch(x))
        weights, config = MappingWeights(phi, bias, alpha), MappingConfig(num_iters=20)
        with jax.default_matmul_precision("highest"):  # XLA's fp32 default on a GPU is TF32
            li, nxt = api.transition(ctx, batch(f), weights, config, impl=impl)
            x_next = api.post_res(ctx, batch(f), impl="xla")
            want_li, want = api.pre(x_next, weights, config, impl="xla")
        assert isinstance(nxt, Context) and nxt.streams.shape == (1, *x.shape)
        for g, w in zip((li, *nxt), (want_li, *want), strict=True):
            assert g.dtype == w.dtype
            assert rel_error(g, w) <= MAPPING_TOL[g.dtype]


class TestTransitionXla(TransitionChecks, Xla):
    pass


class TestTransitionTriton(TransitionChecks, Triton):
    pass


class TestTransitionTpu(TransitionChecks, Tpu):
    pass


class TestTransitionMosaicGpu(TransitionChecks, MosaicGpu):
    def kernel(self, static=None):
        static = self.static if static is None else static
        return lambda *a: transition_mosaic.transition(*a, static)

    def check_against_composed(self, args, key, forward_first=False):
        """Outputs and cotangents (the post-res coefficients' fp32 ones to
        ``POST_RES_GRAD_TOL``) against the reference ops in turn."""
        kernel = self.kernel()
        cot_key = ("cot", *key)
        self.check_against(
            kernel, _composed, args, cot_key, NAMES, _tolerance, forward_first=forward_first
        )

    # (n, C): kp = 16 with one stream and with the widest span of 192 columns (3 spans of
    # one chunk), kp = 32 at the paper's n; n = 5 (kp = 64) does not fit and runs unfused
    @pytest.mark.parametrize(
        "n, c, fused", [(1, 64, True), (2, 192, True), (4, 128, True), (5, 64, False)]
    )
    def test_matches_the_two_ops(self, n, c, fused):
        """(layer_input, h_pre, h_post, h_res, x_next) and the cotangents of h_res, h_post,
        x, f, phi, bias and alpha."""
        assert transition_mosaic.fuses(n, c, BF16, BF16) == fused
        args = _transition_inputs(rng_for("transition", n, c), n, c)
        self.check_against_composed(args, ("transition", n, c), forward_first=True)

    def test_pipelines_chunks_through_reused_stages(self, monkeypatch):
        """Spans of 3 chunks at n = 4 (2 stages): the third chunk reuses the first's input
        stage and output slot; 2 spans, T = 150 ends on a partial token block."""
        monkeypatch.setattr(_mosaic_io, "MIN_STEPS", 3)
        assert _mosaic_io.span_columns(150, 384, 64) == 192
        assert transition_mosaic.stages(4, 384, 32, 2, 2) == 2
        args = _transition_inputs(rng_for("transition", "stages"), 4, 384, t=150)
        self.check_against_composed(args, ("transition", "stages"))

    def test_backward_is_bitwise_repeatable(self):
        """The fused backward sums its span partials in a fixed order, and dphi is one
        matmul: two backward passes are bitwise equal."""
        args = _transition_inputs(rng_for("transition", "repeat"), 4, 128)
        self.check_repeatable(self.kernel(), args, ("cot", "transition", "repeat"))

    def test_fp32_streams_raise_a_typed_error(self):
        args = _transition_inputs(rng_for("transition", "fp32"), 2, 64)
        h_res, h_post, x, f, *w = args
        with pytest.raises(UnsupportedInput, match="16-bit streams"):
            transition_mosaic.transition(h_res, h_post, x.astype(F32), f, *w, self.static)

    @pytest.mark.parametrize("n", [pytest.param(4, marks=SMOKE), 2])
    def test_lowers_for_cuda(self, n, lowered_text):
        """Forward: the fused kernel, the coefficient epilogue and the pre (no projection);
        backward adds the epilogue's VJP, the pre's weight gradient and the fused backward
        (no dx kernel, no post-res backward)."""
        args = _transition_inputs(rng_for("lower", "transition", n), n, 2048)
        kernel = self.kernel(Static(interpret=False))
        _, text = self.assert_lowers(lowered_text, kernel, args, (3, 6))
        assert "mhc_transition_fwd_mgpu" in text and "mhc_mapping_proj_mgpu" not in text
        assert "mhc_transition_bwd_mgpu" in text
        assert "mhc_post_res_bwd_mgpu" not in text and "mhc_mapping_dx_mgpu" not in text


def test_api_transition_checks_shapes():
    h_res, h_post, x, f, phi, bias, alpha = _transition_inputs(rng_for("api", "shapes"), 2, 64)
    ctx = Context(h_post, h_post, h_res, x)
    with pytest.raises(ValueError, match=r"transition: f must have shape \(83, 64\)"):
        api.transition(ctx, f[:, :32], MappingWeights(phi, bias, alpha))
