r"""Trains a residual / HC / mHC language model.

    python experiments/train.py --config=experiments/configs/tiny.py --workdir=runs/tiny
    python experiments/train.py --config=experiments/configs/tiny.py:connection=hc,n=8 \
        --config.optimizer.learning_rate=1e-3 --workdir=runs/tiny_hc8
    python experiments/train.py --config=experiments/configs/paper_27b.py --dry_run

Re-running the same command resumes from the workdir's newest checkpoint.
``--dry_run`` checks the config against this host's devices (mesh, batch split,
mHC kernels), prints the resolved config, parameter counts, FLOPs per token and
a memory estimate, then exits without allocating the model.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mhc_jax import config as config_lib
from mhc_jax import costs, preflight
from mhc_jax.sharding import launched_multiprocess

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, samples).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print config and costs, then exit.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "jax.distributed.initialize(): 'auto' calls it when the environment shows a "
    "multi-process launch (TPU pod, SLURM with several tasks, an explicit coordinator).",
)


def _explain_unknown_overrides(argv) -> str:
    """Names each ``--config.a.b=...`` whose path is not a config field, with the valid ones."""
    cfg = config_lib.default_config()
    problems = []
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config.") :].split("=", 1)[0].split(".")
        node = cfg
        for i, key in enumerate(path):
            if not hasattr(node, "keys") or key not in node:
                where = ".".join(path[:i]) or "the config"
                known = sorted(node.keys()) if hasattr(node, "keys") else []
                problems.append(
                    f"unknown config field {'.'.join(path)!r} in {arg}; {where} has {known}"
                )
                break
            node = node[key]
    return "\n".join(problems)


def parse_flags(argv):
    """absl flag parsing that explains a misspelt ``--config.*`` override."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        message = _explain_unknown_overrides(argv) or f"bad --config override: {e}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax/grain are chatty at INFO; -v 0 restores it
    cfg = _CONFIG.value
    if _DRY_RUN.value:
        try:
            run = preflight.preflight(cfg)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(costs.dry_run_report(cfg))
        print(preflight.describe(run))
        return
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required (unless --dry_run)")
    if _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and launched_multiprocess()):
        import jax

        jax.distributed.initialize()
    from mhc_jax.loop import train_and_evaluate

    train_and_evaluate(cfg, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
