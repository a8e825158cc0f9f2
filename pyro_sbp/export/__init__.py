"""Export: a plain, physically smaller ``nn.Module`` from a gated network and its masks,
and its parameters, FLOPs and latency; ONNX files and their latency under ONNX Runtime with the
``onnx`` extra (``pip install 'pyro-sbp[onnx]'``; imported only when used)."""

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
from pyro_sbp.export.onnx import compare_onnx, load_onnx, measure_latency_onnx, save_onnx

__all__ = [
    "FeatureSelect",
    "InputNormalization",
    "MaxPool2x2",
    "compare",
    "compare_onnx",
    "count_flops",
    "count_parameters",
    "export_full",
    "export_pruned",
    "format_table",
    "load_onnx",
    "load_torchscript",
    "measure_latency",
    "measure_latency_onnx",
    "save_onnx",
    "save_torchscript",
]
