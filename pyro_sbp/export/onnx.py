"""ONNX export of exported networks, and their latency under ONNX Runtime (the ``onnx`` extra:
``pip install 'pyro-sbp[onnx]'``)."""

import io
import warnings
from pathlib import Path

import torch
import torch.fx
from torch import nn

from pyro_sbp.infer.checkpoint import write_atomic

_INSTALL = "pip install 'pyro-sbp[onnx]'"
#: The names of the exported graph's input and output; dim 0 of both is ``"batch"``.
INPUT_NAME, OUTPUT_NAME = "input", "output"
# ONNX Runtime's element types and the NumPy dtypes that feed them.
_NUMPY_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64"}


def _require(name: str):
    """Import ``onnx`` or ``onnxruntime``, or say how to install them."""
    import importlib

    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise ImportError(
            f"ONNX export and ONNX Runtime need the {name} package: {_INSTALL}"
        ) from None
    except ImportError as e:  # installed, but built for other libraries (NumPy 1, say)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ImportError(f"{name} is installed but does not import ({reason}): {_INSTALL}") from e


def _quiet_onnx():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    # torch 2.9+ deprecates the TorchScript-based exporter in favour of the torch.export-based
    # one (which needs onnxscript); the TorchScript-based one traces these plain networks
    # exactly, with a dynamic batch dimension.
    warnings.filterwarnings(
        "ignore", category=DeprecationWarning, message=r".*legacy TorchScript-based ONNX export"
    )
    warnings.filterwarnings(
        "ignore",
        category=DeprecationWarning,
        message=r"The feature will be removed",
        module=r"torch\.onnx",
    )
    return ctx


def _highest_opset() -> int | None:
    """The highest opset of torch's TorchScript-based exporter (``None`` if torch does not say)."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return None
    return getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", None)


def save_onnx(
    module: nn.Module,
    path: str | Path,
    input_shape: tuple[int, ...],
    *,
    opset: int | None = None,
) -> None:
    """Save a plain network (what :func:`~pyro_sbp.export.export_pruned` returns, or a
    ``torch.fx.GraphModule`` of plain torch modules) as an ONNX model, through a temporary file
    and a rename, so that a failed save leaves the previous file intact.

    The model has one input, ``"input"``, of shape ``(batch, *input_shape)``, and one output,
    ``"output"``; the batch dimension is dynamic. It is written by torch's TorchScript-based
    exporter (``torch.onnx.export(..., dynamo=False)``), in evaluation mode, with constants
    folded, and checked with ``onnx.checker`` before it is written. It loads with
    ``onnxruntime`` alone (:func:`load_onnx`), no torch, pyro or pyro_sbp needed.

    :param input_shape: the shape of one input, e.g. ``(1, 28, 28)``.
    :param opset: the ONNX opset version; torch's default for the exporter when ``None``.
    :raises ImportError: if ``onnx`` is not installed (``pip install 'pyro-sbp[onnx]'``).
    :raises ValueError: for an opset this exporter does not support (it needs 11 or newer).
    :raises RuntimeError: if the module cannot be traced or exported (one line, naming ``path``).
    """
    onnx = _require("onnx")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 11):
        # At opset 9 and older the exporter cannot slice (MaxPool2x2) with a dynamic batch; 11
        # is the oldest opset tested here.
        raise ValueError(f"opset must be an integer >= 11, got {opset!r}")
    highest = _highest_opset()
    if opset is not None and highest is not None and opset > highest:
        # torch would warn, then export what it can or fail.
        raise ValueError(
            f"opset {opset} is not supported by torch {torch.__version__}'s TorchScript-based "
            f"ONNX exporter (at most {highest})"
        )
    module = module.eval()
    param = next(iter(module.parameters()), None)
    dtype = torch.get_default_dtype() if param is None else param.dtype
    device = torch.device("cpu") if param is None else param.device
    # Traced at batch 2: at batch 1 the tracer could fold a size-1 dimension into a constant.
    x = torch.rand((2, *input_shape), dtype=dtype, device=device)
    buf = io.BytesIO()
    ctx = _quiet_onnx()
    try:
        torch.onnx.export(
            module,
            (x,),
            buf,
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    except RuntimeError as e:
        # torch's messages go on with the whole TorchScript graph: the first line says it.
        text = str(e).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        if reason.startswith("Unsupported onnx_opset_version"):
            raise ValueError(
                f"opset {opset} is not supported by torch {torch.__version__}'s TorchScript-based "
                "ONNX exporter"
            ) from None
        kind = "GraphModule" if isinstance(module, torch.fx.GraphModule) else type(module).__name__
        raise RuntimeError(f"ONNX export of {kind} to {path} failed: {reason}") from e
    finally:
        ctx.__exit__(None, None, None)
    data = buf.getvalue()
    onnx.checker.check_model(onnx.load_model_from_string(data))
    write_atomic(path, lambda f: f.write(data))


def load_onnx(path: str | Path, num_threads: int = 1):
    """An ``onnxruntime.InferenceSession`` of the ONNX model at ``path``, on the CPU.

    :param num_threads: intra-op threads of the session (one by default, like
        :func:`~pyro_sbp.export.measure_latency`; 0 is ONNX Runtime's own default, one per
        core); operators run one at a time.
    :raises ImportError: if ``onnxruntime`` is not installed (``pip install 'pyro-sbp[onnx]'``).
    :raises FileNotFoundError: if there is no such file.
    :raises ValueError: if the file is not an ONNX model (the message names it).
    """
    ort = _require("onnxruntime")
    path = Path(path)
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 0:
        raise ValueError(f"num_threads must be an integer >= 0, got {num_threads!r}")
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: they come back as exceptions anyway
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from it
        text = str(e).strip()
        reason = text.splitlines()[0] if text else type(e).__name__
        raise ValueError(f"{path} is not an ONNX file, or is corrupt ({reason})") from None


def _session(path_or_session, num_threads: int):
    if isinstance(path_or_session, str | Path):
        return load_onnx(path_or_session, num_threads), str(path_or_session)
    session = path_or_session
    threads = session.get_session_options().intra_op_num_threads
    if threads != num_threads:
        raise ValueError(
            f"the session runs {threads} intra-op threads (its SessionOptions), not "
            f"num_threads={num_threads}: pass num_threads={threads}, or a path"
        )
    return session, "the ONNX model"


def measure_latency_onnx(
    path_or_session,
    input_shape: tuple[int, ...],
    batch_size: int,
    min_run_time: float = 1.0,
    num_threads: int = 1,
) -> dict:
    """Latency of one forward pass under ONNX Runtime (CPU), timed like
    :func:`~pyro_sbp.export.measure_latency`: a ``torch.utils.benchmark`` ``blocked_autorange``
    of ``session.run`` on inputs in [0, 1].

    :param path_or_session: an ONNX file (loaded with :func:`load_onnx` on ``num_threads``
        threads) or an ``onnxruntime.InferenceSession``, whose intra-op thread count must then
        be ``num_threads``.
    :return: ``{"median_s", "iqr_s", "runs"}`` for the given batch size.
    :raises ValueError: if the model does not take inputs of ``input_shape``.
    """
    import numpy as np
    from torch.utils import benchmark

    session, name = _session(path_or_session, num_threads)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"{name} takes {len(inputs)} inputs, expected one")
    spec = inputs[0]
    wanted = list(spec.shape[1:])
    if len(wanted) != len(input_shape) or any(
        isinstance(w, int) and w != s for w, s in zip(wanted, input_shape, strict=False)
    ):
        raise ValueError(f"{name} takes inputs of shape {spec.shape}, not {tuple(input_shape)}")
    if spec.type not in _NUMPY_TYPES:
        raise ValueError(f"{name} takes inputs of type {spec.type}, not a float tensor")
    x = torch.rand((batch_size, *input_shape)).numpy().astype(np.dtype(_NUMPY_TYPES[spec.type]))
    feeds = {spec.name: x}
    timer = benchmark.Timer(
        stmt="session.run(None, feeds)",
        globals={"session": session, "feeds": feeds},
        num_threads=num_threads,
    )
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times)}


def compare_onnx(
    full,
    pruned,
    input_shape: tuple[int, ...],
    batch_sizes=(1, 64, 256),
    min_run_time: float = 1.0,
    num_threads: int = 1,
) -> list[dict]:
    """Latencies of the full and the pruned network's ONNX models under ONNX Runtime (CPU),
    measured alternately per batch size, as :func:`~pyro_sbp.export.compare` does.

    :param full: an ONNX file or an ``onnxruntime.InferenceSession`` (on ``num_threads``
        intra-op threads), as for :func:`measure_latency_onnx`; so is ``pruned``.

    :return: one row per batch size, with the keys of ``compare``'s ``"latency"`` rows
        (``device`` is ``"cpu"``).
    """
    sessions = _session(full, num_threads)[0], _session(pruned, num_threads)[0]
    rows = []
    for bs in batch_sizes:
        f = measure_latency_onnx(sessions[0], input_shape, bs, min_run_time, num_threads)
        p = measure_latency_onnx(sessions[1], input_shape, bs, min_run_time, num_threads)
        rows.append(
            {
                "device": "cpu",
                "batch_size": bs,
                "full_median_s": f["median_s"],
                "full_iqr_s": f["iqr_s"],
                "pruned_median_s": p["median_s"],
                "pruned_iqr_s": p["iqr_s"],
                "speedup": f["median_s"] / p["median_s"],
            }
        )
    return rows


__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "compare_onnx",
    "load_onnx",
    "measure_latency_onnx",
    "save_onnx",
]
