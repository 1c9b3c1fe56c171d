"""The fused transition (post-res of layer l + mapping and pre of layer l+1).

Against the unfused reference, forward and backward, in interpret mode on a CPU
(compiled on a GPU); T = 83 and C not a multiple of the blocks, with the
forward's and backward's column spans lowered to 64 so that several spans'
partials are summed.
"""

from __future__ import annotations

import re
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import (
    BF16,
    CPU,
    F32,
    LOWERINGS,
    NATIVE,
    PLATFORM,
    TOL,
    T,
    _assert_close,
    _live_kernels,
    _mapping_inputs,
    _normal,
    _rng,
    _static,
    _value_and_grads,
)

from pallas_kernels.mhc import api, blocks, reference, transition_triton
from pallas_kernels.mhc._common import Static

OUTS = ["layer_input", "h_pre", "h_post", "h_res", "x_next"]
GRADS = ["d_x", "d_f", "d_h_res", "d_h_post", "d_phi", "d_bias", "d_alpha"]
pytestmark = pytest.mark.skipif(PLATFORM not in ("cpu", "gpu", "cuda"), reason=PLATFORM)


@pytest.fixture(autouse=True)
def _small_spans(monkeypatch):
    monkeypatch.setattr(blocks, "TRITON_TRANSITION_BWD_SPAN", 64)


def _inputs(rng, n, c, dtype, batch=(T,)):
    x, phi, bias, alpha = _mapping_inputs(rng, n, c, dtype)
    x = x[: np.prod(batch)].reshape(*batch, n, c)
    f = _normal(rng, (*batch, c), dtype)
    h_res = jnp.asarray(rng.uniform(0, 1, (*batch, n, n)), F32)
    h_post = jnp.asarray(rng.uniform(0, 2, (*batch, n)), F32)
    return x, f, h_res, h_post, phi, bias, alpha


@pytest.mark.parametrize("n,c,dtype", [(4, 200, BF16), (3, 64, F32), (1, 200, F32), (8, 96, BF16)])
def test_transition_matches_reference(n, c, dtype):
    rng = _rng("transition", n, c, dtype)
    args = _inputs(rng, n, c, dtype)
    static = _static("triton")
    got = _value_and_grads(
        lambda *a: transition_triton.transition(*a, static), args, _rng("cot", n, c)
    )
    want = _value_and_grads(reference.mhc_transition, args, _rng("cot", n, c), CPU)
    _assert_close(got, want, TOL[dtype], OUTS + GRADS)


def test_api_transition_with_leading_dims_matches_xla_and_is_deterministic():
    rng = _rng("api-transition")
    args = _inputs(rng, 4, 64, BF16, batch=(2, 36))
    impl = "pallas" if NATIVE["triton"] else "pallas_interpret"
    first, second = _value_and_grads(
        lambda *a: api.mhc_transition(*a, impl=impl), args, _rng("cot-t"), repeat=2
    )
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second), strict=True):
        assert bool(jnp.array_equal(a, b)), "two backward passes differ"
    want = _value_and_grads(lambda *a: api.mhc_transition(*a, impl="xla"), args, _rng("cot-t"), CPU)
    _assert_close(first, want, TOL[BF16], OUTS + GRADS)


def test_api_transition_rejects_a_mismatched_branch_output():
    x, f, h_res, h_post, phi, bias, alpha = _inputs(_rng("bad"), 2, 64, BF16)
    with pytest.raises(ValueError, match=r"mhc_transition: f must have shape \(83, 64\)"):
        api.mhc_transition(x, f[:, :32], h_res, h_post, phi, bias, alpha, impl="pallas_interpret")
    with pytest.raises(ValueError, match="f.dtype must equal x.dtype"):
        api.mhc_transition(
            x, f.astype(F32), h_res, h_post, phi, bias, alpha, impl="pallas_interpret"
        )


def _two_layers(x, phi, bias, alpha):
    """Two mHC layers as the model runs them: mapping of layer 0, one transition,
    the last post-res; F = tanh."""
    static = Static()
    li, _, h_post, h_res, x = api.mhc_mappings_and_pre(
        x, phi, bias, alpha, tied_streams=True, impl="pallas_interpret"
    )
    f = jnp.tanh(li)
    li, _, h_post, h_res, x = transition_triton.transition(
        x, f, h_res, h_post, phi, bias, alpha, static
    )
    x = api.apply_post_res(h_res, h_post, x, jnp.tanh(li), impl="pallas_interpret")
    return jnp.sum(x.astype(F32))


def test_transition_kernels_lower_for_cuda_and_save_connections_reruns_none():
    """Forward: 4 kernels (post-res, projection, coefficients, pre); with the
    backward 3 more (dh_pre, coefficient VJP, the fused dx + post-res backward).
    Under ``save_connections`` no forward kernel of the two layers re-runs."""
    from mhc_jax.remat import checkpoint_policy

    n, c, t = 4, 256, 64
    k = n * n + 2 * n
    x, f = jnp.zeros((t, n, c), BF16), jnp.zeros((t, c), BF16)
    maps = (jnp.zeros((n * c, k)), jnp.zeros(k), jnp.zeros(3))
    args = (x, f, jnp.zeros((t, n, n)), jnp.zeros((t, n)), *maps)
    platform, pattern = LOWERINGS["triton"]

    def fwd(*a):
        return transition_triton.transition(*a, Static())

    def loss(*a):
        return sum(jnp.sum(o.astype(F32)) for o in fwd(*a))

    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    for fn, kernels in ((fwd, 4), (grad, 7)):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        assert len(re.findall(pattern, text)) == kernels

    def live(policy):
        body = _two_layers if policy is None else jax.checkpoint(_two_layers, policy=policy)
        jaxpr = jax.make_jaxpr(jax.value_and_grad(body, argnums=(0, 1)))(x, *maps).jaxpr
        return Counter(_live_kernels(jaxpr))

    plain = live(None)
    assert plain["mhc_transition_bwd"] == 1 and plain["mhc_post_res_fwd"] == 2, plain
    assert live(checkpoint_policy("save_connections")) == plain
    assert live(checkpoint_policy("mhc_blocks"))["mhc_post_res_fwd"] > 2
