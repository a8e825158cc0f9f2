"""Diagnostics: the gates' posteriors as ArviZ data, the run report and its plots."""

from pyro_sbp.diagnostics.arviz_data import save_netcdf, to_arviz, var_name
from pyro_sbp.diagnostics.report import accuracy_vs_compression, format_summary, make_report

__all__ = [
    "accuracy_vs_compression",
    "format_summary",
    "make_report",
    "save_netcdf",
    "to_arviz",
    "var_name",
]
