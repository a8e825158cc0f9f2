import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_validate():
    """Every test starts from the same RNG state, an empty param store and validation on."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()


#: The ways the gate distributions can compute on the CPU: the native kernels
#: (:mod:`pyro_sbp._native`, the default), the PyTorch operators taking the rare branches on
#: their own elements, and the PyTorch operators taking every branch densely (what CUDA runs).
GATE_PATHS = ("native", "torch", "torch-dense")


def set_gate_path(monkeypatch, path: str) -> None:
    from pyro_sbp import _native
    from pyro_sbp.distributions import _standard

    assert path in GATE_PATHS, path
    if path == "native":
        assert _native.load(), f"the native kernels did not build: {_native._state['error']}"
    monkeypatch.setattr(_native, "ENABLED", path == "native")
    monkeypatch.setattr(_standard, "DENSE_BRANCHES", True if path == "torch-dense" else None)


@pytest.fixture(params=GATE_PATHS)
def gate_path(request, monkeypatch):
    """Runs a test once per way of computing the gate distributions (:data:`GATE_PATHS`)."""
    set_gate_path(monkeypatch, request.param)
    return request.param
