"""Turning a plain network into a prunable one: one gate per unit after chosen layers."""

from collections.abc import Iterable, Iterator, Sequence

import torch
from pyro.nn.module import to_pyro_module_
from torch import Tensor, nn

from pyro_sbp.models.gate import DEFAULT_HIGH, DEFAULT_LOW, SBPGate

_GATEABLE = (nn.Linear, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _num_units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _default_layers(net: nn.Module) -> list[str]:
    names = [name for name, m in net.named_modules() if isinstance(m, _GATEABLE)]
    if not names:
        raise ValueError("the network has no nn.Linear or nn.Conv2d layer to put gates on")
    last = names[-1]
    if not isinstance(net.get_submodule(last), nn.Linear):
        raise ValueError(
            f"the last Linear/Conv2d layer {last!r} is not a Linear: cannot tell the classifier; "
            "pass `layers` explicitly"
        )
    # The classifier's outputs (the last Linear) are never gated.
    return names[:-1]


def _in_sequential(net: nn.Module, name: str) -> tuple[nn.Sequential, list[str], int] | None:
    # The Sequential that holds the module ``name``, its keys, and the module's position.
    parent_name, _, child = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    if not isinstance(parent, nn.Sequential):
        return None
    keys = list(parent._modules)
    return parent, keys, keys.index(child)


def _following_norm(net: nn.Module, name: str, units: int) -> nn.Module | None:
    # A BatchNorm right after the layer in the same Sequential.
    found = _in_sequential(net, name)
    if found is None:
        return None
    parent, keys, pos = found
    if pos + 1 < len(keys):
        nxt = parent._modules[keys[pos + 1]]
        if isinstance(nxt, _NORMS) and nxt.num_features == units:
            return nxt
    return None


def commutes_with_max(m: nn.Module) -> bool:
    """Whether the element-wise activation ``m`` is non-decreasing, so that it commutes with
    max-pooling: ``pool(act(x)) == act(pool(x))``. (SiLU and GELU are not: they dip below zero.)
    """
    if isinstance(m, nn.LeakyReLU):
        return m.negative_slope >= 0
    if isinstance(m, nn.ELU):
        return m.alpha >= 0
    return isinstance(m, nn.ReLU | nn.ReLU6 | nn.Hardtanh | nn.Tanh | nn.Sigmoid)


def _gate_response(layer: nn.Module, out: Tensor) -> Tensor:
    # gate -> bias: the gate scales the bias-free response, and the mask also removes the bias of
    # a removed unit, so that a removed unit is exactly zero.
    gate = layer.gate
    bias = layer.bias
    if bias is None:
        return gate(out)
    b = bias.reshape((1, -1) + (1,) * (out.dim() - 2))
    return gate(out - b) + b * gate.mask.reshape(b.shape)


def _gate_before_bias(layer: nn.Module, _inputs, out: Tensor) -> Tensor:
    # conv / linear -> gate -> bias (SBP).
    return _gate_response(layer, out)


def _gate_after_pool(pool: nn.Module, _inputs, out: Tensor) -> Tensor:
    # conv -> max-pool -> gate -> bias: the bias is taken out after the pooling (a maximum
    # commutes with subtracting a constant, in floating point too), on the pooled elements only.
    return _gate_response(pool._sbp_gated_layer, out)


def _following_pool(net: nn.Module, name: str) -> tuple[nn.Sequential, str | None, str] | None:
    # A max-pooling right after the layer in the same Sequential, or after a non-decreasing
    # activation: (the Sequential, the activation's key or None, the pooling's key).
    found = _in_sequential(net, name)
    if found is None:
        return None
    parent, keys, pos = found
    act = None
    if pos + 2 < len(keys) and commutes_with_max(parent._modules[keys[pos + 1]]):
        act, pos = keys[pos + 1], pos + 1
    if pos + 1 >= len(keys):
        return None
    pool = parent._modules[keys[pos + 1]]
    if not isinstance(pool, nn.MaxPool2d) or pool.return_indices:
        return None
    # A pooling module used in more than one place would gate every output it pools.
    if sum(m is pool for _, m in net.named_modules(remove_duplicate=False)) > 1:
        return None
    return parent, act, keys[pos + 1]


def _gate_after_norm(norm: nn.Module, _inputs, out: Tensor) -> Tensor:
    # conv -> BatchNorm -> gate: after the norm, so that batch statistics cannot undo the gate's
    # scaling, and a removed channel is exactly zero whatever the norm's shift.
    return norm._sbp_gate(out)


def _gate_inputs(layer: nn.Module, inputs: tuple) -> tuple:
    # gate -> Linear: one gate per input feature (SBP also prunes single inputs of dense layers).
    return (layer.input_gate(inputs[0]), *inputs[1:])


#: Attribute (and last part of the site name) of a gate on a layer's input features.
INPUT_GATE_ATTR = "input_gate"
_GATE_ATTRS = ("gate", INPUT_GATE_ATTR)


def is_sequential_tree(net: nn.Module) -> bool:
    """Whether every module of ``net`` with submodules is an ``nn.Sequential`` (gates are then
    put on with hooks, in place; other networks are traced, :mod:`pyro_sbp.models.graph`)."""
    for m in net.modules():
        children = [c for c in m.children() if not isinstance(c, SBPGate)]
        if children and not isinstance(m, nn.Sequential):
            return False
    return True


def make_prunable(
    net: nn.Module,
    layers: Sequence[str] | None = None,
    *,
    input_layers: Sequence[str] = (),
    low: float = DEFAULT_LOW,
    high: float = DEFAULT_HIGH,
    gate_after_pool: bool = True,
    example_input: Tensor | None = None,
    leaf_modules: Iterable[type | str] = (),
) -> nn.Module:
    """Put an :class:`SBPGate` on the units of chosen layers of ``net``.

    One line makes a network prunable::

        net = make_prunable(build_network("lenet5-caffe"))
        net = make_prunable(torchvision.models.resnet18(num_classes=10),
                            example_input=torch.randn(1, 3, 32, 32))

    **Any network** that ``torch.fx`` can trace (ResNets, MobileNets, DenseNets, ...; a network
    with modules other than ``nn.Sequential`` containers) is traced, and the gates become nodes
    of its graph (:mod:`pyro_sbp.models.graph`): channels that must be removed together
    (residual adds, concatenations, grouped and depthwise convolutions, flatten into a linear
    layer) share one gate and one unit, every output channel of every ``Conv2d``/``Linear``
    layer but the classifier's (the layers that feed the output) belongs to a gate, and each
    gate acts after the norm that follows its layer, and after every other norm that reads its
    channels. The traced network is a new ``torch.fx.GraphModule`` sharing ``net``'s
    parameters (print it to see where each gate acts); use the returned module.
    ``example_input`` (a batch of one or more inputs) gives the shapes; by default a batch of
    two zero inputs of ``net.input_shape`` (the built-in networks have one). ``leaf_modules``
    (types or qualified names) are called as a whole instead of traced, fx's escape hatch for
    code it cannot trace; they must not meet gated channels. An operation that ties channels in
    a way export cannot follow (a channel shuffle, a reshape that mixes channels) raises a
    ``ValueError`` naming the node and the op. ``input_layers`` and ``gate_after_pool`` apply to
    ``nn.Sequential`` networks only.

    **nn.Sequential networks** (every built-in but the ResNets) get their gates in place, with
    hooks, as follows.

    The gate of layer ``"features.0"`` is the submodule ``"features.0.gate"``, which is also the
    name of its Pyro sample site. ``net`` is converted to a :class:`~pyro.nn.PyroModule` tree
    (in place), so its weights become Pyro parameters named by their paths
    (``"features.0.weight"``); weights stay deterministic point estimates, as in SBP.

    Where the gate goes: ``Linear``/``Conv2d`` -> gate -> bias -> nonlinearity (the gate scales the
    bias-free response, as in SBP); when the layer is followed by a ``BatchNorm1d``/``BatchNorm2d``
    of matching width in the same ``nn.Sequential``, the gate goes after that norm instead
    (``conv -> BN -> gate -> nonlinearity``), because batch statistics would otherwise normalise
    the gate's scaling away. Either way a unit whose mask is 0 outputs exactly 0.

    When a ``Conv2d`` without a norm is followed in the same ``nn.Sequential`` by an
    ``nn.MaxPool2d``, directly or after a non-decreasing activation (:func:`commutes_with_max`:
    ReLU, LeakyReLU, ELU, Tanh, ...), its gate and bias are applied after the pooling, on a
    quarter of the elements for 2 x 2 pooling, and the activation is moved after the pooling
    (``conv -> pool -> gate -> bias -> activation``; the Sequential's order changes, its state
    dict does not). The function is unchanged: for gates theta > 0,
    ``pool(act(theta * y + b)) == act(theta * pool(y) + b)``, bit for bit, since rounding is
    monotone too. It saves about a tenth of an SVI step of LeNet5-Caffe
    (``benchmarks/svi_overhead.py``); ``gate_after_pool=False`` keeps the gate at the layer.

    Input features can be gated too (``input_layers``): the gate ``"classifier.1.input_gate"``
    multiplies each input feature of the ``Linear`` ``"classifier.1"`` before it (the SBP paper
    prunes LeNet-500-300's input pixels, 784 -> 245, and the flattened features entering
    LeNet5-Caffe's first dense layer this way). A removed input feature is exactly 0 for that
    layer; :func:`pyro_sbp.export.export_pruned` drops its weight column and selects the kept
    features.

    :param net: a plain network (or one already made prunable, which is an error).
    :param layers: names of the ``nn.Linear``/``nn.Conv2d`` layers to gate; by default every one
        but the last (the classifier, which must then be a ``Linear``).
    :param input_layers: names of ``nn.Linear`` layers whose input features get a gate (none by
        default).
    :param float low: lower bound of each gate (default :math:`e^{-20}`).
    :param float high: upper bound of each gate (default 1).
    :param bool gate_after_pool: move a convolution's gate after a following max-pooling (same
        function, less work; default ``True``).
    :param example_input: an input batch, for tracing a network that is not ``nn.Sequential``.
    :param leaf_modules: modules not to trace into (types or qualified names).
    :return: ``net`` itself (``nn.Sequential`` networks), or the traced network.
    """
    if any(isinstance(m, SBPGate) for m in net.modules()):
        raise ValueError("the network already has gates")
    if not is_sequential_tree(net):
        return _make_prunable_graph(
            net, layers, input_layers, low, high, example_input, leaf_modules
        )
    names = _default_layers(net) if layers is None else list(layers)
    modules = dict(net.named_modules())
    input_names = list(input_layers)
    for name in names + input_names:
        layer = modules.get(name)
        if layer is None:
            raise ValueError(f"no layer named {name!r}; layers: {sorted(n for n in modules if n)}")
        if not isinstance(layer, _GATEABLE):
            raise ValueError(f"layer {name!r} is a {type(layer).__name__}, not Linear or Conv2d")
    for name in input_names:
        layer = modules[name]
        if not isinstance(layer, nn.Linear):
            raise ValueError(
                f"input gates go on Linear layers; {name!r} is a {type(layer).__name__}"
            )
        # Registered before the output gate: the sites are sampled in forward order.
        layer.input_gate = SBPGate(layer.in_features, low, high)
        layer.register_forward_pre_hook(_gate_inputs)
    for name in names:
        layer = modules[name]
        units = _num_units(layer)
        layer.gate = SBPGate(units, low, high)
        norm = _following_norm(net, name, units)
        layer.gate.after_norm = norm is not None
        pooled = None
        if norm is None and gate_after_pool and isinstance(layer, nn.Conv2d):
            pooled = _following_pool(net, name)
        if pooled is not None:
            parent, act, pool_key = pooled
            if act is not None:
                parent._modules[act], parent._modules[pool_key] = (
                    parent._modules[pool_key],
                    parent._modules[act],
                )
                pool_key = act
            pool = parent._modules[pool_key]
            object.__setattr__(pool, "_sbp_gated_layer", layer)
            pool.register_forward_hook(_gate_after_pool)
        elif norm is None:
            layer.register_forward_hook(_gate_before_bias)
        else:
            # Held by the norm without registering it twice as a submodule.
            object.__setattr__(norm, "_sbp_gate", layer.gate)
            norm.register_forward_hook(_gate_after_norm)
    to_pyro_module_(net)
    return net


def _make_prunable_graph(net, layers, input_layers, low, high, example_input, leaf_modules):
    from pyro_sbp.models.graph import gate_graph

    if tuple(input_layers):
        raise ValueError(
            "input_layers (gates on a Linear's input features) apply to nn.Sequential networks; "
            f"{type(net).__name__} is traced, and its flattened features are gated with their "
            "channels"
        )
    if not 0 < low < high:
        raise ValueError(f"gate bounds must satisfy 0 < low < high, got {low}, {high}")
    if example_input is None:
        shape = getattr(net, "input_shape", None)
        if shape is None:
            raise ValueError(
                f"{type(net).__name__} is not built from nn.Sequential containers, so it is "
                "traced: pass example_input=<a batch of inputs> for the shapes"
            )
        param = next(net.parameters(), None)
        example_input = torch.zeros(
            (2, *shape),
            dtype=torch.get_default_dtype() if param is None else param.dtype,
            device=None if param is None else param.device,
        )
    if not isinstance(example_input, Tensor) or example_input.dim() < 1:
        raise ValueError(
            f"example_input must be a batch of inputs (a tensor), got {example_input!r}"
        )
    gm = gate_graph(net, example_input, layers, low=low, high=high, leaf_modules=leaf_modules)
    to_pyro_module_(gm)
    return gm


def named_gates(net: nn.Module) -> Iterator[tuple[str, SBPGate]]:
    """``(site name, gate)`` for every gate of ``net``, in module order."""
    for m in net.modules():
        if isinstance(m, SBPGate):
            yield m.site_name, m


def gated_layer_name(site: str) -> str:
    """The name of the layer a gate site belongs to (``"features.0.gate"`` -> ``"features.0"``,
    ``"classifier.1.input_gate"`` -> ``"classifier.1"``)."""
    return site.rpartition(".")[0]


def in_gate(key: str) -> bool:
    """Whether a parameter or buffer name (``"features.0.gate.loc"``,
    ``"classifier.1.input_gate.mask"``) belongs to a gate."""
    return any(f".{attr}." in f".{key}" for attr in _GATE_ATTRS)


def is_input_gate(site: str) -> bool:
    """Whether a gate site gates a layer's input features (rather than its units)."""
    return site.rpartition(".")[2] == INPUT_GATE_ATTR


def set_gates_enabled(net: nn.Module, enabled: bool) -> None:
    """Switch every gate on (noise / posterior mean) or off (identity, up to the mask)."""
    for _, gate in named_gates(net):
        gate.enabled = enabled
