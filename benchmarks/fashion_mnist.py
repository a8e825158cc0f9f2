"""Fashion-MNIST: the BMRS paper's networks and criteria, and SBP's LeNet5-Caffe, side by side
with the published figures.

For each network and seed the script fits one gated network (pretraining, then SVI with the
ELBO whose KL counts every unit once against the whole data set's likelihood), then for every
criterion: computes the keep-masks from the fitted posterior, fine-tunes with the masks frozen
(``--finetune-epochs`` SVI epochs; the unpruned ``none`` row gets the same epochs) and measures
test accuracy, units and parameters removed (of the exported, physically smaller network).
L2, E[theta] and SNR are matched to BMRS_N's compression (``match:BASE:bmrs-n``), as the BMRS
paper does; ``snr:1`` is SBP's own rule and ``bmrs-n-published`` is the published BMRS code's
Delta F_N (ours + log(2 pi)/2, see docs/math.md), to show where the paper's compression comes
from. LeNet5-Caffe (SBP's recipe on 28x28 inputs) is pruned by BMRS_N, SNR > 1 and the others,
with units per layer, test error, FLOPs reduction and the realised CPU speed-up (one thread,
batch 256).

Fits run in ``--jobs`` processes of one torch thread each; every finished (network, seed) is
kept in ``--work-dir``, so an interrupted benchmark continues where it stopped. Writes
``benchmarks/results/fashion_mnist.json`` (top-level ``rows``) and renders
``docs/results/fashion_mnist.md`` from it.

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
from pyro_sbp.export import compare, count_flops, count_parameters, export_full, export_pruned
from pyro_sbp.infer import TrainConfig, Trainer
from pyro_sbp.infer.trainer import evaluate
from pyro_sbp.models import named_gates
from pyro_sbp.reduction import apply_masks, compute_masks

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "fashion_mnist.json"
QUICK_RESULTS = ROOT / "benchmarks" / "results" / "fashion_mnist_quick.json"
DOC = ROOT / "docs" / "results" / "fashion_mnist.md"

#: Row name -> criterion given to :func:`pyro_sbp.reduction.compute_masks` (None: no pruning).
BMRS_CRITERIA = {
    "none": None,
    "l2": "match:l2:bmrs-n",
    "mean": "match:mean:bmrs-n",
    "snr": "match:snr:bmrs-n",
    "bmrs-n": "bmrs-n",
    "bmrs-u:8": "bmrs-u:8",
    "bmrs-u:4": "bmrs-u:4",
    "bmrs-u-low:4": "bmrs-u-low:4",
    "snr:1": "snr:1",
    "bmrs-n-published": "bmrs-n-published",
    # BMRS_N removes no unit here (see docs/math.md), so the baselines are also compared at
    # BMRS_U-4's compression.
    "match:l2:bmrs-u:4": "match:l2:bmrs-u:4",
    "match:mean:bmrs-u:4": "match:mean:bmrs-u:4",
    "match:snr:bmrs-u:4": "match:snr:bmrs-u:4",
}
SBP_CRITERIA = {
    "none": None,
    "bmrs-n": "bmrs-n",
    "snr:1": "snr:1",
    "bmrs-u:4": "bmrs-u:4",
    "bmrs-n-published": "bmrs-n-published",
}

#: Training settings per network: (full, quick). Learning rates are the BMRS paper's Adam 1e-3
#: for the weights; the gates get their own rate (SBP's recipe).
SETTINGS = {
    "bmrs-mlp": {
        "full": dict(pretrain_epochs=5, epochs=20, finetune_epochs=1),
        "quick": dict(pretrain_epochs=1, epochs=2, finetune_epochs=1),
        "resize": 32,
    },
    "bmrs-lenet5": {
        "full": dict(pretrain_epochs=5, epochs=15, finetune_epochs=1),
        "quick": dict(pretrain_epochs=1, epochs=2, finetune_epochs=1),
        "resize": 32,
    },
    "lenet5-caffe": {
        "full": dict(pretrain_epochs=3, epochs=12, finetune_epochs=1),
        "quick": dict(pretrain_epochs=1, epochs=1, finetune_epochs=1),
        "resize": None,
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
TARGETS = {
    "bmrs-lenet5": {"units_removed_min": 85.0, "accuracy_drop_max": 2.0},
    "bmrs-mlp": {"units_removed_min": 90.0, "accuracy_drop_max": 2.0},
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


def _evaluate_criterion(run: Path, config, splits, name, criterion, finetune, speed):
    """Load the fitted run, prune with ``criterion``, fine-tune, and measure."""
    trainer = Trainer(config, run, resume=True, progress=False, splits=splits)
    trainer.out_dir = None  # the fitted checkpoint stays as it is
    if criterion is not None:
        apply_masks(trainer.net, compute_masks(trainer.net, trainer.guide, criterion))
    trainer.config.finetune_epochs = finetune
    trainer.fit()
    trainer.guide.update_gates()
    accuracy = evaluate(trainer.net, trainer.loaders["test"], trainer.device)
    shape = tuple(trainer.input_shape)
    full, pruned = export_full(trainer.net, shape), export_pruned(trainer.net, shape)
    units = {s: [int(g.mask.sum()), g.num_units] for s, g in named_gates(trainer.net)}
    kept, total = sum(k for k, _ in units.values()), sum(n for _, n in units.values())
    params_full, params_pruned = count_parameters(full), count_parameters(pruned)
    out = {
        "criterion": name,
        "spec": criterion,
        "accuracy": 100 * accuracy,
        "units": units,
        "compression_units": 100 * (1 - kept / total),
        "params_full": params_full,
        "params_pruned": params_pruned,
        "compression_params": 100 * (1 - params_pruned / params_full),
        "flops_reduction": count_flops(full, shape) / max(count_flops(pruned, shape), 1),
    }
    if speed:
        result = compare(full, pruned, shape, batch_sizes=(256,), min_run_time=1.0)
        out["cpu_speedup"] = result["latency"][0]["speedup"]
    return out


def run_task(task: dict) -> dict:
    """Fit one (network, seed) and evaluate every criterion on it; cached in the work dir (a
    criterion added later is evaluated on the cached fit, the others are read back)."""
    torch.set_num_threads(1)
    network, seed, quick = task["network"], task["seed"], task["quick"]
    run = Path(task["work_dir"]) / f"{network}-seed{seed}"
    done = run / "result.json"
    criteria = SBP_CRITERIA if network == "lenet5-caffe" else BMRS_CRITERIA
    cached = json.loads(done.read_text()) if done.exists() else None
    if cached is not None and {r["criterion"] for r in cached["results"]} >= set(criteria):
        return cached
    run.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    s = SETTINGS[network]["quick" if quick else "full"]
    splits = _splits(network, seed, task["data_dir"], quick)
    config = TrainConfig(
        model=network,
        dataset="fashion-mnist",
        data_dir=task["data_dir"],
        resize=SETTINGS[network]["resize"],
        pretrain_epochs=s["pretrain_epochs"],
        epochs=s["epochs"],
        gate_lr=GATE_LR,
        seed=seed,
    )
    resume = (run / "checkpoint.pt").exists()
    trainer = Trainer(config, run, resume=resume, progress=False, splits=splits)
    trainer.fit()
    fit_seconds = time.perf_counter() - start
    before = {r["criterion"]: r for r in cached["results"]} if cached else {}
    results = []
    speed = network == "lenet5-caffe"
    for name, criterion in criteria.items():
        if name in before:
            results.append(before[name])
            continue
        finetune = s["finetune_epochs"]
        results.append(_evaluate_criterion(run, config, splits, name, criterion, finetune, speed))
        r = results[-1]
        print(
            f"{network} seed {seed} {name:<17} removed {r['compression_units']:5.1f}% units, "
            f"{r['compression_params']:5.1f}% params, test accuracy {r['accuracy']:.2f}%",
            flush=True,
        )
    out = {
        "network": network,
        "seed": seed,
        "settings": s | {"gate_lr": GATE_LR, "train_examples": splits.num_train},
        # Process time over every invocation that worked on this (network, seed).
        "fit_seconds": fit_seconds + (cached["fit_seconds"] if cached else 0.0),
        "seconds": time.perf_counter() - start + (cached["seconds"] if cached else 0.0),
        "results": results,
    }
    done.write_text(json.dumps(out, indent=1) + "\n")
    return out


def _aggregate(task_results: list[dict]) -> list[dict]:
    rows = []
    by_network: dict[str, list[dict]] = {}
    for t in sorted(task_results, key=lambda t: (t["network"], t["seed"])):
        by_network.setdefault(t["network"], []).append(t)
    for network, tasks in by_network.items():
        for name in [r["criterion"] for r in tasks[0]["results"]]:
            per_seed = [next(r for r in t["results"] if r["criterion"] == name) for t in tasks]

            def stats(key, per_seed=per_seed):
                values = [r[key] for r in per_seed]
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                return statistics.fmean(values), sd

            row = {"network": network, "criterion": name, "spec": per_seed[0]["spec"]}
            for key, field in [
                ("compression_units", "compression_units"),
                ("compression_params", "compression_params"),
                ("accuracy", "accuracy"),
                ("flops_reduction", "flops_reduction"),
            ]:
                row[f"{field}_mean"], row[f"{field}_std"] = stats(key)
            if "cpu_speedup" in per_seed[0]:
                row["cpu_speedup_mean"], row["cpu_speedup_std"] = stats("cpu_speedup")
            row["units"] = [r["units"] for r in per_seed]
            row["seeds"] = [t["seed"] for t in tasks]
            rows.append(row)
    return rows


def _targets(rows: list[dict]) -> dict:
    out = {}
    for network, t in TARGETS.items():
        get = {r["criterion"]: r for r in rows if r["network"] == network}
        if "bmrs-n" not in get:
            continue
        removed = get["bmrs-n"]["compression_units_mean"]
        drop = get["none"]["accuracy_mean"] - get["bmrs-n"]["accuracy_mean"]
        out[network] = {
            "criterion": "bmrs-n",
            "units_removed": removed,
            "accuracy_drop": drop,
            "units_removed_min": t["units_removed_min"],
            "accuracy_drop_max": t["accuracy_drop_max"],
            "met": removed >= t["units_removed_min"] and drop <= t["accuracy_drop_max"],
        }
    return out


def _fmt(mean, sd, digits=2):
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def render(data: dict) -> str:
    """The docs page (Markdown) for the benchmark's JSON."""
    quick = data.get("quick", False)
    lines = [
        "# Fashion-MNIST benchmark",
        "",
        "Generated by `python benchmarks/fashion_mnist.py"
        + (" --quick" if quick else "")
        + "` from `benchmarks/results/"
        + ("fashion_mnist_quick.json" if quick else "fashion_mnist.json")
        + "`; do not edit by hand.",
        "",
        f"Seeds {data['seeds']}; {sum(data.get('task_seconds', {}).values()) / 60:.1f} min of "
        "process time for all fits and evaluations (summed over the invocations that made "
        f"them); the last invocation took {data['wall_seconds'] / 60:.1f} min wall on "
        f"{data['jobs']} processes of one thread ({data['machine']}, torch {data['torch']}). "
        "Each network is fitted once per seed; every criterion then prunes that fit and "
        f"fine-tunes it with frozen masks. Gate learning rate {GATE_LR}; weights Adam 1e-3, "
        "beta1 0.95; batch 128; 80/20 train/validation split; test on the official 10,000.",
        "",
        "Compression is the % of gated units removed (and of the exported network's "
        "parameters); accuracy is test accuracy in %; mean ± standard deviation over seeds. "
        "`l2`, `mean` and `snr` are matched to `bmrs-n`'s compression, the `match:BASE:bmrs-u:4` "
        "rows to BMRS_U-4's (BMRS_N removes nothing here). `bmrs-n-published` is "
        "the published BMRS code's ΔF_N, which is ours + ½ log 2π (see docs/math.md).",
        "",
    ]
    published = {(n, c): p for n, c, *p in PUBLISHED}
    for network in ("bmrs-mlp", "bmrs-lenet5"):
        rows = [r for r in data["rows"] if r["network"] == network]
        if not rows:
            continue
        lines += [
            f"## {network}",
            "",
            "| criterion | units removed % | params removed % | accuracy % "
            "| published units removed % | published accuracy % |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            p = published.get((network, r["criterion"]))
            pub = f"{_fmt(p[0], p[1])} | {_fmt(p[2], p[3])}" if p else "- | -"
            lines.append(
                f"| `{r['criterion']}` | "
                f"{_fmt(r['compression_units_mean'], r['compression_units_std'])} | "
                f"{_fmt(r['compression_params_mean'], r['compression_params_std'])} | "
                f"{_fmt(r['accuracy_mean'], r['accuracy_std'])} | {pub} |"
            )
        t = data["targets"].get(network)
        if t:
            lines += [
                "",
                f"Target (BMRS_N removes ≥ {t['units_removed_min']:g}% of units within "
                f"{t['accuracy_drop_max']:g} points of `none`): removed "
                f"{t['units_removed']:.2f}%, accuracy {t['accuracy_drop']:+.2f} points below "
                f"`none`: **{'met' if t['met'] else 'not met'}**.",
            ]
        lines.append("")
    rows = [r for r in data["rows"] if r["network"] == "lenet5-caffe"]
    if rows:
        lines += [
            "## LeNet5-Caffe (SBP: pretraining, then SVI)",
            "",
            "| criterion | units per layer (conv1-conv2-fc1) | test error % "
            "| FLOPs reduction | CPU speed-up (batch 256, 1 thread) |",
            "|---|---|---|---|---|",
        ]
        for r in rows:
            widths = "-".join(str(k) for k, _ in r["units"][0].values())
            lines.append(
                f"| `{r['criterion']}` | {widths} | {100 - r['accuracy_mean']:.2f} | "
                f"{r['flops_reduction_mean']:.2f}x | {r['cpu_speedup_mean']:.2f}x |"
            )
        sbp = SBP_PUBLISHED
        lines += [
            "",
            f"SBP paper (MNIST): {sbp['widths']}, {sbp['flops_reduction']}x fewer FLOPs, "
            f"{sbp['cpu_speedup']}x on CPU. The speed-up here is measured while the other "
            "process trains on the second core.",
            "",
        ]
    return "\n".join(lines)


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
    parser.add_argument("--quick", action="store_true", help="pipeline check, about 10 minutes")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--jobs", type=int, default=2, help="processes (one thread each)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work-dir", default=None, help="fitted runs (default runs/bench-fmnist)")
    parser.add_argument("--render", action="store_true", help="only re-render the docs page")
    args = parser.parse_args()
    results_path = QUICK_RESULTS if args.quick else RESULTS
    if args.render:
        data = json.loads(RESULTS.read_text())
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(render(data) + "\n")
        print(f"wrote {DOC}")
        return
    _check_data(args.data_dir)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    default_work = "bench-fmnist-quick" if args.quick else "bench-fmnist"
    work = Path(args.work_dir or ROOT / "runs" / default_work)
    # The longest fit first, so that the two processes finish together.
    tasks = [dict(network="lenet5-caffe", seed=seeds[0])]
    tasks += [dict(network=n, seed=s) for s in seeds for n in ("bmrs-lenet5", "bmrs-mlp")]
    for t in tasks:
        t.update(quick=args.quick, data_dir=args.data_dir, work_dir=str(work))
    start = time.perf_counter()
    if args.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            task_results = pool.map(run_task, tasks, chunksize=1)
    else:
        task_results = [run_task(t) for t in tasks]
    rows = _aggregate(task_results)
    data = {
        "rows": rows,
        "targets": _targets(rows),
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
        "seeds": seeds,
        "quick": args.quick,
        "jobs": args.jobs,
        "wall_seconds": time.perf_counter() - start,
        "task_seconds": {f"{t['network']}-seed{t['seed']}": t["seconds"] for t in task_results},
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(data, indent=1) + "\n")
    if args.quick:
        print(render(data))
    else:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(render(data) + "\n")
    for network, t in data["targets"].items():
        print(
            f"{network}: BMRS_N removed {t['units_removed']:.2f}% of units, accuracy "
            f"{t['accuracy_drop']:+.2f} points below none: {'met' if t['met'] else 'not met'}"
        )
    wrote = results_path if args.quick else f"{results_path} and {DOC}"
    print(f"{data['wall_seconds'] / 60:.1f} min; wrote {wrote}")


if __name__ == "__main__":
    main()
