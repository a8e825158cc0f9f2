"""Variational guides for gated networks."""
