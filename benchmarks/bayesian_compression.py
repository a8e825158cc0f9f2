"""Sparse VD and Bayesian Compression on Fashion-MNIST: LeNet-300-100 and LeNet5-Caffe with
each method, side by side with the published MNIST figures.

For each network and seed the plain network is pretrained once (the reference, "unpruned":
its test error is the one the targets compare with), then each method of ``--methods``
(``sparse-vd``, ``bc-gnj``, ``bc-ghs``; a method whose module is not installed is skipped
with a note) is fitted from those weights by the library's trainer (``TrainConfig.method``,
what ``pyro-sbp train --method`` does) and reduced with the method's default criterion
(Sparse VD: a weight goes at log alpha > 3; BC: its groups' thresholds). Each fit is measured
on the test split: test error, the architecture after pruning (in the papers' notation: the
output channels of the convolutions, the input features of the dense layers), |W| / |W != 0|
(the weights of the exported network that are not zero), the bit precision per layer and the
three compression rates of BC's Table 2 (pruning, fast prediction, maximum compression;
:mod:`pyro_sbp.export.bit_precision`, and :func:`pyro_sbp.export.sparse.
compression_report_sparse_vd` for Sparse VD), the FLOPs reduction of the exported dense
network and its measured CPU speed-up (batch 256, one thread).

Every fit is an ordinary resumable run directory in ``--work-dir`` and every measurement is
cached there (``measured.json``), so an interrupted benchmark continues where it stopped.
Writes ``benchmarks/results/bayesian_compression.json`` and renders
``docs/results/bayesian_compression.md`` (``--quick``: ``bayesian_compression_quick.json`` and
``bayesian_compression_quick.md``).

    python benchmarks/bayesian_compression.py            # 3 seeds, both networks, all methods
    python benchmarks/bayesian_compression.py --quick    # one seed, fewer epochs
    python benchmarks/bayesian_compression.py --quick --methods sparse-vd --networks lenet5-caffe
    python benchmarks/bayesian_compression.py --render   # re-render the page from the JSON

The data come from local IDX files: ``--data-dir`` or Debian's package
(``apt-get install dataset-fashion-mnist``, into ``/usr/share/datasets/fashion-mnist``).
"""

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pyro_sbp.data import load_dataset
from pyro_sbp.export import compare
from pyro_sbp.infer import TrainConfig, Trainer, evaluate
from pyro_sbp.infer.checkpoint import write_text_atomic
from pyro_sbp.methods import get_method

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bayesian_compression.json"
QUICK_RESULTS = ROOT / "benchmarks" / "results" / "bayesian_compression_quick.json"
DOC = ROOT / "docs" / "results" / "bayesian_compression.md"
QUICK_DOC = ROOT / "docs" / "results" / "bayesian_compression_quick.md"

NETWORKS = ("lenet5-caffe", "lenet-300-100")
METHODS = ("sparse-vd", "bc-gnj", "bc-ghs")
#: Epochs per network: deterministic pretraining (the reference), then SVI per method,
#: (full, quick).
EPOCHS = {
    "lenet5-caffe": {"pretrain": (10, 3), "svi": (40, 12), "warmup": (5, 2)},
    "lenet-300-100": {"pretrain": (10, 3), "svi": (40, 12), "warmup": (5, 2)},
}
#: The recipe of each method (weights: Adam 1e-3, beta1 0.95, batch 128): the learning rate of
#: the variational parameters, and the KL weight beta (1: the ELBO; larger tempers the
#: likelihood, the lever of the issue "Compression that pays").
RECIPES = {
    "sparse-vd": {"gate_lr": 1e-2, "kl_weight": 3.0},
    "bc-gnj": {"gate_lr": 1e-2, "kl_weight": 1.0},
    "bc-ghs": {"gate_lr": 1e-2, "kl_weight": 1.0},
}
LR = 1e-3

#: The published MNIST figures: BC Tables 1 and 2 (Louizos et al. 2017: architecture after
#: pruning, bit precision per layer, |W != 0| / |W| in %, the three compression rates and the
#: error in %) and the Sparse VD paper (Molchanov et al. 2017: |W| / |W != 0| and error).
PUBLISHED = {
    ("lenet-300-100", "sparse-vd"): {
        "architecture": "512-114-72",
        "bits": "8-11-14",
        "nonzero_percent": 2.2,
        "rates": (21, 84, 113),
        "error": 1.8,
        "svd_paper_ratio": 68,
    },
    ("lenet-300-100", "bc-gnj"): {
        "architecture": "278-98-13",
        "bits": "8-9-14",
        "nonzero_percent": 10.8,
        "rates": (9, 36, 58),
        "error": 1.8,
    },
    ("lenet-300-100", "bc-ghs"): {
        "architecture": "311-86-14",
        "bits": "13-11-10",
        "nonzero_percent": 10.6,
        "rates": (9, 23, 59),
        "error": 1.9,
    },
    ("lenet5-caffe", "sparse-vd"): {
        "architecture": "14-19-242-131",
        "bits": "13-10-8-12",
        "nonzero_percent": 0.7,
        "rates": (63, 228, 365),
        "error": 1.0,
        "svd_paper_ratio": 280,
        "svd_paper_error": 0.75,
    },
    ("lenet5-caffe", "bc-gnj"): {
        "architecture": "8-13-88-13",
        "bits": "18-10-7-9",
        "nonzero_percent": 0.9,
        "rates": (108, 361, 573),
        "error": 1.0,
    },
    ("lenet5-caffe", "bc-ghs"): {
        "architecture": "5-10-76-16",
        "bits": "10-10-14-13",
        "nonzero_percent": 0.6,
        "rates": (156, 419, 771),
        "error": 1.0,
    },
}
#: The issue's targets on LeNet5-Caffe, within 1 point of the unpruned network's test error.
TARGETS = {
    "sparse-vd": {"ratio_min": 60.0, "error_increase_max": 1.0},
    "bc-gnj": {"fast_prediction_min": 100.0, "flops_reduction_min": 5.0, "error_increase_max": 1.0},
    "bc-ghs": {"fast_prediction_min": 100.0, "flops_reduction_min": 5.0, "error_increase_max": 1.0},
}


def _epochs(network: str, key: str, quick: bool) -> int:
    return EPOCHS[network][key][1 if quick else 0]


def _base_config(network: str, seed: int, data_dir, quick: bool, **kwargs) -> TrainConfig:
    return TrainConfig(
        model=network,
        dataset="fashion-mnist",
        data_dir=data_dir,
        seed=seed,
        lr=LR,
        checkpoint_every=0,
        **kwargs,
    )


def paper_architecture(module: torch.nn.Module) -> list[int]:
    """The widths in the papers' notation (BC Table 1): the output channels of every
    convolution, then the input features of every dense layer (after any feature selection)."""
    convs = [m.out_channels for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    dense = [m.in_features for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return convs + dense


def _weights(module: torch.nn.Module) -> tuple[int, int]:
    """``(|W|, |W != 0|)`` of the Linear and Conv2d weights of a plain module."""
    layers = [m for m in module.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    return (
        sum(m.weight.numel() for m in layers),
        sum(int((m.weight != 0).sum()) for m in layers),
    )


def reference(network: str, seed: int, splits, work: Path, data_dir, quick: bool) -> dict:
    """Pretrain the plain network (cached): its test error and its plain weights."""
    run = work / f"{network}-seed{seed}-reference"
    cache = run / "measured.json"
    if cache.exists():
        return json.loads(cache.read_text())
    config = _base_config(
        network,
        seed,
        data_dir,
        quick,
        method="sparse-vd",
        pretrain_epochs=_epochs(network, "pretrain", quick),
        epochs=0,
    )
    resume = (run / "checkpoint.pt").exists()
    trainer = Trainer(config, run, resume=resume, progress=False, splits=splits)
    trainer.fit()
    method = trainer.method
    plain = {k: v for k, v in trainer.net.state_dict().items() if not method.is_variational(k)}
    torch.save(plain, run / "plain.pt")
    full, _ = method.export(trainer.net, tuple(trainer.input_shape))
    error = 100 * (1 - evaluate(full, trainer.loaders["test"], torch.device("cpu")))
    weights, _ = _weights(full)
    out = {
        "plain": str(run / "plain.pt"),
        "error": error,
        "weights": weights,
        "architecture": paper_architecture(full),
    }
    write_text_atomic(json.dumps(out, indent=1) + "\n", cache)
    return out


def recipe_of(method_name: str, args) -> dict:
    """The method's recipe, with the KL weight of ``--kl-weight`` if given."""
    recipe = dict(RECIPES[method_name])
    if getattr(args, "kl_weight", None) is not None:
        recipe["kl_weight"] = args.kl_weight
    return recipe


def _compression(method_name: str, net, shape) -> dict | None:
    """Bit precision and the three compression rates, from the exported network."""
    try:
        if method_name == "sparse-vd":
            from pyro_sbp.export.sparse import compression_report_sparse_vd

            return compression_report_sparse_vd(net, shape)
        from pyro_sbp.export.bit_precision import compression_report

        return compression_report(net, shape)
    except ImportError as e:  # the module that computes them is not installed
        return {"note": f"not computed: {e}"}


def fit(network: str, method_name: str, seed: int, ref: dict, splits, work: Path, args) -> dict:
    """One method on one network and seed, fitted from the reference's weights and measured
    (both cached in the run directory)."""
    recipe = recipe_of(method_name, args)
    tag = "" if recipe == RECIPES[method_name] else f"-kl{recipe['kl_weight']:g}"
    run = work / f"{network}-seed{seed}-{method_name}{tag}"
    cache = run / "measured.json"
    if cache.exists():
        cached = json.loads(cache.read_text())
        if {k: cached["recipe"].get(k) for k in recipe} != recipe:
            raise ValueError(f"{run} holds a fit of another recipe: {cached['recipe']}")
        return cached
    quick = args.quick
    config = _base_config(
        network,
        seed,
        args.data_dir,
        quick,
        method=method_name,
        pretrained=ref["plain"],
        pretrain_epochs=0,
        epochs=_epochs(network, "svi", quick),
        kl_warmup_epochs=_epochs(network, "warmup", quick),
        **recipe,
    )
    resume = (run / "checkpoint.pt").exists()
    start = time.perf_counter()
    trainer = Trainer(config, run, resume=resume, progress=False, splits=splits)
    trainer.fit()
    seconds = time.perf_counter() - start
    method = trainer.method
    method.update(trainer.net, trainer.guide)
    criterion = method.criterion_for_run(None, None)
    method.apply_masks(trainer.net, trainer.compute_masks(criterion))
    shape = tuple(trainer.input_shape)
    device = torch.device("cpu")
    trainer.net.cpu()
    error = 100 * (1 - evaluate(trainer.net, trainer.loaders["test"], device))
    full, pruned = method.export(trainer.net, shape)
    error_exported = 100 * (1 - evaluate(pruned, trainer.loaders["test"], device))
    weights, nonzero = _weights(pruned)
    measured = compare(full, pruned, shape, (256,), ("cpu",), args.min_run_time)
    report = _compression(method_name, trainer.net, shape) or {}
    history = trainer.history
    out = {
        "network": network,
        "method": method_name,
        "seed": seed,
        "criterion": criterion,
        "recipe": recipe | {"lr": LR, "epochs": config.epochs},
        "error": error,
        "error_exported": error_exported,
        "error_reference": ref["error"],
        "architecture": paper_architecture(pruned),
        "architecture_reference": ref["architecture"],
        "weights": ref["weights"],
        "weights_nonzero": nonzero,
        "ratio": ref["weights"] / max(nonzero, 1),
        "bits": {n: r.get("code_bits") for n, r in report.get("layers", {}).items()},
        "significand_bits": {
            n: r.get("significand_bits") for n, r in report.get("layers", {}).items()
        },
        "compression_pruning": report.get("compression_pruning"),
        "compression_fast_prediction": report.get("compression_fast_prediction"),
        "compression_maximum": report.get("compression_maximum"),
        "compression_note": report.get("note"),
        "flops_full": measured["flops_full"],
        "flops_pruned": measured["flops_pruned"],
        "flops_reduction": measured["flops_reduction"],
        "cpu_speedup": measured["latency"][0]["speedup"],
        "val_accuracy_by_epoch": [r["val_accuracy"] for r in history],
        "fit_seconds_this_invocation": seconds,
    }
    if "compression" in history[-1]:
        out["ratio_by_epoch"] = [r.get("compression") for r in history]
    write_text_atomic(json.dumps(out, indent=1) + "\n", cache)
    del weights
    return out


def _mean_sd(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


KEYS = (
    "error",
    "error_reference",
    "ratio",
    "compression_pruning",
    "compression_fast_prediction",
    "compression_maximum",
    "flops_reduction",
    "cpu_speedup",
)


def aggregate(results: list[dict]) -> list[dict]:
    """One row per (network, method): means and standard deviations over the seeds."""
    rows = []
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["network"], r["method"]), []).append(r)
    for (network, method), runs in sorted(groups.items()):
        runs = sorted(runs, key=lambda r: r["seed"])
        row = {"network": network, "method": method, "seeds": [r["seed"] for r in runs]}
        for key in KEYS:
            row[f"{key}_mean"], row[f"{key}_std"] = _mean_sd(r.get(key) for r in runs)
        row["error_increase_mean"] = row["error_mean"] - row["error_reference_mean"]
        row["architectures"] = ["-".join(map(str, r["architecture"])) for r in runs]
        row["bits"] = ["-".join(str(b) for b in r["bits"].values()) for r in runs]
        rows.append(row)
    return rows


def targets(rows: list[dict]) -> dict:
    out = {}
    for row in rows:
        target = TARGETS.get(row["method"])
        if row["network"] != "lenet5-caffe" or target is None:
            continue
        entry = dict(target, error_increase=row["error_increase_mean"])
        met = row["error_increase_mean"] <= target["error_increase_max"]
        if "ratio_min" in target:
            entry["ratio"] = row["ratio_mean"]
            met = met and row["ratio_mean"] >= target["ratio_min"]
        if "fast_prediction_min" in target:
            entry["fast_prediction"] = row["compression_fast_prediction_mean"]
            entry["flops_reduction"] = row["flops_reduction_mean"]
            met = met and row["compression_fast_prediction_mean"] >= target["fast_prediction_min"]
            met = met and row["flops_reduction_mean"] >= target["flops_reduction_min"]
        entry["met"] = bool(met)
        out[row["method"]] = entry
    return out


def _num(value, digits=1) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pm(row, key, digits=1) -> str:
    mean, sd = row[f"{key}_mean"], row[f"{key}_std"]
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if len(row["seeds"]) > 1 else "")


def render(data: dict) -> str:
    """The docs page (Markdown) for the benchmark's JSON."""
    quick = data.get("quick", False)
    name = data.get("results_file", QUICK_RESULTS.name if quick else RESULTS.name)
    command = data.get("command", "--quick" if quick else "")
    lines = [
        "# Sparse VD and Bayesian Compression on Fashion-MNIST",
        "",
        "Generated by `python benchmarks/bayesian_compression.py"
        + (f" {command}" if command else "")
        + f"` from `benchmarks/results/{name}`; do not edit by hand.",
        "",
        f"Seeds {data['seeds']}; the last invocation took {data['wall_seconds'] / 60:.1f} min "
        f"wall on one thread ({data['machine']}, torch {data['torch']}). Each network is "
        "pretrained once per seed (the reference: its test error is the unpruned one), then "
        "each method is fitted from those weights by the library's trainer "
        f"(`TrainConfig.method`) and reduced with its default criterion. Epochs: "
        + "; ".join(
            f"{n} {_epochs(n, 'pretrain', quick)} pretraining + {_epochs(n, 'svi', quick)} SVI "
            f"(KL warm-up over {_epochs(n, 'warmup', quick)})"
            for n in data["networks"]
        )
        + f". Weights Adam {LR}, beta1 0.95, batch 128; recipes "
        + "; ".join(
            f"{m}: variational lr {r['gate_lr']:g}, KL weight {r['kl_weight']:g}"
            for m, r in data.get("recipes", RECIPES).items()
            if m in data["methods"]
        )
        + ". 80/20 train/validation split; test on the official 10,000.",
        "",
        "Error is the test error in %; |W|/|W!=0| counts the Linear/Conv2d weights of the "
        "original network against the non-zero weights of the exported one (dead units "
        "removed); the architecture is in BC Table 1's notation (conv output channels, then "
        "dense input features); bits are the code bits per weight of each layer (BC's rule: "
        "significand bits from the posterior variance, sign and integer bits from the "
        "largest magnitude); the three compression rates are BC Table 2's, from the exported "
        "network; FLOPs reduction and CPU speed-up (batch 256, one thread, on a shared "
        "machine) of the exported dense network against the full one. Mean ± standard "
        "deviation over seeds.",
        "",
        "| network | method | error % (unpruned) | architecture | \\|W\\|/\\|W≠0\\| | bits "
        "| pruning | fast prediction | maximum | FLOPs reduction | CPU speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        lines.append(
            f"| {row['network']} | {row['method']} | {_pm(row, 'error', 2)} "
            f"({_num(row['error_reference_mean'], 2)}) | {', '.join(row['architectures'])} | "
            f"{_pm(row, 'ratio')} | {', '.join(row['bits'])} | "
            f"{_pm(row, 'compression_pruning')} | {_pm(row, 'compression_fast_prediction')} | "
            f"{_pm(row, 'compression_maximum')} | {_pm(row, 'flops_reduction', 2)}x | "
            f"{_pm(row, 'cpu_speedup', 2)}x |"
        )
    notes = sorted({r["compression_note"] for r in data["runs"] if r.get("compression_note")})
    if notes:
        lines += ["", "Not computed: " + "; ".join(notes) + "."]
    skipped = data.get("skipped", {})
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{m} ({why})" for m, why in skipped.items()) + "."]
    lines += [
        "",
        "## Targets (LeNet5-Caffe, within 1 point of the unpruned test error)",
        "",
        "| method | target | reached | met |",
        "|---|---|---|---|",
    ]
    for method, t in data["targets"].items():
        if "ratio_min" in t:
            want = f"\\|W\\|/\\|W≠0\\| >= {t['ratio_min']:g}"
            got = f"{_num(t['ratio'])}, error +{_num(t['error_increase'], 2)} points"
        else:
            want = (
                f"fast prediction >= {t['fast_prediction_min']:g}, FLOPs "
                f">= {t['flops_reduction_min']:g}x"
            )
            got = (
                f"{_num(t['fast_prediction'])}, {_num(t['flops_reduction'], 2)}x, error "
                f"+{_num(t['error_increase'], 2)} points"
            )
        lines.append(f"| {method} | {want} | {got} | {'yes' if t['met'] else 'no'} |")
    lines += [
        "",
        "## Published (MNIST)",
        "",
        "BC Tables 1 and 2 (Louizos, Ullrich, Welling 2017) and, for Sparse VD, its own paper "
        "(Molchanov, Ashukha, Vetrov 2017); MNIST, not Fashion-MNIST: the published figures "
        "are side by side for scale only.",
        "",
        "| network | method | architecture | bits | \\|W≠0\\|/\\|W\\| % | pruning "
        "| fast prediction | maximum | error % | Sparse VD paper: \\|W\\|/\\|W≠0\\| (error %) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (network, method), p in PUBLISHED.items():
        if method not in data["methods"] or network not in data["networks"]:
            continue
        svd = str(p.get("svd_paper_ratio", "-"))
        if "svd_paper_error" in p:
            svd += f" ({p['svd_paper_error']})"
        lines.append(
            f"| {network} | {method} | {p['architecture']} | {p['bits']} | "
            f"{p['nonzero_percent']} | {p['rates'][0]} | {p['rates'][1]} | {p['rates'][2]} | "
            f"{p['error']} | {svd} |"
        )
    return "\n".join(lines) + "\n"


def _check_data(data_dir) -> None:
    try:
        load_dataset("fashion-mnist", data_dir)
    except (FileNotFoundError, RuntimeError) as e:
        sys.exit(
            f"Fashion-MNIST not found ({e}).\nInstall Debian's package (apt-get install "
            "dataset-fashion-mnist, files in /usr/share/datasets/fashion-mnist) or pass "
            "--data-dir with the four IDX files."
        )


def _available(methods) -> tuple[list[str], dict[str, str]]:
    ok, skipped = [], {}
    for m in methods:
        try:
            get_method(m)
            ok.append(m)
        except ValueError as e:
            skipped[m] = str(e)
    return ok, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work-dir", default=None, help="fitted runs (default runs/bench-bc)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing")
    parser.add_argument(
        "--kl-weight",
        type=float,
        default=None,
        help="the KL weight of every method run instead of its recipe's (runs in their own "
        "directories, suffixed -kl<weight>)",
    )
    parser.add_argument("--render", action="store_true", help="only re-render the docs page")
    args = parser.parse_args()
    results_path = QUICK_RESULTS if args.quick else RESULTS
    doc = QUICK_DOC if args.quick else DOC
    if args.kl_weight is not None:  # another recipe: its own files
        tag = f"_kl{args.kl_weight:g}"
        results_path = results_path.with_name(results_path.stem + tag + ".json")
        doc = doc.with_name(doc.stem + tag + ".md")
    if args.render:
        data = json.loads(results_path.read_text())
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(render(data))
        print(f"wrote {doc}")
        return
    torch.set_num_threads(1)
    _check_data(args.data_dir)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    work = Path(args.work_dir or ROOT / "runs" / ("bench-bc-quick" if args.quick else "bench-bc"))
    methods, skipped = _available(args.methods)
    start = time.perf_counter()
    runs = []
    for network in args.networks:
        for seed in seeds:
            splits = load_dataset("fashion-mnist", args.data_dir, seed=seed)
            ref = reference(network, seed, splits, work, args.data_dir, args.quick)
            for method in methods:
                r = fit(network, method, seed, ref, splits, work, args)
                runs.append(r)
                print(
                    f"{network} seed {seed} {method}: error {r['error']:.2f}% (unpruned "
                    f"{r['error_reference']:.2f}%), |W|/|W!=0| {r['ratio']:.1f}, architecture "
                    f"{'-'.join(map(str, r['architecture']))}, fast prediction "
                    f"{_num(r['compression_fast_prediction'])}, FLOPs "
                    f"{r['flops_reduction']:.2f}x, CPU {r['cpu_speedup']:.2f}x",
                    flush=True,
                )
    rows = aggregate(runs)
    data = {
        "rows": rows,
        "targets": targets(rows),
        "runs": runs,
        "published": [
            {"network": n, "method": m, **p, "rates": list(p["rates"])}
            for (n, m), p in PUBLISHED.items()
        ],
        "epochs": EPOCHS,
        "recipes": {m: recipe_of(m, args) for m in methods},
        "networks": args.networks,
        "methods": methods,
        "skipped": skipped,
        "seeds": seeds,
        "quick": args.quick,
        "command": " ".join(sys.argv[1:]),
        "results_file": results_path.name,
        "wall_seconds": time.perf_counter() - start,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(data, indent=1) + "\n")
    page = render(data)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(page)
    print(page)
    for method, t in data["targets"].items():
        print(f"lenet5-caffe {method}: target {'met' if t['met'] else 'not met'}: {json.dumps(t)}")
    print(f"{data['wall_seconds'] / 60:.1f} min; wrote {results_path} and {doc}")


if __name__ == "__main__":
    main()
