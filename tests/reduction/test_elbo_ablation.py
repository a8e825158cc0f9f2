"""The ``elbo`` criterion: Delta F of the network without each unit, by its free energy."""

import math

import pyro
import pytest
import torch
from torch import nn

from pyro_sbp.guides import SBPGuide
from pyro_sbp.models import build_network, make_prunable, named_gates
from pyro_sbp.reduction import apply_masks, compute_masks, elbo_ablation, parse_criterion
from pyro_sbp.reduction.elbo_ablation import _Evaluator, elbo_delta_f, unit_kls


def _random_posteriors(net, guide, seed=0):
    g = torch.Generator().manual_seed(seed)
    for site, gate in named_gates(net):
        loc, log_scale = guide.params(site)
        with torch.no_grad():
            loc.copy_(-6 * torch.rand(gate.num_units, generator=g))
            log_scale.copy_(-2 + 3 * torch.rand(gate.num_units, generator=g))


def _lenet(seed=0):
    torch.manual_seed(seed)
    net = make_prunable(build_network("lenet5-caffe", image_size=16), input_layers=["classifier.1"])
    guide = SBPGuide(net, 1000)
    _random_posteriors(net, guide, seed)
    return net, guide


def _data(n, shape, seed=0, classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(classes, (n,), generator=g)


def _brute_force(net, guide, data, examples, seed):
    """Delta F of every unit by switching its mask off and rerunning the whole network."""
    kl = unit_kls(guide)
    out = {}
    with _Evaluator(net, guide, data, examples, seed) as ev:
        base = ev.log_lik()
        for site, gate in ev.gates:
            d = torch.zeros(gate.num_units, dtype=torch.float64)
            for j in range(gate.num_units):
                if gate.mask[j] == 0:
                    continue
                gate.mask[j] = 0
                d[j] = float(ev.scale() * (ev.log_lik() - base))
                gate.mask[j] = 1
            out[site] = d + gate.kl_weight * kl[site]
    return out


@pytest.mark.parametrize("kl_weight", [1.0, 30.0])
def test_delta_f_is_the_free_energy_of_the_network_without_the_unit(kl_weight):
    net, guide = _lenet()
    for _, gate in named_gates(net):
        gate.kl_weight = kl_weight
    data = _data(300, (1, 16, 16))
    # Some units removed before: they stay removed, their Delta F is their KL term alone.
    masks = {s: torch.ones(g.num_units) for s, g in named_gates(net)}
    masks["features.3.gate"][:5] = 0
    masks["classifier.1.input_gate"][::3] = 0
    apply_masks(net, masks)
    delta_f, remove = elbo_delta_f(net, guide, data, examples=200, seed=3)
    expected = _brute_force(net, guide, data, examples=200, seed=3)
    for site in expected:
        torch.testing.assert_close(delta_f[site], expected[site], rtol=1e-3, atol=2e-3)
        assert not remove[site][masks[site] == 0].any()
    # The net is left as it was: masks, modes, no fixed draws.
    for site, gate in named_gates(net):
        assert torch.equal(gate.mask, masks[site])
        assert gate._theta is None
    assert net.training


def test_a_network_that_is_not_a_sequential_is_rerun_whole():
    class TwoPath(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 5)
            self.b = nn.Linear(5, 4)
            self.skip = nn.Linear(6, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + self.skip(x)

    torch.manual_seed(0)
    net = make_prunable(TwoPath(), layers=["a"], example_input=torch.randn(2, 6))
    guide = SBPGuide(net, 1000)
    _random_posteriors(net, guide)
    data = _data(50, (6,), classes=4)
    delta_f, _ = elbo_delta_f(net, guide, data, examples=50)
    expected = _brute_force(net, guide, data, examples=50, seed=0)
    for site in expected:
        torch.testing.assert_close(delta_f[site], expected[site], rtol=1e-6, atol=1e-6)


def _mlp_with_a_dead_unit():
    torch.manual_seed(0)
    net = make_prunable(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [1.0, 1, 1, 1]]))
        net[0].bias.zero_()
        # Unit 2 reaches nothing: the data cannot need it.
        net[2].weight.copy_(torch.tensor([[5.0, -5.0, 0.0], [-5.0, 5.0, 0.0]]))
    guide = SBPGuide(net, 1000)
    loc, log_scale = guide.params("0.gate")
    with torch.no_grad():
        # Units 0 and 1 are sure to be on; unit 2's posterior is as flat as the family allows.
        loc.copy_(torch.tensor([0.0, 0.0, -10.0]))
        log_scale.copy_(torch.tensor([-3.0, -3.0, 5.0]))
    x = torch.randn(400, 4, generator=torch.Generator().manual_seed(1))
    y = (x[:, 1] > x[:, 0]).long()
    return net, guide, (x, y)


def test_a_unit_the_data_do_not_need_goes_and_those_they_need_stay():
    net, guide, data = _mlp_with_a_dead_unit()
    result = compute_masks(net, guide, "elbo", data)
    lp = result.layers["0.gate"]
    assert lp.keep.tolist() == [True, True, False]
    # The dead unit's Delta F is its KL alone (nothing changes in the likelihood): it is
    # positive, and near zero since its posterior is nearly the prior.
    kl = unit_kls(guide)["0.gate"]
    assert lp.scores[2] == pytest.approx(float(kl[2]), rel=1e-12)
    assert 0 < kl[2] < 0.05
    assert (lp.scores[:2] < -100).all()
    # The BMR criteria keep it: a near-flat truncated normal puts a little less mass at a.
    assert compute_masks(net, guide, "bmrs-n").layers["0.gate"].keep[2]


def test_the_kl_weight_is_the_occam_factor():
    net, guide, data = _mlp_with_a_dead_unit()
    scores1 = compute_masks(net, guide, "elbo", data).layers["0.gate"].scores
    net[0].gate.kl_weight = 7.0
    scores7 = compute_masks(net, guide, "elbo", data).layers["0.gate"].scores
    kl = unit_kls(guide)["0.gate"]
    torch.testing.assert_close(scores7 - scores1, 6.0 * kl)


def _prefix_free_energies(net, guide, data, examples, order, beta):
    kl = unit_kls(guide)
    gates = dict(named_gates(net))
    out = []
    with _Evaluator(net, guide, data, examples, 0) as ev:
        base = ev.log_lik()
        for k in range(len(order) + 1):
            for site, j in order[:k]:
                gates[site].mask[j] = 0
            f = float(ev.scale() * (ev.log_lik() - base))
            f += sum(beta * float(kl[site][j]) for site, j in order[:k])
            out.append(f)
            for site, j in order[:k]:
                gates[site].mask[j] = 1
    return out


@pytest.mark.parametrize("grid", [2, 3, 100])
def test_the_joint_reduction_has_the_largest_free_energy_of_the_ranking(monkeypatch, grid):
    monkeypatch.setattr(elbo_ablation, "GRID", grid)
    torch.manual_seed(0)
    net = make_prunable(nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 3)))
    guide = SBPGuide(net, 1000)
    _random_posteriors(net, guide)
    net[0].gate.kl_weight = 40.0
    data = _data(120, (5,), classes=3)
    delta_f, remove = elbo_delta_f(net, guide, data, examples=120)
    df = delta_f["0.gate"]
    order = [("0.gate", int(j)) for j in torch.sort(-df, stable=True).indices if df[j] >= 0]
    assert len(order) >= 3
    f = _prefix_free_energies(net, guide, data, 120, order, 40.0)
    k = int(remove["0.gate"].sum())
    # The removed units are a prefix of the ranking, and an exhaustive search agrees when the
    # grid covers every prefix; a coarse grid finds a local maximum among its points.
    assert set(j for _, j in order[:k]) == set(remove["0.gate"].nonzero().flatten().tolist())
    if grid >= len(order):
        assert f[k] == pytest.approx(max(f), abs=1e-9)
    else:
        assert f[k] >= f[0] - 1e-9 and f[k] >= f[-1] - 1e-9


def test_elbo_is_deterministic_and_needs_the_data():
    net, guide = _lenet(1)
    data = _data(100, (1, 16, 16), seed=2)
    a = compute_masks(net, guide, "elbo", data)
    b = compute_masks(net, guide, "elbo", torch.utils.data.TensorDataset(*data))
    for site in a.layers:
        assert torch.equal(a.layers[site].scores, b.layers[site].scores)
        assert torch.equal(a.layers[site].keep, b.layers[site].keep)
    assert parse_criterion("ELBO") == ("elbo", None, None)
    with pytest.raises(ValueError, match=r"criterion 'elbo' .* pass data"):
        compute_masks(net, guide, "elbo")
    with pytest.raises(ValueError, match="non-empty inputs and labels of one length"):
        compute_masks(net, guide, "elbo", (data[0], data[1][:-1]))
    # A matched baseline can target it.
    matched = compute_masks(net, guide, "match:snr:elbo", data)
    assert matched.units_after == a.units_after


def test_a_subsample_estimates_the_whole_training_set():
    net, guide = _lenet(2)
    for _, gate in named_gates(net):
        gate.kl_weight = 10.0
    data = _data(600, (1, 16, 16), seed=4)
    whole, _ = elbo_delta_f(net, guide, data, examples=600)
    part, _ = elbo_delta_f(net, guide, data, examples=300)
    # Scaled to the same N: the same order of magnitude, strongly correlated.
    a = torch.cat(list(whole.values()))
    b = torch.cat(list(part.values()))
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert corr > 0.9
    assert math.isclose(float(a.abs().mean()), float(b.abs().mean()), rel_tol=0.5)


def test_pruning_during_training_with_elbo(tmp_path):
    from pyro_sbp.infer import TrainConfig, Trainer

    pyro.clear_param_store()
    config = TrainConfig(
        epochs=3, pretrain_epochs=2, batch_size=64, prune_criterion="elbo", kl_weight=50.0
    )
    trainer = Trainer(config, tmp_path, progress=False)
    trainer.fit()
    kept = trainer.history[-1]["units_kept"]
    total = trainer.history[-1]["units_total"]
    assert sum(kept.values()) < sum(total.values())
    assert trainer.history[-1]["criterion"] == "elbo"
