r"""Expansion rate: HC and mHC at n in {1, 2, 4, 8} plus the residual baseline, two seeds.

    python experiments/sweep.py --sweep=n_sweep --override=data.path=/data/corpus \
        --workdir=runs/n_sweep
    python experiments/report.py --sweep_dir=runs/n_sweep --out_dir=runs/n_report

The HC paper's n ablation (SPEC §9: OLMo-1B eval loss 2.811 baseline, 2.819 /
2.802 / 2.781 / 2.778 at n = 1 / 2 / 4 / 8) at a smaller scale: 8 blocks,
C = 256, seq 256, batch 32, 4000 steps (33M tokens), bf16 activations, the usual
learning rate 1e-3 (this sweep measures loss, not stability). 18 runs of a few
minutes each on one GPU (estimated); ``report.py``'s val_loss_vs_n.png is the figure.

Data: the gaps are a few hundredths of a nat, smaller than the overfitting on
the bundled 1 MB corpus, so pass a larger one (experiments/prepare_data.py)
with ``--override=data.path=...``; two seeds give the error bars.
"""


def get_sweep():
    return {
        "config": "experiments/configs/small.py",
        "config_arg": "num_blocks=8,d_model=256,num_heads=4,d_ff=768",
        "overrides": {
            "model.dtype": "bfloat16",
            "data.seq_len": 256,
            "data.batch_size": 32,
            "data.eval_batch_size": 32,
            "data.eval_max_batches": 20,
            "optimizer.learning_rate": 1e-3,
            "optimizer.warmup_steps": 200,
            "training.num_steps": 4000,
            "training.eval_every": 250,
            "training.checkpoint_every": 1000,
            "logging.log_every": 10,
            "logging.diagnostics_every": 100,
        },
        "axes": {
            "connection": ["residual", "hc", "mhc"],
            "n": lambda run: [1] if run["connection"] == "residual" else [1, 2, 4, 8],
            "seed": [0, 1],
        },
    }
