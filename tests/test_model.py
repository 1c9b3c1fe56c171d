"""The LM: init equivalences, training signal, dtypes, config validation."""

import contextlib
import io
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mhc_jax.diagnostics import collect_coefficients
from mhc_jax.layers import attention_impl
from mhc_jax.model import LM, ModelConfig, count_params, init_params

SMALL = dict(vocab_size=64, num_blocks=3, d_model=32, num_heads=4, d_ff=64)


def tokens(batch=2, seq=16, vocab=64, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab)


def transplant(shared, target):
    """Copies every parameter of ``shared`` into ``target`` where the path exists."""
    flat_t = flax.traverse_util.flatten_dict(flax.core.unfreeze(target))
    for path, value in flax.traverse_util.flatten_dict(flax.core.unfreeze(shared)).items():
        if path in flat_t:
            assert flat_t[path].shape == value.shape, path
            flat_t[path] = value
    return flax.traverse_util.unflatten_dict(flat_t)


def logits_of(cfg, params, toks):
    return jax.jit(lambda p, t: LM(cfg).apply({"params": p}, t))(params, toks)


def final_streams(cfg, params, toks):
    _, state = jax.jit(LM(cfg).apply, static_argnames=("capture_intermediates", "mutable"))(
        {"params": params}, toks, capture_intermediates=True, mutable=("intermediates",)
    )
    last = cfg.num_blocks - 1
    return state["intermediates"][f"group_{last}"][f"block_{last}"]["__call__"][0]


def residual_and(connection, **kw):
    # "mean" reduction: with n identical streams the final norm then sees the
    # residual model's hidden state ("sum" scales it by n, which the norm undoes
    # only up to its eps: a ~1e-3 relative logit change at init scale).
    kw.setdefault("stream_reduce", "mean")
    res_cfg = ModelConfig(connection="residual", n=1, **SMALL)
    res_params = init_params(res_cfg, jax.random.key(0))
    cfg = ModelConfig(connection=connection, **SMALL, **kw)
    params = transplant(res_params, init_params(cfg, jax.random.key(1)))
    return res_cfg, res_params, cfg, params


@pytest.mark.parametrize("n", [2, 4])
def test_mhc_residual_init_matches_residual_model(n):
    res_cfg, res_params, cfg, params = residual_and("mhc", n=n)
    toks = tokens()
    want = logits_of(res_cfg, res_params, toks)
    got = logits_of(cfg, params, toks)
    # Streams stay identical; sum(h_pre) and the rows of h_res equal 1 up to
    # float32 rounding of the sigmoids and Sinkhorn: measured max |diff| 9e-8 (n=2), 1.2e-7 (n=4).
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    streams = final_streams(cfg, params, toks)
    ref = final_streams(res_cfg, res_params, toks)
    np.testing.assert_allclose(streams, jnp.broadcast_to(ref, streams.shape), atol=2e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_hc_init_is_exactly_the_residual_model(dynamic):
    res_cfg, res_params, cfg, params = residual_and("hc", n=4, hc_dynamic=dynamic)
    toks = tokens()
    streams = final_streams(cfg, params, toks)
    ref = final_streams(res_cfg, res_params, toks)
    # one-hot pre, identity res, unit post, zero dynamic weights: bit-exact streams
    np.testing.assert_array_equal(streams, jnp.broadcast_to(ref, streams.shape))
    want = logits_of(res_cfg, res_params, toks)
    got = logits_of(cfg, params, toks)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)  # mean of 4 equal streams: rounding


def test_n1_semantics():
    res_cfg, res_params, hc_cfg, hc_params = residual_and("hc", n=1, hc_dynamic=False)
    toks = tokens()
    np.testing.assert_array_equal(
        LM(hc_cfg).apply({"params": hc_params}, toks),
        LM(res_cfg).apply({"params": res_params}, toks),
    )
    cfg = ModelConfig(connection="mhc", n=1, **SMALL)
    params = init_params(cfg, jax.random.key(0))
    _, state = LM(cfg).apply({"params": params}, toks, mutable=["diagnostics"])
    coeffs = collect_coefficients(state["diagnostics"])
    np.testing.assert_array_equal(coeffs["h_res"], np.ones((cfg.num_layers, 1, 1)))
    np.testing.assert_allclose(coeffs["h_pre"], 0.99, rtol=1e-6)  # 1 - eps: no finite logit for 1
    np.testing.assert_allclose(coeffs["h_post"], 1.0, rtol=1e-6)


def _train(cfg, steps=30, lr=3e-3):
    params = init_params(cfg, jax.random.key(0))
    toks = tokens(batch=4, seq=32, vocab=cfg.vocab_size, seed=3)
    inputs, targets = toks[:, :-1], toks[:, 1:]
    opt = optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1)
    state = opt.init(params)

    def loss_fn(p):
        logits = LM(cfg).apply({"params": p}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize(
    "connection, n, kw",
    [("residual", 1, {}), ("hc", 4, {}), ("hc", 4, {"hc_dynamic": False}), ("mhc", 4, {})],
)
def test_training_lowers_loss(connection, n, kw):
    losses = _train(ModelConfig(connection=connection, n=n, **SMALL, **kw))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses[::5]


def test_bf16_activations_give_finite_loss_and_fp32_coefficients():
    cfg = ModelConfig(connection="mhc", n=4, dtype="bfloat16", **SMALL)
    losses = _train(cfg, steps=5)
    assert all(np.isfinite(losses))
    params = init_params(cfg, jax.random.key(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    logits, state = LM(cfg).apply({"params": params}, tokens(), mutable=["diagnostics"])
    assert logits.dtype == jnp.float32
    assert collect_coefficients(state["diagnostics"])["h_res"].dtype == jnp.float32


def test_param_counts():
    c, n, k = 32, 4, 3
    counts = {}
    for conn, nn_, kw in [
        ("residual", 1, {}),
        ("mhc", n, {}),
        ("hc", n, {}),
        ("hc", n, {"hc_dynamic": False}),
    ]:
        cfg = ModelConfig(connection=conn, n=nn_, **SMALL, **kw)
        counts[(conn, kw.get("hc_dynamic", True))] = count_params(
            init_params(cfg, jax.random.key(0))
        )
    layers = 2 * k
    assert counts[("residual", True)]["connections"] == 0
    assert counts[("mhc", True)]["connections"] == layers * (
        n * c * (n * n + 2 * n) + n * n + 2 * n + 3
    )
    assert counts[("hc", False)]["connections"] == layers * (n + n + n * n)
    assert counts[("hc", True)]["connections"] == layers * (n + n + n * n + c * (3 + n) + 2)
    for key, value in counts.items():
        assert value["total"] == counts[("residual", True)]["total"] + value["connections"], key


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n=0), r"ModelConfig.n=0 is invalid: must be an integer >= 1"),
        (dict(connection="resnet"), r"ModelConfig.connection='resnet' is invalid: must be one of"),
        (
            dict(d_model=30, num_heads=4),
            r"ModelConfig.num_heads=4 is invalid: must be a divisor of d_model=30",
        ),
        (dict(d_model=12, num_heads=4), r"ModelConfig.num_heads=4 is invalid: .*even"),
        (
            dict(sinkhorn_iters=0),
            r"ModelConfig.sinkhorn_iters=0 is invalid: must be an integer >= 1",
        ),
        (
            dict(connection="residual", n=4),
            r"ModelConfig.n=4 is invalid: must be 1 when connection='residual'",
        ),
        (dict(mhc_init="zeros"), r"ModelConfig.mhc_init='zeros' is invalid"),
        (dict(stream_reduce="max"), r"ModelConfig.stream_reduce='max' is invalid"),
        (dict(dtype="fp8"), r"ModelConfig.dtype='fp8' is invalid"),
        (dict(impl="cuda"), r"ModelConfig.impl='cuda' is invalid"),
        (
            dict(mhc_fuse_transitions="yes"),
            r"ModelConfig.mhc_fuse_transitions='yes' is invalid: must be True or False",
        ),
        (dict(attention="flash"), r"ModelConfig.attention='flash' is invalid"),
        (dict(attention="cudnn"), r"ModelConfig.attention='cudnn' is invalid: .*16-bit"),
        (
            dict(connection="mhc", impl="mosaic_gpu", dtype="bfloat16", d_model=96, num_heads=2),
            r"ModelConfig.impl='mosaic_gpu' is invalid: .*d_model a multiple of 64",
        ),
        (
            dict(connection="mhc", impl="mosaic_gpu_interpret", dtype="float32"),
            r"ModelConfig.impl='mosaic_gpu_interpret' is invalid: .*16-bit",
        ),
        (dict(num_blocks=-1), r"ModelConfig.num_blocks=-1 is invalid"),
        (dict(mhc_norm_eps=0.0), r"ModelConfig.mhc_norm_eps=0.0 is invalid: must be > 0"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("reduce", ["sum", "mean", "learned"])
def test_stream_reductions(reduce):
    cfg = ModelConfig(connection="mhc", n=4, stream_reduce=reduce, **SMALL)
    params = init_params(cfg, jax.random.key(0))
    assert ("stream_head" in params) == (reduce == "learned")
    logits = LM(cfg).apply({"params": params}, tokens())
    assert logits.shape == (2, 16, 64) and bool(jnp.all(jnp.isfinite(logits)))


def test_attention_impl_resolution():
    on_gpu = jax.default_backend() == "gpu"
    assert attention_impl("auto", jnp.bfloat16, 128, 64) == ("cudnn" if on_gpu else "xla")
    assert attention_impl("auto", jnp.float32, 128, 64) == "xla"  # cuDNN: 16-bit only
    assert attention_impl("auto", jnp.bfloat16, 256, 64) == "xla"  # head size > 128
    assert attention_impl("auto", jnp.bfloat16, 128, 31) == "xla"  # odd T: no causal training
    assert attention_impl("xla", jnp.bfloat16, 128, 64) == "xla"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_matches_xla():
    kw = dict(SMALL, d_model=128, num_heads=2, dtype="bfloat16", connection="mhc", n=4)
    cfg_x, cfg_c = ModelConfig(attention="xla", **kw), ModelConfig(attention="cudnn", **kw)
    params = init_params(cfg_x, jax.random.key(0))
    toks = tokens(batch=2, seq=128)

    def loss(cfg, p):
        logits = LM(cfg).apply({"params": p}, toks).astype(jnp.float32)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    lx, gx = jax.jit(jax.value_and_grad(lambda p: loss(cfg_x, p)))(params)
    lc, gc = jax.jit(jax.value_and_grad(lambda p: loss(cfg_c, p)))(params)
    np.testing.assert_allclose(lc, lx, rtol=1e-2)
    for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gx)):
        assert np.linalg.norm(a - b) <= 3e-2 * np.linalg.norm(b) + 1e-6


@pytest.mark.parametrize("connection,n", [("residual", 1), ("mhc", 4)])
def test_bf16_model_saves_no_fp32_activations(connection, n):
    """Norms and the SwiGLU gate recompute their fp32 intermediates in the backward
    pass: a bf16 model's autodiff residuals of token shape are all 16-bit."""
    cfg = ModelConfig(**dict(SMALL, d_model=64), connection=connection, n=n, dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    toks = tokens(batch=2, seq=16)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        jax.ad_checkpoint.print_saved_residuals(
            lambda p: LM(cfg).apply({"params": p}, toks).astype(jnp.float32).sum(), params
        )
    # f32 arrays with batch and sequence axes whose last axis is C, d_ff or n*C
    widths = {cfg.d_model, cfg.d_ff, cfg.n * cfg.d_model}
    fp32_acts = [
        line
        for line in text.getvalue().splitlines()
        if (m := re.match(r"f32\[2,16,.*?(\d+)\]", line)) and int(m.group(1)) in widths
    ]
    assert not fp32_acts, "\n".join(fp32_acts)
