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


class SBPModel:
    r"""The Pyro model of a gated classifier: a categorical likelihood on the network's logits.

    .. math::

        p(y, \theta \mid x, W) = \prod_j \mathrm{LogU}_{[a,b]}(\theta_j)
            \prod_{i=1}^N \mathrm{Cat}\big(y_i \mid f_W(x_i; \theta)\big).

    Call it as ``model(x, y, idx)`` with a minibatch and the positions ``idx`` of its examples in
    the training set of ``num_data`` examples: the likelihood sits in
    ``pyro.plate("data", num_data, subsample=idx)``, so the minibatch ELBO is an unbiased
    estimate of the full one. The gates sample inside the plate (noise per example) with their
    KL scaled by ``kl_weight / num_data`` (see :class:`~pyro_sbp.models.SBPGate`): with
    ``kl_weight = 1`` every unit's KL counts exactly once, and a KL warm-up ramps
    ``kl_weight`` from 0 to 1. ``idx`` may be left out when the batch is the whole data set.

    :param nn.Module net: a network made prunable with :func:`make_prunable`.
    :param int num_data: the size of the training set.
    :param input_shape: the shape of one input, checked on every call (optional).
    """

    def __init__(self, net: nn.Module, num_data: int, input_shape: tuple[int, ...] | None = None):
        if num_data < 1:
            raise ValueError(f"num_data must be positive, got {num_data}")
        self.net = net
        self.num_data = int(num_data)
        self.input_shape = None if input_shape is None else tuple(input_shape)

    def __call__(
        self, x: Tensor, y: Tensor | None = None, idx: Tensor | None = None, kl_weight: float = 1.0
    ) -> Tensor:
        check_input(x, self.input_shape)
        idx = data_indices(x, idx, self.num_data)
        for _, gate in named_gates(self.net):
            gate.kl_scale = kl_weight / self.num_data
        with pyro.plate("data", self.num_data, subsample=idx):
            logits = self.net(x)
            pyro.sample("obs", dist.Categorical(logits=logits), obs=y)
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
