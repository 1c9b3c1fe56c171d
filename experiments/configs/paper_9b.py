r"""Dense stand-in for the mHC paper's 9B shape (SPEC §9: 18 blocks, C = 1920, n = 4).

Dense SwiGLU MLP of width 4C instead of the paper's MoE (see paper_3b.py). Check its size:

    python experiments/train.py --config=experiments/configs/paper_9b.py --dry_run

get_config(arg): arg is an optional "key=value,..." list of model overrides.
"""

from mhc_jax.config import apply_model_overrides, default_config


def get_config(arg=None):
    cfg = default_config()
    m = cfg.model
    m.num_blocks, m.d_model, m.num_heads, m.d_ff = 18, 1920, 15, 7680
    m.connection, m.n = "mhc", 4
    m.dtype = "bfloat16"
    cfg.data.seq_len, cfg.data.batch_size = 4096, 128
    cfg.data.eval_batch_size, cfg.data.eval_max_batches = 64, 20
    o = cfg.optimizer
    o.learning_rate, o.warmup_steps, o.schedule = 5.9e-4, 2000, "step"
    cfg.training.num_steps, cfg.training.eval_every = 50000, 1000
    cfg.training.checkpoint_every = 1000
    cfg.logging.log_every, cfg.logging.diagnostics_every = 20, 200
    apply_model_overrides(cfg, arg)
    return cfg
