"""Bayesian Model Reduction of a group under the group horseshoe, against integration."""

import itertools
import math

import pytest
import torch
from scipy import integrate, stats

from pyro_sbp.models import build_network
from pyro_sbp.models.bayesian_compression import make_bayesian_compression, named_bc_layers
from pyro_sbp.reduction.bayesian_compression import delta_f_horseshoe, delta_f_layer

CASES = [
    # (m_a, s_a, m_b, s_b, p)
    (0.0, 1.0, 0.0, 1.0, 4.0),
    (-9.0, 0.3, -2.0, 0.5, 4.0),
    (1.0, 0.5, -3.0, 1.0, 4.0),
    (-12.0, 0.05, -3.0, 0.01, 8.0),
    (-3.0, 2.0, 1.0, 1.5, 2.0),
]


def _numerical_delta_f(m_a, s_a, m_b, s_b, p):
    """log E_q[p~ / p] with p~ = p 1[ab <= c^2] / P_p(ab <= c^2), both integrated."""
    c2 = 4.0 ** (-p)
    log_c2 = math.log(c2)
    # E_q[1_A]: over log a ~ N(m_a, s_a^2) the probability that log b <= log c^2 - log a.
    q_a = lambda u: stats.norm.pdf(u, m_a, s_a) * stats.norm.cdf(log_c2 - u, m_b, s_b)  # noqa: E731
    q_mass, _ = integrate.quad(
        q_a, m_a - 15 * s_a, m_a + 15 * s_a, epsabs=0, epsrel=1e-12, limit=400
    )
    # P_p(A) with a ~ Gamma(1/2, 1), b ~ InvGamma(1/2, 1), in log space (u = log a).
    p_a = lambda u: (  # noqa: E731
        stats.gamma.pdf(math.exp(u), 0.5) * math.exp(u) * stats.invgamma.cdf(c2 / math.exp(u), 0.5)
    )
    p_mass = sum(
        integrate.quad(p_a, lo, hi, epsabs=0, epsrel=1e-12, limit=400)[0]
        for lo, hi in [(-80, log_c2 - 10), (log_c2 - 10, log_c2 + 10), (log_c2 + 10, 8)]
    )
    return math.log(q_mass) - math.log(p_mass)


@pytest.mark.parametrize("case", CASES)
def test_delta_f_against_numerical_integration(case):
    m_a, s_a, m_b, s_b, p = case
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    got = float(delta_f_horseshoe(t(m_a), t(s_a), t(m_b), t(s_b), p))
    assert got == pytest.approx(_numerical_delta_f(*case), rel=1e-6, abs=1e-7)


def test_delta_f_far_in_the_tail():
    # A local scale far above c: q(A) ~ 1e-760, below float64, but log Phi stays accurate.
    import mpmath

    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    got = float(delta_f_horseshoe(t(1.5), t(0.2), t(0.5), t(0.1), 8.0))
    x = (2 * math.log(2.0**-8) - 2.0) / math.sqrt(0.05)
    exact = float(mpmath.log(mpmath.ncdf(x))) - math.log(2 / math.pi * math.atan(2.0**-8))
    assert got == pytest.approx(exact, rel=1e-9)


def test_prior_mass_is_the_half_cauchy_cdf():
    # p(A) = P(sqrt(ab) <= c) = (2/pi) arctan c: the prior constant of Delta F.
    for p in (1.0, 4.0, 10.0):
        c = 2.0**-p
        assert stats.halfcauchy.cdf(c) == pytest.approx(2 / math.pi * math.atan(c), rel=1e-12)


def test_delta_f_decides_as_expected():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # Collapsed local scale (z~ ~ e^-10): removed, Delta F = -log P_p(A); one well above c: kept.
    d = delta_f_horseshoe(t(-16.0, 2.0), t(0.1, 0.1), t(-4.0, 0.0), t(0.1, 0.1), 4.0)
    assert float(d[0]) == pytest.approx(-math.log(2 / math.pi * math.atan(2**-4)), rel=1e-9)
    assert d[0] > 0 > d[1]
    # Exactly z = 0 (c -> 0) is never preferred by a log-normal posterior: Delta F -> -inf.
    ps = [4.0, 16.0, 64.0, 256.0]
    ds = [float(delta_f_horseshoe(t(-16.0), t(0.1), t(-4.0), t(0.1), p)) for p in ps]
    assert ds[0] > 0 and ds[-1] < -1e4 and all(a > b for a, b in itertools.pairwise(ds))


def test_delta_f_bad_input():
    net = make_bayesian_compression(build_network("digits-mlp"), "gnj")
    layer = next(layer for _, layer in named_bc_layers(net))
    with pytest.raises(ValueError, match="improper"):
        delta_f_layer(layer)
    z = torch.zeros(1)
    for bad in (0.0, -1.0, math.inf, "4"):
        with pytest.raises(ValueError, match="precision"):
            delta_f_horseshoe(z, z + 1, z, z + 1, bad)
