"""Fused Pallas kernels for mHC connections (SPEC §7); see ``api`` for the entry points
and ``backends`` for how the implementation is chosen."""

from pallas_kernels.mhc.api import (
    IMPLS,
    apply_post_res,
    apply_pre,
    mhc_mappings,
    mhc_mappings_and_pre,
)
from pallas_kernels.mhc.backends import Impl, UnsupportedInput

__all__ = [
    "IMPLS",
    "Impl",
    "UnsupportedInput",
    "apply_post_res",
    "apply_pre",
    "mhc_mappings",
    "mhc_mappings_and_pre",
]
