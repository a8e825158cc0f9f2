"""SBPGate: per-example noise in the model, E[theta] in evaluation, the mask, enabled=False."""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from pyro_sbp.distributions import TruncatedLogNormal
from pyro_sbp.guides import SBPGuide
from pyro_sbp.models import SBPGate, SBPModel, make_prunable, named_gates, set_gates_enabled

N = 12
D = 6


def _net() -> nn.Module:
    net = nn.Sequential(nn.Linear(D, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.bias.uniform_(0.5, 1.0)  # nonzero biases: a removed unit must drop its bias too
    return make_prunable(net)


def _set_posteriors(net: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for site, gate in named_gates(net):
        n = gate.num_units
        pyro.param(f"{site}.loc", -3.0 * torch.rand(n, generator=g) + 0.5)
        pyro.param(f"{site}.log_scale", 2.0 * torch.rand(n, generator=g) - 1.5)


def test_two_examples_in_a_batch_get_different_theta():
    net = _net()
    model = SBPModel(net, N, (D,))
    x = torch.rand(1, D).expand(2, D)  # the same input twice
    idx = torch.tensor([3, 7])
    trace = poutine.trace(model).get_trace(x, None, idx)
    for site, gate in named_gates(net):
        theta = trace.nodes[site]["value"]
        assert theta.shape == (2, gate.num_units)
        assert not torch.equal(theta[0], theta[1]), site
    logits = trace.nodes["_RETURN"]["value"]
    assert not torch.allclose(logits[0], logits[1])
    # With the guide: the posterior draws are per example too.
    guide = SBPGuide(net, N)
    _set_posteriors(net)
    guide_trace = poutine.trace(guide).get_trace(x, None, idx)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, None, idx)
    for site, _ in named_gates(net):
        theta = guide_trace.nodes[site]["value"]
        assert not torch.equal(theta[0], theta[1]), site
        assert model_trace.nodes[site]["value"] is theta
    logits = model_trace.nodes["_RETURN"]["value"]
    assert not torch.allclose(logits[0], logits[1])
    # In evaluation the gates are deterministic: the same input gives the same output.
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert torch.equal(out[0], out[1])


def test_eval_uses_the_posterior_mean():
    net = _net()
    guide = SBPGuide(net, N)
    _set_posteriors(net)
    guide.update_gates()
    means = {}
    for site, gate in named_gates(net):
        loc, log_scale = pyro.param(f"{site}.loc"), pyro.param(f"{site}.log_scale")
        with torch.no_grad():  # as update_gates reads it (the native kernel, on the CPU)
            q = TruncatedLogNormal(loc, log_scale.exp(), gate.low, gate.high)
            means[site] = q.mean
        assert torch.equal(gate.theta_mean, means[site])
        assert (means[site] < 0.99).any()  # not the identity
    net.eval()
    x = torch.rand(7, D)
    with torch.no_grad():
        out = net(x)
        h = F.relu(F.linear(x, net[0].weight) * means["0.gate"] + net[0].bias)
        h = F.relu(F.linear(h, net[2].weight) * means["2.gate"] + net[2].bias)
        expected = F.linear(h, net[4].weight, net[4].bias)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_mask_makes_removed_units_exactly_zero(mode):
    net = _net()
    model = SBPModel(net, N, (D,))
    guide = SBPGuide(net, N)
    _set_posteriors(net)
    guide.update_gates()
    removed = [1, 3]
    net[0].gate.mask[removed] = 0.0
    net[2].gate.mask[0] = 0.0
    out = {}
    net[0].register_forward_hook(lambda m, i, o: out.__setitem__("0", o))
    net[2].register_forward_hook(lambda m, i, o: out.__setitem__("2", o))
    x = torch.rand(N, D)
    if mode == "train":
        guide_trace = poutine.trace(guide).get_trace(x)
        poutine.replay(model, trace=guide_trace)(x)
    else:
        net.eval()
        with torch.no_grad():
            net(x)
    assert (out["0"][:, removed] == 0).all()
    assert (out["2"][:, 0] == 0).all()
    kept = [0, 2, 4]
    assert (out["0"][:, kept] != 0).any(dim=0).all()
    assert (out["2"][:, 1:] != 0).any(dim=0).all()


def test_disabled_gate_is_the_identity_up_to_the_mask():
    gate = make_prunable(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))[0].gate
    gate.enabled = False
    gate.mask[2] = 0.0
    x = torch.randn(5, 4)
    for training in (True, False):
        gate.train(training)
        trace = poutine.trace(gate).get_trace(x)
        assert torch.equal(trace.nodes["_RETURN"]["value"], x * gate.mask)
        assert not [n for n, s in trace.nodes.items() if s["type"] == "sample"]


def test_disabled_gates_in_a_network():
    net = _net()
    plain = {}
    for name in ("0", "2"):
        net.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: plain.__setitem__(name, (i[0], o))
        )
    set_gates_enabled(net, False)
    assert not any(g.enabled for _, g in named_gates(net))
    net[2].gate.mask[1] = 0.0
    model = SBPModel(net, N, (D,))
    x = torch.rand(N, D)
    for training in (True, False):
        net.train(training)
        trace = poutine.trace(model).get_trace(x)
        sites = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
        assert sites == ["data", "obs"]  # no gate is sampled
        for name in ("0", "2"):
            layer = net.get_submodule(name)
            inp, out = plain[name]
            expected = F.linear(inp, layer.weight, layer.bias) * layer.gate.mask
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    set_gates_enabled(net, True)
    assert all(g.enabled for _, g in named_gates(net))


def test_gate_shape_errors_and_bounds():
    with pytest.raises(ValueError, match="at least one unit"):
        SBPGate(0)
    with pytest.raises(ValueError, match="0 < low < high"):
        SBPGate(3, low=1.0, high=0.5)
    gate = make_prunable(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))[0].gate
    with pytest.raises(ValueError, match=r"expects 4 units on dim 1, got input of shape \(5, 3\)"):
        gate(torch.randn(5, 3))
    assert gate.low == pytest.approx(math.exp(-20.0)) and gate.high == 1.0
