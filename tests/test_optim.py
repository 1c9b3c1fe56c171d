"""mhc_jax/optim.py: optimizer config errors and the weight-decay mask."""

import pytest

from mhc_jax.model import ModelConfig
from mhc_jax.optim import OptimizerConfig, decay_mask, make_optimizer
from mhc_jax.train import init_train_state


def test_optimizer_config_errors_and_decay_mask():
    with pytest.raises(ValueError, match="optimizer.schedule='linear' is invalid"):
        OptimizerConfig(schedule="linear")
    with pytest.raises(ValueError, match="optimizer.grad_accum_steps=0 is invalid"):
        OptimizerConfig(grad_accum_steps=0)
    cfg = ModelConfig(
        vocab_size=32, num_blocks=1, d_model=16, num_heads=2, d_ff=32, connection="hc", n=2
    )
    state = init_train_state(cfg, make_optimizer(OptimizerConfig(), 10), 0)
    mask = decay_mask(state.params)
    block = mask["group_0"]["block_0"]
    conn = block["attn_conn"]
    assert conn["w_res"] and not conn["b_res"] and not conn["b_pre"] and not conn["s_alpha"]
    assert block["mlp"]["up"]["kernel"] and not block["attn_norm"]["scale"]
    assert mask["embed"]["embedding"]
