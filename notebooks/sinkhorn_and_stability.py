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
# # Sinkhorn-Knopp and the stability of deep stream mixing
#
# 1. How fast Sinkhorn-Knopp makes a matrix doubly stochastic (row and column error).
# 2. The custom VJP (recompute the iterates in the backward pass) against autodiff
#    of the unrolled loop, in float64.
# 3. Amax gain of random deep stacks: unconstrained HC-style H_res vs mHC.
# 4. Spectral norms of single and composite mappings.
#
# Pure math on random matrices: seconds on a CPU.

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
N = 4  # streams
DEPTH = 64  # layers of the random stacks (a 32-block model)
NUM_MATRICES = 256  # random matrices (and random stacks) per measurement

# %%
import functools

import jax

jax.config.update("jax_enable_x64", True)  # float64 for the gradient comparison
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from mhc_jax.connections import residual_init_bias
from mhc_jax.connections.sinkhorn import sinkhorn_knopp
from mhc_jax.diagnostics import amax_gain, composite_products

key = jax.random.key(0)

# %% [markdown]
# ## 1. Convergence
#
# Each iteration normalises columns, then rows (SPEC §5), so rows sum to 1 to
# rounding after every iteration while the column error shrinks geometrically;
# the rate depends on how peaked the logits are. The loop below is SPEC §5 in
# NumPy (float32), recording the errors after every iteration; it matches the
# library's `sinkhorn_knopp` at the default 20 iterations.


# %%
def sinkhorn_errors(logits, num_iters):
    """Max row and column errors |sum - 1| after each of ``num_iters`` iterations."""
    shifted = logits - logits.max(axis=(-2, -1), keepdims=True)
    m = np.exp(shifted)  # no row lies far enough below the max to underflow at these scales
    errors = []
    for _ in range(num_iters):
        m = m / m.sum(-2, keepdims=True)
        m = m / m.sum(-1, keepdims=True)
        errors.append((np.abs(m.sum(-1) - 1).max(), np.abs(m.sum(-2) - 1).max()))
    return m, np.array(errors)


fig, ax = plt.subplots(figsize=(6, 3.5))
for scale in (0.5, 2.0, 5.0):
    logits = scale * np.asarray(jax.random.normal(key, (NUM_MATRICES, N, N)), np.float32)
    m20, _ = sinkhorn_errors(logits, 20)
    np.testing.assert_allclose(m20, sinkhorn_knopp(jnp.asarray(logits), 20), atol=1e-6)
    _, errors = sinkhorn_errors(logits, 40)
    line = ax.semilogy(np.arange(1, 41), errors[:, 1], label=f"columns, logits std {scale}")
    ax.semilogy(np.arange(1, 41), np.maximum(errors[:, 0], 1e-9), ":", color=line[0].get_color())
ax.axvline(20, color="k", lw=0.8, ls="--")
ax.set(xlabel="iterations", ylabel="max |sum - 1| (fp32)", title="rows dotted; 20 = default")
ax.grid(alpha=0.3, which="both")
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## 2. Gradient of the custom VJP vs the unrolled loop (float64)
#
# `sinkhorn_knopp` keeps only its input for the backward pass and recomputes the
# iterates there. Its vector-Jacobian product must equal autodiff of the plain
# unrolled loop.


# %%
def sinkhorn_unrolled(logits, num_iters):
    m = jnp.exp(logits - jnp.max(logits, axis=(-2, -1), keepdims=True))
    for _ in range(num_iters):
        m = m / m.sum(-2, keepdims=True)
        m = m / m.sum(-1, keepdims=True)
    return m


k1, k2 = jax.random.split(key)
logits = 2.0 * jax.random.normal(k1, (NUM_MATRICES, N, N), jnp.float64)
cotangent = jax.random.normal(k2, (NUM_MATRICES, N, N), jnp.float64)
print(f"{'iters':>5s} {'max |forward diff|':>20s} {'max rel. grad diff':>20s}")
for num_iters in (1, 5, 20, 50):
    out, vjp = jax.vjp(functools.partial(sinkhorn_knopp, num_iters=num_iters), logits)
    ref, vjp_ref = jax.vjp(functools.partial(sinkhorn_unrolled, num_iters=num_iters), logits)
    (g,), (g_ref,) = vjp(cotangent), vjp_ref(cotangent)
    rel = jnp.max(jnp.abs(g - g_ref)) / jnp.max(jnp.abs(g_ref))
    print(f"{num_iters:5d} {float(jnp.max(jnp.abs(out - ref))):20.2e} {float(rel):20.2e}")

# %% [markdown]
# ## 3. Amax gain of deep random stacks
#
# Layer l mixes the streams with H_res[l]; the signal through layers 0..l sees the
# product H_res[l] ··· H_res[0]. HC's H_res is the identity plus unconstrained
# learned terms; here they are random, `I + eps * G` with G standard normal. mHC's
# is Sinkhorn of its residual-init logits (0.9 on the diagonal) plus noise
# `sigma * G`. Forward gain = max absolute row sum of the composite, backward =
# max absolute column sum (SPEC §6). Lines: median over `NUM_MATRICES` random
# stacks; bands: 10th to 90th percentile. Even zero-mean perturbations compound
# with depth; a systematic drift of the learned terms would compound
# geometrically (row sums of 1.05 give 1.05^64 ≈ 23).


# %%
def hc_stacks(eps, key):
    g = jax.random.normal(key, (NUM_MATRICES, DEPTH, N, N))
    return jnp.eye(N) + eps * g


def mhc_stacks(sigma, key):
    g = jax.random.normal(key, (NUM_MATRICES, DEPTH, N, N))
    bias = residual_init_bias(N, 0)[2 * N :].reshape(N, N).astype(jnp.float64)
    return sinkhorn_knopp(bias + sigma * g, 20)


stacks = {
    "HC, eps=0.05": (hc_stacks(0.05, key), "tab:orange"),
    "HC, eps=0.1": (hc_stacks(0.1, key), "tab:red"),
    "HC, eps=0.2": (hc_stacks(0.2, key), "darkred"),
    "mHC, sigma=1": (mhc_stacks(1.0, key), "tab:cyan"),
    "mHC, sigma=4": (mhc_stacks(4.0, key), "tab:blue"),
}
composites = {name: jax.vmap(composite_products)(h) for name, (h, _) in stacks.items()}


def band(ax, values, color, label):
    """Median line and 10-90% band over the stacks axis: values (stacks, L)."""
    lo, mid, hi = np.percentile(np.asarray(values), [10, 50, 90], axis=0)
    ax.semilogy(mid, color=color, label=label)
    ax.fill_between(np.arange(len(mid)), lo, hi, color=color, alpha=0.2)


fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for name, (forward, backward) in composites.items():
    band(axes[0], amax_gain(forward)[0], stacks[name][1], name)
    band(axes[1], amax_gain(backward)[1], stacks[name][1], name)
axes[0].set(xlabel="layer l", ylabel="Amax gain", title="forward composite H[l]···H[0]")
axes[1].set(xlabel="layer l", title="backward composite H[L-1]···H[l]")
for ax in axes:
    ax.grid(alpha=0.3, which="both")
axes[1].legend(fontsize=7)
plt.show()

# %% [markdown]
# ## 4. Spectral norms
#
# An exactly doubly stochastic matrix has spectral norm 1 (at most
# sqrt(max row sum x max column sum) = 1, and the all-ones vector attains it),
# and products of doubly stochastic matrices are doubly stochastic: no depth of
# mHC mixing amplifies any direction of the residual stream, while HC's norms
# multiply. After 20 Sinkhorn iterations the columns are normalised only up to
# the error of section 1, so mHC's norms are 1 up to that error.

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, (forward, _) in composites.items():
    band(ax, jnp.linalg.norm(forward, ord=2, axis=(-2, -1)), stacks[name][1], name)
    single = jnp.linalg.norm(stacks[name][0], ord=2, axis=(-2, -1))
    print(
        f"{name:14s} single-layer spectral norm: median {float(jnp.median(single)):.4f}, "
        f"max {float(single.max()):.4f}"
    )
ax.set(xlabel="layer l", ylabel="||H[l]···H[0]||_2", title="composite spectral norm")
ax.grid(alpha=0.3, which="both")
ax.legend(fontsize=7)
plt.show()
