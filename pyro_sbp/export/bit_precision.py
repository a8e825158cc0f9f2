r"""Bayesian Compression's export: the kept groups removed physically, bit precision per
layer from the posterior variance, a quantised export, and the paper's three compression rates.

**Physical removal.** A Bayesian Compression network (:func:`~pyro_sbp.models.
bayesian_compression.make_bayesian_compression`) in evaluation computes with the posterior
means :math:`\mathbb E[w] = \mathbb E[z]\mu_w` of its kept groups. :func:`export_bc` writes that
network as a plain one with the removed groups expressed as *unit masks* and hands it to the
library's exporter (:func:`~pyro_sbp.export.export_pruned`): a ``Conv2d``'s removed output
channel is a removed unit; a ``Linear``'s removed input feature is a removed input (an input
gate), and also a removed *output* unit of the layer that produces it when only channel-wise
modules lie between them (a ``Linear -> ReLU -> Linear`` chain), or a removed channel of the
``Conv2d`` before a ``Flatten`` when all of that channel's features are removed. The exported
network is numerically the masked network (tested).

**Bit precision** (the paper's rule, as the tutorial code KarenUllrich/
Tutorial_BayesianCompressionForDL ``compression.py`` computes it). For each kept weight, the
significand bits are how many of the unit round-offs :math:`2^{-t}`, :math:`t = 1, \dots, 23`,
exceed twice its posterior variance; a layer gets the mean over its kept weights, rounded up:

.. math::

    s_l = \Big\lceil \frac{1}{|K_l|}\sum_{k \in K_l} \#\{t \in 1..23 : 2\,\mathrm{Var}[w_k]
        < 2^{-t}\}\Big\rceil .

The weights are then rounded to the grid :math:`2^{-s_l}` (the tutorial's ``special_round``:
:math:`\lfloor w 2^{s} + \frac12\rfloor 2^{-s}`), a fixed-point code: an integer
:math:`k = w\,2^{s}` per weight. What the export stores per weight is its sign (1 bit) and the
magnitude bits of the largest code, :math:`\lceil\log_2(\max|k| + 1)\rceil`, which is
:math:`s_l` plus the bits that the largest magnitude needs above the binary point (the
paper's "exponent bits from the largest magnitude"; negative when every weight is below 1/2,
whose leading zeros need no storage). So the layer's code width is

.. math::

    b_l = 1 + \lceil \log_2(\max_k |k| + 1) \rceil .

**Compression rates** (BC Table 2), from the exported layers' weights (biases are not counted,
as in the tutorial), against the original :math:`32 |W|` bits:

* *pruning*: the kept weights at 32 bits, :math:`32|W| / (32|W'|)` (group sparsity leaves
  dense, smaller layers: no indices to store; the paper's 108 for BC-GNJ on LeNet5-Caffe
  is about :math:`1 / 0.9\%`);
* *fast prediction*: the smaller dense layers at their reduced precision,
  :math:`32|W| / \sum_l |W'_l| b_l`;
* *maximum compression*: as fast prediction, each layer stored as the smaller of its dense
  codes and a CSR matrix of its non-zero codes (values at :math:`b_l` bits, column indices at
  :math:`\lceil\log_2 n_{cols}\rceil` bits, row pointers at :math:`\lceil\log_2(nnz +
  1)\rceil` bits), since rounding to :math:`2^{-s}` sends the smallest kept weights to 0.

**References**

[1] Louizos, Ullrich, Welling, *Bayesian Compression for Deep Learning*, NeurIPS 2017
    (Section 4, Tables 1-2).
[2] Heath, *Scientific Computing: An Introductory Survey*, 1996 (Chapter 1, unit round-off).
"""

import math
from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from pyro_sbp.export.exporter import _CHANNELWISE, _plain_copy, export_pruned
from pyro_sbp.models.bayesian_compression import BCConv2d, BCLinear, _layers

#: The significand bits of float32: the unit round-offs 2^-1 .. 2^-23 that the rule counts.
MAX_SIGNIFICAND_BITS = 23
#: The precision of the original network's weights.
FULL_PRECISION_BITS = 32


def significand_bits(variance: Tensor) -> int:
    r"""The paper's significand bits of a set of weights with posterior ``variance``:
    :math:`\lceil\mathrm{mean}_k \#\{t \in 1..23 : 2\,\mathrm{Var}_k < 2^{-t}\}\rceil`
    (0 for an empty set).

    :raises ValueError: for a negative or non-finite variance.
    """
    v = variance.detach().double().reshape(-1)
    if v.numel() == 0:
        return 0
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise ValueError("posterior variances must be finite and non-negative")
    t = torch.arange(1, MAX_SIGNIFICAND_BITS + 1, dtype=torch.float64)
    counts = (2.0 * v.unsqueeze(1) < torch.pow(2.0, -t)).sum(dim=1).double()
    # The mean in float64, rounded to 12 digits first so that a mean that is an integer in exact
    # arithmetic is not pushed up by the rounding of the sum.
    return math.ceil(round(float(counts.mean()), 12))


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= 52:
        raise ValueError(f"significand bits must be an integer in [0, 52], got {bits!r}")
    return bits


def quantize(weight: Tensor, bits: int) -> Tensor:
    r"""``weight`` rounded to the grid :math:`2^{-s}`: :math:`\lfloor w 2^{s} + \frac12
    \rfloor 2^{-s}` (the tutorial's ``special_round``; exact in floating point, a power of two
    scaling)."""
    s = _check_bits(bits)
    scale = float(2**s)
    return torch.floor(weight * scale + 0.5) / scale


def code_bits(weight: Tensor, bits: int) -> int:
    r"""Bits per weight of the fixed-point codes of ``weight`` (already on the grid
    :math:`2^{-s}`): a sign bit and :math:`\lceil\log_2(\max|k| + 1)\rceil` magnitude bits,
    :math:`k = w 2^{s}`."""
    s = _check_bits(bits)
    if weight.numel() == 0:
        return 0
    k = (weight.detach().double() * 2.0**s).abs().max().item()
    return 1 + math.ceil(math.log2(k + 1.0))


def _csr_bits(codes: Tensor, value_bits: int) -> int:
    rows, cols = codes.shape
    nnz = int((codes != 0).sum())
    col_bits = max(1, math.ceil(math.log2(cols))) if cols > 1 else 1
    ptr_bits = max(1, math.ceil(math.log2(nnz + 1)))
    return nnz * (value_bits + col_bits) + (rows + 1) * ptr_bits


# --- the kept structure ----------------------------------------------------------------------


def _leaves(net: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in net.named_modules() if n and not list(m.children())]


def _check_sequential(net: nn.Module) -> None:
    for name, m in net.named_modules():
        if list(m.children()) and not isinstance(m, nn.Sequential):
            raise NotImplementedError(
                f"Bayesian Compression export follows nn.Sequential containers only; "
                f"{name or 'the network'!r} is a {type(m).__name__} with submodules"
            )


def _group_masks(net: nn.Module, masks: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    out = {}
    for name, layer in _layers(net):
        m = layer.mask if masks is None or name not in masks else masks[name]
        if tuple(m.shape) != (layer.num_groups,):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(m.shape)}, expected ({layer.num_groups},)"
            )
        out[name] = m.detach().cpu() > 0
    if masks is not None:
        unknown = sorted(set(masks) - set(out))
        if unknown:
            raise ValueError(f"masks for unknown layers {unknown}; layers: {list(out)}")
    return out


@torch.no_grad()
def _producers(net: nn.Module, input_shape) -> dict[str, tuple[str, int]]:
    """For each BC layer, the BC layer whose outputs are its inputs through channel-wise
    modules only (and at most one ``Flatten``), with the number of flattened features per
    channel (1 without a ``Flatten``)."""
    leaves = _leaves(net)
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []

    def record(name):
        def hook(_module, inputs):
            shapes.setdefault(name, tuple(inputs[0].shape[1:]))

        return hook

    for name, m in leaves:
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
    out = {}
    for i, (name, m) in enumerate(leaves):
        if not isinstance(m, BCLinear | BCConv2d):
            continue
        block = 1
        for prev_name, prev in reversed(leaves[:i]):
            if isinstance(prev, BCLinear | BCConv2d):
                out[name] = (prev_name, block)
                break
            if isinstance(prev, nn.Flatten) and block == 1 and isinstance(m, BCLinear):
                shape = shapes.get(prev_name)
                if shape is None or len(shape) < 2:
                    break
                block = math.prod(shape[1:])
                continue
            if not isinstance(prev, _CHANNELWISE):
                break
    return out


def kept_units(
    net: nn.Module, input_shape, masks: Mapping[str, Tensor] | None = None
) -> dict[str, tuple[Tensor, Tensor]]:
    """``{layer: (kept outputs, kept inputs)}`` (bool vectors) of every BC layer: the units and
    input features that the export keeps, from the group masks and where each layer's inputs
    come from (see the module's docstring)."""
    groups = _group_masks(net, masks)
    layers = dict(_layers(net))
    producers = _producers(net, tuple(input_shape))
    used: dict[str, Tensor] = {}
    for name, (prev, block) in producers.items():
        layer = layers[name]
        if isinstance(layer, BCLinear):
            need = groups[name]
            if block > 1:
                need = need.reshape(-1, block).any(dim=1)
            used[prev] = need
        else:
            used[prev] = torch.ones(layers[prev].weight.shape[0], dtype=torch.bool)
    out_keep = {}
    for name, layer in layers.items():
        n_out = layer.weight.shape[0]
        keep = groups[name] if isinstance(layer, BCConv2d) else torch.ones(n_out, dtype=torch.bool)
        if name in used:
            keep = keep & used[name]
        out_keep[name] = keep
    out = {}
    for name, layer in layers.items():
        n_in = layer.weight.shape[1]
        keep_in = (
            groups[name] if isinstance(layer, BCLinear) else torch.ones(n_in, dtype=torch.bool)
        )
        if name in producers:
            prev, block = producers[name]
            upstream = out_keep[prev]
            if block > 1:
                upstream = upstream.repeat_interleave(block)
            keep_in = keep_in & upstream
        out[name] = (out_keep[name], keep_in)
    return out


# --- export ------------------------------------------------------------------------------------


@torch.no_grad()
def _eval_weights(layer, group_mask: Tensor) -> tuple[Tensor, Tensor]:
    mean_z, var_z = layer.z_moments()
    shape = layer._group_shape()
    m = group_mask.to(layer.weight).reshape(shape)
    mean_z = mean_z.reshape(shape) * m
    var_z = var_z.reshape(shape) * m
    sigma2 = layer.weight_log_sigma2.exp()
    mean = mean_z * layer.weight
    var = (mean_z.square() + var_z) * sigma2 + var_z * layer.weight.square()
    return mean.detach().cpu(), var.detach().cpu()


def _plain_layer(layer, weight: Tensor, group_mask: Tensor) -> nn.Module:
    bias = None if layer.bias is None else layer.bias.detach().cpu()
    if isinstance(layer, BCLinear):
        new = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
    else:
        new = nn.Conv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            bias=bias is not None,
        )
        if bias is not None:
            bias = bias * group_mask.to(bias)
    new = new.to(weight.dtype)
    new.weight = nn.Parameter(weight.clone())
    if bias is not None:
        new.bias = nn.Parameter(bias.clone())
    return new


def masked_network(
    net: nn.Module,
    masks: Mapping[str, Tensor] | None = None,
    bits: Mapping[str, int] | None = None,
) -> nn.Sequential:
    r"""A plain ``nn.Sequential`` (CPU, evaluation mode) computing what ``net`` computes in
    evaluation with the group ``masks`` (default: the layers' own): every BC layer a plain
    ``Linear``/``Conv2d`` with the weights :math:`\mathbb E[w]` of its kept groups, rounded
    to :math:`2^{-s}` when ``bits`` gives the layer's significand bits :math:`s`."""
    _check_sequential(net)
    groups = _group_masks(net, masks)
    layers = dict(_layers(net))

    def build(prefix: str, module: nn.Module) -> nn.Module:
        if prefix in layers:
            weight, _ = _eval_weights(module, groups[prefix])
            if bits is not None and prefix in bits:
                weight = quantize(weight, bits[prefix])
            return _plain_layer(module, weight, groups[prefix])
        children = list(module.named_children())
        if not children:
            return _plain_copy(module).cpu()
        return nn.Sequential(
            OrderedDict((n, build(f"{prefix}.{n}" if prefix else n, c)) for n, c in children)
        )

    plain = build("", net)
    if not isinstance(plain, nn.Sequential):
        plain = nn.Sequential(plain)
    return plain.eval()


def export_bc(
    net: nn.Module,
    input_shape: tuple[int, ...],
    masks: Mapping[str, Tensor] | None = None,
    bits: Mapping[str, int] | None = None,
    *,
    channels_last: bool = True,
) -> nn.Module:
    r"""The Bayesian Compression network as a plain, physically smaller ``nn.Module``:
    :func:`masked_network` (optionally quantised to ``bits``, from :func:`quantize_bc`) with
    the removed groups expressed as unit masks (:func:`kept_units`), exported by
    :func:`~pyro_sbp.export.export_pruned`. It computes what :func:`masked_network` computes.

    :param net: a network prepared with ``make_bayesian_compression``.
    :param input_shape: the shape of one input.
    :param masks: group masks by layer name (default: the layers' own).
    :param bits: significand bits by layer name (default: no quantisation).
    """
    from pyro_sbp.models import make_prunable, named_gates

    input_shape = tuple(input_shape)
    kept = kept_units(net, input_shape, masks)
    plain = masked_network(net, masks, bits)
    layers = dict(_layers(net))
    out_gated = [
        n
        for n, (keep, _) in kept.items()
        if not bool(keep.all()) or isinstance(layers[n], BCConv2d)
    ]
    in_gated = [n for n, (_, keep) in kept.items() if isinstance(layers[n], BCLinear)]
    classifier = [n for n, layer in layers.items() if isinstance(layer, BCLinear)][-1:]
    out_gated = [n for n in out_gated if n not in classifier]
    gated = make_prunable(plain, layers=out_gated, input_layers=in_gated)
    gate_masks = {}
    for site, gate in named_gates(gated):
        layer_name, _, attr = site.rpartition(".")
        keep_out, keep_in = kept[layer_name]
        gate_masks[site] = (keep_in if attr == "input_gate" else keep_out).to(gate.mask)
    return export_pruned(gated.eval(), input_shape, gate_masks, channels_last=channels_last)


@torch.no_grad()
def quantize_bc(
    net: nn.Module, input_shape: tuple[int, ...] | None = None, masks=None
) -> dict[str, int]:
    """The significand bits of every BC layer (:func:`significand_bits` of the posterior
    variances of its kept weights, those :func:`kept_units` keeps)."""
    shape = input_shape if input_shape is not None else getattr(net, "input_shape", None)
    if shape is None:
        raise ValueError("pass input_shape (the network has no input_shape attribute)")
    kept = kept_units(net, tuple(shape), masks)
    groups = _group_masks(net, masks)
    out = {}
    for name, layer in _layers(net):
        _, var = _eval_weights(layer, groups[name])
        out[name] = significand_bits(_select(var, *kept[name]))
    return out


def _select(w: Tensor, keep_out: Tensor, keep_in: Tensor) -> Tensor:
    return w[keep_out][:, keep_in]


@torch.no_grad()
def compression_report(
    net: nn.Module,
    input_shape: tuple[int, ...],
    masks: Mapping[str, Tensor] | None = None,
    bits: Mapping[str, int] | None = None,
) -> dict:
    """Architecture, bit precision and the three compression rates of the exported network
    (the module's docstring has the definitions).

    :return: ``{"layers": {name: {...}}, "architecture": [...], "weights_full",
        "weights_kept", "bits_full", "bits_fast_prediction", "bits_maximum",
        "compression_pruning", "compression_fast_prediction", "compression_maximum"}``.
    """
    input_shape = tuple(input_shape)
    if bits is None:
        bits = quantize_bc(net, input_shape, masks)
    kept = kept_units(net, input_shape, masks)
    groups = _group_masks(net, masks)
    rows = {}
    total = kept_total = fast = maximum = 0
    for name, layer in _layers(net):
        mean, _ = _eval_weights(layer, groups[name])
        w = quantize(_select(mean, *kept[name]), bits[name])
        codes = w.reshape(w.shape[0], -1) if w.dim() > 1 else w
        n = int(w.numel())
        b = code_bits(w, bits[name])
        dense = n * b
        sparse = _csr_bits((codes * 2.0 ** bits[name]).round(), b) if n else 0
        rows[name] = {
            "groups": int(layer.num_groups),
            "groups_kept": int(groups[name].sum()),
            "units_kept": int(kept[name][0].sum()),
            "inputs_kept": int(kept[name][1].sum()),
            "weights": int(layer.weight.numel()),
            "weights_kept": n,
            "significand_bits": int(bits[name]),
            "code_bits": b,
            "integer_bits": b - 1 - int(bits[name]),
            "nonzero_codes": int((codes != 0).sum()),
            "bits_dense": dense,
            "bits_csr": sparse,
        }
        total += int(layer.weight.numel())
        kept_total += n
        fast += dense
        maximum += min(dense, sparse)
    full_bits = FULL_PRECISION_BITS * total

    def rate(bits_used: int) -> float:
        return full_bits / bits_used if bits_used else math.inf

    return {
        "layers": rows,
        "architecture": [
            r["units_kept"] if isinstance(layer, BCConv2d) else r["inputs_kept"]
            for (_, layer), r in zip(_layers(net), rows.values(), strict=True)
        ],
        "weights_full": total,
        "weights_kept": kept_total,
        "bits_full": full_bits,
        "bits_fast_prediction": fast,
        "bits_maximum": maximum,
        "compression_pruning": rate(FULL_PRECISION_BITS * kept_total),
        "compression_fast_prediction": rate(fast),
        "compression_maximum": rate(maximum),
    }


# --- pyro-sbp report ---------------------------------------------------------------------------


def _plot_log_alpha_and_bits(net: nn.Module, threshold: float, bits: Mapping[str, int], path):
    from pyro_sbp.diagnostics.report import _pyplot
    from pyro_sbp.models.bayesian_compression import log_alphas

    plt = _pyplot()
    las = log_alphas(net)
    n = len(las) + 1
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, (name, la) in zip(axes[0], las.items(), strict=False):
        kept = int((la < threshold).sum())
        ax.hist(la.reshape(-1).numpy(), bins=50, color="tab:blue")
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"log alpha_z = {threshold:g}")
        ax.set_yscale("log")
        ax.set_title(f"{name}: {kept}/{la.numel()} kept", fontsize=9)
        ax.set_xlabel("log alpha_z")
    axes[0][0].legend(fontsize=7)
    ax = axes[0][-1]
    ax.bar(range(len(bits)), list(bits.values()), color="tab:green")
    ax.set_xticks(range(len(bits)), list(bits), rotation=30, fontsize=7)
    ax.set_ylabel("significand bits")
    ax.set_title("bit precision per layer", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_bc_report(
    run_dir,
    criterion: str | None = None,
    *,
    bench: bool = True,
    batch_sizes=(1, 256),
    min_run_time: float = 0.5,
    num_draws: int = 200,
) -> dict:
    """``pyro-sbp report`` of a Bayesian Compression run: the group masks of ``criterion``
    (default ``log-alpha:-3``), test accuracy of the full, the pruned and the quantised
    network, architecture, bits per layer, the three compression rates, parameters, FLOPs and
    CPU latency; writes ``report.json``, ``masks.pt``, ``full.pt``, ``pruned.pt``,
    ``quantized.pt``, ``compression.json``, ``posterior.nc`` and ``plots/`` into ``run_dir``."""
    import json

    from pyro_sbp.diagnostics.report import prune_and_export
    from pyro_sbp.export import count_parameters
    from pyro_sbp.infer import evaluate
    from pyro_sbp.infer.checkpoint import write_text_atomic
    from pyro_sbp.models.bayesian_compression import parse_criterion

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
    method = trainer.method
    compression = json.loads((run / "compression.json").read_text())
    bits = {name: r["significand_bits"] for name, r in compression["layers"].items()}
    quantized = export_bc(trainer.net, shape, bits=bits)
    quantized_acc = evaluate(quantized, trainer.loaders["test"], trainer.device)
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    kind, value = parse_criterion(criterion, method.prior)
    threshold = value if kind == "log-alpha" else -3.0
    _plot_log_alpha_and_bits(trainer.net, threshold, bits, plots / "log_alpha_bits.png")
    c = trainer.config
    report = {
        "method": c.method,
        "dataset": c.dataset,
        "network": c.model,
        "criterion": criterion,
        "input_shape": list(shape),
        "accuracy_full": full_acc,
        "accuracy_pruned": pruned_acc,
        "accuracy_quantized": quantized_acc,
        "accuracy_split": "test",
        "groups": result.to_dict()["layers"],
        **{k: v for k, v in compression.items() if k != "layers"},
        "bits": compression["layers"],
        "params_full": count_parameters(full),
        "params_pruned": count_parameters(pruned),
        "flops_full": measured["flops_full"],
        "flops_pruned": measured["flops_pruned"],
        "flops_reduction": measured["flops_reduction"],
        "latency_cpu": measured["latency"],
        "speedup_cpu": {str(r["batch_size"]): r["speedup"] for r in measured["latency"]},
        "epochs": {"pretrain": trainer.pretrain_done, "svi": trainer.svi_done},
        "files": [
            "report.json",
            "posterior.nc",
            "full.pt",
            "pruned.pt",
            "quantized.pt",
            "compression.json",
            "masks.pt",
            "plots/",
        ],
    }
    write_text_atomic(json.dumps(report, indent=1) + "\n", run / "report.json")
    return report


def format_bc_summary(report: dict) -> str:
    """The text ``pyro-sbp report`` prints for a Bayesian Compression run."""
    lines = [
        f"{report['network']} on {report['dataset']} ({report['method']}), pruned with "
        f"{report['criterion']}",
        f"{'layer':<16} {'groups':>7} {'kept':>6} {'weights':>9} {'bits':>5} {'code':>5}",
    ]
    for name, r in report["bits"].items():
        lines.append(
            f"{name:<16} {r['groups']:>7} {r['groups_kept']:>6} {r['weights_kept']:>9} "
            f"{r['significand_bits']:>5} {r['code_bits']:>5}"
        )
    lines += [
        f"architecture after pruning: {'-'.join(map(str, report['architecture']))}",
        f"compression: pruning {report['compression_pruning']:.1f}, fast prediction "
        f"{report['compression_fast_prediction']:.1f}, maximum {report['compression_maximum']:.1f}",
        f"test accuracy: full {100 * report['accuracy_full']:.2f}%, pruned "
        f"{100 * report['accuracy_pruned']:.2f}%, "
        f"quantised {100 * report['accuracy_quantized']:.2f}%",
        f"FLOPs/example: {report['flops_full']:,} -> {report['flops_pruned']:,} "
        f"({report['flops_reduction']:.2f}x fewer)",
    ]
    for r in report["latency_cpu"]:
        lines.append(
            f"CPU batch {r['batch_size']}: {1e3 * r['full_median_s']:.3f} ms -> "
            f"{1e3 * r['pruned_median_s']:.3f} ms ({r['speedup']:.2f}x)"
        )
    return "\n".join(lines)
