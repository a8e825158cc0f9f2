"""Sparse VD layers, model and guide: the local reparameterisation against sampled weights,
masks and dead units, the ELBO's scaling, bad input."""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyro_sbp.distributions.sparse_vd import sparse_vd_neg_kl
from pyro_sbp.infer.compact_elbo import CompactMeanField_ELBO
from pyro_sbp.models import build_network
from pyro_sbp.models.sparse_vd import (
    SparseVDConv2d,
    SparseVDGuide,
    SparseVDLinear,
    SparseVDModel,
    apply_weight_masks,
    compute_weight_masks,
    dead_units,
    make_sparse_vd,
    named_sparse_vd_layers,
    parse_criterion,
    set_kl_weight,
    set_stochastic,
)


def _randomise(layer, spread=2.0):
    with torch.no_grad():
        layer.log_sigma2.copy_(
            layer.weight.square().log() + spread * torch.randn_like(layer.weight)
        )


def _moments_check(layer, x, linear, n=10_000):
    """Mean and variance of the pre-activations: local reparameterisation against weights
    sampled from q (both Monte Carlo, n draws), and the analytic moments."""
    layer.train()
    with torch.no_grad():
        lrt = torch.cat([layer(x.expand(500, *x.shape[1:])) for _ in range(n // 500)])
        q = layer.posterior()
        w = q.sample((n,))
        # All the sampled weights in one call: draw k's output unit j is output k * out + j.
        out = w.shape[1]
        sampled = linear(x, w.reshape(n * out, *w.shape[2:]), layer.bias.repeat(n))[0]
        sampled = sampled.reshape(n, out, *sampled.shape[1:])
        mean = linear(x, layer.weight, layer.bias)[0]
        var = linear(x.square(), q.variance, None)[0]
    assert lrt.shape[1:] == mean.shape == sampled.shape[1:]
    se = (var / n).sqrt()
    # Means within 5 standard errors; variances within 10% (n = 10000: 1.4% standard error).
    for draws in (lrt, sampled):
        assert ((draws.mean(0) - mean).abs() <= 5 * se + 1e-6).all()
        torch.testing.assert_close(draws.var(0), var, rtol=0.1, atol=1e-6)


def test_local_reparameterisation_linear():
    torch.manual_seed(0)
    layer = make_sparse_vd(nn.Sequential(nn.Linear(6, 4)))[0]
    _randomise(layer)
    _moments_check(layer, torch.randn(1, 6), F.linear)


def test_local_reparameterisation_conv2d():
    torch.manual_seed(1)
    layer = make_sparse_vd(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)))[0]
    _randomise(layer)

    def conv(x, w, b):
        return F.conv2d(x, w, b, padding=1)

    _moments_check(layer, torch.randn(1, 2, 4, 4), conv)


def test_eval_and_deterministic_modes():
    torch.manual_seed(2)
    layer = make_sparse_vd(nn.Sequential(nn.Linear(5, 3)))[0]
    with torch.no_grad():
        layer.log_sigma2.copy_(layer.weight.square().log())  # log alpha = 0: kept
        layer.log_sigma2[0, :2] = 30.0  # log alpha clipped to 10: removed
    x = torch.randn(7, 5)
    layer.eval()
    keep = layer.keep()
    assert keep.sum() == 13 and not keep[0, :2].any()
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight * keep, layer.bias))
    layer.train()
    set_stochastic(nn.Sequential(layer), False)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)
    set_stochastic(nn.Sequential(layer), True)
    assert not torch.equal(layer(x), layer(x))


def test_make_sparse_vd_converts_every_layer_and_keeps_the_weights():
    torch.manual_seed(3)
    plain = build_network("lenet5-caffe")
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    net = make_sparse_vd(plain)
    layers = dict(named_sparse_vd_layers(net))
    assert list(layers) == ["features.0", "features.3", "classifier.1", "classifier.3"]
    assert isinstance(layers["features.0"], SparseVDConv2d)
    assert isinstance(layers["classifier.3"], SparseVDLinear)  # the classifier too
    for k, v in state.items():
        torch.testing.assert_close(net.state_dict()[k], v)
    assert layers["classifier.1"].site_name == "classifier.1.w"
    assert float(layers["features.0"].log_sigma2.detach().mean()) == -10.0


def test_masks_and_dead_units():
    torch.manual_seed(4)
    net = make_sparse_vd(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    first = net[0]
    with torch.no_grad():
        first.log_sigma2.copy_(first.weight.square().log() - 1.0)  # log alpha = -1
        first.log_sigma2[1] = 50.0  # unit 1: every incoming weight removed
        first.log_sigma2[2, 0] = first.weight[2, 0].square().log() + 3.5  # one weight > 3
    result = compute_weight_masks(net, "log-alpha:3")
    keep = result.keep["0"]
    assert keep.sum() == 12 - 4 - 1
    assert not keep[1].any() and not keep[2, 0]
    assert dead_units(net, result.masks())["0"].tolist() == [False, True, False]
    assert result.layer_rows()["0"]["units_after"] == 2
    assert result.weights_before == 18 and result.weights_after == 7 + 6
    # A stricter threshold on top of the layer's mask; "trained" keeps the masks as they are.
    apply_weight_masks(net, result)
    assert math.isinf(first.threshold)
    assert compute_weight_masks(net, "trained").keep["0"].equal(keep)
    stricter = compute_weight_masks(net, "log-alpha:-2").keep["0"]
    assert stricter.sum() == 0


def test_model_and_guide_scale_the_kl_and_the_likelihood():
    torch.manual_seed(5)
    net = make_sparse_vd(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)))
    for _, layer in named_sparse_vd_layers(net):
        _randomise(layer)
    n = 50
    model = SparseVDModel(net, n, (4,), kl_weight={"0.w": 2.0})
    guide = SparseVDGuide(net, n)
    assert model.kl_weights == {"0.w": 2.0, "2.w": 1.0}
    assert guide.site_names == ["0.w", "2.w"]
    x, y, idx = torch.randn(10, 4), torch.randint(0, 3, (10,)), torch.arange(10)
    net.eval()  # a deterministic likelihood: the loss's only randomness would be the KL's
    elbo = CompactMeanField_ELBO()
    with torch.no_grad():
        kl = {
            name: float(-sparse_vd_neg_kl(layer.log_alpha()).sum())
            for name, layer in named_sparse_vd_layers(net)
        }
        nll = float(F.cross_entropy(net(x), y, reduction="sum")) * n / 10
    for warmup in (0.25, 0.5, 1.0):
        loss = elbo.loss(model, guide, x, y, idx, warmup)
        assert loss == pytest.approx(nll + warmup * (2.0 * kl["0"] + kl["2"]), rel=1e-5)


def test_svi_sparsifies_useless_weights():
    # Inputs 2 and 3 carry no signal: their weights go (log alpha > 3), those of 0 and 1 stay
    # (labels with noise, so that the useful weights do not grow without bound).
    torch.manual_seed(6)
    pyro.set_rng_seed(6)
    x = torch.randn(400, 4)
    y = (x[:, 0] - x[:, 1] + 0.5 * torch.randn(400) > 0).long()
    net = make_sparse_vd(nn.Sequential(nn.Linear(4, 2)))
    model, guide = SparseVDModel(net, 400, (4,)), SparseVDGuide(net, 400)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), CompactMeanField_ELBO())
    for _ in range(400):
        svi.step(x, y, torch.arange(400))
    keep = net[0].keep()
    assert keep[:, :2].all() and not keep[:, 2:].any()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda net: make_sparse_vd(net, threshold=12.0), r"in \[-10, 10\].*got 12.0"),
        (lambda net: make_sparse_vd(net, ["nope"]), r"not nn.Linear/nn.Conv2d layers.*'nope'"),
        (lambda net: make_sparse_vd(nn.Sequential(nn.ReLU())), "no nn.Linear or nn.Conv2d"),
        (lambda net: SparseVDModel(nn.Sequential(nn.ReLU()), 10), "call make_sparse_vd"),
        (lambda net: set_kl_weight(make_sparse_vd(net), -1.0), "positive number"),
        (lambda net: set_kl_weight(make_sparse_vd(net), {"x.w": 2.0}), "unknown weight sites"),
        (lambda net: parse_criterion("snr:1"), "unknown Sparse VD criterion 'snr:1'"),
        (lambda net: parse_criterion("log-alpha:x"), "not a number"),
        (lambda net: parse_criterion("log-alpha:-11"), r"in \[-10, 10\]"),
        (lambda net: make_sparse_vd(net)[0](torch.zeros(2, 5)), "expects 3 input features"),
        (
            lambda net: make_sparse_vd(nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="reflect"))),
            "zero padding",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(nn.Sequential(nn.Linear(3, 2)))
