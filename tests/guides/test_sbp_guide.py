"""SBPGuide: its parameters and posteriors, E[theta] and SNR, and composition with AutoGuideList."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.optim import Adam
from torch import nn

from pyro_sbp.distributions import TruncatedLogNormal
from pyro_sbp.guides import SBPGuide
from pyro_sbp.models import make_prunable, named_gates

N = 40
D = 4


def _net() -> nn.Module:
    return make_prunable(
        nn.Sequential(nn.Linear(D, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    )


def test_parameters_and_posteriors():
    net = _net()
    guide = SBPGuide(net, N, init_loc=-0.5, init_log_scale=-3.0)
    assert guide.site_names == ["0.gate", "2.gate"]
    guide(torch.rand(N, D))
    store = pyro.get_param_store()
    for site, gate in named_gates(net):
        loc, log_scale = store[f"{site}.loc"], store[f"{site}.log_scale"]
        assert torch.equal(loc, torch.full((gate.num_units,), -0.5))
        assert torch.equal(log_scale, torch.full((gate.num_units,), -3.0))
        q = guide.posterior(site)
        assert isinstance(q, TruncatedLogNormal)
        assert q.batch_shape == (gate.num_units,)
        assert float(q.low[0]) == pytest.approx(gate.low) and float(q.high[0]) == gate.high
        torch.testing.assert_close(q.scale, torch.full((gate.num_units,), math.exp(-3.0)))
    # The network's weights are not the guide's.
    assert not [n for n, _ in guide.named_parameters()]


def test_update_gates_and_snr():
    net = _net()
    guide = SBPGuide(net, N)
    pyro.param("0.gate.loc", torch.tensor([0.0, -1.0, -5.0, -10.0, -15.0, 2.0]))
    pyro.param("0.gate.log_scale", torch.tensor([-5.0, -3.0, 0.0, 1.0, 2.0, -1.0]))
    guide.update_gates()
    with torch.no_grad():  # as update_gates and snr read it (the native kernel, on the CPU)
        q = guide.posterior("0.gate")
        assert torch.equal(net[0].gate.theta_mean, q.mean)
        want_snr = q.mean / q.variance.sqrt()
    theta = net[0].gate.theta_mean
    assert theta[0] > 0.99
    # A narrow posterior far from the bounds: E[theta] = exp(loc + scale^2 / 2).
    assert float(theta[1]) == pytest.approx(math.exp(-1.0 + math.exp(-6.0) / 2), rel=1e-5)
    assert (theta[2:5] < 0.1).all()
    snr = guide.snr()
    assert set(snr) == {"0.gate", "2.gate"}
    torch.testing.assert_close(snr["0.gate"], want_snr)
    assert snr["0.gate"][0] > 10 and snr["0.gate"][4] < 1


def test_no_gates_is_refused():
    with pytest.raises(ValueError, match="make_prunable"):
        SBPGuide(nn.Sequential(nn.Linear(2, 2)), N)


def test_composes_with_autoguidelist():
    torch.manual_seed(0)
    net = _net()
    gates = list(named_gates(net))
    gate_sites = [site for site, _ in gates]

    def model(x, y=None, idx=None):
        for _, gate in gates:
            gate.kl_scale = 1.0 / N
        data = pyro.plate("data", N, subsample=idx)
        with data:
            logits = net(x)
        # A global latent site after the gates (the same order as in the guide list).
        temp = pyro.sample("temp", dist.LogNormal(0.0, 1.0))
        with data:
            pyro.sample("obs", dist.Categorical(logits=logits / temp), obs=y)

    guide = AutoGuideList(model)
    guide.append(SBPGuide(net, N))
    guide.append(AutoNormal(poutine.block(model, hide=gate_sites)))

    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, D, generator=g)
    y = (x[:, 0] > 0.5).long() + (x[:, 1] > 0.5).long()
    svi = SVI(model, guide, Adam({"lr": 0.02}), TraceMeanField_ELBO())
    losses = []
    for step in range(30):
        idx = torch.randperm(N, generator=g)[:16]
        losses.append(svi.step(x[idx], y[idx], idx))
        assert math.isfinite(losses[-1]), step

    # Both parts are in the guide's trace, each site exactly once.
    idx = torch.arange(8)
    trace = poutine.trace(guide).get_trace(x[idx], y[idx], idx)
    # (AutoNormal also records the auxiliary "temp_unconstrained" site it samples from.)
    sampled = [
        n
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and n != "data" and not n.endswith("_unconstrained")
    ]
    assert sorted(sampled) == sorted([*gate_sites, "temp"])
    assert trace.nodes["0.gate"]["value"].shape == (8, 6)
    assert trace.nodes["temp"]["value"].shape == ()
    store = pyro.get_param_store()
    for site in gate_sites:
        assert f"{site}.loc" in store and f"{site}.log_scale" in store
        assert not torch.equal(store[f"{site}.loc"], torch.zeros_like(store[f"{site}.loc"]))
    temp_params = [k for k in store.keys() if "temp" in k]
    assert temp_params, list(store.keys())
    assert not any(site in k for k in temp_params for site in gate_sites)


def test_parameters_are_projected_onto_the_verified_box():
    """A gate pinned at a bound drives loc up and log scale down without end; the guide keeps
    them where the distributions' float32 gradients are verified (an SVI run at gate lr 0.5 hit
    loc 26.8, scale 4e-12 and then NaN)."""
    net = _net()
    guide = SBPGuide(net, N)
    site, gate = next(iter(named_gates(net)))
    loc, log_scale = guide.params(site)
    with torch.no_grad():
        loc.copy_(torch.tensor([26.8, -50.0, 3.0, -7.0, 0.0, 21.0]))
        log_scale.copy_(torch.tensor([-26.3, 9.0, -2.0, 0.5, -13.0, 7.0]))
    loc, log_scale = guide.params(site)
    a, b = math.log(gate.low), math.log(gate.high)
    assert torch.equal(loc, torch.tensor([b + 20.0, a - 20.0, 3.0, -7.0, 0.0, b + 20.0]))
    expected = torch.tensor([math.log(1e-6), math.log(1e3), -2.0, 0.5, -13.0, math.log(1e3)])
    assert torch.allclose(log_scale, expected)
    # In place: the parameter store holds the projected values, and they still train.
    assert torch.equal(pyro.param(f"{site}.loc"), loc) and loc.requires_grad
    q = guide.posterior(site)
    theta = q.rsample(torch.Size([1000]))
    torch.autograd.backward(theta.sum())
    assert torch.isfinite(loc.grad).all() and torch.isfinite(log_scale.grad).all()
