"""Gates on the traced graph of any network: ``torch.fx`` tracing, shape propagation, and the
channels that must be removed together.

:func:`gate_graph` is what :func:`~pyro_sbp.models.make_prunable` does for a network that is not
built from ``nn.Sequential`` containers (ResNets, MobileNets, DenseNets, ...). The network is
traced by ``torch.fx`` (a :class:`GateTracer`, whose ``leaf_modules`` are the usual escape hatch
for code fx cannot trace), its tensors' shapes are propagated from an example input
(:class:`torch.fx.passes.shape_prop.ShapeProp`), and every channel (dim 1) of every tensor is
labelled with the output channel of the ``Conv2d``/``Linear`` layer it comes from. Operations
that tie channels together merge their labels (a union-find):

* element-wise joins of two tensors (residual adds, the channel-wise products of
  squeeze-and-excitation): channel ``c`` of one with channel ``c`` of the other;
* concatenation on dim 1: the channels side by side, each keeping its label;
* grouped and depthwise convolutions: each group's input and output channels are one unit (a
  group is removed whole, so that every remaining group has the same width);
* ``GroupNorm``: the channels of a group are one unit (its statistics are shared);
* flatten into a ``Linear``: each flattened feature carries its channel's label.

A *unit* is a set of tied channels; a *gate* is a connected set of layers and their units, one
:class:`~pyro_sbp.models.SBPGate` with one :math:`\\theta` per unit, named after its first layer
(``"layer1.0.conv1.gate"``). The gates are nodes of the graph: one node per gate samples its
:math:`\\theta` (once per forward pass), and a :func:`gate_channels` node multiplies the channels
at every point where the gate acts, all sharing that one sample:

* after each producing layer's norm when the layer's only reader is a ``BatchNorm``/
  ``GroupNorm`` of its channels (``conv -> BN -> gate``), otherwise on the layer's bias-free
  response (``conv -> gate -> bias``);
* after every other norm that reads gated channels (pre-activation networks such as DenseNet,
  ``BN -> ReLU -> conv``), so that no batch statistics can undo a gate in training.

Everything else that meets a gated channel must be a known channel-wise operation (activations,
pooling, dropout, means over spatial dims); anything else (a channel shuffle, a reshape or
transpose that mixes channels, a softmax or ``LayerNorm`` across channels, an unknown module or
function) raises a :class:`ValueError` naming the node and the op when the network is prepared,
never a wrong export later. This module uses ``torch.fx`` and its shape propagation as the
dependency engine (``docs/math.md``, section "Coupled channels", says why not Torch-Pruning's).
"""

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from pyro_sbp.models.gate import SBPGate
from pyro_sbp.models.nets import Normalize

_PRODUCERS = (nn.Conv2d, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_NORMS = (*_BATCH_NORMS, nn.GroupNorm)
#: Modules that act on each channel separately.
CHANNELWISE_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Upsample,
)
#: Functions (and tensor methods, by name) that act on each channel separately.
_CHANNELWISE_FUNCTIONS: set = {
    torch.relu,
    torch.relu_,
    torch.sigmoid,
    torch.tanh,
    torch.clamp,
    torch.clip,
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.sigmoid,
    F.tanh,
    F.softplus,
    F.dropout,
    F.dropout2d,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.interpolate,
}
_CHANNELWISE_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "clamp",
    "clamp_",
    "clip",
    "contiguous",
    "float",
    "to",
    "type_as",
    "detach",
    "clone",
}
_BINARY = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCTION_METHODS = {"mean", "sum", "amax", "amin"}
_SHAPE_METHODS = {"size", "dim"}


def _stochastic_depth() -> set:
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return set()
    return {stochastic_depth}


#: Functions that scale whole examples (each channel alike) in training and are the identity in
#: evaluation: replaced by their modules (which follow the network's train()/eval()).
EVAL_IDENTITY_FUNCTIONS: set = {F.dropout, F.dropout2d, *_stochastic_depth()}


def _stochastic_depth_module() -> tuple[type, ...]:
    try:
        from torchvision.ops import StochasticDepth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return ()
    return (StochasticDepth,)


#: Modules that are the identity in evaluation (dropped from an export).
EVAL_IDENTITY_MODULES: tuple[type, ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    *_stochastic_depth_module(),
)


class GateTracer(fx.Tracer):
    """``torch.fx``'s tracer with more leaf modules: the input normalisation of the built-in
    networks, and the types or qualified names in ``leaf_modules`` (the escape hatch for modules
    fx cannot trace: a leaf is called as a whole, and must not meet gated channels)."""

    def __init__(self, leaf_modules: Iterable[type | str] = ()):
        super().__init__()
        leaves = list(leaf_modules)
        self._leaf_types = tuple(t for t in leaves if isinstance(t, type))
        self._leaf_names = {n for n in leaves if isinstance(n, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, Normalize) or module_qualified_name in self._leaf_names:
            return True
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(net: nn.Module, leaf_modules: Iterable[type | str] = ()) -> fx.GraphModule:
    """``net`` traced by a :class:`GateTracer` (a ``GraphModule`` sharing ``net``'s modules).

    :raises ValueError: when fx cannot trace ``net``, with fx's reason and the hint to pass the
        module at fault in ``leaf_modules``.
    """
    tracer = GateTracer(leaf_modules)
    # Traced in evaluation mode: Python branches on `self.training` (auxiliary outputs) take
    # their inference path, the one an export runs.
    modes = {name: m.training for name, m in net.named_modules()}
    net.eval()
    try:
        graph = tracer.trace(net)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"torch.fx cannot trace {type(net).__name__} ({reason}); pass the module that "
            "fx cannot follow in leaf_modules"
        ) from None
    finally:
        for name, m in net.named_modules():
            m.training = modes[name]
    name = type(net).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.input_shape = getattr(net, "input_shape", None)
    return gm


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []
        self.fixed: list[bool] = []
        self.layer: list[str | None] = []

    def new(self, n: int, layer: str | None, fixed: bool) -> Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.fixed.extend([fixed] * n)
        self.layer.extend([layer] * n)
        return torch.arange(start, start + n)

    def find(self, e: int) -> int:
        root = e
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[e] != root:
            self.parent[e], e = root, self.parent[e]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra
            self.fixed[ra] = self.fixed[ra] or self.fixed[rb]

    def union_all(self, a: Tensor, b: Tensor) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            self.union(x, y)


@dataclass
class GatePoint:
    """Where a gate acts: after ``node`` (a producing layer, or a norm), on its channels.

    ``units[c]`` is the ``(site, unit)`` of channel ``c``, or ``None`` for a channel that no gate
    can remove; ``bias`` is the layer whose bias the gate goes before (``conv -> gate -> bias``),
    ``None`` when it acts on the whole value (after a norm, or a layer without bias).
    """

    node: str
    units: list
    bias: str | None = None


@dataclass
class GraphGates:
    """The result of the channel analysis of a traced network (kept on the prepared network as
    ``net._sbp_graph``, read by the exporter)."""

    #: ``{site: number of units}`` in gate order.
    sites: dict[str, int] = field(default_factory=dict)
    #: ``{site: [layer names]}``: the producing layers of each gate, in graph order.
    layers: dict[str, list[str]] = field(default_factory=dict)
    #: ``{node name: [(site, unit) or None per channel]}`` for every tensor with channels.
    channels: dict[str, list] = field(default_factory=dict)
    points: list[GatePoint] = field(default_factory=list)
    #: The layers whose outputs are the network's outputs (never gated).
    classifiers: list[str] = field(default_factory=list)


def _target_name(target) -> str:
    return getattr(target, "__name__", str(target))


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} ({node.target!r})"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "call_function":
        return f"function {_target_name(node.target)}"
    return node.op


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(meta.shape)


def _dim_arg(node: fx.Node, pos: int, name: str, default):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


class _Analysis:
    def __init__(self, gm: fx.GraphModule, layers: Sequence[str] | None):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.uf = _UnionFind()
        self.labels: dict[str, Tensor] = {}
        self.only = None if layers is None else set(layers)
        self.classifiers = self._classifiers()

    # -- helpers ----------------------------------------------------------------------------

    def _module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def _is_producer(self, node: fx.Node) -> bool:
        return isinstance(self._module(node), _PRODUCERS)

    def _classifiers(self) -> list[str]:
        # Layers from whose output the graph's output is reached without another layer.
        out = []
        for node in self.gm.graph.nodes:
            if not self._is_producer(node):
                continue
            stack, seen = list(node.users), set()
            while stack:
                user = stack.pop()
                if user in seen:
                    continue
                seen.add(user)
                if user.op == "output":
                    out.append(node.target)
                    break
                if not self._is_producer(user):
                    stack.extend(user.users)
        return out

    def gated(self, labels: Tensor | None) -> bool:
        return labels is not None and any(
            not self.uf.fixed[self.uf.find(e)] for e in labels.tolist()
        )

    def refuse(self, node: fx.Node, why: str):
        raise ValueError(
            f"node {node.name!r} ({_op_name(node, self.modules)}) {why}: its channels cannot "
            "be pruned; exclude the layers feeding it (make_prunable's `layers`) or make the "
            "module a leaf that meets no gated channel"
        )

    def fresh(self, node: fx.Node, fixed: bool, layer: str | None = None) -> Tensor | None:
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        return self.uf.new(shape[1], layer, fixed)

    def input_labels(self, node: fx.Node) -> list[tuple[fx.Node, Tensor]]:
        out = []
        for a in node.all_input_nodes:
            lab = self.labels.get(a.name)
            if lab is not None:
                out.append((a, lab))
        return out

    def opaque(self, node: fx.Node) -> Tensor | None:
        for _, lab in self.input_labels(node):
            if self.gated(lab):
                self.refuse(node, "is not an operation whose effect on channels export knows")
        return self.fresh(node, fixed=True)

    # -- the rules --------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            lab = self.rule(node)
            if lab is not None:
                shape = _shape(node)
                if shape is None or len(shape) < 2 or lab.numel() != shape[1]:
                    raise AssertionError(f"labels of {node.name} do not match its shape {shape}")
                self.labels[node.name] = lab

    def rule(self, node: fx.Node) -> Tensor | None:
        if node.op == "placeholder":
            return self.fresh(node, fixed=True)
        if node.op in ("output", "get_attr"):
            return None
        if node.op == "call_module":
            return self.module_rule(node, self.modules[node.target])
        if node.op == "call_function":
            return self.function_rule(node, node.target)
        if node.op == "call_method":
            return self.method_rule(node, node.target)
        return self.opaque(node)  # pragma: no cover

    def first(self, node: fx.Node) -> Tensor | None:
        arg = node.args[0] if node.args else None
        return self.labels.get(arg.name) if isinstance(arg, fx.Node) else None

    def module_rule(self, node: fx.Node, m: nn.Module) -> Tensor | None:
        x = self.first(node)
        if isinstance(m, _PRODUCERS):
            fixed = node.target in self.classifiers or (
                self.only is not None and node.target not in self.only
            )
            out = self.fresh(node, fixed=fixed, layer=node.target)
            if isinstance(m, nn.Linear) and len(_shape(node)) != 2:
                if self.gated(x):
                    self.refuse(node, "is a Linear on more than two dims")
                return self.fresh(node, fixed=True)
            if isinstance(m, nn.Conv2d) and m.groups > 1 and x is not None:
                g = m.groups
                ins, outs = x.reshape(g, -1), out.reshape(g, -1)
                for k in range(g):
                    members = torch.cat([ins[k], outs[k]]).tolist()
                    for e in members[1:]:
                        self.uf.union(members[0], e)
            return out
        if isinstance(m, nn.GroupNorm):
            if x is not None:
                for group in x.reshape(m.num_groups, -1):
                    for e in group.tolist()[1:]:
                        self.uf.union(int(group[0]), e)
            return x
        if isinstance(m, (*_BATCH_NORMS, *CHANNELWISE_MODULES, *EVAL_IDENTITY_MODULES)):
            return x
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if isinstance(m, nn.LayerNorm):
            shape = _shape(node)
            if len(m.normalized_shape) >= len(shape) - 1 and self.gated(x):
                self.refuse(node, "normalises across channels")
            return x
        if isinstance(m, nn.Softmax | nn.LogSoftmax):
            dim = m.dim if m.dim is not None else 1
            if dim in (1, 1 - len(_shape(node))) and self.gated(x):
                self.refuse(node, "normalises across channels")
            return x
        return self.opaque(node)

    def flatten(self, node: fx.Node, x: Tensor | None, start: int, end: int) -> Tensor | None:
        src = _shape(node.args[0]) if node.args else None
        if x is None or src is None:
            return self.opaque(node)
        nd = len(src)
        start, end = start % nd, end % nd
        if start >= 2 or start > end:
            return x
        if start == 1:
            block = 1
            for s in src[2 : end + 1]:
                block *= s
            return x.repeat_interleave(block)
        if self.gated(x):
            self.refuse(node, "flattens the batch dimension into the channels")
        return self.fresh(node, fixed=True)

    def binary(self, node: fx.Node) -> Tensor | None:
        out_shape = _shape(node)
        if out_shape is None or len(out_shape) < 2:
            return self.opaque(node)
        c = out_shape[1]
        joined: Tensor | None = None
        for a in node.args[:2]:
            if not isinstance(a, fx.Node):
                continue
            shape = _shape(a)
            if shape is None or not shape:
                continue
            pos = 1 - (len(out_shape) - len(shape))
            if pos < 0 or shape[pos] == 1:
                continue  # broadcast along the channels
            lab = self.labels.get(a.name) if pos == 1 else None
            if lab is None:
                lab = self.uf.new(c, None, fixed=True)  # a constant laid out per channel
            if joined is None:
                joined = lab
            else:
                self.uf.union_all(joined, lab)
        return joined if joined is not None else self.uf.new(c, None, fixed=True)

    def function_rule(self, node: fx.Node, fn: Callable) -> Tensor | None:
        if fn in _BINARY:
            return self.binary(node)
        if fn in _CHANNELWISE_FUNCTIONS or fn in EVAL_IDENTITY_FUNCTIONS:
            return self.first(node)
        if fn in (torch.cat, torch.concat):
            tensors = node.args[0] if node.args else node.kwargs["tensors"]
            dim = _dim_arg(node, 1, "dim", 0)
            labs = [self.labels.get(t.name) for t in tensors]
            if any(lab is None for lab in labs):
                return self.opaque(node)
            nd = len(_shape(node))
            if dim % nd == 1:
                return torch.cat(labs)
            for lab in labs[1:]:
                self.uf.union_all(labs[0], lab)
            return labs[0]
        if fn is torch.flatten:
            return self.flatten(
                node,
                self.first(node),
                _dim_arg(node, 1, "start_dim", 0),
                _dim_arg(node, 2, "end_dim", -1),
            )
        if fn in _REDUCTIONS:
            return self.reduction(node)
        if fn is operator.getitem:
            return self.getitem(node)
        if fn is getattr:
            return None
        if not self.input_labels(node):
            return self.fresh(node, fixed=True)
        return self.opaque(node)

    def method_rule(self, node: fx.Node, name: str) -> Tensor | None:
        if name in _BINARY_METHODS:
            return self.binary(node)
        if name in _CHANNELWISE_METHODS:
            return self.first(node)
        if name in _SHAPE_METHODS:
            return None
        if name == "flatten":
            return self.flatten(
                node,
                self.first(node),
                _dim_arg(node, 1, "start_dim", 0),
                _dim_arg(node, 2, "end_dim", -1),
            )
        if name in ("view", "reshape"):
            return self.reshape(node)
        if name in _REDUCTION_METHODS:
            return self.reduction(node)
        return self.opaque(node)

    def reduction(self, node: fx.Node) -> Tensor | None:
        x = self.first(node)
        src = _shape(node.args[0])
        dim = _dim_arg(node, 1, "dim", None)
        dims = [dim] if isinstance(dim, int) else list(dim or [])
        if x is None or src is None:
            return self.opaque(node)
        if dim is None or any(d % len(src) in (0, 1) for d in dims):
            return self.opaque(node)
        out = _shape(node)
        return x if out is not None and len(out) >= 2 and out[1] == src[1] else self.opaque(node)

    def reshape(self, node: fx.Node) -> Tensor | None:
        x = self.first(node)
        src, out = _shape(node.args[0]), _shape(node)
        if x is None or src is None or out is None:
            return self.opaque(node)
        if len(out) >= 2 and out[:2] == src[:2]:
            return x  # only the spatial dims change
        rest = 1
        for s in src[1:]:
            rest *= s
        if len(out) == 2 and out[0] == src[0] and out[1] == rest:
            return self.flatten(node, x, 1, -1)
        if self.gated(x):
            self.refuse(node, f"reshapes {src} to {out}, mixing channels")
        return self.fresh(node, fixed=True)

    def getitem(self, node: fx.Node) -> Tensor | None:
        base, index = node.args
        x = self.labels.get(base.name) if isinstance(base, fx.Node) else None
        if x is None:
            return None if _shape(node) is None else self.fresh(node, fixed=True)
        idx = index if isinstance(index, tuple) else (index,)
        whole = slice(None, None, None)
        if (len(idx) >= 2 and idx[0] == whole and idx[1] == whole) or (
            len(idx) == 1 and idx[0] == whole
        ):
            return x
        if len(idx) == 2 and idx[0] == whole and idx[1] is Ellipsis:
            return x
        if self.gated(x):
            self.refuse(node, "selects some of the channels")
        return self.fresh(node, fixed=True)


def _points(an: _Analysis, unit_of) -> list[GatePoint]:
    """Where the gates act (see the module docstring)."""
    gm = an.gm
    points: list[GatePoint] = []
    after_norm: set[str] = set()
    for node in gm.graph.nodes:
        m = an._module(node)
        if not isinstance(m, _PRODUCERS):
            continue
        units = unit_of(node.name)
        if units is None or all(u is None for u in units):
            continue
        users = list(node.users)
        norm = users[0] if len(users) == 1 else None
        if norm is not None and isinstance(an._module(norm), _NORMS) and norm.args[0] is node:
            points.append(GatePoint(norm.name, unit_of(norm.name)))
            after_norm.add(norm.name)
        else:
            bias = node.target if getattr(m, "bias", None) is not None else None
            points.append(GatePoint(node.name, units, bias))
    for node in gm.graph.nodes:
        if node.name in after_norm or not isinstance(an._module(node), _NORMS):
            continue
        units = unit_of(node.name)
        if units is not None and any(u is not None for u in units):
            points.append(GatePoint(node.name, units))
    return points


def analyse(
    gm: fx.GraphModule, example_input: Tensor, layers: Sequence[str] | None = None
) -> GraphGates:
    """The gates of a traced network: units (tied channels), gates (connected layers), and the
    points where each gate acts. ``gm``'s nodes get their shapes from ``example_input``
    (propagated in evaluation mode, without gradients, so that no BatchNorm statistics move).
    """
    modes = {name: m.training for name, m in gm.named_modules()}
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    finally:
        for name, m in gm.named_modules():
            m.training = modes[name]
    an = _Analysis(gm, layers)
    an.run()
    uf = an.uf
    # Units: the classes with an element from a layer and none fixed; gates: the layers linked
    # by units, in graph order.
    layer_order = [n.target for n in gm.graph.nodes if an._is_producer(n)]
    layer_parent = {name: name for name in layer_order}

    def lfind(a):
        while layer_parent[a] != a:
            a = layer_parent[a]
        return a

    members: dict[int, set[str]] = {}
    for e in range(len(uf.parent)):
        layer = uf.layer[e]
        if layer is not None:
            members.setdefault(uf.find(e), set()).add(layer)
    rank = {name: i for i, name in enumerate(layer_order)}
    for root, names in members.items():
        if uf.fixed[root]:
            continue
        names = sorted(names, key=rank.__getitem__)
        for other in names[1:]:
            a, b = lfind(names[0]), lfind(other)
            if a != b:
                if rank[b] < rank[a]:
                    a, b = b, a
                layer_parent[b] = a
    result = GraphGates(classifiers=list(an.classifiers))
    unit_index: dict[int, tuple[str, int]] = {}
    for node in gm.graph.nodes:
        if not an._is_producer(node):
            continue
        lab = an.labels.get(node.name)
        if lab is None:
            continue
        for e in lab.tolist():
            root = uf.find(e)
            if uf.fixed[root] or root in unit_index:
                continue
            site = f"{lfind(node.target)}.gate"
            n = result.sites.get(site, 0)
            result.sites[site] = n + 1
            unit_index[root] = (site, n)
    for node in gm.graph.nodes:
        if an._is_producer(node) and node.name in an.labels:
            for e in an.labels[node.name].tolist():
                unit = unit_index.get(uf.find(e))
                if unit is not None and node.target not in result.layers.setdefault(unit[0], []):
                    result.layers[unit[0]].append(node.target)
    for name, lab in an.labels.items():
        result.channels[name] = [unit_index.get(uf.find(e)) for e in lab.tolist()]
    result.points = _points(an, result.channels.get)
    return result


def gate_channels(
    x: Tensor,
    thetas: tuple[Tensor, ...],
    index: Tensor | None,
    bias: Tensor | None = None,
    masks: tuple[Tensor, ...] | None = None,
) -> Tensor:
    """``x`` with each channel scaled by its unit's :math:`\\theta` (a gate node of a traced
    network). ``thetas`` are the values of the gates involved, ``(units,)`` or
    ``(batch, units)`` each; ``index`` picks each channel's unit from their concatenation, whose
    last entry is 1 for a channel that no gate removes (``None``: one gate, one unit per
    channel). With the layer's ``bias``, the gate acts on the bias-free response and the
    bias is kept on the units that ``masks`` keep: ``(x - b) theta + b mask``.
    """
    theta = _per_channel(thetas, index)
    shape = (theta.shape[0] if theta.dim() == 2 else 1, x.shape[1]) + (1,) * (x.dim() - 2)
    theta = theta.reshape(shape)
    if bias is None:
        return x * theta
    b = bias.reshape((1, -1) + (1,) * (x.dim() - 2))
    mask = _per_channel(masks, index).reshape(b.shape)
    return (x - b) * theta + b * mask


def _per_channel(values: tuple[Tensor, ...], index: Tensor | None) -> Tensor:
    if index is None:
        return values[0]
    batch = max(v.dim() for v in values) == 2
    if batch:
        n = max(v.shape[0] for v in values if v.dim() == 2)
        values = tuple(v.expand(n, -1) if v.dim() == 1 else v for v in values)
    one = values[0].new_ones((*values[0].shape[:-1], 1))
    return torch.cat([*values, one], dim=-1).index_select(-1, index)


class GatePoints(nn.Module):
    """Holds the channel-to-unit index of each gate point (non-persistent buffers: rebuilt with
    the network, not saved)."""


def point_index(point: GatePoint, sites: Sequence[str], sizes: dict[str, int]) -> Tensor | None:
    """The index of :func:`gate_channels` for ``point`` given the gates ``sites`` it uses."""
    if len(sites) == 1 and [u for u in point.units] == [
        (sites[0], j) for j in range(sizes[sites[0]])
    ]:
        return None
    offset, total = {}, 0
    for s in sites:
        offset[s] = total
        total += sizes[s]
    return torch.tensor(
        [total if u is None else offset[u[0]] + u[1] for u in point.units], dtype=torch.long
    )


def _train_only_module(node: fx.Node) -> nn.Module:
    def arg(pos, name, default):
        return _dim_arg(node, pos, name, default)

    if node.target is F.dropout:
        return nn.Dropout(arg(1, "p", 0.5))
    if node.target is F.dropout2d:
        return nn.Dropout2d(arg(1, "p", 0.5))
    from torchvision.ops import StochasticDepth

    return StochasticDepth(arg(1, "p", None), arg(2, "mode", None))


def _follow_training_flag(gm: fx.GraphModule) -> None:
    # fx records `training=self.training` of a functional dropout or stochastic depth as the
    # constant it was when traced; the graph calls the equivalent module instead, which reads
    # its own flag, so that the traced network's eval() switches them off.
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in EVAL_IDENTITY_FUNCTIONS:
            continue
        name = f"sbp_{node.name}"
        gm.add_submodule(name, _train_only_module(node))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def gate_graph(
    net: nn.Module,
    example_input: Tensor,
    layers: Sequence[str] | None = None,
    *,
    low: float,
    high: float,
    leaf_modules: Iterable[type | str] = (),
) -> fx.GraphModule:
    """The traced network with its gates as graph nodes (see the module docstring). The
    returned ``GraphModule`` shares ``net``'s parameters; its gates are registered on their
    first layers (``"<layer>.gate"``)."""
    gm = trace(net, leaf_modules)
    _follow_training_flag(gm)
    if layers is not None:
        modules = dict(gm.named_modules())
        for name in layers:
            if not isinstance(modules.get(name), _PRODUCERS):
                used = sorted(n for n, m in modules.items() if isinstance(m, _PRODUCERS))
                raise ValueError(f"no Linear or Conv2d layer named {name!r}; layers: {used}")
    info = analyse(gm, example_input, layers)
    if not info.sites:
        raise ValueError(
            f"{type(net).__name__} has no Linear or Conv2d layer whose units could be gated"
        )
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    theta_nodes: dict[str, fx.Node] = {}
    for site, n in info.sites.items():
        layer = gm.get_submodule(site.rpartition(".")[0])
        layer.gate = SBPGate(n, low, high)
        layer.gate.after_norm = False
    # Gate nodes in module order (the order the guide samples them in).
    order = [name for name, m in gm.named_modules() if isinstance(m, SBPGate)]
    with graph.inserting_after(placeholders[-1]):
        for site in reversed(order):
            theta_nodes[site] = graph.call_module(site, ())
    gm.add_module("sbp_points", GatePoints())
    nodes = {n.name: n for n in graph.nodes}
    for k, point in enumerate(info.points):
        node = nodes[point.node]
        sites = sorted({u[0] for u in point.units if u is not None}, key=order.index)
        index = point_index(point, sites, info.sites)
        with graph.inserting_after(node):
            if index is None:
                index_node = None
            else:
                gm.sbp_points.register_buffer(f"p{k}", index, persistent=False)
                index_node = graph.get_attr(f"sbp_points.p{k}")
        after = index_node if index_node is not None else node
        with graph.inserting_after(after):
            bias = masks = None
            if point.bias is not None:
                bias = graph.get_attr(f"{point.bias}.bias")
                with graph.inserting_after(bias):
                    masks = tuple(graph.get_attr(f"{s}.mask") for s in sites)
                after = masks[-1]
        with graph.inserting_after(after):
            gated = graph.call_function(
                gate_channels,
                (node, tuple(theta_nodes[s] for s in sites), index_node, bias, masks),
            )
        node.replace_all_uses_with(gated, delete_user_cb=lambda user, g=gated: user is not g)
    graph.lint()
    gm.recompile()
    gm._sbp_graph = info
    return gm


def unit_weight_norms(net: fx.GraphModule, site: str) -> Tensor:
    """The L2 norm of each unit's weights in a traced network, in float64: over the rows (output
    channels) of every layer of the gate that produce the unit's channels."""
    info = net._sbp_graph
    modules = dict(net.named_modules())
    sq = torch.zeros(info.sites[site], dtype=torch.float64)
    for node in net.graph.nodes:
        if node.op != "call_module" or node.target not in info.layers[site]:
            continue
        w = modules[node.target].weight.detach().cpu().double()
        rows = w.reshape(w.shape[0], -1).square().sum(1)
        for c, unit in enumerate(info.channels[node.name]):
            if unit is not None and unit[0] == site:
                sq[unit[1]] += rows[c]
    return sq.sqrt()
