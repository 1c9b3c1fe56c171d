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
# # mhc-jax quickstart
#
# Train a small byte-level language model whose residual stream is widened into
# n = 4 streams mixed by **mHC** (manifold-constrained hyper-connections: the
# stream-mixing matrix H_res is projected onto the doubly stochastic matrices by
# Sinkhorn-Knopp), then look at what it learned: the loss, the H_res matrices
# and the Amax gain diagnostics of the mHC paper.
#
# Runs on a CPU in a few minutes (`NUM_STEPS = 300`); a GPU runtime is faster.

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
NUM_STEPS = 300  # training steps (the tiny config's full run)
MODEL_OVERRIDES = ""  # tiny.py's argument, e.g. "num_blocks=2,n=2"; "" = 4 blocks, C=128, n=4
EVAL_BATCHES = 16  # validation batches per evaluation
SAMPLE_TOKENS = 200  # bytes generated at the end (0: none)

# %%
import shutil
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from mhc_jax import config as config_lib
from mhc_jax import report, results
from mhc_jax.costs import abstract_param_counts
from mhc_jax.diagnostics import collect_coefficients, gain_profile
from mhc_jax.model import LM, init_params

TINY_CONFIG = os.path.join(REPO, "experiments", "configs", "tiny.py")
print("JAX", jax.__version__, "on", jax.devices())

# %% [markdown]
# ## The model
#
# The `tiny` config: 4 blocks, C = 128, mHC with n = 4 streams (unless
# `MODEL_OVERRIDES` changes it). Every sub-layer (attention, MLP) has its own
# connection, so 4 blocks have L = 8 connection layers.

# %%
cfg = config_lib.load_config_file(TINY_CONFIG, MODEL_OVERRIDES)
cfg.training.num_steps = NUM_STEPS
cfg.training.eval_every = max(NUM_STEPS // 3, 1)
cfg.training.checkpoint_every = NUM_STEPS
cfg.training.sample_tokens = SAMPLE_TOKENS
cfg.data.eval_max_batches = EVAL_BATCHES
cfg.logging.diagnostics_every = max(NUM_STEPS // 3, 1)
cfg.logging.progress = False
model_cfg = config_lib.model_config(cfg)
counts = abstract_param_counts(model_cfg)
print(model_cfg)
print(f"parameters: {counts['total']:,} total, {counts['connections']:,} in the connections")

# %% [markdown]
# At initialisation (`mhc_init="residual"`) mHC reads one stream per layer
# (round robin) and H_res is 0.9 on the diagonal: the network starts as a pre-norm
# residual network. The connections record their token-averaged coefficients
# in the `diagnostics` collection during the ordinary forward pass.

# %%
params = init_params(model_cfg, jax.random.key(0))
tokens = jnp.zeros((2, 16), jnp.int32)
logits, state = LM(model_cfg).apply({"params": params}, tokens, mutable=["diagnostics"])
coeffs = collect_coefficients(state["diagnostics"])
print("logits", logits.shape, logits.dtype)
np.set_printoptions(precision=3, suppress=True)
print("h_pre of layer 0:", np.asarray(coeffs["h_pre"][0]))
print("H_res of layer 0:\n", np.asarray(coeffs["h_res"][0]))

# %% [markdown]
# ## Train
#
# `train_and_evaluate` is what `experiments/train.py` runs: bundled Shakespeare,
# AdamW, evaluation, checkpoints, logs in the workdir (re-running resumes; this
# notebook starts fresh each time). It ends with a sample of generated text.

# %%
from mhc_jax.loop import train_and_evaluate

workdir = os.path.join(tempfile.gettempdir(), "mhc_quickstart")
shutil.rmtree(workdir, ignore_errors=True)
result = train_and_evaluate(cfg, workdir)
# The TensorBoard heatmaps switched matplotlib to Agg; back to inline plots.
# %matplotlib inline

# %%
run = results.load_run(workdir)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(*run.series("train", "loss"), label="train")
ax.plot(*run.series("validation", "loss"), "o--", label="validation")
ax.set(xlabel="step", ylabel="loss (nats/byte)", title=f"{model_cfg.connection}, n={model_cfg.n}")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## What mHC learned
#
# H_res of every layer at the last diagnostics step (mHC paper, Fig. 8). Each
# matrix is doubly stochastic: rows and columns sum to 1, so mixing streams can
# neither amplify nor attenuate the residual signal.

# %%
report.plot_h_res(run)

# %% [markdown]
# The Amax gain magnitude (SPEC §6) of the composite mapping through all layers
# is the max absolute row sum (forward) or column sum (backward) of the product
# of the H_res matrices. For mHC it stays at 1; unconstrained HC can drift far from it.

# %%
last = run.profiles[-1]
h_res = np.asarray(last["h_res"])
print(
    f"max |row sum - 1| = {np.abs(h_res.sum(-1) - 1).max():.1e}, "
    f"max |column sum - 1| = {np.abs(h_res.sum(-2) - 1).max():.1e} over all layers"
)
for key, values in gain_profile(jnp.asarray(h_res)).items():
    print(f"{key:20s}", np.asarray(values))
report.plot_amax_gain([run])

# %% [markdown]
# The scalars logged every `diagnostics_every` steps (also in TensorBoard):

# %%
keys = [
    "amax/composite_forward_max",
    "amax/composite_backward_max",
    "h_res/col_err_max",
    "h_pre/mean",
    "h_post/mean",
]
print(f"{'step':>5s} " + " ".join(f"{k:>28s}" for k in keys))
for record in run.metrics["diagnostics"]:
    print(f"{record['step']:5d} " + " ".join(f"{record[k]:28.6f}" for k in keys))
