"""Rematerialisation policies, chosen by name (``ModelConfig.remat``).

Each policy wraps groups of consecutive transformer blocks in ``jax.checkpoint``
(``nn.remat``); what a group keeps for the backward pass:

- ``none``: everything (no rematerialisation).
- ``full``: only each block's input streams (n*C per token); all else recomputed.
- ``save_dots``: each block's input and every matmul output without batch dims
  (projections, MLP, mHC's ``x @ phi``), and cuDNN attention's forward outputs
  (its output and softmax statistics, all its backward needs: without them the
  backward re-runs the attention forward kernel); elementwise work, norms, XLA
  attention's scores, Sinkhorn and the stream mixing are recomputed.
- ``mhc_blocks``: mHC paper §4.3.2 (SPEC §8): groups of L_r consecutive layers
  keep only the group's input streams and each layer's sub-layer output F(.)
  (named ``branch_out``), plus F's own matmul and attention outputs as in
  ``save_dots``;
  everything mHC (mapping, Sinkhorn, pre, post-res, the streams inside the
  group) is recomputed. L_r defaults to round(sqrt(n L / (n + 2))) layers.
- ``save_connections``: ``save_dots`` plus what every connection computes
  around F (output streams, layer input, coefficients; named
  ``connection_out``) and the mHC kernels' outputs (``mhc_kernel_output``):
  the backward recomputes only F's elementwise work and no connection
  forward, for about (n + 1) C more saved values per token and layer than
  ``save_dots``.
"""

from __future__ import annotations

import math

import jax

from mhc_jax.connections.modules import BRANCH_OUTPUT, CONNECTION_OUTPUT
from pallas_kernels.mhc._common import KERNEL_OUTPUT

POLICIES = ("none", "full", "save_dots", "mhc_blocks", "save_connections")
# The primitive ``jax.nn.dot_product_attention(implementation="cudnn")`` binds for its
# forward kernel (JAX 0.11-0.12); its outputs are the attention output and the softmax
# statistics that the backward kernel reads.
CUDNN_ATTENTION_FWD = "dot_product_attention_fwd_wrapper"


def _cudnn_attention_outputs(prim, *_, **__) -> bool:
    return prim.name == CUDNN_ATTENTION_FWD


def _matmuls_and_attention():
    cp = jax.checkpoint_policies
    return cp.save_from_both_policies(cp.dots_with_no_batch_dims_saveable, _cudnn_attention_outputs)


def checkpoint_policy(name: str):
    """The ``jax.checkpoint`` policy of ``name`` (None for "none")."""
    cp = jax.checkpoint_policies
    if name not in POLICIES:
        raise ValueError(f"remat policy must be one of {POLICIES}, got {name!r}")
    return {
        "none": None,
        "full": cp.nothing_saveable,
        "save_dots": _matmuls_and_attention(),
        "mhc_blocks": cp.save_from_both_policies(
            _matmuls_and_attention(), cp.save_only_these_names(BRANCH_OUTPUT)
        ),
        "save_connections": cp.save_from_both_policies(
            _matmuls_and_attention(),
            cp.save_only_these_names(BRANCH_OUTPUT, CONNECTION_OUTPUT, KERNEL_OUTPUT),
        ),
    }[name]


def default_recompute_layers(n: int, num_layers: int) -> int:
    """The paper's best block length L_r = round(sqrt(n L / (n + 2))), in layers (>= 1)."""
    return max(1, round(math.sqrt(n * num_layers / (n + 2))))


def blocks_per_group(name: str, n: int, num_blocks: int, recompute_layers: int = 0) -> int:
    """Transformer blocks (two layers each) per checkpointed group.

    ``mhc_blocks`` groups ceil(L_r / 2) blocks (L_r = ``recompute_layers``, or the
    default when 0), capped at ``num_blocks``; the other policies group one block.
    """
    if name != "mhc_blocks":
        return 1
    layers = recompute_layers or default_recompute_layers(n, 2 * num_blocks)
    return min(num_blocks, max(1, math.ceil(layers / 2)))
