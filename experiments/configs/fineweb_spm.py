r"""A ~112M-parameter mHC LM on FineWeb-style parquet shards with a SentencePiece tokenizer
(one GPU; 12 blocks, C = 768, n = 4, 32k pieces).

1. Download some parquet shards of a public corpus (FineWeb's ``sample/10BT`` shards
   hold the document in a "text" column) to /data/fineweb, or point --sources at them
   in gs://.
2. Train the tokenizer on them and prepare the data (4 tokenizing processes)::

    python experiments/prepare_data.py --sources='/data/fineweb/*.parquet' \
        --out_dir=/data/fineweb_spm32k --train_tokenizer=sentencepiece:32768 \
        --tokenizer_path=/data/spm32k.model --processes=4 --val_fraction=0.005

3. Train, then sample::

    python experiments/train.py --config=experiments/configs/fineweb_spm.py \
        --config.data.path=/data/fineweb_spm32k \
        --config.data.tokenizer=sentencepiece:/data/spm32k.model --workdir=runs/fineweb_mhc
    python experiments/sample.py --workdir=runs/fineweb_mhc --prompt="The history of"

The tokenizer sets model.vocab_size (32768); validation reports bits per byte, which
compare with byte-level and other-tokenizer runs. get_config(arg): arg is an optional
"key=value,..." list of model overrides (e.g. ``connection=residual,n=1``).
"""

from mhc_jax.config import apply_model_overrides, default_config


def get_config(arg=None):
    cfg = default_config()
    m = cfg.model
    m.num_blocks, m.d_model, m.num_heads, m.d_ff = 12, 768, 12, 2048
    m.connection, m.n = "mhc", 4
    m.vocab_size = 32768  # the tokenizer's size: checked against the file at launch
    m.dtype = "bfloat16"
    cfg.data.tokenizer = "sentencepiece:/data/spm32k.model"  # replace on the command line
    cfg.data.seq_len, cfg.data.batch_size = 1024, 32
    cfg.data.eval_batch_size, cfg.data.eval_max_batches = 32, 50
    o = cfg.optimizer
    o.learning_rate, o.warmup_steps, o.schedule = 1e-3, 1000, "cosine"
    cfg.training.num_steps, cfg.training.eval_every = 20000, 1000
    cfg.training.checkpoint_every = 1000
    cfg.training.sample_prompt = "The history of"
    cfg.logging.log_every, cfg.logging.diagnostics_every = 20, 200
    apply_model_overrides(cfg, arg)
    return cfg
