"""Sparse VD's prior and posterior: the fitted KL against the numerically integrated exact KL,
and its registration for Pyro's ELBO."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from scipy import integrate
from scipy.special import expit
from torch.distributions import kl_divergence

from pyro_sbp.distributions import ImproperLogUniform, SparseVDNormal
from pyro_sbp.distributions.sparse_vd import (
    EXACT_KL_CONSTANT,
    K1,
    K2,
    K3,
    sparse_vd_neg_kl,
)


def exact_kl(log_alpha: float) -> float:
    """KL(N(theta, alpha theta^2) || p(w) ~ 1/|w|) up to the constant that makes it vanish as
    alpha -> inf: E log|1 + sqrt(alpha) eps| - log(alpha) / 2 + (gamma + log 2) / 2, the
    expectation by quadrature split at the singularity eps = -1/sqrt(alpha)."""
    s = math.exp(0.5 * log_alpha)

    def f(e):
        return math.exp(-0.5 * e * e) / math.sqrt(2 * math.pi) * math.log(abs(1 + s * e))

    e_log = sum(
        integrate.quad(f, lo, hi, limit=400, epsabs=1e-12, epsrel=1e-12)[0]
        for lo, hi in ((-np.inf, -1 / s), (-1 / s, np.inf))
    )
    return e_log - 0.5 * log_alpha + EXACT_KL_CONSTANT


GRID = np.linspace(-10.0, 10.0, 201)


@pytest.fixture(scope="module")
def exact_on_grid():
    return np.array([exact_kl(x) for x in GRID])


def test_the_constant_is_half_euler_gamma_plus_log_2():
    # -E log|eps| for a standard normal eps, by quadrature.
    value = (
        -2
        * integrate.quad(
            lambda e: math.exp(-0.5 * e * e) / math.sqrt(2 * math.pi) * math.log(e), 0, np.inf
        )[0]
    )
    assert value == pytest.approx(EXACT_KL_CONSTANT, abs=1e-10)
    assert exact_kl(12.0) == pytest.approx(0.0, abs=1e-5)


def test_approximation_against_the_exact_kl(exact_on_grid):
    approx = -sparse_vd_neg_kl(torch.tensor(GRID, dtype=torch.float64)).numpy()
    err = np.abs(approx - exact_on_grid)
    # The docstring's figure (0.0094 nats per weight, at log alpha ~ -3.5, on 2001 points).
    assert err.max() < 0.0095
    assert abs(GRID[err.argmax()] + 3.5) < 0.2
    assert err[0] < 6e-4 and err[-1] < 1e-6
    # The paper's formula, written out.
    a = np.exp(GRID)
    paper = -(K1 * expit(K2 + K3 * GRID) - 0.5 * np.log1p(1 / a) - K1)
    np.testing.assert_allclose(approx, paper, rtol=1e-12, atol=1e-12)


def test_exact_kl_depends_on_alpha_only():
    # Monte Carlo of E_q[log q(w) + log|w|] (the KL up to the prior's constant) at two thetas
    # with the same alpha: the same value, that of exact_kl minus its constant.
    torch.manual_seed(0)
    log_alpha = 0.5
    values = []
    for theta in (0.01, 3.0):
        q = SparseVDNormal(
            torch.tensor(theta, dtype=torch.float64),
            torch.tensor(log_alpha + math.log(theta**2 + 1e-8), dtype=torch.float64),
        )
        w = q.sample((400_000,))
        values.append(float((q.log_prob(w) + w.abs().log()).mean()))
    expected = exact_kl(log_alpha) - EXACT_KL_CONSTANT - 0.5 * math.log(2 * math.pi * math.e)
    assert values[0] == pytest.approx(values[1], abs=0.01)
    assert values[0] == pytest.approx(expected, abs=0.01)


def test_kl_is_registered_with_the_batch_shape():
    loc = torch.randn(3, 4)
    q = SparseVDNormal(loc, torch.randn(3, 4) - 5)
    p = ImproperLogUniform(loc.shape)
    kl = kl_divergence(q, p)
    assert kl.shape == (3, 4)
    torch.testing.assert_close(kl, -sparse_vd_neg_kl(q.log_alpha))
    # Expanded (as a plate does), still the registered KL, not a Monte Carlo fallback.
    qe, pe = q.expand((2, 3, 4)), p.expand((2, 3, 4))
    assert type(qe) is SparseVDNormal and type(pe) is ImproperLogUniform
    torch.testing.assert_close(kl_divergence(qe, pe), kl.expand(2, 3, 4))


def test_trace_mean_field_elbo_uses_the_registered_kl():
    loc = torch.randn(5, 3)
    log_sigma2 = torch.randn(5, 3) - 4

    def model():
        pyro.sample("w", ImproperLogUniform((5, 3)).to_event(2))

    def guide():
        pyro.sample("w", SparseVDNormal(loc, log_sigma2).to_event(2))

    expected = -sparse_vd_neg_kl(SparseVDNormal(loc, log_sigma2).log_alpha).sum()
    elbo = TraceMeanField_ELBO()
    # The analytic KL: the same value on every call (a Monte Carlo estimate would vary).
    losses = [elbo.loss(model, guide) for _ in range(3)]
    assert losses == pytest.approx([float(expected)] * 3, rel=1e-6)


def test_posterior_parameters_and_clipping():
    loc = torch.tensor([0.5, 0.5, 1e-6, 2.0])
    log_sigma2 = torch.tensor([-3.0, 40.0, -3.0, math.log(4.0)])
    q = SparseVDNormal(loc, log_sigma2)
    la = torch.log(loc**2 + 1e-8)
    torch.testing.assert_close(q.log_alpha, (log_sigma2 - la).clamp(-10, 10))
    # Inside the clipping range the variance is sigma^2 exactly (additive reparameterisation).
    torch.testing.assert_close(q.variance[[0, 3]], log_sigma2[[0, 3]].exp())
    assert float(q.log_alpha[1]) == 10.0 and float(q.log_alpha[2]) == 10.0
    assert q.has_rsample


def test_improper_prior():
    p = ImproperLogUniform((2,))
    torch.testing.assert_close(
        p.log_prob(torch.tensor([-2.0, 0.5])), -torch.tensor([2.0, 0.5]).log()
    )
    with pytest.raises(NotImplementedError, match="improper"):
        p.sample()
