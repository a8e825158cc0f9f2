r"""Native CPU kernels of the gate distributions: a C++ extension, built on first use.

The truncated normal's accurate formulas take a different branch per unit (straddling its
interval, in a tail of it, nearly flat over it). Written with PyTorch's element-wise operators,
every branch is an operator call over the whole tensor, so an SVI step of a gated network makes
thousands of calls, each cheap, that dominate its cost. The kernels here do the same arithmetic
(:mod:`pyro_sbp.distributions._standard`'s formulas, branch points and clamps, in the tensors' own
dtype) in one operator call for a sampler's forward pass, its derivatives included, one for its
backward pass, one for the KL and its derivatives, one for the moments.

In float64 (and on CPUs without AVX2 and FMA) they go element by element, with an ``if`` per
unit (``common.h``). In float32 on x86-64 CPUs with AVX2 and FMA they go eight lanes at a time
(``simd.h``, ``simd_common.h``): each block of 256 elements is sorted into lists of the elements
that take each formula, and each list runs its formula on whole vectors, so that no lane computes
a branch it does not take. Their special functions are PyTorch's SLEEF (exp, log, expm1) and this
library's erf, erfc, erfcx and ndtri (accuracy in ``simd.h``); erfcx, and the Mills-ratio gaps of
the tail formulas, which lose ``alpha^2`` to cancellation, are formed in double, so that the
float32 kernels are at least as accurate as the PyTorch path (``tests/distributions``).
``torch.ops.pyro_sbp.float_lanes()`` says which build runs (8 or 1); ``PYRO_SBP_SIMD=0`` builds
the scalar one.

They are compiled with :func:`torch.utils.cpp_extension.load` the first time they are needed
(about a minute; the library is cached in ``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``, and ``make`` builds it at install time). Without a C++ compiler,
with ``PYRO_SBP_NATIVE=0`` in the environment, or on another device than the CPU, the
distributions use the PyTorch path, which gives the same values to rounding; :func:`enabled`
says whether the kernels run. ``python -m pyro_sbp._native`` builds the library and reports.
"""

import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["enabled", "load", "usable"]

_DIR = Path(__file__).parent
_SOURCES = sorted(_DIR.glob("*.cpp"))
_HEADERS = sorted(_DIR.glob("*.h"))
_FLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]


def _simd_flags() -> list[str]:
    # The float32 kernels' eight-lane versions (simd.h) where the CPU runs AVX2 and FMA, as
    # PyTorch's own vectorised kernels do; no fused multiply-adds in the scalar code, so that it
    # rounds as the PyTorch path does. PYRO_SBP_SIMD=0 builds (and caches, under another name)
    # the scalar kernels only, as a CPU without AVX2 runs them.
    import platform

    if os.environ.get("PYRO_SBP_SIMD", "1") == "0":
        return []
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return []
    return ["-mavx2", "-mfma", "-ffp-contract=off"]


_FLAGS += _simd_flags()

_logger = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None}

#: Whether the kernels may be used at all (``PYRO_SBP_NATIVE=0`` turns them off; tests set it to
#: compare the two paths).
ENABLED = os.environ.get("PYRO_SBP_NATIVE", "1") != "0"


def _name() -> str:
    # The checkout's path too: torch's cache rebuilds a library whose sources moved, so two
    # checkouts sharing one name would rebuild it in turn.
    digest = hashlib.sha256(str(_DIR.resolve()).encode())
    for path in (*_SOURCES, *_HEADERS):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(" ".join(_FLAGS).encode())
    return f"pyro_sbp_native_{digest.hexdigest()[:12]}"


def load() -> bool:
    """Build (once) and load the kernels; ``True`` when they are loaded. A failed build is
    reported once (a warning naming the error) and not tried again in this process."""
    if _state["loaded"] or _state["error"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return _state["loaded"]
        try:
            from torch.utils import cpp_extension

            _logger.info("pyro-sbp: building the native gate kernels (once)")
            cpp_extension.load(
                name=_name(),
                sources=[str(p) for p in _SOURCES],
                extra_cflags=_FLAGS,
                extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(_DIR)],
                is_python_module=False,
                verbose=False,
            )
            _state["loaded"] = hasattr(torch.ops.pyro_sbp, "tn_rsample")
            if not _state["loaded"]:
                raise RuntimeError("the library loaded without its operators")
        except Exception as e:  # no compiler, no ninja, a failed build: the PyTorch path
            _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1:]}"
            warnings.warn(
                "pyro-sbp: the native gate kernels could not be built, using the slower PyTorch "
                f"path ({_state['error']}); set PYRO_SBP_NATIVE=0 to skip the attempt",
                RuntimeWarning,
                stacklevel=3,
            )
    return _state["loaded"]


def enabled() -> bool:
    """Whether the kernels are switched on (:data:`ENABLED`) and loaded (building them if
    needed)."""
    return ENABLED and load()


def usable(*tensors: Tensor) -> bool:
    """Whether the native kernels apply to ``tensors``: every one on the CPU, in float32 or
    float64, of one dtype, and the kernels switched on and loaded."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.float64):
        return False
    if any(t.device.type != "cpu" or t.dtype != first.dtype for t in tensors[1:]):
        return False
    return enabled()


def ops():
    """``torch.ops.pyro_sbp`` (the kernels must be loaded: :func:`usable`)."""
    return torch.ops.pyro_sbp
