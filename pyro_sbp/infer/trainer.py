"""Fitting a gated network: deterministic pretraining, then SVI with the analytic-KL ELBO."""

import contextlib
import dataclasses
import itertools
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pyro_sbp.data import DataSplits, load_dataset, make_loaders
from pyro_sbp.guides import SBPGuide
from pyro_sbp.infer.checkpoint import (
    CHECKPOINT_NAME,
    architecture,
    architecture_mismatch,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    write_text_atomic,
)
from pyro_sbp.infer.compact_elbo import CompactMeanField_ELBO
from pyro_sbp.infer.plain_state import (
    get_plain_rng_state,
    param_store_from_plain,
    param_store_to_plain,
    set_plain_rng_state,
)
from pyro_sbp.infer.run_lock import RunLock
from pyro_sbp.methods import get_method
from pyro_sbp.models import (
    DEFAULT_HIGH,
    DEFAULT_LOW,
    build_network,
    check_input,
)
from pyro_sbp.models.sbp_model import NOISE_MODES, check_kl_weight

HISTORY_NAME = "history.json"
#: The SVI optimiser's parameter groups (their ``"name"``), in order: the network's weights at
#: :attr:`TrainConfig.lr`, the method's variational parameters at :attr:`TrainConfig.gate_lr`.
PARAM_GROUPS = ("network", "variational")
#: :attr:`TrainConfig.lr_schedule` values.
LR_SCHEDULES = ("constant", "linear", "cosine")
#: :attr:`TrainConfig.prune_masks` values.
PRUNE_MASKS = ("cumulative", "fresh")
#: Default of :attr:`TrainConfig.checkpoint_every`: a checkpoint every this many steps, besides
#: the one after every epoch (see ``benchmarks/checkpoint_cost.py`` for what it costs).
DEFAULT_CHECKPOINT_EVERY = 200


class NonFiniteLossError(FloatingPointError):
    """The ELBO became ``nan`` or ``inf``; the message names the step and the offending sites."""


class TrainingInterrupted(Exception):
    """Training stopped at a step boundary on ``SIGINT`` or ``SIGTERM``, after writing a
    checkpoint (when the run has a directory); the message says how to resume.

    :ivar int signum: the signal's number (the CLI exits with ``128 + signum``).
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class _StopOnSignal:
    """While active, the first SIGINT or SIGTERM only sets :attr:`signum` (the run stops at the
    next step boundary); a second one interrupts at once. Installed only in the main thread."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in its checkpoint).

    :ivar model: a name from :data:`pyro_sbp.models.NETWORKS`.
    :ivar dataset: a name from :data:`pyro_sbp.data.DATASETS`.
    :ivar epochs: SVI epochs.
    :ivar pretrain_epochs: epochs of deterministic training (gates off) before SVI; SBP starts
        from a trained network. Ignored when ``pretrained`` weights are given.
    :ivar lr: learning rate of the weights (Adam).
    :ivar gate_lr: learning rate of the gates' variational parameters (the method's
        :meth:`~pyro_sbp.methods.Method.is_variational` ones: their own Adam parameter group).
    :ivar beta1: Adam's first-moment decay (SBP uses 0.95).
    :ivar kl_weight: the KL weight :math:`\beta` of the gates (see
        :class:`~pyro_sbp.models.SBPModel`): one number, or ``{site: beta}`` (sites left out
        get 1). 1 is the exact ELBO; larger values remove more units, at some accuracy.
    :ivar kl_warmup_epochs: epochs over which the KL weight rises linearly from 0 to
        ``kl_weight``.
    :ivar prune_criterion: prune during training (the BMRS recipe): after every SVI epoch the
        masks are recomputed with this criterion (see :mod:`pyro_sbp.reduction.criteria`);
        removed units are off in training and evaluation from then on.
    :ivar prune_masks: ``"cumulative"`` (a unit removed stays removed) or ``"fresh"`` (every
        epoch's masks are computed from scratch, so a unit can come back, as BMRS's code does).
    :ivar noise: ``"example"`` (a draw of the gates per example, SBP's) or ``"batch"`` (one
        per minibatch, BMRS's); see :class:`~pyro_sbp.models.SBPModel`.
    :ivar keep_best: end the run with the network and gate posteriors of its fine-tuning epoch
        of best validation accuracy (BMRS's recipe) instead of its last one.
    :ivar lr_schedule: the SVI learning rates over the ``epochs + finetune_epochs`` SVI epochs:
        ``"constant"``, ``"linear"`` (SBP's decay: epoch ``e`` of ``T`` at ``1 - e / T`` of the
        rate) or ``"cosine"`` (``(1 + cos(pi e / T)) / 2``).
    :ivar finetune_epochs: SVI epochs after the ``epochs``, with the masks frozen.
    :ivar input_gates: ``nn.Linear`` layers whose input features also get gates (see
        :func:`~pyro_sbp.models.make_prunable`), e.g. ``["classifier.1"]``.
    :ivar method: the pruning method, a name from :data:`pyro_sbp.methods.METHODS`
        (``"sbp"``, ``"sparse-vd"``, ``"bc-gnj"``, ``"bc-ghs"``), which prepares the network
        and builds the model and guide; a checkpoint without it is SBP's.
    :ivar checkpoint_every: also write a checkpoint every this many training steps (pretraining
        and SVI), so that a kill loses at most that many; 0 writes one after every epoch only.
        A run resumed from a checkpoint inside an epoch continues with the very batch it
        stopped at, and ends as the uninterrupted run would have.
    """

    model: str = "digits-mlp"
    dataset: str = "digits"
    method: str = "sbp"
    data_dir: str | None = None
    epochs: int = 10
    pretrain_epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    gate_lr: float = 1e-2
    pretrain_lr: float = 1e-3
    beta1: float = 0.95
    kl_weight: float | dict[str, float] = 1.0
    kl_warmup_epochs: int = 0
    seed: int = 0
    device: str = "cpu"
    val_fraction: float = 0.2
    resize: int | None = None
    low: float = DEFAULT_LOW
    high: float = DEFAULT_HIGH
    init_log_scale: float = -5.0
    pretrained: str | None = None
    prune_criterion: str | None = None
    prune_masks: str = "cumulative"
    noise: str = "example"
    lr_schedule: str = "constant"
    finetune_epochs: int = 0
    keep_best: bool = False
    input_gates: list[str] = field(default_factory=list)
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    network_kwargs: dict = field(default_factory=dict)
    dataset_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        get_method(self.method).check_criterion(self.prune_criterion)
        if self.method != "sbp" and self.input_gates:
            raise ValueError(f"input_gates are SBP's; method {self.method!r} takes none")
        keys = ("epochs", "pretrain_epochs", "kl_warmup_epochs", "finetune_epochs")
        for key in (*keys, "checkpoint_every"):
            if int(getattr(self, key)) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        for key in ("lr", "gate_lr", "pretrain_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        weights = self.kl_weight.values() if isinstance(self.kl_weight, dict) else [self.kl_weight]
        for w in weights:
            check_kl_weight(w)
        for key, allowed in (
            ("prune_masks", PRUNE_MASKS),
            ("noise", NOISE_MODES),
            ("lr_schedule", LR_SCHEDULES),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if not 0 <= self.beta1 < 1:
            raise ValueError(f"beta1 must be in [0, 1), got {self.beta1}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but CUDA is not available here")
    return torch.device(name)


@torch.no_grad()
def evaluate(net: nn.Module, loader, device: torch.device) -> float:
    """Accuracy of ``net`` in evaluation mode (gates at the posterior mean) on ``loader``."""
    was_training = net.training
    net.eval()
    correct = total = 0
    for x, y, *_ in loader:
        x, y = x.to(device), y.to(device)
        correct += (net(x).argmax(-1) == y).sum().item()
        total += y.numel()
    net.train(was_training)
    return correct / max(total, 1)


def units_kept_snr(guide: SBPGuide, threshold: float = 1.0) -> dict[str, int]:
    """Units per gate site with SNR above ``threshold`` (and not masked)."""
    out = {}
    gates = dict(guide._gates)
    for site, snr in guide.snr().items():
        out[site] = int(((snr > threshold) & (gates[site].mask > 0)).sum())
    return out


def guide_param_names(guide, *example, exclude=()) -> list[str]:
    """The names of the guide's own parameters in Pyro's parameter store, created if need be
    (Pyro creates a parameter at its first ``pyro.param``), in the order they are created.

    An :class:`~pyro_sbp.guides.SBPGuide` creates its parameters by name (no random number is
    drawn); another guide is run once on the ``example`` arguments (e.g. a batch ``x, y, idx,
    1.0``) without gradients, under the random state it is given back after, and its parameters
    are those it reads but the tensors in ``exclude`` (the network's weights).
    """
    if hasattr(guide, "site_names") and hasattr(guide, "params"):
        for site in guide.site_names:
            guide.params(site)
        return [f"{site}.{part}" for site in guide.site_names for part in ("loc", "log_scale")]
    if not example:
        raise ValueError(
            f"{type(guide).__name__} creates its parameters when it runs: pass example "
            "arguments of a call"
        )
    state = get_plain_rng_state()
    try:
        with pyro.poutine.trace(param_only=True) as capture, torch.no_grad():
            guide(*example)
    finally:
        set_plain_rng_state(state)
    skip = {id(t) for t in exclude}
    return [
        name
        for name, site in capture.trace.nodes.items()
        if id(site["value"].unconstrained()) not in skip
    ]


@dataclass
class _EpochProgress:
    """Where a run is inside an epoch: what a checkpoint between two steps must hold to resume
    with the next batch (the shuffle is replayed from the epoch's first random state)."""

    phase: str
    epoch: int
    sampler_rng: torch.Tensor
    loader_rng: torch.Tensor
    batches_done: int = 0
    loss_sum: float = 0.0
    count: float = 0.0
    #: Seconds spent on the epoch before this process took it over.
    seconds: float = 0.0

    def __post_init__(self):
        self._started = time.perf_counter()

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self._started

    def to_dict(self) -> dict:
        return asdict(self) | {"seconds": self.elapsed()}


class Trainer:
    """A resumable training run: pretraining, then SVI, with checkpoints after every epoch and
    every :attr:`~TrainConfig.checkpoint_every` steps.

    ``Trainer(config, out_dir).fit()`` trains; a second ``Trainer`` on the same ``out_dir`` with
    ``resume=True`` continues from the last checkpoint (written at an epoch's end or between
    two steps) and ends in the same state as an uninterrupted run (same seed, same batches,
    same noise; bit for bit on the CPU). While :meth:`fit` runs, the run directory is locked
    against a second writer, and ``SIGINT`` / ``SIGTERM`` stop it after the current step with
    a checkpoint (:class:`TrainingInterrupted`).

    SVI fits the model and guide with the ELBO's :meth:`~pyro.infer.ELBO.loss_and_grads` and
    one ``torch.optim.Adam`` (:attr:`optim`) over every parameter, in two parameter groups
    (:data:`PARAM_GROUPS`): the network's weights at ``config.lr`` and the method's variational
    parameters at ``config.gate_lr``, both times the schedule's factor. Per element this is the
    update of ``pyro.optim.Adam``'s optimiser per parameter; it is one optimiser step instead
    of one per parameter.

    Checkpoints hold plain values only and load without unpickling arbitrary objects (see
    :mod:`pyro_sbp.infer.checkpoint`).

    :param TrainConfig config: the run's settings.
    :param out_dir: where ``checkpoint.pt`` and ``history.json`` are written (``None`` for none).
    :param bool resume: continue from ``out_dir``'s checkpoint (its config wins but for
        ``epochs`` and ``checkpoint_every``; a checkpoint of another architecture is refused).
    :param bool progress: show tqdm progress bars (they hide themselves off a terminal).
    :param splits: data splits to use instead of loading ``config.dataset``.
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        *,
        resume: bool = False,
        progress: bool = True,
        splits: DataSplits | None = None,
        _checkpoint: dict | None = None,
    ):
        self.out_dir = None if out_dir is None else Path(out_dir)
        checkpoint = None
        if resume:
            if self.out_dir is None:
                raise ValueError("resume=True needs the run directory")
            checkpoint = _checkpoint or load_checkpoint(self.out_dir / CHECKPOINT_NAME)
            stored = TrainConfig.from_dict(checkpoint["config"])
            if (stored.model, stored.network_kwargs) != (config.model, config.network_kwargs):
                raise ValueError(
                    f"the checkpoint in {self.out_dir} was written for network "
                    f"{stored.model!r} {stored.network_kwargs or ''}, not {config.model!r} "
                    f"{config.network_kwargs or ''}"
                )
            # Everything but the number of epochs and the checkpoint interval (neither changes
            # what a step computes) comes from the checkpoint.
            stored.epochs = config.epochs
            stored.checkpoint_every = config.checkpoint_every
            config = stored
        # A copy: loading pretrained weights sets pretrain_epochs to 0 on it, not on the caller's.
        self.config = config = dataclasses.replace(config)
        self.progress = progress
        self.device = resolve_device(config.device)
        #: The pruning method (:mod:`pyro_sbp.methods`): network, model, guide and masks.
        self.method = get_method(config.method)

        pyro.set_rng_seed(config.seed)
        pyro.clear_param_store()
        self.splits = splits if splits is not None else self._load_data()
        self.loaders = self._make_loaders()
        self.net = self._build_network().to(self.device)
        self.input_shape = tuple(self.splits.input_shape)
        num_data = self.splits.num_train
        self.model = self.method.build_model(self.net, num_data, self.input_shape, config)
        self.guide = self.method.build_guide(self.net, num_data, config)
        self.elbo = CompactMeanField_ELBO()
        self.pretrain_optim = torch.optim.Adam(self.net.parameters(), lr=config.pretrain_lr)
        self.history: list[dict[str, Any]] = []
        self.pretrain_done = 0
        self.svi_done = 0
        self.global_step = 0
        self._progress: _EpochProgress | None = None
        self._stop: _StopOnSignal | None = None
        self._lr_factor = 1.0
        self._restored_optim: dict | None = None
        #: With ``keep_best``: the best fine-tuning epoch so far (its number, validation
        #: accuracy, network state and gate parameters), and whether the run ended with it.
        self.best: dict[str, Any] | None = None
        if checkpoint is not None:
            self._restore(checkpoint)
        elif config.pretrained:
            self._load_pretrained(config.pretrained)
        #: The SVI optimiser: one ``torch.optim.Adam`` over the parameters of the model and
        #: guide (see :meth:`_build_optimizer`); its parameters' names are
        #: :attr:`optim_param_names`, in its order.
        self.optim = self._build_optimizer(self._restored_optim)
        self._restored_optim = None

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        progress: bool = False,
        epochs: int | None = None,
        checkpoint_every: int | None = None,
        model: str | None = None,
        network_kwargs: dict | None = None,
        splits=None,
    ) -> "Trainer":
        """The trainer of a finished (or interrupted) run, restored from its checkpoint, with
        the run's own settings.

        :param epochs: SVI epochs in all (default: the run's own).
        :param checkpoint_every: steps between checkpoints from now on (default: the run's).
        :param model: if given, the run must be of this network (else ValueError).
        :param network_kwargs: if given, the run's network must have these arguments.
        :param splits: the data (:class:`~pyro_sbp.data.DataSplits`) instead of the run's data
            set, loaded again (they must have the run's split sizes).
        """
        ckpt = load_checkpoint(Path(run_dir) / CHECKPOINT_NAME)
        config = TrainConfig.from_dict(ckpt["config"])
        changes = {
            "epochs": epochs,
            "checkpoint_every": checkpoint_every,
            "model": model,
            "network_kwargs": network_kwargs,
        }
        config = dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
        return cls(config, run_dir, resume=True, progress=progress, splits=splits, _checkpoint=ckpt)

    # --- construction --------------------------------------------------------------------

    def _load_data(self) -> DataSplits:
        c = self.config
        return load_dataset(
            c.dataset,
            c.data_dir,
            seed=c.seed,
            val_fraction=c.val_fraction,
            resize=c.resize,
            **c.dataset_kwargs,
        )

    def _build_network(self) -> nn.Module:
        c = self.config
        kwargs = dict(c.network_kwargs)
        kwargs.setdefault("mean", self.splits.mean)
        kwargs.setdefault("std", self.splits.std)
        kwargs.setdefault("num_classes", self.splits.num_classes)
        net = build_network(c.model, **kwargs)
        expected = getattr(net, "input_shape", None)
        if expected is not None and tuple(expected) != tuple(self.splits.input_shape):
            raise ValueError(
                f"network {c.model!r} expects inputs of shape {tuple(expected)}, but data set "
                f"{c.dataset!r} has {tuple(self.splits.input_shape)}"
                + (" (pass resize=32)" if tuple(expected)[-1] == 32 else "")
            )
        return self.method.prepare(net, c)

    def _base_lr(self, name: str) -> float:
        return self.config.gate_lr if self.method.is_variational(name) else self.config.lr

    def _optim_args(self, name: str) -> dict:
        """The Adam settings of parameter ``name`` now (those of its group)."""
        return {"lr": self._base_lr(name) * self._lr_factor, "betas": (self.config.beta1, 0.999)}

    def _group_of(self, name: str) -> str:
        return PARAM_GROUPS[1] if self.method.is_variational(name) else PARAM_GROUPS[0]

    def _group_lr(self, group: str) -> float:
        base = self.config.gate_lr if group == PARAM_GROUPS[1] else self.config.lr
        return base * self._lr_factor

    def _optim_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, unconstrained tensor)`` of every parameter SVI fits, as Pyro's parameter
        store names them: the network's (the store holds the modules' own ``Parameter`` s),
        then the guide's, created now (:func:`guide_param_names`, which draws no random number
        the run's reproducibility depends on), then any other the store holds (restored from
        a checkpoint)."""
        store = pyro.get_param_store()
        named = list(self.net.named_parameters())
        x, y = (t[:2].to(self.device) for t in self.splits.train.tensors)
        example = (x, y, torch.arange(len(y), device=self.device), 1.0)
        guide_names = guide_param_names(self.guide, *example, exclude=[p for _, p in named])
        known = {name for name, _ in named}
        for name in [*guide_names, *store.keys()]:
            if name not in known:
                known.add(name)
                named.append((name, store[name].unconstrained()))
        return named

    def _build_optimizer(self, state: dict | None = None) -> torch.optim.Adam:
        """One ``torch.optim.Adam`` over :meth:`_optim_parameters`, in the groups of
        :data:`PARAM_GROUPS` (each with its ``"name"``; a group without parameters is left
        out), betas ``(config.beta1, 0.999)``, and the rest torch's defaults (``foreach``
        where torch picks it). ``state`` (:meth:`optim_state`'s form) is loaded by parameter
        name."""
        by_group: dict[str, list] = {g: [] for g in PARAM_GROUPS}
        for name, param in self._optim_parameters():
            by_group[self._group_of(name)].append((name, param))
        groups = [
            {"params": [p for _, p in members], "name": group, "lr": self._group_lr(group)}
            for group, members in by_group.items()
            if members
        ]
        #: The names of the optimiser's parameters, in the order of its ``state_dict()``.
        self.optim_param_names = [name for g in PARAM_GROUPS for name, _ in by_group[g]]
        self._store_size = len(pyro.get_param_store())
        optim = torch.optim.Adam(groups, betas=(self.config.beta1, 0.999))
        if state is not None:
            self._load_optim_state(optim, state)
        return optim

    def optim_state(self) -> dict:
        """The SVI optimiser's state as checkpoints hold it: ``{"param_names": [...],
        "state_dict": optim.state_dict()}`` (the names in the state dict's order, so that a
        resumed run maps each parameter's state by name, not by position)."""
        return {"param_names": list(self.optim_param_names), "state_dict": self.optim.state_dict()}

    def _load_optim_state(self, optim: torch.optim.Optimizer, state: dict) -> None:
        """Give each parameter of ``optim`` the state (``step``, ``exp_avg``, ``exp_avg_sq``)
        that ``state`` holds under its name; the groups' settings stay ``optim``'s own (the
        schedule sets the rates)."""
        names, saved = state["param_names"], state["state_dict"]["state"]
        by_name = {names[int(i)]: value for i, value in saved.items()}
        unknown = sorted(set(by_name) - set(self.optim_param_names))
        if unknown:
            raise ValueError(
                f"the checkpoint's optimiser state is of parameters this run does not have: "
                f"{', '.join(unknown)}"
            )
        own = {
            i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in by_name[n].items()}
            for i, n in enumerate(self.optim_param_names)
            if n in by_name
        }
        optim.load_state_dict({"state": own, "param_groups": optim.state_dict()["param_groups"]})

    def _add_new_parameters(self) -> None:
        """Give the optimiser the parameters the model or guide created since it was built
        (Pyro creates them at their first ``pyro.param``), each in a new group of its kind,
        before their first update, as ``pyro.optim`` does. A step without new parameters costs
        one length comparison."""
        store = pyro.get_param_store()
        if len(store) == self._store_size:
            return
        self._store_size = len(store)
        known = set(self.optim_param_names)
        new: dict[str, list] = {g: [] for g in PARAM_GROUPS}
        for name in store.keys():
            if name not in known:
                new[self._group_of(name)].append(name)
        for group, names in new.items():
            if names:
                params = [store[n].unconstrained() for n in names]
                self.optim.add_param_group(
                    {"params": params, "name": group, "lr": self._group_lr(group)}
                )
                self.optim_param_names += names

    def lr_factor(self, epoch: int) -> float:
        """The learning-rate schedule's factor in SVI epoch ``epoch`` (0-based)."""
        total = max(self.config.epochs + self.config.finetune_epochs, 1)
        if self.config.lr_schedule == "linear":
            return 1.0 - epoch / total
        if self.config.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / total))
        return 1.0

    def _set_lr_factor(self, factor: float) -> None:
        """Every parameter group's rate: its base rate (``lr`` or ``gate_lr``) times
        ``factor``."""
        self._lr_factor = factor
        for group in self.optim.param_groups:
            group["lr"] = self._group_lr(group["name"])

    def _load_pretrained(self, path: str) -> None:
        # A plain state dict or a pyro-sbp checkpoint, both loaded safely (never unpickling).
        state = load_weights(path, map_location=self.device)
        # Pretrained weights come from a plain network: gate buffers may be absent.
        own = {k: v for k, v in self.net.state_dict().items() if not self.method.is_variational(k)}
        theirs = {k: v for k, v in state.items() if not self.method.is_variational(k)}
        diffs = architecture_mismatch(architecture(own), architecture(theirs))
        if diffs:
            raise ValueError(
                f"pretrained weights in {path} do not fit network {self.config.model!r}:\n  "
                + "\n  ".join(diffs)
            )
        self.net.load_state_dict(theirs, strict=False)
        self.config.pretrain_epochs = 0

    # --- checkpoints ---------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The run's whole state, in plain values (what :meth:`save` writes)."""
        net_params = {n for n, _ in self.net.named_parameters()}
        store = pyro.get_param_store().get_state()
        guide_store = param_store_to_plain(
            {
                "params": {k: v for k, v in store["params"].items() if k not in net_params},
                "constraints": {
                    k: v for k, v in store["constraints"].items() if k not in net_params
                },
            }
        )
        sampler = self.loaders["train"].sampler.sampler
        return {
            "config": asdict(self.config),
            "pretrain_done": self.pretrain_done,
            "svi_done": self.svi_done,
            "global_step": self.global_step,
            "epoch_progress": None if self._progress is None else self._progress.to_dict(),
            "net_state": self.net.state_dict(),
            "architecture": architecture(self.net.state_dict()),
            "guide_params": guide_store,
            "optim_state": self.optim_state(),
            "pretrain_optim_state": self.pretrain_optim.state_dict(),
            "rng_state": get_plain_rng_state(),
            "sampler_rng": sampler.generator.get_state(),
            "loader_rng": self.loaders["train"].generator.get_state(),
            "history": self.history,
            "best": self.best,
            "split": self.splits.split,
            "input_shape": list(self.input_shape),
            "num_classes": self.splits.num_classes,
        }

    def _make_loaders(self) -> dict:
        return make_loaders(self.splits, self.config.batch_size, seed=self.config.seed)

    def _check_world_size(self, ckpt: dict) -> None:
        # A run of several processes stopped inside an epoch read that epoch's batches in
        # shards (see pyro_sbp.infer.distributed): only DistributedTrainer can continue it.
        world = (ckpt.get("distributed") or {}).get("world_size", 1)
        if world > 1 and ckpt.get("epoch_progress") is not None:
            raise ValueError(
                f"the checkpoint in {self.out_dir} was written inside an epoch by a run of "
                f"{world} processes: resume it with DistributedTrainer (torchrun, or "
                "`pyro-sbp train --resume`)"
            )

    def _restore(self, ckpt: dict) -> None:
        self._check_world_size(ckpt)
        found = ckpt.get("architecture") or architecture(ckpt["net_state"])
        diffs = architecture_mismatch(architecture(self.net.state_dict()), found)
        if diffs:
            raise ValueError(
                f"the checkpoint was written for another architecture than {self.config.model!r}:"
                "\n  " + "\n  ".join(diffs)
            )
        if ckpt.get("split", self.splits.split)["sizes"] != self.splits.split["sizes"]:
            raise ValueError("the checkpoint's data split differs from this data set's")
        self.net.load_state_dict(ckpt["net_state"])
        guide_store = param_store_from_plain(ckpt["guide_params"])
        guide_store["params"] = {k: v.to(self.device) for k, v in guide_store["params"].items()}
        pyro.get_param_store().set_state(guide_store)
        # Loaded by name once the optimiser is built over the restored parameters.
        self._restored_optim = ckpt["optim_state"]
        self.pretrain_optim.load_state_dict(ckpt["pretrain_optim_state"])
        set_plain_rng_state(ckpt["rng_state"])
        self.loaders["train"].sampler.sampler.generator.set_state(ckpt["sampler_rng"])
        self.loaders["train"].generator.set_state(ckpt["loader_rng"])
        self.history = list(ckpt["history"])
        self.pretrain_done = ckpt["pretrain_done"]
        self.svi_done = ckpt["svi_done"]
        self.global_step = ckpt["global_step"]
        progress = ckpt.get("epoch_progress")
        self._progress = None if progress is None else _EpochProgress(**progress)
        self.best = ckpt.get("best")

    def save(self) -> None:
        """Write the checkpoint and the history (atomically; nothing without ``out_dir``)."""
        if self.out_dir is None:
            return
        save_checkpoint(self.state(), self.out_dir / CHECKPOINT_NAME)
        write_text_atomic(json.dumps(self.history, indent=1) + "\n", self.out_dir / HISTORY_NAME)

    def compute_masks(self, criterion: str):
        """:func:`~pyro_sbp.reduction.compute_masks` for this run's network and guide, with its
        training split as the data (which ``elbo`` needs)."""
        return self.method.compute_masks(
            self.net, self.guide, criterion, self.splits.train.tensors, progress=self.progress
        )

    # --- training ------------------------------------------------------------------------

    def kl_weight(self, epoch: int) -> float:
        """The KL warm-up's factor in SVI epoch ``epoch`` (0-based): it multiplies every gate's
        KL weight, rising linearly to 1 over ``kl_warmup_epochs``."""
        w = self.config.kl_warmup_epochs
        return 1.0 if w == 0 else min(1.0, (epoch + 1) / w)

    def _effective_kl_weight(self, factor: float) -> float | dict[str, float]:
        weights = self.model.kl_weights
        if len(set(weights.values())) == 1:
            return factor * next(iter(weights.values()))
        return {site: factor * w for site, w in weights.items()}

    def fit(self) -> list[dict[str, Any]]:
        """Run the remaining pretraining and SVI epochs; return the history.

        :raises RunDirectoryLocked: if another process is writing the run directory.
        :raises TrainingInterrupted: on ``SIGINT`` or ``SIGTERM``, after the current step and
            a checkpoint.
        """
        c = self.config
        total = c.pretrain_epochs + c.epochs + c.finetune_epochs
        done = self.pretrain_done + self.svi_done
        with self._run_lock(), _StopOnSignal() as self._stop:
            self._remove_partial_writes()
            bar = tqdm(
                total=total,
                initial=done,
                desc="epochs",
                disable=not self.progress or None,
                unit="ep",
            )
            try:
                while self.pretrain_done < c.pretrain_epochs:
                    record = self._pretrain_epoch(self.pretrain_done)
                    self.pretrain_done += 1
                    self._end_epoch(record, bar)
                while self.svi_done < c.epochs + c.finetune_epochs:
                    prune = c.prune_criterion is not None and self.svi_done < c.epochs
                    record = self._svi_epoch(self.svi_done, prune)
                    self.svi_done += 1
                    self._end_epoch(record, bar)
                if c.keep_best and self.best is not None and not self.best["kept"]:
                    self._keep_best()
            finally:
                bar.close()
                self._stop = None
        return self.history

    def _run_lock(self):
        return RunLock(self.out_dir) if self.out_dir is not None else contextlib.nullcontext()

    def _remove_partial_writes(self) -> None:
        """Delete the temporary files of writes that a killed run left half done (this run
        holds the directory's lock, so no live writer owns them)."""
        if self.out_dir is None:
            return
        for name in (CHECKPOINT_NAME, HISTORY_NAME):
            for tmp in self.out_dir.glob(f"{name}.*.tmp"):
                tmp.unlink(missing_ok=True)

    def _snapshot_best(self, record: dict) -> None:
        if self.best is not None and record["val_accuracy"] <= self.best["val_accuracy"]:
            return
        store = pyro.get_param_store()
        gates = {
            k: v.detach().clone()
            for k, v in store.get_state()["params"].items()
            if self.method.is_variational(k)
        }
        self.best = {
            "epoch": record["epoch"],
            "val_accuracy": record["val_accuracy"],
            "net_state": {k: v.detach().clone() for k, v in self.net.state_dict().items()},
            "guide_params": gates,
            "kept": False,
        }

    def _keep_best(self) -> None:
        """End with the best fine-tuning epoch's network and gate posteriors (in place: the
        optimisers keep their parameters and states)."""
        self.net.load_state_dict(self.best["net_state"])
        store = pyro.get_param_store()
        with torch.no_grad():
            for name, value in self.best["guide_params"].items():
                store[name].unconstrained().copy_(value)
        self.method.update(self.net, self.guide)
        self.best["kept"] = True
        self.save()

    def _end_epoch(self, record: dict, bar) -> None:
        self._progress = None
        if self.config.keep_best and record["phase"] == "finetune":
            self._snapshot_best(record)
        self.history.append(record)
        self.save()
        bar.update(1)
        postfix = {"loss": f"{record['loss']:.4g}", "acc": f"{record['val_accuracy']:.3f}"}
        if "units_kept" in record:
            postfix["kept"] = "-".join(str(v) for v in record["units_kept"].values())
        bar.set_postfix(postfix)
        self._stop_if_signalled()

    def _eval_loader(self):
        return self.loaders.get("val") or self.loaders["test"]

    def _start_epoch(self, phase: str, epoch: int) -> _EpochProgress:
        """The epoch's progress: continued from a checkpoint written inside it, else new."""
        p = self._progress
        if p is not None and (p.phase, p.epoch) == (phase, epoch):
            return p
        loader = self.loaders["train"]
        self._progress = _EpochProgress(
            phase,
            epoch,
            sampler_rng=loader.sampler.sampler.generator.get_state(),
            loader_rng=loader.generator.get_state(),
        )
        return self._progress

    def _batches(self, desc: str, progress: _EpochProgress):
        """The epoch's batches from the first one not done yet (the shuffle replayed from the
        epoch's first random state, the batches done skipped)."""
        loader = self.loaders["train"]
        loader.sampler.sampler.generator.set_state(progress.sampler_rng)
        loader.generator.set_state(progress.loader_rng)
        batches = itertools.islice(iter(loader), progress.batches_done, None)
        return tqdm(
            batches,
            desc=desc,
            total=len(loader),
            initial=progress.batches_done,
            leave=False,
            disable=not self.progress or None,
            unit="batch",
        )

    def _after_step(self, progress: _EpochProgress, loss: float, count: float) -> None:
        """Count the step; checkpoint when it is time or when a signal asked to stop."""
        self.global_step += 1
        progress.batches_done += 1
        progress.loss_sum += loss
        progress.count += count
        every = self.config.checkpoint_every
        due = bool(every) and self.global_step % every == 0
        if due:
            self.save()
        self._stop_if_signalled(saved=due)

    def _stop_if_signalled(self, saved: bool = True) -> None:
        if self._stop is None or self._stop.signum is None:
            return
        if not saved:
            self.save()
        name = signal.Signals(self._stop.signum).name
        where = f"after step {self.global_step}"
        p = self._progress
        if p is not None:
            total = len(self.loaders["train"])
            where += f" ({p.phase} epoch {p.epoch + 1}, batch {p.batches_done} of {total})"
        if self.out_dir is None:
            message = f"interrupted by {name} {where}; the run has no directory: nothing saved"
        else:
            message = (
                f"interrupted by {name} {where}; checkpoint written to "
                f"{self.out_dir / CHECKPOINT_NAME}. Resume with: pyro-sbp train --out "
                f"{self.out_dir} --resume"
            )
        raise TrainingInterrupted(message, self._stop.signum)

    def _pretrain_epoch(self, epoch: int) -> dict:
        self.method.set_stochastic(self.net, False)
        self.net.train()
        progress = self._start_epoch("pretrain", epoch)
        for x, y, _ in self._batches(f"pretrain {epoch + 1}", progress):
            x, y = x.to(self.device), y.to(self.device)
            check_input(x, self.input_shape)
            self._after_step(progress, *self._pretrain_step(epoch, x, y))
        acc = self._evaluate()
        self.method.set_stochastic(self.net, True)
        return {
            "phase": "pretrain",
            "epoch": epoch + 1,
            "loss": progress.loss_sum / max(progress.count, 1),
            "val_accuracy": acc,
            "seconds": progress.elapsed(),
        }

    def _pretrain_step(self, epoch: int, x, y) -> tuple[float, float]:
        """One step of deterministic training; returns the batch's summed loss and size."""
        loss = F.cross_entropy(self.net(x), y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"non-finite cross-entropy in pretraining epoch {epoch + 1}, "
                f"step {self.global_step}"
            )
        loss.backward()
        self.pretrain_optim.step()
        # Left in .grad, the last batch's gradient would be added to the first SVI step's.
        self.pretrain_optim.zero_grad(set_to_none=True)
        return loss.item() * len(y), len(y)

    def _evaluate(self) -> float:
        return evaluate(self.net, self._eval_loader(), self.device)

    def _prune(self) -> None:
        """Recompute the masks with the run's criterion and apply them (end of an epoch)."""
        method = self.method
        if self.config.prune_masks == "fresh":
            method.apply_masks(self.net, method.full_masks(self.net))
        method.apply_masks(self.net, self.compute_masks(self.config.prune_criterion))

    def _svi_epoch(self, epoch: int, prune: bool = False) -> dict:
        self.method.set_stochastic(self.net, True)
        self.net.train()
        progress = self._start_epoch("svi", epoch)
        beta = self.kl_weight(epoch)
        self._set_lr_factor(self.lr_factor(epoch))
        for x, y, idx in self._batches(f"svi {epoch + 1}", progress):
            x, y, idx = x.to(self.device), y.to(self.device), idx.to(self.device)
            loss = self._step(epoch, x, y, idx, beta)
            self._after_step(progress, loss, len(y))
        self.method.update(self.net, self.guide)
        record = {}
        if prune:
            self._prune()
            record["criterion"] = self.config.prune_criterion
        summary = self.method.epoch_summary(self.net, self.guide, self.config)
        acc = self._evaluate()
        finetune = epoch >= self.config.epochs
        return record | {
            "phase": "finetune" if finetune else "svi",
            "epoch": epoch + 1,
            # The negative ELBO of the whole data set (summed over the epoch's minibatches,
            # each an unbiased estimate of it, divided by their number).
            "loss": progress.loss_sum / max(len(self.loaders["train"]), 1),
            "kl_weight": self._effective_kl_weight(beta),
            "lr_factor": self._lr_factor,
            "val_accuracy": acc,
            **summary,
            "seconds": progress.elapsed(),
        }

    def _step(self, epoch, x, y, idx, beta) -> float:
        """One SVI step: the ELBO's ``loss_and_grads`` (the loss, and its gradients in the
        parameters' ``.grad``), then one step of the torch optimiser, with the loss checked
        before the update: a non-finite loss stops training with the parameters intact and
        names the culprits. The gradients are cleared (``None``) after."""
        try:
            loss = self.elbo.loss_and_grads(self.model, self.guide, x, y, idx, beta)
        except ValueError as e:
            # Under validation a nan parameter fails a distribution's argument check first.
            if all(torch.isfinite(v).all() for v in pyro.get_param_store().values()):
                raise
            raise NonFiniteLossError(self._diagnose(epoch, x, y, idx, beta, math.nan)) from e
        self._add_new_parameters()
        if not math.isfinite(loss):
            self.optim.zero_grad(set_to_none=True)
            raise NonFiniteLossError(self._diagnose(epoch, x, y, idx, beta, loss))
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        return float(loss)

    def _diagnose(self, epoch, x, y, idx, beta, loss) -> str:
        bad = [
            name
            for name, value in pyro.get_param_store().items()
            if not torch.isfinite(value).all()
        ]
        with torch.no_grad(), pyro.validation_enabled(False):
            guide_trace = pyro.poutine.trace(self.guide).get_trace(x, y, idx, beta)
            model_trace = pyro.poutine.trace(
                pyro.poutine.replay(self.model, trace=guide_trace)
            ).get_trace(x, y, idx, beta)
            for name, site in model_trace.nodes.items():
                if site["type"] != "sample" or name == "data":
                    continue
                if site["is_observed"]:
                    value = site["fn"].log_prob(site["value"])
                else:
                    value = torch.distributions.kl_divergence(
                        guide_trace.nodes[name]["fn"], site["fn"]
                    )
                if not torch.isfinite(value).all():
                    bad.append(name)
        where = ", ".join(dict.fromkeys(bad)) or "none found (the gradient step itself)"
        return (
            f"non-finite loss {loss} at SVI epoch {epoch + 1}, step {self.global_step}; "
            f"offending sites/params: {where}"
        )
