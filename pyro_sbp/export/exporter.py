"""Export a gated network as a plain, physically smaller ``torch.nn.Module``."""

import copy
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from pyro.nn import PyroModule
from torch import Tensor, nn

from pyro_sbp.infer.checkpoint import write_atomic
from pyro_sbp.models.gate import SBPGate
from pyro_sbp.models.nets import Normalize
from pyro_sbp.models.prunable import commutes_with_max, is_input_gate, named_gates

_LAYERS = (nn.Linear, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Modules that act on each channel separately (and map a constant channel to a constant).
_CHANNELWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class InputNormalization(nn.Module):
    """``(x - mean) / std`` with the statistics laid out in the input's own shape (scriptable)."""

    def __init__(self, mean: Tensor, std: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.unsqueeze(0).clone())
        self.register_buffer("std", std.unsqueeze(0).clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class FeatureSelect(nn.Module):
    """Keeps the features ``index`` of dim 1: the inputs a layer still uses when some of its input
    features were pruned by an input gate (scriptable)."""

    def __init__(self, index: Tensor):
        super().__init__()
        self.register_buffer("index", index.clone())

    def forward(self, x: Tensor) -> Tensor:
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} features"


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)`` computed as two strided element-wise maxima (rows, then columns).

    The same values (a maximum is exact; NaN propagates as in the pooling kernel), but on the CPU
    several times faster than PyTorch's pooling kernel for the small channel counts of pruned
    networks, where that kernel dominated the exported network's time
    (``benchmarks/export_speedup.py``).
    """

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        x = x[..., :h, :w]
        x = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
        return torch.maximum(x[..., 0::2], x[..., 1::2])


def _is_max_pool_2x2(m: nn.Module) -> bool:
    def pair(v):
        return tuple(v) if isinstance(v, tuple | list) else (v, v)

    return (
        type(m) is nn.MaxPool2d
        and pair(m.kernel_size) == (2, 2)
        and pair(m.stride or m.kernel_size) == (2, 2)
        and pair(m.padding) == (0, 0)
        and pair(m.dilation) == (1, 1)
        and not m.ceil_mode
        and not m.return_indices
    )


@torch.no_grad()
def _export_normalize(m: nn.Module, input_shape: tuple[int, ...]) -> InputNormalization:
    mean = m.mean.detach().cpu()
    std = m.std.detach().cpu()
    n = mean.numel()
    size = int(torch.tensor(input_shape).prod().item())
    if n == 1:
        full_mean, full_std = mean.expand(size), std.expand(size)
    elif input_shape[0] == n:
        per = size // n
        full_mean, full_std = mean.repeat_interleave(per), std.repeat_interleave(per)
    elif len(input_shape) == 1 and input_shape[0] % n == 0:
        per = input_shape[0] // n
        full_mean, full_std = mean.repeat_interleave(per), std.repeat_interleave(per)
    else:
        raise ValueError(f"normalisation of {n} channels does not fit inputs of {input_shape}")
    return InputNormalization(full_mean.reshape(input_shape), full_std.reshape(input_shape))


def _plain_class(module: nn.Module) -> type:
    cls = type(module)
    if isinstance(module, PyroModule):
        for base in cls.__mro__[1:]:
            if issubclass(base, nn.Module) and not issubclass(base, PyroModule):
                return base
    return cls


def _plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy of a leaf module as its plain torch class, without Pyro state or hooks."""
    new = copy.deepcopy(module)
    new.__class__ = _plain_class(module)
    for attr in ("_pyro_name", "_pyro_context", "_pyro_params", "_pyro_samples", "_sbp_gate"):
        new.__dict__.pop(attr, None)
    new._forward_hooks.clear()
    new._forward_pre_hooks.clear()
    new._modules.pop("gate", None)
    return new


class _Flow:
    """What is known of the tensor between two modules: which channels (or features) of the
    original network are still present, and the constant value of each removed one."""

    def __init__(self, n: int, dtype):
        self.keep = torch.arange(n)
        self.removed = torch.zeros(0, dtype=torch.long)
        self.const = torch.zeros(0, dtype=dtype)

    def set(self, keep: Tensor, n: int, const_removed: Tensor) -> None:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[keep] = True
        self.keep = keep
        self.removed = (~mask).nonzero().squeeze(-1)
        self.const = const_removed


def _fold_inputs(weight: Tensor, bias: Tensor | None, flow: _Flow, out_features: int):
    """Select the kept input columns; fold the removed inputs' constants into the bias."""
    w = weight.index_select(1, flow.keep)
    b = torch.zeros(out_features, dtype=weight.dtype) if bias is None else bias.clone()
    if flow.removed.numel() and bool((flow.const != 0).any()):
        w_removed = weight.index_select(1, flow.removed)
        b = b + (w_removed * flow.const.reshape((1, -1) + (1,) * (weight.dim() - 2))).sum(
            dim=tuple(range(1, weight.dim()))
        )
    return w, b


@torch.no_grad()
def _leaf_shapes(net: nn.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Each leaf module's input shape (one example), from one forward pass in evaluation mode."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def record(name):
        def hook(_module, inputs):
            shapes.setdefault(name, tuple(inputs[0].shape[1:]))

        return hook

    for name, m in _leaves(net):
        handles.append(m.register_forward_pre_hook(record(name)))
    was_training = net.training
    net.eval()
    param = next(net.parameters())
    try:
        net(torch.zeros((1, *input_shape), dtype=param.dtype, device=param.device))
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def _leaves(net: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in net.named_modules():
        if isinstance(m, SBPGate) or not name:
            continue
        if not list(c for c in m.children() if not isinstance(c, SBPGate)):
            out.append((name, m))
    return out


def _check_sequential(net: nn.Module) -> None:
    for name, m in net.named_modules():
        children = [c for c in m.children() if not isinstance(c, SBPGate)]
        if children and not isinstance(m, nn.Sequential):
            raise NotImplementedError(
                f"export follows nn.Sequential containers only; {name or 'the network'!r} is a "
                f"{type(m).__name__} with submodules"
            )


@torch.no_grad()
def export_pruned(
    net: nn.Module,
    input_shape: tuple[int, ...],
    masks: dict[str, Tensor] | None = None,
    *,
    channels_last: bool = True,
) -> nn.Module:
    r"""A plain ``nn.Module`` computing what the gated ``net`` computes in evaluation mode, with
    the removed neurons and channels physically gone.

    Each gated layer keeps the rows (output channels) of its kept units, with the gate's value
    :math:`g_j = \mathbb E_q[\theta_j]` (the gate's ``theta_mean``) folded in: into the weights
    when the gate sits before the bias (:math:`W'_j = g_j W_j`), into the following BatchNorm's
    affine parameters when it sits after the norm (:math:`\gamma'_j = g_j\gamma_j`,
    :math:`\beta'_j = g_j\beta_j`). The next layer keeps the matching input columns; through
    ``Flatten`` a channel maps to its block of flattened features. A removed unit outputs a
    constant (0 after the mask, then whatever the channel-wise modules make of 0), which is
    folded into the next layer's bias, so nothing is multiplied at run time that the gated
    network did not. A layer whose units are all removed keeps one dead unit (zero weights) so
    that the network still runs; the classifier's outputs are never removed.

    The input normalisation stays the first module: the exported network takes the data set's
    inputs as they are (images in [0, 1]).

    :param net: a network made prunable, with ``theta_mean`` set on its gates
        (:meth:`~pyro_sbp.guides.SBPGuide.update_gates`).
    :param input_shape: the shape of one input, e.g. ``(1, 28, 28)``.
    :param masks: keep-masks by gate site; the gates' own masks when ``None``.
    A traced network (one that :func:`~pyro_sbp.models.make_prunable` traced because it is not
    built from ``nn.Sequential`` containers) is exported by
    :func:`pyro_sbp.export.graph_export.export_graph`: the same graph with smaller layers, its
    convolutions in the channels-last memory format unless ``channels_last=False`` (faster on
    the CPU for these networks' layers; ``nn.Sequential`` exports stay contiguous, which the
    LeNets' 3-50-channel convolutions run faster).

    :return: a plain ``nn.Sequential`` (in evaluation mode) mirroring ``net``'s containers, or a
        plain ``torch.fx.GraphModule`` for a traced network.
    """
    gates = dict(named_gates(net))
    if masks is not None:
        unknown = set(masks) - set(gates)
        if unknown:
            raise ValueError(
                f"masks for unknown gate sites {sorted(unknown)}; gates: {list(gates)}"
            )
        for site, m in masks.items():
            if tuple(m.shape) != (gates[site].num_units,):
                raise ValueError(
                    f"mask for {site!r} has shape {tuple(m.shape)}, expected "
                    f"({gates[site].num_units},)"
                )
    if getattr(net, "_sbp_graph", None) is not None:
        from pyro_sbp.export.graph_export import export_graph

        return export_graph(net, tuple(input_shape), masks, channels_last=channels_last)
    _check_sequential(net)
    shapes = _leaf_shapes(net, tuple(input_shape))
    leaves = _leaves(net)
    dtype = next(net.parameters()).dtype
    gate_of_layer = {}
    input_gate_of_layer = {}
    gate_after = {}
    for site, gate in gates.items():
        layer_name = site.rpartition(".")[0]
        (input_gate_of_layer if is_input_gate(site) else gate_of_layer)[layer_name] = (site, gate)
    for name, m in leaves:
        g = getattr(m, "_sbp_gate", None)
        if g is not None:
            gate_after[name] = g
    # The classifier: the last Linear, never gated.
    classifier = [n for n, m in leaves if isinstance(m, nn.Linear)][-1]
    if classifier in gate_of_layer:
        raise ValueError(f"the classifier {classifier!r} is gated: its outputs cannot be removed")

    flow = _Flow(int(torch.tensor(input_shape[:1]).item()), dtype)
    new_leaves: dict[str, nn.Module] = {}
    pending: tuple[Tensor, Tensor] | None = None  # (kept units, their gate) for a following norm
    for name, m in leaves:
        shape = shapes.get(name)
        if shape is None:
            raise RuntimeError(f"module {name!r} is not reached by the forward pass")
        if isinstance(m, _LAYERS):
            new, pending = _export_layer(
                name, m, flow, gate_of_layer.get(name), masks, input_gate_of_layer.get(name)
            )
        elif isinstance(m, _NORMS):
            new = _export_norm(name, m, flow, gate_after.get(name), pending, masks)
            pending = None
        elif isinstance(m, nn.Flatten):
            new = _plain_copy(m)
            _flatten_flow(flow, shape, m)
        elif isinstance(m, _CHANNELWISE):
            new = _plain_copy(m).eval()
            if flow.const.numel() and not isinstance(m, _POOLS):
                # Pooling a constant channel leaves it constant; an activation maps it.
                flow.const = new(flow.const)
        elif isinstance(m, Normalize) and name == leaves[0][0]:
            new = _export_normalize(m, tuple(input_shape))
        else:
            raise NotImplementedError(
                f"export does not know how {type(m).__name__} ({name!r}) treats removed channels"
            )
        new_leaves[name] = new
    return _streamline(_rebuild(net, new_leaves)).eval()


def _gate_values(site_gate, masks, dtype) -> tuple[Tensor, Tensor]:
    """``(kept, value)`` of a gate: its keep-mask (``masks`` override the gate's own) and
    ``E[theta]`` (``theta_mean``) times that mask, per unit."""
    site, gate = site_gate
    mask = (masks[site] if masks is not None and site in masks else gate.mask).detach().cpu()
    kept = mask > 0
    return kept, gate.theta_mean.detach().cpu().to(dtype) * kept.to(dtype)


def _selection(site_gate, masks, n: int, dtype):
    """Kept unit indices and their folded gate values (one dead unit when none is kept)."""
    if site_gate is None:
        return torch.arange(n), None
    kept, value = _gate_values(site_gate, masks, dtype)
    keep = kept.nonzero().squeeze(-1)
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long)  # a dead unit: value 0
    return keep, value.index_select(0, keep)


def _export_layer(name, m, flow: _Flow, site_gate, masks, input_gate=None):
    weight = m.weight.detach().cpu()
    bias = None if m.bias is None else m.bias.detach().cpu()
    n_out = weight.shape[0]
    keep, value = _selection(site_gate, masks, n_out, weight.dtype)
    select = None
    if input_gate is not None:
        # gate -> Linear: E[theta] of each kept input scales its column; a removed input's column
        # is 0, so that the constants of removed upstream units it carried vanish too.
        in_mask, in_value = _gate_values(input_gate, masks, weight.dtype)
        weight = weight * in_value
    w_in, b = _fold_inputs(weight, bias, flow, n_out)
    if input_gate is not None:
        # Of the features present (flow.keep), those the input gate keeps.
        pos = in_mask.index_select(0, flow.keep).nonzero().squeeze(-1)
        if pos.numel() < flow.keep.numel():
            if pos.numel() == 0:
                pos = torch.zeros(1, dtype=torch.long)  # one dead input (a zero column)
            w_in = w_in.index_select(1, pos)
            select = FeatureSelect(pos)
    w = w_in.index_select(0, keep)
    b = b.index_select(0, keep)
    pending = None
    if value is not None:
        if site_gate[1].after_norm:
            pending = (keep, value)
        else:
            # conv / linear -> gate -> bias: g scales the weights; the bias of a dead unit (a
            # fully removed layer) is masked to 0 as in the gated network.
            w = w * value.reshape((-1,) + (1,) * (w.dim() - 1))
            b = torch.where(value != 0, b, torch.zeros_like(b))
    if isinstance(m, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=True)
    else:
        new = nn.Conv2d(
            w.shape[1],
            w.shape[0],
            m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            bias=True,
            padding_mode=m.padding_mode,
        )
        if m.groups != 1:
            raise NotImplementedError(f"grouped convolution {name!r} cannot be exported")
        if flow.removed.numel() and bool((flow.const != 0).any()) and _has_padding(m):
            raise NotImplementedError(
                f"{name!r} pads its input, whose removed channels are non-zero constants"
            )
    new.weight = nn.Parameter(w.clone())
    new.bias = nn.Parameter(b.clone())
    # Downstream of this layer: its kept units; a removed unit outputs exactly 0 (and so does a
    # dead unit, through its zero weights and bias).
    flow.set(keep, n_out, torch.zeros(n_out - keep.numel(), dtype=w.dtype))
    if select is not None:
        new = nn.Sequential(OrderedDict(select=select, layer=new))
    return new, pending


def _has_padding(m) -> bool:
    p = m.padding
    return p == "same" or (isinstance(p, tuple) and any(p)) or (isinstance(p, int) and p > 0)


def _export_norm(name, m, flow: _Flow, gate_after, pending, masks):
    keep = flow.keep
    new = _plain_copy(m)
    mean = m.running_mean.detach().cpu()
    var = m.running_var.detach().cpu()
    weight = m.weight.detach().cpu() if m.affine else torch.ones_like(mean)
    bias = m.bias.detach().cpu() if m.affine else torch.zeros_like(mean)
    w, b = weight.index_select(0, keep), bias.index_select(0, keep)
    if gate_after is not None:
        if pending is None:
            raise RuntimeError(f"norm {name!r} carries a gate but follows no gated layer")
        _, value = pending
        w, b = w * value, b * value
    elif flow.const.numel():
        # A removed channel's constant goes through the norm too.
        removed = flow.removed
        flow.const = (flow.const - mean[removed]) / torch.sqrt(var[removed] + m.eps) * weight[
            removed
        ] + bias[removed]
    new.num_features = keep.numel()
    new.running_mean = mean.index_select(0, keep).clone()
    new.running_var = var.index_select(0, keep).clone()
    new.weight = nn.Parameter(w.clone())
    new.bias = nn.Parameter(b.clone())
    new.affine = True
    return new


def _flatten_flow(flow: _Flow, shape, m: nn.Flatten) -> None:
    if len(shape) <= 1 or m.start_dim != 1:
        return
    c = shape[0]
    block = int(torch.tensor(shape[1:]).prod().item())
    offsets = torch.arange(block)
    keep = (flow.keep.unsqueeze(1) * block + offsets).reshape(-1)
    const = flow.const.repeat_interleave(block)
    flow.set(keep, c * block, const)
    # _Flow.set recomputes `removed` in order of feature index, and the constants were laid
    # out by removed channel, channel-major: the same order.


def _rebuild(net: nn.Module, new_leaves: dict[str, nn.Module]) -> nn.Module:
    def build(prefix: str, module: nn.Module) -> nn.Module:
        children = [(n, c) for n, c in module.named_children() if not isinstance(c, SBPGate)]
        if not children:
            return new_leaves[prefix]
        return nn.Sequential(
            OrderedDict((n, build(f"{prefix}.{n}" if prefix else n, c)) for n, c in children)
        )

    return build("", net)


def _streamline(net: nn.Sequential) -> nn.Sequential:
    """Rewrites that change the cost, not the function.

    * The input normalisation is folded into the first layer when only a ``Flatten`` lies
      between them and the layer is a ``Linear``, or an unpadded ``Conv2d`` with per-channel
      statistics: :math:`W' = W / s`, :math:`b' = b - W' m`.
    * An activation followed by a ``MaxPool2d`` is moved after it: a non-decreasing
      element-wise function commutes with the maximum, and it then touches 1/k^2 of the values.
    * ``MaxPool2d(2)`` becomes :class:`MaxPool2x2` (two strided maxima, same values, faster).
    """
    leaves = [(name, m) for name, m in net.named_modules() if not list(m.children())]
    _fold_normalization(net, leaves)
    for parent in [m for m in net.modules() if isinstance(m, nn.Sequential)]:
        keys = list(parent._modules)
        for i in range(len(keys) - 1):
            act, pool = parent._modules[keys[i]], parent._modules[keys[i + 1]]
            if commutes_with_max(act) and isinstance(pool, nn.MaxPool2d):
                parent._modules[keys[i]], parent._modules[keys[i + 1]] = pool, act
        for key in keys:
            if _is_max_pool_2x2(parent._modules[key]):
                parent._modules[key] = MaxPool2x2()
    return net


def _set_leaf(net: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    parent._modules[child] = module


@torch.no_grad()
def _fold_normalization(net: nn.Module, leaves) -> None:
    if not leaves or not isinstance(leaves[0][1], InputNormalization):
        return
    norm_name, norm = leaves[0]
    rest = leaves[1:]
    i = 0
    index = None
    while i < len(rest) and isinstance(rest[i][1], nn.Flatten | nn.Identity | FeatureSelect):
        if isinstance(rest[i][1], FeatureSelect):
            if index is not None:
                return
            index = rest[i][1].index
        i += 1
    if i == len(rest):
        return
    _, layer = rest[i]
    mean, std = norm.mean[0], norm.std[0]
    if index is not None:
        if not isinstance(layer, nn.Linear):
            return
        mean, std = mean.reshape(-1).index_select(0, index), std.reshape(-1).index_select(0, index)
    if isinstance(layer, nn.Linear) and mean.numel() == layer.in_features:
        m, s = mean.reshape(-1), std.reshape(-1)
        w = layer.weight / s
        layer.bias.copy_(layer.bias - w @ m)
        layer.weight.copy_(w)
    elif (
        isinstance(layer, nn.Conv2d)
        and i == 0
        and index is None
        and not _has_padding(layer)
        and mean.dim() == 3
        and bool((mean == mean[:, :1, :1]).all())
        and bool((std == std[:, :1, :1]).all())
    ):
        m, s = mean[:, 0, 0], std[:, 0, 0]
        w = layer.weight / s.reshape(1, -1, 1, 1)
        layer.bias.copy_(layer.bias - (w * m.reshape(1, -1, 1, 1)).sum(dim=(1, 2, 3)))
        layer.weight.copy_(w)
    else:
        return
    _set_leaf(net, norm_name, nn.Identity())


def export_full(
    net: nn.Module, input_shape: tuple[int, ...], *, channels_last: bool = True
) -> nn.Module:
    """The unpruned network with :math:`\\mathbb E[\\theta]` folded in (every unit kept)."""
    masks = {site: torch.ones(g.num_units) for site, g in named_gates(net)}
    return export_pruned(net, input_shape, masks, channels_last=channels_last)


def _quiet_jit():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    # torch 2.10+ deprecates TorchScript in favour of torch.export, but TorchScript is the format
    # that loads with nothing but torch.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit.*")
    # Scripting a torch.fx.GraphModule (a traced network's export) checks GraphModule.__init__,
    # whose annotated attributes torch's own checker warns about.
    warnings.filterwarnings(
        "ignore", category=UserWarning, message=r".*doesn't support instance-level annotations"
    )
    return ctx


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` without torch's deprecation warning.

    A TorchScript archive holds TorchScript code and tensors, not Python pickles of arbitrary
    objects: loading one runs no Python code.

    :raises FileNotFoundError: if there is no such file.
    :raises ValueError: if the file is not a TorchScript archive (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no TorchScript file at {path}")
    ctx = _quiet_jit()
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a TorchScript file, or is corrupt ({reason})") from None
    finally:
        ctx.__exit__(None, None, None)


def save_torchscript(module: nn.Module, path: str | Path) -> None:
    """Save as TorchScript (loads with ``torch.jit.load``, no pyro or pyro_sbp needed), through
    a temporary file and a rename, so that a failed save leaves the previous file intact."""
    module = module.eval()
    ctx = _quiet_jit()
    try:
        scripted = torch.jit.script(module)
        write_atomic(path, lambda f: torch.jit.save(scripted, f))
    finally:
        ctx.__exit__(None, None, None)
