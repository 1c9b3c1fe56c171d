"""DeepSeek-V4 weight interop (``mhc_jax.interop.deepseek_v4``): exact conversions both
ways, and the loader on synthetic safetensors files written here, checked against the
float64 V4 reference (``deepseek_v4_reference``) on the same inputs."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from deepseek_v4_reference import v4_head, v4_layer
from safetensors.numpy import save_file

from mhc_jax.connections import StreamHead
from mhc_jax.interop import deepseek_v4
from mhc_jax.model import ModelConfig, init_params, make_connection

SMALL = dict(vocab_size=64, num_blocks=2, d_model=32, num_heads=2, d_ff=64, n=4)
V4 = dict(mhc_variant="deepseek_v4", stream_reduce="learned", impl="xla")


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _v4_tensors(rng, blocks: int, n: int, c: int) -> dict[str, np.ndarray]:
    """V4-named tensors as its checkpoints hold them: the connections' fp32, the head's
    bf16 (as some exports store it), and others the loader must skip (bf16 and fp8)."""
    k = n * n + 2 * n
    out = {
        "layers.0.attn_norm.weight": np.ones(c, ml_dtypes.bfloat16),
        "layers.0.ffn.w1.weight": np.ones((c, c), ml_dtypes.float8_e4m3fn),
    }
    for b in range(blocks):
        for sub in ("attn", "ffn"):
            name = f"layers.{b}.hc_{sub}"
            out[f"{name}_fn"] = (rng.normal(size=(k, n * c)) / np.sqrt(n * c)).astype(np.float32)
            out[f"{name}_base"] = rng.normal(size=(k,)).astype(np.float32)
            out[f"{name}_scale"] = rng.uniform(0.5, 2.0, size=(3,)).astype(np.float32)
    bf16 = ml_dtypes.bfloat16
    out["hc_head_fn"] = (rng.normal(size=(n, n * c)) / np.sqrt(n * c)).astype(bf16)
    out["hc_head_base"] = rng.normal(size=(n,)).astype(bf16)
    out["hc_head_scale"] = np.asarray([1.5], bf16)
    return out


def _f64(*arrays):
    return (jnp.asarray(np.asarray(a, np.float64)) for a in arrays)


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
    """Each of the model's connection modules (built from its ModelConfig, as the model
    builds them) and its collapse head, on loaded weights, against V4's float64 math;
    scanned: 4 blocks over 2 scan steps."""
    cfg = ModelConfig(**{**SMALL, "num_blocks": 4}, **V4, scan_layers=scan)
    rng = np.random.default_rng(1)
    tensors = _v4_tensors(rng, cfg.num_blocks, cfg.n, cfg.d_model)
    params = init_params(cfg, jax.random.key(0))
    loaded = deepseek_v4.load_deepseek_v4(params, _write(tmp_path, tensors), cfg)
    assert jax.tree.structure(loaded) == jax.tree.structure(params)

    x = rng.normal(size=(3, 7, cfg.n, cfg.d_model)).astype(np.float32)
    for b in range(cfg.num_blocks):
        for i, (sub, conn) in enumerate((("attn", "attn_conn"), ("ffn", "mlp_conn"))):
            if scan:
                unit = cfg.scan_unit  # scan step b // unit holds block b as block_{b % unit}
                block = loaded["scan"][f"block_{b % unit}"][conn]
                p = jax.tree.map(lambda a, step=b // unit: a[step], block)
            else:
                p = loaded[f"group_{b}"][f"block_{b}"][conn]
            module = make_connection(cfg, 2 * b + i, conn)
            got = module.apply({"params": p}, jnp.asarray(x), jnp.tanh)
            name = f"layers.{b}.hc_{sub}"
            weights = [tensors[f"{name}_{k}"] for k in ("fn", "base", "scale")]
            with jax.enable_x64(True):
                li, _ = v4_layer(*_f64(x, *weights, x[..., 0, :]))
                _, want = v4_layer(*_f64(x, *weights), jnp.tanh(li))
                want = np.asarray(want)
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
    head_module = StreamHead(cfg.mhc_norm_eps)
    got = head_module.apply({"params": loaded["stream_head"]}, jnp.asarray(x))
    with jax.enable_x64(True):
        head = [tensors[f"hc_head_{k}"] for k in ("fn", "base", "scale")]
        want = np.asarray(v4_head(*_f64(x, *head)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


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
