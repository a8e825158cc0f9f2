"""Generic checks, driven by the fixture registry in ``fixtures.py``."""

import math

import numpy as np
import pytest
import scipy.integrate
import torch
from pyro.distributions.testing.gof import auto_goodness_of_fit
from torch.distributions import kl_divergence

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform, TruncatedNormal
from tests.distributions.fixtures import E20, case_id, fixture_cases

CASES = fixture_cases()
TEST_FAILURE_RATE = 1e-3


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_log_prob_and_cdf_match_scipy(case):
    fixture, i = case
    d = fixture.make(i)
    ref = fixture.reference(i)
    x = d.sample((200,))
    np.testing.assert_allclose(d.log_prob(x).numpy(), ref.logpdf(x.numpy()), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(d.cdf(x).numpy(), ref.cdf(x.numpy()), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_samples_inside_support_and_log_prob_finite(case):
    fixture, i = case
    d = fixture.make(i)
    x = d.sample((1000,))
    assert x.shape == (1000, *d.batch_shape)
    assert d.support.check(x).all()
    assert torch.isfinite(d.log_prob(x)).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_goodness_of_fit(case):
    fixture, i = case
    d = fixture.make(i)
    num_samples = 50000
    samples = d.sample((num_samples,))
    probs = d.log_prob(samples).exp()
    probs = probs.reshape(num_samples, -1)
    samples = samples.reshape(probs.shape)
    for b in range(samples.size(1)):
        gof = auto_goodness_of_fit(samples[:, b], probs[:, b])
        assert gof > TEST_FAILURE_RATE, f"batch element {b}: gof {gof}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_mean_and_variance_monte_carlo(case):
    fixture, i = case
    d = fixture.make(i)
    n = 200_000
    x = d.sample((n,))
    mc_mean, mc_var = x.mean(0), x.var(0)
    # Four standard errors of the mean and of the variance (the latter through the 4th moment).
    se_mean = (mc_var / n).sqrt()
    se_var = (((x - mc_mean) ** 4).mean(0) - mc_var**2).clamp(min=0).div(n).sqrt()
    assert ((d.mean - mc_mean).abs() <= 4 * se_mean + 1e-12).all(), (d.mean, mc_mean)
    assert ((d.variance - mc_var).abs() <= 4 * se_var + 1e-12).all(), (d.variance, mc_var)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_mean_and_variance_match_scipy(case):
    fixture, i = case
    d = fixture.make(i)
    ref = fixture.reference(i)
    if fixture.dist is TruncatedLogNormal:
        pytest.skip("scipy has no truncated log-normal moments (checked against mpmath)")
    np.testing.assert_allclose(d.mean.numpy(), np.broadcast_to(ref.mean(), d.batch_shape), 1e-9)
    np.testing.assert_allclose(d.variance.numpy(), np.broadcast_to(ref.var(), d.batch_shape), 1e-8)
    # scipy's truncnorm.entropy is wrong in the far tails (case 2: it gives -3.195 where the
    # entropy is -1.1108, close to the 1 - log 8 of the exponential the tail resembles), so the
    # entropy is checked by quadrature of scipy's (accurate) logpdf instead.
    low = np.broadcast_to(ref.support()[0], d.batch_shape).reshape(-1)
    high = np.broadcast_to(ref.support()[1], d.batch_shape).reshape(-1)
    expected = []
    for j, (lo, hi) in enumerate(zip(low, high, strict=True)):

        def integrand(x, j=j):
            lp = np.broadcast_to(ref.logpdf(np.full(d.batch_shape, x)), d.batch_shape)
            lp = lp.reshape(-1)[j]
            return -np.exp(lp) * lp

        h = scipy.integrate.quad(integrand, lo, hi, epsabs=0, epsrel=1e-12, limit=200)[0]
        expected.append(h)
    np.testing.assert_allclose(d.entropy().numpy().reshape(-1), expected, rtol=1e-8)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cdf_icdf_round_trip(case):
    fixture, i = case
    d = fixture.make(i)
    u = torch.linspace(1e-6, 1 - 1e-6, 101, dtype=torch.float64).reshape(
        (-1,) + (1,) * len(d.batch_shape)
    )
    x = d.icdf(u)
    assert d.support.check(x).all()
    np.testing.assert_allclose(d.cdf(x).numpy(), u.expand_as(x).numpy(), rtol=1e-8, atol=1e-12)
    xs = d.sample((100,))
    np.testing.assert_allclose(d.icdf(d.cdf(xs)).numpy(), xs.numpy(), rtol=1e-8, atol=1e-300)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("batch_shape", [(), (4,), (2, 3)], ids=str)
def test_expand_keeps_the_class(case, batch_shape):
    fixture, i = case
    d = fixture.make(i)
    shape = torch.Size(batch_shape) + d.batch_shape
    e = d.expand(shape)
    assert type(e) is type(d)
    assert e.batch_shape == shape
    assert e.sample().shape == shape
    assert e.log_prob(e.sample()).shape == shape
    assert e.mean.shape == shape and e.variance.shape == shape
    assert torch.equal(e.mean, d.mean.expand(shape))
    # Pyro's plates expand through the same method.
    assert type(e.expand_by([5])) is type(d) or e.expand_by([5]).base_dist.__class__ is type(d)


def _kl_pairs(batch_shape):
    s = torch.Size(batch_shape)

    def r(lo, hi):
        return torch.empty(s, dtype=torch.float64).uniform_(lo, hi)

    lo, hi = math.exp(-20), 1.0
    yield (
        "TLN||TLU",
        TruncatedLogNormal(r(-12, 1), r(0.3, 3), lo, hi),
        TruncatedLogUniform(torch.tensor(lo, dtype=torch.float64), 1.0).expand(s),
    )
    yield (
        "TLN||TLU wider",
        TruncatedLogNormal(r(-3, 0), r(0.3, 2), math.exp(-5), 1.0),
        TruncatedLogUniform(torch.tensor(lo, dtype=torch.float64), 2.0).expand(s),
    )
    yield (
        "TN||U",
        TruncatedNormal(r(-2, 2), r(0.5, 2), -1.0, 1.5),
        torch.distributions.Uniform(
            torch.full(s, -1.0, dtype=torch.float64), torch.full(s, 2.0, dtype=torch.float64)
        ),
    )
    yield (
        "TN||TN",
        TruncatedNormal(r(-2, 2), r(0.5, 2), -1.0, 1.0),
        TruncatedNormal(r(-2, 2), r(0.5, 2), -2.0, 2.0),
    )
    yield (
        "TLN||TLN",
        TruncatedLogNormal(r(-5, 0), r(0.5, 2), math.exp(-8), 1.0),
        TruncatedLogNormal(r(-5, 0), r(0.5, 2), math.exp(-10), 1.0),
    )


@pytest.mark.parametrize("batch_shape", [(), (4,), (2, 3)], ids=str)
def test_kl_against_monte_carlo(batch_shape):
    for name, p, q in _kl_pairs(batch_shape):
        kl = kl_divergence(p, q)
        assert kl.shape == p.batch_shape == torch.Size(batch_shape), name
        n = 200_000
        x = p.sample((n,))
        lr = p.log_prob(x) - q.log_prob(x)
        mc, se = lr.mean(0), lr.std(0) / math.sqrt(n)
        assert ((kl - mc).abs() <= 5 * se + 1e-10).all(), (name, kl, mc, se)
        assert (kl >= 0).all()


def test_kl_is_infinite_where_supports_do_not_nest():
    p = TruncatedLogNormal(torch.tensor([0.0, 0.0]), 1.0, torch.tensor([E20, 1e-3]), 1.0)
    q = TruncatedLogUniform(torch.tensor([1e-4, 1e-4]), 1.0)
    kl = kl_divergence(p, q)
    assert kl[0] == math.inf and math.isfinite(kl[1])
    p = TruncatedNormal(0.0, 1.0, torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 3.0]))
    q = TruncatedNormal(0.0, 1.0, -2.0, 2.0)
    kl = kl_divergence(p, q)
    assert math.isfinite(kl[0]) and kl[1] == math.inf
    u = torch.distributions.Uniform(torch.tensor(-0.5), torch.tensor(2.0))
    assert kl_divergence(TruncatedNormal(0.0, 1.0, -1.0, 1.0), u) == math.inf


def test_kl_of_a_distribution_to_itself_is_zero():
    p = TruncatedNormal(torch.tensor([0.2, -30.0, 40.0]), torch.tensor([1.0, 1e-3, 0.5]), -1.0, 1.0)
    assert torch.allclose(kl_divergence(p, p), torch.zeros(3), atol=1e-6)
    p = TruncatedLogNormal(torch.tensor([0.2, -30.0]), torch.tensor([1.0, 1e-3]), E20, 1.0)
    assert torch.allclose(kl_divergence(p, p), torch.zeros(2), atol=1e-6)


@pytest.mark.parametrize("dist", [TruncatedNormal, TruncatedLogNormal], ids=lambda d: d.__name__)
@pytest.mark.parametrize("loc", [-30.0, -10.0, -0.5, 0.3, 15.0])
@pytest.mark.parametrize("scale", [1e-3, 0.5, 20.0])
def test_gradcheck(dist, loc, scale):
    low, high = (-20.0, 0.0) if dist is TruncatedNormal else (E20, 1.0)

    u = torch.tensor([1e-9, 0.3, 0.9, 1 - 1e-9], dtype=torch.float64)
    # Points for log_prob and cdf, fixed (not moving with the parameters under perturbation).
    x = dist(torch.tensor(loc, dtype=torch.float64), scale, low, high).icdf(u)

    def stats(loc, log_scale):
        d = dist(loc, log_scale.exp(), low, high)
        prior = (
            torch.distributions.Uniform(torch.tensor(-20.0, dtype=torch.float64), 0.0)
            if dist is TruncatedNormal
            else TruncatedLogUniform(torch.tensor(low, dtype=torch.float64), high)
        )
        return (
            d.icdf(u),
            d.log_prob(x),
            d.cdf(x),
            kl_divergence(d, prior).reshape(1),
            d.mean.reshape(1),
            d.variance.reshape(1),
            d.entropy().reshape(1),
        )

    loc_t = torch.tensor(loc, dtype=torch.float64, requires_grad=True)
    ls_t = torch.tensor(math.log(scale), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(stats, (loc_t, ls_t), eps=1e-7, atol=1e-6, rtol=1e-4)


def test_icdf_is_differentiable_like_rsample():
    # Reparameterised samples: d x / d loc = 1 away from the bounds for a wide interval.
    loc = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    d = TruncatedNormal(loc, 1.0, -50.0, 50.0)
    x = d.rsample((10,))
    (g,) = torch.autograd.grad(x.sum(), loc)
    assert torch.allclose(g, torch.tensor(10.0, dtype=torch.float64))
