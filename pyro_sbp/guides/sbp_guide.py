import math

import pyro
import torch
from pyro import poutine
from pyro.nn import PyroModule
from pyro.poutine.trace_messenger import TraceMessenger
from torch import Tensor, nn

from pyro_sbp.distributions import TruncatedLogNormal
from pyro_sbp.models.prunable import named_gates
from pyro_sbp.models.sbp_model import data_indices


def _site_recorded(name: str) -> bool:
    for messenger in pyro.poutine.runtime._PYRO_STACK:
        if isinstance(messenger, TraceMessenger) and name in messenger.trace.nodes:
            return True
    return False


def _data_plate(num_data: int, idx: Tensor) -> pyro.plate:
    """The data plate; when an enclosing guide (``AutoGuideList``) has already recorded the
    plate's subsample site, a second one is created without recording it again."""
    if _site_recorded("data"):
        with poutine.block(hide=["data"]):
            return pyro.plate("data", num_data, subsample=idx)
    return pyro.plate("data", num_data, subsample=idx)


#: How far outside the gate's bounds (on log theta) a posterior's loc may go.
LOC_MARGIN = 20.0
#: The range of a posterior's log scale (on log theta): scale in [1e-6, 1e3].
LOG_SCALE_MIN = math.log(1e-6)
LOG_SCALE_MAX = math.log(1e3)


class SBPGuide(PyroModule):
    r"""The mean-field guide of a gated network: a truncated log-normal per gate.

    .. math::

        q(\theta_j) = \mathrm{LogN}_{[a,b]}(\mu_j, \sigma_j^2), \qquad
        \mu_j = \texttt{<site>.loc}, \quad \log\sigma_j = \texttt{<site>.log\_scale},

    initialised at :math:`\mu = 0`, :math:`\log\sigma = -5` (SBP's values). It samples every gate
    site of the network in module order, inside the same data plate and with the same KL scale
    as :class:`~pyro_sbp.models.SBPModel` (the gates' KL weights included), from the
    distribution whose KL to the prior is
    registered in closed form, so :class:`~pyro.infer.TraceMeanField_ELBO` computes the KL term
    exactly. Weights are not latent: they are the network's own Pyro parameters.

    The parameters are kept in a box, projected onto it (in place, without gradient) each time
    the guide reads them: :math:`\mu \in [a - 20, b + 20]` and
    :math:`\sigma \in [10^{-6}, 10^{3}]` on :math:`\log\theta`, the domain on which the
    distributions' values and gradients are verified. Inside it the optimisation is untouched;
    without it a gate pinned at a bound (:math:`\mu \gg b`, :math:`\sigma \to 0`, a fully
    certain unit) can drift on to where the float32 KL is no longer finite (an SVI run at gate
    learning rate 0.5 reached :math:`\mu = 26.8`, :math:`\sigma = 4\cdot 10^{-12}`, then NaN).
    Nothing is lost: at :math:`\sigma = 10^{-6}` a gate is known to a relative :math:`10^{-6}`,
    and at :math:`\sigma = 10^3` the density of :math:`\log\theta` varies by
    :math:`2\cdot 10^{-4}` over SBP's bounds.

    It composes with guides for other latent sites, e.g.
    ``AutoGuideList(model)`` with this guide and an ``AutoNormal`` of the model with the gate
    sites blocked.

    **References**

    [1] Neklyudov, Molchanov, Ashukha, Vetrov, *Structured Bayesian Pruning via Log-Normal
        Multiplicative Noise*, NeurIPS 2017 (Section 4).

    :param nn.Module net: the network made prunable with :func:`~pyro_sbp.models.make_prunable`.
    :param int num_data: the size of the training set (as given to the model).
    :param float init_loc: initial :math:`\mu` of every gate.
    :param float init_log_scale: initial :math:`\log\sigma` of every gate.
    """

    def __init__(
        self,
        net: nn.Module,
        num_data: int,
        init_loc: float = 0.0,
        init_log_scale: float = -5.0,
    ):
        super().__init__(name="")
        gates = list(named_gates(net))
        if not gates:
            raise ValueError("the network has no gates: call make_prunable on it first")
        # Held in a plain list so that the network is not a submodule of the guide.
        self._gates = gates
        self.num_data = int(num_data)
        self.init_loc = float(init_loc)
        self.init_log_scale = float(init_log_scale)

    @property
    def site_names(self) -> list[str]:
        return [name for name, _ in self._gates]

    def params(self, site: str) -> tuple[Tensor, Tensor]:
        """``(loc, log_scale)`` of a gate site's posterior (created on first use)."""
        gate = dict(self._gates)[site]
        n = gate.num_units
        ref = gate.mask
        loc = pyro.param(f"{site}.loc", lambda: torch.full((n,), self.init_loc).to(ref))
        log_scale = pyro.param(
            f"{site}.log_scale", lambda: torch.full((n,), self.init_log_scale).to(ref)
        )
        # Projected onto the box (see the class docstring); a no-op inside it.
        a, b = math.log(gate.low), math.log(gate.high)
        with torch.no_grad():
            loc.clamp_(a - LOC_MARGIN, b + LOC_MARGIN)
            log_scale.clamp_(LOG_SCALE_MIN, LOG_SCALE_MAX)
        return loc, log_scale

    def posterior(self, site: str) -> TruncatedLogNormal:
        """The posterior :math:`q(\\theta)` of one gate site (batch shape ``(num_units,)``)."""
        gate = dict(self._gates)[site]
        loc, log_scale = self.params(site)
        # Its arguments are valid by construction (the gate checked its bounds, the box holds
        # the parameters), so validation's checks of them, a dozen tensor operations and host
        # reads per site and step, are skipped; a nan parameter shows as a non-finite loss.
        return TruncatedLogNormal(loc, log_scale.exp(), gate.low, gate.high, validate_args=False)

    def posteriors(self) -> dict[str, TruncatedLogNormal]:
        return {site: self.posterior(site) for site in self.site_names}

    def forward(
        self, x: Tensor, y: Tensor | None = None, idx: Tensor | None = None, kl_weight: float = 1.0
    ) -> dict[str, Tensor]:
        idx = data_indices(x, idx, self.num_data)
        out = {}
        # The gate's KL weight and noise mode, as the model has its site (SBPModel's).
        for site, gate in self._gates:
            if gate.noise == "batch":
                with poutine.scale(scale=kl_weight * gate.kl_weight):
                    out[site] = pyro.sample(site, self.posterior(site).to_event(1))
        with _data_plate(self.num_data, idx):
            for site, gate in self._gates:
                if gate.noise != "batch":
                    with poutine.scale(scale=kl_weight * gate.kl_weight / self.num_data):
                        out[site] = pyro.sample(site, self.posterior(site).to_event(1))
        return out

    @torch.no_grad()
    def update_gates(self) -> None:
        """Copy :math:`\\mathbb E_q[\\theta]` into every gate's ``theta_mean`` (for evaluation)."""
        for site, gate in self._gates:
            gate.theta_mean.copy_(self.posterior(site).mean.detach())

    @torch.no_grad()
    def snr(self) -> dict[str, Tensor]:
        """Signal-to-noise ratio :math:`\\mathbb E[\\theta] / \\sqrt{\\mathrm{Var}[\\theta]}`
        of every unit, by gate site."""
        out = {}
        for site in self.site_names:
            q = self.posterior(site)
            out[site] = q.mean / q.variance.sqrt().clamp(min=math.ulp(0.0))
        return out
