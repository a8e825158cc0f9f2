"""Export: equivalence with the gated network, shapes, TorchScript, FLOPs and bad input."""

import subprocess
import sys

import pytest
import torch
from torch import nn

from pyro_sbp.export import (
    MaxPool2x2,
    count_flops,
    count_parameters,
    export_full,
    export_pruned,
    load_torchscript,
    save_torchscript,
)
from pyro_sbp.models import NETWORKS, build_network, make_prunable, named_gates

SMALL = {"vgg-like": {"width_multiplier": 0.125}}


def _random_gated(name, seed=0, remove_all=None, p_keep=0.5, input_gates=False):
    g = torch.Generator().manual_seed(seed)
    net = build_network(name, **SMALL.get(name, {}))
    inputs = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)] if input_gates else []
    net = make_prunable(net, input_layers=inputs)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.5, 0.5, generator=g)
    for i, (_, gate) in enumerate(named_gates(net)):
        gate.theta_mean.copy_(torch.rand(gate.num_units, generator=g) * 0.99 + 0.01)
        keep = (torch.rand(gate.num_units, generator=g) < p_keep).float()
        if i == remove_all:
            keep.zero_()
        gate.mask.copy_(keep)
    return net.eval()


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("remove_all", [None, 0, 1])
def test_exported_network_computes_what_the_gated_one_does(name, remove_all):
    net = _random_gated(name, remove_all=remove_all)
    shape = tuple(net.input_shape)
    x = torch.rand(8, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
        pruned = export_pruned(net, shape)
        full = export_full(net, shape)
        assert (pruned(x) - ref).abs().max() <= 1e-5
    # No Pyro, no gates, no hooks in the export; the classifier keeps every output.
    for m in pruned.modules():
        assert type(m).__module__.startswith(("torch.", "pyro_sbp.export")), type(m)
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert pruned(x).shape == ref.shape
    assert count_parameters(pruned) < count_parameters(full)
    # The full export keeps every unit, and computes the gated network with all masks on.
    for _, gate in named_gates(net):
        gate.mask.fill_(1.0)
    with torch.no_grad():
        assert (full(x) - net(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", [n for n, f in NETWORKS.items() if issubclass(f, nn.Sequential)])
@pytest.mark.parametrize("remove_all", [None, 0, 1])
def test_input_gates_export_exactly(name, remove_all):
    """Input gates on every Linear (the classifier's inputs too), with the unit gates: removed
    input features are dropped and the kept ones selected; all inputs of a layer removed too."""
    net = _random_gated(name, remove_all=remove_all, input_gates=True)
    shape = tuple(net.input_shape)
    x = torch.rand(8, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
        pruned = export_pruned(net, shape)
        assert (pruned(x) - ref).abs().max() <= 1e-5
        for _, gate in named_gates(net):
            gate.mask.fill_(1.0)
        assert (export_full(net, shape)(x) - net(x)).abs().max() <= 1e-5


def test_input_gate_shapes_and_normalisation_folded():
    net = _random_gated("lenet-500-300", input_gates=True)
    gates = dict(named_gates(net))
    pruned = export_pruned(net, (1, 28, 28))
    select, fc1 = pruned.classifier[1].select, pruned.classifier[1].layer
    kept_in = gates["classifier.1.input_gate"].mask.nonzero().squeeze(-1)
    assert torch.equal(select.index, kept_in)
    assert fc1.in_features == kept_in.numel()
    assert fc1.out_features == int(gates["classifier.1.gate"].mask.sum())
    # The normalisation went into fc1's weights: nothing runs before Flatten and the selection.
    assert isinstance(pruned.normalize, nn.Identity)
    # LeNet5-Caffe: fc1 keeps the kept inputs of the kept channels' 4x4 blocks.
    net = _random_gated("lenet5-caffe", input_gates=True)
    gates = dict(named_gates(net))
    pruned = export_pruned(net, (1, 28, 28))
    blocks = gates["features.3.gate"].mask.repeat_interleave(16) > 0
    inputs = gates["classifier.1.input_gate"].mask > 0
    assert pruned.classifier[1].layer.in_features == int((blocks & inputs).sum())


def test_input_gates_only_on_linear_layers():
    with pytest.raises(ValueError, match="input gates go on Linear"):
        make_prunable(build_network("lenet5-caffe"), input_layers=["features.0"])
    with pytest.raises(ValueError, match="no layer named"):
        make_prunable(build_network("lenet5-caffe"), input_layers=["nope"])


def test_shapes_after_export():
    net = _random_gated("lenet5-caffe")
    kept = {site: int(g.mask.sum()) for site, g in named_gates(net)}
    pruned = export_pruned(net, (1, 28, 28))
    conv1, conv2 = pruned.features[0], pruned.features[3]
    fc1, fc2 = pruned.classifier[1], pruned.classifier[3]
    assert conv1.out_channels == kept["features.0.gate"]
    assert conv2.in_channels == kept["features.0.gate"]
    assert conv2.out_channels == kept["features.3.gate"]
    # A channel of conv2 is a 4x4 block of fc1's inputs.
    assert fc1.in_features == 16 * kept["features.3.gate"]
    assert fc1.out_features == kept["classifier.1.gate"]
    assert fc2.in_features == kept["classifier.1.gate"] and fc2.out_features == 10


def test_torchscript_round_trip_without_pyro(tmp_path):
    # With input gates: the exported FeatureSelect is scripted too.
    net = _random_gated("bmrs-lenet5", input_gates=True)
    pruned = export_pruned(net, (1, 32, 32))
    path = tmp_path / "pruned.pt"
    save_torchscript(pruned, path)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        expected = pruned(x)
        assert torch.equal(load_torchscript(path)(x), expected)
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    # A fresh interpreter in which pyro and pyro_sbp cannot be imported.
    code = (
        "import sys, warnings\n"
        "sys.modules['pyro'] = None\n"
        "sys.modules['pyro_sbp'] = None\n"
        "warnings.simplefilter('ignore')\n"
        "import torch\n"
        f"m = torch.jit.load({str(path)!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "assert torch.equal(m(io['x']), io['y'])\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_flops_and_parameters_against_hand_counts():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3),  # 4 x 6 x 6 outputs, 9 multiply-adds each
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    )
    assert count_flops(net, (1, 8, 8)) == 2 * (4 * 36 * 9 + 144 * 5 + 5 * 3)
    assert count_parameters(net) == (4 * 9 + 4) + (144 * 5 + 5) + (5 * 3 + 3)
    assert count_flops(net, (1, 8, 8), batch_size=3) == 3 * count_flops(net, (1, 8, 8))


def test_bad_masks_are_refused():
    net = _random_gated("digits-mlp")
    with pytest.raises(ValueError, match="expected"):
        export_pruned(net, (1, 8, 8), {"classifier.1.gate": torch.ones(3)})
    with pytest.raises(ValueError, match="unknown gate"):
        export_pruned(net, (1, 8, 8), {"classifier.5.gate": torch.ones(10)})
    gated_classifier = make_prunable(build_network("digits-mlp"), layers=["classifier.5"])
    with pytest.raises(ValueError, match="classifier"):
        export_pruned(gated_classifier.eval(), (1, 8, 8))


def test_explicit_masks_override_the_gates_own():
    net = _random_gated("digits-mlp", p_keep=1.0)
    masks = {site: torch.zeros(g.num_units) for site, g in named_gates(net)}
    masks["classifier.1.gate"][:7] = 1
    masks["classifier.3.gate"][:5] = 1
    pruned = export_pruned(net, (1, 8, 8), masks)
    assert pruned.classifier[1].out_features == 7
    assert pruned.classifier[3].out_features == 5


@pytest.mark.parametrize("shape", [(2, 3, 24, 24), (1, 1, 7, 9), (4, 5, 2, 3)])
def test_max_pool_2x2_equals_max_pool2d(shape, tmp_path):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x[0, 0, 0, 1] = float("nan")
    x[0, 0, 1, 0] = float("inf")
    expected = nn.MaxPool2d(2)(x)
    got = MaxPool2x2()(x)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())
    save_torchscript(MaxPool2x2(), tmp_path / "pool.pt")
    assert torch.equal(
        load_torchscript(tmp_path / "pool.pt")(x).nan_to_num(), expected.nan_to_num()
    )


def test_only_plain_2x2_max_pooling_is_rewritten():
    from pyro_sbp.export.exporter import _is_max_pool_2x2

    assert _is_max_pool_2x2(nn.MaxPool2d(2)) and _is_max_pool_2x2(nn.MaxPool2d((2, 2), 2))
    for other in [
        nn.MaxPool2d(3),
        nn.MaxPool2d(2, stride=1),
        nn.MaxPool2d(2, padding=1),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.MaxPool2d(2, dilation=2),
        nn.AvgPool2d(2),
    ]:
        assert not _is_max_pool_2x2(other), other
    pruned = export_pruned(_random_gated("lenet5-caffe"), (1, 28, 28))
    assert sum(isinstance(m, MaxPool2x2) for m in pruned.modules()) == 2
    assert not any(isinstance(m, nn.MaxPool2d) for m in pruned.modules())


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, nn.GELU, nn.Tanh])
def test_activations_move_past_max_pooling_only_where_they_commute(act):
    # SiLU and GELU dip below zero: max-pooling does not commute with them, and an export that
    # moved them after the pooling would compute another function.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3), act(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 3 * 3, 3)
    )
    net = make_prunable(net)
    with torch.no_grad():
        net[0].gate.mask.copy_(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0]))
        net[0].gate.theta_mean.uniform_(0.5, 1.0)
        net[0].bias.fill_(-2.5)  # pre-activations around -2.5, where SiLU and GELU decrease
    net.eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert (export_pruned(net, (1, 8, 8))(x) - net(x)).abs().max() <= 1e-5
