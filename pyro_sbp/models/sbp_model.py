import math
from collections.abc import Mapping

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_sbp.models.prunable import named_gates


def check_input(x: Tensor, input_shape: tuple[int, ...] | None) -> None:
    """Raise a ValueError naming the expected shape when ``x`` is not a batch of inputs."""
    if input_shape is None:
        return
    if x.dim() != len(input_shape) + 1 or tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(
            f"expected a batch of inputs of shape (batch, {', '.join(map(str, input_shape))}), "
            f"got {tuple(x.shape)}"
        )


#: How a gate's noise is drawn in training (:class:`SBPModel`'s ``noise``).
NOISE_MODES = ("example", "batch")


def check_kl_weight(value: object, what: str = "kl_weight") -> None:
    """ValueError unless ``value`` is a positive finite number (not a bool)."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive number, got {value!r}")


def set_kl_weight(net: nn.Module, kl_weight: float | Mapping[str, float]) -> dict[str, float]:
    """Give every gate of ``net`` its KL weight: one number for all, or ``{site: weight}``
    (sites left out keep 1). Returns the weights by site.

    :raises ValueError: for a weight that is not a positive finite number, or a site that is not
        a gate of ``net`` (the message lists them).
    """
    gates = dict(named_gates(net))
    if isinstance(kl_weight, Mapping):
        unknown = sorted(set(kl_weight) - set(gates))
        if unknown:
            raise ValueError(f"kl_weight for unknown gate sites {unknown}; gates: {list(gates)}")
        weights = {site: kl_weight.get(site, 1.0) for site in gates}
    else:
        weights = dict.fromkeys(gates, kl_weight)
    for site, w in weights.items():
        check_kl_weight(w, f"the KL weight of {site!r}")
        gates[site].kl_weight = float(w)
    return {site: float(w) for site, w in weights.items()}


class SBPModel:
    r"""The Pyro model of a gated classifier: a categorical likelihood on the network's logits.

    .. math::

        p(y, \theta \mid x, W) = \prod_j \mathrm{LogU}_{[a,b]}(\theta_j)
            \prod_{i=1}^N \mathrm{Cat}\big(y_i \mid f_W(x_i; \theta)\big).

    Call it as ``model(x, y, idx)`` with a minibatch and the positions ``idx`` of its examples in
    the training set of ``num_data`` examples: the likelihood sits in
    ``pyro.plate("data", num_data, subsample=idx)``, so the minibatch ELBO is an unbiased
    estimate of the full one. The gates sample inside the plate (noise per example) with their
    KL scaled by :math:`\beta / N` (see :class:`~pyro_sbp.models.SBPGate`), so that the loss is

    .. math::

        -\sum_{i=1}^N \mathbb E_q \log p(y_i \mid x_i, W, \theta)
            + \sum_j \beta_j\, \mathrm{KL}\big(q(\theta_j) \,\|\, p(\theta_j)\big).

    With :math:`\beta = 1` (the default) it is the negative ELBO, every unit's KL counting
    exactly once. A :math:`\beta > 1` is the lever between size and accuracy: it is
    :math:`\beta` times the negative ELBO of the likelihood tempered to the power
    :math:`1/\beta` (a data set counted :math:`N / \beta` times), so a unit must explain
    :math:`\beta` times as much of the data to be kept (``docs/math.md``, section 3). The
    call's own ``kl_weight`` multiplies the weights (the trainer's KL warm-up ramps it from 0
    to 1). ``idx`` may be left out when the batch is the whole data set.

    With ``noise="batch"`` each gate draws one :math:`\theta` per minibatch, shared by its
    examples (the BMRS code's choice), as a site outside the data plate whose KL is scaled by
    :math:`\beta` alone: the same objective in expectation, with a noisier gradient than the
    per-example draws of the default ``noise="example"`` (SBP's).

    :param nn.Module net: a network made prunable with :func:`make_prunable`.
    :param int num_data: the size of the training set.
    :param input_shape: the shape of one input, checked on every call (optional).
    :param kl_weight: :math:`\beta`, one for every gate or ``{site: beta}`` (sites left out
        get 1); stored on the gates, where :class:`~pyro_sbp.guides.SBPGuide` reads it too.
    :param str noise: ``"example"`` or ``"batch"``; stored on the gates, like ``kl_weight``.
    """

    def __init__(
        self,
        net: nn.Module,
        num_data: int,
        input_shape: tuple[int, ...] | None = None,
        kl_weight: float | Mapping[str, float] = 1.0,
        noise: str = "example",
    ):
        if num_data < 1:
            raise ValueError(f"num_data must be positive, got {num_data}")
        if noise not in NOISE_MODES:
            raise ValueError(f"noise must be one of {NOISE_MODES}, got {noise!r}")
        self.net = net
        self.num_data = int(num_data)
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.noise = noise
        set_kl_weight(net, kl_weight)
        for _, gate in named_gates(net):
            gate.noise = noise

    @property
    def kl_weights(self) -> dict[str, float]:
        """:math:`\beta` of every gate site."""
        return {site: gate.kl_weight for site, gate in named_gates(self.net)}

    def __call__(
        self, x: Tensor, y: Tensor | None = None, idx: Tensor | None = None, kl_weight: float = 1.0
    ) -> Tensor:
        check_input(x, self.input_shape)
        idx = data_indices(x, idx, self.num_data)
        gates = [gate for _, gate in named_gates(self.net)]
        per_batch = [g for g in gates if g.noise == "batch" and g.enabled and g.training]
        for gate in gates:
            # In the plate, N/B copies of 1/N each make one KL per unit; outside, one.
            per_example = gate.noise == "example"
            gate.kl_scale = kl_weight * gate.kl_weight / (self.num_data if per_example else 1)
        try:
            for gate in per_batch:
                gate._theta = gate.sample_theta()
            with pyro.plate("data", self.num_data, subsample=idx):
                logits = self.net(x)
                pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
        finally:
            for gate in per_batch:
                gate._theta = None
        return logits


def data_indices(x: Tensor, idx: Tensor | None, num_data: int) -> Tensor:
    if idx is None:
        if x.shape[0] != num_data:
            raise ValueError(
                f"a minibatch of {x.shape[0]} examples from a data set of {num_data} needs their "
                "positions `idx`, so that the ELBO is scaled to the data set"
            )
        return torch.arange(num_data, device=x.device)
    if idx.shape != (x.shape[0],):
        raise ValueError(f"idx must have shape ({x.shape[0]},), got {tuple(idx.shape)}")
    return idx
