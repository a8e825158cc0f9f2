"""Structured Bayesian pruning of LeNet5-Caffe on Fashion-MNIST, with Pyro's SVI loop.

The library's model and guide, driven by hand instead of the ``Trainer`` / CLI:

1. data: ``load_dataset("fashion-mnist")`` reads the IDX files of the Debian package
   ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or of ``--data-dir``;
   when they are missing the script exits with the loader's message, which says where it
   looked and how to get them. 48,000 training, 12,000 validation and the official 10,000 test
   images, 28x28;
2. network: ``build_network("lenet5-caffe")`` (conv 20, conv 50, fc 500, fc 10) made prunable
   with ``make_prunable``: 570 gates, on the 20 + 50 channels and the 500 hidden neurons;
3. pretraining: gates off (``set_gates_enabled(net, False)``), plain torch cross-entropy;
4. the model and guide of the library: ``SBPModel`` (categorical likelihood in
   ``pyro.plate("data", N, subsample=idx)``, per-example gate noise, KL scaled by ``1 / N``) and
   ``SBPGuide`` (a truncated log-normal per gate);
5. SVI with ``CompactMeanField_ELBO`` (``TraceMeanField_ELBO``'s loss and gradients, with each
   KL computed once per unit) over the minibatches of ``make_loaders``;
6. ``guide.update_gates()``, then ``compute_masks`` for the threshold-free Bayesian Model
   Reduction criteria (BMRS_N, BMRS_U-4 and its variant ``bmrs-u-low:4``) and SBP's SNR > 1,
   side by side; the ``--criterion`` masks are applied (``apply_masks``) and the network is
   fine-tuned with the masks frozen;
7. ``export_pruned`` / ``export_full`` (plain ``nn.Module`` s, saved as TorchScript),
   ``count_flops``, ``measure_latency``, and a check that the exported network computes what
   the gated one does;
8. ``to_arviz`` and ``arviz.summary`` of the first convolution's 20 gates.

The default run (2 pretraining, 4 SVI and 1 fine-tuning epochs of 375 minibatches) takes about
5 minutes on one thread of a 2-core machine shared with another training job (an SVI epoch
~40 s, a pretraining epoch ~25 s, loading ~1 s). ``--steps-per-epoch`` and
``--eval-examples`` cut it down for a smoke test. Files go to ``--out`` (default
``runs/examples/fashion-mnist``): ``pruned.pt`` and ``full.pt`` (TorchScript), ``masks.pt``,
``posterior.nc`` (ArviZ) and ``result.json``.

With the defaults (seed 0) BMRS_U-4 removes 36% of the units (205 of fc1's 500, one conv2
channel) at 90.65% test accuracy after fine-tuning; the convolutions hold most of the FLOPs, so
that is only 1.10x fewer. BMRS_N and ``bmrs-u-low:4`` remove nothing after so few epochs: see
``docs/math.md`` (section 4) for why.
"""

import argparse
import itertools
import json
import logging
import time
import warnings
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_sbp.data import load_dataset, make_loaders
from pyro_sbp.diagnostics import save_netcdf, to_arviz, var_name
from pyro_sbp.export import (
    count_flops,
    count_parameters,
    export_full,
    export_pruned,
    load_torchscript,
    measure_latency,
    save_torchscript,
)
from pyro_sbp.guides import SBPGuide
from pyro_sbp.infer import CompactMeanField_ELBO
from pyro_sbp.models import SBPModel, build_network, make_prunable, named_gates, set_gates_enabled
from pyro_sbp.reduction import apply_masks, compute_masks

# torch.utils.benchmark (measure_latency) logs that it found no CUDA runtime on a CPU machine.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

#: The criteria compared (no threshold to tune for the BMRS ones; SBP's own is SNR > 1).
CRITERIA = ("bmrs-n", "bmrs-u:4", "bmrs-u-low:4", "snr:1")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="directory of the Fashion-MNIST IDX files")
    p.add_argument("--pretrain-epochs", type=int, default=2, help="epochs with gates off")
    p.add_argument("--epochs", type=int, default=4, help="SVI epochs")
    p.add_argument("--finetune-epochs", type=int, default=1, help="SVI epochs after pruning")
    p.add_argument(
        "--steps-per-epoch", type=int, default=None, help="cap on the minibatches per epoch"
    )
    p.add_argument(
        "--eval-examples", type=int, default=None, help="evaluate on the first N test images"
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the weights")
    p.add_argument("--gate-lr", type=float, default=0.05, help="learning rate of the gates")
    p.add_argument("--criterion", choices=CRITERIA, default="bmrs-u:4", help="masks to export")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: OpenMP threads stall badly on shared cores)",
    )
    p.add_argument("--out", default="runs/examples/fashion-mnist", help="where to write files")
    return p.parse_args(argv)


def batches(loader, limit: int | None):
    return loader if limit is None else itertools.islice(loader, limit)


def pretrain(net, loader, epochs: int, limit: int | None, lr: float = 1e-3) -> None:
    """Deterministic training of the weights with the gates off (SBP starts from a trained net)."""
    set_gates_enabled(net, False)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for x, y, _idx in batches(loader, limit):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    set_gates_enabled(net, True)


def svi_epochs(svi, loader, epochs: int, limit: int | None) -> float:
    """SVI over the minibatches; the last epoch's mean loss (an estimate of the negative ELBO
    of the whole training set, the minibatch likelihood being scaled by ``N / batch``)."""
    loss = float("nan")
    for _ in range(epochs):
        total, n = 0.0, 0
        for x, y, idx in batches(loader, limit):
            total += svi.step(x, y, idx)
            n += 1
        loss = total / max(n, 1)
    return loss


@torch.no_grad()
def predict(net, data: tuple[torch.Tensor, torch.Tensor], batch_size: int = 1000):
    """Logits of ``net`` (in evaluation mode) on the inputs ``data[0]``."""
    x, _ = data
    return torch.cat([net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(-1) == labels).double().mean().item()


@torch.no_grad()
def predict_all_units(net, data):
    """Logits of the gated network with every unit kept (what ``export_full`` computes)."""
    saved = {site: gate.mask.clone() for site, gate in named_gates(net)}
    apply_masks(net, {site: torch.ones_like(m) for site, m in saved.items()})
    try:
        return predict(net, data)
    finally:
        apply_masks(net, saved)


def arviz_summary(net, guide, site: str, out: Path):
    """ArviZ data of every gate (saved as netCDF) and the summary of one layer's theta."""
    with warnings.catch_warnings():
        # ArviZ 0.2x announces its 1.0 refactor on import.
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
        import arviz as az

    data = to_arviz(net, guide, num_chains=2, num_draws=200, seed=0)
    save_netcdf(data, out / "posterior.nc")
    summary = az.summary(data, var_names=[f"theta_{var_name(site)}"], kind="stats", round_to=4)
    summary.insert(0, "kept", dict(named_gates(net))[site].mask.int().tolist())
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    out = Path(args.out)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()

    # 1. Data (nothing is downloaded: a missing file ends the script with the loader's advice).
    try:
        splits = load_dataset("fashion-mnist", args.data_dir, seed=args.seed)
    except FileNotFoundError as e:
        raise SystemExit(f"fashion_mnist_lenet5.py: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    loaders = make_loaders(splits, args.batch_size, seed=args.seed)
    train = loaders["train"]
    x_test, y_test = splits.test.tensors
    if args.eval_examples is not None:
        x_test, y_test = x_test[: args.eval_examples], y_test[: args.eval_examples]
    test = (x_test, y_test)
    num_data = splits.num_train
    shape = tuple(splits.input_shape)

    # 2. LeNet5-Caffe, made prunable: gates on conv1, conv2 and fc1 (not on the classifier).
    net = build_network("lenet5-caffe", mean=splits.mean, std=splits.std)
    make_prunable(net)

    # 3. Pretraining with the gates off.
    t0 = time.perf_counter()
    pretrain(net, train, args.pretrain_epochs, args.steps_per_epoch)
    pretrain_s = time.perf_counter() - t0
    net.eval()
    pretrained_acc = accuracy(predict(net, test), y_test)

    # 4. The library's model and guide; 5. SVI.
    model = SBPModel(net, num_data, shape)
    guide = SBPGuide(net, num_data)

    def optim_args(name: str) -> dict:
        gate_param = name.endswith((".gate.loc", ".gate.log_scale"))
        return {"lr": args.gate_lr if gate_param else args.lr, "betas": (0.95, 0.999)}

    svi = SVI(model, guide, Adam(optim_args), CompactMeanField_ELBO())
    net.train()
    t0 = time.perf_counter()
    loss = svi_epochs(svi, train, args.epochs, args.steps_per_epoch)
    svi_s = time.perf_counter() - t0

    # 6. E[theta] into the gates; the criteria side by side; the chosen masks applied.
    guide.update_gates()
    net.eval()
    gated_acc = accuracy(predict(net, test), y_test)
    results = {c: compute_masks(net, guide, c) for c in CRITERIA}
    chosen = results[args.criterion]
    apply_masks(net, chosen)
    pruned_acc = accuracy(predict(net, test), y_test)
    net.train()
    finetune_loss = svi_epochs(svi, train, args.finetune_epochs, args.steps_per_epoch)
    guide.update_gates()
    net.eval()

    # 7. Export, save, reload and compare with the gated network.
    pruned_logits = predict(net, test)
    full = export_full(net, shape)
    pruned = export_pruned(net, shape)
    save_torchscript(full, out / "full.pt")
    save_torchscript(pruned, out / "pruned.pt")
    torch.save({site: m.bool() for site, m in chosen.masks().items()}, out / "masks.pt")
    exported_logits = predict(load_torchscript(out / "pruned.pt"), test)
    export_error = (exported_logits - pruned_logits).abs().max().item()
    full_error = (predict(full, test) - predict_all_units(net, test)).abs().max().item()
    if max(export_error, full_error) > 1e-3:
        raise RuntimeError(
            f"the export differs from the gated network: {export_error:.3g} (pruned), "
            f"{full_error:.3g} (full)"
        )
    latency = {
        name: measure_latency(m, shape, batch_size=64, min_run_time=0.2, num_threads=args.threads)[
            "median_s"
        ]
        for name, m in (("full", full), ("pruned", pruned))
    }

    # 8. ArviZ: the 20 gates of the first convolution.
    site = next(iter(chosen.layers))
    summary = arviz_summary(net, guide, site, out)

    result = {
        "dataset": "fashion-mnist",
        "network": "lenet5-caffe",
        "num_train": num_data,
        "num_test_evaluated": len(y_test),
        "epochs": {
            "pretrain": args.pretrain_epochs,
            "svi": args.epochs,
            "finetune": args.finetune_epochs,
            "steps_per_epoch": args.steps_per_epoch or len(train),
        },
        "loss": {"svi": loss, "finetune": finetune_loss},
        "criterion": args.criterion,
        "units": {
            s: {"before": lp.units_before}
            | {c: results[c].layers[s].units_after for c in CRITERIA}
            | {"after": lp.units_after}
            for s, lp in chosen.layers.items()
        },
        "fraction_removed": {c: r.fraction_removed for c, r in results.items()},
        "test_accuracy": {
            "pretrained": pretrained_acc,
            "gated": gated_acc,
            "pruned": pruned_acc,
            "pruned_finetuned": accuracy(pruned_logits, y_test),
            "exported": accuracy(exported_logits, y_test),
        },
        "max_abs_logit_difference": {"pruned": export_error, "full": full_error},
        "params": {"full": count_parameters(full), "pruned": count_parameters(pruned)},
        "flops": {"full": count_flops(full, shape), "pruned": count_flops(pruned, shape)},
        "cpu_latency_batch64_s": latency,
        "threads": args.threads,
        "seconds": {
            "pretrain": pretrain_s,
            "svi": svi_s,
            "total": time.perf_counter() - start,
        },
        "files": ["full.pt", "pruned.pt", "masks.pt", "posterior.nc", "result.json"],
        "out": str(out),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print_result(result, summary, site)
    return result


def print_result(result: dict, summary, site: str) -> None:
    e = result["epochs"]
    print(
        f"lenet5-caffe on fashion-mnist ({result['num_train']} training images, "
        f"{e['steps_per_epoch']} steps per epoch): {e['pretrain']} pretraining, {e['svi']} SVI "
        f"and {e['finetune']} fine-tuning epochs; -ELBO {result['loss']['svi']:.1f}"
    )
    header = "".join(f"{c:>13}" for c in CRITERIA)
    print(f"{'units kept':<20} {'before':>6}{header}")
    for s, u in result["units"].items():
        print(f"{s:<20} {u['before']:>6}" + "".join(f"{u[c]:>13}" for c in CRITERIA))
    removed = "".join(f"{100 * result['fraction_removed'][c]:>12.1f}%" for c in CRITERIA)
    print(f"{'removed':<20} {'':>6}{removed}")
    acc = {k: f"{100 * v:.2f}%" for k, v in result["test_accuracy"].items()}
    print(
        f"test accuracy ({result['num_test_evaluated']} images): pretrained {acc['pretrained']}, "
        f"gated {acc['gated']}, pruned with {result['criterion']} {acc['pruned']}, fine-tuned "
        f"{acc['pruned_finetuned']}, exported {acc['exported']}"
    )
    p, f = result["params"], result["flops"]
    lat = result["cpu_latency_batch64_s"]
    print(
        f"parameters {p['full']:,} -> {p['pruned']:,}; FLOPs/example {f['full']:,} -> "
        f"{f['pruned']:,} ({f['full'] / max(f['pruned'], 1):.2f}x fewer)"
    )
    print(
        f"CPU latency, batch 64, {result['threads']} thread(s): {1e3 * lat['full']:.2f} ms -> "
        f"{1e3 * lat['pruned']:.2f} ms ({lat['full'] / lat['pruned']:.2f}x faster)"
    )
    diff = result["max_abs_logit_difference"]
    print(
        f"exported vs gated network, max |logit difference|: pruned {diff['pruned']:.1e}, "
        f"full {diff['full']:.1e}"
    )
    print(f"\narviz.summary of theta in {site} (independent draws from q):")
    print(summary.to_string(max_rows=24))
    sec = result["seconds"]
    print(
        f"\n{sec['total']:.0f} s (pretraining {sec['pretrain']:.0f} s, SVI {sec['svi']:.0f} s); "
        f"files in {result['out']}"
    )


if __name__ == "__main__":
    main()
