# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sweep results
#
# The report of `experiments/report.py`, inline: a table of runs and the figures
# (loss curves, validation loss vs n, composite Amax gain vs layer, gradient
# norms, H_res heatmaps).
#
# Which runs: `SWEEP_DIR` if set; else the first sweep with runs under the
# committed `experiments/results/`; else a 2-run micro sweep (HC vs mHC, n = 4,
# a 2-block model) trained here into a temporary directory.

# %%
# Install: skip if mhc_jax is importable; from a checkout, install it editable.
# ruff: noqa: E402
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("mhc_jax") is None:
    if os.path.exists(os.path.join("..", "setup.cfg")):  # running from notebooks/ of a checkout
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", ".."])
        sys.path.insert(0, os.path.abspath(".."))  # the editable hook loads only at startup
    else:
        raise ModuleNotFoundError(
            "mhc_jax is not installed. Clone the repository, then run\n"
            "  pip install -e <checkout>\n"
            "(on Colab: `!git clone <repository URL>` and `%pip install -e <checkout>`), "
            "restart the runtime and open this notebook again."
        )

# %% tags=["parameters"]
SWEEP_DIR = ""  # a sweep's workdir; "" = experiments/results/ or the micro sweep
MICRO_STEPS = 60  # steps of each micro-sweep run

# %%
import tempfile

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

import mhc_jax

# %matplotlib inline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(mhc_jax.__file__)))


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses need it
    spec.loader.exec_module(module)
    return module


report = load_module("report", os.path.join(REPO, "experiments", "report.py"))
sweep = load_module("sweep", os.path.join(REPO, "experiments", "sweep.py"))


# %%
def committed_sweeps(root):
    """Directories under ``root`` that directly hold runs (one sweep each), sorted."""
    if not os.path.isdir(root):
        return []
    return sorted({os.path.dirname(run_dir) for run_dir in report.find_run_dirs(root)})


MICRO_SWEEP = {
    "config": "experiments/configs/tiny.py",
    "config_arg": "num_blocks=2,d_model=32,num_heads=2,d_ff=64",
    "overrides": {
        "training.num_steps": MICRO_STEPS,
        "training.eval_every": max(MICRO_STEPS // 3, 1),
        "training.checkpoint_every": MICRO_STEPS,
        "training.sample_tokens": 0,
        "data.batch_size": 4,
        "data.seq_len": 32,
        "data.eval_batch_size": 4,
        "data.eval_max_batches": 2,
        "logging.log_every": max(MICRO_STEPS // 20, 1),
        "logging.diagnostics_every": max(MICRO_STEPS // 3, 1),
        "logging.progress": False,
        "logging.tensorboard": False,
    },
    "axes": {"connection": ["hc", "mhc"], "n": [4], "seed": [0]},
}

sweep_dir = SWEEP_DIR or next(
    iter(committed_sweeps(os.path.join(REPO, "experiments", "results"))), ""
)
if not sweep_dir:
    sweep_dir = os.path.join(tempfile.mkdtemp(), "micro")
    micro = sweep.expand(MICRO_SWEEP, "micro")
    failed = sweep.run_sweep(micro, sweep_dir, micro.runs)
    assert not failed, f"micro-sweep runs failed: {failed}"
print("sweep:", sweep_dir)

# %% [markdown]
# ## Table
#
# Params are total / added by the connections; the Amax columns are the largest
# composite gains over all diagnostics records; grad-norm spikes count logged
# steps above 5x the running median (see `experiments/report.py`).

# %%
runs = report.load_sweep(sweep_dir)
rows = [report.summarize(run) for run in runs]
display(Markdown(report.markdown_table(rows)))

# %% [markdown]
# ## Loss curves and validation loss vs n

# %%
display(report.plot_loss_curves(runs))
display(report.plot_val_loss_vs_n(rows))

# %% [markdown]
# ## Stability: composite Amax gain (mHC Fig. 3/7) and gradient norms

# %%
display(report.plot_amax_gain(runs))
display(report.plot_grad_norm(runs))

# %% [markdown]
# ## H_res of the last diagnostics record (mHC Fig. 8)

# %%
for run in runs:
    if run.profiles:
        display(report.plot_h_res(run))
plt.close("all")
