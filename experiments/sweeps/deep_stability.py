r"""Training stability at depth: residual vs dynamic HC (n = 4) vs mHC (n = 4), 32 blocks.

    python experiments/sweep.py --sweep=deep_stability --override=data.path=/data/corpus \
        --workdir=runs/deep_stability
    python experiments/report.py --sweep_dir=runs/deep_stability --out_dir=runs/deep_report

A qualitative reproduction of the mHC paper's stability figures (SPEC §9: HC's
loss surge and gradient-norm spikes, composite Amax gain near 3000 for HC and
<= ~1.6 for mHC; Fig. 3, 7, 8). 32 blocks (L = 64 connection layers), C = 512,
seq 512, batch 32 (16k tokens a step), 6000 steps (98M tokens), bf16
activations: ~110M parameters, one GPU. Measured on an H100 (docs/results.md): 98k
tokens/s for residual, 77k for mHC and 64k for HC (remat=full), so about 17, 21
and 26 minutes a run at full length.

Why these settings:
- Depth: HC's H_res is unconstrained, so the composite mapping over L layers is a
  product of L matrices whose gain can grow geometrically with depth; 64 layers
  give it room to, while mHC's doubly stochastic H_res keeps every product's
  gain at 1.
- Learning rate 2e-3 (about 3x the usual ~6e-4 for a model this size) with the
  paper's step decay and a short warmup: at the usual rate all three runs
  train smoothly and the comparison shows nothing; a rate near the edge of
  stability is where an unconstrained residual mixing matrix can amplify an
  update into a loss spike. Clipping stays at 1.0, as in a normal run, so the
  spikes show in the logged (pre-clip) gradient norm.
- Same seeds, data order and token budget for all three, so differences come
  from the connection alone; two seeds show which differences a seed changes.

Data: pass a corpus of 100 MB or more (experiments/prepare_data.py) with
``--override=data.path=...``. Without it the runs use the bundled 1 MB of
Shakespeare so the sweep works anywhere, but a model this size memorises it
within a few hundred steps: the stability signals (gradient norm, Amax gain,
non-finite skips) stay meaningful, the validation losses do not.
"""


def get_sweep():
    return {
        "config": "experiments/configs/small.py",
        "config_arg": "num_blocks=32,d_model=512,num_heads=8,d_ff=1536,hc_dynamic=true",
        "overrides": {
            "model.dtype": "bfloat16",
            "data.seq_len": 512,
            "data.batch_size": 32,
            "data.eval_batch_size": 32,
            "data.eval_max_batches": 20,
            "optimizer.learning_rate": 2e-3,
            "optimizer.warmup_steps": 300,
            "optimizer.schedule": "step",
            "training.num_steps": 6000,
            "training.eval_every": 500,
            "training.checkpoint_every": 1000,
            "logging.log_every": 10,
            "logging.diagnostics_every": 100,
        },
        "axes": {
            "connection": ["residual", "hc", "mhc"],
            "n": lambda run: [1] if run["connection"] == "residual" else [4],
            "seed": [0, 1],
        },
    }
