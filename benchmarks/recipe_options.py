"""The training recipe's options, one at a time, on one network: what each changes.

From a baseline recipe (the library's defaults: noise per example, constant learning rates,
cumulative masks) with a KL weight and pruning during training, each run changes one option:

* ``noise="batch"`` (one draw of the gates per minibatch, BMRS's code);
* ``lr_schedule="linear"`` (SBP's decay) and ``"cosine"``;
* ``prune_masks="fresh"`` (masks recomputed from scratch every epoch, BMRS's code).

and records the validation and test accuracy of the pruned network, the units kept and the
fraction removed, and the time. Each run lives in ``--work-dir/<name>`` (a pyro-sbp run
directory), so an interrupted benchmark resumes; ``--jobs`` runs go side by side, one torch
thread each. Writes ``benchmarks/results/recipe_options.json``.

    python benchmarks/recipe_options.py [--network bmrs-mlp] [--kl-weight 100] [--seeds 0]
        [--pretrain-epochs 2] [--epochs 6] [--finetune-epochs 2] [--jobs 2]

The data come from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``)
or ``--data-dir``.
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

from pyro_sbp.infer import TrainConfig, Trainer, evaluate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "recipe_options.json"

#: Run name -> the option it changes from the baseline.
VARIANTS = {
    "baseline": {},
    "noise=batch": {"noise": "batch"},
    "lr_schedule=linear": {"lr_schedule": "linear"},
    "lr_schedule=cosine": {"lr_schedule": "cosine"},
    "prune_masks=fresh": {"prune_masks": "fresh"},
}


def _run(job: tuple[str, int, dict, str]) -> dict:
    name, seed, config_dict, work_dir = job
    torch.set_num_threads(1)
    config = TrainConfig(**config_dict, seed=seed)
    out = Path(work_dir) / f"{name}-seed{seed}"
    start = time.perf_counter()
    resume = (out / "checkpoint.pt").exists()
    trainer = Trainer(config, out, resume=resume, progress=False)
    history = trainer.fit()
    trainer.guide.update_gates()
    last = history[-1]
    kept, total = last["units_kept"], last["units_total"]
    return {
        "name": name,
        "seed": seed,
        "val_accuracy": evaluate(trainer.net, trainer.loaders["val"], trainer.device),
        "test_accuracy": evaluate(trainer.net, trainer.loaders["test"], trainer.device),
        "units_kept": kept,
        "fraction_removed": 1.0 - sum(kept.values()) / sum(total.values()),
        "seconds_this_process": time.perf_counter() - start,
        "seconds_training": sum(r["seconds"] for r in history),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="bmrs-mlp")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--kl-weight", type=float, default=100.0)
    parser.add_argument("--criterion", default="bmrs-u:4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--gate-lr", type=float, default=0.05)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "recipe_options")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    base = dataclasses.asdict(
        TrainConfig(
            model=args.network,
            dataset="fashion-mnist",
            data_dir=args.data_dir,
            resize=32 if args.network.startswith("bmrs-") else None,
            pretrain_epochs=args.pretrain_epochs,
            epochs=args.epochs,
            finetune_epochs=args.finetune_epochs,
            kl_weight=args.kl_weight,
            prune_criterion=args.criterion,
            gate_lr=args.gate_lr,
        )
    )
    base.pop("seed")
    jobs = [
        (name, seed, base | change, str(args.work_dir))
        for seed in args.seeds
        for name, change in VARIANTS.items()
    ]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        runs = []
        for r in pool.imap(_run, jobs):
            runs.append(r)
            print(
                f"{r['name']} seed {r['seed']}: removed {100 * r['fraction_removed']:.1f}%, "
                f"val {100 * r['val_accuracy']:.2f}%, test {100 * r['test_accuracy']:.2f}%",
                file=sys.stderr,
            )
    summary = {}
    for name in VARIANTS:
        rs = [r for r in runs if r["name"] == name]
        summary[name] = {
            key: statistics.mean(r[key] for r in rs)
            for key in ("val_accuracy", "test_accuracy", "fraction_removed")
        }
    result = {
        "network": args.network,
        "dataset": "fashion-mnist",
        "kl_weight": args.kl_weight,
        "criterion": args.criterion,
        "epochs": {
            "pretrain": args.pretrain_epochs,
            "svi": args.epochs,
            "finetune": args.finetune_epochs,
        },
        "gate_lr": args.gate_lr,
        "seeds": args.seeds,
        "machine": platform.machine(),
        "wall_seconds": time.perf_counter() - start,
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
