"""pyro_sbp.infer.optim: one torch optimiser over a Pyro model and guide's parameters."""

import pyro
import pytest
import torch
from torch import nn

from pyro_sbp.guides import SBPGuide
from pyro_sbp.infer import CompactMeanField_ELBO
from pyro_sbp.infer.optim import adam, param_groups
from pyro_sbp.models import SBPModel, make_prunable


def _setup():
    torch.manual_seed(0)
    net = make_prunable(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    model, guide = SBPModel(net, 100), SBPGuide(net, 100)
    x, y, idx = torch.randn(20, 6), torch.randint(3, (20,)), torch.arange(20)
    return net, model, guide, (x, y, idx)


def test_param_groups_put_the_gates_at_their_own_rate():
    _, model, guide, batch = _setup()
    CompactMeanField_ELBO().differentiable_loss(model, guide, *batch)
    weights, gates = param_groups(1e-3, 1e-2)
    assert weights["lr"] == 1e-3 and gates["lr"] == 1e-2
    assert sorted(gates["names"]) == ["0.gate.loc", "0.gate.log_scale"]
    assert sorted(weights["names"]) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    store = pyro.get_param_store()
    for group in (weights, gates):
        for name, p in zip(group["names"], group["params"], strict=True):
            assert p is store[name].unconstrained()


def test_an_empty_store_and_bad_rates_are_refused():
    with pytest.raises(ValueError, match="param store is empty"):
        param_groups(1e-3)
    pyro.param("w", torch.zeros(2))
    with pytest.raises(ValueError, match="gate_lr must be a positive number"):
        param_groups(1e-3, -1.0)


def test_adam_steps_equal_pyros_adam_per_parameter():
    # The same update per element as pyro.optim.Adam's optimiser per parameter.
    results = []
    for which in ("torch", "pyro"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        _, model, guide, batch = _setup()
        elbo = CompactMeanField_ELBO()
        elbo.differentiable_loss(model, guide, *batch)  # both draw the same noise from here
        if which == "torch":
            optim = adam(lr=1e-2, gate_lr=5e-2, betas=(0.95, 0.999))
            assert all(g["fused"] for g in optim.param_groups)
            for _ in range(5):
                optim.zero_grad()
                elbo.differentiable_loss(model, guide, *batch).backward()
                optim.step()
        else:

            def rates(name):
                return {"lr": 5e-2 if ".gate." in name else 1e-2, "betas": (0.95, 0.999)}

            svi = pyro.infer.SVI(model, guide, pyro.optim.Adam(rates), elbo)
            for _ in range(5):
                svi.step(*batch)
        store = pyro.get_param_store()
        results.append({k: store[k].detach().clone() for k in store.keys()})
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)
