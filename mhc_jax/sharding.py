"""Device mesh, logical-axis rules and the layout of the n-stream residual.

Mesh axes: ``data`` (pure data parallelism), ``fsdp`` (data parallelism with
parameters and optimiser state sharded) and ``tensor`` (Megatron-style tensor
parallelism of attention heads, MLP width and vocabulary). The residual stream
(B, T, n, C) has its batch over ``data`` x ``fsdp`` and, on ``tensor``, either its
hidden axis C (``ModelConfig.residual_shard="hidden"``) or its sequence axis
(``"sequence"``); the stream axis n is never split, so the mHC mapping needs just
one ``psum`` of n*n + 2n + 1 numbers per token (see ``mhc_jax.connections.partitioned``).

Modules name the axes of parameters and activations logically; ``logical_rules``
maps the names to mesh axes:

    parameters: embed (C), mlp (d_ff), heads, head_dim, qkv, vocab, streams (n), coeffs, norm
    activations: batch, seq, streams, act_embed (C of the residual and sub-layer inputs)
"""

from __future__ import annotations

import dataclasses
import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one may be -1: all remaining devices. (The residual's layout
    on ``tensor`` is ``ModelConfig.residual_shard``.)"""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = [self.data, self.fsdp, self.tensor]
        if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
            raise ValueError(
                f"sharding.(data, fsdp, tensor)={tuple(sizes)} is invalid: sizes must be >= 1, "
                "with at most one -1 (fill with the remaining devices)"
            )

    def axis_sizes(self, num_devices: int) -> tuple[int, int, int]:
        """Resolves -1 and checks that the sizes multiply to ``num_devices``."""
        sizes = [self.data, self.fsdp, self.tensor]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"sharding.(data, fsdp, tensor)={tuple(sizes)} is invalid: the fixed sizes "
                    f"(product {known}) must divide the {num_devices} devices"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"sharding.(data, fsdp, tensor)={tuple(sizes)} is invalid: the product "
                f"{math.prod(sizes)} must equal the {num_devices} devices"
            )
        return sizes[0], sizes[1], sizes[2]


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over ``devices`` (default: all), axes in auto mode."""
    devices = jax.devices() if devices is None else devices
    sizes = cfg.axis_sizes(len(devices))
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(residual_shard: str = "hidden") -> tuple[tuple[str, object], ...]:
    """Logical axis name -> mesh axis (or axes, or None = replicated)."""
    return (
        ("batch", ("data", "fsdp")),
        ("seq", "tensor" if residual_shard == "sequence" else None),
        ("act_embed", "tensor" if residual_shard == "hidden" else None),
        ("streams", None),
        ("streams_out", None),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("vocab", "tensor"),
        ("head_dim", None),
        ("qkv", None),
        ("coeffs", None),
        ("norm", None),
        ("layers", None),
    )


def check_model_fits(mesh: Mesh, model_cfg, seq_len: int, batch: int):
    """Raises ValueError naming the field when a size does not divide its mesh axes."""
    tp = mesh.shape["tensor"]
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    checks = [
        ("data.batch_size", batch, dp, "data x fsdp"),
        ("model.num_heads", model_cfg.num_heads, tp, "tensor"),
        ("model.d_ff", model_cfg.d_ff, tp, "tensor"),
    ]  # C = num_heads * head_dim: the heads' check covers C in "hidden" mode
    if model_cfg.residual_shard == "sequence":
        checks.append(("data.seq_len", seq_len, tp, "tensor"))
    for field, value, size, axes in checks:
        if value % size:
            raise ValueError(
                f"{field}={value} is invalid: must be divisible by the mesh's {axes} size {size}"
            )


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (e.g. a vocabulary of 259)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        out.append(axes if dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return PartitionSpec(*out)


def strip_boxes(tree):
    """Replaces Flax ``LogicallyPartitioned`` boxes by their values, without adding
    sharding constraints (``nn.unbox`` adds them, which fails outside of a trace)."""
    return jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )


def tree_shardings(abstract_boxed, mesh: Mesh, rules) -> object:
    """NamedShardings for a pytree whose leaves may be Flax ``LogicallyPartitioned`` boxes.

    Boxed leaves get their logical axes mapped through ``rules``; plain leaves
    (step counters, RNG keys) are replicated. The result matches the unboxed tree.
    """
    logical = nn.get_partition_spec(abstract_boxed)
    mesh_specs = nn.logical_to_mesh(logical, rules)
    unboxed = strip_boxes(abstract_boxed)
    return jax.tree.map(
        lambda spec, leaf: NamedSharding(mesh, _fit(spec, leaf.shape, mesh)),
        mesh_specs,
        unboxed,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, residual_shard: str) -> NamedSharding:
    """(B, T) token batches: B over data x fsdp; T over tensor in sequence mode."""
    seq = "tensor" if residual_shard == "sequence" else None
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), seq))


def launched_multiprocess(env=None) -> bool:
    """True when the environment (default ``os.environ``) describes a job of several
    processes: then ``jax.distributed.initialize()`` must run before JAX is used."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return True
    return int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
