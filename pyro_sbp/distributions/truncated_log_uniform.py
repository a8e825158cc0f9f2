import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import lazy_property

from pyro_sbp.distributions import _standard
from pyro_sbp.distributions._lazy import LazyExpand, broadcast
from pyro_sbp.distributions.truncated_log_normal import _clamp_straight_through
from pyro_sbp.distributions.truncated_normal import _check_bounds


class TruncatedLogUniform(LazyExpand, TorchDistribution):
    r"""The log-uniform distribution on ``[low, high]``: :math:`\log\theta \sim
    \mathrm{Uniform}(\log \mathrm{low}, \log \mathrm{high})`.

    .. math::

        p(\theta) = \frac{1}{\theta\,(b - a)}, \qquad
        a = \log \mathrm{low}, \quad b = \log \mathrm{high}.

    The prior of a multiplicative noise gate in Structured Bayesian Pruning
    (:math:`\mathrm{LogU}_{[a,b]}`, SBP's defaults :math:`a = -20`, :math:`b = 0`): the truncation
    makes the improper log-uniform prior proper, so the KL to the truncated log-normal
    posterior is finite.

    **References**

    [1] Neklyudov, Molchanov, Ashukha, Vetrov, *Structured Bayesian Pruning via Log-Normal
        Multiplicative Noise*, NeurIPS 2017 (Section 4).

    :param low: lower bound of :math:`\theta` (positive).
    :param high: upper bound of :math:`\theta` (greater than ``low``).
    """

    arg_constraints = {"low": constraints.positive, "high": constraints.positive}
    has_rsample = True
    _param_names = ("low", "high")
    _shared_cache = ("_compact", "_a", "_b", "_width", "_log_width")

    def __init__(self, low, high, *, validate_args=None):
        self.low, self.high = broadcast(low, high)
        super().__init__(self.low.shape, validate_args=validate_args)
        if self._validate_args:
            _check_bounds(self.low, self.high, type(self).__name__)

    def expand(self, batch_shape, _instance=None):
        # The expanded bounds are formed when first read (see TruncatedNormal.expand).
        new = self._get_checked_instance(TruncatedLogUniform, _instance)
        batch_shape = torch.Size(batch_shape)
        super(TruncatedLogUniform, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return self._lazy_expand(new, batch_shape)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(self.low, self.high)

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        u = torch.rand(shape, dtype=self.low.dtype, device=self.low.device)
        return self.icdf(u)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        low, high = self._compact
        inside = (value >= low) & (value <= high)
        return torch.where(inside, -value.log() - self._log_width, -math.inf)

    def cdf(self, value):
        if self._validate_args:
            self._validate_sample(value)
        x = value.clamp(min=torch.finfo(value.dtype).tiny).log()
        return ((x - self._a) / self._width).clamp(0.0, 1.0)

    def icdf(self, value):
        if self._validate_args and not ((value >= 0) & (value <= 1)).all():
            raise ValueError("icdf expects probabilities in [0, 1]")
        x = self._a + value * self._width
        return _clamp_straight_through(x.exp(), *self._compact)

    def entropy(self):
        # H(theta) = H(log theta) + E[log theta].
        return (self._log_width + 0.5 * (self._a + self._b)).expand(self.batch_shape)

    @property
    def mean(self):
        # (high - low) / (b - a) = low * expm1(w) / w.
        w = self._width
        return (self._compact[0] * torch.expm1(w) / w).expand(self.batch_shape)

    @property
    def variance(self):
        # Var = e^{2a} (expm1(2w)/(2w) - (expm1(w)/w)^2) = e^{2a + w} h(w) with the even function
        # h(w) = sinh(w)/w - (sinh(w/2)/(w/2))^2; its series avoids the cancellation at small w.
        w = self._width
        ws = w.clamp(min=1e-2)
        direct = torch.sinh(ws) / ws - (torch.sinh(0.5 * ws) / (0.5 * ws)).square()
        w2 = w.square()
        series = w2 * (1 / 12 + w2 * (1 / 180 + w2 * (1 / 6720 + w2 / 453600)))
        h = torch.where(w < 1e-2, series, direct)
        return (self._compact[0].square() * torch.exp(w) * h).expand(self.batch_shape)

    # Compact (see TruncatedNormal): once per distinct parameter, broadcastable.
    @lazy_property
    def _compact(self):
        source = self.expanded_from
        if source is not None:
            return source._compact
        return _standard.compact(self.batch_shape, self.low, self.high)

    @lazy_property
    def _a(self):
        return self._compact[0].log()

    @lazy_property
    def _b(self):
        return self._compact[1].log()

    @lazy_property
    def _width(self):
        return self._b - self._a

    @lazy_property
    def _log_width(self):
        return self._width.log()
