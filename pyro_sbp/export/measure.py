"""Parameters, FLOPs and latency of exported networks."""

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (weights and biases; buffers such as BatchNorm statistics excluded)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_flops(module: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1) -> int:
    """FLOPs of one forward pass, counted by :class:`torch.utils.flop_counter.FlopCounterMode`.

    It counts matrix multiplications and convolutions only, at **2 FLOPs per multiply-add**
    (so a ``Linear(n, m)`` on one input is ``2 n m``); element-wise operations, pooling and
    normalisation are not counted.
    """
    param = next(module.parameters())
    x = torch.zeros((batch_size, *input_shape), dtype=param.dtype, device=param.device)
    counter = FlopCounterMode(display=False)
    with counter:
        module(x)
    return int(counter.get_total_flops())


@torch.no_grad()
def measure_latency(
    module: nn.Module,
    input_shape: tuple[int, ...],
    batch_size: int,
    device: str | torch.device = "cpu",
    min_run_time: float = 1.0,
    num_threads: int = 1,
) -> dict:
    """Latency of one forward pass with :mod:`torch.utils.benchmark` (which synchronises CUDA).

    On one thread by default (``torch.utils.benchmark``'s own default): a shared machine's
    other work disturbs a multi-threaded measurement far more than a single-threaded one.

    :return: ``{"median_s", "iqr_s", "runs"}`` for the given batch size and device.
    """
    # Imported here: torch.utils.benchmark pulls in the C++ extension machinery, which logs a
    # warning about CUDA on machines without it.
    from torch.utils import benchmark

    device = torch.device(device)
    module = module.to(device).eval()
    x = torch.rand((batch_size, *input_shape), device=device)
    timer = benchmark.Timer(
        stmt="module(x)",
        globals={"module": module, "x": x},
        num_threads=num_threads,
    )
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times)}


def compare(
    full: nn.Module,
    pruned: nn.Module,
    input_shape: tuple[int, ...],
    batch_sizes=(1, 64, 256),
    devices=("cpu",),
    min_run_time: float = 1.0,
    num_threads: int = 1,
) -> dict:
    """Parameters, FLOPs and latencies of the full and the pruned network, side by side.

    Latencies are measured alternately (full, pruned) per batch size and device, so that both
    see the same machine state.
    """
    out = {
        "input_shape": list(input_shape),
        "params_full": count_parameters(full),
        "params_pruned": count_parameters(pruned),
        "flops_full": count_flops(full, input_shape),
        "flops_pruned": count_flops(pruned, input_shape),
        "flops_note": "FLOPs per example, 2 per multiply-add (torch.utils.flop_counter)",
        "latency": [],
        "num_threads": num_threads,
    }
    out["flops_reduction"] = out["flops_full"] / max(out["flops_pruned"], 1)
    out["params_reduction"] = out["params_full"] / max(out["params_pruned"], 1)
    for device in devices:
        for bs in batch_sizes:
            f = measure_latency(full, input_shape, bs, device, min_run_time, num_threads)
            p = measure_latency(pruned, input_shape, bs, device, min_run_time, num_threads)
            out["latency"].append(
                {
                    "device": str(device),
                    "batch_size": bs,
                    "full_median_s": f["median_s"],
                    "full_iqr_s": f["iqr_s"],
                    "pruned_median_s": p["median_s"],
                    "pruned_iqr_s": p["iqr_s"],
                    "speedup": f["median_s"] / p["median_s"],
                }
            )
    full.cpu()
    pruned.cpu()
    return out


def format_table(result: dict) -> str:
    """A plain-text table of :func:`compare`'s result (with a runtime column when the latency
    rows name theirs, as ``pyro-sbp bench``'s do)."""
    runtimes = any("runtime" in r for r in result["latency"])
    first = f"{'runtime':<12} " if runtimes else ""
    lines = [
        f"parameters: full {result['params_full']:,}  pruned {result['params_pruned']:,}  "
        f"({result['params_reduction']:.2f}x fewer)",
        f"FLOPs/example: full {result['flops_full']:,}  pruned {result['flops_pruned']:,}  "
        f"({result['flops_reduction']:.2f}x fewer; 2 per multiply-add)",
        f"{first}{'device':<7} {'batch':>6} {'full ms':>10} {'pruned ms':>10} {'speed-up':>9}",
    ]
    for r in result["latency"]:
        first = f"{r.get('runtime', ''):<12} " if runtimes else ""
        lines.append(
            f"{first}{r['device']:<7} {r['batch_size']:>6} {1e3 * r['full_median_s']:>10.3f} "
            f"{1e3 * r['pruned_median_s']:>10.3f} {r['speedup']:>8.2f}x"
        )
    return "\n".join(lines)


__all__ = [
    "compare",
    "count_flops",
    "count_parameters",
    "format_table",
    "measure_latency",
]
