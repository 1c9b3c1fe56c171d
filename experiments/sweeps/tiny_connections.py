r"""Residual vs HC vs mHC at n in {1, 2, 4, 8}, three seeds, on the CPU-sized ``tiny`` config.

    python experiments/sweep.py --sweep=tiny_connections --workdir=runs/tiny_connections
    python experiments/report.py --sweep_dir=runs/tiny_connections --out_dir=runs/tiny_report

27 runs of 300 steps (8 x 128 bytes) on the bundled Shakespeare: residual is one
run per seed (it requires n = 1), HC and mHC four. About an hour on 2 CPU cores;
``--override=training.num_steps=100`` for a quicker look.
"""


def get_sweep():
    return {
        "config": "experiments/configs/tiny.py",
        "axes": {
            "connection": ["residual", "hc", "mhc"],
            "n": lambda run: [1] if run["connection"] == "residual" else [1, 2, 4, 8],
            "seed": [0, 1, 2],  # training.seed and data.seed
        },
    }
