"""The ELBO of an SBPModel / SBPGuide pair: its KL term is the analytic one, scaled to the data."""

import pyro
import pyro.infer.trace_mean_field_elbo as trace_mean_field_elbo
import pytest
import torch
from pyro import poutine
from pyro.distributions import Independent
from pyro.infer import TraceMeanField_ELBO
from torch import nn
from torch.distributions import kl_divergence

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform
from pyro_sbp.guides import SBPGuide
from pyro_sbp.models import SBPModel, make_prunable, named_gates

N = 16
D = 5


def _setup(log_scale_range=(-3.0, 1.0), loc_range=(-4.0, 1.0)):
    net = make_prunable(
        nn.Sequential(nn.Linear(D, 6), nn.ReLU(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    )
    model = SBPModel(net, N, (D,))
    guide = SBPGuide(net, N)
    g = torch.Generator().manual_seed(2)
    for site, gate in named_gates(net):
        lo, hi = loc_range
        pyro.param(f"{site}.loc", lo + (hi - lo) * torch.rand(gate.num_units, generator=g))
        lo, hi = log_scale_range
        pyro.param(f"{site}.log_scale", lo + (hi - lo) * torch.rand(gate.num_units, generator=g))
    x = torch.rand(N, D, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    return net, model, guide, x, y


def _analytic_kl(net, guide):
    total = torch.zeros(())
    for site, gate in named_gates(net):
        total = total + kl_divergence(guide.posterior(site), gate.prior()).sum()
    return total.item()


@pytest.mark.parametrize("kl_weight", [1.0, 0.25])
def test_kl_term_is_the_analytic_kl_with_the_likelihood_blocked(kl_weight):
    net, model, guide, x, y = _setup()
    blocked = poutine.block(model, hide=["obs"])
    elbo = TraceMeanField_ELBO(max_plate_nesting=1)
    losses = [elbo.loss(blocked, guide, x, y, kl_weight=kl_weight) for _ in range(4)]
    # Exact: the same number at every evaluation (no Monte Carlo anywhere).
    assert all(loss == losses[0] for loss in losses), losses
    kl = _analytic_kl(net, guide)
    assert kl > 1.0
    assert losses[0] == pytest.approx(kl_weight * kl, rel=1e-5)


def test_kl_term_with_a_fixed_likelihood():
    net, model, guide, x, y = _setup()
    # The logits no longer depend on theta: the likelihood is a fixed number.
    with torch.no_grad():
        net[4].weight.zero_()
        net[4].bias.copy_(torch.tensor([0.3, -0.2, 0.5]))
    nll = -torch.log_softmax(net[4].bias, -1)[y].sum().item()
    elbo = TraceMeanField_ELBO(max_plate_nesting=1)
    losses = [elbo.loss(model, guide, x, y) for _ in range(4)]
    assert all(loss == losses[0] for loss in losses), losses
    assert losses[0] - nll == pytest.approx(_analytic_kl(net, guide), rel=1e-5)


def test_loss_minus_the_likelihood_is_the_kl():
    # With a likelihood that depends on theta: recompute the likelihood on the same draws.
    net, model, guide, x, y = _setup()
    elbo = TraceMeanField_ELBO(max_plate_nesting=1)
    idx = torch.arange(4, 12)
    xb, yb = x[idx], y[idx]
    kl = _analytic_kl(net, guide)
    nlls = []
    for seed in range(3):
        pyro.set_rng_seed(seed)
        loss = elbo.loss(model, guide, xb, yb, idx, kl_weight=0.5)
        pyro.set_rng_seed(seed)
        guide_trace = poutine.trace(guide).get_trace(xb, yb, idx, kl_weight=0.5)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            xb, yb, idx, kl_weight=0.5
        )
        obs = model_trace.nodes["obs"]
        assert obs["scale"] == pytest.approx(N / len(idx))
        nll = -(obs["fn"].log_prob(obs["value"]).sum() * obs["scale"]).item()
        nlls.append(nll)
        assert loss - nll == pytest.approx(0.5 * kl, rel=1e-4, abs=1e-3)
    assert len(set(nlls)) == 3  # the likelihood part does vary: the test can tell them apart


def test_no_gate_site_falls_back_to_monte_carlo(monkeypatch):
    net, model, guide, x, y = _setup()
    calls = []
    real = trace_mean_field_elbo.kl_divergence

    def spy(p, q):
        try:
            value = real(p, q)
        except NotImplementedError:
            calls.append((p, q, None))
            raise
        calls.append((p, q, value))
        return value

    monkeypatch.setattr(trace_mean_field_elbo, "kl_divergence", spy)
    idx = torch.tensor([0, 5, 6, 15])
    TraceMeanField_ELBO(max_plate_nesting=1).loss(model, guide, x[idx], y[idx], idx)
    gates = list(named_gates(net))
    assert len(calls) == len(gates)
    for (p, q, value), (_, gate) in zip(calls, gates, strict=True):
        assert value is not None, "a gate site fell back to a Monte Carlo KL"
        assert type(p) is Independent and type(p.base_dist) is TruncatedLogNormal
        assert type(q) is Independent and type(q.base_dist) is TruncatedLogUniform
        assert value.shape == (len(idx),)
        assert torch.isfinite(value).all()
        assert p.event_shape == (gate.num_units,)


def test_kl_divergence_of_every_gate_site():
    net, model, guide, x, y = _setup()
    idx = torch.tensor([2, 3, 9])
    guide_trace = poutine.trace(guide).get_trace(x[idx], y[idx], idx)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        x[idx], y[idx], idx
    )
    for site, gate in named_gates(net):
        q, p = guide_trace.nodes[site]["fn"], model_trace.nodes[site]["fn"]
        # Not an ExpandedDistribution (whose KL is not registered): the class survives the plate.
        assert type(q) is Independent and type(q.base_dist) is TruncatedLogNormal, type(q)
        assert type(p) is Independent and type(p.base_dist) is TruncatedLogUniform, type(p)
        kl = kl_divergence(q, p)
        assert kl.shape == (3,)
        expected = kl_divergence(guide.posterior(site), gate.prior()).sum()
        torch.testing.assert_close(kl, expected.expand(3))
        assert guide_trace.nodes[site]["scale"] == pytest.approx(1.0 / len(idx))


def test_kl_part_is_the_same_for_every_batch_size():
    net, model, guide, x, y = _setup()
    blocked = poutine.block(model, hide=["obs"])
    elbo = TraceMeanField_ELBO(max_plate_nesting=1)
    kl = _analytic_kl(net, guide)
    perm = torch.randperm(N)
    for b in (1, 4, 7, 16):
        idx = perm[:b]
        loss = elbo.loss(blocked, guide, x[idx], y[idx], idx)
        assert loss == pytest.approx(kl, rel=1e-5), b


def test_minibatch_loss_is_unbiased_for_the_full_batch_loss():
    # Nearly deterministic gates: the loss of a minibatch is then a function of the batch, and
    # the mean over a partition of the data into minibatches is the full-batch loss.
    _, model, guide, x, y = _setup(log_scale_range=(-14.0, -13.0), loc_range=(-2.0, -0.3))
    elbo = TraceMeanField_ELBO(max_plate_nesting=1)
    full = elbo.loss(model, guide, x, y)
    perm = torch.randperm(N)
    for b in (4, 8):
        parts = perm.split(b)
        losses = [elbo.loss(model, guide, x[i], y[i], i) for i in parts]
        assert len(set(losses)) > 1  # the minibatches do differ
        assert sum(losses) / len(losses) == pytest.approx(full, rel=1e-4), b


def test_minibatch_without_indices_is_refused():
    _, model, guide, x, y = _setup()
    with pytest.raises(ValueError, match="needs their positions `idx`"):
        model(x[:4], y[:4])
    with pytest.raises(ValueError, match="needs their positions `idx`"):
        guide(x[:4], y[:4])
    with pytest.raises(ValueError, match=r"idx must have shape \(4,\)"):
        model(x[:4], y[:4], torch.arange(3))


# --- the KL weight --------------------------------------------------------------------------


def _per_site_kl(net, guide):
    return {
        site: kl_divergence(guide.posterior(site), gate.prior()).sum().item()
        for site, gate in named_gates(net)
    }


@pytest.mark.parametrize(
    "weight", [3.0, 100.0, {"0.gate": 10.0}, {"0.gate": 2.0, "2.gate": 50.0}], ids=repr
)
def test_the_kl_weight_multiplies_each_sites_kl_only(weight):
    net, _, guide, x, y = _setup()
    kls = _per_site_kl(net, guide)
    losses = {}
    for key, w in (("one", 1.0), ("weighted", weight)):
        model = SBPModel(net, N, (D,), kl_weight=w)
        pyro.set_rng_seed(7)  # the same noise: the likelihood term is the same
        losses[key] = TraceMeanField_ELBO(max_plate_nesting=1).loss(model, guide, x, y)
    weights = weight if isinstance(weight, dict) else dict.fromkeys(kls, weight)
    expected = sum((weights.get(site, 1.0) - 1.0) * kl for site, kl in kls.items())
    assert losses["weighted"] - losses["one"] == pytest.approx(expected, rel=1e-5)


def test_the_call_weight_multiplies_the_sites_weights():
    net, _, guide, x, y = _setup()
    model = SBPModel(net, N, (D,), kl_weight={"2.gate": 4.0})
    blocked = poutine.block(model, hide=["obs"])
    loss = TraceMeanField_ELBO(max_plate_nesting=1).loss(blocked, guide, x, y, kl_weight=0.5)
    kls = _per_site_kl(net, guide)
    assert loss == pytest.approx(0.5 * kls["0.gate"] + 0.5 * 4.0 * kls["2.gate"], rel=1e-5)
    assert model.kl_weights == {"0.gate": 1.0, "2.gate": 4.0}


@pytest.mark.parametrize(
    ("weight", "match"),
    [
        (0.0, "positive number, got 0.0"),
        (-1.0, "positive number"),
        (float("nan"), "positive number"),
        (float("inf"), "positive number"),
        ({"0.gate": True}, "positive number, got True"),
        ({"9.gate": 2.0}, r"unknown gate sites \['9.gate'\]; gates: \['0.gate', '2.gate'\]"),
    ],
)
def test_bad_kl_weights_are_refused(weight, match):
    net, *_ = _setup()
    with pytest.raises(ValueError, match=match):
        SBPModel(net, N, (D,), kl_weight=weight)


# --- noise per minibatch --------------------------------------------------------------------


def test_batch_noise_draws_one_theta_per_minibatch_with_the_kl_once():
    net, _, guide, x, y = _setup()
    model = SBPModel(net, N, (D,), kl_weight={"2.gate": 3.0}, noise="batch")
    idx = torch.arange(4, 12)
    guide_trace = poutine.trace(guide).get_trace(x[idx], y[idx], idx)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        x[idx], y[idx], idx
    )
    for site, gate in named_gates(net):
        for trace in (guide_trace, model_trace):
            node = trace.nodes[site]
            assert node["value"].shape == (gate.num_units,)  # not (batch, units)
            assert [f.name for f in node["cond_indep_stack"]] == []  # outside the data plate
            assert node["scale"] == pytest.approx(3.0 if site == "2.gate" else 1.0)
    blocked = poutine.block(model, hide=["obs"])
    loss = TraceMeanField_ELBO(max_plate_nesting=1).loss(blocked, guide, x[idx], y[idx], idx)
    kls = _per_site_kl(net, guide)
    assert loss == pytest.approx(kls["0.gate"] + 3.0 * kls["2.gate"], rel=1e-5)
    # Every example of the minibatch sees the same draw: the gated outputs are the draw times
    # the ungated ones.
    assert all(gate._theta is None for _, gate in named_gates(net))


def test_batch_noise_and_example_noise_have_the_same_loss_with_a_fixed_likelihood():
    net, _, guide, x, y = _setup()
    with torch.no_grad():
        net[4].weight.zero_()
        net[4].bias.copy_(torch.tensor([0.3, -0.2, 0.5]))
    losses = [
        TraceMeanField_ELBO(max_plate_nesting=1).loss(SBPModel(net, N, (D,), noise=n), guide, x, y)
        for n in ("example", "batch")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_unknown_noise_mode():
    net, *_ = _setup()
    with pytest.raises(ValueError, match=r"noise must be one of \('example', 'batch'\)"):
        SBPModel(net, N, noise="unit")
