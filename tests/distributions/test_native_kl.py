"""The native KL and moment kernels (:mod:`pyro_sbp._native`: ``tn_kl_uniform``,
``tln_moments``) against the PyTorch path: the same KL to the (log-)uniform and the same
derivatives, the same truncated log-normal mean and variance, on every branch (straddle, tail on
either side of the mirror, nearly flat), in both dtypes and every layout of the parameters.

Tolerances. Both paths evaluate the same formulas in the same dtype; they differ where a library
function rounds differently (glibc's log, exp, expm1 and erf against PyTorch's vectorised ones,
an ulp at times), and the formulas amplify that where they subtract nearly equal terms: the KL
``log(width) - H`` (a KL far below those terms is known to an absolute eps times them), and in the
tail the Mills-ratio gap by its direct formula, which loses ``alpha^2`` (below
``_standard._series_threshold``: 1e3 in float64, 30 in float32). With ``cond = 1 + alpha^2``
there (the largest over the normal and its tilts), else 1:

* float64: ``|native - torch| <= 64 eps cond (|torch| + T)``, ``T`` the magnitude of the
  cancelled terms (``1 + |log width|`` for the KL; ``1 + 1 / width`` for the gradients, whose
  terms ``phi(alpha) / Z`` grow so on a narrow interval; 0 for the mean and variance): 1.4e-14
  relative where nothing cancels.
* float32: within 2e-5 relative (plus the same bound) of float64 on the same float32 inputs,
  where the PyTorch path is within 1e-5, and within ``4 eps (|alpha| + |beta|) / width`` relative
  more on a narrow tail interval (its float32 bounds are rounded by ``eps |alpha|`` each, that
  much of their difference, on which the tail formulas' ``E_alpha - E_beta`` depends: which way
  each path's rounding falls there is luck); everywhere, the native path is as accurate as
  the PyTorch path where that keeps three digits: its error against float64 at most twice the
  PyTorch path's, plus 16 eps cond (|ref| + T). Where the PyTorch path keeps fewer (narrow
  intervals far out in a tail: its truncated log-normal variance on [e^-0.7, e^-0.6] is up to
  1.4e-2 off in float32, the native one 3e-4), only the finiteness is compared.

Gradients are compared as ``scale * d/dparam``, which is of order one (the KL is a function of
the standardised bounds).
"""

import itertools
import math

import pytest
import torch
from torch.distributions import kl_divergence

from pyro_sbp.distributions import (
    TruncatedLogNormal,
    TruncatedLogUniform,
    TruncatedNormal,
    _kl_grad,
)
from tests.conftest import set_gate_path

# loc far below, at, just inside, inside and far above the bounds; scales from tiny (far tails
# of the standardised bounds) to so wide that the density is nearly flat (the quadrature form).
LOCS = [-3000.0, -300.0, -45.0, -21.0, -20.2, -20.0, -19.9, -10.5, -10.0, -1e-3, 0.0, 0.3, 3.0]
LOCS += [9.0, 60.0]
SCALES = [1e-6, 1e-4, 0.02, 0.5, 3.0, 40.0, 400.0, 1e3]
# Log bounds: SBP's [-20, 0], [log 2^-29, 0], and a narrow interval (flat at moderate scales).
BOUNDS = [(-20.0, 0.0), (-29 * math.log(2.0), 0.0), (-0.7, -0.6)]


def _grid(dtype):
    pairs = list(itertools.product(LOCS, SCALES))
    loc = torch.tensor([p[0] for p in pairs], dtype=dtype)
    scale = torch.tensor([p[1] for p in pairs], dtype=dtype)
    return loc, scale


def _bounds(bounds, dtype):
    # The positive bounds of theta, rounded once in the dtype; their logs as the distributions
    # compute them.
    lo, hi = (torch.tensor(b, dtype=torch.float64).exp().to(dtype) for b in bounds)
    return lo, hi


def _kl(monkeypatch, path, loc, scale, low, high, dtype=None):
    """KL(TLN || TLU) and ``scale *`` its gradients by ``path``, in ``dtype``."""
    set_gate_path(monkeypatch, path)
    dtype = dtype or loc.dtype
    m = loc.to(dtype).requires_grad_()
    s = scale.to(dtype).requires_grad_()
    lo, hi = low.to(dtype), high.to(dtype)
    kl = kl_divergence(TruncatedLogNormal(m, s, lo, hi), TruncatedLogUniform(lo, hi))
    w = torch.linspace(0.5, 1.5, kl.numel(), dtype=dtype).view(kl.shape)
    finite = torch.isfinite(kl)
    gm, gs = torch.autograd.grad((torch.where(finite, kl, 0.0) * w).sum(), (m, s))
    return kl.detach(), gm * s.detach() / w, gs * s.detach() / w


def _moments(monkeypatch, path, loc, scale, low, high, dtype=None):
    set_gate_path(monkeypatch, path)
    dtype = dtype or loc.dtype
    with torch.no_grad():
        d = TruncatedLogNormal(loc.to(dtype), scale.to(dtype), low.to(dtype), high.to(dtype))
        return d.mean, d.variance


def _tilted(loc, scale, bounds, shifts):
    """The standardised bounds ``(alpha, beta)`` of the normal tilted by each of ``shifts`` (in
    units of the scale), in float64, and the width."""
    lo, hi = (b.double() for b in bounds)
    m, s = loc.double(), scale.double()
    return [((lo - m) / s - t * s, (hi - m) / s - t * s) for t in shifts], (hi - lo) / s


def _cond(loc, scale, bounds, shifts):
    """``1 + alpha^2`` where the canonical interval (of the normal tilted by each of ``shifts``,
    in units of the scale) is a tail below the series threshold, else 1 (module docstring)."""
    threshold = 1e3 if loc.dtype == torch.float64 else 30.0
    cond = torch.ones_like(loc, dtype=torch.float64)
    for a, b in _tilted(loc, scale, bounds, shifts)[0]:
        al = torch.where(a + b < 0, -b, a).clamp(0.0, threshold)
        cond = torch.maximum(cond, 1.0 + al * al)
    return cond


def _narrow(loc, scale, bounds, shifts):
    """``(|alpha| + |beta|) / width`` where the interval (of the normal tilted by each of
    ``shifts``) lies in a tail, else 0: the float32 bounds are each rounded by ``eps |alpha|``,
    so that the difference ``E_alpha - E_beta`` of the tail formulas is known to ``eps`` times
    this, relative, whatever the formulas (module docstring)."""
    tilted, width = _tilted(loc, scale, bounds, shifts)
    out = torch.zeros_like(loc, dtype=torch.float64)
    for a, b in tilted:
        out = torch.maximum(out, torch.where(a * b > 0, (a.abs() + b.abs()) / width, 0.0))
    return out


def _terms(name, loc, scale, bounds):
    # Magnitude of the terms each quantity is the difference of (module docstring).
    if name == "kl":
        return 1.0 + ((bounds[1] - bounds[0]).double() / scale.double()).log().abs()
    if name.startswith("scale"):
        # A = phi(alpha) / Z and B grow as 1 / width on a narrow interval.
        return 1.0 + scale.double() / (bounds[1] - bounds[0]).double()
    return 0.0


def _assert_close(got, want, atol, name, where=None):
    """``|got - want| <= atol`` elementwise (on ``where``), the same infinities."""
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), name
    assert torch.equal(got == math.inf, want == math.inf), name
    fin = torch.isfinite(want) if where is None else torch.isfinite(want) & where
    err = (got.double() - want.double()).abs()
    bad = fin & ~(err <= atol)
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} elements differ, e.g. got {got[bad][:3].tolist()}, "
        f"want {want[bad][:3].tolist()}, at {bad.nonzero()[:3].squeeze(-1).tolist()}"
    )


NAMES_KL = ("kl", "scale * d/dloc", "scale * d/dscale")
NAMES_MOMENTS = ("mean", "variance")
# The tilts each statistic takes: the KL none, the mean e^x, the variance e^x and e^2x.
SHIFTS = {"mean": [0.0, 1.0], "variance": [0.0, 1.0, 2.0]}


def _both(monkeypatch, dtype, bounds):
    loc, scale = _grid(dtype)
    low, high = _bounds(bounds, dtype)
    log_bounds = (low.log(), high.log())
    out = {}
    for path in ("native", "torch"):
        out[path] = _kl(monkeypatch, path, loc, scale, low, high) + _moments(
            monkeypatch, path, loc, scale, low, high
        )
    return loc, scale, log_bounds, out, (low, high)


@pytest.mark.parametrize("bounds", BOUNDS, ids=["-20..0", "2^-29..1", "narrow"])
def test_float64_equals_the_pytorch_path(monkeypatch, bounds):
    loc, scale, log_bounds, out, _ = _both(monkeypatch, torch.float64, bounds)
    eps = torch.finfo(torch.float64).eps
    for k, name in enumerate(NAMES_KL + NAMES_MOMENTS):
        got, want = out["native"][k], out["torch"][k]
        cond = _cond(loc, scale, log_bounds, SHIFTS.get(name, [0.0]))
        terms = _terms(name, loc, scale, log_bounds)
        _assert_close(got, want, 64 * eps * cond * (want.abs() + terms), name)


@pytest.mark.parametrize("bounds", BOUNDS, ids=["-20..0", "2^-29..1", "narrow"])
def test_float32_is_as_accurate_as_the_pytorch_path(monkeypatch, bounds):
    loc, scale, log_bounds, out, (low, high) = _both(monkeypatch, torch.float32, bounds)
    ref = _kl(monkeypatch, "torch", loc, scale, low, high, torch.float64) + _moments(
        monkeypatch, "torch", loc, scale, low, high, torch.float64
    )
    eps = torch.finfo(torch.float32).eps
    for k, name in enumerate(NAMES_KL + NAMES_MOMENTS):
        got, want, r = out["native"][k], out["torch"][k], ref[k]
        assert torch.isfinite(got).sum() == torch.isfinite(r).sum(), name
        cond = _cond(loc, scale, log_bounds, SHIFTS.get(name, [0.0]))
        terms = _terms(name, loc, scale, log_bounds)
        err_torch = (want.double() - r).abs()
        # Where the PyTorch path is accurate to 1e-5, the native one is to 2e-5 (against float64:
        # two paths each within 1e-5 of it may differ by more than 1e-5 from each other), up to
        # the rounding of the bounds of a narrow tail interval.
        accurate = err_torch <= 1e-5 * r.abs() + 16 * eps * cond * terms
        narrow = 4 * eps * _narrow(loc, scale, log_bounds, SHIFTS.get(name, [0.0])) * r.abs()
        atol = 2e-5 * r.abs() + 64 * eps * cond * terms + narrow
        _assert_close(got.double(), r, atol, name, where=accurate)
        # Where it keeps three digits, the native error is at most about the PyTorch path's.
        kept = err_torch <= 1e-3 * r.abs() + 16 * eps * cond * terms
        err = (got.double() - r).abs()
        floor = 16 * eps * cond * (r.abs() + terms)
        _assert_close(err, torch.zeros_like(err), 2.0 * err_torch + floor, name, where=kept)


def test_not_nested_is_inf_without_gradient(monkeypatch):
    set_gate_path(monkeypatch, "native")
    loc = torch.tensor([-5.0, -5.0, -5.0], requires_grad=True)
    scale = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    # The posterior's interval sticks out of the prior's below, above, and fits.
    p = TruncatedNormal(loc, scale, torch.tensor([-21.0, -10.0, -10.0]), torch.tensor(-1.0))
    q = torch.distributions.Uniform(torch.tensor(-20.0), torch.tensor([0.0, -2.0, 0.0]))
    kl = kl_divergence(p, q)
    assert kl[:2].tolist() == [math.inf, math.inf] and math.isfinite(kl[2].item())
    gm, gs = torch.autograd.grad(
        kl[2] + torch.where(torch.isfinite(kl), kl, 0.0).sum(), (loc, scale)
    )
    assert gm[:2].tolist() == [0.0, 0.0] and gs[:2].tolist() == [0.0, 0.0]
    assert gm[2] != 0.0 and gs[2] != 0.0


@pytest.mark.parametrize(
    ("loc_shape", "scale_shape", "bound_shape", "batch"),
    [
        ((7,), (7,), (), (7,)),  # scalar bounds
        ((3, 7), (3, 7), (), (3, 7)),  # a (B, U) distribution
        ((7,), (7,), (), (16, 7)),  # the expand of a plate
        ((3, 1), (1, 7), (7,), (2, 3, 7)),  # parameters broadcast, then expanded
        ((), (), (), ()),  # one unit
    ],
)
def test_shapes_and_broadcasting(monkeypatch, loc_shape, scale_shape, bound_shape, batch):
    g = torch.Generator().manual_seed(5)
    dtype = torch.float64
    loc0 = -25.0 + 30.0 * torch.rand(loc_shape, generator=g, dtype=dtype)
    scale0 = torch.exp(-4.0 + 5.0 * torch.rand(scale_shape, generator=g, dtype=dtype))
    low = torch.full(bound_shape, math.exp(-20.0), dtype=dtype)
    high = torch.full(bound_shape, 1.0, dtype=dtype)
    out = {}
    for path in ("native", "torch"):
        set_gate_path(monkeypatch, path)
        loc, scale = loc0.clone().requires_grad_(), scale0.clone().requires_grad_()
        p = TruncatedLogNormal(loc, scale, low, high).expand(batch)
        q = TruncatedLogUniform(low, high).expand(batch)
        kl = kl_divergence(p, q)
        w = torch.linspace(0.5, 1.5, kl.numel(), dtype=dtype).view(kl.shape)
        grads = torch.autograd.grad((kl * w).sum(), (loc, scale))
        with torch.no_grad():  # the moments' kernel runs without gradients
            out[path] = (kl.detach(), *grads, p.mean, p.variance)
    names = ("kl", "dloc", "dscale", "mean", "var")
    for a, b, name in zip(out["native"], out["torch"], names, strict=True):
        assert a.shape == b.shape, (name, a.shape, b.shape)
        # float64 rounding of the tail's normalisers (scalar against vectorised library
        # functions) reaches 2e-12 relative in the gradient of a unit 12 scales into the tail.
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14, msg=name)
    assert out["native"][0].shape == batch
    assert out["native"][1].shape == loc_shape and out["native"][2].shape == scale_shape


def test_one_operator_call_per_quantity(monkeypatch):
    set_gate_path(monkeypatch, "native")
    loc = torch.linspace(-25.0, 2.0, 7, requires_grad=True)
    scale = torch.full((7,), 0.5, requires_grad=True)
    low, high = torch.tensor(math.exp(-20.0)), torch.tensor(1.0)
    p = TruncatedLogNormal(loc, scale, low, high).expand((16, 7))
    q = TruncatedLogUniform(low, high).expand((16, 7))
    with torch.profiler.profile() as prof:
        kl = kl_divergence(p, q)
        kl.sum().backward()
        with torch.no_grad():
            stats = (p.mean, p.variance, p.mean)
    names = [e.name for e in prof.events()]
    assert names.count("pyro_sbp::tn_kl_uniform") == 1
    assert names.count("pyro_sbp::tln_moments") == 1
    assert loc.grad.shape == (7,) and torch.isfinite(loc.grad).all()
    assert all(t.shape == (16, 7) for t in stats)


def test_the_pytorch_path_when_a_gradient_is_asked_of_the_moments_or_the_bounds(monkeypatch):
    set_gate_path(monkeypatch, "native")
    loc = torch.tensor([-3.0, 1.0], dtype=torch.float64, requires_grad=True)
    low = torch.tensor(math.exp(-20.0), dtype=torch.float64, requires_grad=True)
    p = TruncatedLogNormal(loc, torch.tensor(0.5, dtype=torch.float64), low, 1.0)
    gm = torch.autograd.grad(p.mean.sum() + p.variance.sum(), loc)[0]
    assert torch.isfinite(gm).all() and (gm != 0).all()
    high = torch.tensor(1.0, dtype=torch.float64)
    assert not _kl_grad.native_applies(loc, loc, low, high, low, high)
    kl = kl_divergence(p, TruncatedLogUniform(low.detach(), high))
    assert torch.autograd.grad(kl.sum(), low)[0].abs().sum() > 0
