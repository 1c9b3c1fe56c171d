"""DeepSeek-V4's mHC weights in this project's layout, both ways, and a loader.

V4 gives each sub-layer three fp32 tensors (attention's ``hc_attn_*``, the FFN's
``hc_ffn_*``) and the model one collapse head (``hc_head_*``):

    fn     (K, n*C)   rows [pre (n) | post (n) | comb (n*n, entry (m, k) at m*n + k)]
    base   (K,)       the same order
    scale  (3,)       pre, post, comb        (the head's: (1,), and fn (n, n*C))

V4's post step contracts comb's first index, ``x_next[k] = sum_m comb[m, k] x[m]``, so
this project's ``h_res[k, m] = comb[m, k]``: phi is fn transposed with the n*n res
columns reordered from (m, k) to (k, m), bias likewise, alpha = scale. Both
conversions are permutations and reshapes: exact. Parity with V4's outputs also needs
``model.mhc_variant="deepseek_v4"`` (its eps terms) and, for the head,
``model.stream_reduce="learned"``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import traverse_util

from pallas_kernels.mhc import variants

__all__ = [
    "connection_from_v4",
    "connection_to_v4",
    "head_from_v4",
    "head_to_v4",
    "load_deepseek_v4",
]

SUB_LAYERS = (("attn", "attn_conn"), ("ffn", "mlp_conn"))  # V4's name, this model's


def _res_order(n: int) -> np.ndarray:
    """Column j of phi is row ``order[j]`` of V4's fn (its own inverse: a transpose)."""
    res = 2 * n + np.arange(n * n).reshape(n, n).T.ravel()
    return np.concatenate([np.arange(2 * n), res])


def _streams(fn: np.ndarray, name: str) -> int:
    if fn.ndim != 2:
        raise ValueError(f"{name}: expected a (K, n*C) matrix, got shape {fn.shape}")
    try:
        return variants.streams_of_width(fn.shape[0], "paper")
    except ValueError:
        raise ValueError(
            f"{name}: {fn.shape[0]} rows is no n*n + 2n for any stream count n"
        ) from None


def connection_from_v4(fn, base, scale) -> dict[str, np.ndarray]:
    """One sub-layer's V4 tensors -> this project's connection parameters
    ``{"phi": (n, C, K), "bias": (K,), "alpha": (3,)}``, fp32."""
    fn = np.asarray(fn, np.float32)
    n = _streams(fn, "fn")
    k, nc = fn.shape
    if nc % n:
        raise ValueError(f"fn: {nc} columns is not n*C for n={n} streams")
    _expect("base", base, (k,))
    _expect("scale", scale, (3,))
    order = _res_order(n)
    return {
        "phi": fn.T[:, order].reshape(n, nc // n, k),
        "bias": np.asarray(base, np.float32)[order],
        "alpha": np.asarray(scale, np.float32),
    }


def connection_to_v4(phi, bias, alpha) -> dict[str, np.ndarray]:
    """``connection_from_v4`` inverted: (phi (n, C, K), bias, alpha) -> fn, base, scale."""
    phi = np.asarray(phi, np.float32)
    n, c, k = phi.shape
    order = _res_order(n)  # a transpose of the res block: its own inverse
    return {
        "fn": phi.reshape(n * c, k)[:, order].T.copy(),
        "base": np.asarray(bias, np.float32)[order],
        "scale": np.asarray(alpha, np.float32),
    }


def head_from_v4(fn, base, scale) -> dict[str, np.ndarray]:
    """V4's collapse head -> ``{"phi": (n, C, n), "bias": (n,), "scale": (1,)}``."""
    fn = np.asarray(fn, np.float32)
    n, nc = fn.shape
    _expect("hc_head_base", base, (n,))
    _expect("hc_head_scale", scale, (1,))
    return {
        "phi": fn.T.reshape(n, nc // n, n),
        "bias": np.asarray(base, np.float32),
        "scale": np.asarray(scale, np.float32),
    }


def head_to_v4(phi, bias, scale) -> dict[str, np.ndarray]:
    """``head_from_v4`` inverted."""
    phi = np.asarray(phi, np.float32)
    n, c, _ = phi.shape
    return {
        "fn": phi.reshape(n * c, n).T.copy(),
        "base": np.asarray(bias, np.float32),
        "scale": np.asarray(scale, np.float32),
    }


def _expect(name: str, a, shape: tuple) -> None:
    if tuple(np.shape(a)) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(np.shape(a))}")


# safetensors: an 8-byte little-endian header length, a JSON header naming each tensor's
# dtype, shape and byte range in the data that follows. Read directly, so that only the
# few hc_* tensors of a multi-GB shard are fetched (ranged reads, local or gs://).
_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


class _Tensors:
    """Named tensors across safetensors files, read on demand."""

    def __init__(self, files: Iterable[epath.PathLike]):
        self.where: dict[str, tuple[epath.Path, int, dict]] = {}
        self.files = []
        for f in files:
            path = epath.Path(f)
            paths = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
            for p in paths:
                if not p.exists():
                    raise FileNotFoundError(f"load_deepseek_v4: no such file: {p}")
                self.files.append(str(p))
                with p.open("rb") as fh:
                    (size,) = struct.unpack("<Q", fh.read(8))
                    header = json.loads(fh.read(size))
                header.pop("__metadata__", None)
                for key, info in header.items():
                    self.where[key] = (p, 8 + size, info)
        if not self.files:
            raise FileNotFoundError(f"load_deepseek_v4: no .safetensors files in {files}")

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise KeyError(
                f"load_deepseek_v4: tensor {name!r} is in none of {len(self.files)} file(s): "
                f"{', '.join(self.files)}"
            )
        path, data_start, info = self.where[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(
                f"load_deepseek_v4: {name} in {path} is {info['dtype']}; the connection "
                f"tensors must be one of {tuple(_DTYPES)}"
            )
        begin, end = info["data_offsets"]
        with path.open("rb") as fh:
            fh.seek(data_start + begin)
            raw = fh.read(end - begin)
        value = np.frombuffer(raw, _DTYPES[info["dtype"]]).reshape(info["shape"])
        return value.astype(np.float32)


def _block_slots(params: Mapping, num_blocks: int, scan_unit: int | None):
    """(path of block b's parameter dict, index along its leading axis or None) per b."""
    flat = traverse_util.flatten_dict(params)
    slots = []
    for b in range(num_blocks):
        if scan_unit:
            name, step = f"block_{b % scan_unit}", b // scan_unit
        else:
            name, step = f"block_{b}", None
        prefixes = {path[: path.index(name) + 1] for path in flat if name in path}
        if scan_unit:
            prefixes = {p for p in prefixes if p[0] == "scan"}
        if len(prefixes) != 1:
            raise ValueError(f"load_deepseek_v4: the parameters hold no single {name!r}")
        slots.append((prefixes.pop(), step))
    return slots


def load_deepseek_v4(params: Mapping, files, config, *, prefix: str = "") -> dict:
    """``params`` (an ``LM(config)`` parameter tree) with every connection, and the
    collapse head when ``config.stream_reduce == "learned"``, replaced by DeepSeek-V4's
    tensors ``{prefix}layers.{b}.hc_{attn,ffn}_{fn,base,scale}`` and
    ``{prefix}hc_head_{fn,base,scale}`` for blocks b < ``config.num_blocks``.

    Args:
      params: the model's parameters (as ``model.init_params`` returns them).
      files: a safetensors file or directory, or a list of them (local or ``gs://``).
      config: the model's ``ModelConfig``.
      prefix: prepended to V4's names (e.g. "model." for re-exported checkpoints).

    Raises:
      KeyError: a tensor is missing (named, with the files searched).
      ValueError: a shape does not match the model, or the checkpoint's stream count
        differs from ``config.n`` (both named).
    """
    if config.connection != "mhc":
        raise ValueError(
            f"load_deepseek_v4: config.connection={config.connection!r}; V4's weights are mHC"
        )
    if config.mhc_variant != "deepseek_v4":
        logging.warning(
            "load_deepseek_v4: model.mhc_variant=%r; V4's own outputs need 'deepseek_v4'",
            config.mhc_variant,
        )
    tensors = _Tensors([files] if isinstance(files, str | os.PathLike) else files)
    flat = traverse_util.flatten_dict(dict(params))
    scan_unit = config.scan_unit if config.scan_layers else None
    for b, (path, step) in enumerate(_block_slots(params, config.num_blocks, scan_unit)):
        for theirs, ours in SUB_LAYERS:
            name = f"{prefix}layers.{b}.hc_{theirs}"
            fn = tensors.get(f"{name}_fn")
            n_file = _streams(fn, f"{name}_fn")
            if n_file != config.n:
                raise ValueError(
                    f"load_deepseek_v4: {name}_fn has {fn.shape[0]} rows, i.e. hc_mult={n_file} "
                    f"streams; the model has n={config.n}"
                )
            want = (config.n * config.d_model, variants.width(config.n))
            if fn.shape[::-1] != want:
                raise ValueError(
                    f"load_deepseek_v4: {name}_fn has shape {fn.shape}; the model needs "
                    f"{want[::-1]} (n={config.n}, d_model={config.d_model})"
                )
            conv = connection_from_v4(fn, tensors.get(f"{name}_base"), tensors.get(f"{name}_scale"))
            for key, value in conv.items():
                _put(flat, (*path, ours, key), step, value)
    if config.stream_reduce != "learned":
        logging.warning(
            "load_deepseek_v4: model.stream_reduce=%r, so V4's hc_head_* tensors are not "
            "loaded; its collapse head is stream_reduce='learned'",
            config.stream_reduce,
        )
    else:
        fn = tensors.get(f"{prefix}hc_head_fn")
        if fn.shape != (config.n, config.n * config.d_model):
            raise ValueError(
                f"load_deepseek_v4: {prefix}hc_head_fn has shape {fn.shape}; the model needs "
                f"{(config.n, config.n * config.d_model)}"
            )
        head = head_from_v4(
            fn, tensors.get(f"{prefix}hc_head_base"), tensors.get(f"{prefix}hc_head_scale")
        )
        for key, value in head.items():
            _put(flat, ("stream_head", key), None, value)
    return traverse_util.unflatten_dict(flat)


def _put(flat: dict, path: tuple, step: int | None, value: np.ndarray) -> None:
    old = flat[path]
    target = old.shape if step is None else old.shape[1:]
    if tuple(target) != value.shape:
        raise ValueError(
            f"load_deepseek_v4: {'/'.join(path)} has shape {target}, V4 gives {value.shape}"
        )
    new = jnp.asarray(value, old.dtype)
    flat[path] = new if step is None else old.at[step].set(new)
