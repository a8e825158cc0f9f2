r"""SVI of a gated network as a PyTorch Lightning module (the optional ``lightning`` extra:
``pip install 'pyro-sbp[lightning]'``).

For users whose training loop is Lightning's: :class:`SBPLightningModule`'s loss is the
negative ELBO of :class:`~pyro_sbp.infer.CompactMeanField_ELBO` (the trainer's), as Pyro's
:class:`~pyro.infer.elbo.ELBOModule` over the network's weights and the gates' variational
parameters, which are module parameters (:func:`~pyro_sbp.infer.distributed.gate_parameters`),
so Lightning's strategies (DDP and the others), mixed precision, logging and checkpointing
apply to them as to any module's. The weights and the gates get their learning rates as two
parameter groups of one Adam; the KL warm-up (:class:`KLWarmup`) and pruning during training
(:class:`PruneEveryEpoch`) are callbacks.

The training batches must be ``(x, y, idx)``, ``idx`` the examples' positions in the training
set of ``num_data`` (e.g. a ``DataLoader`` over ``TensorDataset(x, y, torch.arange(N))``, whose
sampler Lightning shards under DDP): the data plate scales each batch's likelihood to the
whole set, and DDP's gradient average over the ranks is the gradient of the ELBO estimate of
the ranks' batches together (see :mod:`pyro_sbp.infer.distributed`). Validation batches are
``(x, y, ...)``; the accuracy is that of the network in evaluation mode (the gates at their
posterior means).
"""

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised where the extra is not installed
    raise ImportError(
        "pyro_sbp.infer.lightning needs PyTorch Lightning: pip install 'pyro-sbp[lightning]'"
    ) from e

from pyro_sbp.guides import SBPGuide
from pyro_sbp.infer.compact_elbo import CompactMeanField_ELBO
from pyro_sbp.infer.distributed import _drop_weakrefs, elbo_module
from pyro_sbp.models import SBPModel, named_gates

__all__ = ["KLWarmup", "PruneEveryEpoch", "SBPLightningModule"]


class SBPLightningModule(pl.LightningModule):
    r"""SVI of a gated network's weights and gate posteriors, as a ``LightningModule``.

    .. math::

        \mathcal L = -\frac{N}{B} \sum_{i \in \mathcal B}
            \mathbb E_q \log p(y_i \mid x_i, W, \theta)
            + c \sum_j \beta_j\, \mathrm{KL}\big(q(\theta_j) \,\|\, p(\theta_j)\big),

    the minibatch negative ELBO of :class:`~pyro_sbp.models.SBPModel` and
    :class:`~pyro_sbp.guides.SBPGuide` (:math:`\beta`: the KL weights; :math:`c`:
    :attr:`kl_factor`, which :class:`KLWarmup` ramps from 0 to 1).

    :param nn.Module net: a network made prunable (:func:`~pyro_sbp.models.make_prunable`),
        pretrained or not.
    :param int num_data: the size of the training set.
    :param float lr: Adam's learning rate of the weights.
    :param float gate_lr: Adam's learning rate of the gates' variational parameters.
    :param float beta1: Adam's first-moment decay (SBP uses 0.95).
    :param kl_weight: the KL weight :math:`\beta` (one number, or ``{site: beta}``).
    :param str noise: ``"example"`` or ``"batch"`` (see :class:`~pyro_sbp.models.SBPModel`).
    :param float init_log_scale: initial :math:`\log\sigma` of the gate posteriors.
    :param input_shape: the shape of one input, checked on every batch (optional).
    :param elbo: the ELBO (default :class:`~pyro_sbp.infer.CompactMeanField_ELBO`).
    """

    def __init__(
        self,
        net: nn.Module,
        num_data: int,
        *,
        lr: float = 1e-3,
        gate_lr: float = 1e-2,
        beta1: float = 0.95,
        kl_weight: float | Mapping[str, float] = 1.0,
        noise: str = "example",
        init_log_scale: float = -5.0,
        input_shape: Sequence[int] | None = None,
        elbo=None,
    ):
        super().__init__()
        for key, value in (("lr", lr), ("gate_lr", gate_lr)):
            if not value > 0:
                raise ValueError(f"{key} must be positive, got {value}")
        if not 0 <= beta1 < 1:
            raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
        self.net = net
        self.sbp_model = SBPModel(net, num_data, input_shape, kl_weight=kl_weight, noise=noise)
        self.guide = SBPGuide(net, num_data, init_log_scale=init_log_scale)
        self.loss_fn = elbo_module(elbo or CompactMeanField_ELBO(), self.sbp_model, self.guide)
        self.lr, self.gate_lr, self.beta1 = float(lr), float(gate_lr), float(beta1)
        #: The factor of every gate's KL weight in the loss (the KL warm-up's).
        self.kl_factor = 1.0

    def __getstate__(self):
        _drop_weakrefs(self.parameters())
        return super().__getstate__()

    def gate_parameters(self) -> list[nn.Parameter]:
        """The gates' variational parameters (this module's, in the guide's site order)."""
        return list(self.loss_fn.guide.parameters())

    def forward(self, x: Tensor) -> Tensor:
        """The network's logits (in evaluation mode, the gates at their posterior means)."""
        return self.net(x)

    def loss(self, x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
        """The minibatch negative ELBO (differentiable) of examples ``idx`` of the set."""
        return self.loss_fn(x, y, idx, self.kl_factor)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x, y, idx = batch
        loss = self.loss(x, y, idx)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        self.log("kl_factor", self.kl_factor, batch_size=len(y))
        return loss

    def link(self) -> None:
        """Make the guide read this module's gate parameters (see ``_GuideModule.link``; the
        loss does it on every call)."""
        self.loss_fn.guide.link()

    def on_validation_epoch_start(self) -> None:
        self.link()
        self.guide.update_gates()

    def validation_step(self, batch, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        accuracy = (self.net(x).argmax(-1) == y).float().mean()
        self.log("val_accuracy", accuracy, prog_bar=True, batch_size=len(y), sync_dist=True)
        return accuracy

    def configure_optimizers(self) -> torch.optim.Optimizer:
        gates = self.gate_parameters()
        ids = {id(p) for p in gates}
        weights = [p for p in self.net.parameters() if id(p) not in ids]
        return torch.optim.Adam(
            [
                {"params": weights, "lr": self.lr, "name": "weights"},
                {"params": gates, "lr": self.gate_lr, "name": "gates"},
            ],
            betas=(self.beta1, 0.999),
        )


class KLWarmup(pl.Callback):
    """The KL warm-up: in training epoch ``e`` (0-based) the KL weights are multiplied by
    ``min(1, (e + 1) / epochs)`` (the :class:`~pyro_sbp.infer.Trainer`'s ramp).

    :param int epochs: epochs over which the factor rises to 1.
    """

    def __init__(self, epochs: int):
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        self.epochs = int(epochs)

    def factor(self, epoch: int) -> float:
        return min(1.0, (epoch + 1) / self.epochs)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        pl_module.kl_factor = self.factor(trainer.current_epoch)


class PruneEveryEpoch(pl.Callback):
    """Pruning during training: after every training epoch, the masks of ``criterion``
    (:func:`~pyro_sbp.reduction.compute_masks`) are computed on the global-zero rank and
    broadcast to the others (every rank has the same masks). Lightning validates before
    ``on_train_epoch_end``, so an epoch's validation sees the previous epoch's masks.

    :param str criterion: e.g. ``"snr:1"``, ``"bmrs-n"``, ``"elbo"``.
    :param data: the training inputs and labels ``(x, y)``, which ``elbo`` needs.
    :param str masks: ``"cumulative"`` (a unit removed stays removed) or ``"fresh"``.
    """

    def __init__(self, criterion: str, data=None, masks: str = "cumulative"):
        from pyro_sbp.reduction import parse_criterion

        parse_criterion(criterion)
        if masks not in ("cumulative", "fresh"):
            raise ValueError(f"masks must be 'cumulative' or 'fresh', got {masks!r}")
        self.criterion, self.data, self.masks = criterion, data, masks

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        from pyro_sbp.reduction import apply_masks, compute_masks

        net, guide = pl_module.net, pl_module.guide
        pl_module.link()
        guide.update_gates()
        masks = None
        if trainer.is_global_zero:
            if self.masks == "fresh":
                apply_masks(net, {s: torch.ones_like(g.mask) for s, g in named_gates(net)})
            masks = compute_masks(net, guide, self.criterion, self.data).masks()
            masks = {site: keep.cpu() for site, keep in masks.items()}
        masks = trainer.strategy.broadcast(masks, src=0)
        apply_masks(net, masks)
