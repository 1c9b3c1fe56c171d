"""Fused Pallas kernels for mHC connections (SPEC §7); see ``api`` for the entry points."""

from pallas_kernels.mhc.api import (
    IMPLS,
    apply_post_res,
    apply_pre,
    mhc_mappings,
    mhc_mappings_and_pre,
)

__all__ = ["IMPLS", "apply_post_res", "apply_pre", "mhc_mappings", "mhc_mappings_and_pre"]
