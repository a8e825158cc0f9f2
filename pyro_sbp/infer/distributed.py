r"""Data-parallel training on several processes, GPUs and machines with PyTorch's
:class:`~torch.nn.parallel.DistributedDataParallel`, launched by ``torchrun``.

Each of the :math:`W` processes (ranks) reads its shard of every epoch's shuffle and computes
the minibatch negative ELBO of its :math:`B` examples. Their positions ``idx`` are global (in
the whole training set of :math:`N`), so the data plate scales each rank's likelihood by
:math:`N / B`, and DDP's gradient all-reduce, which averages over the ranks, gives the
gradient of

.. math::

    \frac1W \sum_{r=1}^W \Big( \frac NB \sum_{i \in \mathcal B_r}
        -\mathbb E_q \log p(y_i \mid x_i, W, \theta) + \mathrm{KL} \Big)
    = \frac{N}{WB} \sum_{i \in \mathcal B_1 \cup \dots \cup \mathcal B_W}
        -\mathbb E_q \log p(y_i \mid x_i, W, \theta) + \mathrm{KL},

the minibatch estimate of one process reading the :math:`WB` examples of all the shards:
``W`` processes with a per-rank batch ``B`` take the steps of one process with batch ``W B``
(exactly, where no noise is drawn; with the gates' noise each rank draws its own).

The parameters DDP synchronises are module parameters: the network's weights and the gates'
variational parameters, which :class:`~pyro_sbp.guides.SBPGuide` keeps in Pyro's parameter
store and which :func:`gate_parameters` turns into :class:`~torch.nn.Parameter` s in place
(the type only, as :class:`~pyro.nn.PyroModule` does for its own; values unchanged). The loss
is Pyro's :class:`~pyro.infer.elbo.ELBOModule` of the trainer's ELBO (an ``nn.Module`` over
the model's and guide's parameters), wrapped in DDP, and one ``torch.optim.Adam`` over that
module's parameters (in the trainer's two parameter groups) takes every rank's step.
"""

import atexit
import contextlib
import dataclasses
import math
import os
import signal
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

from pyro_sbp.data import DataSplits
from pyro_sbp.data._loaders import _as_tuple
from pyro_sbp.infer.checkpoint import CHECKPOINT_NAME, load_checkpoint
from pyro_sbp.infer.plain_state import get_plain_rng_state, set_plain_rng_state
from pyro_sbp.infer.trainer import (
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    evaluate,
    guide_param_names,
)
from pyro_sbp.models import named_gates

__all__ = [
    "DistributedContext",
    "DistributedRunFailed",
    "DistributedTrainer",
    "ShardSampler",
    "elbo_module",
    "gate_parameters",
    "init_distributed",
    "launched_distributed",
    "trainer_class",
]

#: Seconds a collective waits for the other ranks before the run fails (the environment
#: variable ``PYRO_SBP_DIST_TIMEOUT`` overrides it). Long enough for rank 0 to compute the
#: masks of a large network while the others wait; a rank that died is noticed at once.
DEFAULT_TIMEOUT = 1800.0


class DistributedRunFailed(RuntimeError):
    """A collective operation failed on this rank: another rank failed or stopped answering
    (its own error is in its output), or the process group timed out."""


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a distributed run.

    :ivar rank: this process's rank (0 writes the run's files).
    :ivar world_size: the number of processes.
    :ivar local_rank: the rank on this machine (the GPU it uses).
    :ivar backend: ``"gloo"`` (CPU) or ``"nccl"`` (CUDA).
    :ivar owned: whether :func:`init_distributed` created the process group (then a failure
        on this rank destroys it, so that the others stop at once).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str
    owned: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets the
    ``RANK`` and ``WORLD_SIZE`` of the ``env://`` rendezvous)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


def _timeout(seconds: float | None) -> float:
    if seconds is None:
        text = os.environ.get("PYRO_SBP_DIST_TIMEOUT")
        seconds = DEFAULT_TIMEOUT if text is None else float(text)
    if not seconds > 0:
        raise ValueError(f"the distributed timeout must be positive, got {seconds}")
    return float(seconds)


def init_distributed(device: str = "cpu", timeout: float | None = None) -> DistributedContext:
    """Join the process group of a ``torchrun`` launch (or use the one already set up).

    The backend follows the device: ``gloo`` on the CPU, ``nccl`` on CUDA, where each rank
    takes the GPU of its ``LOCAL_RANK``. Without a launcher's environment, a group of one
    process (on an in-memory store) is created, so that a distributed run can be resumed by a
    single process. Every collective fails after ``timeout`` seconds instead of waiting
    forever for a rank that stopped answering.

    :param device: ``"cpu"`` or ``"cuda"``.
    :param timeout: seconds (default :data:`DEFAULT_TIMEOUT`, or ``PYRO_SBP_DIST_TIMEOUT``).
    """
    cuda = device.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    if dist.is_initialized():
        found = dist.get_backend()
        if found != backend and not (cuda and "nccl" in found):
            raise ValueError(
                f"the process group's backend is {found!r}, but device {device!r} needs {backend!r}"
            )
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        return DistributedContext(rank, world, local, found, owned=False)
    seconds = timedelta(seconds=_timeout(timeout))
    if launched_distributed():
        rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        local = _env_int("LOCAL_RANK", rank)
    else:
        rank, world, local = 0, 1, 0
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but CUDA is not available here")
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local} has no GPU: this machine has {torch.cuda.device_count()} "
                "(start at most that many processes per node)"
            )
        torch.cuda.set_device(local)
    if launched_distributed():
        dist.init_process_group(backend, timeout=seconds)
    else:
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=seconds
        )
    atexit.register(_destroy_process_group)
    return DistributedContext(rank, world, local, backend, owned=True)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def trainer_class(resume_dir: str | Path | None = None) -> type[Trainer]:
    """The trainer of a ``pyro-sbp train``: :class:`DistributedTrainer` under ``torchrun``
    or to resume a run of several processes (on one), else :class:`~pyro_sbp.infer.Trainer`."""
    if launched_distributed():
        return DistributedTrainer
    if resume_dir is not None and (Path(resume_dir) / CHECKPOINT_NAME).exists():
        stored = load_checkpoint(Path(resume_dir) / CHECKPOINT_NAME).get("distributed")
        if stored is not None and stored["world_size"] > 1:
            return DistributedTrainer
    return Trainer


def gate_parameters(guide, *example, exclude=()) -> dict[str, nn.Parameter]:
    """The guide's variational parameters in Pyro's parameter store (for
    :class:`~pyro_sbp.guides.SBPGuide`, the gates' ``<site>.loc`` and ``<site>.log_scale``) as
    :class:`~torch.nn.Parameter` s, created if need be, by name.

    They stay in the store, where the guide reads them: each unconstrained tensor is stored
    again as a ``Parameter`` over the same values (the type only, as
    :class:`~pyro.nn.PyroModule` converts its store entries), so that a module can hold them
    and DDP or a torch optimiser can see them, and the guide reads the very tensors they
    update. Which they are, and their creation: :func:`~pyro_sbp.infer.trainer.
    guide_param_names` (by name for an ``SBPGuide``; another guide is run once on the
    ``example`` arguments, e.g. a batch ``x, y, idx, 1.0``, and the tensors in ``exclude``,
    the network's weights, are left out).
    """
    store = pyro.get_param_store()
    out = {}
    for name in guide_param_names(guide, *example, exclude=exclude):
        value = store[name].unconstrained()
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value.detach())
            # Pyro's own conversion (PyroModule): the unconstrained tensor replaced in place.
            store._params[name] = value
            store._param_to_name[value] = name
        out[name] = value
    return out


class _ModelModule(nn.Module):
    """:class:`~pyro_sbp.models.SBPModel` as an ``nn.Module`` over its network."""

    def __init__(self, model):
        super().__init__()
        self.net = model.net
        self._model = model

    def forward(self, *args, **kwargs):
        return self._model(*args, **kwargs)


class _GuideModule(nn.Module):
    """:class:`~pyro_sbp.guides.SBPGuide` as an ``nn.Module`` over the gates' parameters."""

    def __init__(self, guide, example=(), exclude=()):
        super().__init__()
        self._guide = guide
        self._store_names = {}
        store = pyro.get_param_store()
        for name, param in gate_parameters(guide, *example, exclude=exclude).items():
            # Module attribute names may not hold dots; the store's names keep theirs.
            self.register_parameter(name.replace(".", ":"), param)
            self._store_names[name.replace(".", ":")] = (name, store._constraints[name])

    def link(self) -> None:
        """Put this module's parameters (back) into Pyro's parameter store, where the guide
        reads them: a copy of the module (pickled to another process, deep-copied) has
        parameters of its own, which the store does not hold until then."""
        store = pyro.get_param_store()
        for key, (name, constraint) in self._store_names.items():
            param = self._parameters[key]
            if name not in store or store[name].unconstrained() is not param:
                store._params[name] = param
                store._param_to_name[param] = name
                store._constraints[name] = constraint

    def forward(self, *args, **kwargs):
        self.link()
        return self._guide(*args, **kwargs)

    def __getstate__(self):
        _drop_weakrefs(self.parameters())
        return super().__getstate__()


def _drop_weakrefs(params) -> None:
    # Pyro's store tags the tensors it hands out with a weak reference (`.unconstrained`),
    # which cannot be pickled; it removes them from its own state the same way.
    for param in params:
        param.__dict__.pop("unconstrained", None)


def elbo_module(elbo, model, guide, *example) -> nn.Module:
    """``elbo(model, guide)``: Pyro's :class:`~pyro.infer.elbo.ELBOModule`, whose call is the
    differentiable negative ELBO and whose parameters are the network's weights and the
    guide's variational parameters (see :func:`gate_parameters`, which takes ``example``)."""
    exclude = tuple(model.net.parameters())
    return elbo(_ModelModule(model), _GuideModule(guide, example, exclude))


class ShardSampler(DistributedSampler):
    """:class:`~torch.utils.data.DistributedSampler`'s shards of a shuffle drawn as the
    single-process trainer's :class:`~torch.utils.data.RandomSampler` draws it.

    Every rank draws the epoch's permutation from ``generator`` (seeded with the run's seed,
    the same on every rank, and checkpointed as the single-process run's is), pads it to a
    multiple of ``num_replicas`` by repeating its head, and keeps every ``num_replicas``-th
    position from its rank, as ``DistributedSampler`` does. So step ``k`` of ``W`` ranks with
    per-rank batch ``B`` reads positions ``[k W B, (k + 1) W B)`` of the permutation that a
    single process with batch ``W B`` reads at its step ``k``.

    ``start`` skips the first ``start`` positions of the permutation (examples already read in
    the epoch, by a run of another number of processes) before the rest is sharded.
    """

    def __init__(
        self, dataset, num_replicas: int, rank: int, generator: torch.Generator, start: int = 0
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True)
        self.generator = generator
        self.start = int(start)

    def _remaining(self) -> int:
        return max(len(self.dataset) - self.start, 0)

    def __iter__(self):
        order = list(RandomSampler(self.dataset, generator=self.generator))[self.start :]
        if not order:
            return iter([])
        total = math.ceil(len(order) / self.num_replicas) * self.num_replicas
        order += (order * math.ceil(total / len(order)))[: total - len(order)]
        return iter(order[self.rank : total : self.num_replicas])

    def __len__(self) -> int:
        return math.ceil(self._remaining() / self.num_replicas)


def _shard_loader(dataset, indices, batch_size: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=BatchSampler(indices, batch_size=batch_size, drop_last=False),
        collate_fn=_as_tuple,
        generator=torch.Generator().manual_seed(seed),
    )


def _collective_failure(e: BaseException) -> bool:
    """Whether ``e`` is the failure of a collective: torch's ``DistError``, or the plain
    ``RuntimeError`` that gloo raises (a peer closed the connection, a timeout) from a
    collective of ``torch.distributed`` or DDP."""
    if isinstance(e, dist.DistError):
        return True
    frames = traceback.extract_tb(e.__traceback__)
    where = frames[-1].filename.replace(os.sep, "/") if frames else ""
    inside = "torch/distributed/" in where or "torch/nn/parallel/" in where
    return inside or any(word in str(e) for word in ("gloo", "NCCL", "ProcessGroup"))


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


class DistributedTrainer(Trainer):
    r""":class:`~pyro_sbp.infer.Trainer` on one of the processes of a ``torchrun`` launch.

    Each rank trains on its shard of the training set (:class:`ShardSampler`, batch
    ``config.batch_size`` per rank), with the model and guide parameters synchronised by
    DDP's gradient all-reduce (see the module's docstring: the steps are those of one process
    with batch :math:`W B`). The losses are averaged and the validation accuracy counted over
    all the ranks; pruning masks are computed on rank 0 and broadcast; only rank 0 locks and
    writes the run directory (checkpoints, history), with the random state of every rank.
    Rank 0 draws the noise of the single-process run; rank ``r`` draws its own, from a seed
    derived from the run's seed and ``r``. A stop signal on any rank stops all of them after
    the same step.

    A failing rank stops the run: its error propagates, and, when this module created the
    process group, the group is destroyed, so that the other ranks' collectives fail at once
    (:class:`DistributedRunFailed`) rather than waiting; a rank that stops answering
    makes them fail after the process group's timeout.

    A run resumes on the same number of processes exactly (each rank's random state
    restored), or on another, which it says: the per-rank batch stays ``config.batch_size``
    (the global batch changes), and an epoch stopped half-way is continued with its remaining
    examples sharded over the new ranks. With ``resume=True`` rank 0 reads the checkpoint and
    sends it to the others (no shared file system is needed); :meth:`~Trainer.from_run` (the
    command line's) reads it on every rank first, for the run's settings.

    :param context: from :func:`init_distributed` (called with ``config.device`` if left out).
    :param timeout: the process group's timeout in seconds, when it is created here.
    """

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        *,
        resume: bool = False,
        progress: bool = True,
        splits: DataSplits | None = None,
        context: DistributedContext | None = None,
        timeout: float | None = None,
        _checkpoint: dict | None = None,
    ):
        self.context = context or init_distributed(config.device, timeout)
        #: The number of processes of the run this one resumed, when it differs.
        self.resumed_world_size: int | None = None
        #: Examples of the current epoch read before the last resumption on another number of
        #: processes (the sampler skips them).
        self._epoch_offset = 0
        self._rank_rng_states: list | None = None
        self._signal_synced = False
        if resume:
            _checkpoint = self._broadcast_checkpoint(out_dir, _checkpoint)
        try:
            super().__init__(
                config,
                out_dir,
                resume=resume,
                progress=progress and self.context.is_main,
                splits=splits,
                _checkpoint=_checkpoint,
            )
            if self.device.type == "cuda":
                self.device = torch.device("cuda", torch.cuda.current_device())
            if self.context.rank > 0 and not resume:
                # After the initialisation (the same on every rank; DDP broadcasts rank 0's
                # anyway): the noise of rank r is its own.
                pyro.set_rng_seed(_rank_seed(self.config.seed, self.context.rank))
            ids = [self.device.index] if self.device.type == "cuda" else None
            x, y = (t[:2].to(self.device) for t in self.splits.train.tensors)
            example = (x, y, torch.arange(len(y), device=self.device), 1.0)
            self.elbo_module = elbo_module(self.elbo, self.model, self.guide, *example)
            # The store's gate parameters are Parameters now (new tensors, same values): the
            # optimiser is built again over the module's parameters, its state carried over
            # by name (that of the checkpoint when resuming).
            self.optim = self._build_optimizer(self.optim_state())
            self.ddp_elbo = DistributedDataParallel(self.elbo_module, device_ids=ids)
            self.ddp_net = DistributedDataParallel(self.net, device_ids=ids)
        except BaseException:
            self._abort()
            raise

    # --- collectives ---------------------------------------------------------------------

    def _comm_device(self) -> torch.device:
        return self.device if self.context.backend == "nccl" else torch.device("cpu")

    def _all_gather(self, values: list[float]) -> torch.Tensor:
        """``(world_size, len(values))``: every rank's values, in float64."""
        local = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        out = [torch.empty_like(local) for _ in range(self.context.world_size)]
        dist.all_gather(out, local)
        return torch.stack(out).cpu()

    def _signum(self) -> int:
        return 0 if self._stop is None or self._stop.signum is None else int(self._stop.signum)

    def _adopt_signal(self, signums: torch.Tensor) -> None:
        """Stop after this step if any rank was signalled (with the first rank's signal)."""
        self._signal_synced = True
        raised = [int(s) for s in signums if s > 0]
        if raised and self._stop is not None and self._stop.signum is None:
            self._stop.signum = signal.Signals(raised[0])

    def _stop_if_signalled(self, saved: bool = True) -> None:
        if self._stop is not None and not self._signal_synced:
            self._adopt_signal(self._all_gather([self._signum()])[:, 0])
        self._signal_synced = False
        super()._stop_if_signalled(saved)

    @staticmethod
    def _broadcast_checkpoint(out_dir, checkpoint: dict | None) -> dict:
        """Rank 0's checkpoint on every rank (or rank 0's error loading it, on every rank)."""
        box: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                if out_dir is None:
                    raise ValueError("resume=True needs the run directory")
                box[0] = checkpoint or load_checkpoint(Path(out_dir) / CHECKPOINT_NAME)
            except Exception as e:
                box[0] = e
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _abort(self) -> None:
        """Make the other ranks' collectives fail now rather than after the timeout."""
        if self.context.owned:
            _destroy_process_group()

    # --- the hooks of Trainer --------------------------------------------------------------

    def _make_loaders(self) -> dict:
        c, ctx = self.config, self.context
        loaders = super()._make_loaders()
        dataset = loaders["train"].dataset
        sampler = ShardSampler(
            dataset,
            ctx.world_size,
            ctx.rank,
            torch.Generator().manual_seed(int(c.seed)),
        )
        loaders["train"] = DataLoader(
            dataset,
            batch_size=None,
            sampler=BatchSampler(sampler, batch_size=c.batch_size, drop_last=False),
            collate_fn=_as_tuple,
            generator=torch.Generator().manual_seed(int(c.seed)),
        )
        for key in ("val", "test"):
            if key in loaders:
                data = loaders[key].dataset
                shard = list(range(ctx.rank, len(data), ctx.world_size))
                loaders[key] = _shard_loader(data, shard, c.batch_size, int(c.seed))
        return loaders

    def _run_lock(self):
        return super()._run_lock() if self.context.is_main else contextlib.nullcontext()

    def _remove_partial_writes(self) -> None:
        if self.context.is_main:
            super()._remove_partial_writes()

    def _evaluate(self) -> float:
        """The validation accuracy of all the ranks' shards together, with rank 0's buffers
        (batch-norm statistics, which each rank updates with its own batches, as DDP leaves
        them) on every rank: the network that the checkpoint holds."""
        for buffer in self.net.buffers():
            value = buffer.to(self._comm_device())
            dist.broadcast(value, src=0)
            buffer.copy_(value)
        loader = self._eval_loader()
        n = len(loader.sampler.sampler)
        acc = evaluate(self.net, loader, self.device)
        counts = self._all_gather([round(acc * n), n]).sum(0)
        return float(counts[0] / max(counts[1], 1))

    def _pretrain_step(self, epoch: int, x, y) -> tuple[float, float]:
        loss = F.cross_entropy(self.ddp_net(x), y)
        loss.backward()
        gathered = self._all_gather([loss.item() * len(y), len(y), self._signum()])
        self._adopt_signal(gathered[:, 2])
        total, count = gathered[:, :2].sum(0).tolist()
        if not math.isfinite(total):
            self.pretrain_optim.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite cross-entropy in pretraining epoch {epoch + 1}, "
                f"step {self.global_step}"
            )
        self.pretrain_optim.step()
        self.pretrain_optim.zero_grad(set_to_none=True)
        return total, count

    def _optim_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The parameters of the ELBO module that DDP wraps, by their names in Pyro's store
        (before the module exists, during :class:`Trainer`'s construction: the trainer's)."""
        module = getattr(self, "elbo_module", None)
        if module is None:
            return super()._optim_parameters()
        guide = module.guide
        out = [(name, p) for name, p in module.model.net.named_parameters()]
        out += [(guide._store_names[key][0], p) for key, p in guide.named_parameters()]
        return out

    def _step(self, epoch, x, y, idx, beta) -> float:
        """One SVI step on every rank: the rank's minibatch ELBO through DDP (whose backward
        averages the gradients), the ranks' losses averaged, checked and then the step of the
        torch optimiser (the same on every rank); the gradients are cleared (``None``) after."""
        try:
            loss = self.ddp_elbo(x, y, idx, beta)
        except ValueError as e:
            if all(torch.isfinite(v).all() for v in pyro.get_param_store().values()):
                raise
            raise NonFiniteLossError(self._diagnose(epoch, x, y, idx, beta, math.nan)) from e
        loss.backward()
        gathered = self._all_gather([loss.item(), self._signum()])
        self._adopt_signal(gathered[:, 1])
        mean = float(gathered[:, 0].mean())
        if not math.isfinite(mean):
            self.optim.zero_grad(set_to_none=True)
            local = float(gathered[self.context.rank, 0])
            raise NonFiniteLossError(self._diagnose(epoch, x, y, idx, beta, local))
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        return mean

    def _prune(self) -> None:
        """Masks computed on rank 0 (as a single process would) and broadcast to every rank."""
        if self.context.is_main:
            super()._prune()
        # The pruning method's masks where it says which they are, else the gates'.
        method = getattr(self, "method", None)
        try:
            masks = method.current_masks(self.net)
        except (AttributeError, NotImplementedError):
            method, masks = None, {site: gate.mask for site, gate in named_gates(self.net)}
        masks = {site: mask.to(self._comm_device()) for site, mask in masks.items()}
        for site in sorted(masks):
            dist.broadcast(masks[site], src=0)
        if method is None:
            for site, gate in named_gates(self.net):
                gate.mask.copy_(masks[site])
        else:
            method.apply_masks(self.net, masks)

    def _start_epoch(self, phase: str, epoch: int):
        progress = self._progress
        started = super()._start_epoch(phase, epoch)
        if started is not progress:
            self._epoch_offset = 0
            self.loaders["train"].sampler.sampler.start = 0
        return started

    # --- checkpoints ---------------------------------------------------------------------

    def save(self) -> None:
        """Rank 0 writes the checkpoint and history, with every rank's random state (every
        rank takes part: the states are gathered)."""
        if self.out_dir is None:
            return
        states: list | None = [None] * self.context.world_size if self.context.is_main else None
        dist.gather_object(get_plain_rng_state(), states, dst=0)
        if self.context.is_main:
            self._rank_rng_states = states
            super().save()

    def state(self) -> dict[str, Any]:
        state = super().state()
        state["distributed"] = {
            "world_size": self.context.world_size,
            "backend": self.context.backend,
            "epoch_offset": self._epoch_offset,
            "rank_rng_states": self._rank_rng_states or [get_plain_rng_state()],
        }
        return state

    def _check_world_size(self, ckpt: dict) -> None:
        pass

    def _restore(self, ckpt: dict) -> None:
        super()._restore(ckpt)
        stored = ckpt.get("distributed") or {"world_size": 1, "epoch_offset": 0}
        old, new, rank = stored["world_size"], self.context.world_size, self.context.rank
        states = stored.get("rank_rng_states") or [ckpt["rng_state"]]
        if rank < len(states):
            set_plain_rng_state(states[rank])
        else:
            pyro.set_rng_seed(_rank_seed(self.config.seed, rank, self.global_step))
        self._epoch_offset = stored.get("epoch_offset", 0)
        if old == new:
            self._start_sampler_at(self._epoch_offset)
            return
        self.resumed_world_size = old
        p = self._progress
        read = 0
        if p is not None:
            read = self._epoch_offset + p.batches_done * self.config.batch_size * old
        note = (
            f"resuming a run of {old} process{'es' if old > 1 else ''} on {new}: the per-rank "
            f"batch stays {self.config.batch_size} (the global batch goes from "
            f"{old * self.config.batch_size} to {new * self.config.batch_size})"
        )
        if p is not None:
            read = min(read, self.splits.num_train)
            note += (
                f"; {p.phase} epoch {p.epoch + 1} continues with its "
                f"{self.splits.num_train - read} examples not yet read, sharded over {new}"
            )
            p.batches_done = 0
            self._epoch_offset = read
            self._start_sampler_at(read)
        if self.context.is_main:
            print(f"pyro-sbp: {note}", file=sys.stderr)

    def _start_sampler_at(self, start: int) -> None:
        self.loaders["train"].sampler.sampler.start = start

    # --- training ------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        """:meth:`Trainer.fit` on every rank.

        :raises DistributedRunFailed: when a collective fails (another rank failed or the
            process group timed out).
        """
        try:
            return super().fit()
        except RuntimeError as e:
            self._abort()
            if not _collective_failure(e):
                raise
            raise DistributedRunFailed(
                f"rank {self.context.rank} of {self.context.world_size}: a collective "
                "operation failed (another rank failed, see its error, or stopped answering "
                f"within the timeout): {e}"
            ) from e
        except BaseException:
            self._abort()
            raise
