import math

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import Tensor

from pyro_sbp.distributions import TruncatedLogUniform

#: SBP's default bounds on theta: [e^-20, 1].
DEFAULT_LOW = math.exp(-20.0)
DEFAULT_HIGH = 1.0


class SBPGate(PyroModule):
    r"""A multiplicative noise gate :math:`\theta_j` on each unit ``j`` (dim 1) of a layer.

    In a Pyro model (training mode) each call samples the site named after the gate (for
    example ``"features.0.gate"``) from the prior

    .. math::

        \theta_j \sim \mathrm{LogU}_{[a, b]}, \qquad a = \log \mathrm{low},\ b = \log \mathrm{high},

    once *per example*: inside the model's data plate the site has shape
    ``(batch, num_units)``. Its log-density (and, with the matching guide, its KL) is scaled by
    ``kl_scale``, which :class:`~pyro_sbp.models.SBPModel` sets to ``kl_weight / N`` for a data
    set of ``N`` examples (``kl_weight``: the gate's KL weight :math:`\beta`, 1 for the ELBO,
    which :class:`~pyro_sbp.guides.SBPGuide` reads too). The plate's ``N / batch`` subsampling
    scale times ``1 / N`` times the ``batch`` identical per-example KLs is exactly one KL per
    unit (times its weight), while every example sees its
    own draw of the noise. Since each draw is marginally from the posterior, the expected
    objective is the ELBO of the model with one global :math:`\theta` per unit; the per-example
    draws only lower the variance of its gradient (as in SBP's implementation, and as the local
    reparameterisation trick does for weights).

    In evaluation mode (``gate.eval()``) the gate multiplies by ``theta_mean``, the posterior
    mean :math:`\mathbb E_q[\theta]` that :meth:`~pyro_sbp.guides.SBPGuide.update_gates` copies
    from the guide. A keep-``mask`` makes removed units exactly zero in both modes; a gate with
    ``enabled = False`` only applies the mask (the deterministic pretraining phase).

    **References**

    [1] Neklyudov, Molchanov, Ashukha, Vetrov, *Structured Bayesian Pruning via Log-Normal
        Multiplicative Noise*, NeurIPS 2017 (Sections 4-5).

    :param int num_units: number of units (channels of a Conv2d, neurons of a Linear).
    :param float low: lower bound of theta (default :math:`e^{-20}`).
    :param float high: upper bound of theta (default 1).
    """

    def __init__(self, num_units: int, low: float = DEFAULT_LOW, high: float = DEFAULT_HIGH):
        super().__init__()
        if num_units < 1:
            raise ValueError(f"a gate needs at least one unit, got num_units={num_units}")
        if not 0 < low < high:
            raise ValueError(f"gate bounds must satisfy 0 < low < high, got {low}, {high}")
        self.num_units = int(num_units)
        self.low = float(low)
        self.high = float(high)
        self.kl_scale = 1.0
        # The KL weight beta of this gate's site (set by SBPModel; 1 is the exact ELBO).
        self.kl_weight = 1.0
        # "example": theta drawn per example, inside the data plate; "batch": one draw per
        # minibatch, taken by SBPModel before the plate and held here for the forward pass.
        self.noise = "example"
        self._theta: Tensor | None = None
        self.enabled = True
        # Set by make_prunable: whether the gate acts after a BatchNorm (else before the bias).
        self.after_norm = False
        self.register_buffer("mask", torch.ones(num_units))
        self.register_buffer("theta_mean", torch.ones(num_units))

    @property
    def site_name(self) -> str:
        """The name of the gate's sample site (the gate's path in the network)."""
        return self._pyro_name

    def prior(self) -> TruncatedLogUniform:
        r""":math:`\mathrm{LogU}_{[a, b]}` over the units, on the gate's device and dtype.

        Built once per device and dtype and reused (it is a constant of the gate): a training
        step then makes no tensor operation for it but the plate's ``expand``. Its bounds were
        checked when the gate was made, so it skips the argument checks that validation would
        repeat at every step."""
        key = (self.mask.device, self.mask.dtype)
        cached = self.__dict__.get("_prior")
        if cached is None or cached[0] != key or cached[1] != (self.low, self.high):
            low = self.mask.new_tensor(self.low)
            high = self.mask.new_tensor(self.high)
            prior = TruncatedLogUniform(low, high, validate_args=False).expand([self.num_units])
            cached = (key, (self.low, self.high), prior)
            self.__dict__["_prior"] = cached
        return cached[2]

    def sample_theta(self) -> Tensor:
        with poutine.scale(scale=self.kl_scale):
            return pyro.sample(self.site_name, self.prior().to_event(1))

    def theta(self) -> Tensor:
        """The gate's current value times its mask: a draw of theta (training; one per example
        in the data plate), ``theta_mean`` (evaluation), or the mask alone (disabled)."""
        if not self.enabled:
            return self.mask
        if not self.training:
            theta = self.theta_mean
        elif self._theta is not None:
            theta = self._theta
        else:
            theta = self.sample_theta()
        return theta * self.mask

    def forward(self, x: Tensor | None = None) -> Tensor:
        """``x`` gated on dim 1; without ``x``, the gate's value :meth:`theta` (a traced
        network's gate node, whose value every point where the gate acts shares)."""
        if x is None:
            return self.theta()
        if x.dim() < 2 or x.shape[1] != self.num_units:
            raise ValueError(
                f"gate {self.site_name!r} expects {self.num_units} units on dim 1, "
                f"got input of shape {tuple(x.shape)}"
            )
        theta = self.theta()
        # Broadcast over the batch (theta may be per example) and any spatial dims.
        shape = (-1 if theta.dim() == 2 else 1, self.num_units) + (1,) * (x.dim() - 2)
        return x * theta.reshape(shape)

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}, low={self.low:.3g}, high={self.high:.3g}"
