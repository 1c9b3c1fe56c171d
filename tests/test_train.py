"""mhc_jax/train.py: the jitted train step."""

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.model import ModelConfig
from mhc_jax.optim import OptimizerConfig, make_optimizer
from mhc_jax.train import init_train_state, make_train_step


def test_train_step_skips_nonfinite_update():
    cfg = ModelConfig(
        vocab_size=32, num_blocks=1, d_model=16, num_heads=2, d_ff=32, connection="mhc", n=2
    )
    tx = make_optimizer(OptimizerConfig(warmup_steps=0), 10)
    state = init_train_state(cfg, tx, 0)
    step = jax.jit(make_train_step(cfg, tx, accum_steps=2))
    batch = {
        "inputs": jnp.ones((4, 8), jnp.int32),
        "targets": jnp.ones((4, 8), jnp.int32),
        "weights": jnp.ones((4, 8), jnp.float32),
    }
    good, m = step(state, batch)
    assert int(m["skipped"]) == 0 and int(good.step) == 1
    bad, m = step(good, dict(batch, weights=batch["weights"].at[0, 0].set(jnp.nan)))
    assert int(m["skipped"]) == 1 and int(bad.nonfinite_streak) == 1 and int(bad.step) == 2
    for x, y in zip(
        jax.tree.leaves((good.params, good.opt_state)), jax.tree.leaves((bad.params, bad.opt_state))
    ):
        np.testing.assert_array_equal(x, y)
    again, _ = step(bad, batch)
    assert int(again.nonfinite_streak) == 0 and int(again.nonfinite_total) == 1
