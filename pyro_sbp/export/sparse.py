r"""Export of a Sparse VD network: the dead units removed physically, the surviving weights
stored as ``torch.sparse`` CSR.

:func:`export_sparse_vd` turns a network prepared with
:func:`~pyro_sbp.models.sparse_vd.make_sparse_vd` into a plain ``nn.Sequential`` that computes
what the masked network computes in evaluation (:math:`\theta` times the keep-mask), with

* every unit removed that cannot change the output: a unit whose kept incoming weights all
  come from inputs that are constant outputs a constant (its bias through the activation),
  which is folded into the next layer's bias; a unit none of whose outgoing weights into the
  next layer's kept units is kept is unused; both go, together with the matching columns
  (channels, or blocks of features through a ``Flatten``) of the next layer;
* the input features that the first layer no longer reads, when it is a ``Linear`` after the
  flattening (a :class:`~pyro_sbp.export.FeatureSelect`, the SBP exporter's);
* the weights of what is left dense (``sparse=False``: a smaller dense architecture that
  TorchScript and ONNX take as they are) or in CSR (``sparse=True``: :class:`SparseLinear`,
  :class:`SparseConv2d`, int32 indices), whose sizes :func:`sparse_storage` reports with
  :math:`|W| / |W \neq 0|` per layer and in total.

The reduction reuses the SBP exporter's pieces (:mod:`pyro_sbp.export.exporter`): the leaf
walk, the input normalisation, the folding of removed inputs' constants into the bias, the
rebuilt containers and the cost-only rewrites.
"""

import itertools
import json
import math
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_sbp.export.exporter import (
    _CHANNELWISE,
    _POOLS,
    FeatureSelect,
    InputNormalization,
    MaxPool2x2,
    _check_sequential,
    _export_normalize,
    _Flow,
    _fold_inputs,
    _has_padding,
    _leaf_shapes,
    _leaves,
    _plain_copy,
    _rebuild,
    _streamline,
)
from pyro_sbp.infer.checkpoint import CheckpointError, safe_load, save_atomic
from pyro_sbp.models.nets import Normalize
from pyro_sbp.models.sparse_vd import SPARSE_VD_LAYERS, check_weight_masks

_LAYERS = (nn.Linear, nn.Conv2d)


class SparseLinear(nn.Module):
    r"""``y = x W^\top + b`` with ``W`` a CSR matrix (``torch.sparse_csr_tensor``, int32
    indices), computed as the CSR product :math:`W x^\top`.

    :param Tensor weight: the dense weight ``(out, in)``; its zeros are not stored.
    :param Tensor bias: ``(out,)``.
    """

    def __init__(self, weight: Tensor, bias: Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", _csr(weight.detach().reshape(weight.shape[0], -1)))
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.mm(self.weight, x.t()).t() + self.bias

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


class SparseConv2d(nn.Module):
    r"""A ``Conv2d`` with its weight ``(out, in * kh * kw)`` in CSR, computed as the CSR
    product with the unfolded input (im2col).

    :param Tensor weight: the dense weight ``(out, in, kh, kw)``; its zeros are not stored.
    :param Tensor bias: ``(out,)``.
    """

    def __init__(self, weight: Tensor, bias: Tensor, stride=1, padding=0, dilation=1):
        super().__init__()
        self.out_channels, self.in_channels, kh, kw = weight.shape
        self.kernel_size = (kh, kw)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.register_buffer("weight", _csr(weight.detach().reshape(weight.shape[0], -1)))
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        n = cols.shape[-1]
        out = torch.mm(self.weight, cols.transpose(0, 1).reshape(cols.shape[1], b * n))
        out = out.reshape(self.out_channels, b, n).transpose(0, 1)
        kh, kw = self.kernel_size
        sh, sw = _pair(self.stride)
        ph, pw = _pair(self.padding)
        dh, dw = _pair(self.dilation)
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return out.reshape(b, self.out_channels, oh, ow) + self.bias.reshape(1, -1, 1, 1)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, nnz={nnz}"
        )


def _pair(v):
    return tuple(v) if isinstance(v, tuple | list) else (v, v)


def _csr(w2: Tensor) -> Tensor:
    with warnings.catch_warnings():
        # torch's notice that CSR support is in beta, and that invariant checks are off.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
        warnings.filterwarnings("ignore", message="Sparse invariant checks", category=UserWarning)
        csr = w2.to_sparse_csr()
        return torch.sparse_csr_tensor(
            csr.crow_indices().to(torch.int32),
            csr.col_indices().to(torch.int32),
            csr.values(),
            size=w2.shape,
            check_invariants=True,
        )


# --- which units go ----------------------------------------------------------------------------


def _weight_keep(m: nn.Module, masks) -> Tensor:
    """The keep-mask of a layer's weights: ``masks="all"`` keeps all, a dict gives them, else
    the layer's own evaluation rule (its mask and threshold)."""
    if masks == "all" or not isinstance(m, SPARSE_VD_LAYERS):
        return torch.ones_like(m.weight, dtype=torch.bool).cpu()
    if isinstance(masks, dict):
        return masks[m._sbp_name].cpu().bool()
    return m.keep().cpu()


def _cols(keep: Tensor) -> Tensor:
    """Per input column (channel of a conv, feature of a linear): any weight kept, per row."""
    return keep.reshape(keep.shape[0], keep.shape[1], -1).any(dim=2)


def _unit_plan(leaves, keeps) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(kept, varies)``: per layer, the output units kept and those whose output depends on
    the input (bool per unit); see the module's docstring."""
    layers = [name for name, m in leaves if isinstance(m, _LAYERS)]
    # For every layer but the first, how its input columns map to the previous layer's units:
    # `block` features per unit (through a Flatten), and whether it pads (a constant input
    # channel is then not constant at the borders: no unit is removed for being constant).
    block, pads = {}, {}
    order = [name for name, _ in leaves]
    for prev, name in itertools.pairwise(layers):
        between = order[order.index(prev) + 1 : order.index(name)]
        n_prev = keeps[prev].shape[0]
        n_in = keeps[name].shape[1]
        if n_in % n_prev:
            raise NotImplementedError(f"{name!r} reads {n_in} inputs from {n_prev} units")
        block[name] = n_in // n_prev
        flattened = any(isinstance(dict(leaves)[b], nn.Flatten) for b in between)
        if block[name] != 1 and not flattened:
            raise NotImplementedError(f"{name!r} reads {n_in} inputs from {n_prev} units")
        m = dict(leaves)[name]
        pads[name] = isinstance(m, nn.Conv2d) and _has_padding(m)
    # Forward: which units vary with the input.
    varies: dict[str, Tensor] = {}
    for i, name in enumerate(layers):
        cols = _cols(keeps[name])
        if i == 0:
            inputs = torch.ones(cols.shape[1], dtype=torch.bool)
        else:
            inputs = varies[layers[i - 1]].repeat_interleave(block[name])
        varies[name] = (cols & inputs).any(dim=1)
    for i, name in enumerate(layers[:-1]):
        if pads[layers[i + 1]]:
            varies[name] = torch.ones_like(varies[name])
    # Backward: which units a kept unit of the next layer reads.
    kept = {layers[-1]: torch.ones(keeps[layers[-1]].shape[0], dtype=torch.bool)}
    for i in range(len(layers) - 2, -1, -1):
        name, nxt = layers[i], layers[i + 1]
        cols = _cols(keeps[nxt])[kept[nxt]].any(dim=0)
        used = cols.reshape(-1, block[nxt]).any(dim=1)
        kept[name] = varies[name] & used
    return kept, varies


@torch.no_grad()
def export_sparse_vd(
    net: nn.Module,
    input_shape: tuple[int, ...],
    masks: dict[str, Tensor] | str | None = None,
    *,
    sparse: bool = False,
    select_inputs: bool = True,
) -> nn.Sequential:
    r"""A plain ``nn.Sequential`` computing what the Sparse VD network ``net`` computes in
    evaluation, with its dead units physically removed (see the module's docstring).

    :param net: a network prepared with :func:`~pyro_sbp.models.sparse_vd.make_sparse_vd`
        (``nn.Sequential`` containers).
    :param input_shape: the shape of one input.
    :param masks: the weight keep-masks by layer name; ``None``: each layer's own
        (:meth:`~pyro_sbp.models.sparse_vd.SparseVDLinear.keep`: its mask and
        :math:`\log\alpha \le` threshold); ``"all"``: every weight (the unpruned network).
    :param bool sparse: the kept weights in CSR (:class:`SparseLinear`,
        :class:`SparseConv2d`) instead of dense layers.
    :param bool select_inputs: drop the input features that the first layer (a ``Linear``)
        no longer reads.
    :return: the exported network, in evaluation mode.
    """
    if isinstance(masks, dict):
        check_weight_masks(net, masks)
    elif masks not in (None, "all"):
        raise ValueError(f"masks must be a dict, None or 'all', got {masks!r}")
    _check_sequential(net)
    input_shape = tuple(input_shape)
    shapes = _leaf_shapes(net, input_shape)
    leaves = _leaves(net)
    for name, m in leaves:
        m._sbp_name = name
    try:
        keeps = {name: _weight_keep(m, masks) for name, m in leaves if isinstance(m, _LAYERS)}
    finally:
        for _, m in leaves:
            m.__dict__.pop("_sbp_name", None)
    if not keeps:
        raise ValueError("the network has no Linear or Conv2d layer")
    plan, varies = _unit_plan(leaves, keeps)
    layers = list(keeps)
    dtype = next(net.parameters()).dtype
    flow = _Flow(input_shape[0], dtype)
    new_leaves: dict[str, nn.Module] = {}
    for name, m in leaves:
        if shapes.get(name) is None:
            raise RuntimeError(f"module {name!r} is not reached by the forward pass")
        if isinstance(m, _LAYERS):
            select = select_inputs and name == layers[0]
            new_leaves[name] = _export_layer(
                m, keeps[name], plan[name], varies[name], flow, sparse, select
            )
        elif isinstance(m, nn.Flatten):
            new_leaves[name] = _plain_copy(m)
            shape = shapes[name]
            if len(shape) > 1 and m.start_dim == 1:
                block = math.prod(shape[1:])
                keep = (flow.keep.unsqueeze(1) * block + torch.arange(block)).reshape(-1)
                flow.set(keep, shape[0] * block, flow.const.repeat_interleave(block))
        elif isinstance(m, _CHANNELWISE):
            new = _plain_copy(m).eval()
            if flow.const.numel() and not isinstance(m, _POOLS):
                flow.const = new(flow.const)
            new_leaves[name] = new
        elif isinstance(m, Normalize) and name == leaves[0][0]:
            new_leaves[name] = _export_normalize(m, input_shape)
        else:
            raise NotImplementedError(
                f"Sparse VD export does not know how {type(m).__name__} ({name!r}) treats "
                "removed units"
            )
    return _streamline(_rebuild(net, new_leaves)).eval()


def _export_layer(m, keep, kept_units, varies, flow: _Flow, sparse: bool, select: bool):
    weight = m.weight.detach().cpu() * keep.to(m.weight.dtype)
    bias = None if m.bias is None else m.bias.detach().cpu()
    n_out = weight.shape[0]
    units = kept_units.nonzero().squeeze(-1)
    if units.numel() == 0:
        units = torch.zeros(1, dtype=torch.long)  # a dead unit: zero weights and bias
    w_in, b_all = _fold_inputs(weight, bias, flow, n_out)
    w, b = w_in.index_select(0, units), b_all.index_select(0, units)
    if not bool(kept_units.any()):
        w, b = torch.zeros_like(w), torch.zeros_like(b)
    # The removed units' outputs: a constant unit's value is its bias with the removed inputs'
    # constants folded in (its weights from varying inputs are all removed); an unused unit's
    # is taken as 0 (no weight that is kept, or that feeds a constant unit, reads it).
    removed = (~torch.isin(torch.arange(n_out), units)).nonzero().squeeze(-1)
    const = torch.where(~varies, b_all, torch.zeros_like(b_all)).index_select(0, removed)
    selector = None
    if select and isinstance(m, nn.Linear):
        reads = (w != 0).any(dim=0)
        if not bool(reads.all()):
            pos = reads.nonzero().squeeze(-1)
            if pos.numel() == 0:
                pos = torch.zeros(1, dtype=torch.long)
            w = w.index_select(1, pos)
            selector = FeatureSelect(pos)
    if sparse:
        if isinstance(m, nn.Linear):
            new = SparseLinear(w, b)
        else:
            new = SparseConv2d(w, b, m.stride, m.padding, m.dilation)
    elif isinstance(m, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0])
        new.weight, new.bias = nn.Parameter(w.clone()), nn.Parameter(b.clone())
    else:
        if m.groups != 1:
            raise NotImplementedError("grouped convolutions cannot be exported")
        new = nn.Conv2d(w.shape[1], w.shape[0], m.kernel_size, m.stride, m.padding, m.dilation)
        new.weight, new.bias = nn.Parameter(w.clone()), nn.Parameter(b.clone())
    if isinstance(m, nn.Conv2d) and _has_padding(m) and bool((flow.const != 0).any()):
        raise NotImplementedError("a padded convolution reads removed non-zero constants")
    flow.set(units, n_out, const)
    if selector is not None:
        return nn.Sequential(OrderedDict(select=selector, layer=new))
    return new


# --- storage -----------------------------------------------------------------------------------


def _sparse_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, SparseLinear | SparseConv2d)]


def _original_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in net.named_modules() if isinstance(m, _LAYERS)]


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _shape(m: nn.Module) -> list[int]:
    if isinstance(m, SparseLinear):
        return [m.out_features, m.in_features]
    return [m.out_channels, m.in_channels, *m.kernel_size]


def sparse_storage(module: nn.Module, net: nn.Module | None = None) -> dict:
    r"""Storage of an exported CSR network (``export_sparse_vd(..., sparse=True)``), per layer
    and in total: the kept weights :math:`|W \neq 0|`, the bytes of the CSR arrays (values,
    int32 column indices, int32 row pointers) and of the biases, and the layer's shape after
    the dead units went; with ``net`` (the network that was exported) also the original
    layer's :math:`|W|`, :math:`|W| / |W \neq 0|` and its dense float32 bytes (weights and
    biases), and in total the ratio of dense to CSR bytes.

    The layers are matched in order (the export keeps every Linear and Conv2d layer).
    """
    originals = _original_layers(net) if net is not None else []
    sparse = _sparse_layers(module)
    if net is not None and len(originals) != len(sparse):
        raise ValueError(
            f"the exported network has {len(sparse)} layers, the network {len(originals)}"
        )
    rows = {}
    total = {"nnz": 0, "csr_bytes": 0, "bias_bytes": 0, "weights": 0, "dense_bytes": 0}
    for i, (name, m) in enumerate(sparse):
        w = m.weight
        csr = _nbytes(w.values()) + _nbytes(w.col_indices()) + _nbytes(w.crow_indices())
        row = {
            "shape": _shape(m),
            "nnz": int(w.values().numel()),
            "csr_bytes": csr,
            "bias_bytes": _nbytes(m.bias),
        }
        if net is not None:
            orig_name, orig = originals[i]
            n = orig.weight.numel()
            row |= {
                "original_shape": list(orig.weight.shape),
                "weights": n,
                "compression": n / max(row["nnz"], 1),
                "dense_bytes": (n + orig.weight.shape[0]) * 4,
            }
            name = orig_name
            total["weights"] += n
            total["dense_bytes"] += row["dense_bytes"]
        total["nnz"] += row["nnz"]
        total["csr_bytes"] += csr
        total["bias_bytes"] += row["bias_bytes"]
        rows[name] = row
    if net is not None:
        total["compression"] = total["weights"] / max(total["nnz"], 1)
        stored = total["csr_bytes"] + total["bias_bytes"]
        total["storage_ratio"] = total["dense_bytes"] / max(stored, 1)
    return {"layers": rows, "total": total}


def format_storage(report: dict) -> str:
    """A table of :func:`sparse_storage`'s report."""
    head = f"{'layer':<14} {'shape':<16} {'|W|':>8} {'|W!=0|':>7} {'|W|/|W!=0|':>10} {'bytes':>8}"
    lines = [head]
    for name, r in report["layers"].items():
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"{name:<14} {shape:<16} {r.get('weights', 0):>8} {r['nnz']:>7} "
            f"{r.get('compression', math.nan):>10.1f} {r['csr_bytes'] + r['bias_bytes']:>8}"
        )
    t = report["total"]
    lines.append(
        f"{'total':<14} {'':<16} {t['weights']:>8} {t['nnz']:>7} "
        f"{t.get('compression', math.nan):>10.1f} {t['csr_bytes'] + t['bias_bytes']:>8}"
    )
    return "\n".join(lines)


# --- saving ------------------------------------------------------------------------------------

_PLAIN = {
    "ReLU": nn.ReLU,
    "Tanh": nn.Tanh,
    "Sigmoid": nn.Sigmoid,
    "Identity": nn.Identity,
    "MaxPool2x2": MaxPool2x2,
}


def _csr_parts(m) -> dict[str, Tensor]:
    w = m.weight
    return {
        "crow": w.crow_indices(),
        "col": w.col_indices(),
        "values": w.values(),
        "size": torch.tensor(list(w.shape)),
        "bias": m.bias,
    }


def _spec(m: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    if isinstance(m, SparseLinear):
        return {"kind": "SparseLinear"}, _csr_parts(m)
    if isinstance(m, SparseConv2d):
        spec = {"kind": "SparseConv2d", "shape": _shape(m)}
        for key in ("stride", "padding", "dilation"):
            spec[key] = list(_pair(getattr(m, key)))
        return spec, _csr_parts(m)
    if isinstance(m, InputNormalization):
        return {"kind": "InputNormalization"}, {"mean": m.mean[0], "std": m.std[0]}
    if isinstance(m, FeatureSelect):
        return {"kind": "FeatureSelect"}, {"index": m.index}
    if isinstance(m, nn.Flatten):
        return {"kind": "Flatten", "start_dim": m.start_dim, "end_dim": m.end_dim}, {}
    if type(m) is nn.MaxPool2d:
        keys = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        return {"kind": "MaxPool2d", **{k: getattr(m, k) for k in keys}}, {}
    if _PLAIN.get(type(m).__name__) is type(m):
        return {"kind": type(m).__name__}, {}
    raise NotImplementedError(f"cannot save a {type(m).__name__} in a sparse network file")


def _from_csr(crow, col, values, size) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support", category=UserWarning)
        # Checked: a corrupt file must not reach a CSR kernel with bad indices.
        return torch.sparse_csr_tensor(
            crow, col, values, size=size, check_invariants=True
        ).to_dense()


def save_sparse(module: nn.Module, path: str | Path) -> None:
    """Write an exported CSR network as plain tensors and values (read back safely by
    :func:`load_sparse`): its leaf modules in order, each a kind, its arguments, its tensors."""
    leaves = [m for _, m in module.named_modules() if not list(m.children())]
    specs, tensors = [], {}
    for i, m in enumerate(leaves):
        spec, ts = _spec(m)
        specs.append(spec)
        tensors |= {f"{i}.{k}": v.detach().cpu() for k, v in ts.items()}
    save_atomic({"format": "pyro-sbp sparse", "leaves": json.dumps(specs), **tensors}, path)


def load_sparse(path: str | Path) -> nn.Sequential:
    """The network written by :func:`save_sparse`, as a flat ``nn.Sequential``.

    :raises CheckpointError: for a file that is not one.
    """
    data = safe_load(Path(path), "sparse network file")
    if not isinstance(data, dict) or data.get("format") != "pyro-sbp sparse":
        raise CheckpointError(f"{path}: not a sparse network file written by save_sparse")
    mods = []
    for i, spec in enumerate(json.loads(data["leaves"])):
        kind = spec.pop("kind")
        t = {k.split(".", 1)[1]: v for k, v in data.items() if k.startswith(f"{i}.")}
        if kind in ("SparseLinear", "SparseConv2d"):
            size = tuple(int(s) for s in t["size"])
            w = _from_csr(t["crow"], t["col"], t["values"], size)
            if kind == "SparseLinear":
                mods.append(SparseLinear(w, t["bias"]))
            else:
                shape = spec.pop("shape")
                args = {k: tuple(v) for k, v in spec.items()}
                mods.append(SparseConv2d(w.reshape(shape), t["bias"], **args))
        elif kind == "InputNormalization":
            mods.append(InputNormalization(t["mean"], t["std"]))
        elif kind == "FeatureSelect":
            mods.append(FeatureSelect(t["index"]))
        elif kind == "Flatten":
            mods.append(nn.Flatten(**spec))
        elif kind == "MaxPool2d":
            mods.append(nn.MaxPool2d(**spec))
        elif kind in _PLAIN:
            mods.append(_PLAIN[kind]())
        else:
            raise CheckpointError(f"{path}: unknown module kind {kind!r}")
    return nn.Sequential(*mods).eval()


# --- the run report ----------------------------------------------------------------------------


def _plot_log_alpha(net: nn.Module, threshold: float, path: Path) -> None:
    from pyro_sbp.diagnostics.report import _pyplot
    from pyro_sbp.models.sparse_vd import log_alphas

    plt = _pyplot()
    las = log_alphas(net)
    fig, axes = plt.subplots(1, len(las), figsize=(3.2 * len(las), 3.2), squeeze=False)
    for ax, (name, la) in zip(axes[0], las.items(), strict=True):
        kept = int((la <= threshold).sum())
        ax.hist(la.reshape(-1).numpy(), bins=60, color="tab:blue")
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"log alpha = {threshold:g}")
        ax.set_yscale("log")
        ax.set_title(f"{name}: {kept}/{la.numel()} kept", fontsize=9)
        ax.set_xlabel("log alpha")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_sparse_vd_report(
    run_dir: str | Path,
    criterion: str | None = None,
    *,
    bench: bool = True,
    batch_sizes=(1, 256),
    min_run_time: float = 0.5,
    num_draws: int = 200,
) -> dict:
    r"""``pyro-sbp report`` of a Sparse VD run: the masks of ``criterion`` (default
    ``log-alpha:3``), test accuracy of the full and the pruned network, weights and units per
    layer, :math:`|W|/|W \neq 0|`, the CSR storage, parameters, FLOPs and CPU latency of the
    dense exports; writes ``report.json``, ``masks.pt``, ``full.pt``, ``pruned.pt``,
    ``sparse.pt``, ``sparse.json``, ``posterior.nc`` and ``plots/`` (log alpha histograms
    with the threshold, training curves) into ``run_dir``."""
    from pyro_sbp.diagnostics.report import _plot_training, prune_and_export
    from pyro_sbp.export import count_parameters
    from pyro_sbp.infer.checkpoint import write_text_atomic

    done = prune_and_export(
        run_dir,
        criterion,
        bench=bench,
        batch_sizes=batch_sizes,
        min_run_time=min_run_time,
        num_draws=num_draws,
    )
    run, trainer, criterion, result = done.run, done.trainer, done.criterion, done.result
    full_acc, pruned_acc, shape = done.accuracy_full, done.accuracy_pruned, done.input_shape
    full, pruned, measured = done.full, done.pruned, done.measured
    storage = json.loads((run / "sparse.json").read_text())
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    threshold = result.threshold if result.threshold is not None else 3.0
    _plot_log_alpha(trainer.net, threshold, plots / "log_alpha.png")
    _plot_training(trainer.history, plots / "training.png", plots / "units_kept.png")
    c = trainer.config
    report = {
        "method": c.method,
        "dataset": c.dataset,
        "network": c.model,
        "criterion": criterion,
        "training_criterion": c.prune_criterion,
        "input_shape": list(shape),
        "accuracy_full": full_acc,
        "accuracy_pruned": pruned_acc,
        "accuracy_split": "test",
        "layers": result.layer_rows(),
        "units": {
            name: {"before": r["units_before"], "after": r["units_after"]}
            for name, r in result.layer_rows().items()
        },
        "weights_total": result.weights_before,
        "weights_kept": result.weights_after,
        "compression": result.compression,
        "architecture_pruned": _architecture(pruned),
        "storage": storage["total"],
        "params_full": count_parameters(full),
        "params_pruned": count_parameters(pruned),
        "flops_full": measured["flops_full"],
        "flops_pruned": measured["flops_pruned"],
        "flops_reduction": measured["flops_reduction"],
        "flops_note": measured["flops_note"],
        "latency_cpu": measured["latency"],
        "speedup_cpu": {str(r["batch_size"]): r["speedup"] for r in measured["latency"]},
        "epochs": {"pretrain": trainer.pretrain_done, "svi": trainer.svi_done},
        "files": [
            "report.json",
            "posterior.nc",
            "full.pt",
            "pruned.pt",
            "sparse.pt",
            "sparse.json",
            "masks.pt",
            "plots/",
        ],
    }
    write_text_atomic(json.dumps(report, indent=1) + "\n", run / "report.json")
    return report


def _architecture(module: nn.Module) -> list[int]:
    """The widths of an exported network: its first layer's inputs, then every layer's
    outputs (channels of a conv, features of a linear)."""
    widths = []
    for m in module.modules():
        if isinstance(m, nn.Linear):
            widths += [m.in_features] if not widths else []
            widths.append(m.out_features)
        elif isinstance(m, nn.Conv2d):
            widths += [m.in_channels] if not widths else []
            widths.append(m.out_channels)
    return widths


def format_sparse_vd_summary(report: dict) -> str:
    """The text ``pyro-sbp report`` prints for a Sparse VD run."""
    lines = [
        f"{report['network']} on {report['dataset']} (sparse-vd), pruned with "
        f"{report['criterion']}",
        f"{'layer':<16} {'weights':>9} {'kept':>8} {'|W|/|W!=0|':>11} {'units':>11}",
    ]
    for name, r in report["layers"].items():
        lines.append(
            f"{name:<16} {r['weights_before']:>9} {r['weights_after']:>8} "
            f"{r['compression']:>11.1f} {r['units_after']:>5}/{r['units_before']:<5}"
        )
    s = report["storage"]
    lines += [
        f"total: {report['weights_kept']:,} of {report['weights_total']:,} weights kept, "
        f"|W|/|W!=0| = {report['compression']:.1f}; CSR {s['csr_bytes'] + s['bias_bytes']:,} "
        f"bytes against {s['dense_bytes']:,} dense ({s['storage_ratio']:.1f}x)",
        f"architecture after pruning: {'-'.join(map(str, report['architecture_pruned']))}",
        f"test accuracy: full {100 * report['accuracy_full']:.2f}%, "
        f"pruned {100 * report['accuracy_pruned']:.2f}%",
        f"FLOPs/example (dense exports): {report['flops_full']:,} -> {report['flops_pruned']:,} "
        f"({report['flops_reduction']:.2f}x fewer)",
    ]
    for r in report["latency_cpu"]:
        lines.append(
            f"CPU batch {r['batch_size']}: {1e3 * r['full_median_s']:.3f} ms -> "
            f"{1e3 * r['pruned_median_s']:.3f} ms ({r['speedup']:.2f}x)"
        )
    return "\n".join(lines)


# --- bit precision and compression rates -------------------------------------------------------


@torch.no_grad()
def compression_report_sparse_vd(net: nn.Module, input_shape: tuple[int, ...]) -> dict:
    r"""Bit precision and the three compression rates of an exported Sparse VD network, with
    Bayesian Compression's rules (:mod:`pyro_sbp.export.bit_precision`: significand bits from
    the posterior variances of the kept weights, codes of :math:`b_l` bits per weight) applied
    to weight sparsity: per layer :math:`W'_l` is the exported dense layer (the dead units
    gone, the removed weights zeros) and :math:`K_l` its kept (non-zero) weights, against the
    original :math:`32 |W|` bits (biases not counted):

    * *pruning*: :math:`32|W| / (32 |K|)`, i.e. :math:`|W| / |W \neq 0|` (no index counted,
      as the rate is defined there; :func:`sparse_storage` gives the bytes with CSR indices);
    * *fast prediction*: :math:`32|W| / \sum_l |W'_l|\, b_l` (the smaller dense layers);
    * *maximum*: each layer the smaller of its dense codes and a CSR of its non-zero codes.

    :return: the schema of :func:`pyro_sbp.export.bit_precision.compression_report`.
    """
    from pyro_sbp.export.bit_precision import (
        FULL_PRECISION_BITS,
        _csr_bits,
        code_bits,
        quantize,
        significand_bits,
    )
    from pyro_sbp.models.sparse_vd import named_sparse_vd_layers

    pruned = export_sparse_vd(net, input_shape, select_inputs=False)
    exported = [m for m in pruned.modules() if isinstance(m, _LAYERS)]
    layers = list(named_sparse_vd_layers(net))
    if len(exported) != len(layers):
        raise ValueError("every layer of the network must be a Sparse VD layer")
    rows = {}
    total = kept_total = fast = maximum = 0
    for (name, layer), m in zip(layers, exported, strict=True):
        keep = layer.keep().cpu()
        var = layer.variance().detach().cpu()[keep]
        bits = significand_bits(var)
        w = quantize(m.weight.detach(), bits)
        codes = (w.reshape(w.shape[0], -1) * 2.0**bits).round()
        nz = m.weight.detach() != 0
        b = code_bits(w[nz], bits) if bool(nz.any()) else 0
        dense = int(w.numel()) * b
        sparse = _csr_bits(codes * nz.reshape(codes.shape), b)
        rows[name] = {
            "weights": int(layer.weight.numel()),
            "weights_kept": int(nz.sum()),
            "shape": list(m.weight.shape),
            "significand_bits": bits,
            "code_bits": b,
            "integer_bits": b - 1 - bits if b else 0,
            "nonzero_codes": int((codes != 0).sum()),
            "bits_dense": dense,
            "bits_csr": sparse,
        }
        total += int(layer.weight.numel())
        kept_total += int(nz.sum())
        fast += dense
        maximum += min(dense, sparse)
    full_bits = FULL_PRECISION_BITS * total

    def rate(used: int) -> float:
        return full_bits / used if used else math.inf

    return {
        "layers": rows,
        "architecture": _architecture(pruned),
        "weights_full": total,
        "weights_kept": kept_total,
        "bits_full": full_bits,
        "bits_fast_prediction": fast,
        "bits_maximum": maximum,
        "compression_pruning": rate(FULL_PRECISION_BITS * kept_total),
        "compression_fast_prediction": rate(fast),
        "compression_maximum": rate(maximum),
    }
