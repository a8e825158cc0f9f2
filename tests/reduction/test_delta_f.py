"""Delta F against an mpmath reference, Monte Carlo, and the decisions it must get right."""

import functools
import itertools
import math

import mpmath as mp
import pytest
import torch

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform
from pyro_sbp.reduction import delta_f, delta_f_monte_carlo, expected_theta, snr

A, B = -20.0, 0.0
F64 = torch.float64


def _z(lo, hi):
    # Phi(hi) - Phi(lo), on the side of the tail that keeps every digit.
    if lo > 0:
        return (mp.erfc(lo / mp.sqrt(2)) - mp.erfc(hi / mp.sqrt(2))) / 2
    if hi < 0:
        return (mp.erfc(-hi / mp.sqrt(2)) - mp.erfc(-lo / mp.sqrt(2))) / 2
    return (mp.erf(hi / mp.sqrt(2)) - mp.erf(lo / mp.sqrt(2))) / 2


def _dps(*standardised):
    big = max(abs(x) for x in standardised)
    return 40 + int(2 * mp.log10(1 + big**2))


@functools.cache
def ref_bmrs_n(mu, sigma, nu, tau, a=A, b=B):
    """log(b - a) + log int_a^b q(x) r(x) dx, by the product of Gaussians, in mpmath."""
    mu, sigma, nu, tau, a, b = map(mp.mpf, (mu, sigma, nu, tau, a, b))
    with mp.workdps(_dps((a - mu) / sigma, (b - mu) / sigma, (b - a) / tau)):
        zq = _z((a - mu) / sigma, (b - mu) / sigma)
        zr = _z((a - nu) / tau, (b - nu) / tau)
        s = sigma**2 + tau**2
        mt = (mu * tau**2 + nu * sigma**2) / s
        sd = mp.sqrt(sigma**2 * tau**2 / s)
        zt = _z((a - mt) / sd, (b - mt) / sd)
        log_gauss = -mp.log(2 * mp.pi * s) / 2 - (mu - nu) ** 2 / (2 * s)
        return mp.log(b - a) - mp.log(zq) - mp.log(zr) + mp.log(zt) + log_gauss, zq


@functools.cache
def ref_bmrs_u(mu, sigma, a2, b2, a=A, b=B):
    mu, sigma, a2, b2, a, b = map(mp.mpf, (mu, sigma, a2, b2, a, b))
    lo, hi = max(a, a2), min(b, b2)
    with mp.workdps(_dps((a - mu) / sigma, (b - mu) / sigma)):
        zq = _z((a - mu) / sigma, (b - mu) / sigma)
        if lo >= hi:
            return -mp.inf, zq
        zm = _z((lo - mu) / sigma, (hi - mu) / sigma)
        return mp.log(zm) - mp.log(zq) - mp.log((b2 - a2) / (b - a)), zq


def _q(mu, sigma):
    return TruncatedLogNormal(
        torch.tensor(mu, dtype=F64), torch.tensor(sigma, dtype=F64), math.exp(A), math.exp(B)
    )


def _prior():
    return TruncatedLogUniform(torch.tensor(math.exp(A), dtype=F64), torch.tensor(1.0, dtype=F64))


def _bmrs_n_reduced():
    return TruncatedLogNormal(torch.tensor(A, dtype=F64), 1e-6, math.exp(A), math.exp(B))


def _bmrs_u_reduced(p, low=2.0**-23):
    return TruncatedLogUniform(torch.tensor(low, dtype=F64), torch.tensor(2.0**-p, dtype=F64))


LOCS = [-40.0, -30.0, -20.5, -20.0, -19.0, -10.0, -5.0, -1.0, 0.0, 0.5, 5.0, 30.0]
SCALES = [1e-6, 1e-4, 1e-3, 0.1, 1.0, 10.0, 1e3]


def _assert_close(got, want, zq):
    want_f = float(want)
    if zq > mp.mpf("1e-300"):
        tol = 1e-6 * max(1.0, abs(want_f))
    else:
        tol = 1e-3 * abs(want_f)
    assert abs(got - want_f) <= tol, (got, want_f)
    # The decision (the sign) is right everywhere.
    assert (got >= 0) == (want >= 0), (got, want_f)


@pytest.mark.parametrize("mu, sigma", list(itertools.product(LOCS, SCALES)))
def test_bmrs_n_against_mpmath(mu, sigma):
    got = delta_f(_q(mu, sigma), _prior(), _bmrs_n_reduced()).item()
    want, zq = ref_bmrs_n(mu, sigma, A, 1e-6)
    _assert_close(got, want, zq)


@pytest.mark.parametrize("mu, sigma", list(itertools.product(LOCS, SCALES)))
@pytest.mark.parametrize("p, low", [(8, 2.0**-23), (4, 2.0**-23), (4, math.exp(A))])
def test_bmrs_u_against_mpmath(mu, sigma, p, low):
    got = delta_f(_q(mu, sigma), _prior(), _bmrs_u_reduced(p, low)).item()
    want, zq = ref_bmrs_u(mu, sigma, math.log(low), math.log(2.0**-p))
    if want == -mp.inf:
        assert got == -math.inf
        return
    _assert_close(got, want, zq)


def test_bmrs_n_reference_against_quadrature():
    # The product-of-Gaussians reference, checked once against direct integration.
    mu, sigma = -19.0, 0.7
    with mp.workdps(40):
        zq = _z((A - mu) / sigma, (B - mu) / sigma)
        zr = _z(0, (B - A) / 1e-3)

        def integrand(x):
            q = mp.npdf(x, mu, sigma) / zq
            r = mp.npdf(x, A, 1e-3) / zr
            return q * r

        direct = mp.log(B - A) + mp.log(mp.quad(integrand, [A, A + 1e-3, A + 1e-2, B]))
    want, _ = ref_bmrs_n(mu, sigma, A, 1e-3)
    assert abs(direct - want) < 1e-12


def test_decisions():
    # A unit whose posterior sits at the lower bound goes; one near theta = 1 with high SNR stays.
    at_floor = _q(-25.0, 0.5)
    near_one = _q(-0.05, 0.02)
    assert snr(near_one) > 10
    for reduced in (_bmrs_n_reduced(), _bmrs_u_reduced(8), _bmrs_u_reduced(4)):
        assert delta_f(at_floor, _prior(), reduced) > 0 or reduced is not _bmrs_n_reduced()
        assert delta_f(near_one, _prior(), reduced) < 0
    assert delta_f(at_floor, _prior(), _bmrs_n_reduced()) > 0
    # A posterior equal to the prior gains nothing from any reduction: Delta F = log 1 = 0.
    flat = _q(-10.0, 1e4)
    assert abs(delta_f(flat, _prior(), _bmrs_u_reduced(4)).item()) < 1e-6


@pytest.mark.parametrize(
    "mu, sigma",
    [(-18.0, 1.0), (-10.0, 5.0), (-8.0, 3.0), (-3.0, 2.0)],
)
def test_monte_carlo_agrees_with_closed_forms(mu, sigma):
    torch.manual_seed(0)
    q = _q(mu, sigma)
    for reduced in (_bmrs_u_reduced(8), _bmrs_u_reduced(4)):
        exact = delta_f(q, _prior(), reduced)
        mc, se = delta_f_monte_carlo(q, _prior(), reduced, num_samples=200_000)
        assert abs(mc - exact) <= 5 * se + 1e-9, (mc, exact, se)
    # BMRS_N's reduced prior is a spike of width 1e-6: use a wider one for a usable MC estimate.
    wide = TruncatedLogNormal(torch.tensor(A + 1.0, dtype=F64), 3.0, math.exp(A), math.exp(B))
    exact = delta_f(q, _prior(), wide)
    mc, se = delta_f_monte_carlo(q, _prior(), wide, num_samples=200_000)
    assert abs(mc - exact) <= 5 * se + 1e-9, (mc, exact, se)


def test_batch_shape_and_unregistered_triples():
    q = TruncatedLogNormal(torch.zeros(5, dtype=F64) - 3, 1.0, math.exp(A), 1.0)
    p = _prior().expand([5])
    assert delta_f(q, p, _bmrs_n_reduced().expand([5])).shape == (5,)
    assert delta_f(q, p, _bmrs_u_reduced(4).expand([5])).shape == (5,)
    with pytest.raises(NotImplementedError, match="delta_f_monte_carlo"):
        delta_f(q, p, torch.distributions.LogNormal(torch.tensor(0.0), 1.0))


def test_expected_theta_and_snr_functions():
    q = _q(-1.0, 0.5)
    assert torch.equal(expected_theta(q), q.mean)
    assert torch.allclose(snr(q), q.mean / q.variance.sqrt())
