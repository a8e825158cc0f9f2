"""Export: a plain, physically smaller ``nn.Module`` from a gated network and its masks,
and its parameters, FLOPs and latency."""

from pyro_sbp.export.exporter import (
    FeatureSelect,
    InputNormalization,
    MaxPool2x2,
    export_full,
    export_pruned,
    load_torchscript,
    save_torchscript,
)
from pyro_sbp.export.measure import (
    compare,
    count_flops,
    count_parameters,
    format_table,
    measure_latency,
)

__all__ = [
    "FeatureSelect",
    "InputNormalization",
    "MaxPool2x2",
    "compare",
    "count_flops",
    "count_parameters",
    "export_full",
    "export_pruned",
    "format_table",
    "load_torchscript",
    "measure_latency",
    "save_torchscript",
]
