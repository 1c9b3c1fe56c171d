"""Checks a run's config against the devices it would use, before anything is written.

``train_and_evaluate`` runs ``preflight`` first, and ``experiments/train.py --dry_run``
runs it instead of training, so a config that cannot run (a mesh that does not fit the
devices, a batch the mesh cannot split, kernels that cannot take the model) fails in
seconds with a message naming the field, before any data is prepared or workdir made.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import ml_collections

from mhc_jax import config as config_lib
from mhc_jax.model import ModelConfig
from mhc_jax.sharding import check_model_fits
from mhc_jax.train import Layout, deterministic_model
from pallas_kernels.mhc import backends


class Preflight(NamedTuple):
    """What a run resolves to on this host's devices."""

    model: ModelConfig
    layout: Layout
    mhc_impl: str  # the mHC implementation that runs, as ``backends.describe`` ("-": none)


def preflight(config: ml_collections.ConfigDict, devices=None) -> Preflight:
    """Validates ``config`` against ``devices`` (default: all of this job's devices).

    Raises:
      ValueError: naming the first invalid field, its value and what is allowed.
    """
    config_lib.resolve_tokenizer(config)
    model_cfg = deterministic_model(config_lib.model_config(config), config.training.deterministic)
    config_lib.optimizer_config(config)
    layout = Layout.create(config_lib.mesh_config(config), model_cfg, devices)
    mesh = layout.mesh
    config_lib.validate(config, mesh.shape["data"] * mesh.shape["fsdp"], jax.process_count())
    check_model_fits(mesh, model_cfg, config.data.seq_len, config.data.batch_size)
    impl = "-"
    if model_cfg.connection == "mhc":
        impl = backends.describe(backends.resolve(model_cfg.impl, model_cfg.n, "model.impl"))
    return Preflight(model_cfg, layout, impl)


def describe(run: Preflight) -> str:
    """One line: the mesh over the devices and the mHC implementation."""
    mesh = run.layout.mesh
    axes = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
    platform = mesh.devices.flat[0].platform
    return f"mesh: {axes} over {mesh.size} {platform} device(s); mHC impl: {run.mhc_impl}"
