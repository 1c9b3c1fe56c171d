"""A sweep's runs as data: each run's metrics, config and diagnostics, one summary row
per run (``COLUMNS``), and the tables; ``report.py`` adds the figures.

A run is any directory holding ``config.json`` and ``metrics.jsonl`` (plus
``diagnostics.jsonl`` for HC/mHC), named by its path relative to the sweep directory.

Columns beyond the obvious:
- ``grad_norm_spikes``: logged train steps whose grad_norm exceeds ``SPIKE_FACTOR``
  (5) times the median grad_norm of all earlier logged train steps of the run (the
  first never counts). A running median forgets the large norms of the first
  steps and is not moved by the spikes themselves.
- ``tokens_per_s``: median over train records (robust to the compile step).
- ``amax_fwd_max`` / ``amax_bwd_max``: largest composite forward / backward Amax
  gain (SPEC §6) over all diagnostics records; empty for residual runs.
- ``params_added``: parameters of the connections; ``nonfinite_skips``: updates
  skipped for a non-finite loss or gradient.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math

import ml_collections
import numpy as np

from mhc_jax import paths
from mhc_jax.logging import METRICS_FILE, PROFILES_FILE, read_jsonl

SPIKE_FACTOR = 5.0
SPLITS = ("train", "validation", "diagnostics")
CONNECTION_ORDER = {"residual": 0, "hc": 1, "mhc": 2}
COLUMNS = tuple(
    "run connection n seed tokenizer params_total params_added steps final_val_loss best_val_loss "
    "val_bits_per_byte tokens_per_s amax_fwd_max amax_bwd_max grad_norm_spikes "
    "nonfinite_skips".split()
)


@dataclasses.dataclass
class RunData:
    """One run's records, each list sorted by step with one record per step.

    Attributes:
      name: path relative to the sweep directory.
      config: the run's ConfigDict (from config.json).
      metrics: split ("train", "validation", "diagnostics") -> metrics.jsonl records.
      profiles: diagnostics.jsonl records {"step", "composite_forward": [L],
        "composite_backward": [L], "layer_forward": [L], "layer_backward": [L],
        "h_res": [L][n][n]}; empty for residual runs.
    """

    name: str
    config: ml_collections.ConfigDict
    metrics: dict[str, list[dict]]
    profiles: list[dict]

    @property
    def connection(self) -> str:
        return self.config.model.connection

    @property
    def n(self) -> int:
        return int(self.config.model.n)

    @property
    def seed(self) -> int:
        return int(self.config.training.seed)

    @property
    def tokenizer(self) -> str:
        """The run's tokenizer, kind:vocab_size[:sha256] (``data.tokenizer_id``)."""
        return self.config.data.tokenizer_id

    def series(self, split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) float64 arrays of ``key`` in the ``split`` records."""
        records = [r for r in self.metrics.get(split, []) if key in r]
        return (
            np.array([r["step"] for r in records], np.float64),
            np.array([r[key] for r in records], np.float64),
        )


def _by_step(records: list[dict]) -> list[dict]:
    # A resumed run logs again the steps after its last checkpoint: the later record wins.
    return [r for _, r in sorted({r["step"]: r for r in records}.items())]


def load_run(run_dir: str, name: str | None = None) -> RunData:
    """Reads one run directory (config.json, metrics.jsonl, optional diagnostics.jsonl)."""
    from mhc_jax.config import config_from_json

    directory = paths.path(run_dir)
    config = config_from_json((directory / "config.json").read_text())
    records = read_jsonl(directory / METRICS_FILE)
    metrics = {s: _by_step([r for r in records if r.get("split") == s]) for s in SPLITS}
    profiles_path = directory / PROFILES_FILE
    profiles = _by_step(read_jsonl(profiles_path)) if profiles_path.exists() else []
    return RunData(name or directory.name, config, metrics, profiles)


def find_run_dirs(sweep_dir: str) -> list[str]:
    """Run directories (holding config.json and metrics.jsonl) under ``sweep_dir``, sorted."""
    if not paths.path(sweep_dir).is_dir():
        raise FileNotFoundError(f"sweep directory {sweep_dir!r} does not exist")
    found = []
    for root, dirs, files in paths.walk(sweep_dir):
        if "config.json" in files and METRICS_FILE in files:
            found.append(str(root))
            dirs.clear()  # a run's checkpoints/ and data/ hold no runs
    return sorted(found)


def load_sweep(sweep_dir: str) -> list[RunData]:
    """Every run under ``sweep_dir``, ordered by connection, n, seed and name."""
    run_dirs = find_run_dirs(sweep_dir)
    if not run_dirs:
        raise ValueError(
            f"no runs under {sweep_dir!r}: expected directories holding "
            "config.json and metrics.jsonl (written by experiments/train.py)"
        )
    root = paths.path(sweep_dir)
    runs = [load_run(d, str(paths.path(d).relative_to(root))) for d in run_dirs]
    return sorted(runs, key=lambda r: (CONNECTION_ORDER.get(r.connection, 9), r.n, r.seed, r.name))


def grad_norm_spikes(grad_norms, factor: float = SPIKE_FACTOR) -> int:
    """Count of entries above ``factor`` x the median of all earlier finite entries."""
    g = np.asarray(grad_norms, np.float64)
    count = 0
    for i in range(1, len(g)):
        history = g[:i][np.isfinite(g[:i])]
        if history.size and g[i] > factor * np.median(history):
            count += 1
    return count


@functools.cache
def _param_counts(model) -> dict[str, int]:
    from mhc_jax.costs import abstract_param_counts

    return abstract_param_counts(model)


def param_counts(config) -> dict[str, int]:
    """{"total", "connections"} of the run's model, computed abstractly (cached per shape)."""
    from mhc_jax.config import model_config

    return _param_counts(model_config(config))


def summarize(run: RunData) -> dict:
    """One table row (keys ``COLUMNS``); missing values are None."""

    def values(split, key):
        return run.series(split, key)[1]

    def reduce(fn, array):
        return float(fn(array)) if array.size else None

    val = values("validation", "loss")
    params = param_counts(run.config)
    return {
        "run": run.name,
        "connection": run.connection,
        "n": run.n,
        "seed": run.seed,
        "tokenizer": run.tokenizer,
        "params_total": params["total"],
        "params_added": params["connections"],
        "steps": int(run.metrics["train"][-1]["step"]) if run.metrics["train"] else 0,
        "final_val_loss": reduce(lambda a: a[-1], val),
        "best_val_loss": reduce(np.min, val[np.isfinite(val)]),
        "val_bits_per_byte": reduce(lambda a: a[-1], values("validation", "bits_per_byte")),
        "tokens_per_s": reduce(np.median, values("train", "tokens_per_s")),
        "amax_fwd_max": reduce(np.nanmax, values("diagnostics", "amax/composite_forward_max")),
        "amax_bwd_max": reduce(np.nanmax, values("diagnostics", "amax/composite_backward_max")),
        "grad_norm_spikes": grad_norm_spikes(values("train", "grad_norm")),
        "nonfinite_skips": int(reduce(np.nanmax, values("train", "nonfinite_total")) or 0),
    }


def write_csv(rows: list[dict], path: str) -> None:
    """``rows`` as CSV with header ``COLUMNS``; None becomes an empty cell."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({k: "" if row[k] is None else row[k] for k in COLUMNS} for row in rows)
    paths.path(path).write_text(text.getvalue())


def _human(count: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(count)


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table of ``rows`` (params as total / added by the connections)."""
    header = (
        "run|connection|n|seed|tokenizer|params (total / added)|steps|final val loss|best val loss|"
        "val bits/byte|tokens/s|max composite Amax (fwd / bwd)|grad-norm spikes|non-finite skips"
    )
    lines = [f"| {header.replace('|', ' | ')} |", "|" + "---|" * (header.count("|") + 1)]
    for r in rows:
        params = f"{_human(r['params_total'])} / {_human(r['params_added'])}"
        amax = f"{_fmt(r['amax_fwd_max'], 3)} / {_fmt(r['amax_bwd_max'], 3)}"
        short_tokenizer = ":".join(r["tokenizer"].split(":")[:2])  # the hash left out
        cells = [r[k] for k in ("run", "connection", "n", "seed")] + [short_tokenizer]
        cells += [params, r["steps"]]
        cells += [_fmt(r[k]) for k in ("final_val_loss", "best_val_loss", "val_bits_per_byte")]
        cells += [_fmt(r["tokens_per_s"], 0), "—" if r["amax_fwd_max"] is None else amax]
        cells += [r["grad_norm_spikes"], r["nonfinite_skips"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
