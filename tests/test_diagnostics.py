"""Amax gains (SPEC §6): hand example, deep random stacks, collection from a forward pass."""

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax import diagnostics as D
from mhc_jax.connections.sinkhorn import sinkhorn_knopp
from mhc_jax.model import LM, ModelConfig, init_params


def test_two_layer_hand_example():
    h0 = jnp.asarray([[1.0, 2.0], [0.0, -1.0]])
    h1 = jnp.asarray([[0.5, 0.5], [3.0, 0.0]])
    fwd, bwd = D.amax_gain(h0)
    assert float(fwd) == 3.0  # rows: |1+2|, |0-1|
    assert float(bwd) == 1.0  # cols: |1+0|, |2-1|
    prof = D.gain_profile(jnp.stack([h0, h1]))
    # forward composite at layer 1 = h1 @ h0 = [[0.5, 0.5], [3, 6]] -> rows 1, 9
    np.testing.assert_allclose(prof["composite_forward"], [3.0, 9.0])
    # backward composite at layer 0 = h1 @ h0 (cols 3.5, 6.5); at layer 1 = h1 (cols 3.5, 0.5)
    np.testing.assert_allclose(prof["composite_backward"], [6.5, 3.5])
    np.testing.assert_allclose(prof["layer_forward"], [3.0, 3.0])
    np.testing.assert_allclose(prof["layer_backward"], [1.0, 3.5])


def test_deep_mhc_stack_stays_bounded_and_hc_grows():
    depth, n = 48, 4
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(depth, n, n)) * 5.0, jnp.float32)  # large random biases
    mhc = D.gain_profile(sinkhorn_knopp(logits, 20))
    # Rows sum to 1 exactly (forward gain 1); columns to within the Sinkhorn error.
    assert float(jnp.max(mhc["composite_forward"])) <= 1.0 + 1e-5
    assert float(jnp.max(mhc["composite_backward"])) <= 1.5
    # HC: unconstrained matrices with the same entry magnitudes as mHC's.
    hc_mats = jnp.asarray(
        np.abs(rng.normal(size=(depth, n, n))) * 0.5 + jnp.eye(n) * 0.5, jnp.float32
    )
    hc = D.gain_profile(hc_mats)
    assert float(hc["composite_forward"][-1]) > 1e6
    assert float(hc["composite_backward"][0]) > 1e6
    assert bool(jnp.all(jnp.diff(hc["composite_forward"]) > 0))


def test_collect_coefficients_layer_order_and_summary():
    cfg = ModelConfig(
        vocab_size=32, num_blocks=11, d_model=16, num_heads=2, d_ff=32, connection="mhc", n=2
    )
    params = init_params(cfg, jax.random.key(0))
    toks = jnp.zeros((2, 8), jnp.int32)
    _, state = LM(cfg).apply({"params": params}, toks, mutable=["diagnostics"])
    coeffs = D.collect_coefficients(state["diagnostics"])
    assert coeffs["h_res"].shape == (22, 2, 2) and coeffs["h_pre"].shape == (22, 2)
    # residual init: layer k reads stream k mod 2 (block_10 sorts after block_9)
    np.testing.assert_array_equal(jnp.argmax(coeffs["h_pre"], -1), np.arange(22) % 2)
    stats = jax.jit(D.summary_stats)(coeffs)
    assert abs(float(stats["amax/composite_forward_max"]) - 1.0) < 1e-5
    assert float(stats["h_res/row_err_max"]) < 1e-6
    img = D.heatmap_image(coeffs["h_res"])
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3


def test_residual_model_has_no_coefficients():
    cfg = ModelConfig(
        vocab_size=32, num_blocks=2, d_model=16, num_heads=2, d_ff=32, connection="residual", n=1
    )
    params = init_params(cfg, jax.random.key(0))
    _, state = LM(cfg).apply(
        {"params": params}, jnp.zeros((1, 4), jnp.int32), mutable=["diagnostics"]
    )
    assert D.collect_coefficients(state.get("diagnostics", {})) == {}
    assert D.summary_stats({}) == {}
