r"""Runs a grid of training runs (a sweep) defined by a small Python file.

    python experiments/sweep.py --sweep=tiny_connections --list    # runs and their status
    python experiments/sweep.py --sweep=tiny_connections --workdir=runs/tiny_connections
    python experiments/sweep.py --sweep=deep_stability --print_commands   # one line per run
    python experiments/sweep.py --sweep=deep_stability --index=$SLURM_ARRAY_TASK_ID
    python experiments/sweep.py --sweep=n_sweep --override=data.path=/data/corpus

The sweep file format, run names, skipping and resuming: ``mhc_jax/sweeps.py``.
"""

import shlex
import sys

from absl import app, flags

from mhc_jax.sweeps import load_sweep, parse_overrides, run_status, run_sweep, train_command

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep name in experiments/sweeps/ or a path.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (default runs/<sweep name>).")
_INDEX = flags.DEFINE_integer("index", None, "Run only run K (0-based; for array jobs).")
_LIST = flags.DEFINE_bool("list", False, "List the runs and their status, then exit.")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print one train.py command per run.")
_OVERRIDE = flags.DEFINE_multi_string(
    "override", [], "path=value applied to every run, e.g. data.path=/data/corpus."
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _SWEEP.value:
        raise app.UsageError("--sweep is required (a name in experiments/sweeps/ or a path)")
    try:
        sweep = load_sweep(_SWEEP.value, parse_overrides(_OVERRIDE.value))
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from None
    workdir = _WORKDIR.value or f"runs/{sweep.name}"
    runs = sweep.runs
    if _INDEX.value is not None:
        if not 0 <= _INDEX.value < len(runs):
            raise app.UsageError(
                f"--index={_INDEX.value} is out of range: {sweep.name} has runs 0..{len(runs) - 1}"
            )
        runs = [runs[_INDEX.value]]
    if _PRINT.value:
        for run in runs:
            print(shlex.join(train_command(sweep, run, workdir)))
    elif _LIST.value:
        print(f"{sweep.name}: {len(sweep.runs)} runs of {sweep.config} in {workdir}")
        for axis, fields in sweep.axis_fields.items():
            print(f"  axis {axis} -> {', '.join(fields)}")
        for run in runs:
            print(f"{run.index:4d}  {run.name:32s} {run_status(run, workdir)}")
    else:
        try:
            failed = run_sweep(sweep, workdir, runs)
        except KeyboardInterrupt:
            print("Interrupted: the current run saved a checkpoint; re-launch to resume.")
            sys.exit(130)
        if failed:
            print(f"{len(failed)} run(s) did not finish: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    app.run(main)
