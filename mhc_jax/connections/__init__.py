"""The connection concept in one place: residual, HC and mHC (docs/spec.md §2-§5).

- ``functional``: the math on arrays (mappings, pre, post-res, inits, the stream head);
  mHC's math is the kernel package's reference (``pallas_kernels.mhc.reference``),
  exposed here, so that the kernels import nothing of this library.
- ``sinkhorn``: Sinkhorn-Knopp onto the doubly stochastic matrices (§5).
- ``partitioned``: the dispatch of the mHC ops to the kernels, inside ``shard_map`` on
  a device mesh.
- ``modules``: the Linen modules that own the parameters and wrap one sub-layer.

The public names of all four are importable from here.
"""

from mhc_jax.connections.functional import (
    MHC_INITS,
    MHC_VARIANTS,
    RES_DIAGONAL,
    RESIDUAL_SHARDS,
    ROUND_ROBIN_EPS,
    HCDynamicParams,
    apply_post_res,
    apply_pre,
    check_streams,
    hc_mappings,
    mhc_coefficients,
    mhc_mappings,
    mhc_mappings_and_pre,
    project_streams,
    residual_init_bias,
    stream_head,
)
from mhc_jax.connections.modules import (
    BRANCH_OUTPUT,
    CONNECTION_OUTPUT,
    HyperConnection,
    ManifoldHyperConnection,
    Residual,
    StreamHead,
    defers_post_res,
)
from mhc_jax.connections.sinkhorn import multiplicative_runs, sinkhorn_knopp

__all__ = [
    "BRANCH_OUTPUT",
    "CONNECTION_OUTPUT",
    "MHC_INITS",
    "MHC_VARIANTS",
    "RESIDUAL_SHARDS",
    "RES_DIAGONAL",
    "ROUND_ROBIN_EPS",
    "HCDynamicParams",
    "HyperConnection",
    "ManifoldHyperConnection",
    "Residual",
    "StreamHead",
    "apply_post_res",
    "apply_pre",
    "check_streams",
    "defers_post_res",
    "hc_mappings",
    "mhc_coefficients",
    "mhc_mappings",
    "mhc_mappings_and_pre",
    "multiplicative_runs",
    "project_streams",
    "residual_init_bias",
    "sinkhorn_knopp",
    "stream_head",
]
