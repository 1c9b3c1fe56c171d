"""Analytic costs of a model: parameters (without allocating), FLOPs per token, memory.

Used by ``--dry_run`` and the benchmarks' MFU. FLOPs count a multiply-add as 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mhc_jax import config as config_lib
from mhc_jax.model import LM, ModelConfig, count_params
from pallas_kernels.mhc import variants


def abstract_param_counts(cfg: ModelConfig) -> dict[str, int]:
    """``count_params`` of an LM built only abstractly (``jax.eval_shape``): any size works."""
    shapes = jax.eval_shape(
        lambda: LM(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    )
    return count_params(shapes)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token, split into matmuls and the connections' extra work.

    Returns:
      {"dense": projections + LM head, "attention": QK^T and AV (causal: half of
      the full T x T), "connections": mHC/HC coefficient matmul and the pre and
      post-res mixing, "total": their sum}.
    """
    c, f, n, blocks = cfg.d_model, cfg.d_ff, cfg.n, cfg.num_blocks
    dense = blocks * 2 * (4 * c * c + 3 * c * f) + 2 * c * cfg.vocab_size
    attention = blocks * 2 * 2 * seq_len * c / 2
    layers = 2 * blocks
    if cfg.connection == "mhc":
        width = variants.width(n, cfg.mhc_variant)
        per_layer = 2 * n * c * width + 2 * n * c + 2 * n * n * c + 2 * n * c
    elif cfg.connection == "hc":
        dyn = 2 * n * c * (n + 2) if cfg.hc_dynamic else 0
        per_layer = dyn + 2 * n * c + 2 * n * n * c + 2 * n * c
    else:
        per_layer = c
    connections = layers * per_layer
    if cfg.stream_reduce == "learned":  # the collapse head: projection and weighted sum
        connections += 2 * n * c * n + 2 * n * c
    return {
        "dense": float(dense),
        "attention": float(attention),
        "connections": float(connections),
        "total": float(dense + attention + connections),
    }


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward (3x forward), without rematerialisation."""
    return 3.0 * forward_flops_per_token(cfg, seq_len)["total"]


def memory_estimate_bytes(cfg: ModelConfig, batch_size: int, seq_len: int) -> dict[str, float]:
    """Rough training memory (one device holding everything, no remat).

    Parameters fp32 + gradients + two AdamW moments (16 bytes/param), and the
    activations saved for the backward pass: per block and token, the streams at
    both connections (2 n C), the norms, q/k/v/attention-out (~6 C) and the MLP's
    gate/up/activation (3 d_ff), in the activation dtype, plus fp32 logits.
    """
    params = abstract_param_counts(cfg)["total"]
    act_bytes = jnp.dtype(cfg.activation_dtype).itemsize
    per_token = cfg.num_blocks * (2 * cfg.n * cfg.d_model + 8 * cfg.d_model + 3 * cfg.d_ff)
    activations = batch_size * seq_len * (per_token * act_bytes + 2 * 4 * cfg.vocab_size)
    state = 16.0 * params
    return {
        "params_and_optimizer": state,
        "activations": float(activations),
        "total": state + float(activations),
    }


def dry_run_report(cfg) -> str:
    """The resolved config, parameter counts, FLOPs per token and memory estimate."""
    model_cfg = config_lib.model_config(cfg)
    config_lib.optimizer_config(cfg)
    counts = abstract_param_counts(model_cfg)
    flops = forward_flops_per_token(model_cfg, cfg.data.seq_len)
    mem = memory_estimate_bytes(model_cfg, cfg.data.batch_size, cfg.data.seq_len)
    lines = [
        str(cfg),
        f"parameters: total {counts['total']:,}  added by connections {counts['connections']:,} "
        f"({100 * counts['connections'] / counts['total']:.2f}%)",
        f"forward FLOPs/token: {flops['total']:.4g} (dense {flops['dense']:.4g}, attention "
        f"{flops['attention']:.4g}, connections {flops['connections']:.4g}); train ~3x",
        f"memory estimate (1 device, no remat): params+optimizer "
        f"{mem['params_and_optimizer'] / 2**30:.2f} GiB, activations "
        f"{mem['activations'] / 2**30:.2f} GiB, total {mem['total'] / 2**30:.2f} GiB",
    ]
    return "\n".join(lines)
