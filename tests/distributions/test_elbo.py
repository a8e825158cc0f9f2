"""TraceMeanField_ELBO uses the closed-form KL, never a Monte Carlo estimate of it."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from torch.distributions import kl_divergence

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform

N = 7
LOW, HIGH = math.exp(-20.0), 1.0


def model():
    prior = TruncatedLogUniform(torch.tensor(LOW), torch.tensor(HIGH)).expand([N]).to_event(1)
    pyro.sample("theta", prior)


def guide():
    loc = pyro.param("loc", torch.linspace(-25.0, 3.0, N))
    scale = pyro.param("scale", torch.full((N,), 0.3), constraint=dist.constraints.positive)
    pyro.sample("theta", TruncatedLogNormal(loc, scale, LOW, HIGH).to_event(1))


def _analytic_kl():
    loc, scale = pyro.param("loc"), pyro.param("scale")
    p = TruncatedLogNormal(loc, scale, LOW, HIGH)
    q = TruncatedLogUniform(torch.tensor(LOW), torch.tensor(HIGH)).expand([N])
    return kl_divergence(p, q).sum()


def test_loss_is_the_exact_kl_and_deterministic():
    elbo = TraceMeanField_ELBO(num_particles=1)
    losses = [elbo.loss(model, guide) for _ in range(5)]
    assert all(loss == losses[0] for loss in losses), losses
    assert losses[0] == pytest.approx(_analytic_kl().item(), rel=1e-6)
    # A Monte Carlo ELBO would differ from draw to draw: the test above can fail.
    mc = {Trace_ELBO().loss(model, guide) for _ in range(5)}
    assert len(mc) > 1


def test_plate_expanded_prior_keeps_the_analytic_kl():
    def plate_model():
        with pyro.plate("units", N):
            pyro.sample("theta", TruncatedLogUniform(torch.tensor(LOW), torch.tensor(HIGH)))

    def plate_guide():
        loc = pyro.param("loc", torch.linspace(-25.0, 3.0, N))
        scale = pyro.param("scale", torch.full((N,), 0.3), constraint=dist.constraints.positive)
        with pyro.plate("units", N):
            pyro.sample("theta", TruncatedLogNormal(loc, scale, LOW, HIGH))

    elbo = TraceMeanField_ELBO()
    losses = {elbo.loss(plate_model, plate_guide) for _ in range(3)}
    assert len(losses) == 1
    assert losses.pop() == pytest.approx(_analytic_kl().item(), rel=1e-6)


def test_svi_moves_the_posterior_to_the_prior():
    # With no likelihood the KL alone is minimised: every loc is driven inside the bounds and
    # the loss goes down.
    svi = SVI(model, guide, Adam({"lr": 0.05}), TraceMeanField_ELBO())
    first = svi.step()
    for _ in range(300):
        last = svi.step()
    assert last < first
    assert torch.isfinite(pyro.param("loc")).all()
