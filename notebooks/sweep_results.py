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
# The report of `experiments/report.py` (`mhc_jax.report`), inline: a table of runs and the figures
# (loss curves, validation loss vs n, composite Amax gain vs layer, gradient
# norms, H_res heatmaps).
#
# Which runs: `SWEEP_DIR` if set; else the first sweep with runs under the
# committed `experiments/results/`; else a 2-run micro sweep (HC vs mHC, n = 4,
# a 2-block model) trained here into a temporary directory.

# %%
# Install. On Colab: clone the repository (the notebooks read its configs and results)
# and install it; the cell changes nothing elsewhere, where mhc_jax comes from a checkout
# installed as the README says (`pip install -c constraints.txt -e .`).
# ruff: noqa: E402
import importlib
import os
import subprocess
import sys

REPO_URL = "https://github.com/mhc-jax/mhc-jax.git"  # or a fork; setup.cfg's url
IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    REPO = "/content/mhc-jax"
    if not os.path.isdir(REPO):
        subprocess.check_call(["git", "clone", "-q", "--depth=1", REPO_URL, REPO])
    # A regular (not editable) install: importable in this runtime without a restart.
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", REPO])
    importlib.invalidate_caches()
    os.chdir(REPO)  # sweeps run in the clone
try:
    import mhc_jax
except ModuleNotFoundError as e:
    raise ModuleNotFoundError(
        "mhc_jax is not installed: from a clone of the repository run\n"
        "  pip install -c constraints.txt -e .\n"
        "then open this notebook again (on Colab, run this cell: it installs it)."
    ) from e
if not IN_COLAB:
    REPO = os.path.dirname(os.path.dirname(os.path.abspath(mhc_jax.__file__)))  # the checkout

# %% tags=["parameters"]
SWEEP_DIR = ""  # a sweep's workdir; "" = experiments/results/ or the micro sweep
MICRO_STEPS = 60  # steps of each micro-sweep run

# %%
import tempfile

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

# %matplotlib inline
from mhc_jax import report, results, sweeps


# %%
def committed_sweeps(root):
    """Directories under ``root`` that directly hold runs (one sweep each), sorted."""
    if not os.path.isdir(root):
        return []
    return sorted({os.path.dirname(run_dir) for run_dir in results.find_run_dirs(root)})


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
    micro = sweeps.expand(MICRO_SWEEP, "micro")
    failed = sweeps.run_sweep(micro, sweep_dir, micro.runs)
    assert not failed, f"micro-sweep runs failed: {failed}"
print("sweep:", sweep_dir)

# %% [markdown]
# ## Table
#
# Params are total / added by the connections; the Amax columns are the largest
# composite gains over all diagnostics records; grad-norm spikes count logged
# steps above 5x the running median (see `mhc_jax/results.py`).

# %%
runs = results.load_sweep(sweep_dir)
rows = [results.summarize(run) for run in runs]
display(Markdown(results.markdown_table(rows)))

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
