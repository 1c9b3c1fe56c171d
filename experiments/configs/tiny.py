r"""Tiny byte-level LM on the bundled Shakespeare corpus: the main job, CPU-sized.

    python experiments/train.py --config=experiments/configs/tiny.py --workdir=runs/tiny
    python experiments/train.py --config=experiments/configs/tiny.py:connection=residual,n=1 \
        --workdir=runs/tiny_residual

get_config(arg): arg is an optional "key=value,..." list of model overrides.
"""

from mhc_jax.config import apply_model_overrides, default_config


def get_config(arg=None):
    cfg = default_config()
    m = cfg.model
    m.num_blocks, m.d_model, m.num_heads, m.d_ff = 4, 128, 4, 384
    m.connection, m.n = "mhc", 4
    cfg.data.seq_len, cfg.data.batch_size = 128, 8
    cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps = 3e-3, 30
    cfg.training.num_steps, cfg.training.eval_every = 300, 100
    cfg.training.checkpoint_every = 100
    apply_model_overrides(cfg, arg)
    return cfg
