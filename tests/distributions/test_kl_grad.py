"""The analytic backward of KL(TN || U) (``_kl_grad``) against autograd through the value's own
formulas (float64) over the whole parameter range, both ways of taking the branches, and float32
against float64."""

import itertools
import math

import pytest
import torch
from torch.distributions import kl_divergence

from pyro_sbp import _native
from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform, _kl_grad, _standard

# loc far below, just below, inside and far above [-29 log 2, 0]; scales from tiny to so wide
# that the density is nearly flat (the quadrature form).
LOCS = [-300.0, -45.0, -21.0, -20.2, -10.5, -10.0, -1e-3, 0.3, 3.0, 60.0]
SCALES = [1e-4, 0.02, 0.5, 3.0, 40.0, 400.0, 4000.0]
LOW, HIGH = -29 * math.log(2.0), 0.0


def _grid(dtype):
    pairs = list(itertools.product(LOCS, SCALES))
    loc = torch.tensor([p[0] for p in pairs], dtype=dtype, requires_grad=True)
    scale = torch.tensor([p[1] for p in pairs], dtype=dtype, requires_grad=True)
    return loc, scale


def _autograd_reference(loc, scale):
    loc = loc.detach().double().requires_grad_()
    scale = scale.detach().double().requires_grad_()
    low, high = torch.tensor(LOW, dtype=torch.float64), torch.tensor(HIGH, dtype=torch.float64)
    alpha, beta, width = (low - loc) / scale, (high - loc) / scale, (high - low) / scale
    entropy = _standard.moments(alpha, beta, width, need_var=False).entropy
    kl = _standard.kl_to_uniform(alpha, beta, entropy, width)
    return kl.detach(), torch.autograd.grad(kl.sum(), (loc, scale))


def _analytic(loc, scale):
    low, high = torch.tensor(LOW, dtype=loc.dtype), torch.tensor(HIGH, dtype=loc.dtype)
    kl = _kl_grad.kl_to_uniform(loc, scale, low, high)
    return kl.detach(), torch.autograd.grad(kl.sum(), (loc, scale))


@pytest.mark.parametrize("dense", [None, True], ids=["cpu-default", "dense"])
def test_float64_gradients_equal_autograd(monkeypatch, dense):
    # The PyTorch path (the native kernel's KL is held to it in test_native_kl).
    monkeypatch.setattr(_native, "ENABLED", False)
    monkeypatch.setattr(_standard, "DENSE_BRANCHES", dense)
    loc, scale = _grid(torch.float64)
    kl, (gl, gs) = _analytic(loc, scale)
    ref, (glr, gsr) = _autograd_reference(loc, scale)
    torch.testing.assert_close(kl, ref, rtol=0.0, atol=0.0)
    torch.testing.assert_close(gl, glr, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(gs, gsr, rtol=1e-9, atol=1e-14)


def test_float32_gradients_agree_with_float64():
    loc, scale = _grid(torch.float32)
    _, (gl, gs) = _analytic(loc, scale)
    _, (glr, gsr) = _autograd_reference(loc, scale)
    assert torch.isfinite(gl).all() and torch.isfinite(gs).all()
    torch.testing.assert_close(gl.double(), glr, rtol=2e-3, atol=1e-7)
    torch.testing.assert_close(gs.double(), gsr, rtol=2e-3, atol=1e-7)


@pytest.mark.parametrize(("loc", "log_scale"), [(-25.0, -1.0), (-3.0, 0.5), (2.0, -2.0)])
def test_kl_divergence_of_the_gate_distributions_matches_finite_differences(loc, log_scale):
    # What an SVI step differentiates: the registered KL of TruncatedLogNormal to the prior.
    p = TruncatedLogUniform(torch.tensor(math.exp(-20.0), dtype=torch.float64), 1.0)

    def kl(m, s):
        return kl_divergence(TruncatedLogNormal(m, s.exp(), p.low, p.high), p)

    m = torch.tensor(loc, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kl, (m, s), eps=1e-6, atol=1e-8, rtol=1e-5)
