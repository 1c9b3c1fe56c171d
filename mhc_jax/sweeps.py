"""Sweeps: a grid of training runs defined by a small Python file (``experiments/sweep.py``
is its command line; docs/training.md shows it in use).

Each run trains in a subprocess of experiments/train.py (output streamed) in
``<workdir>/<run name>`` (``--workdir`` local or gs://). A finished run (a
checkpoint at ``training.num_steps`` and a validation record at that step) is
skipped on re-launch; an interrupted one resumes from its newest checkpoint.
Commands run from the repository root. Local runs share a persistent XLA
compilation cache (unless JAX_COMPILATION_CACHE_DIR is set), ``<workdir>/jax_cache``,
or this host's ``~/.cache/mhc_jax/jax_cache`` for a gs:// workdir: runs differing
only in seed or data reuse each other's compiled steps.

Sweep file (``experiments/sweeps/<name>.py``; ``--sweep`` takes the name or a
path): ``get_sweep()`` returns

    {
      "config": "experiments/configs/tiny.py",   # repo-relative or absolute
      "config_arg": "num_blocks=2",              # optional: its get_config(arg)
      "overrides": {"training.num_steps": 300},  # optional: fixed for every run
      "axes": {                                  # the grid, expanded in this order
        "connection": ["residual", "hc", "mhc"],
        "n": lambda run: [1] if run["connection"] == "residual" else [1, 2, 4, 8],
        "seed": [0, 1],
      },
      "where": lambda run: run["n"] < 8 or run["connection"] == "mhc",  # optional filter
    }

- An axis name is a config path (``"optimizer.learning_rate"``) or a bare field
  name, which sets every field of that name: ``"seed"`` sets ``training.seed``
  and ``data.seed``, ``"n"`` sets ``model.n``.
- Axis values: a list, or a callable of the values chosen for the earlier axes
  (dict by axis name) returning a list. That is how ``connection="residual"``
  (which requires n = 1) becomes one run instead of four, as above. ``where``
  (a predicate on all axis values) drops runs after expansion.
- Run names join the axis values in axis order, strings bare and numbers after
  their field name: ``mhc_n4_seed0``.
- Every run's config is built and validated at expansion, so a bad combination
  fails before anything trains, naming the run and the field.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from mhc_jax import config as config_lib
from mhc_jax import paths

TRAIN_SCRIPT = "experiments/train.py"


def repo_root() -> Path:
    """The checkout sweeps run in (they need its experiments/): the one this package was
    installed from in editable mode, else the working directory.

    Raises:
      FileNotFoundError: neither holds experiments/train.py.
    """
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / TRAIN_SCRIPT).is_file():
            return root
    raise FileNotFoundError(
        f"sweeps run in a checkout of the repository: neither {Path(__file__).parent.parent} "
        f"nor the working directory {Path.cwd()} holds {TRAIN_SCRIPT}; cd into a clone"
    )


SWEEP_KEYS = ("config", "config_arg", "overrides", "axes", "where")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: its ``--index``, directory name, axis values, config overrides and num_steps."""

    index: int
    name: str
    values: dict  # axis name -> value
    overrides: dict  # config path -> value: the fixed ones, then the axes'
    num_steps: int  # the run's resolved training.num_steps


@dataclasses.dataclass(frozen=True)
class Sweep:
    """An expanded sweep: the config file (+ arg) and its runs."""

    name: str
    config: str
    config_arg: str
    axis_fields: dict  # axis name -> tuple of config paths
    runs: list[Run]


def resolve_sweep_path(spec: str) -> str:
    """A sweep name (``tiny_connections``) or path -> the sweep file's path."""
    sweeps_dir = repo_root() / "experiments" / "sweeps"
    path = spec if spec.endswith(".py") else str(sweeps_dir / f"{spec}.py")
    if not Path(path).is_file():
        known = sorted(f.stem for f in sweeps_dir.glob("*.py"))
        raise FileNotFoundError(
            f"sweep file {path!r} (from --sweep={spec!r}) not found; "
            f"sweeps in {sweeps_dir}: {known}"
        )
    return path


def _field_paths(cfg) -> list[str]:
    return [f"{section}.{key}" for section in cfg for key in cfg[section]]


def _axis_fields(axis: str, paths: list[str]) -> tuple[str, ...]:
    """Config paths set by an axis: itself if dotted, else every field with that name."""
    fields = (axis,) if axis in paths else tuple(p for p in paths if p.split(".")[-1] == axis)
    if not fields:
        raise ValueError(
            f"unknown axis {axis!r}: not a config path or field name; "
            f"known fields: {sorted({p.split('.')[-1] for p in paths})}"
        )
    return fields


def _name_part(axis: str, value) -> str:
    part = str(value) if isinstance(value, str) else f"{axis.split('.')[-1]}{value}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", part)


def _expand_values(axes: dict) -> list[dict]:
    """The grid of axis values, dependent axes evaluated on the values before them."""
    grid: list[dict] = [{}]
    for axis, values in axes.items():
        expanded: list[dict] = []
        for partial in grid:
            choices = values(dict(partial)) if callable(values) else values
            if not isinstance(choices, list | tuple | range) or not choices:
                raise ValueError(
                    f"axis {axis!r}: values must be a non-empty list (or a callable "
                    f"returning one), got {choices!r} for {partial}"
                )
            expanded.extend({**partial, axis: v} for v in choices)
        grid = expanded
    return grid


def build_config(config_module, config_arg: str, overrides: dict):
    """The run's locked ConfigDict: the config module's ``get_config(arg)`` + ``overrides``.

    Raises:
      ValueError naming the field for an unknown field, a value of the wrong type or
      an invalid model/optimizer/training setting.
    """
    cfg = config_module.get_config(config_arg or None)
    for path, value in overrides.items():
        try:
            cfg.update_from_flattened_dict({path: value})
        except (KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"override {path}={value!r}: {e}") from None
    config_lib.model_config(cfg)
    config_lib.optimizer_config(cfg)
    config_lib.validate(cfg, 1, 1)  # one device, one process
    return cfg


def expand(definition: dict, name: str, extra_overrides: dict | None = None) -> Sweep:
    """Expands a ``get_sweep()`` dict into its runs, validating every run's config.

    Args:
      definition: the sweep file's dict (see the module docstring).
      name: the sweep's name (for messages).
      extra_overrides: config path -> value applied to every run (``--override``);
        must not name a swept field.
    """
    unknown = sorted(set(definition) - set(SWEEP_KEYS))
    missing = [k for k in ("config", "axes") if k not in definition]
    if unknown or missing:
        raise ValueError(
            f"sweep {name}: unknown keys {unknown} / missing keys {missing}; "
            f"a sweep dict has {list(SWEEP_KEYS)}"
        )
    root = repo_root()
    config_path = root / definition["config"]  # an absolute path stays as it is
    if not config_path.is_file():
        raise FileNotFoundError(f"sweep {name}: config file {definition['config']!r} not found")
    paths = _field_paths(config_lib.default_config())
    fixed = {**definition.get("overrides", {}), **(extra_overrides or {})}
    for path in fixed:
        if path not in paths:
            raise ValueError(f"sweep {name}: unknown override field {path!r}; known: {paths}")
    axes = definition["axes"]
    if not axes:
        raise ValueError(f"sweep {name}: 'axes' is empty")
    try:
        axis_fields = {axis: _axis_fields(axis, paths) for axis in axes}
    except ValueError as e:
        raise ValueError(f"sweep {name}: {e}") from None
    for axis, fields in axis_fields.items():
        clash = sorted(set(fields) & set(fixed))
        if clash:
            raise ValueError(f"sweep {name}: override {clash} is swept by axis {axis!r}")
    where = definition.get("where", lambda values: True)
    module = config_lib.load_python_file(str(config_path), "sweep_base_config")
    runs: list[Run] = []
    names: dict[str, dict] = {}
    for values in _expand_values(axes):
        if not where(values):
            continue
        run_name = "_".join(_name_part(axis, v) for axis, v in values.items())
        if run_name in names:
            raise ValueError(
                f"sweep {name}: runs {names[run_name]} and {values} share the name {run_name!r}"
            )
        names[run_name] = values
        overrides = dict(fixed)
        for axis, value in values.items():
            overrides.update(dict.fromkeys(axis_fields[axis], value))
        try:
            cfg = build_config(module, definition.get("config_arg", ""), overrides)
        except (ValueError, TypeError) as e:
            raise ValueError(f"sweep {name}, run {run_name} ({values}): {e}") from None
        runs.append(Run(len(runs), run_name, values, overrides, int(cfg.training.num_steps)))
    if not runs:
        raise ValueError(f"sweep {name}: 'where' excludes every run")
    in_repo = config_path.resolve().is_relative_to(root)
    config_rel = str(config_path.resolve().relative_to(root) if in_repo else config_path)
    return Sweep(name, config_rel, definition.get("config_arg", ""), axis_fields, runs)


def load_sweep(spec: str, extra_overrides: dict | None = None) -> Sweep:
    """Loads and expands a sweep file given by name or path."""
    path = resolve_sweep_path(spec)
    module = config_lib.load_python_file(path, "sweep_definition")
    if not hasattr(module, "get_sweep"):
        raise ValueError(f"sweep file {path} defines no get_sweep()")
    return expand(module.get_sweep(), Path(path).stem, extra_overrides)


def _flag_value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)


def train_command(sweep: Sweep, run: Run, workdir: str, python: str = "python") -> list[str]:
    """argv of experiments/train.py for ``run`` (cwd: the repository root)."""
    config = sweep.config + (f":{sweep.config_arg}" if sweep.config_arg else "")
    return [
        python,
        TRAIN_SCRIPT,
        f"--config={config}",
        *(f"--config.{path}={_flag_value(v)}" for path, v in run.overrides.items()),
        f"--workdir={paths.path(workdir) / run.name}",
    ]


def _saved_steps(run_dir: str) -> list[int]:
    from mhc_jax.checkpointing import saved_steps
    from mhc_jax.run_dir import checkpoint_dir

    return saved_steps(checkpoint_dir(run_dir))


def is_finished(run_dir: str, num_steps: int) -> bool:
    """Whether the run has trained to ``num_steps``: what ``train.py`` reports as done."""
    from mhc_jax.run_dir import finished_results

    try:
        return finished_results(run_dir, num_steps) is not None
    except ValueError:  # its newest checkpoint is past num_steps
        return True


def run_status(run: Run, workdir: str) -> str:
    """'finished', 'partial (step k/N)' (newest committed checkpoint) or 'not started'."""
    run_dir = str(paths.path(workdir) / run.name)
    if is_finished(run_dir, run.num_steps):
        return "finished"
    steps = _saved_steps(run_dir)
    return f"partial (step {steps[-1]}/{run.num_steps})" if steps else "not started"


def run_sweep(sweep: Sweep, workdir: str, selected: list[Run]) -> list[str]:
    """Trains ``selected`` one after another, each in a subprocess; finished ones are skipped.

    Returns:
      Names of the runs that failed (non-zero exit) or stopped before num_steps.
      A KeyboardInterrupt waits for the current run to save, then propagates.
    """
    env = dict(os.environ)
    # The compilation cache is per host: a gs:// sweep keeps it on this host.
    local = paths.local_cache_dir() if paths.is_remote(workdir) else paths.path(workdir)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(local / "jax_cache"))
    failed = []
    for k, run in enumerate(selected, 1):
        status = run_status(run, workdir)
        header = f"[{k}/{len(selected)}] {run.name}"
        if status == "finished":
            print(f"{header}: finished, skipped", flush=True)
            continue
        cmd = train_command(sweep, run, workdir, python=sys.executable)
        print(f"{header}: {status}\n  {shlex.join(cmd)}", flush=True)
        proc = subprocess.Popen(cmd, cwd=repo_root(), env=env)
        try:
            returncode = proc.wait()
        except KeyboardInterrupt:
            proc.wait()  # the child got the signal too: it saves a checkpoint and exits
            raise
        if returncode != 0:
            print(f"{header}: failed with exit code {returncode}", flush=True)
            failed.append(run.name)
        elif not is_finished(str(paths.path(workdir) / run.name), run.num_steps):
            print(f"{header}: stopped before step {run.num_steps} (preempted?)", flush=True)
            failed.append(run.name)
    return failed


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=1", "c.d=x"]`` -> {"a.b": 1, "c.d": "x"} (ints/floats/bools parsed)."""
    out = {}
    for item in items:
        path, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--override={item!r}: expected section.field=value")
        value: object
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        out[path.strip()] = value
    return out
