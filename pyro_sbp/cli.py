"""The command line: ``pyro-sbp train ...`` (also ``python -m pyro_sbp``)."""

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pyro_sbp.data import DATASETS
from pyro_sbp.methods import METHOD_NAMES
from pyro_sbp.models import NETWORKS

#: The runtimes of ``pyro-sbp bench --runtime``.
RUNTIMES = ("eager", "torchscript", "onnxruntime")


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            "expected a JSON object, e.g. '{\"width_multiplier\": 0.5}'"
        )
    return value


def _kl_weight(text: str) -> float | dict:
    """A number, or a JSON object of numbers by gate site."""
    try:
        return float(text)
    except ValueError:
        pass
    value = _json_dict(text)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected numbers by gate site, got {text!r}")
    return value


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            wanted = "a positive integer" if low == 1 else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    return parse


def _add_train(sub) -> None:
    from pyro_sbp.infer import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="fit a gated network with SVI",
        description=(
            "Pretrain a network (gates off), then fit weights and gate posteriors by SVI with "
            "CompactMeanField_ELBO (TraceMeanField_ELBO's loss, each KL once per unit). Writes "
            "checkpoint.pt (resumable) and history.json to --out, "
            "after every epoch and every --checkpoint-every steps. Ctrl-C (SIGINT) or SIGTERM "
            "stops after the current step with a checkpoint; --resume continues from it, with "
            "the run's own settings (--model and --network-kwargs may be left out).\n\n"
            f"models: {', '.join(NETWORKS)}\ndata sets: {', '.join(DATASETS)}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--kl-weight",
        type=_kl_weight,
        default=d.kl_weight,
        metavar="BETA",
        help=(
            "weight of the gates' KL (1: the exact ELBO; larger removes more units), or a JSON "
            "object by gate site, e.g. '{\"classifier.1.gate\": 10}'"
        ),
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in --out even if it holds one (which is then lost)",
    )
    p.add_argument(
        "--prune-criterion",
        default=None,
        help="prune during training: recompute masks after every SVI epoch (e.g. bmrs-n)",
    )
    p.add_argument(
        "--method",
        choices=list(METHOD_NAMES),
        default=d.method,
        help=(
            "pruning method: sbp (Structured Bayesian Pruning, the default), sparse-vd (Sparse "
            "Variational Dropout), bc-gnj / bc-ghs (Bayesian Compression)"
        ),
    )
    _add_training_options(p, d)


def _add_training_options(p, d) -> None:
    """The options that define a training run, shared by ``train`` and ``sweep``."""
    p.add_argument(
        "--model", choices=list(NETWORKS), default=None, help=f"network (default {d.model})"
    )
    p.add_argument("--dataset", choices=list(DATASETS), default=d.dataset, help="data set")
    p.add_argument("--data-dir", default=None, help="where the data set's files are")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"SVI epochs (default {d.epochs}; with --resume, the run's own)",
    )
    p.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs)
    p.add_argument("--pretrained", default=None, help="state dict of pretrained weights")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate of the weights")
    p.add_argument("--gate-lr", type=float, default=d.gate_lr, help="learning rate of the gates")
    p.add_argument("--pretrain-lr", type=float, default=d.pretrain_lr)
    p.add_argument("--beta1", type=float, default=d.beta1, help="Adam beta1 (SBP: 0.95)")
    p.add_argument(
        "--kl-warmup-epochs",
        type=int,
        default=d.kl_warmup_epochs,
        help="epochs over which the KL weight rises linearly from 0 to --kl-weight",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--resize", type=int, default=None, help="resize images (e.g. 32)")
    p.add_argument("--init-log-scale", type=float, default=d.init_log_scale)
    p.add_argument("--network-kwargs", type=_json_dict, default=None, help="JSON object")
    p.add_argument(
        "--prune-masks",
        choices=["cumulative", "fresh"],
        default=d.prune_masks,
        help="pruning during training: a removed unit stays removed, or every epoch's masks "
        "are computed from scratch",
    )
    p.add_argument("--finetune-epochs", type=int, default=0, help="SVI epochs with frozen masks")
    p.add_argument(
        "--keep-best",
        action="store_true",
        help="end with the fine-tuning epoch of best validation accuracy (BMRS's recipe)",
    )
    p.add_argument(
        "--noise",
        choices=["example", "batch"],
        default=d.noise,
        help="one draw of the gates per example (SBP) or per minibatch (BMRS)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=["constant", "linear", "cosine"],
        default=d.lr_schedule,
        help="SVI learning rates over the SVI epochs (linear: SBP's decay to 0)",
    )
    p.add_argument(
        "--input-gates",
        nargs="+",
        default=[],
        metavar="LAYER",
        help="also gate the input features of these Linear layers (e.g. classifier.1)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_int_at_least(0),
        default=None,
        metavar="STEPS",
        help=(
            f"also checkpoint every STEPS training steps (default {d.checkpoint_every}; "
            "0: after every epoch only)"
        ),
    )
    p.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        help="torch threads (default: torch's); 1 is much faster when the machine is shared",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config_from_args(args, **fixed):
    """The TrainConfig of the training options (see :func:`_add_training_options`)."""
    from pyro_sbp.infer import TrainConfig

    d = TrainConfig()
    return TrainConfig(
        model=args.model or d.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        epochs=d.epochs if args.epochs is None else args.epochs,
        pretrain_epochs=args.pretrain_epochs,
        pretrained=args.pretrained,
        batch_size=args.batch_size,
        lr=args.lr,
        gate_lr=args.gate_lr,
        pretrain_lr=args.pretrain_lr,
        beta1=args.beta1,
        kl_warmup_epochs=args.kl_warmup_epochs,
        seed=args.seed,
        device=args.device,
        val_fraction=args.val_fraction,
        resize=args.resize,
        init_log_scale=args.init_log_scale,
        network_kwargs=args.network_kwargs or {},
        prune_masks=args.prune_masks,
        finetune_epochs=args.finetune_epochs,
        keep_best=args.keep_best,
        noise=args.noise,
        lr_schedule=args.lr_schedule,
        input_gates=list(args.input_gates),
        checkpoint_every=(
            d.checkpoint_every if args.checkpoint_every is None else args.checkpoint_every
        ),
        **fixed,
    )


#: What ``train --resume`` takes from the command line; the rest comes from the checkpoint.
_RESUME_OPTIONS = {
    "command",
    "out",
    "resume",
    "epochs",
    "checkpoint_every",
    "model",
    "network_kwargs",
    "threads",
    "no_progress",
    "overwrite",
}


def _run_train(args) -> int:
    import torch

    from pyro_sbp.infer.distributed import trainer_class

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # DistributedTrainer under torchrun (or to resume a run of several processes).
    trainer_cls = trainer_class(args.out if args.resume else None)
    if args.resume:
        # The run's own settings; only the epochs and the interval may change, and a network
        # given explicitly must be the run's. Other options given are said to be ignored.
        trainer = trainer_cls.from_run(
            args.out,
            progress=not args.no_progress,
            epochs=args.epochs,
            checkpoint_every=args.checkpoint_every,
            model=args.model,
            network_kwargs=args.network_kwargs,
        )
        defaults = vars(build_parser().parse_args(["train", "--out", args.out]))
        ignored = [
            "--" + key.replace("_", "-")
            for key, value in vars(args).items()
            if key not in _RESUME_OPTIONS and value != defaults.get(key)
        ]
        if ignored:
            print(
                f"pyro-sbp train: note: --resume continues with the run's own settings; "
                f"ignored: {', '.join(ignored)}",
                file=sys.stderr,
            )
    else:
        from pyro_sbp.infer.checkpoint import CHECKPOINT_NAME

        if (Path(args.out) / CHECKPOINT_NAME).exists() and not args.overwrite:
            raise ValueError(
                f"{args.out} already holds a run ({CHECKPOINT_NAME}): pass --resume to continue "
                "it, --overwrite to start again, or choose another --out"
            )
        config = _config_from_args(
            args, kl_weight=args.kl_weight, prune_criterion=args.prune_criterion, method=args.method
        )
        trainer = trainer_cls(config, args.out, progress=not args.no_progress)
    config = trainer.config
    history = trainer.fit()
    if getattr(trainer, "context", None) is not None and not trainer.context.is_main:
        return 0
    last = history[-1] if history else {}
    kept = last.get("units_kept")
    summary = f"done: {len(history)} epochs, validation accuracy {last.get('val_accuracy', 0):.4f}"
    if kept:
        total = last["units_total"]
        how = f"masks, {config.prune_criterion}" if config.prune_criterion else "SNR > 1"
        if config.method != "sbp":
            how = f"{config.method}, with a kept incoming weight"
        summary += f"; units kept ({how}): " + ", ".join(
            f"{site} {kept[site]}/{total[site]}" for site in kept
        )
    print(summary)
    if trainer.best is not None and trainer.best["kept"]:
        print(
            f"kept the network of SVI epoch {trainer.best['epoch']}, the best fine-tuning epoch "
            f"(validation accuracy {trainer.best['val_accuracy']:.4f})"
        )
    print(f"checkpoint and history in {args.out}")
    return 0


def _add_prune(sub) -> None:
    from pyro_sbp.reduction import CRITERIA_HELP

    p = sub.add_parser(
        "prune",
        help="decide which units go, from a fitted run",
        description=(
            "Compute keep-masks for every gate of a fitted run with a pruning criterion and write "
            "masks.pt (site -> bool tensor) and pruning.json (units before and after and each "
            f"unit's score, per layer) into the run directory.\n\ncriteria: {CRITERIA_HELP}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="a run directory written by `pyro-sbp train`")
    p.add_argument(
        "--criterion",
        default=None,
        help="pruning criterion (default: 'trained', the masks of pruning during training, for a "
        "run that did; else bmrs-n)",
    )


def _run_prune(args) -> int:
    from pyro_sbp.infer import Trainer, evaluate
    from pyro_sbp.infer.checkpoint import write_text_atomic
    from pyro_sbp.reduction import MASKS_NAME

    method = _method_of_run(args.run_dir)
    if args.criterion is not None:
        method.check_criterion(args.criterion)
    # progress: a bar for the criteria that pass over the data (elbo), on a terminal only.
    trainer = Trainer.from_run(args.run_dir, progress=True)
    criterion = method.criterion_for_run(args.criterion, trainer.config.prune_criterion)
    method.update(trainer.net, trainer.guide)
    loader = trainer._eval_loader()
    # The full network has every unit (masks from pruning during training are the criterion's
    # starting point, since masks are cumulative).
    trained = method.current_masks(trainer.net)
    method.apply_masks(trainer.net, method.full_masks(trainer.net))
    before = evaluate(trainer.net, loader, trainer.device)
    method.apply_masks(trainer.net, trained)
    result = trainer.compute_masks(criterion)
    method.apply_masks(trainer.net, result)
    after = evaluate(trainer.net, loader, trainer.device)
    summary = result.to_dict() | {
        "training_criterion": trainer.config.prune_criterion,
        "val_accuracy_full": before,
        "val_accuracy_pruned": after,
    }
    run = Path(args.run_dir)
    method.save_masks(result, run / MASKS_NAME)
    write_text_atomic(json.dumps(summary, indent=1) + "\n", run / "pruning.json")
    print(result.summary())
    print(f"validation accuracy: full {before:.4f}, pruned {after:.4f}")
    print(f"wrote {run / MASKS_NAME} and {run / 'pruning.json'}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export the full and the pruned network as TorchScript",
        description=(
            "Write full.pt (the unpruned network with E[theta] folded in) and pruned.pt (the "
            "removed units physically gone) as TorchScript into the run directory, and with "
            "--onnx full.onnx and pruned.onnx beside them. The masks come from masks.pt "
            "(written by `pyro-sbp prune`), else from --criterion."
        ),
    )
    p.add_argument("run_dir")
    p.add_argument("--criterion", default=None, help="prune with this criterion first")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write full.onnx and pruned.onnx (ONNX, dynamic batch; needs the onnx extra: "
        "pip install 'pyro-sbp[onnx]')",
    )


def _method_of_run(run_dir: str):
    """The :class:`~pyro_sbp.methods.Method` of a run (SBP for a checkpoint without one)."""
    from pyro_sbp.infer import load_checkpoint
    from pyro_sbp.infer.checkpoint import CHECKPOINT_NAME
    from pyro_sbp.methods import get_method

    config = load_checkpoint(Path(run_dir) / CHECKPOINT_NAME)["config"]
    return get_method(config.get("method", "sbp"))


def _load_for_export(run_dir: str, criterion: str | None):
    from pyro_sbp.infer import Trainer
    from pyro_sbp.reduction import MASKS_NAME

    trainer = Trainer.from_run(run_dir)
    method = trainer.method
    method.update(trainer.net, trainer.guide)
    masks_path = Path(run_dir) / MASKS_NAME
    if criterion is not None:
        method.apply_masks(trainer.net, trainer.compute_masks(criterion))
    elif masks_path.exists():
        method.apply_masks(trainer.net, method.load_masks(masks_path, trainer.net))
    else:
        raise FileNotFoundError(
            f"no masks.pt in {run_dir}: run `pyro-sbp prune {run_dir}` or pass --criterion"
        )
    return trainer


def _require_onnx() -> None:
    """Stop with one line, before any work, when the onnx extra is not installed."""
    from pyro_sbp.export.onnx import _require

    try:
        _require("onnx")
        _require("onnxruntime")
    except ImportError as e:
        raise RuntimeError(str(e)) from None


def _run_export(args) -> int:
    from pyro_sbp.export import count_parameters, save_onnx, save_torchscript

    if args.onnx:
        _require_onnx()
    if args.criterion is not None:
        _method_of_run(args.run_dir).check_criterion(args.criterion)
    trainer = _load_for_export(args.run_dir, args.criterion)
    shape = trainer.input_shape
    trainer.net.cpu()
    full, pruned = trainer.method.export(trainer.net, shape)
    run = Path(args.run_dir)
    save_torchscript(full, run / "full.pt")
    save_torchscript(pruned, run / "pruned.pt")
    extra = trainer.method.write_exports(trainer.net, shape, run)
    if extra:
        print(f"wrote {', '.join(str(run / name) for name in extra)}")
    print(
        f"wrote {run / 'full.pt'} ({count_parameters(full):,} parameters) and "
        f"{run / 'pruned.pt'} ({count_parameters(pruned):,} parameters); inputs {list(shape)} "
        "in [0, 1]"
    )
    if args.onnx:
        save_onnx(full, run / "full.onnx", shape)
        save_onnx(pruned, run / "pruned.onnx", shape)
        print(f"wrote {run / 'full.onnx'} and {run / 'pruned.onnx'} (input 'input', batch dynamic)")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="parameters, FLOPs and latency of the full and the pruned network",
        description=(
            "Time the full against the pruned network (written by `pyro-sbp export`) with "
            "torch.utils.benchmark at several batch sizes, in each runtime of --runtime: "
            "torchscript (full.pt and pruned.pt, the default), eager (the same networks as "
            "plain torch modules, rebuilt from checkpoint.pt and masks.pt) and onnxruntime "
            "(full.onnx and pruned.onnx, written by `pyro-sbp export --onnx`; CPU only). "
            "Print a table and write bench.json."
        ),
    )
    p.add_argument("run_dir")
    p.add_argument("--device", action="append", default=None, help="cpu (default) or cuda")
    p.add_argument("--batch-sizes", default="1,64,256", help="comma-separated")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per measurement")
    p.add_argument(
        "--runtime",
        default="torchscript",
        help=f"comma-separated, of {', '.join(RUNTIMES)} (default: torchscript)",
    )


def _runtimes(text: str) -> list[str]:
    """The runtimes of ``--runtime``, in order; an unknown or repeated one is a ValueError."""
    names = [t.strip() for t in text.split(",")]
    for name in names:
        if name not in RUNTIMES:
            raise ValueError(
                f"unknown runtime {name!r} in --runtime {text!r}; expected a comma-separated "
                f"list of {', '.join(RUNTIMES)}"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--runtime {text!r} names {repeated[0]!r} twice")
    return names


def _check_same(candidate, reference, what: str, reference_path: Path, shape) -> None:
    """Stop unless ``candidate`` computes what ``reference`` (the TorchScript file at
    ``reference_path``) does: a file left from an earlier export, or masks.pt from another
    criterion, would time another network."""
    import torch

    x = torch.rand((4, *shape), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)
        got = candidate(x)
    diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    if not diff <= 1e-4 * max(1.0, float(expected.abs().max())):
        raise ValueError(
            f"{what} does not compute what {reference_path} does (largest difference "
            f"{diff:.3g}): run `pyro-sbp export {reference_path.parent}` again"
        )


def _eager_networks(run: Path, references, shape):
    """The exported networks as plain torch modules, rebuilt from checkpoint.pt and masks.pt,
    checked against full.pt and pruned.pt."""
    trainer = _load_for_export(str(run), None)
    trainer.net.cpu()
    networks = trainer.method.export(trainer.net, shape)
    for module, reference, name in zip(networks, references, ("full", "pruned"), strict=True):
        what = f"the {name} network of {run / 'checkpoint.pt'} and its masks.pt"
        _check_same(module, reference, what, run / f"{name}.pt", shape)
    return networks


def _onnx_networks(run: Path, references, shape):
    """ONNX Runtime sessions of full.onnx and pruned.onnx, checked against full.pt and
    pruned.pt."""
    import torch

    from pyro_sbp.export import load_onnx

    sessions = []
    for reference, name in zip(references, ("full", "pruned"), strict=True):
        path = run / f"{name}.onnx"
        if not path.exists():
            raise FileNotFoundError(f"no {path.name} in {run}: run `pyro-sbp export {run} --onnx`")
        session = load_onnx(path)

        def run_onnx(x, session=session, path=path):
            feeds = {session.get_inputs()[0].name: x.numpy()}
            try:
                return torch.from_numpy(session.run(None, feeds)[0])
            except Exception as e:  # onnxruntime's errors derive from Exception only
                text = str(e).strip()
                reason = text.splitlines()[0] if text else type(e).__name__
                raise ValueError(
                    f"{path} does not run on inputs of {list(shape)} ({reason})"
                ) from None

        _check_same(run_onnx, reference, str(path), run / f"{name}.pt", shape)
        sessions.append(session)
    return tuple(sessions)


def _run_bench(args) -> int:
    import torch

    from pyro_sbp.export import compare, compare_onnx, format_table, load_torchscript
    from pyro_sbp.infer.checkpoint import write_text_atomic

    runtimes = _runtimes(args.runtime)
    devices = args.device or ["cpu"]
    if "onnxruntime" in runtimes:
        _require_onnx()
        if any(d != "cpu" for d in devices):
            raise ValueError(
                "the onnxruntime runtime is timed on the CPU only: drop it from --runtime, or "
                "bench --device cuda separately"
            )
    run = Path(args.run_dir)
    for name in ("full.pt", "pruned.pt"):
        if not (run / name).exists():
            raise FileNotFoundError(f"no {name} in {run}: run `pyro-sbp export {run}` first")
    for d in devices:
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but CUDA is not available here")
    from pyro_sbp.infer import load_checkpoint

    shape = tuple(load_checkpoint(run)["input_shape"])
    full = load_torchscript(run / "full.pt")
    pruned = load_torchscript(run / "pruned.pt")
    sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    # Every runtime's networks first (each checked against the TorchScript files), then the
    # timings, so that a bad file stops the command before any time is spent measuring.
    networks = {}
    for runtime in runtimes:
        if runtime == "torchscript":
            networks[runtime] = full, pruned
        elif runtime == "eager":
            networks[runtime] = _eager_networks(run, (full, pruned), shape)
        else:
            networks[runtime] = _onnx_networks(run, (full, pruned), shape)
    # Parameters and FLOPs from the TorchScript files (no devices: no latency measured).
    result = compare(full, pruned, shape, (), (), args.min_run_time)
    result["runtimes"] = runtimes
    for runtime, (f, p) in networks.items():
        if runtime == "onnxruntime":
            import onnxruntime

            result["onnxruntime_version"] = onnxruntime.__version__
            rows = compare_onnx(f, p, shape, sizes, args.min_run_time)
        else:
            rows = compare(f, p, shape, sizes, devices, args.min_run_time)["latency"]
        result["latency"] += [{"runtime": runtime, **row} for row in rows]
    write_text_atomic(json.dumps(result, indent=1) + "\n", run / "bench.json")
    print(format_table(result))
    print(f"wrote {run / 'bench.json'}")
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="report, ArviZ posterior, exported networks and plots of a fitted run",
        description=(
            "Prune a fitted run with --criterion, export and time it, and write report.json, "
            "posterior.nc (ArviZ), full.pt, pruned.pt, masks.pt and plots/ into the run "
            "directory."
        ),
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--criterion",
        default=None,
        help="pruning criterion (default: 'trained', the masks of pruning during training, for a "
        "run that did; else bmrs-n)",
    )
    p.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per measurement")


def _run_report(args) -> int:
    method = _method_of_run(args.run_dir)
    if args.criterion is not None:
        method.check_criterion(args.criterion)
    report = method.report(
        args.run_dir, args.criterion, bench=not args.no_bench, min_run_time=args.min_run_time
    )
    print(method.format_summary(report))
    print(f"wrote report.json, posterior.nc, full.pt, pruned.pt and plots/ in {args.run_dir}")
    return 0


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or not all(v > 0 and v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _add_sweep(sub) -> None:
    from pyro_sbp.infer import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "sweep",
        help="fit one network at several KL weights; the smallest within an accuracy drop",
        description=(
            "Pretrain the network once (the reference: the network you bring), then fit it at "
            "every KL weight of --kl-weights with pruning during training (--criterion) and "
            "--finetune-epochs of fine-tuning, each in OUT/kl-<weight> (resumable: an "
            "interrupted sweep continues). Writes OUT/sweep.json and OUT/frontier.png (units "
            "removed and FLOPs reduction against validation accuracy, the published points "
            "where known). With --max-accuracy-drop D, the smallest network within D points of "
            "the reference on the validation split is exported and reported like `pyro-sbp "
            "report` (full.pt, pruned.pt, report.json in its run directory)."
        ),
    )
    p.add_argument(
        "--kl-weights",
        type=_float_list,
        default=[1.0, 10.0, 100.0, 1000.0],
        metavar="W1,W2,...",
        help="the KL weights (default 1,10,100,1000)",
    )
    p.add_argument("--criterion", default=None, help="pruning during training (default bmrs-u:4)")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=None,
        metavar="POINTS",
        help="pick the smallest network within this many accuracy points of the reference",
    )
    p.add_argument("--out", required=True, help="the sweep's directory")
    _add_training_options(p, d)


def _run_sweep(args) -> int:
    import torch

    from pyro_sbp.diagnostics import format_summary, make_report
    from pyro_sbp.infer.sweep import SWEEP_NAME, plot_frontier, points_phrase, run_sweep
    from pyro_sbp.reduction import parse_criterion

    if args.criterion is not None:
        parse_criterion(args.criterion)
    if args.max_accuracy_drop is not None and not args.max_accuracy_drop >= 0:
        raise ValueError(f"--max-accuracy-drop must be >= 0, got {args.max_accuracy_drop}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    config = _config_from_args(args)
    record = run_sweep(
        config,
        args.kl_weights,
        args.out,
        criterion=args.criterion,
        max_accuracy_drop=args.max_accuracy_drop,
        progress=not args.no_progress,
    )
    out = Path(args.out)
    plot_frontier(record, out / "frontier.png")
    ref = record["reference"]
    print(f"reference (pretrained, gates off): validation {100 * ref['val_accuracy']:.2f}%")
    print(f"{'kl_weight':>10} {'removed':>8} {'val':>7} {'test':>7} {'params':>10} {'FLOPs':>8}")
    for p in record["points"]:
        print(
            f"{p['kl_weight']:>10g} {100 * p['fraction_removed']:>7.1f}% "
            f"{100 * p['val_accuracy']:>6.2f}% {100 * p['test_accuracy']:>6.2f}% "
            f"{p['params']:>10,} {ref['flops'] / max(p['flops'], 1):>7.2f}x"
        )
    print(f"wrote {out / SWEEP_NAME} and {out / 'frontier.png'}")
    if args.max_accuracy_drop is None:
        return 0
    if record["chosen"] is None:
        print(f"no KL weight stays within {points_phrase(args.max_accuracy_drop)} of the reference")
        return 0
    chosen = next(p for p in record["points"] if p["kl_weight"] == record["chosen"])
    print(
        f"chosen: KL weight {record['chosen']:g}, the smallest network within "
        f"{points_phrase(args.max_accuracy_drop)} on validation"
    )
    # The network as the sweep measured it: the masks of its training, fine-tuned.
    report = make_report(chosen["run_dir"], "trained", bench=True)
    print(format_summary(report))
    print(f"wrote report.json, full.pt, pruned.pt and plots/ in {chosen['run_dir']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-sbp",
        description="Bayesian structured pruning of neural networks with Pyro.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_sweep(sub)
    _add_prune(sub)
    _add_export(sub)
    _add_bench(sub)
    _add_report(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit code (2 for bad input, as argparse does;
    ``128 + signal`` for a run stopped by SIGINT or SIGTERM)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {
        "train": _run_train,
        "sweep": _run_sweep,
        "prune": _run_prune,
        "export": _run_export,
        "bench": _run_bench,
        "report": _run_report,
    }
    from pyro_sbp.infer import TrainingInterrupted

    try:
        return commands[args.command](args)
    except TrainingInterrupted as e:
        print(f"pyro-sbp {args.command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"pyro-sbp {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        # One line, no traceback: every message names the file or value at fault.
        print(f"pyro-sbp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
