"""Bayesian Compression layers, model and guide: local reparameterisation, masks, bad input."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.distributions import ExpandedDistribution, Independent
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import Adam
from torch import nn
from torch.distributions import kl_divergence

from pyro_sbp.infer import CompactMeanField_ELBO
from pyro_sbp.methods import get_method
from pyro_sbp.models import build_network
from pyro_sbp.models.bayesian_compression import (
    BCConv2d,
    BCGuide,
    BCLinear,
    BCModel,
    apply_group_masks,
    compute_group_masks,
    make_bayesian_compression,
    named_bc_layers,
    parse_criterion,
)

PRIORS = ["gnj", "ghs"]


def _set_posterior(layer, gen):
    """Spread-out variational parameters (a trained-looking posterior)."""
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
        layer.weight_log_sigma2.copy_(-2.0 + 0.5 * torch.randn(layer.weight.shape, generator=gen))
        if layer.prior_name == "gnj":
            layer.z_loc.copy_(1.0 + 0.3 * torch.randn(layer.num_groups, generator=gen))
            layer.z_log_sigma2.fill_(-2.5)
        else:
            for s in ("s_a", "s_b", "z_a", "z_b"):
                getattr(layer, f"{s}_loc").copy_(
                    0.3 * torch.randn(getattr(layer, f"{s}_loc").shape, generator=gen)
                )
                getattr(layer, f"{s}_log_scale").fill_(-1.2)


def _sampled_reference(layer, x, n, gen):
    """Outputs with z ~ q(z) and w~ ~ q(w~) drawn explicitly, w = z w~ (no local trick)."""
    with torch.no_grad():
        qs = layer.group_posteriors()
        values = {}
        for site, q in qs.items():
            eps = torch.randn((n, *q.loc.shape), generator=gen)
            y = q.loc + q.scale * eps
            values[site] = y if layer.prior_name == "gnj" else y.exp()
        z = layer._z_from(values) * layer.mask  # (n, groups)
        sigma = (0.5 * layer.weight_log_sigma2).exp()
        w = layer.weight + sigma * torch.randn((n, *layer.weight.shape), generator=gen)
        if isinstance(layer, BCLinear):
            w = w * z[:, None, :]
            return torch.einsum("oi,noi->no", x, w) + layer.bias
        w = w * z[:, :, None, None, None]
        # All n weight draws in one convolution: (1, n * out, H', W').
        out = nn.functional.conv2d(x, w.reshape(-1, *w.shape[2:]), layer.bias.repeat(n))
        return out.reshape(n, -1)


def _model_outputs(net, x, n):
    """The model's logits with the guide's per-example draws (n copies of one input)."""
    model, guide = BCModel(net, n), BCGuide(net, n)
    xs = x.expand(n, *x.shape[1:])
    idx = torch.arange(n)
    with torch.no_grad():
        trace = poutine.trace(guide).get_trace(xs, None, idx)
        return poutine.replay(model, trace=trace)(xs, None, idx)


@pytest.mark.parametrize("prior", PRIORS)
def test_local_reparameterisation_moments_linear(prior):
    gen = torch.Generator().manual_seed(3)
    net = make_bayesian_compression(nn.Sequential(nn.Linear(4, 3)), prior)
    layer = net[0]
    _set_posterior(layer, gen)
    x = torch.randn(1, 4, generator=gen)
    n = 40000
    got = _model_outputs(net, x, n)
    ref = _sampled_reference(layer, x, n, gen)
    se = ref.std(0) / math.sqrt(n)
    assert ((got.mean(0) - ref.mean(0)).abs() < 6 * math.sqrt(2) * se).all()
    assert torch.allclose(got.var(0), ref.var(0), rtol=0.06)


@pytest.mark.parametrize("prior", PRIORS)
def test_local_reparameterisation_moments_conv(prior):
    gen = torch.Generator().manual_seed(4)
    net = make_bayesian_compression(
        nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten()), prior, layers=["0"]
    )
    layer = net[0]
    _set_posterior(layer, gen)
    x = torch.randn(1, 2, 3, 3, generator=gen)
    n = 20000
    got = _model_outputs(net, x, n)
    ref = _sampled_reference(layer, x, 2000, gen)
    se = ref.std(0) / math.sqrt(2000)
    assert ((got.mean(0) - ref.mean(0)).abs() < 6 * se).all()
    assert torch.allclose(got.var(0), ref.var(0), rtol=0.15)


@pytest.mark.parametrize("prior", PRIORS)
def test_posterior_weight_moments(prior):
    gen = torch.Generator().manual_seed(5)
    layer = make_bayesian_compression(nn.Sequential(nn.Linear(3, 2)), prior)[0]
    _set_posterior(layer, gen)
    n = 200000
    with torch.no_grad():
        values = {}
        for site, q in layer.group_posteriors().items():
            y = q.loc + q.scale * torch.randn((n, *q.loc.shape), generator=gen, dtype=torch.float64)
            values[site] = y if prior == "gnj" else y.exp()
        z = layer._z_from(values)
        sigma = (0.5 * layer.weight_log_sigma2).exp().double()
        w = (
            layer.weight.double()
            + sigma * torch.randn((n, 2, 3), generator=gen, dtype=torch.float64)
        ) * z[:, None, :]
        mean, var = layer.posterior_weight_moments()
    assert torch.allclose(mean.double(), w.mean(0), atol=4 * float(w.std(0).max()) / math.sqrt(n))
    assert torch.allclose(var.double(), w.var(0), rtol=0.03)


def test_masks_remove_groups():
    gen = torch.Generator().manual_seed(6)
    net = make_bayesian_compression(
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2)), "gnj"
    )
    for _, layer in named_bc_layers(net):
        _set_posterior(layer, gen)
    conv, lin = net[0], net[3]
    apply_group_masks(net, {"0": torch.tensor([True, False, True]), "3": torch.arange(12) % 2 == 0})
    x = torch.randn(5, 1, 4, 4, generator=gen)
    for mode in (True, False):
        net.train(mode)
        assert (conv(x)[:, 1] == 0).all()  # a removed channel is exactly 0, its bias too
        h = torch.randn(5, 12, generator=gen)
        h2 = h.clone()
        h2[:, 1::2] = torch.randn(5, 6, generator=gen)
        if not mode:
            assert torch.equal(lin(h), lin(h2))  # removed inputs are ignored
    net.eval()
    with pytest.raises(ValueError, match="expected"):
        apply_group_masks(net, {"0": torch.ones(2), "3": torch.ones(12)})


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("elbo", [TraceMeanField_ELBO, CompactMeanField_ELBO])
def test_svi_with_analytic_kls(prior, elbo):
    net = make_bayesian_compression(build_network("digits-mlp"), prior)
    model, guide = BCModel(net, 100, (1, 8, 8)), BCGuide(net, 100)
    x, y, idx = torch.randn(10, 1, 8, 8), torch.randint(0, 10, (10,)), torch.arange(10)
    svi = SVI(model, guide, Adam({"lr": 1e-3}), elbo())
    losses = [svi.step(x, y, idx) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    # Every latent site has a registered KL on its own classes (no ExpandedDistribution).
    gt = poutine.trace(guide).get_trace(x, y, idx)
    mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(x, y, idx)
    latent = [n for n, s in gt.nodes.items() if s["type"] == "sample" and n != "data"]
    assert set(latent) == set(guide.site_names) == set(model.kl_weights)
    for name in latent:
        q, p = gt.nodes[name]["fn"], mt.nodes[name]["fn"]
        for d in (q, p):
            base = d.base_dist if isinstance(d, Independent) else d
            assert not isinstance(base, ExpandedDistribution), name
        assert kl_divergence(q, p).shape == q.batch_shape


def test_kl_counts_once_per_group():
    # The ELBO's KL part equals the sum of the closed-form KLs, counted once (not per example).
    net = make_bayesian_compression(nn.Sequential(nn.Linear(3, 2)), "gnj")
    model, guide = BCModel(net, 50), BCGuide(net, 50)
    x, idx = torch.randn(5, 3), torch.arange(5)
    layer = net[0]
    with torch.no_grad():
        kl = kl_divergence(layer.weight_posterior(), layer.weight_prior()).sum()
        for site, q in layer.group_posteriors().items():
            kl = kl + kl_divergence(q, layer.group_priors()[site]).sum()

    def prior_only(x, y, idx):  # the model without its likelihood
        with poutine.block(hide=["obs"]):
            return model(x, y, idx)

    loss = TraceMeanField_ELBO().loss(prior_only, guide, x, None, idx)
    assert loss == pytest.approx(float(kl), rel=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown Bayesian Compression prior"):
        make_bayesian_compression(build_network("digits-mlp"), "laplace")
    net = make_bayesian_compression(build_network("digits-mlp"), "gnj")
    with pytest.raises(ValueError, match="already"):
        make_bayesian_compression(net)
    with pytest.raises(ValueError, match=r"not nn\.Linear"):
        make_bayesian_compression(build_network("digits-mlp"), "gnj", layers=["nope"])
    for bad in ("log-alpha:20", "log-alpha:-11", "log-alpha:nan"):
        with pytest.raises(ValueError):
            parse_criterion(bad)
    with pytest.raises(ValueError, match="improper"):
        parse_criterion("delta-f", "gnj")
    with pytest.raises(ValueError, match="unknown Bayesian Compression criterion"):
        compute_group_masks(net, "snr:1")
    assert parse_criterion("log-alpha") == ("log-alpha", -3.0)
    assert parse_criterion("delta-f:8", "ghs") == ("delta-f", 8.0)
    with pytest.raises(ValueError, match="tau0"):
        make_bayesian_compression(build_network("digits-mlp"), "ghs", tau0=0.0)
    with pytest.raises(ValueError, match="num_data"):
        BCModel(net, 0)


def test_thresholds_decide_masks():
    net = make_bayesian_compression(build_network("digits-mlp"), "gnj")
    layer = dict(named_bc_layers(net))["classifier.1"]
    with torch.no_grad():
        layer.z_log_sigma2[:10] = 5.0  # log alpha ~ 5: removed at -3
    result = compute_group_masks(net, "log-alpha:-3")
    assert int(result.keep["classifier.1"].sum()) == 64 - 10
    assert "classifier.1" in result.summary() and result.to_dict()["units_after"] > 0


@pytest.mark.parametrize("name", ["bc-gnj", "bc-ghs"])
def test_registered_methods(name):
    method = get_method(name)
    assert method.name == name

    class Config:
        kl_weight = 1.0

    net = method.prepare(build_network("digits-mlp"), Config())
    assert all(isinstance(m, BCLinear | BCConv2d) for _, m in named_bc_layers(net))
    model = method.build_model(net, 100, (1, 8, 8), Config())
    guide = method.build_guide(net, 100, Config())
    x = torch.randn(4, 1, 8, 8)
    pyro.clear_param_store()
    assert math.isfinite(
        TraceMeanField_ELBO().loss(
            model, guide, x, torch.zeros(4, dtype=torch.long), torch.arange(4)
        )
    )
    assert method.is_variational(
        "classifier.1.z_loc" if name == "bc-gnj" else "classifier.1.z_a_loc"
    )
    assert not method.is_variational("classifier.1.weight")
    summary = method.epoch_summary(net, guide, Config())
    assert summary["units_total"]["classifier.1"] == 64
    full, pruned = method.export(net.eval(), (1, 8, 8))
    assert torch.allclose(full(x), pruned(x), atol=1e-5)


def test_kl_weight_by_layer_or_site():
    net = make_bayesian_compression(build_network("digits-mlp"), "ghs")
    model = BCModel(net, 10, kl_weight={"classifier.1": 3.0, "classifier.3.z_a": 5.0})
    assert model.kl_weights["classifier.1.w"] == 3.0
    assert model.kl_weights["classifier.3.s_b"] == 5.0
    assert model.kl_weights["classifier.5.z_b"] == 1.0
    with pytest.raises(ValueError, match="unknown layer"):
        BCModel(net, 10, kl_weight={"nope": 2.0})
    with pytest.raises(ValueError, match="positive"):
        BCModel(net, 10, kl_weight=-1.0)


@pytest.mark.parametrize("prior", PRIORS)
def test_arviz_draws_of_z(prior):
    from pyro_sbp.models.bayesian_compression import to_arviz_bc

    net = make_bayesian_compression(build_network("digits-mlp"), prior)
    apply_group_masks(
        net, {n: torch.arange(m.num_groups) % 2 == 0 for n, m in named_bc_layers(net)}
    )
    data = to_arviz_bc(net, num_chains=2, num_draws=30, seed=0)
    z = data.posterior["classifier.1.z"].values
    assert z.shape == (2, 30, 64)
    assert (z[..., 1::2] == 0).all() and (z[..., ::2] != 0).all()
    # Draws centred on E[z] (1 at initialisation).
    assert abs(float(z[..., ::2].mean()) - 1.0) < 0.05
    assert data.constant_data["classifier.1.log_alpha"].values.shape == (64,)


@pytest.mark.parametrize("prior", PRIORS)
def test_svi_optimises_the_group_scales(prior):
    # The group scales' parameters are read by the guide only: they must reach the param
    # store (and move), not just the weights the forward pass reads.
    net = make_bayesian_compression(build_network("digits-mlp"), prior)
    model, guide = BCModel(net, 100), BCGuide(net, 100)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    svi = SVI(model, guide, Adam({"lr": 1e-2}), CompactMeanField_ELBO())
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for _ in range(2):
        svi.step(x, y, torch.arange(8))
    store = set(pyro.get_param_store().keys())
    moved = {k for k, v in net.state_dict().items() if not torch.equal(v, before[k])}
    group = "classifier.3.z_loc" if prior == "gnj" else "classifier.3.z_a_log_scale"
    assert group in store and group in moved
    assert {k for k, _ in net.named_parameters()} <= store
