"""A short SVI run prunes the units that carry no signal and keeps the ones that do."""

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import Adam
from torch import nn

from pyro_sbp.data import load_dataset
from pyro_sbp.guides import SBPGuide
from pyro_sbp.models import Normalize, SBPModel, make_prunable, set_gates_enabled

D, INFORMATIVE, CLASSES = 10, 2, 4


def _feature_gated_net() -> nn.Module:
    # Inputs in (0, 1) centred and scaled to (-2, 2), then a Linear(D, D) fixed at the identity
    # (buffers, not parameters) with bias 2: hidden unit j is feature j, and its gate scales the
    # centred feature (the bias-free response) -- theta -> 0 turns it into the constant 2, which
    # the ReLU passes. Then a linear classifier.
    first = nn.Linear(D, D)
    del first.weight, first.bias
    first.register_buffer("weight", torch.eye(D))
    first.register_buffer("bias", torch.full((D,), 2.0))
    net = nn.Sequential(Normalize(0.5, 0.25), first, nn.ReLU(), nn.Linear(D, CLASSES))
    return make_prunable(net, ["1"])


@torch.no_grad()
def _accuracy(net, x, y) -> float:
    was_training = net.training
    net.eval()
    acc = (net(x).argmax(-1) == y).float().mean().item()
    net.train(was_training)
    return acc


def test_svi_prunes_the_units_without_signal():
    splits = load_dataset(
        "synthetic",
        n=1000,
        d=D,
        informative=INFORMATIVE,
        num_classes=CLASSES,
        class_sep=4.0,
        val_fraction=0.0,
        seed=0,
    )
    x, y = splits.train.tensors
    x_test, y_test = splits.test.tensors
    n = splits.num_train
    net = _feature_gated_net()

    # Deterministic pretraining (gates off), as SBP starts from a trained network.
    set_gates_enabled(net, False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    set_gates_enabled(net, True)
    pretrained_acc = _accuracy(net, x_test, y_test)
    assert pretrained_acc > 0.6

    model = SBPModel(net, n, (D,))
    guide = SBPGuide(net, n)
    optim = Adam(lambda name: {"lr": 0.1 if name.startswith("1.gate.") else 1e-2})
    svi = SVI(model, guide, optim, TraceMeanField_ELBO())
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        idx = torch.randperm(n, generator=g)[:64]
        losses.append(svi.step(x[idx], y[idx], idx))

    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)

    guide.update_gates()
    theta = net[1].gate.theta_mean
    snr = guide.snr()["1.gate"]
    useful, useless = theta[:INFORMATIVE], theta[INFORMATIVE:]
    msg = f"E[theta] = {theta.tolist()}, SNR = {snr.tolist()}"
    assert (useful > 0.8).all(), msg
    assert (useless < 0.15).all(), msg
    assert useless.max() < 0.2 * useful.min(), msg
    assert (snr[:INFORMATIVE] > 5).all(), msg
    assert (snr[INFORMATIVE:] < 1).all(), msg
    # The useless units' posteriors have left theta = 1 for the bulk of [low, high].
    loc = pyro.param("1.gate.loc").detach()
    log_scale = pyro.param("1.gate.log_scale").detach()
    assert (loc[INFORMATIVE:] < loc[:INFORMATIVE].min()).all(), msg
    assert (log_scale[INFORMATIVE:] > 1.0).all(), msg

    acc = _accuracy(net, x_test, y_test)
    assert acc > 0.75 and acc >= pretrained_acc - 0.05, (pretrained_acc, acc)
