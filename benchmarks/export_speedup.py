"""Realised CPU speed-up of exported (physically smaller) networks against their FLOPs reduction.

Two cases from the SBP paper, with random weights (speed does not depend on them):

* LeNet5-Caffe (conv 20, conv 50, fc 500) pruned to SBP's 3-18-284-283: 3 and 18 channels,
  284 of the 18 x 16 = 288 flattened features entering fc1 (an input gate on fc1), and 283
  neurons;
* LeNet-500-300 pruned to SBP's 245-160-55: 245 of the 784 input pixels (an input gate on the
  first layer), 160 and 55 neurons.

Each network is made prunable, given random masks with exactly those widths and random gate
means, and exported with :func:`pyro_sbp.export.export_pruned`; the full network is
:func:`~pyro_sbp.export.export_full` of the same gated network. Both are timed with
``torch.utils.benchmark`` (median), alternately, at batch 256 and 4096 on the CPU (one thread),
and the exported network is checked against the gated one first. Writes
``benchmarks/results/export_speedup.json`` with a list ``cases`` (``name``, ``batch_size``,
``flops_reduction``, ``speedup``, ...). Target: ``speedup >= 0.8 * flops_reduction`` in every
case.

Each case also records the floor of the pruned network's time (:func:`layer_floor`): every
convolution and linear layer of the pruned network, and the selection of the input features an
input gate kept, timed alone on the input each receives in the network, and summed
(``pruned_layers_s``, per layer in ``layers``). The layers carry all the counted FLOPs, and the
selection is what reading fewer inputs costs (a first layer as wide as the full input instead
costs more). ``pruned_modules_s`` adds the pooling and the activations, which the pruned network
must compute as well (every module but the views, each timed alone). ``budget_s =
full_median_s / (0.8 * flops_reduction)`` is the time the whole pruned network may take to meet
the target, so where ``pruned_layers_s > budget_s`` (``floor_over_budget > 1``) no export meets
the target with PyTorch's kernels on this machine.

Two more cases are the standard structured-pruning benchmarks at half width: ResNet-56 (a
traced network, its residual streams one gate each) and VGG-16 with BatchNorm (the
``vgg-like`` network), on 32 x 32 inputs, with half of every gate's units kept at random. They
are timed at batch 256 only, in three runtimes side by side: eager PyTorch, TorchScript
(``torch.jit.script``, then ``torch.jit.freeze``) and ONNX Runtime (one intra-op thread), each
with its own ``speedup``, in ``runtimes``; ``eager-contiguous`` is eager PyTorch with the
export's ``channels_last=False`` (a traced network's export is channels-last by default; the
VGG's, an ``nn.Sequential``, is contiguous either way).

    python benchmarks/export_speedup.py [--min-run-time 2] [--cases lenet5-caffe,resnet-56]
"""

import argparse
import json
import platform
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from pyro_sbp.export import FeatureSelect, compare, export_full, export_pruned
from pyro_sbp.models import build_network, make_prunable, named_gates

RESULTS = Path(__file__).parent / "results" / "export_speedup.json"

#: Kept units per gate; an input gate's width counts the kept inputs among those still present
#: (for LeNet5-Caffe's fc1: among the 16 features of each kept conv2 channel).
CASES = {
    "lenet5-caffe": {
        "features.0.gate": 3,
        "features.3.gate": 18,
        "classifier.1.input_gate": 284,
        "classifier.1.gate": 283,
    },
    "lenet-500-300": {
        "classifier.1.input_gate": 245,
        "classifier.1.gate": 160,
        "classifier.3.gate": 55,
    },
}
#: Networks pruned to half of every gate's units, kept at random (timed at batch 256).
HALF_WIDTH = ("resnet-56", "vgg-like")
HALF_BATCH = 256

#: Features of fc1's input that belong to one conv2 channel (LeNet5-Caffe: 4 x 4).
BLOCK = {"lenet5-caffe": ("features.3.gate", 16)}


def _pruned_network(name: str, widths: dict[str, int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    net = make_prunable(build_network(name), input_layers=["classifier.1"])
    gates = dict(named_gates(net))
    for site, gate in gates.items():
        present = torch.ones(gate.num_units, dtype=torch.bool)
        if site.endswith("input_gate") and name in BLOCK:
            channel_site, block = BLOCK[name]
            present = gates[channel_site].mask.repeat_interleave(block) > 0
        candidates = present.nonzero().squeeze(-1)
        keep = torch.zeros(gate.num_units)
        keep[candidates[torch.randperm(candidates.numel(), generator=g)[: widths[site]]]] = 1.0
        gate.mask.copy_(keep)
        gate.theta_mean.copy_(torch.rand(gate.num_units, generator=g) * 0.9 + 0.1)
    net.eval()
    shape = tuple(net.input_shape)
    full, pruned = export_full(net, shape), export_pruned(net, shape)
    x = torch.rand(64, *shape, generator=g)
    with torch.no_grad():
        err = (pruned(x) - net(x)).abs().max().item()
    assert err < 1e-5, f"{name}: exported network differs from the gated one by {err}"
    return full, pruned, shape


def _half_network(name: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    net = make_prunable(build_network(name))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
    for _, gate in named_gates(net):
        keep = torch.zeros(gate.num_units)
        keep[torch.randperm(gate.num_units, generator=g)[: gate.num_units // 2]] = 1.0
        gate.mask.copy_(keep)
        gate.theta_mean.copy_(torch.rand(gate.num_units, generator=g) * 0.9 + 0.1)
    net.eval()
    shape = tuple(net.input_shape)
    full, pruned = export_full(net, shape), export_pruned(net, shape)
    contiguous = (
        export_full(net, shape, channels_last=False),
        export_pruned(net, shape, channels_last=False),
    )
    x = torch.rand(16, *shape, generator=g)
    with torch.no_grad():
        ref = net(x)
        for module in (pruned, contiguous[1]):
            err = (module(x) - ref).abs().max().item()
            tol = 1e-5 * max(1.0, ref.abs().max().item())
            assert err <= tol, f"{name}: exported network differs from the gated one by {err}"
    return full, pruned, shape, contiguous


def _scripted(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.script(module.eval()))


def _runtimes(full, pruned, shape, batch, min_run_time, tmp: Path, contiguous=None) -> dict:
    """Median latency of the full and the pruned network, alternately, in each runtime."""
    from pyro_sbp.export import measure_latency
    from pyro_sbp.export.onnx import measure_latency_onnx, save_onnx

    out = {}
    pairs = {"eager": (full, pruned), "torchscript": (_scripted(full), _scripted(pruned))}
    if contiguous is not None:
        pairs["eager-contiguous"] = contiguous
    for runtime, (f, p) in pairs.items():
        a = measure_latency(f, shape, batch, "cpu", min_run_time)["median_s"]
        b = measure_latency(p, shape, batch, "cpu", min_run_time)["median_s"]
        out[runtime] = {"full_median_s": a, "pruned_median_s": b, "speedup": a / b}
    try:
        for tag, module in (("full", full), ("pruned", pruned)):
            save_onnx(module, tmp / f"{tag}.onnx", shape)
    except ImportError as e:
        print(f"onnxruntime skipped: {e}")
        return out
    a = measure_latency_onnx(tmp / "full.onnx", shape, batch, min_run_time)["median_s"]
    b = measure_latency_onnx(tmp / "pruned.onnx", shape, batch, min_run_time)["median_s"]
    out["onnxruntime"] = {"full_median_s": a, "pruned_median_s": b, "speedup": a / b}
    return out


def _half_width_case(name: str, min_run_time: float) -> dict:
    from pyro_sbp.export import count_flops, count_parameters

    full, pruned, shape, contiguous = _half_network(name)
    flops_full, flops_pruned = count_flops(full, shape), count_flops(pruned, shape)
    reduction = flops_full / flops_pruned
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = _runtimes(
            full, pruned, shape, HALF_BATCH, min_run_time, Path(tmp), contiguous=contiguous
        )
    eager = runtimes["eager"]
    floor = _floor(pruned, shape, HALF_BATCH, min_run_time, eager["full_median_s"], reduction)
    for runtime, r in runtimes.items():
        r["speedup_over_flops"] = r["speedup"] / reduction
        print(
            f"{name:<14} batch {HALF_BATCH} {runtime:<11}: FLOPs {reduction:.2f}x fewer, "
            f"{r['speedup']:.2f}x faster ({r['speedup_over_flops']:.2f} of the FLOPs "
            f"reduction; {r['full_median_s'] * 1e3:.0f} -> {r['pruned_median_s'] * 1e3:.0f} ms)"
        )
    return {
        "name": name,
        "widths": "half of every gate's units, at random",
        "batch_size": HALF_BATCH,
        "flops_full": flops_full,
        "flops_pruned": flops_pruned,
        "flops_reduction": reduction,
        "params_full": count_parameters(full),
        "params_pruned": count_parameters(pruned),
        "full_median_s": eager["full_median_s"],
        "pruned_median_s": eager["pruned_median_s"],
        "speedup": eager["speedup"],
        "speedup_over_flops": eager["speedup"] / reduction,
        "runtimes": runtimes,
        "best_runtime_speedup_over_flops": max(r["speedup_over_flops"] for r in runtimes.values()),
        **floor,
    }


def _floor(pruned, shape, batch: int, min_run_time: float, full_s: float, reduction: float):
    """The layer floor of the pruned network against the time budget of the 0.8 target."""
    layers = layer_floor(pruned, shape, batch, min_run_time / 4)
    floor = sum(m["median_s"] for m in layers if m["layer"])
    modules = sum(m["median_s"] for m in layers)
    budget = full_s / (0.8 * reduction)
    return {
        "budget_s": budget,
        "pruned_layers_s": floor,
        "floor_over_budget": floor / budget,
        "pruned_modules_s": modules,
        "modules_over_budget": modules / budget,
        "modules": layers,
    }


@torch.no_grad()
def layer_floor(
    module: nn.Module, input_shape: tuple[int, ...], batch_size: int, min_run_time: float
) -> list[dict]:
    """Median time of each leaf module of ``module`` but the views (``Flatten``, ``Identity``)
    run alone (one thread), on the input it receives when ``module`` runs on a random batch;
    ``"layer"`` marks the convolutions, linear layers and feature selections."""
    from torch.utils import benchmark

    inputs = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0]))
        for name, m in module.named_modules()
        if not list(m.children()) and not isinstance(m, nn.Flatten | nn.Identity)
    ]
    try:
        module(torch.rand(batch_size, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    layers = []
    for name, x in inputs.items():
        layer = module.get_submodule(name)
        timer = benchmark.Timer(stmt="layer(x)", globals={"layer": layer, "x": x}, num_threads=1)
        layers.append(
            {
                "module": name,
                "layer": isinstance(layer, nn.Conv2d | nn.Linear | FeatureSelect),
                "median_s": timer.blocked_autorange(min_run_time=min_run_time).median,
            }
        )
    return layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-run-time", type=float, default=2.0)
    parser.add_argument("--batch-sizes", default="256,4096")
    parser.add_argument(
        "--cases",
        default=",".join([*CASES, *HALF_WIDTH]),
        help="comma-separated networks to measure; the others keep their recorded rows",
    )
    args = parser.parse_args()
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    chosen = args.cases.split(",")
    unknown = sorted(set(chosen) - set(CASES) - set(HALF_WIDTH))
    if unknown:
        parser.error(f"unknown cases {unknown}; valid: {', '.join([*CASES, *HALF_WIDTH])}")
    torch.set_num_threads(1)
    old = json.loads(RESULTS.read_text())["cases"] if RESULTS.exists() else []
    cases = [c for c in old if c["name"] not in chosen]
    for name in HALF_WIDTH:
        if name in chosen:
            cases.append(_half_width_case(name, args.min_run_time))
    for name, widths in CASES.items():
        if name not in chosen:
            continue
        full, pruned, shape = _pruned_network(name, widths)
        result = compare(full, pruned, shape, sizes, ("cpu",), args.min_run_time)
        for lat in result["latency"]:
            f = _floor(
                pruned,
                shape,
                lat["batch_size"],
                args.min_run_time,
                lat["full_median_s"],
                result["flops_reduction"],
            )
            cases.append(
                {
                    "name": name,
                    "widths": widths,
                    "batch_size": lat["batch_size"],
                    "flops_full": result["flops_full"],
                    "flops_pruned": result["flops_pruned"],
                    "flops_reduction": result["flops_reduction"],
                    "params_full": result["params_full"],
                    "params_pruned": result["params_pruned"],
                    "full_median_s": lat["full_median_s"],
                    "pruned_median_s": lat["pruned_median_s"],
                    "speedup": lat["speedup"],
                    "speedup_over_flops": lat["speedup"] / result["flops_reduction"],
                    **f,
                }
            )
            print(
                f"{name:<14} batch {lat['batch_size']:>5}: FLOPs {result['flops_reduction']:.2f}x "
                f"fewer, {lat['speedup']:.2f}x faster "
                f"({lat['speedup'] / result['flops_reduction']:.2f} of the FLOPs reduction); "
                f"layers and selection alone {f['pruned_layers_s'] * 1e3:.2f} ms, all modules "
                f"alone {f['pruned_modules_s'] * 1e3:.2f} ms, budget {f['budget_s'] * 1e3:.2f} ms"
            )
    half = [c for c in cases if c["name"] in HALF_WIDTH]
    out = {
        "cases": cases,
        "target": "speedup >= 0.8 * flops_reduction in every case",
        "met": all(c["speedup_over_flops"] >= 0.8 for c in cases),
        "half_width_target": "ResNet-56 and VGG-16 at half width: speedup >= 0.8 * "
        "flops_reduction (best runtime)",
        "half_width_met": bool(half)
        and all(c["best_runtime_speedup_over_flops"] >= 0.8 for c in half),
        "layers_within_budget": [c["floor_over_budget"] <= 1.0 for c in cases],
        "modules_within_budget": [c["modules_over_budget"] <= 1.0 for c in cases],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"target met: {out['met']}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
