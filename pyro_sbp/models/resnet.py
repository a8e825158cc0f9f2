"""The CIFAR-10 residual networks ResNet-20 and ResNet-56 of He et al. (2016) [1].

Section 4.2 of [1]: a 3x3 convolution with 16 channels, then three stages of ``n`` basic blocks
(two 3x3 convolutions each) with 16, 32 and 64 channels on 32x32, 16x16 and 8x8 feature maps
(the first block of stages 2 and 3 has stride 2), global average pooling and a fully connected
classifier: ``6n + 2`` weighted layers, ``n = 3`` for ResNet-20 and ``n = 9`` for ResNet-56.

Layout (the names follow torchvision's ResNets):

* ``normalize`` -- a :class:`~pyro_sbp.models.nets.Normalize` module (input standardisation),
* ``conv1 -> bn1 -> relu`` -- the stem,
* ``layer1``, ``layer2``, ``layer3`` -- :class:`~torch.nn.Sequential` stages of
  :class:`BasicBlock`,
* ``avgpool`` -- :class:`~torch.nn.AdaptiveAvgPool2d` ``(1)``, followed in ``forward`` by
  ``torch.flatten(x, 1)``,
* ``fc`` -- the output :class:`~torch.nn.Linear` (its outputs are never pruned).

Every layer is a separate standard module (``Conv2d -> BatchNorm2d -> ReLU``, the convolutions
without bias, each ReLU its own :class:`~torch.nn.ReLU`); the only non-standard modules are the
containers :class:`BasicBlock` (whose ``forward`` adds the shortcut, ``out = out + identity``)
and the network itself. The networks are not :class:`~torch.nn.Sequential`, but they can be
traced with :func:`torch.fx.symbolic_trace`.

Shortcuts: where a block changes the shape (stride 2 and more channels), the shortcut is a
projection, a 1x1 convolution with that stride followed by batch norm (option B of [1]);
elsewhere it is the identity. Option A of [1] (the identity with zero-padded extra channels,
which ResNet-20 / ResNet-56 use in the paper, hence its 0.27M / 0.85M parameters) is not used:
its channel padding is a fixed operation (a set number of zero channels at set positions), not
a layer whose channels can be removed, so the channels it feeds cannot be pruned structurally.
Torch-Pruning's CIFAR ResNets [2] also use projection shortcuts. The projections add
``16 * 32 + 2 * 32 + 32 * 64 + 2 * 64 = 2,752`` parameters: ResNet-20 has 272,474 and
ResNet-56 855,770 (for 3 input channels and 10 classes).

The weights are initialised as in torchvision: Kaiming-normal convolutions (``fan_out``, ReLU),
batch norm weights 1 and biases 0, PyTorch's default for the ``Linear``.

Importing this module adds ``"resnet-20"`` and ``"resnet-56"`` to
:data:`~pyro_sbp.models.nets.NETWORKS` and :data:`~pyro_sbp.models.nets.INPUT_SHAPES`
(:mod:`pyro_sbp.models` imports it). Nothing in this module depends on Pyro.

References:

[1] K. He, X. Zhang, S. Ren, J. Sun (2016),
    "Deep Residual Learning for Image Recognition", CVPR (Section 4.2).
[2] G. Fang, X. Ma, M. Song, M. B. Mi, X. Wang (2023),
    "DepGraph: Towards Any Structural Pruning", CVPR.
    Code: https://github.com/VainF/Torch-Pruning (its CIFAR ResNet-20/56,
    ``reproduce/engine/models/cifar/resnet_tiny.py``: 1x1 convolution and batch norm shortcuts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pyro_sbp.models.nets import INPUT_SHAPES, NETWORKS, Normalize, _scale

__all__ = ["RESNET_WIDTHS", "BasicBlock", "ResNet20", "ResNet56"]

#: Channels of the stem and of the three stages of the CIFAR ResNets, before width scaling.
RESNET_WIDTHS: tuple[int, int, int] = (16, 32, 64)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """
    The basic residual block of He et al. (2016):
    ``conv1(3x3, stride) -> bn1 -> relu1 -> conv2(3x3) -> bn2``, plus the shortcut, then
    ``relu2``. The shortcut is ``downsample`` (``Conv2d(1x1, stride, no bias) -> BatchNorm2d``,
    option B) when ``stride != 1`` or the number of channels changes, and the identity
    (``downsample is None``) otherwise.

    :param in_channels: Number of input channels.
    :param out_channels: Number of output channels.
    :param stride: Stride of the first convolution (and of the projection).
    """

    downsample: nn.Sequential | None

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.downsample = None
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        :param x: Input of shape ``(N, in_channels, H, W)``.
        :returns: Output of shape ``(N, out_channels, H', W')``, ``H' = ceil(H / stride)``.
        """
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class _CIFARResNet(nn.Module):
    """
    A CIFAR ResNet of depth ``6n + 2`` with ``n`` = the class's ``num_blocks`` blocks per stage.

    :param num_classes: Number of outputs.
    :param in_channels: Number of image channels.
    :param image_size: Height (= width) of the input images (any size works: the pooling is
        adaptive; it sets ``input_shape``).
    :param width_multiplier: Width scale ``w`` of every layer: 16, 32 and 64 channels times
        ``w``, truncated to an integer (at least 1) as in :class:`~pyro_sbp.models.nets.VGGLike`.
    :param mean: Input mean (scalar or per channel).
    :param std: Input standard deviation (scalar or per channel).
    """

    #: Number of basic blocks per stage (``n``; the depth is ``6n + 2``).
    num_blocks: int = 0
    #: Shape of one input example (without the batch dimension).
    input_shape: tuple[int, ...]

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width_multiplier: float = 1.0,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
    ) -> None:
        super().__init__()
        if not (math.isfinite(width_multiplier) and width_multiplier > 0):
            raise ValueError(
                f"width_multiplier must be positive and finite, got {width_multiplier}"
            )
        for name, value in (
            ("num_classes", num_classes),
            ("in_channels", in_channels),
            ("image_size", image_size),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.num_blocks < 1:
            raise ValueError(f"{type(self).__name__} needs num_blocks >= 1")
        widths = [_scale(c, width_multiplier) for c in RESNET_WIDTHS]

        self.normalize = Normalize(mean, std)
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        channels = widths[0]
        stages = []
        for i, width in enumerate(widths):
            blocks = []
            for j in range(self.num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.0)

        self.input_shape = (in_channels, image_size, image_size)
        self.width_multiplier = float(width_multiplier)

    @property
    def depth(self) -> int:
        """Number of weighted layers on the main path, ``6n + 2`` (projections not counted)."""
        return 6 * self.num_blocks + 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        :param x: Images of shape ``(N, in_channels, H, W)``.
        :returns: Logits of shape ``(N, num_classes)``.
        """
        x = self.normalize(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class ResNet20(_CIFARResNet):
    """
    ResNet-20, the CIFAR-10 network of He et al. (2016) [1] (Section 4.2) with ``n = 3``
    basic blocks per stage, and projection shortcuts (option B) where the shape changes:
    272,474 parameters (the paper's 0.27M with option A, plus 2,752 for the projections).

    The constructor's parameters are :class:`_CIFARResNet`'s.
    """

    num_blocks = 3


class ResNet56(_CIFARResNet):
    """
    ResNet-56, the CIFAR-10 network of He et al. (2016) [1] (Section 4.2) with ``n = 9``
    basic blocks per stage, and projection shortcuts (option B) where the shape changes:
    855,770 parameters (the paper's 0.85M with option A, plus 2,752 for the projections).

    The constructor's parameters are :class:`_CIFARResNet`'s.
    """

    num_blocks = 9


# Registered here rather than in the registry's literal in nets.py, so that nets.py keeps
# importing nothing from this package (and no import cycle arises).
NETWORKS.update({"resnet-20": ResNet20, "resnet-56": ResNet56})
INPUT_SHAPES.update({"resnet-20": (3, 32, 32), "resnet-56": (3, 32, 32)})
