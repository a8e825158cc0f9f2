"""No host synchronisation in a training step's gate path: counted by the profiler.

On the CPU the gate distributions run the native kernels (:mod:`pyro_sbp._native`), which take
each unit's branch inside one operator call. On CUDA they take their branches densely
(``_standard.DENSE_BRANCHES``) with PyTorch operators; where the native kernels are off, the
CPU's PyTorch path asks the mask whether a rare branch is needed. The tests run the native
kernels and the dense path on the CPU (the same code that runs on CUDA)."""

from collections import Counter

import pyro
import pytest
import torch
from torch import nn
from torch.distributions import kl_divergence
from torch.profiler import ProfilerActivity, profile

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform
from pyro_sbp.guides import SBPGuide
from pyro_sbp.infer import CompactMeanField_ELBO
from pyro_sbp.models import SBPModel, make_prunable
from tests.conftest import set_gate_path

#: The events that make the host wait for the device (a value read back, or a data-dependent
#: shape).
SYNC_EVENTS = {"aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero"}


@pytest.fixture(autouse=True, params=["native", "torch-dense"])
def _gate_path(request, monkeypatch):
    set_gate_path(monkeypatch, request.param)
    return request.param


def _syncs(fn) -> Counter:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return Counter(e.name for e in prof.events() if e.name in SYNC_EVENTS)


def _gated_with_every_branch():
    torch.manual_seed(0)
    net = make_prunable(nn.Sequential(nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 4)))
    guide = SBPGuide(net, 1000)
    loc, log_scale = guide.params("0.gate")
    with torch.no_grad():
        # Straddling the bounds (the rest), far below them (a tail), nearly flat, far above.
        loc[:5], log_scale[:5] = -45.0, -2.0
        loc[5:10], log_scale[5:10] = -10.0, 5.0
        loc[10:15], log_scale[10:15] = 3.0, -4.0
    return net, guide


@pytest.mark.parametrize("noise", ["example", "batch"])
def test_an_svi_step_of_a_gated_layer_asks_nothing_of_the_device(noise):
    net, guide = _gated_with_every_branch()
    model = SBPModel(net, 1000, noise=noise)
    x, y, idx = torch.randn(64, 12), torch.randint(4, (64,)), torch.arange(64)
    elbo = CompactMeanField_ELBO()

    def step():
        loss = elbo.differentiable_loss(model, guide, x, y, idx)
        loss.backward()

    with pyro.validation_enabled(False):
        step()  # parameters created outside the profile
        assert _syncs(step) == Counter()


def test_sampling_and_the_statistics_of_gates_in_every_regime(_gate_path):
    # The native kernels give the moments' values only; their gradients take the PyTorch path
    # (which on the CPU asks, when dense branches are not forced). A training step needs the
    # samples and the KL, with gradients, and the moments without (update_gates).
    moments_grad = _gate_path == "torch-dense"
    loc = torch.tensor([-45.0, -10.0, 3.0, -5.0, 0.0], requires_grad=True)
    scale = torch.tensor([0.1, 150.0, 0.02, 1.0, 1e-3], requires_grad=True)
    low, high = torch.tensor(2.0**-29), torch.tensor(1.0)

    def run():
        q = TruncatedLogNormal(loc, scale, low, high, validate_args=False)
        p = TruncatedLogUniform(low, high, validate_args=False).expand([5])
        theta = q.rsample((256,))
        total = theta.sum() + kl_divergence(q, p).sum()
        with torch.set_grad_enabled(moments_grad):
            moments = q.mean.sum() + q.variance.sum()
        if moments_grad:
            total = total + moments
        total.backward()

    run()
    assert _syncs(run) == Counter()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(scale.grad).all()


def test_on_the_cpu_the_sparse_path_asks(monkeypatch):
    # The CPU default: the rare branches on their own elements (the counts show it is the other
    # path, and that the test above would see a synchronisation if there were one).
    set_gate_path(monkeypatch, "torch")
    q = TruncatedLogNormal(torch.tensor([-45.0, 0.0]), torch.tensor([0.1, 1.0]), 2.0**-29, 1.0)
    assert _syncs(lambda: q.rsample((8,))) != Counter()
