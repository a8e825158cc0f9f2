"""A compression-accuracy sweep: one network fitted at several KL weights, and the smallest
network within a given accuracy of the one the user brought."""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pyro_sbp.infer.checkpoint import CHECKPOINT_NAME, load_checkpoint, write_text_atomic
from pyro_sbp.infer.trainer import TrainConfig, Trainer, evaluate

__all__ = ["PUBLISHED_FRONTIER", "SWEEP_NAME", "SweepPoint", "run_sweep"]

SWEEP_NAME = "sweep.json"

#: Published points (units removed %, test accuracy %, label) where known, by (network, data
#: set): the BMRS paper's Fashion-MNIST table (10 seeds, 32x32 inputs).
PUBLISHED_FRONTIER: dict[tuple[str, str], list[tuple[float, float, str]]] = {
    ("bmrs-mlp", "fashion-mnist"): [
        (93.20, 84.99, "BMRS_N (published)"),
        (91.57, 85.79, "BMRS_U-4 (published)"),
        (0.0, 88.17, "none (published)"),
    ],
    ("bmrs-lenet5", "fashion-mnist"): [
        (88.02, 77.90, "BMRS_N (published)"),
        (88.72, 81.10, "BMRS_U-4 (published)"),
        (0.0, 89.16, "none (published)"),
    ],
}


@dataclass
class SweepPoint:
    """One KL weight's fit, pruned during training and fine-tuned."""

    kl_weight: float
    run_dir: str
    val_accuracy: float
    test_accuracy: float
    units_kept: dict[str, int]
    units_total: dict[str, int]
    params: int
    flops: int

    @property
    def fraction_removed(self) -> float:
        return 1.0 - sum(self.units_kept.values()) / max(sum(self.units_total.values()), 1)


def _run_name(weight: float) -> str:
    return f"kl-{weight:g}"


#: Settings that a fit in a sweep's directory may change when the sweep is run again.
_MAY_CHANGE = {"epochs", "finetune_epochs", "checkpoint_every"}


def _fit(config: TrainConfig, out: Path, progress: bool, splits=None) -> Trainer:
    if (out / CHECKPOINT_NAME).exists():
        # A fit of an earlier (or interrupted) sweep: continued, if it is of the same recipe.
        stored = TrainConfig.from_dict(load_checkpoint(out)["config"])
        differ = [
            f"{f.name}: {getattr(stored, f.name)!r} there, {getattr(config, f.name)!r} asked"
            for f in dataclasses.fields(TrainConfig)
            if f.name not in _MAY_CHANGE and getattr(stored, f.name) != getattr(config, f.name)
        ]
        if differ:
            raise ValueError(
                f"{out} holds a fit of other settings ({'; '.join(differ)}): use another "
                "sweep directory, or the same settings"
            )
        trainer = Trainer.from_run(out, progress=progress, epochs=config.epochs, splits=splits)
        trainer.config.finetune_epochs = config.finetune_epochs
        trainer.config.checkpoint_every = config.checkpoint_every
    else:
        trainer = Trainer(config, out, progress=progress, splits=splits)
    trainer.fit()
    trainer.guide.update_gates()
    return trainer


def _measure(trainer: Trainer, weight: float, out: Path) -> SweepPoint:
    from pyro_sbp.export import count_flops, count_parameters, export_pruned
    from pyro_sbp.models import named_gates

    val = evaluate(trainer.net, trainer._eval_loader(), trainer.device)
    test = evaluate(trainer.net, trainer.loaders["test"], trainer.device)
    pruned = export_pruned(trainer.net.cpu(), tuple(trainer.input_shape))
    trainer.net.to(trainer.device)
    gates = dict(named_gates(trainer.net))
    return SweepPoint(
        kl_weight=weight,
        run_dir=str(out),
        val_accuracy=val,
        test_accuracy=test,
        units_kept={s: int(g.mask.sum()) for s, g in gates.items()},
        units_total={s: g.num_units for s, g in gates.items()},
        params=count_parameters(pruned),
        flops=count_flops(pruned, tuple(trainer.input_shape)),
    )


def run_sweep(
    config: TrainConfig,
    kl_weights: list[float],
    out_dir: str | Path,
    *,
    criterion: str | None = None,
    max_accuracy_drop: float | None = None,
    progress: bool = True,
    splits=None,
) -> dict[str, Any]:
    r"""Fit ``config``'s network at every KL weight, pruning during training with
    ``criterion``, and pick the smallest network within ``max_accuracy_drop`` points.

    The network is pretrained once (``out_dir/pretrained``: ``config.pretrain_epochs`` epochs
    with the gates off), and that network, the one the user brings, is the reference: its
    validation and test accuracy are the sweep's "unpruned" figures. Every weight then starts
    from it (``out_dir/kl-<weight>``, an ordinary run directory): ``config.epochs`` SVI
    epochs with ``kl_weight`` = the weight and the masks recomputed after each, then
    ``config.finetune_epochs`` with them frozen. Each run is resumable and a finished one is
    only read back, so an interrupted sweep continues where it stopped.

    With ``max_accuracy_drop`` (percentage points), the chosen point is, among those whose
    *validation* accuracy is at most that far below the reference's, the one whose exported
    network has the fewest parameters (then the fewest FLOPs). Writes ``out_dir/sweep.json``.

    ``criterion`` defaults to :data:`~pyro_sbp.reduction.DEFAULT_CRITERION`; ``splits``
    (:class:`~pyro_sbp.data.DataSplits`) replaces the data set that ``config`` names.

    :returns: the sweep's record: ``reference``, ``points`` (per weight: accuracies, units,
        parameters, FLOPs, fraction removed), ``frontier`` (the weights on the Pareto front of
        validation accuracy against units removed) and ``chosen`` (a weight, or ``None``).
    :raises ValueError: for no weights, a non-positive weight or a negative drop.
    """
    if not kl_weights:
        raise ValueError("a sweep needs at least one KL weight")
    for w in kl_weights:
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"KL weights must be positive numbers, got {w!r}")
    if max_accuracy_drop is not None and not max_accuracy_drop >= 0:
        raise ValueError(f"max_accuracy_drop must be >= 0 points, got {max_accuracy_drop!r}")
    from pyro_sbp.reduction import DEFAULT_CRITERION, parse_criterion

    criterion = DEFAULT_CRITERION if criterion is None else criterion
    parse_criterion(criterion)
    out = Path(out_dir)
    pretrain_dir = out / "pretrained"
    reference_config = dataclasses.replace(
        config, epochs=0, finetune_epochs=0, prune_criterion=None, pretrained=None
    )
    reference = _fit(reference_config, pretrain_dir, progress=False, splits=splits)
    from pyro_sbp.models import set_gates_enabled

    set_gates_enabled(reference.net, False)  # the plain network: gates off
    ref = {
        "val_accuracy": evaluate(reference.net, reference._eval_loader(), reference.device),
        "test_accuracy": evaluate(reference.net, reference.loaders["test"], reference.device),
        "run_dir": str(pretrain_dir),
    } | _reference_size(reference)
    weights = sorted(set(float(w) for w in kl_weights))
    points = []
    bar = tqdm(weights, desc="KL weights", unit="fit", disable=not progress or None)
    for w in bar:
        bar.set_postfix({"kl_weight": f"{w:g}"})
        run_config = dataclasses.replace(
            config,
            kl_weight=w,
            prune_criterion=criterion,
            pretrained=str(pretrain_dir / CHECKPOINT_NAME),
            pretrain_epochs=0,  # what the trainer records for a run from pretrained weights
        )
        run_dir = out / _run_name(w)
        trainer = _fit(run_config, run_dir, progress, splits)
        points.append(_measure(trainer, w, run_dir))
    bar.close()
    record = {
        "network": config.model,
        "dataset": config.dataset,
        "criterion": criterion,
        "reference": ref,
        "max_accuracy_drop": max_accuracy_drop,
        "points": [
            dataclasses.asdict(p) | {"fraction_removed": p.fraction_removed} for p in points
        ],
        "frontier": _frontier(points),
        "chosen": _choose(points, ref["val_accuracy"], max_accuracy_drop),
    }
    write_text_atomic(json.dumps(record, indent=1) + "\n", out / SWEEP_NAME)
    return record


def _frontier(points: list[SweepPoint]) -> list[float]:
    """The weights of the points that no other point beats on both axes (more units removed
    and a higher validation accuracy)."""
    front = []
    for p in points:
        dominated = any(
            q.fraction_removed >= p.fraction_removed
            and q.val_accuracy >= p.val_accuracy
            and (q.fraction_removed > p.fraction_removed or q.val_accuracy > p.val_accuracy)
            for q in points
        )
        if not dominated:
            front.append(p.kl_weight)
    return front


def _choose(points: list[SweepPoint], reference: float, drop: float | None) -> float | None:
    if drop is None:
        return None
    ok = [p for p in points if 100.0 * (reference - p.val_accuracy) <= drop + 1e-9]
    if not ok:
        return None
    return min(ok, key=lambda p: (p.params, p.flops, -p.val_accuracy)).kl_weight


def points_phrase(drop: float) -> str:
    """``"1 point"``, ``"0.5 points"``: an accuracy drop in words."""
    return f"{drop:g} point" + ("" if drop == 1 else "s")


def plot_frontier(record: dict, path: str | Path) -> None:
    """Units removed and FLOPs reduction against validation accuracy, one point per weight,
    with the reference and the published points (where known) overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = record["points"]
    ref = record["reference"]
    flops_full = ref.get("flops")
    fig, axes = plt.subplots(1, 2 if flops_full else 1, figsize=(11, 4), squeeze=False)
    ax = axes[0, 0]
    xs = [100 * p["fraction_removed"] for p in points]
    ys = [100 * p["val_accuracy"] for p in points]
    ax.plot(xs, ys, "o-", color="tab:blue", label=f"this sweep ({record['criterion']})")
    for p, x, y in zip(points, xs, ys, strict=True):
        ax.annotate(f"{p['kl_weight']:g}", (x, y), textcoords="offset points", xytext=(3, 3))
    ax.axhline(100 * ref["val_accuracy"], color="k", lw=0.7, label="unpruned (validation)")
    for x, y, label in PUBLISHED_FRONTIER.get((record["network"], record["dataset"]), []):
        ax.plot([x], [y], "x", ms=8, label=f"{label}, test")
    if record.get("chosen") is not None:
        chosen = next(p for p in points if p["kl_weight"] == record["chosen"])
        ax.plot(
            [100 * chosen["fraction_removed"]],
            [100 * chosen["val_accuracy"]],
            "*",
            ms=14,
            color="tab:red",
            label=f"chosen (within {points_phrase(record['max_accuracy_drop'])})",
        )
    ax.set_xlabel("units removed (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{record['network']} on {record['dataset']}: labels are KL weights")
    ax.legend(fontsize=7)
    if flops_full:
        ax2 = axes[0, 1]
        ax2.plot([flops_full / p["flops"] for p in points], ys, "o-", color="tab:green")
        ax2.set_xscale("log")
        ax2.set_xlabel("FLOPs reduction (x)")
        ax2.set_ylabel("validation accuracy (%)")
        ax2.axhline(100 * ref["val_accuracy"], color="k", lw=0.7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reference_size(trainer: Trainer) -> dict[str, int]:
    from pyro_sbp.export import count_flops, count_parameters, export_full

    full = export_full(trainer.net.cpu(), tuple(trainer.input_shape))
    trainer.net.to(trainer.device)
    return {
        "params": count_parameters(full),
        "flops": count_flops(full, tuple(trainer.input_shape)),
    }
