"""The run report: ``report.json``, ``posterior.nc``, the exported networks and the plots."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pyro_sbp.diagnostics.arviz_data import save_netcdf, to_arviz, var_name
from pyro_sbp.export import (
    compare,
    count_parameters,
    export_full,
    export_pruned,
    save_torchscript,
)
from pyro_sbp.infer import Trainer, evaluate
from pyro_sbp.infer.checkpoint import write_text_atomic
from pyro_sbp.models import named_gates
from pyro_sbp.reduction import (
    MASKS_NAME,
    apply_masks,
    compute_masks,
    criterion_for_run,
    save_masks,
)
from pyro_sbp.reduction.criteria import _posteriors64

#: Criteria shown as points in the accuracy-compression plot (no threshold to tune).
BMRS_POINTS = ("bmrs-n", "bmrs-u:8", "bmrs-u:4", "bmrs-u-low:4")
#: Threshold criteria swept in the accuracy-compression plot.
SWEPT = ("snr", "mean", "l2")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _accuracy_with(trainer: Trainer, masks: dict, loader) -> float:
    saved = {site: g.mask.clone() for site, g in named_gates(trainer.net)}
    apply_masks(trainer.net, masks)
    try:
        return evaluate(trainer.net, loader, trainer.device)
    finally:
        apply_masks(trainer.net, saved)


def accuracy_vs_compression(trainer: Trainer, loader, points: int = 12) -> dict:
    """Accuracy against the fraction of units removed: threshold criteria swept over the
    quantiles of their scores, BMRS criteria as single points."""
    out = {}
    for c in BMRS_POINTS:
        r = compute_masks(trainer.net, trainer.guide, c)
        out[c] = [(r.fraction_removed, _accuracy_with(trainer, r.masks(), loader))]
    for base in SWEPT:
        scores = compute_masks(trainer.net, trainer.guide, f"{base}:0")
        flat = torch.cat([lp.scores for lp in scores.layers.values()]).numpy()
        flat = flat[np.isfinite(flat)]
        curve = []
        for q in np.linspace(0.0, 0.98, points):
            t = float(np.quantile(flat, q))
            r = compute_masks(trainer.net, trainer.guide, f"{base}:{t:.17g}")
            curve.append((r.fraction_removed, _accuracy_with(trainer, r.masks(), loader)))
        out[base] = curve
    return out


def _plot_log_theta(trainer, result, path: Path):
    plt = _pyplot()
    posts = _posteriors64(trainer.guide)
    fig, axes = plt.subplots(len(posts), 1, figsize=(9, 2.4 * len(posts)), squeeze=False)
    for ax, (site, (q, _, _)) in zip(axes[:, 0], posts.items(), strict=True):
        u = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64).reshape(3, 1)
        lo, med, hi = q.icdf(u.expand(3, q.loc.shape[0])).log().numpy()
        order = np.argsort(med)
        keep = result.layers[site].keep.numpy()[order]
        x = np.arange(len(order))
        for kept, color, label in ((True, "tab:blue", "kept"), (False, "tab:red", "removed")):
            sel = keep == kept
            ax.errorbar(
                x[sel],
                med[order][sel],
                yerr=[med[order][sel] - lo[order][sel], hi[order][sel] - med[order][sel]],
                fmt="o",
                ms=2,
                lw=0.6,
                color=color,
                label=f"{label} ({int(sel.sum())})",
            )
        ax.set_title(f"{site}: posterior of log theta per unit (median, 90% interval)")
        ax.set_xlabel("unit (sorted by median)")
        ax.set_ylabel("log theta")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_delta_f_snr(trainer, result, path: Path):
    plt = _pyplot()
    # Delta F of the report's criterion when it is a BMRS one, else BMRS_N's.
    bmrs = result if result.score_name in ("delta_f", "delta_f_elbo") else None
    bmrs = bmrs or compute_masks(trainer.net, trainer.guide, "bmrs-n")
    snr = compute_masks(trainer.net, trainer.guide, "snr:1")
    sites = list(bmrs.layers)
    fig, axes = plt.subplots(1, len(sites), figsize=(4.2 * len(sites), 3.6), squeeze=False)
    for ax, site in zip(axes[0], sites, strict=True):
        df = bmrs.layers[site].scores.numpy()
        s = snr.layers[site].scores.numpy()
        keep = result.layers[site].keep.numpy()
        ax.scatter(s[keep], df[keep], s=8, color="tab:blue", label="kept")
        ax.scatter(s[~keep], df[~keep], s=8, color="tab:red", label="removed")
        ax.axhline(0.0, color="k", lw=0.6)
        ax.axvline(1.0, color="gray", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("symlog")
        ax.set_title(site)
        ax.set_xlabel("SNR")
        ax.set_ylabel(f"Delta F ({bmrs.criterion})")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"Delta F >= 0: the unit goes ({bmrs.criterion}); SNR = 1 dashed; "
        f"colours: kept/removed by {result.criterion}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_training(history, path_elbo: Path, path_units: Path):
    plt = _pyplot()
    svi = [r for r in history if r["phase"] in ("svi", "finetune")]
    pre = [r for r in history if r["phase"] == "pretrain"]
    fig, ax1 = plt.subplots(figsize=(7, 3.8))
    if svi:
        x = [len(pre) + i + 1 for i in range(len(svi))]
        ax1.plot(x, [r["loss"] for r in svi], color="tab:purple", label="-ELBO (SVI)")
        ax1.set_yscale("log")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("negative ELBO")
    ax2 = ax1.twinx()
    ax2.plot(
        range(1, len(history) + 1),
        [r["val_accuracy"] for r in history],
        color="tab:green",
        label="validation accuracy",
    )
    ax2.set_ylabel("accuracy")
    if pre:
        ax1.axvspan(0.5, len(pre) + 0.5, color="0.9", label="pretraining")
    lines = ax1.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax1.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax1.set_title("training: ELBO and validation accuracy")
    fig.tight_layout()
    fig.savefig(path_elbo, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.8))
    if svi and "units_kept" in svi[0]:
        x = [len(pre) + i + 1 for i in range(len(svi))]
        for site in svi[0]["units_kept"]:
            ax.plot(x, [r["units_kept"][site] for r in svi], label=site)
    ax.set_xlabel("epoch")
    ax.set_ylabel("units kept")
    ax.set_title("units kept over training (masks, or SNR > 1 without pruning)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_units, dpi=110)
    plt.close(fig)


def _plot_tradeoff(curves: dict, path: Path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for base in SWEPT:
        pts = sorted(curves[base])
        ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], "-o", ms=3, label=base)
    markers = dict(zip(BMRS_POINTS, ("*", "D", "s", "^"), strict=True))
    for c in BMRS_POINTS:
        (f, a) = curves[c][0]
        ax.plot(100 * f, 100 * a, markers[c], ms=11, label=c.upper().replace("BMRS-", "BMRS_"))
    ax.set_xlabel("units removed (%)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("accuracy against compression (thresholds swept; BMRS as points)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class PrunedRun:
    """What :func:`prune_and_export` leaves for a method's report to add to."""

    run: Path
    trainer: Trainer
    criterion: str
    result: object
    accuracy_full: float
    accuracy_pruned: float
    input_shape: tuple[int, ...]
    full: torch.nn.Module
    pruned: torch.nn.Module
    measured: dict


def prune_and_export(
    run_dir, criterion, *, bench, batch_sizes, min_run_time, num_draws
) -> PrunedRun:
    """The part of ``pyro-sbp report`` that every method with per-layer masks shares
    (:class:`~pyro_sbp.methods.LayerMasksMethod`): the run restored on the CPU, the test
    accuracy with every unit and with the masks of ``criterion`` (written to ``masks.pt``), the
    exports (``full.pt``, ``pruned.pt`` and the method's own files), their FLOPs and CPU latency,
    and posterior draws (``posterior.nc``)."""
    from pyro_sbp.reduction import MASKS_NAME

    run = Path(run_dir)
    trainer = Trainer.from_run(run)
    method = trainer.method
    criterion = method.criterion_for_run(criterion, trainer.config.prune_criterion)
    trainer.net.cpu()
    trainer.device = torch.device("cpu")
    test_loader = trainer.loaders["test"]
    trained = method.current_masks(trainer.net)
    method.apply_masks(trainer.net, method.full_masks(trainer.net))
    full_acc = evaluate(trainer.net, test_loader, trainer.device)
    method.apply_masks(trainer.net, trained)
    result = trainer.compute_masks(criterion)
    method.apply_masks(trainer.net, result)
    pruned_acc = evaluate(trainer.net, test_loader, trainer.device)
    method.save_masks(result, run / MASKS_NAME)

    shape = tuple(trainer.input_shape)
    full, pruned = method.export(trainer.net, shape)
    save_torchscript(full, run / "full.pt")
    save_torchscript(pruned, run / "pruned.pt")
    method.write_exports(trainer.net, shape, run)
    measured = compare(full, pruned, shape, batch_sizes if bench else (), ("cpu",), min_run_time)
    save_netcdf(
        method.to_arviz(trainer.net, trainer.guide, num_draws=num_draws), run / "posterior.nc"
    )
    return PrunedRun(
        run, trainer, criterion, result, full_acc, pruned_acc, shape, full, pruned, measured
    )


def make_report(
    run_dir: str | Path,
    criterion: str | None = None,
    *,
    bench: bool = True,
    batch_sizes=(1, 256),
    min_run_time: float = 0.5,
    num_draws: int = 500,
) -> dict:
    """Write the report of a fitted run into ``run_dir``.

    ``report.json`` (data set, network, criterion, accuracy of the full and the pruned network
    on the test split, units per layer before and after, parameters, FLOPs, CPU latency and
    speed-up, ``input_shape``), ``posterior.nc`` (ArviZ), ``full.pt`` and ``pruned.pt``
    (TorchScript), ``masks.pt``, and PNG plots in ``plots/``.

    The masks are ``criterion``'s (by default the run's own, see
    :func:`~pyro_sbp.reduction.criterion_for_run`), on top
    of those the run pruned during training, if it did: ``report.json`` names both
    (``criterion``, ``training_criterion``).
    """
    run = Path(run_dir)
    trainer = Trainer.from_run(run)
    criterion = criterion_for_run(criterion, trainer.config.prune_criterion)
    trainer.net.cpu()
    trainer.device = torch.device("cpu")
    trainer.guide.update_gates()
    val_loader = trainer._eval_loader()
    test_loader = trainer.loaders["test"]
    # The masks a run pruned during training are the starting point of the criterion (masks are
    # cumulative); the full network (as full.pt) has every unit.
    trained_masks = {site: g.mask.clone() for site, g in named_gates(trainer.net)}
    apply_masks(trainer.net, {s: torch.ones_like(m) for s, m in trained_masks.items()})
    full_acc = evaluate(trainer.net, test_loader, trainer.device)
    apply_masks(trainer.net, trained_masks)
    result = trainer.compute_masks(criterion)
    apply_masks(trainer.net, result)
    pruned_acc = evaluate(trainer.net, test_loader, trainer.device)
    save_masks(result, run / MASKS_NAME)

    shape = tuple(trainer.input_shape)
    full = export_full(trainer.net, shape)
    pruned = export_pruned(trainer.net, shape)
    save_torchscript(full, run / "full.pt")
    save_torchscript(pruned, run / "pruned.pt")
    measured = compare(full, pruned, shape, batch_sizes if bench else (), ("cpu",), min_run_time)
    save_netcdf(to_arviz(trainer.net, trainer.guide, num_draws=num_draws), run / "posterior.nc")

    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    _plot_log_theta(trainer, result, plots / "log_theta.png")
    _plot_delta_f_snr(trainer, result, plots / "delta_f_vs_snr.png")
    _plot_training(trainer.history, plots / "training.png", plots / "units_kept.png")
    saved = {site: g.mask.clone() for site, g in named_gates(trainer.net)}
    apply_masks(trainer.net, {s: torch.ones_like(m) for s, m in saved.items()})
    curves = accuracy_vs_compression(trainer, val_loader)
    apply_masks(trainer.net, saved)
    _plot_tradeoff(curves, plots / "accuracy_vs_compression.png")

    c = trainer.config
    report = {
        "dataset": c.dataset,
        "network": c.model,
        "criterion": criterion,
        "training_criterion": c.prune_criterion,
        "input_shape": list(shape),
        "accuracy_full": full_acc,
        "accuracy_pruned": pruned_acc,
        "accuracy_split": "test",
        "units": {
            site: {"before": lp.units_before, "after": lp.units_after}
            for site, lp in result.layers.items()
        },
        "units_removed_fraction": result.fraction_removed,
        "params_full": count_parameters(full),
        "params_pruned": count_parameters(pruned),
        "flops_full": measured["flops_full"],
        "flops_pruned": measured["flops_pruned"],
        "flops_reduction": measured["flops_reduction"],
        "flops_note": measured["flops_note"],
        "latency_cpu": measured["latency"],
        "speedup_cpu": {str(r["batch_size"]): r["speedup"] for r in measured["latency"]},
        "accuracy_vs_compression_val": {k: [list(p) for p in v] for k, v in curves.items()},
        "epochs": {"pretrain": trainer.pretrain_done, "svi": trainer.svi_done},
        "files": ["report.json", "posterior.nc", "full.pt", "pruned.pt", "masks.pt", "plots/"],
        "variables": {site: var_name(site) for site in result.layers},
    }
    write_text_atomic(json.dumps(report, indent=1) + "\n", run / "report.json")
    return report


def _training_note(training: str | None, criterion: str) -> str:
    if criterion == "trained":
        return f" (the masks of pruning during training with {training})" if training else ""
    if not training:
        return ""
    return f" (on the masks of pruning during training with {training})"


def format_summary(report: dict) -> str:
    lines = [
        f"{report['network']} on {report['dataset']}, pruned with {report['criterion']}"
        + _training_note(report.get("training_criterion"), report["criterion"]),
        f"{'layer':<22} {'before':>7} {'after':>7}",
    ]
    for site, u in report["units"].items():
        lines.append(f"{site:<22} {u['before']:>7} {u['after']:>7}")
    lines += [
        f"test accuracy: full {100 * report['accuracy_full']:.2f}%, "
        f"pruned {100 * report['accuracy_pruned']:.2f}%",
        f"parameters: {report['params_full']:,} -> {report['params_pruned']:,}; "
        f"FLOPs/example: {report['flops_full']:,} -> {report['flops_pruned']:,} "
        f"({report['flops_reduction']:.2f}x fewer)",
    ]
    for r in report["latency_cpu"]:
        lines.append(
            f"CPU batch {r['batch_size']}: {1e3 * r['full_median_s']:.3f} ms -> "
            f"{1e3 * r['pruned_median_s']:.3f} ms ({r['speedup']:.2f}x)"
        )
    # The threshold-free criteria on the same posterior (one point each), for comparison.
    points = {
        name: curve[0]
        for name, curve in report.get("accuracy_vs_compression_val", {}).items()
        if name.startswith("bmrs") and len(curve) == 1
    }
    if points:
        lines.append(
            "BMRS criteria on this posterior (units removed, validation accuracy): "
            + "; ".join(f"{n} {100 * f:.0f}%, {100 * a:.2f}%" for n, (f, a) in points.items())
        )
    return "\n".join(lines)
