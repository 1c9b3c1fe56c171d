r"""115M-parameter byte-level LM for one GPU (12 blocks, C = 768, mHC n = 4).

Train on a prepared corpus (experiments/prepare_data.py), e.g.:

    python experiments/train.py --config=experiments/configs/small.py \
        --config.data.path=/data/shakespeare_full --workdir=runs/small_mhc

get_config(arg): arg is an optional "key=value,..." list of model overrides.
"""

from mhc_jax.config import apply_model_overrides, default_config


def get_config(arg=None):
    cfg = default_config()
    m = cfg.model
    m.num_blocks, m.d_model, m.num_heads, m.d_ff = 12, 768, 12, 3072
    m.connection, m.n = "mhc", 4
    m.dtype = "bfloat16"
    cfg.data.seq_len, cfg.data.batch_size = 1024, 32
    cfg.data.eval_batch_size, cfg.data.eval_max_batches = 32, 20
    o = cfg.optimizer
    o.learning_rate, o.warmup_steps, o.schedule = 1e-3, 1000, "cosine"
    cfg.training.num_steps, cfg.training.eval_every = 20000, 1000
    cfg.training.checkpoint_every = 1000
    cfg.logging.log_every, cfg.logging.diagnostics_every = 20, 200
    apply_model_overrides(cfg, arg)
    return cfg
