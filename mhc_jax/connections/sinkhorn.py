"""Sinkhorn-Knopp (SPEC §5), exact at every logit scale: ``sinkhorn_knopp`` of
``pallas_kernels.mhc.sinkhorn``, which the kernels' coefficient code shares, under the
library's name."""

from pallas_kernels.mhc.sinkhorn import multiplicative_runs, sinkhorn_knopp

__all__ = ["multiplicative_runs", "sinkhorn_knopp"]
