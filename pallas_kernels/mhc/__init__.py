"""Fused Pallas kernels for mHC connections (SPEC §7); see ``api`` for the entry points
and ``backends`` for how the implementation is chosen."""

from pallas_kernels.mhc.api import (
    IMPLS,
    apply_post_res,
    apply_pre,
    mhc_mappings,
    mhc_mappings_and_pre,
    post_res,
    pre,
)
from pallas_kernels.mhc.backends import Impl, UnsupportedInput
from pallas_kernels.mhc.context import Context, MappingConfig, MappingWeights

__all__ = [
    "IMPLS",
    "Context",
    "Impl",
    "MappingConfig",
    "MappingWeights",
    "UnsupportedInput",
    "apply_post_res",
    "apply_pre",
    "mhc_mappings",
    "mhc_mappings_and_pre",
    "post_res",
    "pre",
]
