r"""~330M-parameter byte-level LM (24 blocks, C = 1024) for one or a few GPUs.

Train on a prepared corpus (experiments/prepare_data.py), e.g.:

    python experiments/train.py --config=experiments/configs/medium.py \
        --config.data.path=/data/corpus --workdir=runs/medium_mhc

get_config(arg): arg is an optional "key=value,..." list of model overrides.
"""

from mhc_jax.config import apply_model_overrides, default_config


def get_config(arg=None):
    cfg = default_config()
    m = cfg.model
    m.num_blocks, m.d_model, m.num_heads, m.d_ff = 24, 1024, 16, 3072
    m.connection, m.n = "mhc", 4
    m.dtype = "bfloat16"
    cfg.data.seq_len, cfg.data.batch_size = 1024, 32
    cfg.data.eval_batch_size, cfg.data.eval_max_batches = 64, 20
    o = cfg.optimizer
    o.learning_rate, o.warmup_steps, o.schedule = 6e-4, 2000, "cosine"
    cfg.training.num_steps, cfg.training.eval_every = 50000, 2000
    cfg.training.checkpoint_every = 2000
    cfg.logging.log_every, cfg.logging.diagnostics_every = 20, 200
    apply_model_overrides(cfg, arg)
    return cfg
