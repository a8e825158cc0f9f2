"""make_prunable on traced networks: gates as graph nodes, coupled channels, where the gates act,
and the structures that are refused; export of torchvision's families equal to the gated network."""

import pyro
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.optim import Adam
from torch import fx, nn

from pyro_sbp.export import count_parameters, export_pruned
from pyro_sbp.guides import SBPGuide
from pyro_sbp.models import SBPModel, build_network, make_prunable, named_gates
from pyro_sbp.models.graph import gate_channels

TORCHVISION = [
    "resnet18",
    "resnet50",
    "vgg11_bn",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "squeezenet1_1",
    "regnet_y_400mf",
]
SIZE = 32


def _randomise(net: nn.Module, seed: int, p_keep: float = 0.5, remove_all: int | None = None):
    """Random BatchNorm statistics and affine parameters, random gate means and masks."""
    g = torch.Generator().manual_seed(seed)
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
    return net


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    return bool((a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max())))


@pytest.fixture(scope="module", params=TORCHVISION)
def torchvision_net(request):
    torch.manual_seed(0)
    plain = getattr(torchvision.models, request.param)(num_classes=10)
    params = count_parameters(plain)
    net = make_prunable(plain, example_input=torch.randn(2, 3, SIZE, SIZE))
    return request.param, net, params


def test_torchvision_families_export_equal_and_smaller(torchvision_net):
    name, net, params = torchvision_net
    _randomise(net, seed=1).eval()
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = net(x)
        pruned = export_pruned(net, (3, SIZE, SIZE))
        out = pruned(x)
    assert out.shape == ref.shape == (3, 10)
    assert _close(out, ref), (name, float((out - ref).abs().max()))
    # Half of every gate's units kept at random: at most 45% of the parameters.
    assert count_parameters(pruned) <= 0.45 * params, name
    for m in pruned.modules():
        assert type(m).__module__.startswith(("torch.", "pyro_sbp.export")), type(m)


def test_torchvision_every_layer_output_but_the_classifier_is_gated(torchvision_net):
    name, net, _ = torchvision_net
    info = net._sbp_graph
    modules = dict(net.named_modules())
    producers = [
        n
        for n in net.graph.nodes
        if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d | nn.Linear)
    ]
    for node in producers:
        units = info.channels[node.name]
        if node.target in info.classifiers:
            assert all(u is None for u in units), node.target
        else:
            assert all(u is not None for u in units), (name, node.target)
    assert info.classifiers
    # The gates are nodes of the graph: printing the network shows where each acts.
    assert "gate_channels(" in net.code


def test_torchvision_no_norm_undoes_a_gate(torchvision_net):
    """Every norm that reads gated channels is followed by a gate node, and nothing else reads
    it, so batch statistics in training cannot normalise a gate's scaling away."""
    _, net, _ = torchvision_net
    modules = dict(net.named_modules())
    info = net._sbp_graph
    for node in net.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        if all(u is None for u in info.channels[node.name]):
            continue
        users = list(node.users)
        assert len(users) == 1 and users[0].target is gate_channels, node.name


def test_resnet18_coupled_channels():
    net = make_prunable(
        torchvision.models.resnet18(num_classes=10), example_input=torch.randn(1, 3, 32, 32)
    )
    layers = net._sbp_graph.layers
    # The stem and every block's second conv of stage 1 add into one residual stream: one gate.
    assert layers["conv1.gate"] == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert layers["layer2.0.conv2.gate"] == [
        "layer2.0.conv2",
        "layer2.0.downsample.0",
        "layer2.1.conv2",
    ]
    assert layers["layer1.0.conv1.gate"] == ["layer1.0.conv1"]
    gates = dict(named_gates(net))
    assert gates["conv1.gate"].num_units == 64
    assert gates["layer4.0.conv2.gate"].num_units == 512


def test_depthwise_and_concatenation_coupling():
    mb = make_prunable(
        torchvision.models.mobilenet_v2(num_classes=10), example_input=torch.randn(1, 3, 32, 32)
    )
    # Expansion conv and its depthwise conv: one unit per channel, one gate.
    assert mb._sbp_graph.layers["features.2.conv.0.0.gate"] == [
        "features.2.conv.0.0",
        "features.2.conv.1.0",
    ]
    sq = make_prunable(
        torchvision.models.squeezenet1_1(num_classes=10), example_input=torch.randn(1, 3, 32, 32)
    )
    info = sq._sbp_graph
    cat = next(n for n in sq.graph.nodes if n.target is torch.cat)
    sites = {u[0] for u in info.channels[cat.name]}
    # A Fire module's concatenation holds the units of its two expand convs, side by side.
    assert sites == {"features.3.expand1x1.gate", "features.3.expand3x3.gate"}


def test_densenet_gate_after_every_norm_that_reads_the_channel():
    net = make_prunable(
        torchvision.models.densenet121(num_classes=10), example_input=torch.randn(1, 3, 32, 32)
    )
    info = net._sbp_graph
    # The growth channels of the first dense layer are read by the norm1 of every later layer of
    # the block (pre-activation): a gate point after each, all from the one gate.
    site = "features.denseblock1.denselayer1.conv2.gate"
    readers = [p.node for p in info.points if any(u is not None and u[0] == site for u in p.units)]
    later = [f"features_denseblock1_denselayer{i}_norm1" for i in range(2, 7)]
    assert set(later) <= set(readers)
    assert "features_transition1_norm" in readers


def test_one_theta_sample_shared_by_every_point():
    net = make_prunable(
        torchvision.models.densenet121(num_classes=10), example_input=torch.randn(1, 3, 32, 32)
    )
    calls = {}

    def count(site):
        def hook(module, inputs, output):
            calls[site] = calls.get(site, 0) + 1

        return hook

    for site, gate in named_gates(net):
        gate.register_forward_hook(count(site))
    net.train()
    net(torch.randn(2, 3, 32, 32))
    assert set(calls.values()) == {1}


class _Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return self.head(x.mean((2, 3)))


class _Transpose(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.conv(x).permute(0, 2, 3, 1).mean((1, 3)))


class _CrossChannelNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


class _Opaque(nn.Module):
    def forward(self, x):
        return x.flip(1)


class _WithOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(4, 4)
        self.fc1 = nn.Linear(4, 8)
        self.odd = _Opaque()
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(self.odd(self.fc1(F.relu(self.fc0(x)))))


@pytest.mark.parametrize(
    "net, x, match",
    [
        (_Shuffle(), torch.randn(1, 3, 8, 8), r"node 'view' \(method \.view\(\)\) reshapes"),
        (_Transpose(), torch.randn(1, 3, 8, 8), r"node 'permute' \(method \.permute\(\)\)"),
        (
            _CrossChannelNorm(),
            torch.randn(2, 4),
            r"node 'norm' \(LayerNorm \('norm'\)\) normalises across",
        ),
        (
            _WithOpaque(),
            torch.randn(2, 4),
            r"node 'flip' \(method \.flip\(\)\) is not an operation",
        ),
    ],
)
def test_structure_export_cannot_follow_fails_loudly(net, x, match):
    with pytest.raises(ValueError, match=match):
        make_prunable(net, example_input=x)


def test_excluding_the_layer_before_an_unsupported_op_prepares():
    net = make_prunable(_WithOpaque(), example_input=torch.randn(2, 4), layers=["fc0"])
    assert [site for site, _ in named_gates(net)] == ["fc0.gate"]
    _randomise(net, 0).eval()
    x = torch.randn(5, 4)
    assert _close(export_pruned(net, (4,))(x), net(x))
    with pytest.raises(ValueError, match="no Linear or Conv2d layer named 'nope'"):
        make_prunable(_WithOpaque(), example_input=torch.randn(2, 4), layers=["nope"])


class _Untraceable(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


class _WithUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = _Untraceable()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.pre(x))))


def test_untraceable_code_and_the_leaf_module_escape_hatch():
    with pytest.raises(ValueError, match=r"torch.fx cannot trace _WithUntraceable .*leaf_modules"):
        make_prunable(_WithUntraceable(), example_input=torch.randn(2, 4))
    net = make_prunable(
        _WithUntraceable(), example_input=torch.randn(2, 4), leaf_modules=[_Untraceable]
    )
    assert [site for site, _ in named_gates(net)] == ["fc1.gate"]
    # A leaf module that meets gated channels is refused by name.
    with pytest.raises(ValueError, match=r"node 'odd' \(_Opaque \('odd'\)\) is not an"):
        make_prunable(_WithOpaque(), example_input=torch.randn(2, 4), leaf_modules=[_Opaque])
    _randomise(net, 0).eval()
    x = torch.randn(5, 4)
    assert _close(export_pruned(net, (4,))(x), net(x))


def test_missing_example_input_and_bad_arguments():
    with pytest.raises(ValueError, match="pass example_input"):
        make_prunable(_WithOpaque())
    with pytest.raises(ValueError, match="input_layers"):
        make_prunable(build_network("resnet-20"), input_layers=["fc"])
    with pytest.raises(ValueError, match="example_input must be a batch"):
        make_prunable(_WithOpaque(), example_input=[1, 2])
    with pytest.raises(ValueError, match="already has gates"):
        make_prunable(make_prunable(build_network("resnet-20")))


class _GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1)
        self.gn = nn.GroupNorm(4, 12)
        self.conv2 = nn.Conv2d(12, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.gn(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_group_norm_groups_are_units():
    net = make_prunable(_GroupNormNet(), example_input=torch.randn(2, 3, 8, 8))
    gates = dict(named_gates(net))
    assert gates["conv1.gate"].num_units == 4  # one unit per group of 3 channels
    assert gates["conv2.gate"].num_units == 6
    _randomise(net, 3).eval()
    x = torch.randn(4, 3, 8, 8)
    pruned = export_pruned(net, (3, 8, 8))
    assert _close(pruned(x), net(x))
    kept = int(gates["conv1.gate"].mask.sum())
    assert pruned.gn.num_groups == max(kept, 1)


class _SqueezeExcite(nn.Module):
    """conv -> SE (channel-wise product with a sigmoid of a bottleneck) -> residual add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 2, 1)
        self.fc2 = nn.Conv2d(2, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        y = self.conv2(x * s) + x
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("remove_all", [None, 0, 1, 2])
def test_squeeze_excitation_and_fully_removed_gates_export(remove_all):
    net = make_prunable(_SqueezeExcite(), example_input=torch.randn(2, 3, 8, 8))
    layers = net._sbp_graph.layers
    # The SE product and the residual add tie conv, fc2 and conv2 into one gate.
    assert layers["conv.gate"] == ["conv", "fc2", "conv2"]
    assert layers["fc1.gate"] == ["fc1"]
    _randomise(net, 4, remove_all=remove_all).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert _close(export_pruned(net, (3, 8, 8))(x), net(x))


def test_efficientnet_stochastic_depth_follows_eval():
    net = make_prunable(
        torchvision.models.efficientnet_b0(num_classes=10), example_input=torch.randn(1, 3, 32, 32)
    )
    from torchvision.ops import stochastic_depth

    assert all(n.target is not stochastic_depth for n in net.graph.nodes)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))


@pytest.mark.parametrize("name", ["resnet-20", "resnet-56", "vgg-like"])
def test_one_svi_step_on_each_built_in(name):
    pyro.clear_param_store()
    torch.manual_seed(0)
    kwargs = {"width_multiplier": 0.25} if name == "vgg-like" else {}
    net = make_prunable(build_network(name, **kwargs))
    model, guide = SBPModel(net, 100, (3, 32, 32)), SBPGuide(net, 100)
    svi = SVI(model, guide, Adam({"lr": 1e-3}), TraceMeanField_ELBO())
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    loss = svi.step(x, y, torch.arange(4))
    assert torch.isfinite(torch.tensor(loss))
    changed = [k for k, v in net.state_dict().items() if not torch.equal(v, before[k])]
    first_conv = next(n for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    assert f"{first_conv}.weight" in changed
    store = pyro.get_param_store()
    assert any(k.endswith(".gate.loc") for k in store.keys())


def test_gate_nodes_are_in_the_graph():
    net = make_prunable(build_network("resnet-20"))
    assert isinstance(net, fx.GraphModule)
    text = net.code
    assert "self.conv1.gate()" in text
    assert text.count("gate_channels(") == len(net._sbp_graph.points)


def test_a_traced_export_is_channels_last_unless_asked_otherwise():
    net = _randomise(make_prunable(build_network("resnet-20")), 5).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        fast = export_pruned(net, (3, 32, 32))
        plain = export_pruned(net, (3, 32, 32), channels_last=False)
        assert _close(fast(x), ref) and _close(plain(x), ref)
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.conv1.weight.is_contiguous() and not hasattr(plain, "channels_last")
