"""Tests of the plain PyTorch networks of :mod:`pyro_sbp.models.nets`."""

from __future__ import annotations

import ast
import copy
import inspect
import math

import pytest
import torch
from torch import nn

from pyro_sbp.models import nets
from pyro_sbp.models.nets import (
    BMRSMLP,
    INPUT_SHAPES,
    NETWORKS,
    VGG16_CONFIG,
    BMRSLeNet5,
    DigitsNet,
    LeNet5Caffe,
    LeNet300100,
    LeNet500300,
    Normalize,
    VGGLike,
    build_network,
)

# Small VGG-like for fast tests (the full one is exercised once with a tiny width).
SMALL_VGG = {"config": (8, "M", 16, "M"), "width_multiplier": 1.0}


# The nn.Sequential networks: all but the ResNets (pyro_sbp.models.resnet), whose layout is
# tested in test_resnet.py.
SEQUENTIAL = sorted(
    n for n, f in NETWORKS.items() if isinstance(f, type) and issubclass(f, nn.Sequential)
)


def _kwargs(name: str) -> dict:
    return dict(SMALL_VGG) if name == "vgg-like" else {}


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linear_and_conv(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_output_shape(name: str) -> None:
    torch.manual_seed(0)
    net = build_network(name, **_kwargs(name))
    assert net.input_shape == INPUT_SHAPES[name]
    x = torch.randn(2, *INPUT_SHAPES[name])
    out = net(x)
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_num_classes(name: str) -> None:
    net = build_network(name, num_classes=7, **_kwargs(name))
    out = net(torch.randn(2, *INPUT_SHAPES[name]))
    assert out.shape == (2, 7)
    last = net.classifier[-1] if isinstance(net, nn.Sequential) else net.fc
    assert isinstance(last, nn.Linear) and last.out_features == 7


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_structure(name: str) -> None:
    """The layout the gate-insertion and pruning tools rely on."""
    net = build_network(name, **_kwargs(name))
    assert isinstance(net, nn.Sequential)
    names = [n for n, _ in net.named_children()]
    assert names[0] == "normalize" and isinstance(net.normalize, Normalize)
    assert names[-1] == "classifier" and isinstance(net.classifier, nn.Sequential)
    assert isinstance(net.classifier[0], nn.Flatten)
    assert isinstance(net.classifier[-1], nn.Linear)
    has_conv = any(isinstance(m, nn.Conv2d) for m in net.modules())
    assert names == (
        ["normalize", "features", "classifier"] if has_conv else ["normalize", "classifier"]
    )
    if has_conv:
        assert all(not isinstance(m, nn.Linear) for m in net.features)
        assert all(not isinstance(m, nn.Conv2d) for m in net.classifier)
    # Only flat containers of leaf layers: every non-container module is a direct child of
    # features / classifier.
    for part in [c for n, c in net.named_children() if n != "normalize"]:
        for layer in part:
            assert len(list(layer.children())) == 0
    # Dimensions chain: in features of each Linear/Conv2d = out features of the previous one
    # (times the spatial size after flattening).
    prev = None
    for layer in _linear_and_conv(net):
        if prev is not None:
            n_out = prev.out_channels if isinstance(prev, nn.Conv2d) else prev.out_features
            n_in = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
            assert n_in % n_out == 0
        prev = layer


def test_mlp_structure() -> None:
    net = LeNet300100()
    kinds = [type(m) for m in net.classifier]
    assert kinds == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [m.out_features for m in _linear_and_conv(net)] == [300, 100, 10]
    assert net.classifier[1].in_features == 784
    assert [m.out_features for m in _linear_and_conv(LeNet500300())] == [500, 300, 10]
    assert [m.out_features for m in _linear_and_conv(DigitsNet())] == [100, 50, 10]
    assert DigitsNet().classifier[1].in_features == 64


def test_lenet5_caffe_structure() -> None:
    net = LeNet5Caffe()
    kinds = [type(m) for m in net.features]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    assert net.features[0].out_channels == 20 and net.features[3].out_channels == 50
    assert net.features[0].kernel_size == (5, 5)
    assert net.classifier[1].in_features == 800 and net.classifier[1].out_features == 500
    # 'SAME' padding as in the SBP TensorFlow code: 50 * 7 * 7 inputs to the dense layer.
    same = LeNet5Caffe(padding=2)
    assert same.classifier[1].in_features == 2450
    assert same(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_bmrs_lenet5_structure() -> None:
    net = BMRSLeNet5()
    assert [type(m) for m in net.features] == [
        nn.Conv2d,
        nn.ReLU,
        nn.MaxPool2d,
        nn.Conv2d,
        nn.ReLU,
        nn.MaxPool2d,
    ]
    widths = [getattr(m, "out_channels", None) or m.out_features for m in _linear_and_conv(net)]
    assert widths == [6, 16, 120, 84, 10]
    assert net.classifier[1].in_features == 400
    # The BMRS code scales the hidden widths by the number of input channels.
    rgb = BMRSLeNet5(in_channels=3)
    widths = [getattr(m, "out_channels", None) or m.out_features for m in _linear_and_conv(rgb)]
    assert widths == [18, 48, 360, 252, 10]
    assert rgb.classifier[1].in_features == 1200
    assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    plain = BMRSLeNet5(in_channels=3, scale_width_with_channels=False)
    widths = [getattr(m, "out_channels", None) or m.out_features for m in _linear_and_conv(plain)]
    assert widths == [6, 16, 120, 84, 10]


def test_bmrs_mlp_structure() -> None:
    net = BMRSMLP()
    linears = _linear_and_conv(net)
    assert net.classifier[1].in_features == 1024
    assert [m.out_features for m in linears] == [50] * 6 + [10]
    assert sum(isinstance(m, nn.Tanh) for m in net.classifier) == 6
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())
    custom = BMRSMLP(in_features=784, hidden_dim=20, num_hidden_layers=2)
    assert custom.input_shape == (784,)
    assert [m.out_features for m in _linear_and_conv(custom)] == [20, 20, 10]
    assert custom(torch.randn(2, 784)).shape == (2, 10)
    assert BMRSMLP(in_channels=3).classifier[1].in_features == 3072


def test_param_count_lenet_300_100() -> None:
    expected = (784 * 300 + 300) + (300 * 100 + 100) + (100 * 10 + 10)
    assert expected == 266_610
    assert _num_params(LeNet300100()) == expected


def test_param_count_lenet5_caffe() -> None:
    expected = (20 * 1 * 5 * 5 + 20) + (50 * 20 * 5 * 5 + 50) + (800 * 500 + 500) + (500 * 10 + 10)
    assert expected == 431_080
    assert _num_params(LeNet5Caffe()) == expected


def test_param_count_bmrs_lenet5() -> None:
    expected = (
        (6 * 1 * 5 * 5 + 6)
        + (16 * 6 * 5 * 5 + 16)
        + (400 * 120 + 120)
        + (120 * 84 + 84)
        + (84 * 10 + 10)
    )
    assert expected == 61_706
    assert _num_params(BMRSLeNet5()) == expected


def test_normalize_has_no_parameters() -> None:
    norm = Normalize([0.1, 0.2, 0.3], [1.0, 2.0, 4.0])
    assert list(norm.parameters()) == []
    assert set(norm.state_dict()) == {"mean", "std"}


def test_vgg_like_default_config() -> None:
    net = VGGLike(width_multiplier=1 / 64)
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    expected = [max(1, c // 64) for c in VGG16_CONFIG if c != "M"]
    assert [c.out_channels for c in convs] == expected == [1, 1, 2, 2, 4, 4, 4] + [8] * 6
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.features) == 5
    # Conv2d -> BatchNorm2d -> ReLU blocks.
    layers = list(net.features)
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Conv2d):
            assert isinstance(layers[i + 1], nn.BatchNorm2d)
            assert layers[i + 1].num_features == layer.out_channels
            assert isinstance(layers[i + 2], nn.ReLU)
    kinds = [type(m) for m in net.classifier]
    assert kinds == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert net.classifier[1].in_features == 8  # 8 channels x 1 x 1 after 5 poolings
    assert net.classifier[1].out_features == 8  # 512 / 64
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_like_width_multiplier() -> None:
    config = (64, "M", 128, "M")
    full = VGGLike(config=config)
    half = VGGLike(config=config, width_multiplier=0.5)
    for net, w in [(full, 1.0), (half, 0.5)]:
        convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == [int(64 * w), int(128 * w)]
        bns = [m for m in net.features if isinstance(m, nn.BatchNorm2d)]
        assert [b.num_features for b in bns] == [int(64 * w), int(128 * w)]
        assert net.classifier[1].in_features == int(128 * w) * 8 * 8
        assert net.classifier[1].out_features == int(512 * w)
        assert net.classifier[2].num_features == int(512 * w)
        assert net.classifier[-1].out_features == 10
    # Truncation as in the SBP code, but never below one unit.
    tiny = VGGLike(config=(64, "M"), width_multiplier=0.001)
    assert tiny.features[0].out_channels == 1
    assert tiny.classifier[1].out_features == 1
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert VGGLike(config=(10,), width_multiplier=0.3).features[0].out_channels == 3


def test_vgg_like_bad_arguments() -> None:
    with pytest.raises(ValueError, match="width_multiplier"):
        VGGLike(width_multiplier=0.0)
    with pytest.raises(ValueError, match="config"):
        VGGLike(config=(8, "X"))
    with pytest.raises(ValueError, match="too small"):
        VGGLike(image_size=16)


def test_normalize_identity_by_default() -> None:
    norm = Normalize()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(norm(x), x)


def test_normalize_per_channel_images() -> None:
    mean = [0.5, -1.0, 2.0]
    std = [0.25, 2.0, 4.0]
    norm = Normalize(mean, std)
    x = torch.randn(2, 3, 5, 6)
    expected = torch.empty_like(x)
    for c in range(3):
        expected[:, c] = (x[:, c] - mean[c]) / std[c]
    torch.testing.assert_close(norm(x), expected)
    # (N, C) and (N, C, L) inputs.
    x2 = torch.randn(4, 3)
    torch.testing.assert_close(norm(x2), (x2 - torch.tensor(mean)) / torch.tensor(std))
    x3 = torch.randn(2, 3, 7)
    torch.testing.assert_close(norm(x3), _expected_3d(x3, mean, std))


def _expected_3d(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    return (x - torch.tensor(mean)[:, None]) / torch.tensor(std)[:, None]


def test_normalize_flat_channel_major() -> None:
    mean = [0.5, -1.0, 2.0]
    std = [0.25, 2.0, 4.0]
    norm = Normalize(mean, std)
    images = torch.randn(2, 3, 4, 4)
    flat = images.flatten(1)
    torch.testing.assert_close(norm(flat), norm(images).flatten(1))


def test_normalize_scalar_and_broadcast() -> None:
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(Normalize(0.5, 2.0)(x), (x - 0.5) / 2.0)
    torch.testing.assert_close(Normalize(0.5, 2.0)(x.flatten(1)), ((x - 0.5) / 2.0).flatten(1))
    # A scalar std with a per-channel mean is broadcast to every channel.
    norm = Normalize([0.0, 1.0], 2.0)
    assert norm.std.tolist() == [2.0, 2.0]
    y = torch.randn(2, 2, 3, 3)
    torch.testing.assert_close(norm(y)[:, 1], (y[:, 1] - 1.0) / 2.0)


def test_normalize_follows_dtype_and_state_dict() -> None:
    norm = Normalize([1.0, 2.0], [2.0, 4.0]).double()
    x = torch.randn(2, 2, 3, dtype=torch.float64)
    assert norm(x).dtype == torch.float64
    other = Normalize([0.0, 0.0], [1.0, 1.0])
    other.load_state_dict(Normalize([1.0, 2.0], [2.0, 4.0]).state_dict())
    assert other.mean.tolist() == [1.0, 2.0] and other.std.tolist() == [2.0, 4.0]


def test_normalize_errors() -> None:
    with pytest.raises(ValueError, match="positive"):
        Normalize(0.0, [1.0, 0.0])
    with pytest.raises(ValueError, match="same length"):
        Normalize([0.0, 1.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="1-D"):
        Normalize([[0.0]], 1.0)
    with pytest.raises(ValueError, match="does not match"):
        Normalize([0.0, 1.0, 2.0])(torch.randn(2, 4, 5, 5))


def test_network_normalisation_is_applied() -> None:
    torch.manual_seed(0)
    net = LeNet5Caffe(mean=0.1307, std=0.3081)
    plain = LeNet5Caffe()
    plain.load_state_dict(net.state_dict())  # also copies the mean / std buffers
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(plain(x), net(x))
    reference = LeNet5Caffe()
    reference.load_state_dict(
        {k: v for k, v in net.state_dict().items() if not k.startswith("normalize.")},
        strict=False,
    )
    torch.testing.assert_close(net(x), reference((x - 0.1307) / 0.3081))
    rgb = VGGLike(config=(4, "M"), mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    assert rgb.normalize.num_channels == 3


def test_in_features_override_and_flat_inputs() -> None:
    net = LeNet300100()
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(net(x), net(x.flatten(1)))  # flat inputs work too
    flat = LeNet300100(in_features=100)
    assert flat.input_shape == (100,)
    assert flat(torch.randn(2, 100)).shape == (2, 10)
    assert DigitsNet(in_features=64).input_shape == (64,)


def test_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="unknown network 'resnet'") as info:
        build_network("resnet")
    for name in NETWORKS:
        assert name in str(info.value)


def test_registry() -> None:
    assert set(NETWORKS) == {
        "lenet-300-100",
        "lenet-500-300",
        "lenet5-caffe",
        "bmrs-lenet5",
        "bmrs-mlp",
        "vgg-like",
        "digits-mlp",
        "resnet-20",
        "resnet-56",
    }
    assert set(SEQUENTIAL) == set(NETWORKS) - {"resnet-20", "resnet-56"}
    assert set(INPUT_SHAPES) == set(NETWORKS)
    for name, factory in NETWORKS.items():
        assert callable(factory)
        assert factory.__doc__
        assert math.prod(INPUT_SHAPES[name]) > 0
    assert isinstance(build_network("lenet5-caffe", num_classes=3), LeNet5Caffe)


def test_all_exports_exist() -> None:
    for name in nets.__all__:
        assert hasattr(nets, name)


def test_pure_torch() -> None:
    """nets.py imports nothing but the standard library and torch."""
    tree = ast.parse(inspect.getsource(nets))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0  # no relative imports into the rest of the package
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "collections", "torch"}
    assert "pyro" not in roots


@pytest.mark.parametrize("name", SEQUENTIAL)
def test_only_standard_modules(name: str) -> None:
    net = build_network(name, **_kwargs(name))
    for module in net.modules():
        if module is net or isinstance(module, Normalize):
            continue
        assert type(module).__module__.startswith("torch.nn."), type(module)


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_backward_and_deepcopy(name: str) -> None:
    net = build_network(name, **_kwargs(name))
    x = torch.randn(2, *INPUT_SHAPES[name])
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    clone = copy.deepcopy(net)
    assert clone.input_shape == net.input_shape
    net.eval()
    clone.eval()
    torch.testing.assert_close(clone(x), net(x))
