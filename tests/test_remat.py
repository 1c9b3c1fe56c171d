"""Rematerialisation policies (``mhc_jax.remat``): what each keeps for the backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.ad_checkpoint import print_saved_residuals

from mhc_jax import remat


@pytest.fixture
def cudnn_attention_traceable(monkeypatch):
    """Lets ``jax.nn.dot_product_attention(implementation="cudnn")`` trace on a host
    without cuDNN (its version and device checks answer as a Hopper GPU's would);
    nothing here compiles or runs it."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda capability: False)


def _attention_loss(q, w):
    k, v = q @ w, jnp.tanh(q)  # a matmul output and an elementwise one
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return jnp.sum(out.astype(jnp.float32))


@pytest.mark.parametrize(
    "policy, saved", [("full", 0), ("save_dots", 2), ("mhc_blocks", 2), ("save_connections", 2)]
)
def test_cudnn_attention_outputs_are_saved_with_the_matmuls(
    cudnn_attention_traceable, capsys, policy, saved
):
    """The policies that keep matmul outputs also keep cuDNN attention's forward outputs
    (its output and softmax statistics), so that the backward does not re-run the
    forward kernel; ``full`` keeps neither. Fails if JAX renames the primitive."""
    q = jax.ShapeDtypeStruct((2, 128, 4, 64), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)
    fn = jax.checkpoint(_attention_loss, policy=remat.checkpoint_policy(policy))
    print_saved_residuals(fn, q, w)  # one line per residual: "<type> <source>"
    sources = capsys.readouterr().out.splitlines()
    from_attention = [s for s in sources if remat.CUDNN_ATTENTION_FWD in s]
    assert len(from_attention) == saved, sources
    assert any("dot_general" in s for s in sources) == (policy != "full"), sources


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="remat policy must be one of .*'nonee'"):
        remat.checkpoint_policy("nonee")
