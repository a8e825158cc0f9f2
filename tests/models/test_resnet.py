"""Tests of the CIFAR ResNets of :mod:`pyro_sbp.models.resnet`."""

from __future__ import annotations

import ast
import copy
import inspect
import math

import pytest
import torch
import torch.fx
from torch import nn

from pyro_sbp import models
from pyro_sbp.models import resnet
from pyro_sbp.models.nets import INPUT_SHAPES, NETWORKS, Normalize, _standardize, build_network
from pyro_sbp.models.resnet import BasicBlock, ResNet20, ResNet56

RESNETS = [(ResNet20, 3), (ResNet56, 9)]  # (class, blocks per stage n)


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _convs(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def _expected_params(
    n: int, widths: tuple[int, int, int] = (16, 32, 64), in_channels: int = 3, classes: int = 10
) -> tuple[int, int]:
    """(parameters, of which in the projection shortcuts) of a CIFAR ResNet with option-B
    shortcuts, from the architecture: 3x3 convolutions without bias, batch norms with a weight
    and a bias per channel, 1x1 projections where the shape changes, a Linear with bias."""

    def conv_bn(c_in: int, c_out: int, k: int) -> int:
        return c_in * c_out * k * k + 2 * c_out

    total = conv_bn(in_channels, widths[0], 3)  # stem
    projections = 0
    channels = widths[0]
    for stage, width in enumerate(widths):
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            total += conv_bn(channels, width, 3) + conv_bn(width, width, 3)
            if stride != 1 or channels != width:
                projections += conv_bn(channels, width, 1)
            channels = width
    total += projections + channels * classes + classes
    return total, projections


def test_param_count_resnet20_by_hand() -> None:
    stem = 3 * 16 * 9 + 2 * 16
    stage1 = 3 * 2 * (16 * 16 * 9 + 2 * 16)
    stage2 = (16 * 32 * 9 + 2 * 32) + (32 * 32 * 9 + 2 * 32) + 2 * 2 * (32 * 32 * 9 + 2 * 32)
    stage3 = (32 * 64 * 9 + 2 * 64) + (64 * 64 * 9 + 2 * 64) + 2 * 2 * (64 * 64 * 9 + 2 * 64)
    projections = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    fc = 64 * 10 + 10
    expected = stem + stage1 + stage2 + stage3 + projections + fc
    assert projections == 2_752
    assert expected == 272_474
    assert _expected_params(3) == (expected, projections)
    net = ResNet20()
    assert _num_params(net) == expected
    downsample = [m.downsample for m in net.modules() if isinstance(m, BasicBlock)]
    assert sum(_num_params(d) for d in downsample if d is not None) == projections


def test_param_count_resnet56() -> None:
    expected, projections = _expected_params(9)
    assert expected == 855_770 and projections == 2_752
    assert _num_params(ResNet56()) == expected


@pytest.mark.parametrize(("cls", "paper_millions"), [(ResNet20, 0.27), (ResNet56, 0.85)])
def test_param_count_matches_the_paper(cls: type[nn.Module], paper_millions: float) -> None:
    """He et al. (2016), Table 6: 0.27M / 0.85M parameters with option-A shortcuts (no
    parameters); the projections are all the difference."""
    net = cls()
    projections = sum(
        _num_params(m.downsample)
        for m in net.modules()
        if isinstance(m, BasicBlock) and m.downsample is not None
    )
    count = _num_params(net)
    assert round((count - projections) / 1e6, 2) == paper_millions
    assert abs(count - paper_millions * 1e6) <= 0.005e6 + projections


@pytest.mark.parametrize(("cls", "n"), RESNETS)
def test_depth(cls: type[nn.Module], n: int) -> None:
    net = cls()
    assert net.num_blocks == n and net.depth == 6 * n + 2
    convs = _convs(net)
    main = [c for c in convs if c.kernel_size == (3, 3)]
    projections = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(main) == 6 * n + 1  # the stem and two per block
    assert len(projections) == 2  # first block of stages 2 and 3
    assert len(convs) == 6 * n + 1 + 2
    assert sum(isinstance(m, nn.Linear) for m in net.modules()) == 1
    assert len(main) + 1 == net.depth
    for stage, width in zip((net.layer1, net.layer2, net.layer3), (16, 32, 64), strict=True):
        assert isinstance(stage, nn.Sequential) and len(stage) == n
        assert all(isinstance(b, BasicBlock) for b in stage)
        assert all(b.conv2.out_channels == width for b in stage)
    assert net.layer1[0].downsample is None
    for stage in (net.layer2, net.layer3):
        first = stage[0]
        assert first.conv1.stride == (2, 2) and first.downsample[0].stride == (2, 2)
        assert all(b.downsample is None and b.conv1.stride == (1, 1) for b in stage[1:])


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("image_size", [28, 32])
def test_output_shape(in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    net = ResNet20(in_channels=in_channels, image_size=image_size)
    assert net.input_shape == (in_channels, image_size, image_size)
    assert net.conv1.in_channels == in_channels
    sizes = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(net, name).register_forward_hook(
            lambda _m, _i, out, name=name: sizes.__setitem__(name, tuple(out.shape[1:]))
        )
    x = torch.randn(2, in_channels, image_size, image_size)
    out = net(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    half, quarter = (image_size + 1) // 2, (image_size + 3) // 4
    assert sizes == {
        "layer1": (16, image_size, image_size),
        "layer2": (32, half, half),
        "layer3": (64, quarter, quarter),
    }
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 10)


def test_resnet56_output_shape_and_backward() -> None:
    torch.manual_seed(0)
    net = ResNet56(num_classes=7)
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    assert out.shape == (2, 7) and net.fc.out_features == 7
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize(("cls", "n"), RESNETS)
def test_fx_traceable(cls: type[nn.Module], n: int) -> None:
    torch.manual_seed(0)
    net = cls().eval()
    traced = torch.fx.symbolic_trace(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x))
    nodes = list(traced.graph.nodes)
    # One residual add per block, one flatten, and every layer called as a module.
    adds = [nd for nd in nodes if nd.op == "call_function" and "add" in str(nd.target)]
    assert len(adds) == 3 * n
    assert sum(nd.op == "call_function" and nd.target is torch.flatten for nd in nodes) == 1
    called = {nd.target for nd in nodes if nd.op == "call_module"}
    leaves = {name for name, m in net.named_modules() if name and not list(m.children())}
    # Normalize is not an fx leaf: it is recorded as one call of its (untraceable) body.
    assert called == leaves - {"normalize"}
    assert sum(nd.op == "call_function" and nd.target is _standardize for nd in nodes) == 1
    # A ReLU module after every BatchNorm but the second of each block (relu after the add).
    assert sum(isinstance(m, nn.ReLU) for m in net.modules()) == 1 + 2 * 3 * n


@pytest.mark.parametrize("in_channels", [1, 3])
def test_fx_traceable_with_per_channel_normalisation(in_channels: int) -> None:
    torch.manual_seed(0)
    mean, std = [0.5, 0.4, 0.3][:in_channels], [0.2, 0.25, 0.3][:in_channels]
    net = ResNet20(in_channels=in_channels, image_size=28, mean=mean, std=std).eval()
    traced = torch.fx.symbolic_trace(net)
    x = torch.rand(2, in_channels, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x))
    if in_channels > 1:  # the traced network still checks its input's channels at run time
        with pytest.raises(ValueError, match="does not match"):
            traced(torch.rand(1, in_channels + 1, 28, 28))


def test_build_network() -> None:
    assert NETWORKS["resnet-20"] is ResNet20 and NETWORKS["resnet-56"] is ResNet56
    assert INPUT_SHAPES["resnet-20"] == INPUT_SHAPES["resnet-56"] == (3, 32, 32)
    net = build_network("resnet-20", in_channels=1)
    assert isinstance(net, ResNet20)
    assert net.input_shape == (1, 32, 32) and net.conv1.in_channels == 1
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert isinstance(build_network("resnet-56", num_classes=3), ResNet56)
    assert build_network("resnet-20").input_shape == INPUT_SHAPES["resnet-20"]
    assert models.ResNet20 is ResNet20 and models.ResNet56 is ResNet56


@pytest.mark.parametrize("bad", [0.0, -0.5, math.nan, math.inf])
def test_bad_width_multiplier(bad: float) -> None:
    with pytest.raises(ValueError, match="width_multiplier must be positive"):
        ResNet20(width_multiplier=bad)
    with pytest.raises(ValueError, match="width_multiplier"):
        build_network("resnet-56", width_multiplier=bad)


@pytest.mark.parametrize("argument", ["num_classes", "in_channels", "image_size"])
def test_bad_sizes(argument: str) -> None:
    with pytest.raises(ValueError, match=f"{argument} must be positive"):
        ResNet20(**{argument: 0})


def test_width_multiplier() -> None:
    half = ResNet20(width_multiplier=0.5)
    assert half.conv1.out_channels == 8
    stages = (half.layer1, half.layer2, half.layer3)
    assert [s[-1].conv2.out_channels for s in stages] == [8, 16, 32]
    assert half.fc.in_features == 32
    assert _num_params(half) == _expected_params(3, widths=(8, 16, 32))[0]
    assert half.width_multiplier == 0.5
    # Truncation as in _scale of nets.py, never below one channel.
    tiny = ResNet20(width_multiplier=0.01)
    convs = (tiny.conv1, tiny.layer2[0].conv1, tiny.layer3[0].conv1)
    assert [c.out_channels for c in convs] == [1, 1, 1]
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    odd = ResNet20(width_multiplier=0.3)  # 4, 9, 19 channels
    widths = [odd.conv1.out_channels, odd.layer2[0].conv2.out_channels, odd.fc.in_features]
    assert widths == [4, 9, 19]
    assert _num_params(odd) == _expected_params(3, widths=(4, 9, 19))[0]


def test_layout_and_standard_layers() -> None:
    net = ResNet20()
    names = [n for n, _ in net.named_children()]
    stem = ["normalize", "conv1", "bn1", "relu"]
    assert names == [*stem, "layer1", "layer2", "layer3", "avgpool", "fc"]
    assert isinstance(net.normalize, Normalize)
    assert isinstance(net.avgpool, nn.AdaptiveAvgPool2d) and net.avgpool.output_size == 1
    assert isinstance(net.fc, nn.Linear) and net.fc.in_features == 64
    for module in net.modules():
        if list(module.children()):
            # Containers: the network, the stages and shortcuts, the blocks.
            assert module is net or isinstance(module, nn.Sequential | BasicBlock)
        else:
            assert isinstance(module, Normalize) or type(module).__module__.startswith(
                "torch.nn."
            ), type(module)
    # Conv2d -> BatchNorm2d (-> ReLU), no bias before a norm.
    for conv in _convs(net):
        assert conv.bias is None
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    for block in blocks:
        assert block.bn1.num_features == block.conv1.out_channels
        assert block.bn2.num_features == block.conv2.out_channels
        assert isinstance(block.relu1, nn.ReLU) and isinstance(block.relu2, nn.ReLU)
        assert block.relu1 is not block.relu2
        if block.downsample is not None:
            conv, bn = block.downsample
            assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
            assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels


def test_block_adds_the_shortcut() -> None:
    torch.manual_seed(0)
    for block, x in [
        (BasicBlock(8, 8), torch.randn(2, 8, 6, 6)),
        (BasicBlock(4, 8, stride=2), torch.randn(2, 4, 6, 6)),
    ]:
        block.eval()
        with torch.no_grad():
            for m in block.modules():  # non-trivial norms, so that a misplaced one would show
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
            out = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
            identity = x if block.downsample is None else block.downsample(x)
            torch.testing.assert_close(block(x), torch.relu(out + identity))
    assert BasicBlock(8, 8).downsample is None
    assert BasicBlock(8, 8, stride=2).downsample is not None
    assert BasicBlock(4, 8).downsample is not None


def test_initialisation() -> None:
    torch.manual_seed(0)
    net = ResNet56()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / (out_channels * k * k)).
    weights = torch.cat([b.conv2.weight.flatten() for b in net.layer3])  # 9 x 36,864 weights
    expected = math.sqrt(2.0 / (64 * 9))
    assert abs(weights.std().item() / expected - 1) < 0.02
    assert abs(weights.mean().item()) < 0.02 * expected
    stem = net.conv1.weight
    assert abs(stem.std().item() / math.sqrt(2.0 / (16 * 9)) - 1) < 0.2


def test_normalisation_is_applied() -> None:
    torch.manual_seed(0)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    net = ResNet20(mean=mean, std=std).eval()
    plain = ResNet20().eval()
    plain.load_state_dict(
        {k: v for k, v in net.state_dict().items() if not k.startswith("normalize.")},
        strict=False,
    )
    x = torch.rand(2, 3, 32, 32)
    standardised = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        torch.testing.assert_close(net(x), plain(standardised))
    assert net.normalize.num_channels == 3


def test_state_dict_and_deepcopy() -> None:
    torch.manual_seed(0)
    net = ResNet20()
    net(torch.randn(4, 3, 32, 32))  # update the running statistics
    other = ResNet20()
    other.load_state_dict(net.state_dict())
    clone = copy.deepcopy(net)
    assert clone.input_shape == net.input_shape
    x = torch.randn(2, 3, 32, 32)
    for m in (net, other, clone):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), net(x))
        torch.testing.assert_close(clone(x), net(x))


def test_pure_torch() -> None:
    """resnet.py imports the standard library, torch and nets.py (no Pyro)."""
    tree = ast.parse(inspect.getsource(resnet))
    roots, package = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0
            roots.add(node.module.split(".")[0])
            if node.module.startswith("pyro_sbp"):
                package.add(node.module)
    assert roots <= {"__future__", "collections", "math", "torch", "pyro_sbp"}
    assert package == {"pyro_sbp.models.nets"}
    assert "pyro" not in roots


def test_all_exports_exist() -> None:
    for name in resnet.__all__:
        assert hasattr(resnet, name)
    assert ResNet20.__doc__ and ResNet56.__doc__
