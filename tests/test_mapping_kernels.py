"""The mapping kernels (``mapping_*.py``, with ``mapping_cluster_mosaic.py``): the
coefficients, and the fused pre, against the references, forward and VJP, and lowered
for each backend's platform (see ``kernel_test_base``)."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import pytest
from kernel_test_base import (
    BF16,
    F32,
    MAPPING_TOL,
    MOSAIC_GPU_HOSTS,
    SMOKE,
    TOL,
    KernelChecks,
    MosaicGpu,
    T,
    Tpu,
    Triton,
    mapping_inputs,
    per_backend,
    rng_for,
)

from pallas_kernels.mhc import _mosaic_io, mapping_cluster_mosaic, mapping_mosaic, reference
from pallas_kernels.mhc._common import Static
from pallas_kernels.mhc.backends import UnsupportedInput

# d_alpha sums raw * dt over every token and coefficient; fp32 kernel and fp32
# library each land about 1e-5 from float64 there (measured), so allow 5e-5.
TOL_DALPHA_F32 = 5e-5


class Lowering(NamedTuple):
    """A mapping lowered: its arguments, and its custom calls forward and under jax.grad."""

    with_pre: bool
    tied: bool
    variant: str
    calls: tuple[int, int]
    n: int = 4


def lowerings(mapping, mapping_and_pre):
    """The Triton and TPU lowerings: the mapping, the mapping + pre, and the coefficient
    kernels with DeepSeek-V4's Sinkhorn, given each one's custom calls."""
    cases = {
        "mapping": Lowering(False, False, "paper", mapping),
        "mapping_and_pre": Lowering(True, False, "paper", mapping_and_pre),
        "mapping_deepseek_v4": Lowering(False, False, "deepseek_v4", mapping),
    }
    return [pytest.param(case, id=name, marks=SMOKE) for name, case in cases.items()]


class MappingChecks(KernelChecks):
    """``mapping(x, phi, bias, alpha, static, with_pre, tied)``: (layer_input if with_pre,
    h_pre, h_post, h_res, x if tied) and the cotangents of x, phi, bias and alpha against
    the references on the CPU; lowered, forward and under jax.grad."""

    # (n, C, dtype, with_pre, tied)
    CASES = [
        (1, 200, BF16, True, False),
        (2, 512, BF16, False, False),
        (2, 64, F32, True, False),
        (3, 200, F32, True, False),
        (4, 200, BF16, True, False),
        (4, 512, F32, False, False),
        (8, 64, F32, True, False),
        (8, 200, BF16, False, False),
        # tied: x is a fifth output; its cotangent joins d_x in the kernel
        (4, 200, BF16, True, True),
        (3, 64, F32, True, True),
    ]

    def inputs(self, n, c, dtype, with_pre, tied):
        """(x, phi, bias, alpha) and the cotangents' key."""
        if tied:
            rng, cot_key = rng_for("tied", self.backend, n, c, dtype), ("cot", n)
        else:
            rng, cot_key = rng_for("mapping", self.backend, n, c, dtype, with_pre), ("cot", n, c)
        return mapping_inputs(rng, n, c, dtype), cot_key

    def tolerance(self, dtype):
        """The limit of each output's and cotangent's error, by name and dtype, for
        streams of ``dtype``."""
        return lambda name, leaf: (
            TOL_DALPHA_F32 if name == "d_alpha" and dtype == F32 else TOL[dtype]
        )

    def lowering_inputs(self, n):
        t, c, k = 64, 256, n * n + 2 * n
        return jnp.zeros((t, n, c), BF16), jnp.zeros((n * c, k)), jnp.zeros(k), jnp.zeros(3)

    def check_lowered(self, case, grad_text):
        """Whatever else a backend's lowered gradient must show."""

    def check_mapping(self, args, cot_key, dtype, with_pre, tied, forward_first=True):
        static = self.static

        def kernel(*a):
            return self.mapping_module.mapping(*a, static, with_pre, tied)

        def ref(*a):
            outs = (reference.mhc_mappings_and_pre if with_pre else reference.mhc_mappings)(*a)
            return (*outs, a[0]) if tied else outs

        outs = ["layer_input"] * with_pre + ["h_pre", "h_post", "h_res"] + ["x"] * tied
        names = outs + ["d_x", "d_phi", "d_bias", "d_alpha"]
        tol = self.tolerance(dtype)
        self.check_against(kernel, ref, args, cot_key, names, tol, forward_first=forward_first)

    @per_backend("n, c, dtype, with_pre, tied", "CASES")
    def test_matches_reference(self, n, c, dtype, with_pre, tied):
        args, cot_key = self.inputs(n, c, dtype, with_pre, tied)
        self.check_mapping(args, cot_key, dtype, with_pre, tied)

    @per_backend("case", "LOWERINGS")
    def test_lowers_for_its_platform(self, case, lowered_text):
        """Cross-lowering on any host: the kernel bodies go through the backend's Pallas
        lowering into its platform's custom call, one per kernel."""
        static = Static(interpret=False, variant=case.variant)

        def fn(*a):
            return self.mapping_module.mapping(*a, static, case.with_pre, case.tied)

        args = self.lowering_inputs(case.n)
        _, grad_text = self.assert_lowers(lowered_text, fn, args, case.calls)
        self.check_lowered(case, grad_text)


class TestMappingTriton(MappingChecks, Triton):
    # forward: the projection and the coefficients, + 1 with the pre; each with its VJP
    LOWERINGS = lowerings(mapping=(2, 4), mapping_and_pre=(3, 6))


class TestMappingTpu(MappingChecks, Tpu):
    LOWERINGS = lowerings(mapping=(1, 3), mapping_and_pre=(1, 4))


class TestMappingMosaicGpu(MappingChecks, MosaicGpu):
    """bf16 streams (the Mosaic mapping takes 16-bit streams only)."""

    pytestmark = MOSAIC_GPU_HOSTS
    # (n, C, dtype, with_pre, tied): the projection's spans, the dx kernel's column blocks
    # and the pre's weight gradient at the narrowest and widest coefficient rows (kp 16, 128)
    CASES = [
        (1, 64, BF16, False, False),
        (4, 128, BF16, True, False),
        (4, 192, BF16, True, True),
        (8, 64, BF16, True, False),
    ]
    # The tied mapping + pre. Forward: the projection, the coefficient epilogue and the pre;
    # backward adds the epilogue's VJP, the pre's weight gradient and the dx kernel (which
    # also gives dphi); DeepSeek-V4's Sinkhorn and its VJP in the coefficient kernels.
    LOWERINGS = [
        pytest.param(Lowering(True, True, "paper", (3, 6), n=4), id="4", marks=SMOKE),
        pytest.param(Lowering(True, True, "paper", (3, 6), n=8), id="8"),
        pytest.param(Lowering(True, True, "deepseek_v4", (3, 6)), id="deepseek_v4"),
    ]

    def inputs(self, n, c, dtype, with_pre, tied):
        return mapping_inputs(rng_for("mapping", n, c), n, c, dtype), ("cot", "mapping", n, c)

    def tolerance(self, dtype):
        return lambda name, leaf: MAPPING_TOL[leaf]

    def lowering_inputs(self, n, c=2048, t=T):
        return mapping_inputs(rng_for("lower", n), n, c, t=t)

    def check_lowered(self, case, grad_text):
        names = ["mapping_coef_fwd", "mapping_coef_bwd"]
        if case.variant == "paper":
            names += ["mapping_proj", "pre_fwd", "pre_dh", "mapping_dx"]
        assert all(f"mhc_{name}_mgpu" in grad_text for name in names)

    # (n, C, with_pre): clusters of 1 (n = 8: kp = 128), 4, 5 and 8 CTAs
    @pytest.mark.parametrize(
        "n, c, with_pre", [(8, 64, True), (2, 256, False), (4, 320, True), (4, 512, True)]
    )
    def test_cluster_forward_matches_reference(self, monkeypatch, n, c, with_pre):
        """The mapping with its forward as one cluster kernel per token block: the CTAs'
        partials cross through global memory behind a cluster barrier (a missing wait on it
        is recorded as a race); outputs and cotangents as test_matches_reference."""
        monkeypatch.setattr(mapping_mosaic, "FORWARD", "cluster")
        assert mapping_cluster_mosaic.cluster_size(c) == {64: 1, 256: 4, 320: 5, 512: 8}[c]
        args, cot_key = self.inputs(n, c, BF16, with_pre, False)
        self.check_mapping(args, cot_key, BF16, with_pre, False)

    def test_dx_kernel_pipelines_a_token_group(self, monkeypatch):
        """The dx kernel's CTAs loop over token groups: here 2 groups of 3 blocks for
        T = 300 (5 blocks), so its pipeline reuses each stage and output slot, the second
        group ends on a partial block and then one wholly past T; dphi sums both groups."""
        monkeypatch.setattr(_mosaic_io, "SMS", 8)  # 4 column blocks -> 2 token groups
        assert mapping_mosaic._dx_groups(300, 4) == 2
        assert mapping_mosaic._dx_groups(300, 2) == 3  # not 4 groups of 2 blocks: one past T
        args = mapping_inputs(rng_for("mapping", "groups"), 4, 128, t=300)
        cot_key = ("cot", "mapping", "groups")
        self.check_mapping(args, cot_key, BF16, True, True, forward_first=False)

    def test_takes_16_bit_streams_and_whole_chunks(self):
        x, phi, bias, alpha = mapping_inputs(rng_for("mapping", "bad"), 4, 64)
        with pytest.raises(UnsupportedInput, match=r"float32 streams"):
            mapping_mosaic.mapping(x.astype(F32), phi, bias, alpha, self.static, True)
        x, phi, bias, alpha = mapping_inputs(rng_for("mapping", "bad"), 4, 96)
        with pytest.raises(UnsupportedInput, match=r"C=96: .* multiple of 64"):
            mapping_mosaic.mapping(x, phi, bias, alpha, self.static, True)

    def test_backward_is_bitwise_repeatable(self):
        """Column-block partials are summed in a fixed order: no atomics anywhere."""
        args = mapping_inputs(rng_for("repeat", "mapping"), 4, 128)
        static = self.static

        def kernel(*a):
            return mapping_mosaic.mapping(*a, static, True, True)

        self.check_repeatable(kernel, args, ("cot", "repeat", "mapping"))

    @pytest.mark.parametrize("n, c", [(4, 4096), (8, 4096), (4, 1280)])
    def test_cluster_forward_lowers_for_cuda(self, monkeypatch, n, c, lowered_text):
        """One kernel forward (clusters of 8, 8 and 5 CTAs; n = 8's kp = 128 partials take
        two peers per load); the backward's three kernels are the split forward's."""
        monkeypatch.setattr(mapping_mosaic, "FORWARD", "cluster")
        compiled = Static(interpret=False)

        def fn(*a):
            return mapping_mosaic.mapping(*a, compiled, True, True)

        args = self.lowering_inputs(n, c, t=1024)
        _, text = self.assert_lowers(lowered_text, fn, args, (1, 4))
        assert "mhc_mapping_cluster_fwd_mgpu" in text and "mhc_mapping_proj_mgpu" not in text
