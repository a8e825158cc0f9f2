"""Plain PyTorch networks that gates are put on.

Every network here is an :class:`torch.nn.Sequential` with up to three named children:

* ``normalize`` -- a :class:`Normalize` module (per-channel input standardisation),
* ``features`` -- an :class:`~torch.nn.Sequential` of the convolutional part (absent for MLPs),
* ``classifier`` -- an :class:`~torch.nn.Sequential` of the fully connected part whose first
  layer is an explicit :class:`~torch.nn.Flatten` and whose last layer is the output
  :class:`~torch.nn.Linear` (its outputs are never pruned).

Every layer is a separate standard module and ``forward`` is the one of
:class:`~torch.nn.Sequential`, so an automatic tool can insert a gate right after a chosen
:class:`~torch.nn.Linear` / :class:`~torch.nn.Conv2d` (on dim 1, before any batch norm and
nonlinearity) and can trace ``Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d -> Conv2d``,
``Conv2d -> Flatten -> Linear`` and ``Linear -> Linear`` chains to remove units.

The exceptions are the CIFAR residual networks ResNet-20 and ResNet-56 of He et al. (2016) [6]
(``"resnet-20"``, ``"resnet-56"``), which live in :mod:`pyro_sbp.models.resnet`: their blocks add
a shortcut in a custom ``forward``, so they are not :class:`~torch.nn.Sequential`, but every layer
is still a separate standard module and they can be traced with :func:`torch.fx.symbolic_trace`.
That module adds them to :data:`NETWORKS` and :data:`INPUT_SHAPES` when it is imported (which
:mod:`pyro_sbp.models` does), so that this module imports nothing from the package.

Nothing in this module depends on Pyro.

References:

[1] Y. LeCun, L. Bottou, Y. Bengio, P. Haffner (1998),
    "Gradient-based learning applied to document recognition".
[2] K. Neklyudov, D. Molchanov, A. Ashukha, D. Vetrov (2017),
    "Structured Bayesian Pruning via Log-Normal Multiplicative Noise", NeurIPS.
    Code: https://github.com/necludov/group-sparsity-sbp
[3] D. Wright, C. Igel, R. Selvan (2024),
    "BMRS: Bayesian Model Reduction for Structured Pruning", NeurIPS.
    Code: https://github.com/saintslab/bmrs-structured-pruning
[4] K. Simonyan, A. Zisserman (2015),
    "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR.
[5] S. Zagoruyko (2015), "92.45% on CIFAR-10 in Torch" (the "VGG-like" CIFAR-10 network).
[6] K. He, X. Zhang, S. Ren, J. Sun (2016),
    "Deep Residual Learning for Image Recognition", CVPR.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.fx
from torch import nn

__all__ = [
    "BMRSMLP",
    "INPUT_SHAPES",
    "NETWORKS",
    "VGG16_CONFIG",
    "BMRSLeNet5",
    "DigitsNet",
    "LeNet5Caffe",
    "LeNet300100",
    "LeNet500300",
    "Normalize",
    "VGGLike",
    "build_network",
]

#: VGG-16 convolutional configuration: integers are output channels of a 3x3 convolution
#: (followed by batch norm and ReLU), ``"M"`` is a 2x2 max pooling.
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, "M",
    512, 512, 512, "M",
    512, 512, 512, "M",
)  # fmt: skip


def _as_1d_tensor(value: float | Sequence[float] | torch.Tensor, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.get_default_dtype()).detach().clone()
    if tensor.dim() > 1:
        raise ValueError(
            f"{name} must be a scalar or a 1-D sequence, got shape {tuple(tensor.shape)}"
        )
    tensor = tensor.reshape(-1)
    if tensor.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    return tensor


def _standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    # Normalize.forward's work. A free function that torch.fx.symbolic_trace records as one call
    # (see torch.fx.wrap below) instead of tracing into it: its branches on the input's shape
    # cannot be traced, and a network with a Normalize stays traceable.
    channels = mean.numel()
    if channels == 1:
        return (x - mean) / std
    if x.dim() < 2:
        raise ValueError(f"expected an input of shape (N, C, ...), got {tuple(x.shape)}")
    if x.shape[1] == channels:
        shape = (1, channels) + (1,) * (x.dim() - 2)
        return (x - mean.view(shape)) / std.view(shape)
    if x.dim() == 2 and x.shape[1] % channels == 0:
        y = x.reshape(x.shape[0], channels, -1)
        y = (y - mean.view(1, channels, 1)) / std.view(1, channels, 1)
        return y.reshape(x.shape)
    raise ValueError(
        f"input of shape {tuple(x.shape)} does not match {channels} normalisation channels"
    )


torch.fx.wrap("_standardize")


class Normalize(nn.Module):
    r"""
    Per-channel input standardisation :math:`y = (x - \mathrm{mean}) / \mathrm{std}`.

    ``mean`` and ``std`` are stored as buffers (so they follow ``.to(device)`` and are saved in
    the ``state_dict`` but are not trained). They are either scalars (applied to every element)
    or have one entry per channel, the channel axis being dim 1 of an input of shape
    ``(N, C, ...)``. A flat input of shape ``(N, C * D)`` whose second dimension is a multiple
    of ``C`` is treated as channel-major flattened images, i.e. as ``(N, C, D)``.

    The defaults (mean 0, std 1) make the module the identity.

    :param mean: Scalar or per-channel mean.
    :param std: Scalar or per-channel standard deviation; must be positive.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        mean: float | Sequence[float] | torch.Tensor = 0.0,
        std: float | Sequence[float] | torch.Tensor = 1.0,
    ) -> None:
        super().__init__()
        mean_t = _as_1d_tensor(mean, "mean")
        std_t = _as_1d_tensor(std, "std")
        if mean_t.numel() != std_t.numel():
            if mean_t.numel() == 1:
                mean_t = mean_t.expand_as(std_t).clone()
            elif std_t.numel() == 1:
                std_t = std_t.expand_as(mean_t).clone()
            else:
                raise ValueError(
                    f"mean and std must have the same length, got {mean_t.numel()} "
                    f"and {std_t.numel()}"
                )
        if not bool((std_t > 0).all()):
            raise ValueError("std must be positive")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    @property
    def num_channels(self) -> int:
        """Number of channels (1 for scalar statistics)."""
        return self.mean.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        :param x: Input of shape ``(N, C, ...)`` or a flat ``(N, C * D)``.
        :returns: The standardised input, same shape as ``x``.
        """
        return _standardize(x, self.mean, self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


def _conv_out(size: int, kernel_size: int, padding: int = 0, stride: int = 1) -> int:
    return (size + 2 * padding - kernel_size) // stride + 1


def _resolve_flat_input(
    in_channels: int, image_size: int, in_features: int | None
) -> tuple[int, tuple[int, ...]]:
    if in_features is None:
        return in_channels * image_size * image_size, (in_channels, image_size, image_size)
    return in_features, (in_features,)


def _mlp_classifier(
    in_features: int,
    hidden: Sequence[int],
    num_classes: int,
    activation: Callable[[], nn.Module],
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _Net(nn.Sequential):
    """Base class: a :class:`~torch.nn.Sequential` with an ``input_shape`` attribute."""

    #: Shape of one input example (without the batch dimension).
    input_shape: tuple[int, ...]

    def __init__(
        self,
        input_shape: tuple[int, ...],
        normalize: Normalize,
        classifier: nn.Sequential,
        features: nn.Sequential | None = None,
    ) -> None:
        children: OrderedDict[str, nn.Module] = OrderedDict(normalize=normalize)
        if features is not None:
            children["features"] = features
        children["classifier"] = classifier
        super().__init__(children)
        self.input_shape = tuple(input_shape)


class _MLPNet(_Net):
    """A multilayer perceptron ``Normalize -> Flatten -> (Linear -> act)* -> Linear``."""

    def __init__(
        self,
        hidden: Sequence[int],
        activation: Callable[[], nn.Module],
        num_classes: int,
        in_channels: int,
        image_size: int,
        in_features: int | None,
        mean: float | Sequence[float],
        std: float | Sequence[float],
    ) -> None:
        n_in, input_shape = _resolve_flat_input(in_channels, image_size, in_features)
        super().__init__(
            input_shape,
            Normalize(mean, std),
            _mlp_classifier(n_in, hidden, num_classes, activation),
        )


class _LeNetMLP(_MLPNet):
    """The LeNet MLPs: ReLU layers of the class's ``hidden`` widths on 28x28 images.

    Input images of shape ``(1, 28, 28)`` are flattened by the first layer of ``classifier``.

    :param num_classes: Number of outputs.
    :param in_channels: Number of image channels.
    :param image_size: Height (= width) of the input images.
    :param in_features: If given, overrides ``in_channels * image_size ** 2`` and the network
        expects flat inputs of shape ``(in_features,)``.
    :param mean: Input mean (scalar or per channel).
    :param std: Input standard deviation (scalar or per channel).
    """

    hidden: tuple[int, ...] = ()

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        in_features: int | None = None,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
    ) -> None:
        super().__init__(
            self.hidden, nn.ReLU, num_classes, in_channels, image_size, in_features, mean, std
        )


class LeNet300100(_LeNetMLP):
    """
    LeNet-300-100: the fully connected MNIST network 784-300-100-10 with ReLU of LeCun et
    al. (1998) [1], as used for pruning by Neklyudov et al. (2017) [2].

    The constructor's parameters are :class:`_LeNetMLP`'s.
    """

    hidden = (300, 100)


class LeNet500300(_LeNetMLP):
    """
    LeNet-500-300: the fully connected MNIST network 784-500-300-10 with ReLU of LeCun et
    al. (1998) [1].

    The constructor's parameters are :class:`_LeNetMLP`'s.
    """

    hidden = (500, 300)


class LeNet5Caffe(_Net):
    """
    LeNet5-Caffe, the convolutional MNIST network "20-50-800-500" of Neklyudov et al.
    (2017) [2] (Table 1), i.e. Caffe's ``examples/mnist/lenet.prototxt``:

    ``Conv2d(1, 20, 5) -> ReLU -> MaxPool2d(2) -> Conv2d(20, 50, 5) -> ReLU -> MaxPool2d(2)
    -> Flatten -> Linear(800, 500) -> ReLU -> Linear(500, 10)`` for ``(1, 28, 28)`` inputs
    (28 -> 24 -> 12 -> 8 -> 4, and 50 * 4 * 4 = 800).

    Notes: Caffe's prototxt has no ReLU after the convolutions; the SBP code
    (``scripts/lenet/lenet5-sbp.py`` in necludov/group-sparsity-sbp) does add one, as here.
    That TensorFlow code also uses ``'SAME'`` padding (``padding=2`` here), which gives
    50 * 7 * 7 = 2450 inputs to the first dense layer instead of the 800 of the paper's table;
    the default ``padding=0`` follows the paper's 800.

    :param num_classes: Number of outputs.
    :param in_channels: Number of image channels.
    :param image_size: Height (= width) of the input images.
    :param padding: Zero padding of both convolutions (0 = Caffe, 2 = SBP TensorFlow code).
    :param mean: Input mean (scalar or per channel).
    :param std: Input standard deviation (scalar or per channel).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        padding: int = 0,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
    ) -> None:
        size = _conv_out(image_size, 5, padding) // 2
        size = _conv_out(size, 5, padding) // 2
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for LeNet5Caffe")
        features = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(50 * size * size, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )
        super().__init__(
            (in_channels, image_size, image_size), Normalize(mean, std), classifier, features
        )


class BMRSLeNet5(_Net):
    """
    The LeNet5 of Wright, Igel and Selvan (2024) [3], as defined by ``lenet5`` in
    ``modules/classifiers.py`` of saintslab/bmrs-structured-pruning:

    ``Conv2d(C, 6C, 5) -> ReLU -> MaxPool2d(2) -> Conv2d(6C, 16C, 5) -> ReLU -> MaxPool2d(2)
    -> Flatten -> Linear(400C, 120C) -> ReLU -> Linear(120C, 84C) -> ReLU -> Linear(84C, 10)``

    for ``(C, 32, 32)`` inputs (32 -> 28 -> 14 -> 10 -> 5, and 16 * 5 * 5 = 400). The
    activation is ReLU and the pooling is max pooling, as in that code. Note that the BMRS code
    multiplies every hidden width by the number of input channels ``C`` (so their CIFAR-10
    LeNet5 has 18-48-1200-360-252 units); ``scale_width_with_channels=True`` (the default)
    reproduces this, ``False`` keeps 6-16-120-84 for any ``C``. For ``C = 1`` both agree.

    The BMRS code puts its pruning layer after the ReLU; with positive gates on ReLU units this
    is equivalent to gating before the ReLU. Their preprocessing: MNIST / Fashion-MNIST resized
    to 32x32 and mapped to ``(x - 127) / 255`` (``mean=127/255, std=1`` on ``[0, 1]`` inputs),
    CIFAR-10 normalised with ``mean=0.5, std=0.5``.

    :param num_classes: Number of outputs.
    :param in_channels: Number of image channels ``C``.
    :param image_size: Height (= width) of the input images.
    :param scale_width_with_channels: Multiply hidden widths by ``in_channels`` as the BMRS code.
    :param mean: Input mean (scalar or per channel).
    :param std: Input standard deviation (scalar or per channel).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 32,
        scale_width_with_channels: bool = True,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
    ) -> None:
        k = in_channels if scale_width_with_channels else 1
        size = _conv_out(image_size, 5) // 2
        size = _conv_out(size, 5) // 2
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for BMRSLeNet5")
        features = nn.Sequential(
            nn.Conv2d(in_channels, 6 * k, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6 * k, 16 * k, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * k * size * size, 120 * k),
            nn.ReLU(),
            nn.Linear(120 * k, 84 * k),
            nn.ReLU(),
            nn.Linear(84 * k, num_classes),
        )
        super().__init__(
            (in_channels, image_size, image_size), Normalize(mean, std), classifier, features
        )


class BMRSMLP(_MLPNet):
    """
    The MLP of Wright, Igel and Selvan (2024) [3], as defined by ``make_mlp`` in
    ``modules/classifiers.py`` of saintslab/bmrs-structured-pruning: blocks
    ``Linear -> Tanh`` of width ``hidden_dim`` followed by an output ``Linear``.

    ``make_mlp(n_layers=L)`` builds ``1 + L`` hidden blocks, and ``train.py`` defaults to
    ``--n_layers 5 --hidden_dim 50``, so the default here is ``num_hidden_layers=6`` hidden
    layers of 50 units (7 Linear layers in total). Inputs are 32x32 images flattened
    (``32 * 32 * C`` features; 1024 for MNIST). The BMRS code puts its pruning layer after the
    Tanh, whereas gates inserted here go before it.

    :param num_classes: Number of outputs.
    :param in_channels: Number of image channels.
    :param image_size: Height (= width) of the input images.
    :param in_features: If given, overrides ``in_channels * image_size ** 2`` and the network
        expects flat inputs of shape ``(in_features,)``.
    :param hidden_dim: Width of every hidden layer.
    :param num_hidden_layers: Number of ``Linear -> Tanh`` hidden blocks.
    :param mean: Input mean (scalar or per channel).
    :param std: Input standard deviation (scalar or per channel).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 32,
        in_features: int | None = None,
        hidden_dim: int = 50,
        num_hidden_layers: int = 6,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
    ) -> None:
        if num_hidden_layers < 0:
            raise ValueError(f"num_hidden_layers must be >= 0, got {num_hidden_layers}")
        super().__init__(
            (hidden_dim,) * num_hidden_layers,
            nn.Tanh,
            num_classes,
            in_channels,
            image_size,
            in_features,
            mean,
            std,
        )


def _scale(channels: int, width_multiplier: float) -> int:
    # int() truncation as in the SBP code (int(64 * scale)), guarded against rounding noise.
    return max(1, int(channels * width_multiplier + 1e-6))


class VGGLike(_Net):
    """
    The VGG-like CIFAR-10 network of Zagoruyko (2015) [5] used by Neklyudov et al.
    (2017) [2] (``scripts/vgglike/vgglike-sbp.py``): VGG-16's [4] convolutional part with batch
    norm, ``Conv2d(3x3, padding=1) -> BatchNorm2d -> ReLU`` per entry of ``config`` and
    ``MaxPool2d(2)`` per ``"M"``, then
    ``Flatten -> Linear(., 512w) -> BatchNorm1d -> ReLU -> Linear(512w, num_classes)``.

    All widths are multiplied by ``width_multiplier`` ``w`` and truncated to an integer (at
    least 1), as the ``scale`` flag of the SBP code. Dropout of the original Torch model is not
    included (the SBP code has none either).

    :param num_classes: Number of outputs.
    :param in_channels: Number of image channels.
    :param image_size: Height (= width) of the input images.
    :param width_multiplier: Width scale ``w`` of every hidden layer.
    :param config: Convolutional configuration; defaults to :data:`VGG16_CONFIG`. A shorter one
        (e.g. ``(8, "M", 16, "M")``) gives a small network for tests.
    :param hidden_features: Width of the hidden dense layer before scaling.
    :param mean: Input mean (scalar or per channel).
    :param std: Input standard deviation (scalar or per channel).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width_multiplier: float = 1.0,
        config: Sequence[int | str] = VGG16_CONFIG,
        hidden_features: int = 512,
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
    ) -> None:
        if width_multiplier <= 0:
            raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")
        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            elif isinstance(item, int) and not isinstance(item, bool) and item > 0:
                out = _scale(item, width_multiplier)
                layers += [
                    nn.Conv2d(channels, out, kernel_size=3, padding=1),
                    nn.BatchNorm2d(out),
                    nn.ReLU(),
                ]
                channels = out
            else:
                raise ValueError(f"config entries must be positive ints or 'M', got {item!r}")
        if size < 1:
            raise ValueError(f"image_size={image_size} is too small for config {tuple(config)}")
        hidden = _scale(hidden_features, width_multiplier)
        classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * size * size, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        super().__init__(
            (in_channels, image_size, image_size),
            Normalize(mean, std),
            classifier,
            nn.Sequential(*layers),
        )
        self.width_multiplier = float(width_multiplier)


class DigitsNet(_MLPNet):
    """
    A small MLP 64-100-50-10 with ReLU for scikit-learn's 8x8 digits
    (:func:`sklearn.datasets.load_digits`, pixel values 0..16), input ``(1, 8, 8)``. It trains
    in seconds on a CPU; it is the quick test bed of this package, not a network from [2]
    or [3].

    :param num_classes: Number of outputs.
    :param in_channels: Number of image channels.
    :param image_size: Height (= width) of the input images.
    :param in_features: If given, overrides ``in_channels * image_size ** 2`` and the network
        expects flat inputs of shape ``(in_features,)``.
    :param hidden: Widths of the hidden layers.
    :param mean: Input mean (scalar or per channel).
    :param std: Input standard deviation (scalar or per channel).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        in_features: int | None = None,
        hidden: Sequence[int] = (100, 50),
        mean: float | Sequence[float] = 0.0,
        std: float | Sequence[float] = 1.0,
    ) -> None:
        super().__init__(
            tuple(hidden), nn.ReLU, num_classes, in_channels, image_size, in_features, mean, std
        )


#: Registry of the built-in networks by name. :mod:`pyro_sbp.models.resnet` adds
#: ``"resnet-20"`` (:class:`~pyro_sbp.models.resnet.ResNet20`) and ``"resnet-56"``
#: (:class:`~pyro_sbp.models.resnet.ResNet56`) on import.
NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "lenet-300-100": LeNet300100,
    "lenet-500-300": LeNet500300,
    "lenet5-caffe": LeNet5Caffe,
    "bmrs-lenet5": BMRSLeNet5,
    "bmrs-mlp": BMRSMLP,
    "vgg-like": VGGLike,
    "digits-mlp": DigitsNet,
}

#: Default shape of one input example (without the batch dimension) of each network.
#: A built network also carries its actual ``input_shape`` attribute. The ResNets' ``(3, 32, 32)``
#: are added by :mod:`pyro_sbp.models.resnet`.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "lenet-300-100": (1, 28, 28),
    "lenet-500-300": (1, 28, 28),
    "lenet5-caffe": (1, 28, 28),
    "bmrs-lenet5": (1, 32, 32),
    "bmrs-mlp": (1, 32, 32),
    "vgg-like": (3, 32, 32),
    "digits-mlp": (1, 8, 8),
}


def build_network(name: str, **kwargs: object) -> nn.Module:
    """
    Builds a network of :data:`NETWORKS` by name.

    :param name: One of the keys of :data:`NETWORKS`.
    :param kwargs: Keyword arguments of the network's constructor.
    :returns: The network (its ``input_shape`` attribute is the shape of one input example).
    :raises ValueError: If ``name`` is unknown.
    """
    try:
        factory = NETWORKS[name]
    except KeyError:
        valid = ", ".join(sorted(NETWORKS))
        raise ValueError(f"unknown network {name!r}; valid names are: {valid}") from None
    return factory(**kwargs)
