"""Fashion-MNIST: the library's default recipe on the BMRS paper's networks and SBP's
LeNet5-Caffe, at several KL weights, side by side with the published figures.

For each network and seed the script runs :func:`pyro_sbp.infer.sweep.run_sweep`, i.e. what
``pyro-sbp sweep`` does: the network is pretrained once (the reference, "unpruned"), then fitted
at every KL weight of its grid with the default criterion (``bmrs-u:4``) pruning during training
(masks recomputed after each SVI epoch), fine-tuned with the masks frozen and the
best-validation epoch kept. Each point is measured on the test split: accuracy, units and
parameters removed, FLOPs reduction and the realised CPU speed-up of the exported network
(batch 256, one thread). The KL weight is then picked as the sweep's ``--max-accuracy-drop``
does, on the validation split and on the mean over seeds: the smallest network within 2 points
of the reference (BMRS networks) or 1 point (LeNet5-Caffe); those are the ``recommended``
entries. LeNet5-Caffe gets SBP's input gate on its first dense layer (``classifier.1``).

Fits run in ``--jobs`` processes of one torch thread each; every fit is an ordinary resumable
run directory in ``--work-dir``, so an interrupted benchmark continues where it stopped. Writes
``benchmarks/results/fashion_mnist.json`` (``rows``, ``recommended``, ``targets``) and renders
``docs/results/fashion_mnist.md`` with the frontier plots from it.

    python benchmarks/fashion_mnist.py            # the full benchmark (3 seeds)
    python benchmarks/fashion_mnist.py --quick    # a pipeline check on a subset, one seed
                                                  # (fashion_mnist_quick.json; page printed)
    python benchmarks/fashion_mnist.py --render   # re-render the docs page from the JSON

The data come from local IDX files: ``--data-dir``, a torchvision root, or Debian's package
(``apt-get install dataset-fashion-mnist``, into ``/usr/share/datasets/fashion-mnist``).
"""

import argparse
import dataclasses
import json
import multiprocessing
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from pyro_sbp.data import load_dataset
from pyro_sbp.export import compare, export_full, export_pruned
from pyro_sbp.infer import TrainConfig, Trainer
from pyro_sbp.infer.sweep import run_sweep
from pyro_sbp.reduction import DEFAULT_CRITERION

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "fashion_mnist.json"
QUICK_RESULTS = ROOT / "benchmarks" / "results" / "fashion_mnist_quick.json"
DOC = ROOT / "docs" / "results" / "fashion_mnist.md"

#: Per network: the recipe's epochs (full, quick), the KL weights, the accuracy drop allowed
#: (points, on validation) when picking the weight, and the network's options. Weights Adam 1e-3,
#: beta1 0.95; gates GATE_LR.
SETTINGS = {
    "bmrs-mlp": {
        "full": dict(pretrain_epochs=10, epochs=6, finetune_epochs=2),
        "quick": dict(pretrain_epochs=1, epochs=1, finetune_epochs=1),
        "kl_weights": [30.0, 100.0, 200.0, 300.0],
        "quick_kl_weights": [100.0],
        "max_accuracy_drop": 2.0,
        "resize": 32,
        "input_gates": [],
    },
    "bmrs-lenet5": {
        "full": dict(pretrain_epochs=10, epochs=6, finetune_epochs=2),
        "quick": dict(pretrain_epochs=1, epochs=1, finetune_epochs=1),
        "kl_weights": [30.0, 100.0, 200.0, 300.0],
        "quick_kl_weights": [100.0],
        "max_accuracy_drop": 2.0,
        "resize": 32,
        "input_gates": [],
    },
    "lenet5-caffe": {
        "full": dict(pretrain_epochs=5, epochs=6, finetune_epochs=2),
        "quick": dict(pretrain_epochs=1, epochs=1, finetune_epochs=1),
        "kl_weights": [10.0, 20.0, 30.0, 100.0],
        "quick_kl_weights": [30.0],
        "max_accuracy_drop": 1.0,
        "resize": None,
        "input_gates": ["classifier.1"],
    },
}
GATE_LR = 0.05
QUICK_TRAIN = 6000

#: The BMRS paper's Fashion-MNIST columns (10 seeds; compression = % of units removed).
PUBLISHED = [
    ("bmrs-mlp", "none", 0.00, 0.00, 88.17, 0.20),
    ("bmrs-mlp", "l2", 87.86, 2.27, 18.23, 10.22),
    ("bmrs-mlp", "mean", 91.76, 0.81, 85.59, 0.26),
    ("bmrs-mlp", "snr", 99.83, 0.00, 10.00, 0.00),
    ("bmrs-mlp", "bmrs-n", 93.20, 0.66, 84.99, 0.35),
    ("bmrs-mlp", "bmrs-u:8", 93.02, 0.81, 85.01, 0.32),
    ("bmrs-mlp", "bmrs-u:4", 91.57, 0.71, 85.79, 0.34),
    ("bmrs-lenet5", "none", 0.00, 0.00, 89.16, 0.27),
    ("bmrs-lenet5", "l2", 83.62, 1.69, 10.00, 0.00),
    ("bmrs-lenet5", "mean", 89.71, 0.56, 50.93, 33.45),
    ("bmrs-lenet5", "snr", 98.47, 3.45, 17.01, 21.03),
    ("bmrs-lenet5", "bmrs-n", 88.02, 1.00, 77.90, 2.44),
    ("bmrs-lenet5", "bmrs-u:8", 87.61, 0.72, 77.23, 3.49),
    ("bmrs-lenet5", "bmrs-u:4", 88.72, 0.73, 81.10, 1.50),
]
#: SBP paper, LeNet5-Caffe on MNIST: widths 3-18-284-283, 10.49x fewer FLOPs, 5.41x on CPU.
SBP_PUBLISHED = {"widths": "3-18-284-283", "flops_reduction": 10.49, "cpu_speedup": 5.41}
#: The issue's targets (test accuracy, mean of the seeds, the recommended point).
TARGETS = {
    "bmrs-lenet5": {"units_removed_min": 88.0, "accuracy_drop_max": 2.0},
    "bmrs-mlp": {"units_removed_min": 93.0, "accuracy_drop_max": 2.0},
    "lenet5-caffe": {"flops_reduction_min": 8.0, "accuracy_drop_max": 1.0, "cpu_speedup_min": 4.0},
}


def _splits(network: str, seed: int, data_dir, quick: bool):
    splits = load_dataset("fashion-mnist", data_dir, seed=seed, resize=SETTINGS[network]["resize"])
    if quick:
        x, y = splits.train.tensors
        split = dict(splits.split)
        split["sizes"] = dict(split["sizes"], train=QUICK_TRAIN)
        split["indices"] = dict(split["indices"], train=split["indices"]["train"][:QUICK_TRAIN])
        splits = dataclasses.replace(
            splits, train=TensorDataset(x[:QUICK_TRAIN], y[:QUICK_TRAIN]), split=split
        )
    return splits


def _speedup(run_dir: Path, splits) -> float:
    """The exported pruned network's CPU speed-up over the full one (batch 256, one thread);
    cached in the run directory."""
    cache = run_dir / "bench_speed.json"
    if cache.exists():
        return json.loads(cache.read_text())["cpu_speedup"]
    trainer = Trainer.from_run(run_dir, splits=splits)
    trainer.guide.update_gates()
    shape = tuple(trainer.input_shape)
    full, pruned = export_full(trainer.net, shape), export_pruned(trainer.net, shape)
    result = compare(full, pruned, shape, batch_sizes=(256,), min_run_time=1.0)
    speedup = result["latency"][0]["speedup"]
    cache.write_text(json.dumps({"cpu_speedup": speedup}) + "\n")
    return speedup


def run_task(task: dict) -> dict:
    """One (network, seed): the sweep over the network's KL weights, every point measured."""
    torch.set_num_threads(1)
    network, seed, quick = task["network"], task["seed"], task["quick"]
    settings = SETTINGS[network]
    epochs = settings["quick" if quick else "full"]
    weights = settings["quick_kl_weights" if quick else "kl_weights"]
    start = time.perf_counter()
    splits = _splits(network, seed, task["data_dir"], quick)
    config = TrainConfig(
        model=network,
        dataset="fashion-mnist",
        data_dir=task["data_dir"],
        resize=settings["resize"],
        input_gates=list(settings["input_gates"]),
        gate_lr=GATE_LR,
        keep_best=True,
        seed=seed,
        **epochs,
    )
    out = Path(task["work_dir"]) / f"{network}-seed{seed}"
    record = run_sweep(
        config,
        weights,
        out,
        criterion=DEFAULT_CRITERION,
        max_accuracy_drop=settings["max_accuracy_drop"],
        progress=False,
        splits=splits,
    )
    ref = record["reference"]
    points = []
    for p in record["points"]:
        total = sum(p["units_total"].values())
        points.append(
            {
                "kl_weight": p["kl_weight"],
                "val_accuracy": 100 * p["val_accuracy"],
                "accuracy": 100 * p["test_accuracy"],
                "units": {s: [p["units_kept"][s], n] for s, n in p["units_total"].items()},
                "compression_units": 100 * (1 - sum(p["units_kept"].values()) / total),
                "compression_params": 100 * (1 - p["params"] / ref["params"]),
                "flops_reduction": ref["flops"] / max(p["flops"], 1),
                "cpu_speedup": _speedup(Path(p["run_dir"]), splits),
            }
        )
        print(
            f"{network} seed {seed} KL {p['kl_weight']:g}: removed "
            f"{points[-1]['compression_units']:5.1f}% units, test accuracy "
            f"{points[-1]['accuracy']:.2f}% (reference {100 * ref['test_accuracy']:.2f}%)",
            flush=True,
        )
    return {
        "network": network,
        "seed": seed,
        "settings": epochs | {"gate_lr": GATE_LR, "train_examples": splits.num_train},
        "criterion": record["criterion"],
        "reference": {
            "val_accuracy": 100 * ref["val_accuracy"],
            "accuracy": 100 * ref["test_accuracy"],
            "params": ref["params"],
            "flops": ref["flops"],
        },
        "points": points,
        "seconds_this_invocation": time.perf_counter() - start,
    }


def _mean_sd(values):
    values = list(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


def _aggregate(task_results: list[dict]) -> tuple[list[dict], list[dict]]:
    """Rows (the reference and one per KL weight, means over seeds) and the recommended point
    of each network."""
    rows, recommended = [], []
    by_network: dict[str, list[dict]] = {}
    for t in sorted(task_results, key=lambda t: (t["network"], t["seed"])):
        by_network.setdefault(t["network"], []).append(t)
    for network, tasks in by_network.items():
        seeds = [t["seed"] for t in tasks]
        ref_val, _ = _mean_sd(t["reference"]["val_accuracy"] for t in tasks)
        ref_acc, ref_sd = _mean_sd(t["reference"]["accuracy"] for t in tasks)
        rows.append(
            {
                "network": network,
                "criterion": "none",
                "kl_weight": None,
                "val_accuracy_mean": ref_val,
                "accuracy_mean": ref_acc,
                "accuracy_std": ref_sd,
                "compression_units_mean": 0.0,
                "compression_units_std": 0.0,
                "compression_params_mean": 0.0,
                "compression_params_std": 0.0,
                "flops_reduction_mean": 1.0,
                "flops_reduction_std": 0.0,
                "cpu_speedup_mean": 1.0,
                "cpu_speedup_std": 0.0,
                "seeds": seeds,
            }
        )
        network_rows = []
        for w in [p["kl_weight"] for p in tasks[0]["points"]]:
            per_seed = [next(p for p in t["points"] if p["kl_weight"] == w) for t in tasks]
            row = {"network": network, "criterion": tasks[0]["criterion"], "kl_weight": w}
            for key in (
                "val_accuracy",
                "accuracy",
                "compression_units",
                "compression_params",
                "flops_reduction",
                "cpu_speedup",
            ):
                row[f"{key}_mean"], row[f"{key}_std"] = _mean_sd(p[key] for p in per_seed)
            row["units"] = [p["units"] for p in per_seed]
            row["seeds"] = seeds
            network_rows.append(row)
        rows += network_rows
        drop = SETTINGS[network]["max_accuracy_drop"]
        ok = [r for r in network_rows if ref_val - r["val_accuracy_mean"] <= drop + 1e-9]
        if ok:
            best = max(ok, key=lambda r: (r["compression_params_mean"], -r["kl_weight"]))
            recommended.append(
                {
                    "network": network,
                    "criterion": best["criterion"],
                    "kl_weight": best["kl_weight"],
                    "max_accuracy_drop": drop,
                    "compression_units_mean": best["compression_units_mean"],
                    "accuracy_mean": best["accuracy_mean"],
                    "accuracy_unpruned_mean": ref_acc,
                    "val_accuracy_mean": best["val_accuracy_mean"],
                    "val_accuracy_unpruned_mean": ref_val,
                    "flops_reduction_mean": best["flops_reduction_mean"],
                    "cpu_speedup_mean": best["cpu_speedup_mean"],
                    "seeds": seeds,
                }
            )
    return rows, recommended


def _targets(recommended: list[dict]) -> dict:
    out = {}
    for r in recommended:
        t = TARGETS.get(r["network"])
        if t is None:
            continue
        drop = r["accuracy_unpruned_mean"] - r["accuracy_mean"]
        met = drop <= t["accuracy_drop_max"]
        entry = dict(t, accuracy_drop=drop, kl_weight=r["kl_weight"])
        if "units_removed_min" in t:
            entry["units_removed"] = r["compression_units_mean"]
            met = met and r["compression_units_mean"] >= t["units_removed_min"]
        if "flops_reduction_min" in t:
            entry["flops_reduction"] = r["flops_reduction_mean"]
            entry["cpu_speedup"] = r["cpu_speedup_mean"]
            met = met and r["flops_reduction_mean"] >= t["flops_reduction_min"]
            met = met and r["cpu_speedup_mean"] >= t["cpu_speedup_min"]
        entry["met"] = met
        out[r["network"]] = entry
    return out


def plot_frontiers(data: dict, directory: Path) -> list[Path]:
    """One PNG per network: units removed and FLOPs reduction against test accuracy (mean and
    standard deviation over seeds, one point per KL weight), the reference and the published
    points overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    published = [p for p in data["published"]]
    for network in SETTINGS:
        rows = [r for r in data["rows"] if r["network"] == network and r["kl_weight"] is not None]
        if not rows:
            continue
        ref = next(r for r in data["rows"] if r["network"] == network and r["kl_weight"] is None)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, key, label in (
            (axes[0], "compression_units", "units removed (%)"),
            (axes[1], "flops_reduction", "FLOPs reduction (x)"),
        ):
            xs = [r[f"{key}_mean"] for r in rows]
            ax.errorbar(
                xs,
                [r["accuracy_mean"] for r in rows],
                xerr=[r[f"{key}_std"] for r in rows],
                yerr=[r["accuracy_std"] for r in rows],
                fmt="o-",
                color="tab:blue",
                label=f"this library ({rows[0]['criterion']}), by KL weight",
            )
            for r, x in zip(rows, xs, strict=True):
                ax.annotate(
                    f"{r['kl_weight']:g}",
                    (x, r["accuracy_mean"]),
                    textcoords="offset points",
                    xytext=(4, 4),
                )
            ax.axhline(ref["accuracy_mean"], color="k", lw=0.7, label="unpruned (reference)")
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy (%)")
            if key == "flops_reduction":
                ax.set_xscale("log")
        pubs = [p for p in published if p["network"] == network and p["criterion"] != "none"]
        for p in pubs:
            axes[0].plot(p["compression_units_mean"], p["accuracy_mean"], "x", color="tab:red")
            axes[0].annotate(
                p["criterion"],
                (p["compression_units_mean"], p["accuracy_mean"]),
                textcoords="offset points",
                xytext=(3, -10),
                fontsize=7,
                color="tab:red",
            )
        if network == "lenet5-caffe":
            sbp = data["sbp_published"]
            axes[1].axvline(
                sbp["flops_reduction"], color="tab:red", ls="--", lw=0.8, label="SBP (MNIST)"
            )
        for ax in axes:
            ax.legend(fontsize=7, loc="lower left")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{network} on Fashion-MNIST (published: red, where known)")
        fig.tight_layout()
        path = directory / f"fashion_mnist_{network}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt(mean, sd, digits=2):
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def render(data: dict) -> str:
    """The docs page (Markdown) for the benchmark's JSON."""
    quick = data.get("quick", False)
    name = "fashion_mnist_quick.json" if quick else "fashion_mnist.json"
    lines = [
        "# Fashion-MNIST benchmark",
        "",
        "Generated by `python benchmarks/fashion_mnist.py"
        + (" --quick" if quick else "")
        + f"` from `benchmarks/results/{name}`; do not edit by hand.",
        "",
        f"Seeds {data['seeds']}; the last invocation took {data['wall_seconds'] / 60:.1f} min "
        f"wall on {data['jobs']} processes of one thread ({data['machine']}, torch "
        f"{data['torch']}). The library's default recipe (`pyro-sbp sweep`): each network is "
        'pretrained once (the reference, "none"), then fitted at each KL weight with '
        f"`{DEFAULT_CRITERION}` pruning during training (masks recomputed after every SVI "
        "epoch), fine-tuned with the masks frozen, the best-validation epoch kept. Gate "
        f"learning rate {GATE_LR}; weights Adam 1e-3, beta1 0.95; batch 128; 80/20 "
        "train/validation split; test on the official 10,000. Epochs per network: "
        + "; ".join(
            f"{n} {s['full']['pretrain_epochs']} pretraining + {s['full']['epochs']} SVI + "
            f"{s['full']['finetune_epochs']} fine-tuning"
            for n, s in SETTINGS.items()
        )
        + ".",
        "",
        "Accuracy is test accuracy in % (validation in its own column), compression the % of "
        "gated units (and of the exported network's parameters) removed, FLOPs reduction and "
        "CPU speed-up (batch 256, one thread, measured while the other process trains on the "
        "second core) of the exported pruned network against the full one; mean ± standard "
        "deviation over seeds. The KL weight is picked on validation, as "
        "`pyro-sbp sweep --max-accuracy-drop` does.",
        "",
        "## Recommended (the default recipe at the KL weight picked on validation)",
        "",
        "| network | KL weight | allowed drop (val) | units removed % | test accuracy % "
        "| unpruned % | FLOPs reduction | CPU speed-up | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["recommended"]:
        t = data["targets"].get(r["network"], {})
        verdict = ("met" if t.get("met") else "not met") if t else "-"
        lines.append(
            f"| {r['network']} | {r['kl_weight']:g} | {r['max_accuracy_drop']:g} | "
            f"{r['compression_units_mean']:.2f} | {r['accuracy_mean']:.2f} | "
            f"{r['accuracy_unpruned_mean']:.2f} | {r['flops_reduction_mean']:.2f}x | "
            f"{r['cpu_speedup_mean']:.2f}x | {verdict} |"
        )
    lines += ["", "Targets (test accuracy, mean of the seeds):", ""]
    for network, t in data["targets"].items():
        if "units_removed_min" in t:
            want = f">= {t['units_removed_min']:g}% of units removed"
            got = f"{t['units_removed']:.2f}%"
        else:
            want = (
                f">= {t['flops_reduction_min']:g}x fewer FLOPs and >= {t['cpu_speedup_min']:g}x "
                "on the CPU"
            )
            got = f"{t['flops_reduction']:.2f}x and {t['cpu_speedup']:.2f}x"
        lines.append(
            f"- {network}: {want} within {t['accuracy_drop_max']:g} "
            f"point{'' if t['accuracy_drop_max'] == 1 else 's'} of the unpruned "
            f"network: {got} at {t['accuracy_drop']:+.2f} points below it (KL weight "
            f"{t['kl_weight']:g}): **{'met' if t['met'] else 'not met'}**."
        )
    published = {(n, c): p for n, c, *p in PUBLISHED}
    for network in SETTINGS:
        rows = [r for r in data["rows"] if r["network"] == network]
        if not rows:
            continue
        lines += [
            "",
            f"## {network}",
            "",
            f"![{network} frontier](fashion_mnist_{network}.png)",
            "",
            "| criterion | KL weight | units removed % | params removed % | val accuracy % "
            "| test accuracy % | FLOPs reduction | CPU speed-up | units per layer (seed "
            f"{rows[0]['seeds'][0]}) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            widths = "-".join(str(k) for k, _ in r["units"][0].values()) if "units" in r else "all"
            kl = "-" if r["kl_weight"] is None else f"{r['kl_weight']:g}"
            lines.append(
                f"| `{r['criterion']}` | {kl} | "
                f"{_fmt(r['compression_units_mean'], r['compression_units_std'])} | "
                f"{_fmt(r['compression_params_mean'], r['compression_params_std'])} | "
                f"{r['val_accuracy_mean']:.2f} | {_fmt(r['accuracy_mean'], r['accuracy_std'])} | "
                f"{r['flops_reduction_mean']:.2f}x | {r['cpu_speedup_mean']:.2f}x | {widths} |"
            )
        pubs = [(c, p) for (n, c), p in published.items() if n == network]
        if pubs:
            lines += [
                "",
                "Published (BMRS paper, 10 seeds, from scratch, 50 epochs): "
                + "; ".join(f"`{c}` {p[0]:.2f}% removed at {p[2]:.2f}% accuracy" for c, p in pubs)
                + ".",
            ]
        if network == "lenet5-caffe":
            sbp = SBP_PUBLISHED
            lines += [
                "",
                f"SBP paper (MNIST, 200 epochs): {sbp['widths']}, {sbp['flops_reduction']}x fewer "
                f"FLOPs, {sbp['cpu_speedup']}x on CPU.",
            ]
    return "\n".join(lines) + "\n"


def _check_data(data_dir) -> None:
    try:
        load_dataset("fashion-mnist", data_dir)
    except (FileNotFoundError, RuntimeError) as e:
        sys.exit(
            f"Fashion-MNIST not found ({e}).\nInstall Debian's package (apt-get install "
            "dataset-fashion-mnist, files in /usr/share/datasets/fashion-mnist) or pass "
            "--data-dir with the four IDX files (or a torchvision root)."
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pipeline check, under 10 minutes")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--jobs", type=int, default=2, help="processes (one thread each)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work-dir", default=None, help="fitted runs (default runs/bench-fmnist)")
    parser.add_argument("--render", action="store_true", help="only re-render the docs page")
    args = parser.parse_args()
    results_path = QUICK_RESULTS if args.quick else RESULTS
    if args.render:
        data = json.loads(RESULTS.read_text())
        _write_page(data)
        print(f"wrote {DOC}")
        return
    _check_data(args.data_dir)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    default_work = "bench-fmnist-quick" if args.quick else "bench-fmnist"
    work = Path(args.work_dir or ROOT / "runs" / default_work)
    # The longest fits first, so that the processes finish together.
    tasks = [dict(network="lenet5-caffe", seed=s) for s in seeds]
    tasks += [dict(network=n, seed=s) for s in seeds for n in ("bmrs-lenet5", "bmrs-mlp")]
    for t in tasks:
        t.update(quick=args.quick, data_dir=args.data_dir, work_dir=str(work))
    start = time.perf_counter()
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            task_results = pool.map(run_task, tasks, chunksize=1)
    else:
        task_results = [run_task(t) for t in tasks]
    rows, recommended = _aggregate(task_results)
    data = {
        "rows": rows,
        "recommended": recommended,
        "targets": _targets(recommended),
        "published": [
            dict(
                zip(
                    [
                        "network",
                        "criterion",
                        "compression_units_mean",
                        "compression_units_std",
                        "accuracy_mean",
                        "accuracy_std",
                    ],
                    p,
                    strict=True,
                )
            )
            for p in PUBLISHED
        ],
        "sbp_published": SBP_PUBLISHED,
        "settings": SETTINGS,
        "seeds": seeds,
        "quick": args.quick,
        "jobs": args.jobs,
        "wall_seconds": time.perf_counter() - start,
        "tasks": task_results,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(data, indent=1) + "\n")
    if args.quick:
        print(render(data))
    else:
        _write_page(data)
    for network, t in data["targets"].items():
        print(f"{network}: target {'met' if t['met'] else 'not met'}: {json.dumps(t)}")
    wrote = results_path if args.quick else f"{results_path} and {DOC}"
    print(f"{data['wall_seconds'] / 60:.1f} min; wrote {wrote}")


def _write_page(data: dict) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    plot_frontiers(data, DOC.parent)
    DOC.write_text(render(data))


if __name__ == "__main__":
    main()
