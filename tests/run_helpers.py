"""Reading a training run's directory in tests: its logged losses, its final parameters,
and a config file that rebuilds a config for experiments/train.py."""

from mhc_jax import logging as logging_lib
from mhc_jax import paths, run_dir


def read_jsonl(workdir):
    """metrics.jsonl of a local or gs:// workdir."""
    return logging_lib.read_jsonl(paths.path(workdir) / logging_lib.METRICS_FILE)


def train_losses(workdir):
    """Last logged train loss per step (a resumed run re-logs nothing it already did)."""
    return {r["step"]: r["loss"] for r in read_jsonl(workdir) if r["split"] == "train"}


def final_params(workdir):
    _, params, step = run_dir.load_run(workdir)
    return step, params


def write_config(cfg, path):
    with open(path, "w") as f:
        f.write(
            "from mhc_jax.config import config_from_json\n\n"
            f"def get_config():\n    return config_from_json({cfg.to_json()!r})\n"
        )
