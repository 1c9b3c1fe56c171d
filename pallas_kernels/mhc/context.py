"""What the mHC ops take and hand on: the mapping's weights and settings, and the context
the mapping gives post-res (``api.pre`` -> F -> ``api.post_res``)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

from pallas_kernels.mhc import variants


class MappingWeights(NamedTuple):
    """One mHC layer's mapping parameters (SPEC §4), fp32.

    phi: (n*C, n*n + 2n), columns [pre | post | res row-major] (``partitioned.mhc_pre``
    takes it as (n, C, n*n + 2n), so that C shards like the streams'); bias:
    (n*n + 2n,); alpha: (3,), the logit scales of pre, post and res.
    """

    phi: jax.Array
    bias: jax.Array
    alpha: jax.Array


@dataclasses.dataclass(frozen=True)
class MappingConfig:
    """Static settings of the mapping: Sinkhorn iterations, the RMS epsilon over n*C, and
    the variant of the coefficient math (``variants``: "paper", "deepseek_v4", "lite")."""

    num_iters: int = 20
    norm_eps: float = 1e-6
    variant: str = "paper"

    def __post_init__(self):
        if not isinstance(self.num_iters, int) or self.num_iters < 1:
            raise ValueError(f"num_iters must be an integer >= 1, got {self.num_iters!r}")
        if not self.norm_eps >= 0:
            raise ValueError(f"norm_eps must be >= 0, got {self.norm_eps!r}")
        variants.check(self.variant, name="MappingConfig.variant")


class Context(NamedTuple):
    """What post-res needs from its layer's mapping (and h_pre, for diagnostics).

    h_pre (..., n), h_post (..., n), h_res (..., n, n) fp32; streams (..., n, C): the
    layer's input streams as the mapping returned them (with the kernels, their
    cotangent then joins dx inside the mapping's backward).
    """

    h_pre: jax.Array
    h_post: jax.Array
    h_res: jax.Array
    streams: jax.Array


class Pending(NamedTuple):
    """A layer whose post-res has not run yet: its Context and its sub-layer's output f
    (..., C). The next mHC layer runs that post-res fused with its own mapping + pre
    (``api.transition``); after the last layer, ``post_res(*pending)`` gives the streams."""

    ctx: Context
    f: jax.Array
