"""A sweep's report: ``results.md`` / ``results.csv`` (``results.py``) and its figures.

PNGs: ``loss_curves`` (train and validation, a panel per run), ``val_loss_vs_n``
(mean ± std over seeds per connection), ``amax_gain`` (composite Amax gain vs layer,
last diagnostics record, log scale: mHC Fig. 3/7), ``grad_norm`` and ``h_res_<run>``
(per-layer H_res, last record: mHC Fig. 8). Plots return ``matplotlib.figure.Figure``
objects (no pyplot state), so the notebooks reuse them.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mhc_jax import paths
from mhc_jax.results import (
    CONNECTION_ORDER,
    RunData,
    load_sweep,
    markdown_table,
    summarize,
    write_csv,
)

COLORS = {"residual": "0.3", "hc": "tab:red", "mhc": "tab:blue"}


def _grid(count: int, cols: int, size: tuple[float, float]) -> tuple[Figure, np.flatiter]:
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
