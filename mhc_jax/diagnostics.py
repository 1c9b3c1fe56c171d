"""Stability diagnostics of HC/mHC (SPEC §6): coefficients, Amax gains, heatmaps.

Connections ``sow`` their token-averaged coefficients into the ``diagnostics``
collection during the ordinary forward pass, so nothing is recomputed:

    logits, state = LM(cfg).apply({"params": p}, tokens, mutable=["diagnostics"])
    coeffs = collect_coefficients(state["diagnostics"])   # arrays with leading axis L
    stats = summary_stats(coeffs)                          # scalars for logging
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

COEFFICIENT_KEYS = ("h_pre", "h_post", "h_res", "res_row_err", "res_col_err")
_BLOCK = re.compile(r"block_(\d+)$")
_SUBLAYER_ORDER = {"attn_conn": 0, "mlp_conn": 1}


def collect_coefficients(diagnostics: dict) -> dict[str, jax.Array]:
    """Stacks the sown coefficients of every connection in layer order.

    Works for every block layout of ``model.run_blocks``: blocks named
    ``block_<i>`` anywhere in the tree, and scanned blocks (under ``scan``)
    whose leaves carry a leading axis over scan steps.

    Args:
      diagnostics: the ``diagnostics`` collection returned by ``LM.apply``.

    Returns:
      {"h_pre": (L, n), "h_post": (L, n), "h_res": (L, n, n),
       "res_row_err": (L,), "res_col_err": (L,)}; empty for a residual model.
    """
    found = []  # ((block index, sub-layer), stats)

    def walk(tree, scanned):
        for name, sub in tree.items():
            if not isinstance(sub, dict):
                continue
            m = _BLOCK.match(name)
            if m is None:
                walk(sub, scanned or name == "scan")
                continue
            for conn, order in _SUBLAYER_ORDER.items():
                if "coefficients" not in sub.get(conn, {}):
                    continue
                (stats,) = sub[conn]["coefficients"]
                found.append(((int(m.group(1)), order, scanned), stats))

    walk(diagnostics, False)
    if not found:
        return {}
    unit = (
        1 + max(block for (block, _, scanned), _ in found if scanned)
        if any(key[2] for key, _ in found)
        else 0
    )
    layers = []
    for (block, order, scanned), stats in found:
        if not scanned:
            layers.append(((block, order), stats))
            continue
        steps = jax.tree.leaves(stats)[0].shape[0]
        for u in range(steps):
            layers.append(((u * unit + block, order), jax.tree.map(lambda v, u=u: v[u], stats)))
    layers.sort(key=lambda item: item[0])
    return {k: jnp.stack([stats[k] for _, stats in layers]) for k in COEFFICIENT_KEYS}


def amax_gain(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Amax gain magnitudes of (..., n, n) matrices.

    Returns:
      (forward, backward): max absolute row sum and max absolute column sum, (...,).
    """
    forward = jnp.max(jnp.abs(jnp.sum(m, axis=-1)), axis=-1)
    backward = jnp.max(jnp.abs(jnp.sum(m, axis=-2)), axis=-1)
    return forward, backward


def composite_products(h_res: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Composite mappings of a depth-L stack of (n, n) matrices.

    Args:
      h_res: (L, n, n), layer order.

    Returns:
      forward (L, n, n) with ``forward[l] = H[l] @ ... @ H[0]`` and backward
      (L, n, n) with ``backward[l] = H[L-1] @ ... @ H[l]``.
    """
    h = h_res.astype(jnp.float32)
    eye = jnp.eye(h.shape[-1], dtype=h.dtype)

    def fwd_step(acc, m):
        acc = m @ acc
        return acc, acc

    def bwd_step(acc, m):
        acc = acc @ m
        return acc, acc

    _, forward = jax.lax.scan(fwd_step, eye, h)
    _, backward = jax.lax.scan(bwd_step, eye, h, reverse=True)
    return forward, backward


def gain_profile(h_res: jax.Array) -> dict[str, jax.Array]:
    """Per-layer and composite forward/backward Amax gains of (L, n, n): each (L,)."""
    forward, backward = composite_products(h_res)
    layer_fwd, layer_bwd = amax_gain(h_res)
    return {
        "layer_forward": layer_fwd,
        "layer_backward": layer_bwd,
        "composite_forward": amax_gain(forward)[0],
        "composite_backward": amax_gain(backward)[1],
    }


def summary_stats(coeffs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Cheap scalars for logging every N steps (jit-friendly).

    Keys: ``amax/{layer,composite}_{forward,backward}_max``, ``h_res/row_err_max``,
    ``h_res/col_err_max``, ``h_pre/mean``, ``h_post/mean``; empty for a residual model.
    """
    if not coeffs:
        return {}
    prof = gain_profile(coeffs["h_res"])
    stats = {f"amax/{k}_max": jnp.max(v) for k, v in prof.items()}
    stats["h_res/row_err_max"] = jnp.max(coeffs["res_row_err"])
    stats["h_res/col_err_max"] = jnp.max(coeffs["res_col_err"])
    stats["h_pre/mean"] = jnp.mean(coeffs["h_pre"])
    stats["h_post/mean"] = jnp.mean(coeffs["h_post"])
    return stats


def heatmap_image(h_res, max_cols: int = 8) -> np.ndarray:
    """Renders per-layer H_res heatmaps (mHC Fig. 8 style) to an RGB image.

    Args:
      h_res: (L, n, n) token-averaged H_res per layer.
      max_cols: heatmaps per row.

    Returns:
      (H, W, 3) uint8 image, e.g. for TensorBoard's ``add_image(..., dataformats="HWC")``.
    """
    # A Figure with its own Agg canvas: no pyplot state, no global backend switch
    # (a notebook that trains in-process keeps its inline plots).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h_res = np.asarray(h_res, dtype=np.float32)
    num = h_res.shape[0]
    cols = min(max_cols, num)
    rows = -(-num // cols)
    fig = Figure(figsize=(1.6 * cols, 1.6 * rows), dpi=80)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = max(1.0, float(np.abs(h_res).max()))
    for idx, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if idx < num:
            ax.imshow(h_res[idx], cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_title(f"layer {idx}", fontsize=7)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
