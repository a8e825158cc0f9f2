"""The native sampler (:mod:`pyro_sbp._native`) against the PyTorch path: the same samples and
derivatives at the same uniforms, on every branch and every layout of compact parameters."""

import itertools
import math

import pytest
import torch

from pyro_sbp import _native
from pyro_sbp.distributions import TruncatedLogNormal, TruncatedNormal, _implicit
from tests.conftest import set_gate_path

# loc far below, inside and far above the bounds, scales from tiny to nearly flat: every branch
# (straddle, moderate tail, far tail by Newton, on both sides of the mirror).
LOCS = [-3000.0, -300.0, -45.0, -21.0, -20.0, -10.0, -1e-3, 0.0, 0.3, 3.0, 9.0, 60.0]
SCALES = [1e-6, 1e-4, 0.02, 0.5, 3.0, 40.0, 400.0]
LOW, HIGH = -20.0, 0.0


def _grid(dtype, rows=7):
    pairs = list(itertools.product(LOCS, SCALES))
    loc = torch.tensor([p[0] for p in pairs], dtype=dtype)
    scale = torch.tensor([p[1] for p in pairs], dtype=dtype)
    g = torch.Generator().manual_seed(0)
    u = torch.rand((rows, len(pairs)), generator=g, dtype=dtype)
    # The extremes of the uniforms too (clamped into [tiny, 1 - eps/2] by both paths).
    u[0, :] = 0.0
    u[1, :] = 1.0
    return loc, scale, u


def _run(monkeypatch, path, loc, scale, low, high, u, exp_bounds=None):
    set_gate_path(monkeypatch, path)
    m = loc.clone().requires_grad_()
    s = scale.clone().requires_grad_()
    x = _implicit.rsample(m, s, low, high, u, exp_bounds)
    w = torch.linspace(0.5, 1.5, x.numel(), dtype=x.dtype).view(x.shape)
    gm, gs = torch.autograd.grad((x * w).sum(), (m, s))
    return x.detach(), gm, gs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("log_space", [False, True], ids=["normal", "log-normal"])
def test_native_samples_and_gradients_equal_the_pytorch_path(monkeypatch, dtype, log_space):
    loc, scale, u = _grid(dtype)
    low, high = torch.tensor(LOW, dtype=dtype), torch.tensor(HIGH, dtype=dtype)
    exp_bounds = (low.exp(), high.exp()) if log_space else None
    got = _run(monkeypatch, "native", loc, scale, low, high, u, exp_bounds)
    want = _run(monkeypatch, "torch", loc, scale, low, high, u, exp_bounds)
    # The same formulas in the same dtype: they differ by the rounding of the library
    # functions (std::erf against PyTorch's vectorised erf), a few ulps, which the
    # quantile's slope can amplify where the interval is nearly flat.
    # Samples are compared in units of their scale (a sample next to a bound of a wide
    # interval is known to a few ulps of the scale, not of itself).
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-13)
    # A sample is center + scale * offset (center = loc clamped into the bounds): where the two
    # cancel, it is known to a few ulps of center, 4 eps |center| / scale in units of the scale.
    # In log space, log theta is compared; theta is rounded by exp (glibc's against PyTorch's
    # vectorised one, which differ by an ulp), so its log is known to eps, eps / scale in units of
    # the scale.
    eps = torch.finfo(dtype).eps
    x, x_ref = got[0] / scale, want[0] / scale
    rounding = 4 * eps * loc.clamp(LOW, HIGH).abs() / scale
    if log_space:
        x, x_ref = got[0].log() / scale, want[0].log() / scale
        rounding = rounding + 2 * eps / scale
    bad = (x - x_ref).abs() > tol["atol"] + rounding + tol["rtol"] * x_ref.abs()
    assert not bad.any(), f"samples differ at {bad.nonzero().tolist()[:5]}"
    # The gradients sum terms that partly cancel (samples at u = 0 and 1 next to a bound of a
    # wide interval): in float32 each path is off float64 by up to a few 1e-3 relative, in its
    # own direction (the vector kernels form the Mills-ratio gaps in double, the PyTorch path in
    # float), so the float32 native gradients are held to float64 as the PyTorch path is: an
    # error at most twice its own, plus 2e-3 relative.
    if dtype == torch.float32:
        ref = _run(
            monkeypatch,
            "torch",
            loc.double(),
            scale.double(),
            low.double(),
            high.double(),
            u.double(),
            None if exp_bounds is None else tuple(b.double() for b in exp_bounds),
        )
        for g, w, r, name in zip(got[1:], want[1:], ref[1:], ("d/dloc", "d/dscale"), strict=True):
            assert torch.isfinite(g).all(), name
            err, err_torch = (g.double() - r).abs(), (w.double() - r).abs()
            bad = err > 2 * err_torch + 2e-3 * r.abs() + 1e-6
            assert not bad.any(), f"{name} differs from float64 at {bad.nonzero().tolist()[:5]}"
        return
    for g, w, name in zip(got[1:], want[1:], ("d/dloc", "d/dscale"), strict=True):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, w, **tol, msg=name)


@pytest.mark.parametrize(
    ("loc_shape", "scale_shape", "bound_shape", "u_shape"),
    [
        ((5,), (5,), (), (4, 5)),  # a plate's samples of compact (units,) parameters
        ((1, 5), (1, 5), (1, 5), (4, 5)),  # compact views that keep the plate's dim
        ((5,), (), (), (3, 2, 5)),  # a shared scale, two sample dims
        ((3, 5), (3, 1), (), (2, 3, 5)),  # a parameter broadcast inside the unit block
        ((), (), (), (6,)),  # one unit
    ],
)
def test_every_layout_of_compact_parameters(
    monkeypatch, loc_shape, scale_shape, bound_shape, u_shape
):
    g = torch.Generator().manual_seed(3)
    dtype = torch.float64
    loc = -25.0 + 30.0 * torch.rand(loc_shape, generator=g, dtype=dtype)
    scale = torch.exp(-4.0 + 5.0 * torch.rand(scale_shape, generator=g, dtype=dtype))
    low = torch.full(bound_shape, LOW, dtype=dtype)
    high = torch.full(bound_shape, HIGH, dtype=dtype)
    u = torch.rand(u_shape, generator=g, dtype=dtype)
    got = _run(monkeypatch, "native", loc, scale, low, high, u)
    want = _run(monkeypatch, "torch", loc, scale, low, high, u)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_distributions_take_the_native_kernel_on_the_cpu(monkeypatch):
    set_gate_path(monkeypatch, "native")
    loc = torch.zeros(7, requires_grad=True)
    q = TruncatedLogNormal(loc, torch.full((7,), 0.5), math.exp(-20.0), 1.0).expand((16, 7))
    with torch.profiler.profile() as prof:
        theta = q.rsample()
        theta.sum().backward()
    names = [e.name for e in prof.events()]
    assert names.count("pyro_sbp::tn_rsample") == 1
    assert names.count("pyro_sbp::tn_unit_grads") == 1
    assert theta.shape == (16, 7) and loc.grad.shape == (7,)


def test_the_pytorch_path_without_the_kernels(monkeypatch):
    set_gate_path(monkeypatch, "torch")
    assert not _native.usable(torch.zeros(1))
    x = TruncatedNormal(0.0, 1.0, -1.0, 1.0).rsample((5,))
    assert ((x >= -1.0) & (x <= 1.0)).all()


def test_half_precision_and_other_devices_take_the_pytorch_path():
    assert not _native.usable(torch.zeros(1, dtype=torch.float16))
    assert not _native.usable(torch.zeros(1, device="meta"))
    assert not _native.usable(torch.zeros(1), torch.zeros(1, dtype=torch.float64))
