r"""Dense stand-in for the mHC paper's 3B shape (SPEC §9: 12 blocks, C = 1280, n = 4).

The paper's models are DeepSeek-V3-style MoE with MLA; this keeps their depth,
width, n, sequence length and optimiser (AdamW 0.9/0.95, wd 0.1, warmup 2000,
step decay) with a dense SwiGLU MLP of width 4C. Check its size first:

    python experiments/train.py --config=experiments/configs/paper_3b.py --dry_run

get_config(arg): arg is an optional "key=value,..." list of model overrides.
"""

from mhc_jax.config import apply_model_overrides, default_config


def get_config(arg=None):
    cfg = default_config()
    m = cfg.model
    m.num_blocks, m.d_model, m.num_heads, m.d_ff = 12, 1280, 10, 5120
    m.connection, m.n = "mhc", 4
    m.dtype = "bfloat16"
    cfg.data.seq_len, cfg.data.batch_size = 4096, 64
    cfg.data.eval_batch_size, cfg.data.eval_max_batches = 64, 20
    o = cfg.optimizer
    o.learning_rate, o.warmup_steps, o.schedule = 8.6e-4, 2000, "step"
    cfg.training.num_steps, cfg.training.eval_every = 30000, 1000
    cfg.training.checkpoint_every = 1000
    cfg.logging.log_every, cfg.logging.diagnostics_every = 20, 200
    apply_model_overrides(cfg, arg)
    return cfg
