"""The group horseshoe's half-Cauchy factors and the KLs of Bayesian Compression."""

import math

import pyro.distributions as dist
import pytest
import torch
from scipy import integrate, stats
from torch.distributions import kl_divergence
from torch.distributions.kl import _dispatch_kl

from pyro_sbp.distributions import Jeffreys, SparseVDNormal, half_cauchy_factors
from pyro_sbp.distributions.horseshoe import _kl_lognormal_gamma, _kl_lognormal_inversegamma
from pyro_sbp.distributions.sparse_vd import EXACT_KL_CONSTANT, sparse_vd_neg_kl

SHAPES = [(), (4,), (2, 3)]


@pytest.mark.parametrize("tau", [0.3, 2.0])
def test_half_cauchy_factors_give_a_half_cauchy(tau):
    a, b = half_cauchy_factors(torch.tensor(tau, dtype=torch.float64))
    x = (a.sample((20000,)) * b.sample((20000,))).sqrt()
    result = stats.kstest(x.numpy(), stats.halfcauchy(scale=tau).cdf)
    assert result.pvalue > 1e-3


def test_half_cauchy_factors_reject_a_bad_scale():
    with pytest.raises(ValueError, match="positive"):
        half_cauchy_factors(-1.0)


def _params(shape, gen):
    m = torch.randn(shape, generator=gen, dtype=torch.float64)
    s = 0.2 + torch.rand(shape, generator=gen, dtype=torch.float64)
    return m, s


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", ["gamma", "inverse_gamma"])
def test_lognormal_kls_against_monte_carlo(shape, family):
    gen = torch.Generator().manual_seed(1)
    m, s = _params(shape, gen)
    k = 0.3 + torch.rand(shape, generator=gen, dtype=torch.float64)
    r = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
    q = dist.LogNormal(m, s)
    p = dist.Gamma(k, r) if family == "gamma" else dist.InverseGamma(k, r)
    kl = kl_divergence(q, p)
    assert kl.shape == torch.Size(shape)
    x = q.sample((200000,))
    terms = q.log_prob(x) - p.log_prob(x)
    mc, se = terms.mean(0), terms.std(0) / math.sqrt(x.shape[0])
    assert ((kl - mc).abs() <= 5 * se + 1e-9).all()


@pytest.mark.parametrize("family", ["gamma", "inverse_gamma"])
def test_lognormal_kls_against_quadrature(family):
    m, s, k, r = -0.7, 0.8, 0.5, 1.7
    q = stats.lognorm(s=s, scale=math.exp(m))
    p = stats.gamma(k, scale=1 / r) if family == "gamma" else stats.invgamma(k, scale=r)

    def integrand(u):  # in log space, x = e^u
        x = math.exp(u)
        return stats.norm.pdf(u, m, s) * (q.logpdf(x) - p.logpdf(x))

    exact, _ = integrate.quad(integrand, m - 12 * s, m + 12 * s, epsabs=1e-12, limit=200)
    t = torch.tensor
    qd = dist.LogNormal(t(m, dtype=torch.float64), t(s, dtype=torch.float64))
    if family == "gamma":
        pd = dist.Gamma(t(k, dtype=torch.float64), t(r, dtype=torch.float64))
    else:
        pd = dist.InverseGamma(t(k, dtype=torch.float64), t(r, dtype=torch.float64))
    assert float(kl_divergence(qd, pd)) == pytest.approx(exact, abs=1e-9)


def test_the_registered_kls_are_dispatched():
    assert _dispatch_kl(dist.LogNormal, dist.Gamma) is _kl_lognormal_gamma
    assert _dispatch_kl(dist.LogNormal, dist.InverseGamma) is _kl_lognormal_inversegamma
    assert _dispatch_kl(SparseVDNormal, Jeffreys) is not NotImplemented


def test_expand_keeps_the_classes():
    # A plate expands the sites: without its own expand a distribution becomes an
    # ExpandedDistribution, with no registered KL (a silent Monte Carlo fallback).
    a, b = half_cauchy_factors(torch.ones(3))
    for d in (a, b, Jeffreys(torch.zeros(3)), dist.LogNormal(torch.zeros(3), torch.ones(3))):
        e = d.expand([5, 3])
        assert type(e) is type(d) and e.batch_shape == (5, 3)


def test_jeffreys_is_improper():
    j = Jeffreys(torch.zeros(2))
    assert torch.allclose(j.log_prob(torch.tensor([2.0, -0.5])), -torch.tensor([2.0, 0.5]).log())
    with pytest.raises(NotImplementedError, match="improper"):
        j.sample()


def _exact_kl(log_alpha: float) -> float:
    # KL(N(mu, alpha mu^2) || p ~ 1/|w|) up to the constant that makes it vanish as alpha -> inf
    # (the Sparse VD helper's form): E log|1 + sqrt(alpha) eps| - log(alpha)/2 + C.
    # log|1 + r e| = log r + log|e - e0|, e0 = -1/r: the log singularity is quad's weight.
    r = math.exp(0.5 * log_alpha)
    e0 = -1 / r
    pdf = stats.norm.pdf
    above = integrate.quad(pdf, e0, e0 + 40, weight="alg-loga", wvar=(0, 0))[0]
    below = integrate.quad(pdf, e0 - 40, e0, weight="alg-logb", wvar=(0, 0))[0]
    val = math.log(r) + above + below
    return val - 0.5 * log_alpha + EXACT_KL_CONSTANT


@pytest.mark.parametrize("log_alpha", [-6.0, -3.0, 0.0, 4.0])
def test_group_scale_kl_is_the_sparse_vd_approximation(log_alpha):
    mu = torch.tensor([0.7, -1.3], dtype=torch.float64)
    log_sigma2 = log_alpha + mu.square().log()
    q = SparseVDNormal(mu, log_sigma2)
    kl = kl_divergence(q, Jeffreys(torch.zeros(2, dtype=torch.float64)))
    la = torch.full((2,), log_alpha, dtype=torch.float64)
    assert torch.allclose(kl, -sparse_vd_neg_kl(la), atol=1e-6)
    # The fitted approximation is within 0.01 nats of the exact KL (the Sparse VD paper's fit).
    assert abs(float(kl[0]) - _exact_kl(log_alpha)) < 0.01
