"""CompactMeanField_ELBO: the loss and gradients of TraceMeanField_ELBO, the KL once per unit."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch import nn
from torch.distributions import kl_divergence

from pyro_sbp.guides import SBPGuide
from pyro_sbp.infer import CompactMeanField_ELBO
from pyro_sbp.infer.compact_elbo import _compact
from pyro_sbp.models import SBPModel, make_prunable, named_gates

N, D = 40, 5


def _setup(noise="example", kl_weight=1.0):
    net = make_prunable(
        nn.Sequential(nn.Linear(D, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    )
    model = SBPModel(net, N, (D,), kl_weight=kl_weight, noise=noise)
    guide = SBPGuide(net, N)
    g = torch.Generator().manual_seed(3)
    for site, gate in named_gates(net):
        pyro.param(f"{site}.loc", -6.0 + 6.0 * torch.rand(gate.num_units, generator=g))
        pyro.param(f"{site}.log_scale", -3.0 + 4.0 * torch.rand(gate.num_units, generator=g))
    x = torch.rand(N, D, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    return net, model, guide, x, y


def _loss_and_grads(elbo, model, guide, *args):
    pyro.set_rng_seed(11)  # the same noise for both ELBOs
    with poutine.trace(param_only=True) as capture:
        loss = elbo.loss_and_grads(model, guide, *args)
    params = {n: site["value"].unconstrained() for n, site in capture.trace.nodes.items()}
    grads = {n: p.grad.clone() for n, p in params.items()}
    for p in params.values():
        p.grad = None
    return loss, grads


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize(
    ("noise", "kl_weight"), [("example", 1.0), ("example", {"2.gate": 30.0}), ("batch", 5.0)]
)
def test_the_same_loss_and_gradients_as_trace_mean_field(noise, kl_weight, validation):
    pyro.enable_validation(validation)
    _, model, guide, x, y = _setup(noise, kl_weight)
    idx = torch.arange(8, 24)
    args = (x[idx], y[idx], idx, 0.7)
    expected, expected_grads = _loss_and_grads(TraceMeanField_ELBO(), model, guide, *args)
    got, got_grads = _loss_and_grads(CompactMeanField_ELBO(), model, guide, *args)
    assert got == pytest.approx(expected, rel=1e-6)
    assert set(got_grads) == set(expected_grads)
    assert {n for n in got_grads if ".gate." in n} >= {"0.gate.loc", "2.gate.log_scale"}
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    # loss() agrees with loss_and_grads(), and with TraceMeanField_ELBO's loss().
    pyro.set_rng_seed(11)
    assert CompactMeanField_ELBO().loss(model, guide, *args) == pytest.approx(expected, rel=1e-6)


def test_differentiable_loss_is_trace_mean_fields_without_reading_it_back():
    _, model, guide, x, y = _setup("example", 3.0)
    idx = torch.arange(8, 24)
    args = (x[idx], y[idx], idx)
    out = {}
    for elbo in (TraceMeanField_ELBO(), CompactMeanField_ELBO()):
        pyro.set_rng_seed(5)
        with poutine.trace(param_only=True) as capture:
            loss = elbo.differentiable_loss(model, guide, *args)
        params = {n: site["value"].unconstrained() for n, site in capture.trace.nodes.items()}
        grads = torch.autograd.grad(loss, list(params.values()))
        out[type(elbo).__name__] = (loss.detach(), dict(zip(params, grads, strict=True)))
    (expected, expected_grads), (got, got_grads) = out.values()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_the_kl_is_computed_once_per_unit():
    net, model, guide, x, y = _setup()
    idx = torch.arange(0, 32)
    guide_trace = poutine.trace(guide).get_trace(x[idx], y[idx], idx)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        x[idx], y[idx], idx
    )
    for site, gate in named_gates(net):
        q1, p1, copies = _compact(guide_trace.nodes[site]["fn"], model_trace.nodes[site]["fn"])
        assert copies == 32
        assert q1.batch_shape == () and q1.event_shape == (gate.num_units,)
        assert p1.event_shape == (gate.num_units,)


def test_the_gate_sites_share_one_kl_call(monkeypatch):
    from pyro_sbp.infer import compact_elbo

    calls = []

    def counting(q, p):
        calls.append(q.batch_shape)
        return kl_divergence(q, p)

    monkeypatch.setattr(compact_elbo, "kl_divergence", counting)
    _, model, guide, x, y = _setup()
    idx = torch.arange(0, 16)
    CompactMeanField_ELBO().differentiable_loss(model, guide, x[idx], y[idx], idx)
    # The two gate sites (6 + 4 units) in one call over their concatenated units.
    assert calls == [torch.Size([10])]


def test_sites_that_cannot_be_compacted_fall_back():
    # A site whose parameters differ per example, a masked site, and a site with no analytic KL.
    def model(x):
        with pyro.plate("data", 4):
            pyro.sample("a", dist.Normal(0.0, 1.0))
            with poutine.mask(mask=torch.tensor([True, False, True, True])):
                pyro.sample("b", dist.Normal(0.0, 2.0))
            pyro.sample("c", dist.Gamma(2.0, 1.0))
            pyro.sample("obs", dist.Normal(0.0, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.linspace(-1, 1, 4))
        with pyro.plate("data", 4):
            pyro.sample("a", dist.Normal(loc, 0.5))
            with poutine.mask(mask=torch.tensor([True, False, True, True])):
                pyro.sample("b", dist.Normal(0.3, 1.0))
            pyro.sample("c", dist.LogNormal(0.2, 0.4))

    x = torch.randn(4)
    expected, expected_grads = _loss_and_grads(TraceMeanField_ELBO(), model, guide, x)
    got, got_grads = _loss_and_grads(CompactMeanField_ELBO(), model, guide, x)
    assert got == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(got_grads["loc"], expected_grads["loc"])


def test_a_guide_messenger_takes_pyros_path():
    from pyro.infer.autoguide import AutoNormalMessenger

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    x = torch.randn(6)
    guide = AutoNormalMessenger(model)
    expected, expected_grads = _loss_and_grads(TraceMeanField_ELBO(), model, guide, x)
    got, got_grads = _loss_and_grads(CompactMeanField_ELBO(), model, guide, x)
    assert got == pytest.approx(expected, rel=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad)
