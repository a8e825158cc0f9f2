"""The implicit reparameterisation gradient of rsample (``_implicit``) against autograd through
the exact quantile (float64) over the whole parameter range, and float32 against float64."""

import itertools
import math

import pytest
import torch

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedNormal, _implicit

# loc far below, inside and far above [-29 log 2, 0] (never exactly on a bound, where the
# reference's clamp splits its gradient); scales from tiny to nearly flat.
LOCS = [-300.0, -45.0, -21.0, -10.0, -1e-3, 0.3, 3.0, 60.0]
SCALES = [1e-4, 0.02, 0.5, 3.0, 40.0, 400.0]
LOW, HIGH = -29 * math.log(2.0), 0.0


def _grid(dtype):
    pairs = list(itertools.product(LOCS, SCALES))
    loc = torch.tensor([p[0] for p in pairs], dtype=dtype, requires_grad=True)
    scale = torch.tensor([p[1] for p in pairs], dtype=dtype, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    u = torch.rand((9, len(pairs)), generator=g, dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
    return pairs, loc, scale, u


def _per_sample_grads(x, loc, scale):
    grads = [torch.autograd.grad(row.sum(), (loc, scale), retain_graph=True) for row in x]
    return torch.stack([g[0] for g in grads]), torch.stack([g[1] for g in grads])


def _reference(loc, scale, u):
    """Samples and their per-element gradients by autograd through the exact icdf (float64)."""
    loc = loc.detach().double().requires_grad_()
    scale = scale.detach().double().requires_grad_()
    low, high = torch.tensor(LOW, dtype=torch.float64), torch.tensor(HIGH, dtype=torch.float64)
    # The sampler works in the canonical frame: a mirrored interval's sample is at 1 - u.
    flip = ((low - loc) + (high - loc)) < 0
    x = TruncatedNormal(loc, scale, low, high).icdf(torch.where(flip, 1.0 - u, u))
    return x.detach(), *_per_sample_grads(x, loc, scale)


def _implicit_grads(loc, scale, u):
    low, high = torch.tensor(LOW, dtype=loc.dtype), torch.tensor(HIGH, dtype=loc.dtype)
    x = _implicit.rsample(loc, scale, low, high, u.to(loc.dtype))
    return x.detach(), *_per_sample_grads(x, loc, scale)


def test_float64_gradients_equal_autograd_through_the_exact_quantile(gate_path):
    # Every way of computing them: the native kernel and both ways of taking the PyTorch
    # path's branches (_standard.DENSE_BRANCHES), the backward's too.
    _, loc, scale, u = _grid(torch.float64)
    x, gl, gs = _implicit_grads(loc, scale, u)
    xr, glr, gsr = _reference(loc, scale, u)
    torch.testing.assert_close(x, xr, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(gl, glr, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(gs, gsr, rtol=1e-7, atol=1e-12)


def test_float32_gradients_agree_with_float64(gate_path):
    _, loc, scale, u = _grid(torch.float32)
    _, gl, gs = _implicit_grads(loc, scale, u)
    _, glr, gsr = _reference(loc, scale, u)
    assert torch.isfinite(gl).all() and torch.isfinite(gs).all()
    # Relative to the size of the terms that cancel in a nearly flat interval (order one).
    torch.testing.assert_close(gl.double(), glr, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(gs.double(), gsr, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(("loc", "scale"), [(-20.5, 0.3), (3.0, 0.5), (-10.0, 40.0), (-1e-3, 2.0)])
def test_gradients_match_finite_differences(gate_path, loc, scale):
    u = torch.tensor([0.02, 0.5, 0.97], dtype=torch.float64)
    low, high = torch.tensor(LOW, dtype=torch.float64), torch.tensor(HIGH, dtype=torch.float64)

    def f(m, s):
        return _implicit.rsample(m, s, low, high, u)

    m = torch.tensor(loc, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (m, s), eps=1e-6, atol=1e-7, rtol=1e-4)


def test_a_straddling_batch_skips_the_tail_form_and_keeps_its_gradient():
    # Every unit straddles (SBP's initial posteriors): the CPU path skips the tail form.
    loc = torch.zeros(5, dtype=torch.float64).requires_grad_()
    scale = torch.full((5,), 0.01, dtype=torch.float64).requires_grad_()
    u = torch.rand(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _, gl, gs = _implicit_grads(loc - 0.1, scale, u)
    _, glr, gsr = _reference(loc - 0.1, scale, u)
    torch.testing.assert_close(gl, glr, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(gs, gsr, rtol=1e-9, atol=1e-14)


def test_rsample_of_a_plate_sums_the_gradient_to_the_units(gate_path):
    # A (batch, units) sample of (units,) parameters: the gradient of the compact parameters.
    loc = torch.tensor([-3.0, 0.5, -30.0], requires_grad=True)
    scale = torch.tensor([0.5, 0.01, 2.0], requires_grad=True)
    q = TruncatedLogNormal(loc, scale, math.exp(-20.0), 1.0).expand((64, 3))
    torch.manual_seed(0)
    theta = q.rsample()
    assert theta.shape == (64, 3)
    assert ((theta >= math.exp(-20.0)) & (theta <= 1.0)).all()
    theta.sum().backward()
    assert loc.grad.shape == (3,) and torch.isfinite(loc.grad).all()
    assert torch.isfinite(scale.grad).all()
