"""The floors the speed benchmarks measure next to their targets: the textbook gate formulas
(``benchmarks/distributions.py``), the network's time spent in its unavoidable layers
(``benchmarks/export_speedup.py``) and the cheapest gated training step
(``benchmarks/svi_overhead.py``). Each must compute what it claims to, or the floor means
nothing."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import kl_divergence

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
LOG_LOW, LOG_HIGH = -20.0, 0.0


def _load(name):
    # The scripts import their shared helpers (textbook_formulas) from their own folder.
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dist_bench():
    return _load("distributions")


def _reference(loc, scale):
    d = TruncatedLogNormal(loc.double(), scale.double(), math.exp(LOG_LOW), math.exp(LOG_HIGH))
    prior = TruncatedLogUniform(
        torch.tensor(math.exp(LOG_LOW), dtype=torch.float64), math.exp(LOG_HIGH)
    ).expand(d.batch_shape)
    return d, kl_divergence(d, prior), d.mean, d.variance


def test_textbook_formulas_are_right_where_the_mass_is_not_small(dist_bench):
    # Bounds a few scales away from loc on both sides: every mass is well above float precision.
    torch.manual_seed(0)
    loc = torch.empty(2000).uniform_(-15.0, -5.0)
    scale = torch.empty(2000).uniform_(0.5, 2.0)
    u = torch.rand(2000)
    theta, kl, mean, var = dist_bench.textbook(loc, scale, LOG_LOW, LOG_HIGH, u)
    d, kl_ref, mean_ref, var_ref = _reference(loc, scale)
    for got, ref in ((kl, kl_ref), (mean, mean_ref), (var, var_ref)):
        assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-7)
    assert torch.allclose(theta.double(), d.icdf(u.double()), rtol=1e-4)


def test_textbook_formulas_are_wrong_in_the_tails(dist_bench):
    # loc beyond the upper bound by 50 scales: Z ~ 1e-545, far below float32's range.
    loc, scale = torch.tensor([5.0]), torch.tensor([0.1])
    _, kl, mean, _ = dist_bench.textbook(loc, scale, LOG_LOW, LOG_HIGH, torch.tensor([0.5]))
    _, kl_ref, mean_ref, _ = _reference(loc, scale)
    assert not torch.allclose(kl.double(), kl_ref, rtol=1e-2)
    assert not torch.allclose(mean.double(), mean_ref, rtol=1e-2)


def test_wrong_fraction_counts_the_tail_gates(dist_bench):
    low, high = torch.tensor(math.exp(LOG_LOW)), torch.tensor(math.exp(LOG_HIGH))
    benign_loc = torch.linspace(-15.0, -5.0, 100)
    scale = torch.ones(100)
    assert dist_bench.textbook_wrong_fraction(benign_loc, scale, low, high) == 0.0
    tails = torch.cat([benign_loc, torch.full((100,), 5.0)])
    fraction = dist_bench.textbook_wrong_fraction(tails, torch.full((200,), 0.1), low, high)
    assert fraction == pytest.approx(0.5)


@pytest.mark.parametrize("gate_after_pool", [True, False])
def test_plain_torch_gating_is_make_prunables(gate_after_pool):
    from pyro import poutine

    from pyro_sbp.models import build_network, make_prunable

    bench = _load("svi_overhead")
    torch.manual_seed(0)
    plain = build_network(bench.NETWORK)
    net = make_prunable(build_network(bench.NETWORK), gate_after_pool=gate_after_pool)
    net.load_state_dict(plain.state_dict(), strict=False)
    layers, units = ["features.0", "features.3", "classifier.1"], [20, 50, 500]
    gates = bench.TorchGates(layers, units, "lognormal")
    x = torch.rand(8, *bench.INPUT_SHAPE)
    with torch.no_grad():
        for key in gates.loc:  # gates far from 1, so that a misplaced gate would show
            gates.loc[key].uniform_(-3.0, 0.0)
            gates.log_scale[key].fill_(0.0)
        gates.sample(x.shape[0])
        with poutine.condition(data={f"{k}.gate": v for k, v in gates.theta.items()}):
            expected = net(x)
        got = bench._gated_logits(plain, gates.theta, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain(x), atol=1e-3)  # the gates do change the logits


def test_layer_floor_times_every_module_but_the_views():
    bench = _load("export_speedup")
    from pyro_sbp.export import FeatureSelect

    _, pruned, shape = bench._pruned_network("lenet-500-300", bench.CASES["lenet-500-300"])
    timed = bench.layer_floor(pruned, shape, batch_size=4, min_run_time=0.01)
    leaves = [
        (name, m)
        for name, m in pruned.named_modules()
        if not list(m.children()) and not isinstance(m, torch.nn.Flatten | torch.nn.Identity)
    ]
    assert [t["module"] for t in timed] == [name for name, _ in leaves]
    layers = [name for name, m in leaves if isinstance(m, torch.nn.Linear | FeatureSelect)]
    assert [t["module"] for t in timed if t["layer"]] == layers
    assert len(layers) == 4  # the input selection and three layers
    assert len(timed) == 6  # and two ReLUs
    assert all(t["median_s"] > 0 for t in timed)


def test_textbook_distribution_of_the_svi_floor():
    bench = _load("svi_overhead")
    torch.manual_seed(0)
    loc = torch.empty(50).uniform_(-15.0, -5.0)
    scale = torch.empty(50).uniform_(0.5, 2.0)
    low, high = math.exp(LOG_LOW), math.exp(LOG_HIGH)
    q = bench.TextbookTruncatedLogNormal(loc, scale, low, high).expand((7, 50))
    assert type(q) is bench.TextbookTruncatedLogNormal
    prior = TruncatedLogUniform(torch.tensor(low), high).expand((7, 50))
    d, kl_ref, _, _ = _reference(loc, scale)
    torch.testing.assert_close(
        kl_divergence(q, prior).double(), kl_ref.expand(7, 50), rtol=1e-4, atol=1e-6
    )
    theta = q.rsample()
    assert theta.shape == (7, 50)
    assert ((theta >= low) & (theta <= high)).all()
    torch.testing.assert_close(
        q.log_prob(theta).double(), d.log_prob(theta.double()), rtol=1e-4, atol=1e-4
    )
