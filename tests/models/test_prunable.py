"""make_prunable on the built-in networks: where the gates go, their site names and shapes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from pyro_sbp.distributions import TruncatedLogNormal, TruncatedLogUniform
from pyro_sbp.guides import SBPGuide
from pyro_sbp.models import (
    INPUT_SHAPES,
    NETWORKS,
    SBPGate,
    SBPModel,
    build_network,
    gated_layer_name,
    make_prunable,
    named_gates,
)

# Small versions of the networks that are slow at full size.
SMALL_VGG = {"config": (8, "M", 16, "M"), "width_multiplier": 0.5, "hidden_features": 32}
BATCH = 3
NUM_DATA = 10
#: The networks built from nn.Sequential containers (gated in place, with hooks); the others are
#: traced (tests/models/test_graph.py).
SEQUENTIAL = sorted(n for n, f in NETWORKS.items() if issubclass(f, nn.Sequential))


def _kwargs(name: str) -> dict:
    return dict(SMALL_VGG) if name == "vgg-like" else {}


def _expected_gated_layers(net: nn.Module) -> list[str]:
    """Every Linear / Conv2d in module order but the last one (the classifier's output)."""
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert isinstance(net.get_submodule(names[-1]), nn.Linear)
    return names[:-1]


def _units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_gates_on_every_layer_but_the_classifier(name):
    net = build_network(name, **_kwargs(name))
    expected = _expected_gated_layers(net)
    assert expected, name
    assert make_prunable(net) is net

    gates = list(named_gates(net))
    assert [site for site, _ in gates] == [f"{layer}.gate" for layer in expected]
    for (site, gate), layer_name in zip(gates, expected, strict=True):
        layer = net.get_submodule(layer_name)
        assert isinstance(gate, SBPGate)
        assert layer.gate is gate
        assert gate.site_name == site
        assert gated_layer_name(site) == layer_name
        assert gate.num_units == _units(layer)
        assert gate.mask.shape == gate.theta_mean.shape == (gate.num_units,)
    # The classifier's output layer has no gate.
    last = net.classifier[-1]
    assert isinstance(last, nn.Linear) and not hasattr(last, "gate")
    # Gate buffers are part of the state dict under the layer's path.
    state = net.state_dict()
    for layer_name in expected:
        assert f"{layer_name}.gate.mask" in state
        assert f"{layer_name}.gate.theta_mean" in state


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_output_shape_in_train_and_eval_mode(name):
    net = make_prunable(build_network(name, **_kwargs(name)))
    x = torch.rand(BATCH, *INPUT_SHAPES[name])
    net.train()
    out = net(x)  # gates draw theta from their prior
    assert out.shape == (BATCH, 10)
    assert torch.isfinite(out).all()
    # Inside the model: per-example noise, same output shape.
    logits = SBPModel(net, NUM_DATA, INPUT_SHAPES[name])(x, None, torch.tensor([0, 4, 9]))
    assert logits.shape == (BATCH, 10)
    net.eval()
    with torch.no_grad():
        out = net(x)
    assert out.shape == (BATCH, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("input_gates", [False, True])
@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_model_and_guide_traces_have_the_gate_sites(name, input_gates):
    net = build_network(name, **_kwargs(name))
    linear = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if input_gates and name not in SEQUENTIAL:
        # A traced network's flattened features are gated with their channels.
        with pytest.raises(ValueError, match=r"input_layers .* apply to nn.Sequential networks"):
            make_prunable(net, input_layers=linear)
        return
    net = make_prunable(net, input_layers=linear if input_gates else ())
    if input_gates:
        sites = [site for site, _ in named_gates(net)]
        assert {f"{n}.input_gate" for n in linear} <= set(sites)
        first = net.get_submodule(linear[0])
        assert first.input_gate.num_units == first.in_features
    model = SBPModel(net, NUM_DATA, INPUT_SHAPES[name])
    guide = SBPGuide(net, NUM_DATA)
    x = torch.rand(BATCH, *INPUT_SHAPES[name])
    y = torch.tensor([0, 3, 9])
    idx = torch.tensor([1, 5, 7])
    guide_trace = poutine.trace(guide).get_trace(x, y, idx)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y, idx)

    gates = dict(named_gates(net))
    assert guide.site_names == list(gates)

    def latent(trace):
        return [
            n
            for n, s in trace.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and n != "data"
        ]

    # Same sites, same order (the mean-field check of TraceMeanField_ELBO).
    assert latent(guide_trace) == latent(model_trace) == list(gates)
    for site, gate in gates.items():
        g, m = guide_trace.nodes[site], model_trace.nodes[site]
        assert g["value"].shape == (BATCH, gate.num_units)
        assert m["value"] is g["value"]
        assert g["fn"].batch_shape == m["fn"].batch_shape == (BATCH,)
        assert g["fn"].event_shape == m["fn"].event_shape == (gate.num_units,)
        assert isinstance(g["fn"].base_dist, TruncatedLogNormal)
        assert isinstance(m["fn"].base_dist, TruncatedLogUniform)
        assert ((g["value"] >= gate.low) & (g["value"] <= gate.high)).all()
    obs = model_trace.nodes["obs"]
    assert obs["is_observed"] and obs["value"].shape == (BATCH,)


def _vgg_gated_pairs(net):
    """(gated layer, its BatchNorm, the module after the BatchNorm) for every VGG gate."""
    pairs = []
    for parent in (net.features, net.classifier):
        mods = list(parent)
        for i, m in enumerate(mods):
            if hasattr(m, "gate"):
                pairs.append((m, mods[i + 1], mods[i + 2]))
    return pairs


def test_vgg_gate_goes_after_the_batchnorm():
    torch.manual_seed(0)
    net = build_network("vgg-like", **SMALL_VGG)
    # Record the raw outputs of the layers and of the norms before the gates are put on.
    raw = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm1d | nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, i, o, name=name: raw.__setitem__(name, (i[0], o)))
    make_prunable(net)
    pairs = _vgg_gated_pairs(net)
    assert len(pairs) == 3
    seen = {}
    names = {id(m): n for n, m in net.named_modules()}
    for layer, norm, after in pairs:
        assert isinstance(norm, nn.BatchNorm1d | nn.BatchNorm2d)
        assert isinstance(after, nn.ReLU)
        key = names[id(layer)]
        after.register_forward_hook(lambda mod, i, o, key=key: seen.__setitem__(key, i[0]))
        gate = layer.gate
        n = gate.num_units
        with torch.no_grad():
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(0.5, 1.0)  # a removed unit would not be 0 before the norm's shift
            layer.bias.uniform_(-1.0, 1.0)
            gate.theta_mean.copy_(torch.linspace(0.1, 0.9, n))
            gate.mask[1] = 0.0

    net.eval()
    x = torch.rand(4, *INPUT_SHAPES["vgg-like"])
    with torch.no_grad():
        net(x)
    for layer, norm, _ in pairs:
        layer_name, norm_name = names[id(layer)], names[id(norm)]
        inp, out = raw[layer_name]
        # The layer itself is untouched: its bias is not taken off and put back by a gate.
        if isinstance(layer, nn.Conv2d):
            plain = F.conv2d(inp, layer.weight, layer.bias, padding=1)
        else:
            plain = F.linear(inp, layer.weight, layer.bias)
        assert torch.equal(out, plain), layer_name
        norm_in, norm_out = raw[norm_name]
        assert torch.equal(norm_in, out)
        gate = layer.gate
        theta = (gate.theta_mean * gate.mask).reshape((1, -1) + (1,) * (norm_out.dim() - 2))
        torch.testing.assert_close(seen[layer_name], norm_out * theta)
        # The removed unit is exactly zero although the norm shifts it by its bias.
        assert (norm_out[:, 1] != 0).all()
        assert (seen[layer_name][:, 1] == 0).all()


def test_vgg_gate_after_batchnorm_in_training_mode():
    net = make_prunable(build_network("vgg-like", **SMALL_VGG))
    conv, norm, relu = net.features[0], net.features[1], net.features[2]
    got = {}
    conv.register_forward_hook(lambda m, i, o: got.__setitem__("conv", o))
    relu.register_forward_hook(lambda m, i, o: got.__setitem__("relu_in", i[0]))
    model = SBPModel(net, NUM_DATA, INPUT_SHAPES["vgg-like"])
    x = torch.rand(4, *INPUT_SHAPES["vgg-like"])
    trace = poutine.trace(model).get_trace(x, None, torch.tensor([0, 1, 2, 3]))
    theta = trace.nodes["features.0.gate"]["value"]
    assert theta.shape == (4, conv.out_channels)
    expected = (
        F.batch_norm(got["conv"], None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
        * theta[:, :, None, None]
    )
    torch.testing.assert_close(got["relu_in"], expected)


def test_mlp_gate_goes_before_the_bias():
    # No BatchNorm: Linear -> gate -> bias -> ReLU.
    net = make_prunable(build_network("digits-mlp"))
    layer = net.classifier[1]
    assert layer._forward_hooks, "the gate acts through a forward hook on the layer"
    got = {}
    layer.register_forward_hook(lambda m, i, o: got.__setitem__("io", (i[0], o)))
    with torch.no_grad():
        layer.bias.uniform_(-1.0, 1.0)
        layer.gate.theta_mean.uniform_(0.1, 1.0)
    net.eval()
    with torch.no_grad():
        net(torch.rand(5, 1, 8, 8))
    inp, out = got["io"]
    expected = F.linear(inp, layer.weight) * layer.gate.theta_mean + layer.bias
    torch.testing.assert_close(out, expected)


# --- gates moved after max-pooling --------------------------------------------------------


def _gated_pair(name, **kwargs):
    torch.manual_seed(0)
    plain = build_network(name, **kwargs)
    state = plain.state_dict()
    moved = make_prunable(build_network(name, **kwargs))
    kept = make_prunable(build_network(name, **kwargs), gate_after_pool=False)
    for net in (moved, kept):
        net.load_state_dict(state, strict=False)
    with torch.no_grad():
        for (_, g1), (_, g2) in zip(named_gates(moved), named_gates(kept), strict=True):
            g1.mask.copy_((torch.rand(g1.num_units) > 0.3).float())
            g1.theta_mean.uniform_(0.05, 1.0)
            g2.mask.copy_(g1.mask)
            g2.theta_mean.copy_(g1.theta_mean)
        for m in moved.modules():  # biases away from zero, so that a misplaced bias would show
            if isinstance(m, nn.Conv2d):
                m.bias.uniform_(-1.0, 1.0)
        kept.load_state_dict(moved.state_dict())
    return moved, kept


def test_conv_gate_moves_after_the_max_pooling():
    def kinds(seq):
        return [
            next(c for c in (nn.Conv2d, nn.MaxPool2d, nn.ReLU) if isinstance(m, c)) for m in seq
        ]

    net = make_prunable(build_network("lenet5-caffe"))
    plain = build_network("lenet5-caffe")
    conv, pool, relu = nn.Conv2d, nn.MaxPool2d, nn.ReLU
    assert kinds(net.features) == [conv, pool, relu, conv, pool, relu]
    assert set(net.state_dict()) - {k for k in net.state_dict() if ".gate." in k} == set(
        plain.state_dict()
    )
    kept = make_prunable(build_network("lenet5-caffe"), gate_after_pool=False)
    assert kinds(kept.features) == kinds(plain.features) == [conv, relu, pool, conv, relu, pool]


@pytest.mark.parametrize("name", ["lenet5-caffe", "bmrs-lenet5"])
def test_gate_after_pool_computes_the_same_bit_for_bit(name):
    moved, kept = _gated_pair(name)
    x = torch.rand(BATCH, *INPUT_SHAPES[name])
    for train in (True, False):
        moved.train(train)
        kept.train(train)
        with torch.no_grad():
            torch.manual_seed(1)
            got = moved(x)
            torch.manual_seed(1)
            expected = kept(x)
        assert torch.equal(got, expected)
    # The gradients too (per-example noise, training mode).
    moved.train()
    kept.train()
    for net in (moved, kept):
        torch.manual_seed(2)
        net(x).square().sum().backward()
    for (n1, p1), (n2, p2) in zip(moved.named_parameters(), kept.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-6)


def test_a_shared_pooling_module_keeps_the_gates_at_their_layers():
    # One MaxPool2d object in two places: a hook on it would gate both outputs with one gate.
    torch.manual_seed(0)
    pool, act = nn.MaxPool2d(2), nn.ReLU()
    layers = [nn.Conv2d(1, 4, 3), act, pool, nn.Conv2d(4, 4, 3), act, pool, nn.Flatten()]
    plain = nn.Sequential(*layers, nn.Linear(16, 2))
    net = make_prunable(copy.deepcopy(plain))
    kept = make_prunable(copy.deepcopy(plain), gate_after_pool=False)
    assert isinstance(net[1], nn.ReLU) and isinstance(net[4], nn.ReLU)  # nothing moved
    with torch.no_grad():
        for (_, g1), (_, g2) in zip(named_gates(net), named_gates(kept), strict=True):
            g1.theta_mean.uniform_(0.1, 1.0)
            g2.theta_mean.copy_(g1.theta_mean)
    x = torch.randn(5, 1, 14, 14)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), kept.eval()(x))


@pytest.mark.parametrize(
    ("act", "moves"),
    [
        (nn.ReLU(), True),
        (nn.LeakyReLU(0.1), True),
        (nn.LeakyReLU(-0.1), False),
        (nn.ELU(), True),
        (nn.Tanh(), True),
        (nn.Sigmoid(), True),
        (nn.SiLU(), False),
        (nn.GELU(), False),
    ],
)
def test_only_non_decreasing_activations_are_moved(act, moves):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), act, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2)
    )
    reference = nn.Sequential(*[m for m in net]).eval()  # the same modules, before the move
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        before = reference(x)
    make_prunable(net)
    assert isinstance(net[1], nn.MaxPool2d) == moves
    net.eval()
    with torch.no_grad():
        net[0].gate.theta_mean.fill_(1.0)  # identity gates: the network's own function
        torch.testing.assert_close(net(x), before)


# --- errors ------------------------------------------------------------------------------


def test_no_linear_or_conv_is_refused():
    with pytest.raises(ValueError, match=r"no nn\.Linear or nn\.Conv2d"):
        make_prunable(nn.Sequential(nn.ReLU(), nn.Flatten()))


def test_unknown_layer_name_is_refused():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"no layer named 'fc1'"):
        make_prunable(net, ["fc1"])
    assert not any(isinstance(m, SBPGate) for m in net.modules())


def test_layer_that_is_not_linear_or_conv_is_refused():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"layer '1' is a ReLU"):
        make_prunable(net, ["1"])


def test_last_layer_conv_needs_explicit_layers():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 3, 3))
    with pytest.raises(ValueError, match="not a Linear"):
        make_prunable(net)
    make_prunable(net, ["0"])
    assert [s for s, _ in named_gates(net)] == ["0.gate"]


def test_twice_is_refused():
    net = make_prunable(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match="already has gates"):
        make_prunable(net)
