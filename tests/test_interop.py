"""DeepSeek-V4 weight interop (``mhc_jax.interop.deepseek_v4``): exact conversions both
ways, and the loader on synthetic safetensors files written here, checked against the
float64 V4 reference (``deepseek_v4_reference``) on the same inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from deepseek_v4_reference import v4_head, v4_layer
from safetensors.numpy import save_file

from mhc_jax import connections
from mhc_jax.interop import deepseek_v4
from mhc_jax.model import LM, ModelConfig, init_params
from pallas_kernels.mhc import api

SMALL = dict(vocab_size=64, num_blocks=2, d_model=32, num_heads=2, d_ff=64, n=4)
V4 = dict(mhc_variant="deepseek_v4", stream_reduce="learned", impl="xla")


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _v4_tensors(rng, blocks: int, n: int, c: int) -> dict[str, np.ndarray]:
    """V4-named fp32 tensors as its checkpoints hold them, plus one it would hold besides."""
    k = n * n + 2 * n
    out = {"layers.0.attn_norm.weight": np.ones(c, np.float32)}
    for b in range(blocks):
        for sub in ("attn", "ffn"):
            name = f"layers.{b}.hc_{sub}"
            out[f"{name}_fn"] = (rng.normal(size=(k, n * c)) / np.sqrt(n * c)).astype(np.float32)
            out[f"{name}_base"] = rng.normal(size=(k,)).astype(np.float32)
            out[f"{name}_scale"] = rng.uniform(0.5, 2.0, size=(3,)).astype(np.float32)
    out["hc_head_fn"] = (rng.normal(size=(n, n * c)) / np.sqrt(n * c)).astype(np.float32)
    out["hc_head_base"] = rng.normal(size=(n,)).astype(np.float32)
    out["hc_head_scale"] = np.asarray([1.5], np.float32)
    return out


def _write(tmp_path, tensors: dict) -> list:
    """The tensors split over two files, as sharded checkpoints are."""
    names = sorted(tensors)
    tmp_path.mkdir(parents=True, exist_ok=True)
    files = [tmp_path / "model-00001.safetensors", tmp_path / "model-00002.safetensors"]
    save_file({k: tensors[k] for k in names[::2]}, str(files[0]))
    save_file({k: tensors[k] for k in names[1::2]}, str(files[1]))
    return files


def test_conversions_are_exact_both_ways():
    rng = np.random.default_rng(0)
    t = _v4_tensors(rng, 1, 4, 8)
    fn, base, scale = (t[f"layers.0.hc_attn_{s}"] for s in ("fn", "base", "scale"))
    ours = deepseek_v4.connection_from_v4(fn, base, scale)
    assert ours["phi"].shape == (4, 8, 24)
    back = deepseek_v4.connection_to_v4(**ours)
    for a, b in zip((fn, base, scale), (back["fn"], back["base"], back["scale"]), strict=True):
        assert np.array_equal(a, b)
    # our h_res[k, m] is V4's comb[m, k]: phi's column 2n + k*n + m is fn's row 2n + m*n + k
    assert np.array_equal(ours["phi"].reshape(32, 24)[:, 8 + 1 * 4 + 3], fn[8 + 3 * 4 + 1])
    head = deepseek_v4.head_from_v4(t["hc_head_fn"], t["hc_head_base"], t["hc_head_scale"])
    back = deepseek_v4.head_to_v4(**head)
    assert np.array_equal(back["fn"], t["hc_head_fn"]) and head["phi"].shape == (4, 8, 4)


@pytest.mark.parametrize("scan", [False, True])
def test_loaded_model_matches_the_v4_reference(tmp_path, scan):
    cfg = ModelConfig(**SMALL, **V4, scan_layers=scan)
    rng = np.random.default_rng(1)
    tensors = _v4_tensors(rng, cfg.num_blocks, cfg.n, cfg.d_model)
    params = init_params(cfg, jax.random.key(0))
    loaded = deepseek_v4.load_deepseek_v4(params, _write(tmp_path, tensors), cfg)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)

    x = rng.normal(size=(3, 7, cfg.n, cfg.d_model)).astype(np.float32)
    f = rng.normal(size=(3, 7, cfg.d_model)).astype(np.float32)
    for b in range(cfg.num_blocks):
        for sub, conn in (("attn", "attn_conn"), ("ffn", "mlp_conn")):
            if scan:
                unit = cfg.scan_unit  # scan step b // unit holds block b as block_{b % unit}
                block = loaded["scan"][f"block_{b % unit}"][conn]
                p = jax.tree.map(lambda a, step=b // unit: a[step], block)
            else:
                p = loaded[f"group_{b}"][f"block_{b}"][conn]
            phi = p["phi"].reshape(-1, p["phi"].shape[-1])
            li, h_pre, h_post, h_res = api.mhc_mappings_and_pre(
                x, phi, p["bias"], p["alpha"], variant="deepseek_v4"
            )
            got = (li, api.apply_post_res(h_res, h_post, x, f))
            name = f"layers.{b}.hc_{sub}"
            with jax.enable_x64(True):
                want = v4_layer(
                    *(jnp.asarray(a, jnp.float64) for a in (x, tensors[f"{name}_fn"])),
                    jnp.asarray(tensors[f"{name}_base"], jnp.float64),
                    jnp.asarray(tensors[f"{name}_scale"], jnp.float64),
                    jnp.asarray(f, jnp.float64),
                )
                want = jax.tree.map(np.asarray, want)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5 * np.abs(w).max())
    head = connections.stream_head(
        jnp.asarray(x),
        loaded["stream_head_phi"].reshape(-1, cfg.n),
        loaded["stream_head_bias"],
        loaded["stream_head_scale"],
    )
    with jax.enable_x64(True):
        want = np.asarray(
            v4_head(
                *(
                    jnp.asarray(tensors[k] if k else x, jnp.float64)
                    for k in (None, "hc_head_fn", "hc_head_base", "hc_head_scale")
                )
            )
        )
    np.testing.assert_allclose(head, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    logits = LM(cfg).apply({"params": loaded}, jnp.zeros((1, 8), jnp.int32))
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_loader_names_what_is_wrong(tmp_path):
    cfg = ModelConfig(**SMALL, **V4)
    params = init_params(cfg, jax.random.key(0))
    tensors = _v4_tensors(np.random.default_rng(2), cfg.num_blocks, cfg.n, cfg.d_model)

    missing = dict(tensors)
    del missing["layers.1.hc_ffn_base"]
    with pytest.raises(KeyError, match=r"'layers.1.hc_ffn_base' is in none of 2 file"):
        deepseek_v4.load_deepseek_v4(params, _write(tmp_path / "a", missing), cfg)

    two_streams = ModelConfig(**{**SMALL, "n": 2}, **V4)
    with pytest.raises(ValueError, match=r"hc_mult=4 streams; the model has n=2"):
        deepseek_v4.load_deepseek_v4(
            init_params(two_streams, jax.random.key(0)),
            _write(tmp_path / "b", tensors),
            two_streams,
        )

    wide = ModelConfig(**{**SMALL, "d_model": 64}, **V4)
    with pytest.raises(ValueError, match=r"layers.0.hc_attn_fn has shape \(24, 128\); the model"):
        deepseek_v4.load_deepseek_v4(
            init_params(wide, jax.random.key(0)), _write(tmp_path / "c", tensors), wide
        )
    with pytest.raises(FileNotFoundError, match="no such file"):
        deepseek_v4.load_deepseek_v4(params, [tmp_path / "nothing.safetensors"], cfg)
