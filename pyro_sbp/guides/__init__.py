"""Variational guides for gated networks."""

from pyro_sbp.guides.sbp_guide import SBPGuide

__all__ = ["SBPGuide"]
