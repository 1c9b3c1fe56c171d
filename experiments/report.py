r"""Tables and figures of a sweep from every run's metrics, config and diagnostics.

    python experiments/report.py --sweep_dir=runs/tiny_connections --out_dir=runs/tiny_report

Both directories may be local or gs://. A run is any directory under ``--sweep_dir``
holding ``config.json`` and
``metrics.jsonl`` (plus ``diagnostics.jsonl`` for HC/mHC), named by its path
relative to ``--sweep_dir``. Writes ``results.md`` / ``results.csv`` (a row per
run, ``COLUMNS``) and PNGs: ``loss_curves`` (train and validation, a panel per
run), ``val_loss_vs_n`` (mean ± std over seeds per connection), ``amax_gain``
(composite Amax gain vs layer, last diagnostics record, log scale: mHC Fig. 3/7),
``grad_norm`` and ``h_res_<run>`` (per-layer H_res, last record: mHC Fig. 8).

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

Plots return ``matplotlib.figure.Figure`` objects (no pyplot state), so the
notebooks reuse them.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math

import numpy as np
from absl import app, flags
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mhc_jax import paths
from mhc_jax.logging import METRICS_FILE, PROFILES_FILE, read_jsonl

SPIKE_FACTOR = 5.0
SPLITS = ("train", "validation", "diagnostics")
CONNECTION_ORDER = {"residual": 0, "hc": 1, "mhc": 2}
COLORS = {"residual": "0.3", "hc": "tab:red", "mhc": "tab:blue"}
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
    config: object
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

    run_dir = paths.path(run_dir)
    config = config_from_json((run_dir / "config.json").read_text())
    records = read_jsonl(run_dir / METRICS_FILE)
    metrics = {s: _by_step([r for r in records if r.get("split") == s]) for s in SPLITS}
    profiles_path = run_dir / PROFILES_FILE
    profiles = _by_step(read_jsonl(profiles_path)) if profiles_path.exists() else []
    return RunData(name or run_dir.name, config, metrics, profiles)


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


def _grid(count: int, cols: int, size: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    cols = max(1, min(cols, count))
    rows = -(-count // cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[count:]:
        ax.set_axis_off()
    return fig, axes.flat


def plot_loss_curves(runs: list[RunData], cols: int = 4) -> Figure:
    """Train (line) and validation (markers) loss vs step, one panel per run."""
    fig, axes = _grid(len(runs), cols, (3.2, 2.4))
    for ax, run in zip(axes, runs):
        ax.plot(*run.series("train", "loss"), lw=1, color=COLORS.get(run.connection), label="train")
        ax.plot(*run.series("validation", "loss"), "o--", ms=3, color="k", label="validation")
        ax.set_title(run.name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.supxlabel("step")
    fig.supylabel("loss (nats/token)")
    return fig


def plot_val_loss_vs_n(rows: list[dict]) -> Figure:
    """Final validation loss vs n per connection: mean ± std over seeds (``summarize`` rows).
    Runs with different tokenizers compare by bits per byte (a loss per token does not)."""
    metric = "val_bits_per_byte" if len({r["tokenizer"] for r in rows}) > 1 else "final_val_loss"
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.subplots()
    for conn in sorted({r["connection"] for r in rows}, key=lambda c: CONNECTION_ORDER.get(c, 9)):
        by_n: dict[int, list[float]] = {}
        for r in rows:
            if r["connection"] == conn and r[metric] is not None:
                by_n.setdefault(r["n"], []).append(r[metric])
        if not by_n:
            continue
        ns = sorted(by_n)
        mean = np.array([np.mean(by_n[n]) for n in ns])
        std = np.array([np.std(by_n[n]) for n in ns])
        color = COLORS.get(conn)
        dodge = 2.0 ** (0.03 * (CONNECTION_ORDER.get(conn, 1) - 1))  # keep error bars apart
        ax.errorbar(
            np.array(ns) * dodge, mean, yerr=std, marker="o", capsize=3, color=color, label=conn
        )
        if conn == "residual":
            ax.axhspan(mean[0] - std[0], mean[0] + std[0], color=color, alpha=0.15)
            ax.axhline(mean[0], color=color, ls="--", lw=1)
    ax.set_xscale("log", base=2)
    all_n = sorted({r["n"] for r in rows})
    ax.set_xticks(all_n, [str(n) for n in all_n])
    ax.set_xlim(all_n[0] / 1.5, all_n[-1] * 1.5)
    ax.minorticks_off()
    ax.set_xlabel("expansion rate n")
    ax.set_ylabel("final validation " + ("bits per byte" if metric != "final_val_loss" else "loss"))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    return fig


def _shades(runs: list[RunData]) -> list:
    """A colour per run: HC in reds, mHC in blues, darker for later runs of each kind."""
    import matplotlib

    kinds = [r.connection for r in runs]
    return [
        matplotlib.colormaps["Reds" if r.connection == "hc" else "Blues"](
            0.45 + 0.55 * (kinds[: i + 1].count(r.connection)) / kinds.count(r.connection)
        )
        for i, r in enumerate(runs)
    ]


def plot_amax_gain(runs: list[RunData]) -> Figure:
    """Composite forward/backward Amax gain vs layer (last diagnostics record), log y."""
    runs = [r for r in runs if r.profiles]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for run, color in zip(runs, _shades(runs)):
        last = run.profiles[-1]
        for ax, key in zip(axes, ("composite_forward", "composite_backward")):
            label = f"{run.name} (step {last['step']})"
            ax.plot(np.asarray(last[key]), marker=".", color=color, label=label)
    for ax, title in zip(axes, ("forward: H[l]···H[0]", "backward: H[L-1]···H[l]")):
        ax.set_yscale("log")
        ax.set_title(f"composite Amax gain, {title}", fontsize=9)
        ax.set_xlabel("layer l")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("Amax gain magnitude")
    if runs:
        axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def plot_grad_norm(runs: list[RunData]) -> Figure:
    """Gradient norm (before clipping) vs step for every run, log y."""
    fig = Figure(figsize=(7, 3.8), layout="constrained")
    ax = fig.subplots()
    for run in runs:
        ax.plot(*run.series("train", "grad_norm"), lw=0.8, label=run.name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return fig


def plot_h_res(run: RunData, cols: int = 8) -> Figure:
    """Per-layer H_res heatmaps of the run's last diagnostics record (entries shown if n <= 4)."""
    if not run.profiles:
        raise ValueError(f"run {run.name} has no diagnostics.jsonl records (residual?)")
    last = run.profiles[-1]
    h_res = np.asarray(last["h_res"], np.float64)  # (L, n, n)
    fig, axes = _grid(len(h_res), cols, (1.6, 1.6))
    vmin, vmax = min(0.0, float(h_res.min())), max(1.0, float(h_res.max()))
    for layer, (ax, m) in enumerate(zip(axes, h_res)):
        image = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_title(f"layer {layer}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if m.shape[0] <= 4:
            for (i, j), v in np.ndenumerate(m):
                color = "w" if v < vmin + 0.6 * (vmax - vmin) else "k"
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5, color=color)
    fig.colorbar(image, ax=list(axes[: len(h_res)]), shrink=0.8)
    fig.suptitle(f"H_res of {run.name}, step {last['step']}", fontsize=9)
    return fig


def write_report(sweep_dir: str, out_dir: str) -> dict[str, str]:
    """Writes results.md, results.csv and the PNGs for ``sweep_dir``; returns name -> path."""
    runs = load_sweep(sweep_dir)
    rows = [summarize(r) for r in runs]
    out = paths.path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {name: str(out / name) for name in ("results.md", "results.csv")}
    title = paths.path(sweep_dir).name
    paths.path(written["results.md"]).write_text(f"# {title}\n\n{markdown_table(rows)}")
    write_csv(rows, written["results.csv"])
    figures = {
        "loss_curves.png": plot_loss_curves(runs),
        "val_loss_vs_n.png": plot_val_loss_vs_n(rows),
        "grad_norm.png": plot_grad_norm(runs),
    }
    if any(r.profiles for r in runs):
        figures["amax_gain.png"] = plot_amax_gain(runs)
    for run in runs:
        if run.profiles:
            figures[f"h_res_{run.name.replace('/', '__')}.png"] = plot_h_res(run)
    for name, fig in figures.items():
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        written[name] = str(out / name)
        paths.path(written[name]).write_bytes(png.getvalue())
    return written


_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Directory holding the sweep's runs.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where results.md/.csv and PNGs go.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not _SWEEP_DIR.value or not _OUT_DIR.value:
        raise app.UsageError("--sweep_dir and --out_dir are required")
    try:
        written = write_report(_SWEEP_DIR.value, _OUT_DIR.value)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    print(paths.path(written["results.md"]).read_text())
    print("Wrote " + ", ".join(sorted(written)) + f" to {_OUT_DIR.value}")


if __name__ == "__main__":
    app.run(main)
