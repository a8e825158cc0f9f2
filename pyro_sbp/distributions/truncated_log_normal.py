import math

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import lazy_property

from pyro_sbp import _native
from pyro_sbp.distributions import _standard
from pyro_sbp.distributions._lazy import LazyExpand, broadcast
from pyro_sbp.distributions.truncated_normal import TruncatedNormal, _check_bounds


def _clamp_straight_through(value: Tensor, low: Tensor, high: Tensor) -> Tensor:
    # exp(log(low)) can round one ulp below low; clamp the value but keep its gradient.
    clamped = torch.minimum(torch.maximum(value, low), high)
    return value + (clamped - value).detach()


class TruncatedLogNormal(LazyExpand, TorchDistribution):
    r"""A log-normal distribution truncated to ``[low, high]`` (``0 < low < high``):
    :math:`\log\theta \sim \mathcal N(\mu, \sigma^2)` truncated to ``[log low, log high]``.

    This is the variational posterior of a multiplicative noise gate in Structured Bayesian
    Pruning (:math:`\mathrm{LogN}_{[a,b]}(\mu, \sigma^2)` with :math:`a = \log` ``low``,
    :math:`b = \log` ``high``). Its moments are

    .. math::

        \mathbb E[\theta] = e^{\mu + \sigma^2/2}\,
            \frac{\Phi(\sigma - \alpha) - \Phi(\sigma - \beta)}{Z}, \qquad
        \operatorname{Var}[\theta] = \mathbb E[\theta]^2 \operatorname{expm1}(\kappa),

    with :math:`\kappa = K(2) - 2K(1)` the second difference of the cumulant generating function
    :math:`K` of :math:`\log\theta`. Both are computed from the scaled normalisers, with the
    quadratic terms cancelled analytically, so that they are accurate when :math:`Z` underflows;
    the variance is never formed as :math:`\mathbb E[\theta^2] - \mathbb E[\theta]^2`. Where
    :math:`\kappa` is so small that the second difference would lose its digits, it is taken as
    :math:`K''(1) = \sigma^2 \operatorname{Var}[\xi_1]` (the variance of the standardised
    truncated normal tilted by :math:`e^{x}`), whose relative error is at most about
    :math:`\kappa/2`.

    **References**

    [1] Neklyudov, Molchanov, Ashukha, Vetrov, *Structured Bayesian Pruning via Log-Normal
        Multiplicative Noise*, NeurIPS 2017 (Eq. 8-10).

    :param loc: mean of :math:`\log\theta` before truncation.
    :param scale: standard deviation of :math:`\log\theta` before truncation (positive).
    :param low: lower bound of :math:`\theta` (positive).
    :param high: upper bound of :math:`\theta` (greater than ``low``).
    """

    arg_constraints = {
        "loc": constraints.real,
        "scale": constraints.positive,
        "low": constraints.positive,
        "high": constraints.positive,
    }
    has_rsample = True
    _param_names = ("loc", "scale", "low", "high")
    # The cached statistics, all compact (broadcastable to any expansion of the batch shape).
    _shared_cache = (
        "_cbounds",
        "_shift",
        "_tilted",
        "_tilted_log_zhat",
        "_log_mean",
        "_kappa",
        "_native_moments",
    )

    def __init__(self, loc, scale, low, high, *, validate_args=None):
        self.loc, self.scale, self.low, self.high = broadcast(loc, scale, low, high)
        super().__init__(self.loc.shape, validate_args=validate_args)
        if self._validate_args:
            _check_bounds(self.low, self.high, type(self).__name__)

    def expand(self, batch_shape, _instance=None):
        # The expanded parameters are formed when first read (see TruncatedNormal.expand).
        new = self._get_checked_instance(TruncatedLogNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        super(TruncatedLogNormal, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return self._lazy_expand(new, batch_shape)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(self.low, self.high)

    def rsample(self, sample_shape=torch.Size()):
        return self.base_dist._rsample(sample_shape, exp_bounds=self._cbounds)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        base = self.base_dist
        low, high = self._cbounds
        inside = (value >= low) & (value <= high)
        # log(value) of a value inside [low, high] may round just outside [log low, log high].
        x = torch.minimum(torch.maximum(value.log(), base.low), base.high)
        return torch.where(inside, base._log_prob_inside(x) - x, -math.inf)

    def cdf(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return self.base_dist.cdf(value.clamp(min=torch.finfo(value.dtype).tiny).log())

    def icdf(self, value):
        if self._validate_args and not ((value >= 0) & (value <= 1)).all():
            raise ValueError("icdf expects probabilities in [0, 1]")
        return _clamp_straight_through(self.base_dist.icdf(value).exp(), *self._cbounds)

    def entropy(self):
        base = self.base_dist
        return base.entropy() + base.mean

    @property
    def mean(self):
        if self._native_moments_apply():
            return self._native_moments[0].expand(self.batch_shape)
        base = self.base_dist
        return torch.minimum(self._log_mean.exp(), base._chigh.exp()).expand(self.batch_shape)

    @property
    def mode(self):
        # argmax of the theta density exp(-(x - mu)^2 / 2 sigma^2 - x): x = mu - sigma^2.
        base = self.base_dist
        x = base._cloc - base._cscale.square()
        return (
            torch.minimum(torch.maximum(x, base._clow), base._chigh).exp().expand(self.batch_shape)
        )

    @property
    def variance(self):
        if self._native_moments_apply():
            return self._native_moments[1].expand(self.batch_shape)
        return (self._log_mean.mul(2).exp() * torch.expm1(self._kappa)).expand(self.batch_shape)

    @property
    def stddev(self):
        return (self._log_mean.exp() * torch.expm1(self._kappa).sqrt()).expand(self.batch_shape)

    def _native_moments_apply(self) -> bool:
        # The kernel gives values only: with a gradient to take, the PyTorch operators.
        params = (self.loc, self.scale, self.low, self.high)
        if torch.is_grad_enabled() and any(t.requires_grad for t in params):
            return False
        return _native.usable(*params)

    @lazy_property
    def _native_moments(self):
        # (mean, variance), compact, by the native kernel in one call: the same formulas as
        # _log_mean and _kappa below, each element taking its own branch.
        base = self.base_dist
        return _native.ops().tln_moments(base._cloc, base._cscale, base._clow, base._chigh)

    @lazy_property
    def _cbounds(self):
        source = self.expanded_from
        if source is not None:
            return source._cbounds
        return _standard.compact(self.batch_shape, self.low, self.high)

    @lazy_property
    def base_dist(self) -> TruncatedNormal:
        """The truncated normal of :math:`\\log\\theta`."""
        # Built from the compact parameters (a plate's expand is not materialised), expanded;
        # an expansion's is the source's, expanded.
        shape = self.batch_shape
        source = self.expanded_from
        if source is not None:
            return source.base_dist.expand(shape)
        loc, scale, low, high = _standard.compact(shape, self.loc, self.scale, self.low, self.high)
        low, high = low.log(), high.log()
        if not all(t.shape == shape for t in (loc, scale, low, high)):
            loc, scale = loc.expand(shape), scale.expand(shape)
            low, high = low.expand(shape), high.expand(shape)
        return TruncatedNormal(
            loc,
            scale,
            low,
            high,
            validate_args=False,
        )

    # --- cumulant generating function of log(theta) ------------------------------------------

    @lazy_property
    def _shift(self):
        # (alpha - t sigma, beta - t sigma) are the standardised bounds of the normal tilted by
        # exp(t x); delta_t = s_0 - s_t in [0, t sigma] is formed without cancellation, and so
        # is moved_t = t sigma - delta_t, how far the point nearest zero moves (formed as
        # t sigma - delta_t it would carry the rounding of delta_t, large where sigma is).
        # Returns (s_0, delta_1, moved_1, moved_2 - moved_1).
        base = self.base_dist
        alpha, beta, sigma = base._alpha, base._beta, base._cscale
        s0 = _standard.nearest_to_zero(alpha, beta)
        c1 = torch.minimum(torch.maximum(sigma, alpha), beta)
        c2 = torch.minimum(torch.maximum(2.0 * sigma, alpha), beta)
        m1 = c1 - s0
        return s0, sigma - m1, m1, c2 - c1

    @lazy_property
    def _tilted(self):
        base = self.base_dist
        sigma = base._cscale
        return _standard.moments(base._alpha - sigma, base._beta - sigma, base._width)

    @lazy_property
    def _tilted_log_zhat(self):
        if "_tilted" in self.__dict__:
            return self._tilted.log_zhat
        base = self.base_dist
        sigma = base._cscale
        return _standard.log_zhat(base._alpha - sigma, base._beta - sigma, base._width)[1]

    @lazy_property
    def _log_mean(self):
        # K(1) = mu + sigma^2/2 + log Z_1 - log Z_0, with the quadratic parts cancelled.
        s0, d1, m1, _ = self._shift
        sigma = self.base_dist._cscale
        return (
            self.base_dist._cloc
            + d1 * s0
            + 0.5 * m1 * (sigma + d1)
            + self._tilted_log_zhat
            - self.base_dist._log_zhat
        )

    @lazy_property
    def _kappa(self):
        base = self.base_dist
        s0, _, m1, m21 = self._shift
        sigma = base._cscale
        _, lz2 = _standard.log_zhat(
            base._alpha - 2.0 * sigma, base._beta - 2.0 * sigma, base._width
        )
        lz1 = self._tilted_log_zhat
        lz0 = base._log_zhat
        # (d2 - 2 d1) s0 + sigma^2 - d2^2 / 2 + d1^2 in the moves m_t = t sigma - d_t, with no
        # sigma^2 to cancel (it cancels to 2% in float32 at sigma = 400):
        m2 = m1 + m21
        exact = (m1 - m21) * s0 + 2.0 * sigma * m21 - 0.5 * m2.square() + m1.square()
        exact = exact + (lz2 - lz1) - (lz1 - lz0)
        # K''(1) approximates the second difference with relative error K''''(1) / (12 K''(1)),
        # at most about kappa / 2, while the difference loses about eps / kappa to rounding; the
        # switch balances the two (about 1e-8 relative at worst in float64).
        small = sigma.square() * self._tilted.variance
        switch = 1e-7 if sigma.dtype == torch.float64 else 1e-3
        return torch.where(small < switch, small, exact).clamp(min=0.0)
