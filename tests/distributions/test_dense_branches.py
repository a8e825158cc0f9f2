"""The two ways of taking the branches (dense: every branch on every element, picked by
``torch.where``, no host synchronisation; sparse: the rare branches on their own elements) give
the same values and gradients over the whole parameter range."""

import itertools

import pytest
import torch
from torch.distributions import kl_divergence

from pyro_sbp import _native
from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform, _standard

# loc far below, inside, far above [log 2^-29, 0]; scales from tiny to nearly flat.
LOCS = [-300.0, -45.0, -21.0, -10.0, -1e-3, 0.0, 0.3, 3.0, 60.0]
SCALES = [1e-4, 0.02, 0.5, 3.0, 40.0, 400.0]


def _quantities(dtype):
    pairs = list(itertools.product(LOCS, SCALES))
    loc = torch.tensor([p[0] for p in pairs], dtype=dtype, requires_grad=True)
    scale = torch.tensor([p[1] for p in pairs], dtype=dtype, requires_grad=True)
    low = torch.tensor(2.0**-29, dtype=dtype)
    high = torch.tensor(1.0, dtype=dtype)
    q = TruncatedLogNormal(loc, scale, low, high, validate_args=False)
    p = TruncatedLogUniform(low, high, validate_args=False).expand(q.batch_shape)
    u = torch.rand((7, len(pairs)), generator=torch.Generator().manual_seed(0), dtype=dtype)
    out = {
        "sample": q.icdf(u),
        "kl": kl_divergence(q, p),
        "mean": q.mean,
        "variance": q.variance,
        "entropy": q.entropy(),
    }
    grads = {}
    for name, value in out.items():
        g = torch.autograd.grad(value.log().nan_to_num().sum(), (loc, scale), retain_graph=True)
        grads[name] = g
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_and_sparse_branches_agree(monkeypatch, dtype):
    # The PyTorch path's two ways of taking its branches (the native kernels take neither).
    monkeypatch.setattr(_native, "ENABLED", False)
    monkeypatch.setattr(_standard, "DENSE_BRANCHES", False)
    sparse, sparse_grads = _quantities(dtype)
    monkeypatch.setattr(_standard, "DENSE_BRANCHES", True)
    dense, dense_grads = _quantities(dtype)
    tol = dict(rtol=1e-5, atol=1e-30) if dtype == torch.float32 else dict(rtol=1e-12, atol=0.0)
    for name in sparse:
        torch.testing.assert_close(dense[name], sparse[name], equal_nan=True, **tol, msg=name)
        for d, s in zip(dense_grads[name], sparse_grads[name], strict=True):
            torch.testing.assert_close(d, s, equal_nan=True, **tol, msg=f"grad of {name}")
        assert torch.isfinite(dense[name]).all(), name
